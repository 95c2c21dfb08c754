"""The ``/api/jobs`` router: upstream's five job routes plus paging, filters and predictions.

Each handler is one call into ``findistil.flywheel.jobs`` (which knows nothing of HTTP);
errors it raises are ``FindistilError`` subclasses that ``api/app.py`` turns into
``{"detail": message}`` with the error's ``http_status`` (400 "Invalid job_id format",
404 "Job not found", 400 for cancel/delete in the wrong state), exactly as upstream answers.
Handlers are plain ``def``: the service functions block on the database, so FastAPI runs them
in its thread pool.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from fastapi.responses import FileResponse

from findistil.api.deps import ArtifactsDep, DBDep, RunnerDep, SettingsDep, StoreDep
from findistil.api.schemas import (
    AUTH_RESPONSES,
    ErrorResponse,
    JobActionResponse,
    JobDetail,
    JobListResponse,
    JobRequest,
    JobResponse,
    JobStatus,
)
from findistil.flywheel import jobs as service
from findistil.flywheel.jobs import JOB_ID_RE

router = APIRouter(prefix="/api/jobs", tags=["jobs"], responses=AUTH_RESPONSES)

_ERRORS = {400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}}
_TOO_LARGE = {413: {"model": ErrorResponse, "description": "body over 64 KiB"}}
# Documented, not enforced by FastAPI: a malformed id is upstream's 400 "Invalid job_id
# format" (flywheel.jobs.validate_job_id, a full match), not a 422.
JobId = Annotated[
    str,
    Path(description="24 lower-case hex characters", json_schema_extra={"pattern": JOB_ID_RE}),
]


@router.post(
    "", response_model=JobResponse, responses={400: {"model": ErrorResponse}, **_TOO_LARGE}
)
def create_job(
    body: JobRequest, db: DBDep, store: StoreDep, settings: SettingsDep, runner: RunnerDep
):
    """Queue a flywheel job over one workload/client's logged records."""
    split = (
        body.data_split_config.model_dump(exclude_unset=True) if body.data_split_config else None
    )
    created = service.create_job(db, store, settings, body.workload_id, body.client_id, split)
    if runner is not None:
        runner.wake()
    return created


@router.get("", response_model=JobListResponse)
def list_jobs(
    db: DBDep,
    status: JobStatus | None = None,
    workload_id: str | None = None,
    limit: int | None = Query(None, ge=1, le=1000, description="at most this many jobs"),
    offset: int = Query(0, ge=0, le=2**31 - 1, description="skip this many (newest first)"),
):
    """All jobs, newest first; ``limit``/``offset`` page, ``status``/``workload_id`` filter."""
    rows = service.list_jobs(db, status=status, workload_id=workload_id, limit=limit, offset=offset)
    return {"jobs": rows}


@router.get("/{job_id}", response_model=JobDetail, responses=_ERRORS)
def get_job(job_id: JobId, db: DBDep):
    """One job with its datasets, candidates, evaluations and customizations."""
    service.validate_job_id(job_id)
    return service.get_job(db, job_id)


@router.post("/{job_id}/cancel", response_model=JobActionResponse, responses=_ERRORS)
def cancel_job(job_id: JobId, db: DBDep, runner: RunnerDep):
    """Ask a pending or running job to stop; its stages stop within seconds."""
    service.validate_job_id(job_id)
    answer = service.cancel_job(db, job_id)
    if runner is not None:
        runner.cancelled(job_id)
    return answer


@router.delete("/{job_id}", response_model=JobActionResponse, responses=_ERRORS)
def delete_job(job_id: JobId, db: DBDep, artifacts: ArtifactsDep):
    """Delete a finished job with its datasets, adapters and predictions."""
    service.validate_job_id(job_id)
    return service.delete_job(db, artifacts, job_id)


@router.get(
    "/{job_id}/evaluations/{eval_id}/predictions",
    response_class=FileResponse,
    response_model=None,
    responses={200: {"content": {"application/x-ndjson": {}}}, **_ERRORS},
)
def download_predictions(
    job_id: JobId,
    eval_id: Annotated[int, Path(ge=1, le=2**31 - 1)],
    db: DBDep,
    artifacts: ArtifactsDep,
):
    """The predictions of one evaluation as JSONL (one row per eval record)."""
    service.validate_job_id(job_id)
    key = service.predictions_key(db, artifacts, job_id, eval_id)
    return FileResponse(
        artifacts.path(key),
        media_type="application/x-ndjson",
        filename=f"{job_id}-{eval_id}-predictions.jsonl",
    )
