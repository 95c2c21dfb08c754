"""findistil: a data flywheel that distils a large teacher LLM into small student models.

Flow: logged LLM calls -> ``logstore`` -> ``curate`` (datasets) -> ``students`` (LoRA / encoder)
-> ``evaluate`` (metrics vs the teacher) -> ``flywheel`` (jobs, API, CLI).
"""

__version__ = "0.1.0"
