"""The flywheel's stages: plain functions over the job DB, ``stage(ctx, job_id[, candidate_id])``.

``initialize`` → ``create_datasets`` → per candidate ``prepare`` (load weights; upstream's
deploy) → ``base_eval`` / ``icl_eval`` / ``customization`` → ``customized_eval`` → ``release``
(upstream's shutdown) → ``finalize``. Each stage reads what it needs from the DB and the job's
folder and writes its outcome back, so a runner (threads here, Celery later) only decides
where and when they run; the order lives in ``runner.run_job_stages``.

A stage that fails records the error on its own evaluation/customization row and re-raises;
a stage that sees ``should_stop()`` raises ``Cancelled`` and removes what it half wrote.
Artefacts: ``jobs_dir/<job>/datasets`` and ``jobs_dir/<job>/candidates/<n>/{adapter,<eval_type>}``.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from findistil.config import DataSplitConfig, NimConfig, Settings
from findistil.errors import Cancelled, FindistilError
from findistil.flywheel import jobs as service
from findistil.flywheel.db import (
    FlywheelDB,
    candidates,
    customizations,
    evaluations,
    jobs,
    utcnow,
)
from findistil.progress import Progress, ProgressFn, no_progress

STOP_CHECK_S = 0.5  # should_stop reads the job's status at most this often
PROGRESS_WRITE_S = 0.5  # progress rows are written at most this often (plus the last report)


class JobFailed(FindistilError):
    """A job-level stage (datasets, ...) failed; the message becomes the job's error."""


def customized_name(model_name: str, job_id: str, customization_id: int) -> str:
    """Upstream's name of a tuned model: ``{namespace}/customized-{model, / -> -}@cust-{id}``."""
    base = Path(model_name).name if Path(model_name).is_dir() else model_name.replace("/", "-")
    return f"findistil/customized-{base}@cust-{job_id}-{customization_id}"


def describe(exc: BaseException) -> str:
    """An error message for the API: ours as they are, anything else with its type."""
    if isinstance(exc, FindistilError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


@dataclass
class StageContext:
    """What stages share while one process runs a job: settings, DB, loaded students."""

    settings: Settings
    db: FlywheelDB
    progress: ProgressFn = no_progress
    shutdown: threading.Event = field(default_factory=threading.Event)
    students: dict[int, Any] = field(default_factory=dict)
    _stop_cache: dict[str, tuple[float, bool]] = field(default_factory=dict)
    _data_cache: dict[str, tuple[str, ...]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def should_stop(self, job_id: str) -> bool:
        """True once the job was cancelled (or the worker shuts down); one cheap query / 0.5 s."""
        if self.shutdown.is_set():
            return True
        now = time.monotonic()
        with self._lock:
            checked, stop = self._stop_cache.get(job_id, (-1e9, False))
        if stop or now - checked < STOP_CHECK_S:
            return stop
        with self.db.begin() as conn:
            status = conn.execute(select(jobs.c.status).where(jobs.c.id == job_id)).scalar()
        stop = status != "running"
        with self._lock:
            self._stop_cache[job_id] = (now, stop)
        return stop

    def stopper(self, job_id: str):
        return lambda: self.should_stop(job_id)

    def check(self, job_id: str) -> None:
        if self.should_stop(job_id):
            raise Cancelled(f"job {job_id} was stopped")

    def datasets(self, job_id: str) -> tuple[list[dict], list[dict], list[dict]]:
        """(eval, train, val) rows of the job. The files are read once, but every call parses
        fresh dicts, so a stage that mutates rows cannot leak into the next candidate."""
        with self._lock:
            texts = self._data_cache.get(job_id)
        if texts is None:
            folder = datasets_dir(self.settings, job_id)
            texts = tuple(
                path.read_text() if path.is_file() else ""
                for path in (
                    folder / "eval_data.jsonl",
                    folder / "training" / "train_data.jsonl",
                    folder / "validation" / "val_data.jsonl",
                )
            )
            with self._lock:
                self._data_cache[job_id] = texts
        return tuple(_parse_jsonl(text) for text in texts)

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._stop_cache.pop(job_id, None)
            self._data_cache.pop(job_id, None)


def _parse_jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def datasets_dir(settings: Settings, job_id: str) -> Path:
    return service.job_dir(settings, job_id) / "datasets"


def candidate_dir(settings: Settings, job_id: str, position: int) -> Path:
    return service.job_dir(settings, job_id) / "candidates" / str(position)


class RowProgress:
    """A ProgressFn that stores a stage's progress on its DB row (throttled) and forwards it."""

    def __init__(self, ctx: StageContext, table, row_id: int, job_id: str, label: str):
        self.ctx, self.table, self.row_id, self.job_id, self.label = (
            ctx,
            table,
            row_id,
            job_id,
            label,
        )
        self._last = 0.0

    def __call__(self, p: Progress) -> None:
        self.ctx.progress(Progress(f"{self.label}", p.done, p.total, dict(p.info)))
        now = time.monotonic()
        final = p.total is not None and p.done >= p.total
        if not final and now - self._last < PROGRESS_WRITE_S:
            return
        self._last = now
        values: dict[str, Any] = {"progress": round(p.percent, 1)}
        if self.table is customizations:
            for key in ("epochs_completed", "steps_completed"):
                if isinstance(p.info.get(key), int):
                    values[key] = p.info[key]
        with self.ctx.db.begin() as conn:
            conn.execute(update(self.table).where(self.table.c.id == self.row_id).values(**values))
            conn.execute(update(jobs).where(jobs.c.id == self.job_id).values(heartbeat_at=utcnow()))


def _job(ctx: StageContext, job_id: str):
    with ctx.db.begin() as conn:
        return conn.execute(select(jobs).where(jobs.c.id == job_id)).one()


def _candidate(ctx: StageContext, candidate_id: int):
    with ctx.db.begin() as conn:
        return conn.execute(select(candidates).where(candidates.c.id == candidate_id)).one()


def _set(ctx: StageContext, table, row_id, **values) -> None:
    with ctx.db.begin() as conn:
        conn.execute(update(table).where(table.c.id == row_id).values(**values))


# -- job-level stages ----------------------------------------------------------------------
def initialize(ctx: StageContext, job_id: str) -> list[int]:
    """Create the candidate rows from the job's stored ``nims``; returns their ids in order."""
    job = _job(ctx, job_id)
    with ctx.db.begin() as conn:
        existing = conn.execute(
            select(candidates.c.id).where(candidates.c.job_id == job_id).order_by("position")
        ).scalars()
        ids = list(existing)
        if ids:  # idempotent: a second call keeps the rows it made
            return ids
        for position, raw in enumerate((job.config or {}).get("nims", [])):
            nim = NimConfig.model_validate(raw)
            ids.append(
                conn.execute(
                    candidates.insert().values(
                        job_id=job_id,
                        position=position,
                        model_name=nim.model_name,
                        kind=nim.kind,
                        customization_enabled=nim.customization_enabled,
                        status="pending",
                        deployment_status="created",
                    )
                ).inserted_primary_key[0]
            )
    return ids


def create_datasets(ctx: StageContext, job_id: str) -> None:
    """Curate the workload's records into the job's datasets folder; failure fails the job."""
    from findistil.curate import curate_workload
    from findistil.logstore import open_logstore

    job = _job(ctx, job_id)
    split = DataSplitConfig.model_validate((job.config or {}).get("data_split_config") or {})
    out = datasets_dir(ctx.settings, job_id)
    shutil.rmtree(out, ignore_errors=True)  # a rerun starts from a clean folder
    store = open_logstore(ctx.settings)
    try:
        ctx.check(job_id)
        data = curate_workload(
            store,
            job.workload_id,
            job.client_id,
            split,
            out_dir=out,
            workload_type=ctx.settings.evaluation_config.workload_type,
            progress=lambda p: ctx.progress(Progress("datasets", p.done, p.total, dict(p.info))),
        )
    except Cancelled:
        shutil.rmtree(out, ignore_errors=True)
        raise
    except Exception as exc:
        shutil.rmtree(out, ignore_errors=True)
        raise JobFailed(describe(exc)) from exc
    finally:
        close = getattr(store, "close", None) or getattr(store, "dispose", None)
        if callable(close):
            close()
    counts = dict(data.counts)
    datasets = []
    for name, key in (("eval", "eval"), ("train", "train"), ("val", "val")):
        path = data.paths.get(name)
        datasets.append(
            {
                "name": f"flywheel-{name}-{job.workload_id}-{job_id}",
                "num_records": counts.get(key),
                "nmp_uri": Path(path).resolve().as_uri() if path else None,
            }
        )
    _set(ctx, jobs, job_id, datasets=datasets, num_records=counts.get("total"))


def finalize(ctx: StageContext, job_id: str) -> str:
    """Store the recommendation and end the job ``completed`` (``failed`` if no candidate
    finished); a job cancelled meanwhile keeps its status. Returns the final status."""
    detail = service.get_job(ctx.db, job_id)
    tolerance = float((_job(ctx, job_id).config or {}).get("recommendation_tolerance", 0.02))
    recommendation = service.recommend(detail["nims"], tolerance)
    nims = detail["nims"]
    status, error = "completed", None
    if nims and all(n["status"] == "failed" for n in nims):
        status, error = "failed", "every candidate failed; first error: " + str(nims[0]["error"])
    with ctx.db.begin() as conn:
        conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.status == "running")
            .values(status=status, error=error, finished_at=utcnow(), recommendation=recommendation)
        )
        return conn.execute(select(jobs.c.status).where(jobs.c.id == job_id)).scalar_one()


# -- candidate stages ----------------------------------------------------------------------
def prepare(ctx: StageContext, job_id: str, candidate_id: int) -> list[str]:
    """Load the candidate's weights (upstream: deploy the NIM); returns the planned stages."""
    from findistil.students import load_student

    cand = _candidate(ctx, candidate_id)
    nim = _nim(ctx, job_id, cand.position)
    _set(
        ctx,
        candidates,
        candidate_id,
        status="running-evals",
        deployment_status="pending",
        started_at=utcnow(),
    )
    ctx.check(job_id)
    try:
        student = load_student(nim.model_name, nim.kind, ctx.settings)
    except Exception:
        _set(ctx, candidates, candidate_id, deployment_status="failed")
        raise
    ctx.students[candidate_id] = student
    plan = planned_stages(student, nim)
    _set(
        ctx,
        candidates,
        candidate_id,
        deployment_status="ready",
        kind=student.kind,
        params=int(getattr(student, "num_params", 0) or 0) or None,
        dtype=str(getattr(student, "dtype", "") or "") or None,
        device=str(getattr(student, "device", "") or "") or None,
        stages=plan,
    )
    return plan


def planned_stages(student, nim: NimConfig) -> list[str]:
    """Which stages a candidate runs. Zero-shot evals need a generative student: an
    encoder's head is untrained before customization, so it gets only the customized eval."""
    zero_shot = getattr(student, "zero_shot", None)
    if zero_shot is None:
        zero_shot = student.kind == "causal_lm"
    plan = ["base-eval", "icl-eval"] if zero_shot else []
    if nim.customization_enabled:
        plan += ["customization", "customized-eval"]
    return plan


def _nim(ctx: StageContext, job_id: str, position: int) -> NimConfig:
    return NimConfig.model_validate(_job(ctx, job_id).config["nims"][position])


def run_eval(
    ctx: StageContext, job_id: str, candidate_id: int, eval_type: str, *, tuned: bool = False
) -> dict:
    """One evaluation of a loaded candidate (``tuned``: with its trained adapter); returns
    its scores. Any failure, switching to the adapter included, lands on the eval's row."""
    from findistil.evaluate import evaluate

    cand = _candidate(ctx, candidate_id)
    student = ctx.students[candidate_id]
    eval_rows, train_rows, _ = ctx.datasets(job_id)
    out = candidate_dir(ctx.settings, job_id, cand.position) / eval_type
    shutil.rmtree(out, ignore_errors=True)
    started = utcnow()
    with ctx.db.begin() as conn:
        row_id = conn.execute(
            evaluations.insert().values(
                job_id=job_id,
                candidate_id=candidate_id,
                eval_type=eval_type,
                status="running",
                scores={},
                progress=0.0,
                started_at=started,
            )
        ).inserted_primary_key[0]
    t0 = time.monotonic()
    try:
        ctx.check(job_id)
        if tuned:
            student.use_tuned(_trained_adapter(ctx, candidate_id))
        result = evaluate(
            student,
            eval_rows,
            eval_type,
            out_dir=out,
            eval_config=ctx.settings.evaluation_config,
            train_rows=train_rows,  # icl-eval's examples; label scoring's candidate answers
            icl_config=ctx.settings.icl_config,
            progress=RowProgress(ctx, evaluations, row_id, job_id, f"{cand.position}:{eval_type}"),
            should_stop=ctx.stopper(job_id),
        )
    except BaseException as exc:
        shutil.rmtree(out, ignore_errors=True)  # no half-written predictions
        _end_row(ctx, evaluations, row_id, exc, time.monotonic() - t0)
        raise
    scores = dict(result.scores)
    _set(
        ctx,
        evaluations,
        row_id,
        status="completed",
        scores=scores,
        report=_jsonable(getattr(result, "report", None)),
        predictions_path=str(result.predictions_path) if result.predictions_path else None,
        nmp_uri=out.resolve().as_uri(),
        progress=100.0,
        finished_at=utcnow(),
        runtime_seconds=time.monotonic() - t0,
    )
    rate = scores.get("rows_per_s")
    # The cost figure is the customized eval's speed (what would be served); earlier evals
    # fill it in until then.
    if (
        isinstance(rate, int | float)
        and rate > 0
        and (eval_type == "customized-eval" or cand.s_per_row is None)
    ):
        _set(ctx, candidates, candidate_id, rows_per_s=rate, s_per_row=1.0 / rate)
    return scores


def base_eval(ctx: StageContext, job_id: str, candidate_id: int) -> dict:
    return run_eval(ctx, job_id, candidate_id, "base-eval")


def icl_eval(ctx: StageContext, job_id: str, candidate_id: int) -> dict:
    return run_eval(ctx, job_id, candidate_id, "icl-eval")


def customized_eval(ctx: StageContext, job_id: str, candidate_id: int) -> dict:
    """Evaluate the candidate with the adapter its customization stage trained."""
    return run_eval(ctx, job_id, candidate_id, "customized-eval", tuned=True)


def _trained_adapter(ctx: StageContext, candidate_id: int) -> Path:
    with ctx.db.begin() as conn:
        adapter = conn.execute(
            select(customizations.c.adapter_path)
            .where(
                customizations.c.candidate_id == candidate_id,
                customizations.c.status == "completed",
            )
            .order_by(customizations.c.id.desc())
        ).scalar()
    if not adapter or not Path(adapter).exists():
        raise FindistilError("no trained adapter: the customization stage did not complete")
    return Path(adapter)


def customization(ctx: StageContext, job_id: str, candidate_id: int) -> Path:
    """Fine-tune the candidate on the job's train/val rows; returns the adapter folder."""
    cand = _candidate(ctx, candidate_id)
    nim = _nim(ctx, job_id, cand.position)
    student = ctx.students[candidate_id]
    _, train_rows, val_rows = ctx.datasets(job_id)
    out = candidate_dir(ctx.settings, job_id, cand.position) / "adapter"
    shutil.rmtree(out, ignore_errors=True)
    with ctx.db.begin() as conn:
        row_id = conn.execute(
            customizations.insert().values(
                job_id=job_id,
                candidate_id=candidate_id,
                status="running",
                progress=0.0,
                epochs_completed=0,
                steps_completed=0,
                started_at=utcnow(),
            )
        ).inserted_primary_key[0]
    t0 = time.monotonic()
    try:
        ctx.check(job_id)
        result = student.train(
            train_rows,
            val_rows,
            out,
            training=ctx.settings.training_for(nim),
            lora=ctx.settings.lora_config,
            progress=RowProgress(ctx, customizations, row_id, job_id, f"{cand.position}:train"),
            should_stop=ctx.stopper(job_id),
        )
    except BaseException as exc:
        shutil.rmtree(out, ignore_errors=True)  # never leave a half-written adapter
        _end_row(ctx, customizations, row_id, exc, time.monotonic() - t0)
        raise
    seconds = time.monotonic() - t0
    metrics = _jsonable(dict(result.metrics or {}))
    path = Path(result.path)
    _set(
        ctx,
        customizations,
        row_id,
        status="completed",
        progress=100.0,
        epochs_completed=result.epochs_completed,
        steps_completed=result.steps_completed,
        adapter_path=str(path),
        customized_model=customized_name(nim.model_name, job_id, row_id),
        nmp_uri=path.resolve().as_uri(),
        metrics=metrics,
        finished_at=utcnow(),
        runtime_seconds=seconds,
    )
    rate = metrics.get("examples_per_s") if isinstance(metrics, dict) else None
    _set(
        ctx,
        candidates,
        candidate_id,
        training_s=seconds,
        examples_per_s=rate if isinstance(rate, int | float) else None,
    )
    return path


def release(
    ctx: StageContext,
    job_id: str,
    candidate_id: int,
    *,
    status: str = "completed",
    error: str | None = None,
) -> None:
    """Free the candidate's model (upstream: shut the NIM down) and store its final status."""
    student = ctx.students.pop(candidate_id, None)
    try:
        if student is not None:
            student.close()
    finally:
        cand = _candidate(ctx, candidate_id)
        started = cand.started_at
        now = utcnow()
        runtime = (now - service.as_utc(started)).total_seconds() if started else None
        # A model that loaded was shut down cleanly ("completed") even when an eval failed.
        if status == "cancelled":
            deployment = "cancelled"
        else:
            deployment = "completed" if cand.deployment_status == "ready" else "failed"
        _set(
            ctx,
            candidates,
            candidate_id,
            status=status,
            error=error,
            deployment_status=deployment,
            finished_at=now,
            runtime_seconds=runtime,
        )


def stop_reason(ctx: StageContext) -> str:
    return service.INTERRUPTED if ctx.shutdown.is_set() else service.CANCELLED_BY_USER


def _end_row(ctx: StageContext, table, row_id: int, exc: BaseException, seconds: float) -> None:
    cancelled = isinstance(exc, Cancelled)
    _set(
        ctx,
        table,
        row_id,
        status="cancelled" if cancelled else "failed",
        error=stop_reason(ctx) if cancelled else describe(exc),
        finished_at=utcnow(),
        runtime_seconds=seconds,
    )


def _jsonable(value: Any) -> Any:
    """Round-trip through JSON so numpy numbers and Paths do not break the JSON column."""
    if value is None:
        return None
    return json.loads(json.dumps(value, default=_default))


def _default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)
