"""Deployments: which tuned student answers a workload's route, and the history behind it.

``deploy`` puts one candidate of a completed job behind ``findistil/route-<workload_id>``
with the calibration its customized eval measured (``cascade.py``) and the teacher the route
falls back to; the workload's previous deployment is retired and remembered, so
``rollback`` brings it back. ``list_deployments`` shows each with what its route answered
(requests, the student's share, mean latency). The route itself is ``routing.py``.

    deploy(db, artifacts, settings, job_id)            # the job's recommended student
    rollback(db, "news_classifier")                    # the one before it answers again
"""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy import func, insert, select, update

from findistil.artifacts import ArtifactStore
from findistil.config import Settings, TeacherConfig
from findistil.errors import ConfigError, FindistilError, JobStateError, NotFound
from findistil.flywheel.db import (
    FlywheelDB,
    candidates,
    customizations,
    deployments,
    evaluations,
    iso,
    jobs,
    route_requests,
    utcnow,
)

ROUTE_PREFIX = "findistil/route-"


def route_id(workload_id: str) -> str:
    return ROUTE_PREFIX + workload_id


def _teacher(settings: Settings, teacher: TeacherConfig | dict | None) -> dict[str, Any]:
    """The given teacher over the configured one; both a URL and a model are needed."""
    given = TeacherConfig.model_validate(teacher or {})
    merged = settings.teacher.model_copy(update=given.model_dump(exclude_unset=True))
    if not merged.base_url or not merged.model:
        raise ConfigError(
            "a route falls back to a teacher: give its base URL and model (--teacher-url, "
            "--teacher-model; or teacher.base_url / teacher.model in the config)"
        )
    if merged.api_key_env and merged.api_key_env not in os.environ:
        raise ConfigError(
            f"teacher.api_key_env: the environment variable {merged.api_key_env} is not set "
            "in this process"
        )
    return merged.model_dump()


def _chosen(conn, job, candidate: str | None):
    """(candidate row, customized model, cascade) of the candidate to deploy."""
    name = candidate or (job.recommendation or {}).get("model_name")
    if not name:
        raise FindistilError(f"job {job.id} recommends no student: name one with --candidate")
    row = conn.execute(
        select(candidates, customizations.c.customized_model, evaluations.c.report)
        .join(customizations, customizations.c.candidate_id == candidates.c.id)
        .join(evaluations, evaluations.c.candidate_id == candidates.c.id)
        .where(
            candidates.c.job_id == job.id,
            candidates.c.model_name == name,
            customizations.c.status == "completed",
            evaluations.c.eval_type == "customized-eval",
            evaluations.c.status == "completed",
        )
    ).first()
    if row is None:
        raise NotFound(f"job {job.id} has no tuned and evaluated candidate {name!r}")
    cascade = (row.report or {}).get("cascade")
    if not cascade:
        raise FindistilError(
            f"{name} in job {job.id} has no cascade calibration (its workload gives no "
            "per-row agreement, or cascade.enabled was off): serve it by its own name, "
            f"{row.customized_model}"
        )
    return row, row.customized_model, cascade


def deploy(
    db: FlywheelDB,
    artifacts: ArtifactStore,
    settings: Settings,
    job_id: str,
    candidate: str | None = None,
    teacher: TeacherConfig | dict | None = None,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Put a tuned student of a completed job behind its workload's route.

    ``threshold`` overrides the calibrated one (0: the student answers everything; above
    every confidence: the teacher does); the cascade keeps the calibrated value beside it.
    """
    from findistil.flywheel.jobs import find_served_model

    teacher_config = _teacher(settings, teacher)
    with db.begin() as conn:
        job = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
        if job is None:
            raise NotFound(f"Job with ID {job_id} not found")
        if job.status != "completed":
            raise JobStateError(f"job {job_id} is {job.status}: only a completed job deploys")
        row, model_id, cascade = _chosen(conn, job, candidate)
    if threshold is not None:
        cascade = {**cascade, "calibrated_threshold": cascade.get("threshold"),
                   "threshold": threshold}  # fmt: skip
    find_served_model(db, artifacts, model_id)  # its adapter must still be there
    with db.begin() as conn:
        current = _active(conn, job.workload_id)
        if current is not None:
            conn.execute(
                update(deployments)
                .where(deployments.c.id == current.id)
                .values(status="retired", retired_at=utcnow())
            )
        new_id = conn.execute(
            insert(deployments).values(
                workload_id=job.workload_id,
                client_id=job.client_id,
                job_id=job_id,
                candidate_id=row.id,
                model_name=row.model_name,
                customized_model=model_id,
                status="active",
                cascade=cascade,
                teacher=teacher_config,
                previous_id=current.id if current is not None else None,
                created_at=utcnow(),
            )
        ).inserted_primary_key[0]
    return get_deployment(db, new_id)


def _active(conn, workload_id: str):
    return conn.execute(
        select(deployments).where(
            deployments.c.workload_id == workload_id, deployments.c.status == "active"
        )
    ).first()


def active_deployment(db: FlywheelDB, workload_id: str) -> dict[str, Any]:
    """The deployment answering ``workload_id``'s route; ``NotFound`` when none does."""
    with db.begin() as conn:
        row = _active(conn, workload_id)
    if row is None:
        raise NotFound(
            f"The model {route_id(workload_id)!r} does not exist: no student is deployed for "
            f"workload {workload_id!r} (findistil deploy JOB_ID, or POST /api/deployments)"
        )
    return _as_dict(row, {})


def rollback(db: FlywheelDB, workload_id: str) -> dict[str, Any]:
    """Retire the workload's deployment and re-activate the one it replaced."""
    with db.begin() as conn:
        current = _active(conn, workload_id)
        if current is None:
            raise NotFound(f"no deployment answers workload {workload_id!r}")
        if current.previous_id is None:
            raise JobStateError(
                f"deployment {current.id} of {workload_id!r} replaced none: nothing to roll back to"
            )
        conn.execute(
            update(deployments)
            .where(deployments.c.id == current.id)
            .values(status="rolled_back", retired_at=utcnow())
        )
        conn.execute(
            update(deployments)
            .where(deployments.c.id == current.previous_id)
            .values(status="active", retired_at=None)
        )
    return get_deployment(db, current.previous_id)


def _stats(conn, ids: list[int]) -> dict[int, dict[str, Any]]:
    query = (
        select(
            route_requests.c.deployment_id,
            route_requests.c.path,
            func.count(),
            func.avg(route_requests.c.latency_s),
        )
        .where(route_requests.c.deployment_id.in_(ids))
        .group_by(route_requests.c.deployment_id, route_requests.c.path)
    )
    out: dict[int, dict[str, Any]] = {}
    for dep_id, path, count, latency in conn.execute(query):
        out.setdefault(dep_id, {})[path] = {"requests": count, "mean_latency_s": latency}
    return out


def _as_dict(row, stats: dict[str, Any]) -> dict[str, Any]:
    answered = {path: s["requests"] for path, s in stats.items()}
    total = sum(answered.values())
    cascade = dict(row.cascade or {})
    cascade.pop("curve", None)
    return {
        "id": row.id,
        "model": route_id(row.workload_id),
        "workload_id": row.workload_id,
        "client_id": row.client_id,
        "job_id": row.job_id,
        "model_name": row.model_name,
        "customized_model": row.customized_model,
        "status": row.status,
        "threshold": cascade.get("threshold"),
        "cascade": cascade,
        "teacher": row.teacher,
        "previous_id": row.previous_id,
        "created_at": iso(row.created_at),
        "retired_at": iso(row.retired_at),
        "requests": total,
        "student_share": answered.get("student", 0) / total if total else None,
        "paths": stats,
    }


def get_deployment(db: FlywheelDB, deployment_id: int) -> dict[str, Any]:
    with db.begin() as conn:
        row = conn.execute(select(deployments).where(deployments.c.id == deployment_id)).first()
        if row is None:
            raise NotFound(f"deployment {deployment_id} not found")
        return _as_dict(row, _stats(conn, [row.id]).get(row.id, {}))


def list_deployments(db: FlywheelDB, workload_id: str | None = None) -> list[dict[str, Any]]:
    """Every deployment (newest first), each with what its route answered."""
    query = select(deployments).order_by(deployments.c.id.desc())
    if workload_id is not None:
        query = query.where(deployments.c.workload_id == workload_id)
    with db.begin() as conn:
        rows = conn.execute(query).all()
        stats = _stats(conn, [r.id for r in rows]) if rows else {}
    return [_as_dict(r, stats.get(r.id, {})) for r in rows]


def log_route_request(
    db: FlywheelDB,
    deployment_id: int,
    path: str,
    *,
    confidence: float | None,
    latency_s: float,
    prompt_tokens: int,
    completion_tokens: int,
    error: str | None = None,
) -> None:
    with db.begin() as conn:
        conn.execute(
            insert(route_requests).values(
                deployment_id=deployment_id,
                at=utcnow(),
                path=path,
                confidence=confidence,
                latency_s=latency_s,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                error=error,
            )
        )
