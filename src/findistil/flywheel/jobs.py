"""Job service: what the API and CLI call to create, list, show, cancel and delete jobs.

Sits between the HTTP/CLI layer (which knows nothing of tables) and the flywheel DB (which
knows nothing of HTTP). Every function takes a ``FlywheelDB`` and returns plain dicts in
upstream's JSON shapes (REFERENCE §8) plus findistil's additions (full ``scores``, cost
figures, the recommendation, ``progress``). User mistakes raise ``findistil.errors``
exceptions carrying upstream's messages; the API maps them to 400/404.

Also here: ``served_models`` (the tuned students ``/v1`` can answer with) and
``recover_interrupted`` (reap what silent processes left running; ``flywheel/leases.py``).
"""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update

from findistil.artifacts import ArtifactStore, job_key
from findistil.config import JobConfig, Settings
from findistil.errors import DataError, FindistilError, JobStateError, NotFound
from findistil.flywheel.db import (
    FINISHED,
    FlywheelDB,
    as_utc,
    candidates,
    close_unfinished,
    customizations,
    evaluations,
    iso,
    jobs,
    new_job_id,
    utcnow,
)
from findistil.flywheel.leases import live_lease, reap_expired
from findistil.flywheel.stages import CANCELLED_BY_USER, candidate_results
from findistil.recommend import recommend
from findistil.serving import ServedModel
from findistil.students import answers_untuned
from findistil.tracking import TrackingError, make_tracker

log = logging.getLogger(__name__)

JOB_ID_RE = "^[0-9a-f]{24}$"  # as OpenAPI documents it; checked with fullmatch
_JOB_ID = re.compile(r"[0-9a-f]{24}")


class InvalidJobId(FindistilError):
    """A job id that is not 24 hex characters (upstream answers 400 "Invalid job_id format")."""

    http_status = 400


def validate_job_id(job_id: str) -> str:
    """Return ``job_id`` if it has upstream's ObjectId format, else raise ``InvalidJobId``."""
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise InvalidJobId("Invalid job_id format")
    return job_id


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
    config = settings.job_config(data_split_config)  # frozen: stages read only this
    split = config.data_split_config
    found = store.count(workload_id, client_id)
    if found < split.min_total_records:
        raise DataError(
            f"workload_id {workload_id!r} / client_id {client_id!r} has {found} records, "
            f"fewer than data_split_config.min_total_records={split.min_total_records}: "
            "load more records (findistil logs load FILE) or lower min_total_records"
        )
    job_id = new_job_id()
    with db.begin() as conn:
        conn.execute(
            jobs.insert().values(
                id=job_id,
                workload_id=workload_id,
                client_id=client_id,
                status="pending",
                created_at=utcnow(),
                datasets=[],
                config=config.model_dump(mode="json"),
            )
        )
    return {"id": job_id, "status": "pending", "message": "NIM workflow started"}


SUMMARY_COLUMNS = (
    "id",
    "workload_id",
    "client_id",
    "status",
    "created_at",
    "started_at",
    "finished_at",
    "datasets",
    "error",
)


def _summary(row) -> dict:
    return {
        "id": row.id,
        "workload_id": row.workload_id,
        "client_id": row.client_id,
        "status": row.status,
        "started_at": iso(row.started_at or row.created_at),  # upstream requires it
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
    columns = [getattr(jobs.c, name) for name in SUMMARY_COLUMNS]  # not the frozen config
    query = select(*columns).order_by(jobs.c.created_at.desc(), jobs.c.id)
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


def _load_job(conn, job_id: str, missing: str = "Job not found"):
    """The job's row; ``NotFound(missing)`` when there is none (upstream's GET says "Job not
    found", its cancel and delete "Job with ID {id} not found")."""
    row = conn.execute(select(jobs).where(jobs.c.id == validate_job_id(job_id))).first()
    if row is None:
        raise NotFound(missing.format(id=job_id))
    return row


_NO_SUCH_JOB = "Job with ID {id} not found"


def predictions_url(job_id: str, eval_id: int) -> str:
    return f"/api/jobs/{job_id}/evaluations/{eval_id}/predictions"


def _runtime(row, now: datetime) -> float:
    """Seconds a stage ran: as stored once finished, else so far (0 before it started).

    Upstream's models require ``runtime_seconds``, so it is never null in a response."""
    if row.runtime_seconds is not None:
        return float(row.runtime_seconds)
    if row.started_at is None:
        return 0.0
    end = as_utc(row.finished_at) or now
    return max(0.0, (end - as_utc(row.started_at)).total_seconds())


def float_scores(scores: dict | None) -> dict[str, float]:
    """The numeric scores only, as floats: upstream types ``scores`` as ``dict[str, float]``
    (rows stored before counts and ``scoring_mode`` moved out of it carry them too)."""
    out = {}
    for key, value in (scores or {}).items():
        if isinstance(value, int | float) and not isinstance(value, bool) and key not in _COUNTS:
            out[key] = float(value)
    return out


_COUNTS = ("rows", "prompt_tokens", "completion_tokens")


def _evaluation(job_id: str, row, now: datetime) -> dict:
    has_predictions = row.status == "completed" and bool(row.predictions_key)
    report = row.report or {}
    stored = row.scores or {}
    return {
        "id": row.id,
        "eval_type": row.eval_type,
        "status": row.status,
        "scores": float_scores(stored),
        "scoring_mode": report.get("scoring_mode", stored.get("scoring_mode")),
        "counts": report.get("counts") or {k: stored[k] for k in _COUNTS if k in stored},
        "started_at": iso(row.started_at),
        "finished_at": iso(row.finished_at),
        "runtime_seconds": _runtime(row, now),
        "progress": row.progress or 0.0,
        "nmp_uri": row.nmp_uri,
        "mlflow_uri": row.mlflow_uri,
        "predictions_url": predictions_url(job_id, row.id) if has_predictions else None,
        "per_class": report.get("per_class"),  # {label: {precision, recall, f1, support}}
        "intervals": report.get("intervals"),  # {accuracy, macro_f1}: 95% bootstrap [lo, hi]
        "confusion": report.get("confusion"),  # {labels, columns, matrix}: teacher x student
        "error": row.error,
    }


def _cascade(evals, candidate_id: int) -> dict | None:
    """The tuned student's route calibration (``cascade.py``): threshold, coverage,
    agreement, expected cost ratio and the risk-coverage curve on eval; None before or
    without one."""
    for row in evals:
        mine = row.candidate_id == candidate_id and row.eval_type == "customized-eval"
        if mine and row.status == "completed":
            return (row.report or {}).get("cascade")
    return None


def _customization(row, now: datetime) -> dict:
    return {
        "id": row.id,
        "status": row.status,
        "started_at": iso(row.started_at),
        "finished_at": iso(row.finished_at),
        "runtime_seconds": _runtime(row, now),
        "progress": row.progress or 0.0,
        "epochs_completed": row.epochs_completed or 0,
        "steps_completed": row.steps_completed or 0,
        "nmp_uri": row.nmp_uri,
        "customized_model": row.customized_model,
        "mlflow_uri": row.mlflow_uri,
        "adapter_key": row.adapter_key,
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
    now = utcnow()
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
                "runtime_seconds": _runtime(cand, now),
                "error": cand.error,
                "worker": cand.worker,
                "queue": cand.queue,
                "params": cand.params,
                "dtype": cand.dtype,
                "device": cand.device,
                "rows_per_s": cand.rows_per_s,
                "s_per_row": cand.s_per_row,
                "training_seconds": cand.training_s,
                "examples_per_s": cand.examples_per_s,
                "cost_per_1k_rows_s": cand.s_per_row * 1000 if cand.s_per_row else None,
                "stages": cand.stages,
                "evaluations": [
                    _evaluation(job_id, e, now) for e in evals if e.candidate_id == cand.id
                ],
                "customizations": [
                    _customization(c, now) for c in customs if c.candidate_id == cand.id
                ],
                "cascade": _cascade(evals, cand.id),
            }
        )
    config = JobConfig.model_validate(job.config or {})
    recommendation = job.recommendation
    if recommendation is None and job.status not in FINISHED:  # live, while candidates finish
        recommendation = recommend(candidate_results(db, job_id), config.recommendation_tolerance)
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
        "started_at": iso(job.started_at or job.created_at),
        "finished_at": iso(job.finished_at),
        "created_at": iso(job.created_at),
        "num_records": job.num_records or 0,
        "llm_judge": job.llm_judge,
        "datasets": list(job.datasets or []),
        "nims": nims,
        "error": job.error,
        "progress": job_progress(job.status, nims),
        "recommendation": recommendation,
        "warnings": list(job.warnings or []),
        "data_split_config": config.data_split_config.model_dump(),
        "config": job.config,
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


# -- cancel / delete / predictions ---------------------------------------------------------
def cancel_job(db: FlywheelDB, job_id: str) -> dict:
    """Mark a pending/running job cancelled, and every unfinished child with it (rows a dead
    process owned too); running stages notice within ~a second and stop."""
    now = utcnow()
    with db.begin() as conn:
        job = _load_job(conn, job_id, _NO_SUCH_JOB)
        changed = conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.status.in_(("pending", "running")))
            .values(status="cancelled", finished_at=now, error=CANCELLED_BY_USER)
        ).rowcount
        if changed:
            close_unfinished(conn, job_id, "cancelled", CANCELLED_BY_USER, now)
    if not changed:
        if job.status == "cancelled":  # asking twice is not an error (upstream's answer)
            return {"id": job_id, "message": "Job is already cancelled."}
        raise JobStateError("Cannot cancel a job that has already finished.")
    return {"id": job_id, "message": "Job cancellation initiated successfully."}


def delete_job(db: FlywheelDB, artifacts: ArtifactStore, job_id: str) -> dict:
    """Delete a finished job: its artefacts (datasets, adapters, predictions) and its rows.

    Refused while the job runs, and while a cancelled job's worker still holds a lease on it
    (it is stopping), so no file is removed under a stage that still writes it.
    """
    with db.begin() as conn:
        job = _load_job(conn, job_id, _NO_SUCH_JOB)
    if job.status not in FINISHED:
        raise JobStateError("Cannot delete a running job. Please cancel the job first.")
    holder = live_lease(db, job_id)
    if holder is not None:
        raise JobStateError(
            f"Job {job_id} is {job.status} but worker {holder} is still stopping its stages: "
            "try again in a few seconds."
        )
    artifacts.delete(job_key(validate_job_id(job_id)))
    _delete_experiment(JobConfig.model_validate(job.config or {}), artifacts, job_id)
    with db.begin() as conn:
        for table in (evaluations, customizations, candidates, jobs):
            key = table.c.id if table is jobs else table.c.job_id
            conn.execute(delete(table).where(key == job_id))
    return {
        "id": job_id,
        "message": "Job deletion started. Resources will be cleaned up in the background.",
    }


def _delete_experiment(config: JobConfig, artifacts: ArtifactStore, job_id: str) -> None:
    """The job's MLflow experiment goes with it; a tracking server that is down is logged
    and does not keep the job (its experiment can be deleted in MLflow later)."""
    try:
        make_tracker(config.mlflow_config, artifacts.root).delete_job(job_id)
    except TrackingError as exc:
        log.warning("job %s deleted, its experiment not: %s", job_id, exc)


def predictions_key(db: FlywheelDB, artifacts: ArtifactStore, job_id: str, eval_id: int) -> str:
    """The artefact key of one evaluation's predictions JSONL (``NotFound`` when absent)."""
    with db.begin() as conn:
        _load_job(conn, job_id)
        row = conn.execute(
            select(evaluations).where(evaluations.c.id == eval_id, evaluations.c.job_id == job_id)
        ).first()
    if row is None:
        raise NotFound(f"Evaluation {eval_id} not found in job {job_id}")
    if not artifacts.exists(row.predictions_key):
        raise NotFound(f"Evaluation {eval_id} of job {job_id} has no predictions (yet)")
    return row.predictions_key


def recover_interrupted(db: FlywheelDB) -> int:
    """Fail what processes whose leases ran out left running; returns the jobs touched.

    Every live process calls this on start and, through its ``LeaseKeeper``, every few
    seconds; a job whose last candidate was reaped is finalized here too.
    """
    from findistil.flywheel.graph import finish_job_if_done

    before = count_jobs(db, status="failed")
    for job_id in reap_expired(db):
        finish_job_if_done(db, job_id)
    return max(0, count_jobs(db, status="failed") - before)


# -- serving: which tuned students can answer ----------------------------------------------
def served_models(db: FlywheelDB, artifacts: ArtifactStore) -> list[ServedModel]:
    """Every tuned artefact of a completed customization (newest first), then their bases.

    An artefact whose files are gone (``jobs delete``) is not listed: it cannot answer.
    """
    query = (
        select(
            customizations.c.customized_model,
            customizations.c.adapter_key,
            customizations.c.finished_at,
            customizations.c.job_id,
            candidates.c.model_name,
            candidates.c.kind,
        )
        .join(candidates, customizations.c.candidate_id == candidates.c.id)
        .where(
            customizations.c.status == "completed",
            customizations.c.customized_model.is_not(None),
            customizations.c.adapter_key.is_not(None),
        )
        .order_by(customizations.c.finished_at.desc(), customizations.c.id.desc())
    )
    with db.begin() as conn:
        rows = conn.execute(query).all()
    tuned: list[ServedModel] = []
    bases: dict[str, ServedModel] = {}
    workloads: dict[str, str | None] = {}
    for row in rows:
        if not artifacts.exists(row.adapter_key):
            continue
        finished = as_utc(row.finished_at)
        created = int(finished.timestamp()) if finished else 0
        kind = row.kind or "auto"
        path = artifacts.path(row.adapter_key)
        if row.job_id not in workloads:
            workloads[row.job_id] = _workload_of(artifacts, row.job_id)
        tuned.append(
            ServedModel(
                row.customized_model, row.model_name, kind, path, created, row.job_id,
                workloads[row.job_id],
            )
        )  # fmt: skip
        if answers_untuned(kind) and row.model_name not in bases:
            bases[row.model_name] = ServedModel(row.model_name, row.model_name, kind, None, 0)
    return tuned + list(bases.values())


def _workload_of(artifacts: ArtifactStore, job_id: str) -> str | None:
    """The workload type the job's datasets were curated as (their manifest says)."""
    key = job_key(job_id, "datasets", "manifest.json")
    if not artifacts.exists(key):
        return None
    try:
        return json.loads(artifacts.read_text(key)).get("workload_type")
    except (OSError, ValueError):
        return None


def find_served_model(db: FlywheelDB, artifacts: ArtifactStore, model_id: str) -> ServedModel:
    """The servable model called ``model_id``; ``NotFound`` says where the choices are listed."""
    for model in served_models(db, artifacts):
        if model.id == model_id:
            return model
    raise NotFound(
        f"The model {model_id!r} does not exist: GET /v1/models lists the tuned students of "
        "completed jobs and their bases"
    )
