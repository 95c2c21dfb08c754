"""The orchestrator core: job state (``db``), the job service (``jobs``), the stage graph
(``stages``) and the runners (``runner``). The API and CLI sit on top of ``jobs`` and
``runner``; nothing in the library below imports this package.

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
    predictions_path,
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
    "predictions_path",
    "recover_interrupted",
    "run_job",
    "validate_job_id",
]
