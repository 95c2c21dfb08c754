"""The Celery runner (scaled out): the API only enqueues, ``findistil worker`` runs stages.

``runner: celery`` with ``broker_url`` (Redis by default). Two tasks wrap the graph steps of
``flywheel/graph.py``: ``findistil.run_job`` (claim the job, create candidates and datasets,
then enqueue one ``findistil.run_candidate`` per candidate on its queue and let go of the
job) and ``findistil.run_candidate`` (claim the candidate, run its stages, release it, and
finalize the job when it was the last). Candidates of one job therefore run in parallel on
whichever workers listen on their queues (``nims[].queue``: GPU workers for causal LMs, CPU
workers for encoders); the DB decides when the job is done (whoever ends its last candidate
finalizes it), so no chord or result backend is needed.

Delivery is at least once: tasks acknowledge late (a message whose worker died is
redelivered) and are idempotent (claims are conditional updates; a duplicate finds the work
taken or done and returns). Transient database errors retry with exponential backoff and
jitter; errors a user can fix are recorded on the rows and not retried. Cancel reaches a
running task within a second through the DB flag the stages poll; ``revoke`` drops queued
ones. SIGTERM is a warm shutdown: running stages stop at once and end ``failed`` ("worker
... was shut down"), unstarted messages go back to the queue. A ``kill -9`` is caught by the
leases (``flywheel/leases.py``).

Workers share only the database, the broker and the artefact root; each keeps its own
``FINDISTIL_HOME`` (model cache) and its own student cache.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.exc import InterfaceError, OperationalError

from findistil.config import Settings
from findistil.errors import Cancelled
from findistil.flywheel import graph, stages
from findistil.flywheel.db import FlywheelDB, candidates, jobs, open_flywheel_db
from findistil.flywheel.leases import LeaseKeeper
from findistil.flywheel.runner import Runner

log = logging.getLogger(__name__)

RUN_JOB = "findistil.run_job"
RUN_CANDIDATE = "findistil.run_candidate"
TRANSIENT = (OperationalError, InterfaceError, ConnectionError, TimeoutError)
# Longer than any stage: with acks_late, Redis redelivers a message still unacked after this
# long, even if its worker is alive and busy (the duplicate would find the work taken).
VISIBILITY_TIMEOUT_S = 24 * 3600


def make_celery(settings: Settings):
    """A Celery app over ``settings.broker_url`` with findistil's delivery settings."""
    from celery import Celery

    app = Celery("findistil", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_default_queue=settings.task_queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        worker_hijack_root_logger=False,
    )
    return app


def dispatch_job(app, db: FlywheelDB, job_id: str, queue: str, *, again: bool = False) -> bool:
    """Enqueue ``run_job`` for a pending job once (``again``: also one already enqueued, e.g.
    after the broker lost its messages). Returns whether a message was sent."""
    task_id = str(uuid.uuid4())
    query = update(jobs).where(jobs.c.id == job_id, jobs.c.status == "pending")
    if not again:
        query = query.where(jobs.c.task_id.is_(None))
    with db.begin() as conn:
        if not conn.execute(query.values(task_id=task_id)).rowcount:
            return False
    try:
        app.send_task(RUN_JOB, args=[job_id], queue=queue, task_id=task_id)
    except Exception:  # broker down: the job stays pending and is sent on the next wake/start
        log.exception("could not enqueue job %s; it stays pending", job_id)
        with db.begin() as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(task_id=None))
        return False
    return True


def dispatch_candidate(app, db: FlywheelDB, settings: Settings, job_id: str, cid: int) -> None:
    with db.begin() as conn:
        queue = conn.execute(select(candidates.c.queue).where(candidates.c.id == cid)).scalar()
    task_id = str(uuid.uuid4())
    app.send_task(
        RUN_CANDIDATE, args=[job_id, cid], queue=queue or settings.task_queue, task_id=task_id
    )
    with db.begin() as conn:
        conn.execute(update(candidates).where(candidates.c.id == cid).values(task_id=task_id))


class CeleryRunner(Runner):
    """The API side: enqueue pending jobs, revoke cancelled ones, reap expired leases."""

    kind = "celery"

    def __init__(self, settings: Settings, *, db: FlywheelDB | None = None, **_: object):
        self.settings = settings
        self.db = db or open_flywheel_db(settings)
        self.app = make_celery(settings)
        self.keeper = LeaseKeeper(
            self.db,
            timeout_s=settings.lease_timeout_s,
            interval_s=settings.heartbeat_s,
            runner="api",
            after_reap=lambda job_id: graph.finish_job_if_done(self.db, job_id),
        )
        self._started = False
        self._broker_ok: tuple[float, bool] = (-1e9, False)
        self._lock = threading.Lock()

    def start(self) -> None:
        self._started = True
        self.keeper.start()
        self._dispatch_pending(again=True)  # the broker may have lost what it held

    def stop(self, timeout: float = 30.0) -> None:
        self._started = False
        self.keeper.stop()

    @property
    def alive(self) -> bool:
        """Started and the broker answers (checked at most every 5 s)."""
        with self._lock:
            checked, ok = self._broker_ok
            if time.monotonic() - checked > 5:
                try:
                    with self.app.connection_for_write() as conn:
                        conn.ensure_connection(max_retries=1, timeout=2)
                    ok = True
                except Exception:
                    ok = False
                self._broker_ok = (time.monotonic(), ok)
        return self._started and ok

    def wake(self) -> None:
        self._dispatch_pending(again=False)

    def _dispatch_pending(self, *, again: bool) -> None:
        with self.db.begin() as conn:
            pending = list(
                conn.execute(
                    select(jobs.c.id).where(jobs.c.status == "pending").order_by(jobs.c.created_at)
                ).scalars()
            )
        for job_id in pending:
            dispatch_job(self.app, self.db, job_id, self.settings.task_queue, again=again)

    def cancelled(self, job_id: str) -> None:
        with self.db.begin() as conn:
            ids = [conn.execute(select(jobs.c.task_id).where(jobs.c.id == job_id)).scalar()]
            ids += conn.execute(
                select(candidates.c.task_id).where(candidates.c.job_id == job_id)
            ).scalars()
        ids = [i for i in ids if i]
        if ids:
            try:
                self.app.control.revoke(ids)
            except Exception:  # queued tasks still find the job cancelled and do nothing
                log.warning("could not revoke the tasks of job %s", job_id)


# -- the worker side -----------------------------------------------------------------------
@dataclass
class WorkerState:
    settings: Settings
    db: FlywheelDB
    ctx: stages.StageContext
    keeper: LeaseKeeper
    app: object


_STATE: WorkerState | None = None


def _state() -> WorkerState:
    if _STATE is None:  # pragma: no cover - tasks only run inside run_worker
        raise RuntimeError("findistil tasks run inside `findistil worker`")
    return _STATE


def run_job_task(job_id: str) -> str:
    """Task body of ``findistil.run_job``: the job's head, then one task per candidate."""
    st = _state()
    ctx, db = st.ctx, st.db
    if not graph.claim_job(db, job_id, ctx.worker, st.settings.lease_timeout_s):
        return "skipped: not pending"
    try:
        candidate_ids = graph.run_job_head(ctx, job_id)
        for cid in candidate_ids:
            dispatch_candidate(st.app, db, st.settings, job_id, cid)
    except BaseException as exc:  # noqa: BLE001 - recorded on the job
        graph.settle_job(ctx, job_id, None if isinstance(exc, Cancelled) else exc)
        if not isinstance(exc, Exception):
            raise
        return "failed"
    graph.release_job(db, job_id, ctx.worker)
    graph.finish_job_if_done(db, job_id)  # no candidates, or all ended already
    return "dispatched"


def run_candidate_task(job_id: str, candidate_id: int) -> str:
    """Task body of ``findistil.run_candidate``."""
    st = _state()
    status = graph.run_candidate(st.ctx, job_id, candidate_id)
    graph.finish_job_if_done(st.db, job_id)
    return status or "skipped: not pending"


def register_tasks(app) -> None:
    options = {
        "acks_late": True,
        "autoretry_for": TRANSIENT,
        "retry_backoff": 2,
        "retry_backoff_max": 60,
        "retry_jitter": True,
        "max_retries": 5,
    }
    app.task(name=RUN_JOB, **options)(run_job_task)
    app.task(name=RUN_CANDIDATE, **options)(run_candidate_task)


def run_worker(
    settings: Settings,
    *,
    concurrency: int = 1,
    queues: list[str] | None = None,
    loglevel: str = "INFO",
) -> None:
    """Run a Celery worker in this process until it is shut down (SIGTERM, Ctrl-C)."""
    global _STATE
    from celery import signals

    queues = queues or [settings.task_queue]
    db = open_flywheel_db(settings)
    shutdown = threading.Event()
    ctx = stages.StageContext(settings, db, shutdown=shutdown)
    keeper = LeaseKeeper(
        db,
        timeout_s=settings.lease_timeout_s,
        interval_s=settings.heartbeat_s,
        runner="celery",
        queues=queues,
        device=settings.device,
        name=ctx.worker,
        after_reap=lambda job_id: graph.finish_job_if_done(db, job_id),
    )
    app = make_celery(settings)
    register_tasks(app)
    _STATE = WorkerState(settings, db, ctx, keeper, app)

    def on_shutdown(**_: object) -> None:
        shutdown.set()  # running stages stop within a second and settle as interrupted

    signals.worker_shutting_down.connect(on_shutdown, weak=False)
    keeper.start()
    try:
        app.worker_main(
            [
                "worker",
                "--pool=threads",
                f"--concurrency={concurrency}",
                f"--queues={','.join(queues)}",
                f"--loglevel={loglevel}",
                f"--hostname=findistil-{ctx.worker.replace(':', '-')}@%h",
                "--without-gossip",
                "--without-mingle",
            ]
        )
    finally:
        shutdown.set()
        keeper.stop()
        ctx.cache.clear()
        db.dispose()
