"""The orchestrator core: job state (``db`` + ``migrations``), the job service (``jobs``),
the stages (``stages``), the stage graph (``graph``), leases (``leases``) and the runners
(``runner``: threads; ``celery_runner``: Celery workers). The API and CLI sit on top of
``jobs`` and ``runner``; nothing in the library below imports this package.

Experiment tracking (MLflow) is not wired in: ``stages.run_eval`` is the seam where a
tracking hook would log each evaluation's scores.
"""

from findistil.flywheel.db import FlywheelDB, new_job_id, open_flywheel_db
from findistil.flywheel.jobs import (
    InvalidJobId,
    cancel_job,
    create_job,
    delete_job,
    get_job,
    list_jobs,
    predictions_key,
    recover_interrupted,
    validate_job_id,
)
from findistil.flywheel.runner import Runner, ThreadRunner, make_runner, run_job

__all__ = [
    "FlywheelDB",
    "InvalidJobId",
    "Runner",
    "ThreadRunner",
    "cancel_job",
    "create_job",
    "delete_job",
    "get_job",
    "list_jobs",
    "make_runner",
    "new_job_id",
    "open_flywheel_db",
    "predictions_key",
    "recover_interrupted",
    "run_job",
    "validate_job_id",
]
