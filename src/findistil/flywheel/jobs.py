"""Job service: what the API and CLI call to create, list, show, cancel and delete jobs.

Sits between the HTTP/CLI layer (which knows nothing of tables) and the flywheel DB (which
knows nothing of HTTP). Every function takes a ``FlywheelDB`` and returns plain dicts in
upstream's JSON shapes (REFERENCE §8) plus findistil's additions (full ``scores``, cost
figures, the recommendation, ``progress``). User mistakes raise ``findistil.errors``
exceptions carrying upstream's messages; the API maps them to 400/404.

Also here: who owns a running job (``process_owner``) and ``recover_interrupted``, which a
process calls on start so no job stays ``running`` after its worker died.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select, update

from findistil.config import Settings, merge_split_config
from findistil.errors import DataError, FindistilError, JobStateError, NotFound
from findistil.flywheel.db import (
    FINISHED,
    FlywheelDB,
    as_utc,
    candidates,
    customizations,
    evaluations,
    iso,
    jobs,
    new_job_id,
    utcnow,
)

CANCELLED_BY_USER = "Job cancelled by user"
INTERRUPTED = "interrupted: the worker stopped while the job was running"
HEARTBEAT_STALE_S = 300.0  # a job owned by another host with no progress write for this long
_JOB_ID = re.compile(r"^[0-9a-f]{24}$")
_TOKEN = secrets.token_hex(4)  # tells this process from an earlier one that had the same pid


class InvalidJobId(FindistilError):
    """A job id that is not 24 hex characters (upstream answers 400 "Invalid job_id format")."""

    http_status = 400


def validate_job_id(job_id: str) -> str:
    """Return ``job_id`` if it has upstream's ObjectId format, else raise ``InvalidJobId``."""
    if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
        raise InvalidJobId("Invalid job_id format")
    return job_id


# -- ownership: which process runs a job --------------------------------------------------
def process_owner() -> str:
    """This process's owner tag, ``host:pid:token``, written on the jobs it claims."""
    return f"{socket.gethostname()}:{os.getpid()}:{_TOKEN}"


def owner_alive(owner: str | None, heartbeat_at: datetime | None, *, stale_after_s: float) -> bool:
    """Is the process that claimed a job still there? Same host: ask the OS about its pid.

    Another host (a Celery worker, another container) cannot be asked, so its job counts as
    alive while it keeps writing heartbeats (every progress write refreshes ``heartbeat_at``).
    """
    if not owner:
        return False
    host, _, rest = owner.partition(":")
    pid_text, _, token = rest.partition(":")
    if host != socket.gethostname():
        beat = as_utc(heartbeat_at)
        return beat is not None and utcnow() - beat < timedelta(seconds=stale_after_s)
    if not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return token == _TOKEN
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, belongs to someone else
        return True
    return True


# -- create / list / show ------------------------------------------------------------------
def create_job(
    db: FlywheelDB,
    store: Any,
    settings: Settings,
    workload_id: str,
    client_id: str,
    data_split_config: dict | None = None,
) -> dict:
    """Queue a flywheel job for one workload/client (status ``pending``).

    Args:
        store: the ``LogStore`` holding the records (checked for enough records here, so a
            hopeless job is refused at once instead of failing later).
        data_split_config: fields that override the configured split, merged field by field.

    Returns: ``{"id", "status": "pending", "message": "NIM workflow started"}``.
    Example: ``create_job(db, store, settings, "news_classifier", "demo", {"eval_size": 20})``.
    """
    split = merge_split_config(settings.data_split_config, data_split_config)
    found = store.count(workload_id, client_id)
    if found < split.min_total_records:
        raise DataError(
            f"workload_id {workload_id!r} / client_id {client_id!r} has {found} records, "
            f"fewer than data_split_config.min_total_records={split.min_total_records}: "
            "load more records (findistil logs load) or lower min_total_records"
        )
    job_id = new_job_id()
    config = {
        "data_split_config": split.model_dump(),
        "nims": [nim.model_dump() for nim in settings.nims],
        "recommendation_tolerance": settings.recommendation_tolerance,
    }
    with db.begin() as conn:
        conn.execute(
            jobs.insert().values(
                id=job_id,
                workload_id=workload_id,
                client_id=client_id,
                status="pending",
                created_at=utcnow(),
                datasets=[],
                config=config,
            )
        )
    return {"id": job_id, "status": "pending", "message": "NIM workflow started"}


def _summary(row) -> dict:
    return {
        "id": row.id,
        "workload_id": row.workload_id,
        "client_id": row.client_id,
        "status": row.status,
        "started_at": iso(row.started_at),
        "finished_at": iso(row.finished_at),
        "datasets": list(row.datasets or []),
        "error": row.error,
    }


def list_jobs(
    db: FlywheelDB,
    *,
    status: str | None = None,
    workload_id: str | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> list[dict]:
    """Job summaries, newest first, optionally filtered and paged."""
    query = select(jobs).order_by(jobs.c.created_at.desc(), jobs.c.id)
    if status:
        query = query.where(jobs.c.status == status)
    if workload_id:
        query = query.where(jobs.c.workload_id == workload_id)
    if offset:
        query = query.offset(offset)
    if limit is not None:
        query = query.limit(limit)
    with db.begin() as conn:
        return [_summary(row) for row in conn.execute(query)]


def count_jobs(db: FlywheelDB, *, status: str | None = None, workload_id: str | None = None) -> int:
    query = select(func.count()).select_from(jobs)
    if status:
        query = query.where(jobs.c.status == status)
    if workload_id:
        query = query.where(jobs.c.workload_id == workload_id)
    with db.begin() as conn:
        return int(conn.execute(query).scalar_one())


def _load_job(conn, job_id: str):
    row = conn.execute(select(jobs).where(jobs.c.id == validate_job_id(job_id))).first()
    if row is None:
        raise NotFound("Job not found")
    return row


def predictions_url(job_id: str, eval_id: int) -> str:
    return f"/api/jobs/{job_id}/evaluations/{eval_id}/predictions"


def _evaluation(job_id: str, row) -> dict:
    has_predictions = bool(row.predictions_path) and Path(row.predictions_path).is_file()
    return {
        "id": row.id,
        "eval_type": row.eval_type,
        "status": row.status,
        "scores": dict(row.scores or {}),
        "started_at": iso(row.started_at),
        "finished_at": iso(row.finished_at),
        "runtime_seconds": row.runtime_seconds,
        "progress": row.progress,
        "nmp_uri": row.nmp_uri,
        "mlflow_uri": row.mlflow_uri,
        "predictions_url": predictions_url(job_id, row.id) if has_predictions else None,
        "error": row.error,
    }


def _customization(row) -> dict:
    return {
        "id": row.id,
        "status": row.status,
        "started_at": iso(row.started_at),
        "finished_at": iso(row.finished_at),
        "runtime_seconds": row.runtime_seconds,
        "progress": row.progress,
        "epochs_completed": row.epochs_completed,
        "steps_completed": row.steps_completed,
        "nmp_uri": row.nmp_uri,
        "customized_model": row.customized_model,
        "adapter_path": row.adapter_path,
        "metrics": row.metrics,
        "error": row.error,
    }


def get_job(db: FlywheelDB, job_id: str) -> dict:
    """The job detail in upstream's shape (REFERENCE §8) plus findistil's additions.

    Raises ``InvalidJobId`` (400) for a malformed id and ``NotFound`` (404) for an unknown one.
    """
    with db.begin() as conn:
        job = _load_job(conn, job_id)
        cands = conn.execute(
            select(candidates).where(candidates.c.job_id == job_id).order_by(candidates.c.position)
        ).all()
        evals = conn.execute(
            select(evaluations).where(evaluations.c.job_id == job_id).order_by(evaluations.c.id)
        ).all()
        customs = conn.execute(
            select(customizations)
            .where(customizations.c.job_id == job_id)
            .order_by(customizations.c.id)
        ).all()
    nims = []
    for cand in cands:
        nims.append(
            {
                "id": cand.id,
                "model_name": cand.model_name,
                "kind": cand.kind,
                "status": cand.status,
                "deployment_status": cand.deployment_status,
                "started_at": iso(cand.started_at),
                "finished_at": iso(cand.finished_at),
                "runtime_seconds": cand.runtime_seconds,
                "error": cand.error,
                "params": cand.params,
                "dtype": cand.dtype,
                "device": cand.device,
                "rows_per_s": cand.rows_per_s,
                "s_per_row": cand.s_per_row,
                "training_seconds": cand.training_s,
                "examples_per_s": cand.examples_per_s,
                "cost_per_1k_rows_s": cand.s_per_row * 1000 if cand.s_per_row else None,
                "stages": cand.stages,
                "evaluations": [_evaluation(job_id, e) for e in evals if e.candidate_id == cand.id],
                "customizations": [_customization(c) for c in customs if c.candidate_id == cand.id],
            }
        )
    tolerance = float((job.config or {}).get("recommendation_tolerance", 0.02))
    recommendation = job.recommendation
    if recommendation is None and job.status not in FINISHED:
        recommendation = recommend(nims, tolerance)  # live view while candidates finish
    recommended = recommendation["model_name"] if recommendation else None
    for nim in nims:
        nim["recommended"] = nim["model_name"] == recommended
        relative = (recommendation or {}).get("relative_cost", {})
        nim["relative_cost"] = relative.get(nim["model_name"])
    return {
        "id": job.id,
        "workload_id": job.workload_id,
        "client_id": job.client_id,
        "status": job.status,
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "num_records": job.num_records,
        "llm_judge": job.llm_judge,
        "datasets": list(job.datasets or []),
        "nims": nims,
        "error": job.error,
        "progress": job_progress(job.status, nims),
        "recommendation": recommendation,
        "data_split_config": (job.config or {}).get("data_split_config"),
    }


def job_progress(status: str, nims: list[dict]) -> float:
    """Overall 0-100: datasets count as one unit, each candidate as its planned stages."""
    if status in FINISHED:
        return 100.0
    if status == "pending":
        return 0.0
    done, total = (1.0 if nims else 0.0), 1.0
    for nim in nims:
        rows = nim["evaluations"] + nim["customizations"]
        planned = 1 + (len(nim["stages"]) if nim["stages"] is not None else 4)
        total += planned
        if nim["status"] in FINISHED:
            done += planned
            continue
        done += 1.0 if nim["deployment_status"] in ("ready", "completed") else 0.0
        done += sum((r["progress"] or 0.0) / 100.0 for r in rows)
    return round(min(100.0, 100.0 * done / total), 1)


# -- recommendation ------------------------------------------------------------------------
def _macro_f1(evaluation: dict) -> float | None:
    scores = evaluation.get("scores") or {}
    value = scores.get("macro_f1", scores.get("f1_score"))
    return float(value) if isinstance(value, int | float) else None


def recommend(nims: list[dict], tolerance: float) -> dict | None:
    """The cheapest candidate whose macro-F1 is within ``tolerance`` of the best one.

    Each candidate is judged by its customized eval, or its best eval when it has none.
    Cost is the measured seconds per row of inference (then parameter count on a tie);
    ``relative_cost`` gives every candidate's s/row divided by the recommended one's.
    """
    scored = []
    for nim in nims:
        evals = [e for e in nim["evaluations"] if _macro_f1(e) is not None]
        if not evals:
            continue
        custom = [e for e in evals if e["eval_type"] == "customized-eval"]
        chosen = custom[0] if custom else max(evals, key=_macro_f1)
        s_per_row = nim.get("s_per_row") or _s_per_row(chosen)
        scored.append((nim, chosen, _macro_f1(chosen), s_per_row))
    if not scored:
        return None
    best_nim, best_eval, best_f1, _ = max(scored, key=lambda t: t[2])
    within = [t for t in scored if t[2] >= best_f1 - tolerance]
    inf = float("inf")
    nim, chosen, f1, s_per_row = min(
        within, key=lambda t: (t[3] if t[3] else inf, t[0].get("params") or inf)
    )
    relative = {
        other["model_name"]: round(s / s_per_row, 3) for other, _, _, s in scored if s and s_per_row
    }
    cost_1k = s_per_row * 1000 if s_per_row else None
    others = [f"{m} {r:.2g}x" for m, r in relative.items() if m != nim["model_name"]]
    reason = (
        f"cheapest candidate within {tolerance:g} macro-F1 of the best "
        f"({best_nim['model_name']} {best_eval['eval_type']}: {best_f1:.3f}); "
        f"{nim['model_name']} {chosen['eval_type']} scores {f1:.3f}"
    )
    if cost_1k is not None:
        reason += f" at {cost_1k:.1f} s per 1k rows"
    if others:
        reason += " (others cost " + ", ".join(others) + " as much)"
    return {
        "model_name": nim["model_name"],
        "eval_type": chosen["eval_type"],
        "macro_f1": f1,
        "best_model_name": best_nim["model_name"],
        "best_macro_f1": best_f1,
        "tolerance": tolerance,
        "s_per_row": s_per_row,
        "cost_per_1k_rows_s": cost_1k,
        "params": nim.get("params"),
        "relative_cost": relative,
        "reason": reason,
    }


def _s_per_row(evaluation: dict) -> float | None:
    rate = (evaluation.get("scores") or {}).get("rows_per_s")
    return 1.0 / rate if isinstance(rate, int | float) and rate > 0 else None


# -- cancel / delete / predictions ---------------------------------------------------------
def cancel_job(db: FlywheelDB, job_id: str) -> dict:
    """Mark a pending/running job cancelled; its stages notice within ~a second and stop."""
    with db.begin() as conn:
        _load_job(conn, job_id)
        changed = conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.status.in_(("pending", "running")))
            .values(status="cancelled", finished_at=utcnow(), error=CANCELLED_BY_USER)
        ).rowcount
    if not changed:
        raise JobStateError("Cannot cancel a job that has already finished.")
    return {"id": job_id, "message": "Job cancellation initiated successfully."}


def delete_job(db: FlywheelDB, settings: Settings, job_id: str) -> dict:
    """Delete a finished job: its folder (datasets, adapters, predictions) and its rows.

    Refused while the job runs, and while a cancelled job's worker is still stopping (its
    owner is alive), so no file is removed under a stage that still writes it.
    """
    with db.begin() as conn:
        job = _load_job(conn, job_id)
    if job.status not in FINISHED or owner_alive(
        job.owner, job.heartbeat_at, stale_after_s=HEARTBEAT_STALE_S
    ):
        raise JobStateError("Cannot delete a running job. Please cancel the job first.")
    remove_job_files(settings, job_id)
    with db.begin() as conn:
        for table in (evaluations, customizations, candidates, jobs):
            key = table.c.id if table is jobs else table.c.job_id
            conn.execute(delete(table).where(key == job_id))
    return {
        "id": job_id,
        "message": "Job deletion started. Resources will be cleaned up in the background.",
    }


def job_dir(settings: Settings, job_id: str) -> Path:
    """``jobs_dir/<job_id>``: every artefact of one job lives below it, nothing else."""
    return settings.jobs_dir / validate_job_id(job_id)


def remove_job_files(settings: Settings, job_id: str) -> None:
    folder = job_dir(settings, job_id).resolve()
    root = settings.jobs_dir.resolve()
    if folder.parent != root:  # a symlinked or odd path must never widen the delete
        raise JobStateError(f"refusing to delete {folder}: it is not a job folder under {root}")
    shutil.rmtree(folder, ignore_errors=True)


def predictions_path(db: FlywheelDB, job_id: str, eval_id: int) -> Path:
    """The predictions JSONL of one evaluation of a job (``NotFound`` when absent)."""
    with db.begin() as conn:
        _load_job(conn, job_id)
        row = conn.execute(
            select(evaluations).where(evaluations.c.id == eval_id, evaluations.c.job_id == job_id)
        ).first()
    if row is None:
        raise NotFound(f"Evaluation {eval_id} not found in job {job_id}")
    path = Path(row.predictions_path) if row.predictions_path else None
    if path is None or not path.is_file():
        raise NotFound(f"Evaluation {eval_id} of job {job_id} has no predictions (yet)")
    return path


# -- restart recovery ----------------------------------------------------------------------
def recover_interrupted(db: FlywheelDB, *, stale_after_s: float = HEARTBEAT_STALE_S) -> int:
    """Fail jobs left ``running`` by a process that is gone; returns how many.

    Pending jobs were never started and stay queued. A finished job whose dead owner tag
    is still set gets it cleared, so it can be deleted.
    """
    with db.begin() as conn:
        rows = conn.execute(
            select(jobs.c.id, jobs.c.status, jobs.c.owner, jobs.c.heartbeat_at).where(
                jobs.c.owner.is_not(None) | (jobs.c.status == "running")
            )
        ).all()
    failed = 0
    for row in rows:
        if owner_alive(row.owner, row.heartbeat_at, stale_after_s=stale_after_s):
            continue
        now = utcnow()
        with db.begin() as conn:
            if row.status == "running":
                failed += conn.execute(
                    update(jobs)
                    .where(jobs.c.id == row.id, jobs.c.status == "running")
                    .values(status="failed", error=INTERRUPTED, finished_at=now, owner=None)
                ).rowcount
                _close_children(conn, row.id, "failed", INTERRUPTED, now)
            else:
                conn.execute(update(jobs).where(jobs.c.id == row.id).values(owner=None))
    return failed


def _close_children(conn, job_id: str, status: str, error: str, now: datetime) -> None:
    """Give every unfinished candidate/eval/customization of a job a final status."""
    for table in (evaluations, customizations):
        conn.execute(
            update(table)
            .where(table.c.job_id == job_id, table.c.status.not_in(FINISHED))
            .values(status=status, error=error, finished_at=now)
        )
    conn.execute(
        update(candidates)
        .where(candidates.c.job_id == job_id, candidates.c.status.not_in(FINISHED))
        .values(status=status, error=error, finished_at=now, deployment_status=status)
    )
