"""The ``/api/deployments`` router: which tuned student answers each workload's route.

``POST /api/deployments`` puts a completed job's student (the recommended one unless
``candidate`` names another) behind ``findistil/route-<workload_id>`` with the teacher it
falls back to; ``POST /api/deployments/{workload_id}/rollback`` brings back the one it
replaced; ``GET /api/deployments`` lists them with what their routes answered. The work is
``flywheel/deployments.py``'s; writing routes need an admin token when tokens are set.
"""

from __future__ import annotations

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool

from findistil.api.deps import ArtifactsDep, DBDep, SettingsDep
from findistil.api.schemas import (
    AUTH_RESPONSES,
    Deployment,
    DeploymentList,
    DeploymentRequest,
    ErrorResponse,
)
from findistil.flywheel import deployments as service

router = APIRouter(prefix="/api/deployments", tags=["deployments"], responses=AUTH_RESPONSES)
_ERRORS = {
    400: {"model": ErrorResponse, "description": "no calibration, no teacher, job unfinished"},
    404: {"model": ErrorResponse, "description": "unknown job, candidate or workload"},
}


@router.post("", response_model=Deployment, status_code=201, responses=_ERRORS)
async def create_deployment(
    body: DeploymentRequest, db: DBDep, artifacts: ArtifactsDep, settings: SettingsDep
):
    """Deploy a tuned student behind its workload's route; the previous one is retired."""
    teacher = body.teacher.model_dump(exclude_none=True) if body.teacher else None
    return await run_in_threadpool(
        service.deploy, db, artifacts, settings, body.job_id, body.candidate, teacher,
        body.threshold,
    )  # fmt: skip


@router.get("", response_model=DeploymentList)
def list_deployments(db: DBDep, workload_id: str | None = Query(None, max_length=256)):
    """Every deployment, newest first, with its route's request counts."""
    return {"deployments": service.list_deployments(db, workload_id)}


@router.post("/{workload_id}/rollback", response_model=Deployment, responses=_ERRORS)
def rollback(workload_id: str, db: DBDep):
    """Retire the workload's deployment and re-activate the one it replaced."""
    return service.rollback(db, workload_id)
