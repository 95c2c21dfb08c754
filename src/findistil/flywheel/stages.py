"""The flywheel's stages: plain functions of ids over the job DB and the artefact store.

``initialize`` → ``create_datasets`` → per candidate ``prepare`` (load weights; upstream's
deploy) → ``base_eval`` / ``icl_eval`` / ``customization`` → ``customized_eval`` → ``release``
(upstream's shutdown) → ``finalize``; the order lives in ``flywheel/graph.py``. A stage reads
everything from the job's row (its frozen ``JobConfig``), the candidate's rows and the
artefact store, and keeps nothing in memory for the next one: the student comes from the
per-process ``StudentCache``, so any stage can run in any process.

Stages are idempotent: each writes its own row (one per candidate and eval type, one
customization per candidate) by upsert, and a stage whose row is already ``completed`` with
its artefact in place returns what it stored. Running a stage twice leaves the same rows.

A stage that fails records the error on its row and re-raises; a stage that sees
``should_stop()`` raises ``Cancelled`` and removes what it half wrote. Final writes are
conditional on the row still ``running``, so a cancel or a reaped lease that closed it wins.
Artefact keys: ``jobs/<job>/datasets/...``, ``jobs/<job>/candidates/<n>/{adapter,<eval_type>}``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from findistil.artifacts import ArtifactStore, job_key, staged_dir
from findistil.config import CandidateConfig, JobConfig, MlflowConfig, Settings
from findistil.errors import Cancelled, ConfigError, FindistilError
from findistil.flywheel import leases
from findistil.flywheel.db import (
    FlywheelDB,
    add_warning,
    as_utc,
    candidates,
    customizations,
    evaluations,
    jobs,
    utcnow,
)
from findistil.progress import Progress, ProgressFn, no_progress
from findistil.recommend import CandidateResult, EvalResult, recommend
from findistil.students import LABEL_SCORES, answers_untuned, can
from findistil.students.cache import StudentCache, shared_cache
from findistil.tracking import (
    RunRecord,
    Tracker,
    candidate_params,
    eval_record,
    make_tracker,
    training_record,
)

log = logging.getLogger(__name__)

CANCELLED_BY_USER = "Job cancelled by user"
STOP_CHECK_S = 0.5  # should_stop reads the job's status at most this often
PROGRESS_WRITE_S = 0.5  # progress rows are written at most this often (plus the last report)
DATASET_FILES = ("eval_data.jsonl", "training/train_data.jsonl", "validation/val_data.jsonl")
MAX_STEP_POINTS = 500  # training-loss points kept on a customization row


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
    """How this process takes part: its own settings (home, model cache, device, artefact
    root; never a job's settings), the DB, the artefact store, the student cache and its
    lease owner tag. Nothing about a job is kept here between stages."""

    settings: Settings
    db: FlywheelDB
    artifacts: ArtifactStore | None = None
    cache: StudentCache | None = None
    worker: str = field(default_factory=leases.worker_name)
    progress: ProgressFn = no_progress
    shutdown: threading.Event = field(default_factory=threading.Event)
    _stop_cache: dict[tuple, tuple[float, bool]] = field(default_factory=dict)
    _trackers: dict[str, Tracker] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.artifacts = self.artifacts or ArtifactStore(self.settings.artifacts_root)
        self.cache = self.cache or shared_cache(self.settings.student_cache_size)

    def should_stop(self, job_id: str, candidate_id: int | None = None) -> bool:
        """True once the job was cancelled, this process shuts down, or it lost the
        candidate's lease (a reaper failed it); one cheap query per 0.5 s."""
        if self.shutdown.is_set():
            return True
        key, now = (job_id, candidate_id), time.monotonic()
        with self._lock:
            checked, stop = self._stop_cache.get(key, (-1e9, False))
        if stop or now - checked < STOP_CHECK_S:
            return stop
        with self.db.begin() as conn:
            status = conn.execute(select(jobs.c.status).where(jobs.c.id == job_id)).scalar()
            stop = status != "running"
            if candidate_id is not None and not stop:
                owner = conn.execute(
                    select(candidates.c.owner).where(candidates.c.id == candidate_id)
                ).scalar()
                stop = owner != self.worker
        with self._lock:
            self._stop_cache[key] = (now, stop)
        return stop

    def stopper(self, job_id: str, candidate_id: int | None = None):
        return lambda: self.should_stop(job_id, candidate_id)

    def check(self, job_id: str, candidate_id: int | None = None) -> None:
        if self.should_stop(job_id, candidate_id):
            raise Cancelled(f"job {job_id} was stopped")

    @contextlib.contextmanager
    def student(
        self, job_id: str, candidate_id: int, nim: CandidateConfig, adapter: Path | None = None
    ) -> Iterator[Any]:
        """The candidate's student from this process's cache. A cold load is waited for with
        the stop check polled: a cancel during it stops the stage within a second (the load
        finishes in the background and stays cached)."""
        stop = self.stopper(job_id, candidate_id)
        if not self.cache.warm(nim.model_name, nim.kind, self.settings, stop):
            raise Cancelled(f"job {job_id} was stopped while {nim.model_name} was loading")
        with self.cache.use(nim.model_name, nim.kind, self.settings, adapter=adapter) as student:
            yield student

    def stop_reason(self) -> str:
        """The error of rows this process stops: a user's cancel, or its own shutdown."""
        return leases.shut_down(self.worker) if self.shutdown.is_set() else CANCELLED_BY_USER

    def tracker(self, config: MlflowConfig) -> Tracker:
        """The tracker of a job's ``mlflow_config`` (one per distinct config, reused)."""
        key = config.model_dump_json()
        with self._lock:
            if key not in self._trackers:
                self._trackers[key] = make_tracker(config, self.settings.artifacts_root)
            return self._trackers[key]

    def forget(self, job_id: str) -> None:
        with self._lock:
            for key in [k for k in self._stop_cache if k[0] == job_id]:
                del self._stop_cache[key]


# -- reading a job -------------------------------------------------------------------------
def _job(db: FlywheelDB, job_id: str):
    with db.begin() as conn:
        return conn.execute(select(jobs).where(jobs.c.id == job_id)).one()


def _candidate(ctx: StageContext, candidate_id: int):
    with ctx.db.begin() as conn:
        return conn.execute(select(candidates).where(candidates.c.id == candidate_id)).one()


def job_config(db: FlywheelDB, job_id: str) -> JobConfig:
    """The config frozen on the job when it was created: the only one stages read."""
    return JobConfig.model_validate(_job(db, job_id).config or {})


def candidate_config(ctx: StageContext, job_id: str, position: int) -> CandidateConfig:
    return job_config(ctx.db, job_id).nims[position]


def datasets(ctx: StageContext, job_id: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(eval, train, val) rows of the job, parsed fresh from the artefact store on each
    call, so a stage that mutates rows cannot leak into the next candidate."""
    out = []
    for name in DATASET_FILES:
        key = job_key(job_id, "datasets", name)
        text = ctx.artifacts.read_text(key) if ctx.artifacts.exists(key) else ""
        out.append([json.loads(line) for line in text.splitlines() if line.strip()])
    return tuple(out)


def _set(ctx: StageContext, table, row_id, *, only_running: bool = False, **values) -> int:
    query = update(table).where(table.c.id == row_id)
    if only_running:
        query = query.where(table.c.status == "running")
    with ctx.db.begin() as conn:
        return conn.execute(query.values(**values)).rowcount


class RowProgress:
    """A ProgressFn that stores a stage's progress on its DB row (throttled) and forwards it."""

    def __init__(self, ctx: StageContext, table, row_id: int, label: str):
        self.ctx, self.table, self.row_id, self.label = ctx, table, row_id, label
        self._last = 0.0

    def __call__(self, p: Progress) -> None:
        self.ctx.progress(Progress(self.label, p.done, p.total, dict(p.info)))
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
        _set(self.ctx, self.table, self.row_id, only_running=True, **values)


class StepLog:
    """A ProgressFn that keeps each training step's loss and learning rate (the reports
    that carry ``lr``) and forwards every report."""

    def __init__(self, forward: ProgressFn) -> None:
        self.forward, self.points = forward, []

    def __call__(self, p: Progress) -> None:
        if "lr" in p.info:
            self.points.append({"step": p.done, "loss": p.info.get("loss"), "lr": p.info["lr"]})
        self.forward(p)

    def thinned(self, limit: int) -> list[dict]:
        """At most ``limit`` evenly spaced points, the last step always among them."""
        if len(self.points) <= limit:
            return list(self.points)
        stride = len(self.points) / limit
        picked = [self.points[int(i * stride)] for i in range(limit - 1)]
        return [*picked, self.points[-1]]


# -- job-level stages ----------------------------------------------------------------------
def initialize(ctx: StageContext, job_id: str) -> list[int]:
    """Create the candidate rows from the job's frozen ``nims``; returns their ids in order."""
    config = job_config(ctx.db, job_id)
    with ctx.db.begin() as conn:
        ids = list(
            conn.execute(
                select(candidates.c.id).where(candidates.c.job_id == job_id).order_by("position")
            ).scalars()
        )
        if ids:  # idempotent: a second call keeps the rows it made
            return ids
        for position, nim in enumerate(config.nims):
            ids.append(
                conn.execute(
                    candidates.insert().values(
                        job_id=job_id,
                        position=position,
                        model_name=nim.model_name,
                        kind=nim.kind,
                        customization_enabled=nim.customization_enabled,
                        queue=nim.queue,
                        status="pending",
                        deployment_status="created",
                    )
                ).inserted_primary_key[0]
            )
    return ids


def create_datasets(ctx: StageContext, job_id: str) -> None:
    """Curate the workload's records into the job's datasets; failure fails the job.

    Done once per job: a re-run finds the datasets in place and keeps them, so a retried job
    never sees records that were logged after it started.
    """
    from findistil.curate import curate_workload
    from findistil.logstore import open_logstore

    job = _job(ctx.db, job_id)
    if job.datasets and all(ctx.artifacts.exists(d.get("nmp_uri")) for d in job.datasets):
        return
    config = job_config(ctx.db, job_id)
    target = ctx.artifacts.path(job_key(job_id, "datasets"))
    store = open_logstore(ctx.settings)
    try:
        ctx.check(job_id)
        with staged_dir(target) as tmp:
            data = curate_workload(
                store,
                job.workload_id,
                job.client_id,
                config.data_split_config,
                out_dir=tmp,
                workload_type=config.evaluation_config.workload_type,
                progress=lambda p: ctx.progress(Progress("datasets", p.done, p.total, p.info)),
            )
    except Cancelled:
        raise
    except Exception as exc:
        raise JobFailed(describe(exc)) from exc
    finally:
        store.close()
    rows = []
    for name in ("eval", "train", "val"):
        path = data.paths.get(name)
        key = job_key(job_id, "datasets", *Path(path).relative_to(tmp).parts) if path else None
        rows.append(
            {
                "name": f"flywheel-{name}-{job.workload_id}-{job_id}",
                "num_records": data.counts.get(name),
                "nmp_uri": key,
            }
        )
    _set(ctx, jobs, job_id, datasets=rows, num_records=data.counts.get("total"))


def candidate_results(db: FlywheelDB, job_id: str) -> list[CandidateResult]:
    """The typed results ``recommend`` judges, from the job's rows."""
    with db.begin() as conn:
        cands = conn.execute(
            select(candidates).where(candidates.c.job_id == job_id).order_by("position")
        ).all()
        evals = conn.execute(
            select(evaluations.c.candidate_id, evaluations.c.eval_type, evaluations.c.scores)
            .where(evaluations.c.job_id == job_id, evaluations.c.status == "completed")
            .order_by(evaluations.c.id)
        ).all()
    return [
        CandidateResult(
            c.model_name,
            c.params,
            c.s_per_row,
            [EvalResult(e.eval_type, e.scores or {}) for e in evals if e.candidate_id == c.id],
        )
        for c in cands
    ]


def finalize(db: FlywheelDB, job_id: str) -> str:
    """Store the recommendation and end the job ``completed`` (``failed`` if no candidate
    finished); a job cancelled or failed meanwhile keeps its status. Returns the status."""
    tolerance = job_config(db, job_id).recommendation_tolerance
    recommendation = recommend(candidate_results(db, job_id), tolerance)
    with db.begin() as conn:
        outcomes = conn.execute(
            select(candidates.c.status, candidates.c.error)
            .where(candidates.c.job_id == job_id)
            .order_by(candidates.c.position)
        ).all()
        status, error = "completed", None
        if outcomes and all(o.status != "completed" for o in outcomes):
            status, error = "failed", f"every candidate failed; first error: {outcomes[0].error}"
        conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.status == "running")
            .values(
                status=status,
                error=error,
                finished_at=utcnow(),
                recommendation=recommendation,
                owner=None,  # nothing of the job runs any more: it can be deleted at once
                lease_expires_at=None,
            )
        )
        return conn.execute(select(jobs.c.status).where(jobs.c.id == job_id)).scalar_one()


# -- candidate stages ----------------------------------------------------------------------
def prepare(ctx: StageContext, job_id: str, candidate_id: int) -> list[str]:
    """Load the candidate's weights into this process's cache (upstream: deploy the NIM);
    returns the planned stages."""
    cand = _candidate(ctx, candidate_id)
    nim = candidate_config(ctx, job_id, cand.position)
    _set(ctx, candidates, candidate_id, deployment_status="pending")
    ctx.check(job_id, candidate_id)
    try:
        with ctx.student(job_id, candidate_id, nim) as student:
            plan = planned_stages(student, nim)
            values = {
                "kind": student.kind,
                "params": int(getattr(student, "num_params", 0) or 0) or None,
                "dtype": str(getattr(student, "dtype", "") or "") or None,
                "device": str(getattr(student, "device", "") or "") or None,
            }
    except Exception as exc:
        status = "cancelled" if isinstance(exc, Cancelled) else "failed"
        _set(ctx, candidates, candidate_id, deployment_status=status)
        raise
    _set(ctx, candidates, candidate_id, deployment_status="ready", stages=plan, **values)
    return plan


def _check_scoring_mode(kind: str, mode: str) -> None:
    if mode == "label_scores" and not can(kind, LABEL_SCORES):
        raise ConfigError(
            f"evaluation_config.scoring_mode label_scores: {kind} students cannot rank "
            "candidate answers; use scoring_mode generate"
        )


def planned_stages(student, nim: CandidateConfig) -> list[str]:
    """Which stages a candidate runs. Zero-shot evals need a student that answers untuned
    (its kind says so): an encoder's head exists only after customization."""
    plan = ["base-eval", "icl-eval"] if answers_untuned(student.kind) else []
    if nim.customization_enabled:
        plan += ["customization", "customized-eval"]
    return plan


def _start_row(ctx: StageContext, table, match: dict, fresh: dict):
    """The stage's own row, reset to ``running`` (updated in place, or inserted once)."""
    where = [getattr(table.c, k) == v for k, v in match.items()]
    for _ in range(2):
        with ctx.db.begin() as conn:
            row_id = conn.execute(select(table.c.id).where(*where)).scalar()
            if row_id is not None:
                conn.execute(update(table).where(table.c.id == row_id).values(**fresh))
                return row_id
            try:
                with conn.begin_nested():
                    return conn.execute(
                        table.insert().values(**match, **fresh)
                    ).inserted_primary_key[0]
            except IntegrityError:  # another process inserted it first: update that one
                continue
    raise FindistilError(f"could not claim the {table.name} row of {match}")


def _done_row(ctx: StageContext, table, match: dict, artefact_column: str):
    """The stage's row if it already completed and its artefact is still there."""
    where = [getattr(table.c, k) == v for k, v in match.items()]
    with ctx.db.begin() as conn:
        row = conn.execute(select(table).where(*where, table.c.status == "completed")).first()
    if row is not None and ctx.artifacts.exists(getattr(row, artefact_column)):
        return row
    return None


def run_eval(ctx: StageContext, job_id: str, candidate_id: int, eval_type: str) -> dict:
    """One evaluation of a candidate (the customized eval with its trained adapter); returns
    its scores. Any failure, loading the adapter included, lands on the eval's row."""
    from findistil.evaluate import evaluate

    match = {"job_id": job_id, "candidate_id": candidate_id, "eval_type": eval_type}
    done = _done_row(ctx, evaluations, match, "predictions_key")
    if done is not None:
        return dict(done.scores or {})
    cand = _candidate(ctx, candidate_id)
    config = job_config(ctx.db, job_id)
    nim = config.nims[cand.position]
    key = job_key(job_id, "candidates", cand.position, eval_type)
    out = ctx.artifacts.path(key)
    row_id = _start_row(ctx, evaluations, match, _fresh_eval())
    t0 = time.monotonic()
    try:
        ctx.check(job_id, candidate_id)
        adapter = _trained_adapter(ctx, candidate_id) if eval_type == "customized-eval" else None
        eval_rows, train_rows, val_rows = datasets(ctx, job_id)
        with ctx.student(job_id, candidate_id, nim, adapter) as student:
            _check_scoring_mode(student.kind, config.evaluation_config.scoring_mode)
            result = evaluate(
                student,
                eval_rows,
                eval_type,
                out_dir=out,
                eval_config=config.evaluation_config,
                train_rows=train_rows,  # icl-eval's examples; label scoring's candidate answers
                icl_config=config.icl_config,
                progress=RowProgress(ctx, evaluations, row_id, f"{cand.position}:{eval_type}"),
                should_stop=ctx.stopper(job_id, candidate_id),
            )
            if eval_type == "customized-eval" and config.cascade.enabled:
                result.report["cascade"] = _cascade(
                    student, config, result, eval_rows, val_rows, ctx.stopper(job_id, candidate_id)
                )
    except BaseException as exc:
        ctx.artifacts.delete(key)  # no half-written predictions
        _end_row(ctx, evaluations, row_id, exc, time.monotonic() - t0)
        raise
    scores = dict(result.scores)
    _set(
        ctx,
        evaluations,
        row_id,
        only_running=True,
        status="completed",
        scores=scores,
        report=_jsonable(getattr(result, "report", None)),
        predictions_key=ctx.artifacts.key_for(result.predictions_path),
        nmp_uri=key,
        progress=100.0,
        finished_at=utcnow(),
        runtime_seconds=time.monotonic() - t0,
    )
    _record_cost(ctx, cand, eval_type, scores)
    record = lambda: eval_record(  # noqa: E731 - built only when tracking is on
        model=nim.model_name,
        position=cand.position,
        eval_type=eval_type,
        params=candidate_params(config.model_dump(mode="json"), cand.position),
        scores=scores,
        report=getattr(result, "report", None),
        predictions=result.predictions_path,
        manifest=_manifest(ctx, job_id),
    )
    _track(ctx, job_id, config, evaluations, row_id, record)
    return scores


def _cascade(student, config: JobConfig, result, eval_rows, val_rows, should_stop) -> dict | None:
    """The tuned student's calibration and route threshold (``cascade.py``), fitted on val
    and measured on the eval predictions just written."""
    from findistil.cascade import calibrate
    from findistil.workloads import resolve_workload

    ev = config.evaluation_config
    workload = resolve_workload(ev.workload_type, eval_rows, ev.labels)
    with open(result.predictions_path, encoding="utf-8") as lines:
        eval_lines = [json.loads(line) for line in lines if line.strip()]
    return calibrate(
        student, val_rows, eval_lines, workload, ev, config.cascade,
        result.report.get("candidate_answers"), should_stop,
    )  # fmt: skip


def _manifest(ctx: StageContext, job_id: str) -> Path | None:
    key = job_key(job_id, "datasets", "manifest.json")
    return ctx.artifacts.path(key) if ctx.artifacts.exists(key) else None


def _track(ctx: StageContext, job_id: str, config: JobConfig, table, row_id, record) -> None:
    """Log a finished stage's run and store its address on the stage's row. Tracking never
    fails a job: any problem becomes a warning on the job (and a log line)."""
    tracker = ctx.tracker(config.mlflow_config)
    if not tracker.enabled:
        return
    try:
        run: RunRecord = record()
        uri = tracker.log_run(job_id, run)
    except Exception as exc:  # a broken tracker, a figure that would not draw, ...
        message = f"experiment tracking: {describe(exc)}"
        log.warning("job %s: %s", job_id, message)
        add_warning(ctx.db, job_id, message)
        return
    _set(ctx, table, row_id, mlflow_uri=uri)


def _fresh_eval() -> dict:
    return {
        "status": "running",
        "scores": {},
        "report": None,
        "progress": 0.0,
        "error": None,
        "predictions_key": None,
        "nmp_uri": None,
        "started_at": utcnow(),
        "finished_at": None,
        "runtime_seconds": None,
    }


def _record_cost(ctx: StageContext, cand, eval_type: str, scores: dict) -> None:
    # The cost figure is the customized eval's speed (what would be served); earlier evals
    # fill it in until then.
    rate = scores.get("rows_per_s")
    if (
        isinstance(rate, int | float)
        and rate > 0
        and (eval_type == "customized-eval" or cand.s_per_row is None)
    ):
        _set(ctx, candidates, cand.id, rows_per_s=rate, s_per_row=1.0 / rate)


def base_eval(ctx: StageContext, job_id: str, candidate_id: int) -> dict:
    return run_eval(ctx, job_id, candidate_id, "base-eval")


def icl_eval(ctx: StageContext, job_id: str, candidate_id: int) -> dict:
    return run_eval(ctx, job_id, candidate_id, "icl-eval")


def customized_eval(ctx: StageContext, job_id: str, candidate_id: int) -> dict:
    """Evaluate the candidate with the adapter its customization stage trained."""
    return run_eval(ctx, job_id, candidate_id, "customized-eval")


def _trained_adapter(ctx: StageContext, candidate_id: int) -> Path:
    with ctx.db.begin() as conn:
        key = conn.execute(
            select(customizations.c.adapter_key).where(
                customizations.c.candidate_id == candidate_id,
                customizations.c.status == "completed",
            )
        ).scalar()
    if not ctx.artifacts.exists(key):
        raise FindistilError("no trained adapter: the customization stage did not complete")
    return ctx.artifacts.path(key)


def customization(ctx: StageContext, job_id: str, candidate_id: int) -> str:
    """Fine-tune the candidate on the job's train/val rows; returns the adapter's key."""
    match = {"job_id": job_id, "candidate_id": candidate_id}
    done = _done_row(ctx, customizations, match, "adapter_key")
    if done is not None:
        return done.adapter_key
    cand = _candidate(ctx, candidate_id)
    nim = candidate_config(ctx, job_id, cand.position)
    key = job_key(job_id, "candidates", cand.position, "adapter")
    row_id = _start_row(ctx, customizations, match, _fresh_customization())
    steps = StepLog(RowProgress(ctx, customizations, row_id, f"{cand.position}:train"))
    t0 = time.monotonic()
    try:
        ctx.check(job_id, candidate_id)
        _, train_rows, val_rows = datasets(ctx, job_id)
        with ctx.student(job_id, candidate_id, nim) as student:
            result = student.train(
                train_rows,
                val_rows,
                ctx.artifacts.path(key),
                training=nim.training_config,
                lora=nim.lora_config,
                progress=steps,
                should_stop=ctx.stopper(job_id, candidate_id),
            )
    except BaseException as exc:
        _end_row(ctx, customizations, row_id, exc, time.monotonic() - t0)
        raise
    seconds = time.monotonic() - t0
    metrics = _jsonable({**(result.metrics or {}), "steps": steps.thinned(MAX_STEP_POINTS)})
    _set(
        ctx,
        customizations,
        row_id,
        only_running=True,
        status="completed",
        progress=100.0,
        epochs_completed=result.epochs_completed,
        steps_completed=result.steps_completed,
        adapter_key=key,
        customized_model=customized_name(nim.model_name, job_id, row_id),
        nmp_uri=key,
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
    config = job_config(ctx.db, job_id)
    record = lambda: training_record(  # noqa: E731 - built only when tracking is on
        model=nim.model_name,
        position=cand.position,
        params=candidate_params(config.model_dump(mode="json"), cand.position),
        metrics={k: v for k, v in metrics.items() if k != "steps"},
        steps=steps.points,
        adapter_dir=ctx.artifacts.path(key),
        manifest=_manifest(ctx, job_id),
    )
    _track(ctx, job_id, config, customizations, row_id, record)
    return key


def _fresh_customization() -> dict:
    return {
        "status": "running",
        "progress": 0.0,
        "epochs_completed": 0,
        "steps_completed": 0,
        "error": None,
        "adapter_key": None,
        "customized_model": None,
        "nmp_uri": None,
        "metrics": None,
        "started_at": utcnow(),
        "finished_at": None,
        "runtime_seconds": None,
    }


def release(
    ctx: StageContext,
    job_id: str,
    candidate_id: int,
    *,
    status: str = "completed",
    error: str | None = None,
) -> None:
    """Upstream's shutdown: store the candidate's final status and let go of its lease.

    The model stays in this process's student cache (bounded), where serving finds it.
    A row already closed by a cancel or a reaper keeps its status.
    """
    cand = _candidate(ctx, candidate_id)
    now = utcnow()
    started = as_utc(cand.started_at)
    if status == "cancelled":
        deployment = "cancelled"
    else:  # a model that loaded was shut down cleanly even when an eval failed
        deployment = "completed" if cand.deployment_status == "ready" else "failed"
    with ctx.db.begin() as conn:
        conn.execute(
            update(candidates)
            .where(candidates.c.id == candidate_id, candidates.c.status == "running-evals")
            .values(
                status=status,
                error=error,
                deployment_status=deployment,
                finished_at=now,
                runtime_seconds=(now - started).total_seconds() if started else None,
            )
        )
        conn.execute(
            update(candidates)
            .where(candidates.c.id == candidate_id, candidates.c.owner == ctx.worker)
            .values(owner=None, lease_expires_at=None)
        )


def _end_row(ctx: StageContext, table, row_id: int, exc: BaseException, seconds: float) -> None:
    cancelled = isinstance(exc, Cancelled) and not ctx.shutdown.is_set()
    _set(
        ctx,
        table,
        row_id,
        only_running=True,
        status="cancelled" if cancelled else "failed",
        error=ctx.stop_reason() if isinstance(exc, Cancelled) else describe(exc),
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
