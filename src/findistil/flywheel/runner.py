"""Runners: where and when a job's stages run. The stage order itself is ``run_job_stages``.

Jobs queue in the DB (status ``pending``), never in memory, so a restart loses nothing
queued. A runner claims one with a conditional UPDATE (``... WHERE status = 'pending'``):
of two runners racing for a job exactly one sees ``rowcount == 1``. The embedded default,
``ThreadRunner``, keeps ``max_parallel_jobs`` worker threads inside the API/CLI process;
a Celery runner (scaled-out mode) implements the same small ``Runner`` interface and calls
the same ``run_claimed_job``.

Whatever happens inside, ``run_claimed_job`` leaves the job in a final status (try/finally):
upstream could leave jobs ``running`` forever after an error.
"""

from __future__ import annotations

import importlib
import logging
import threading
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import select, update

from findistil.config import Settings
from findistil.errors import Cancelled, ConfigError, JobStateError
from findistil.flywheel import jobs as service
from findistil.flywheel import stages
from findistil.flywheel.db import FlywheelDB, jobs, open_flywheel_db, utcnow
from findistil.progress import ProgressFn, no_progress

log = logging.getLogger(__name__)

# Candidate stages after ``prepare``, as independent branches: a failure skips the rest of
# its own branch (no customized eval without an adapter) but not the other branches.
BRANCHES = (("base-eval",), ("icl-eval",), ("customization", "customized-eval"))
STAGES = {
    "base-eval": stages.base_eval,
    "icl-eval": stages.icl_eval,
    "customization": stages.customization,
    "customized-eval": stages.customized_eval,
}


def claim_job(db: FlywheelDB, job_id: str, owner: str) -> bool:
    """Take a pending job for ``owner``; False when another runner got it first."""
    now = utcnow()
    with db.begin() as conn:
        return (
            conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.status == "pending")
                .values(status="running", owner=owner, started_at=now, heartbeat_at=now)
            ).rowcount
            == 1
        )


def claim_next(db: FlywheelDB, owner: str) -> str | None:
    """Claim the oldest pending job, or None when the queue is empty."""
    with db.begin() as conn:
        waiting = conn.execute(
            select(jobs.c.id)
            .where(jobs.c.status == "pending")
            .order_by(jobs.c.created_at, jobs.c.id)
            .limit(8)
        ).scalars()
        waiting = list(waiting)
    for job_id in waiting:
        if claim_job(db, job_id, owner):
            return job_id
    return None


def run_candidate(ctx: stages.StageContext, job_id: str, candidate_id: int) -> str:
    """prepare → the candidate's branches → release; returns the candidate's final status."""
    status, error = "failed", "internal error: the candidate stopped without a status"
    try:
        ctx.check(job_id)
        try:
            plan = stages.prepare(ctx, job_id, candidate_id)
        except Cancelled:
            raise
        except Exception as exc:
            status, error = "failed", f"prepare: {stages.describe(exc)}"
            return status
        status, error = "completed", None
        for branch in BRANCHES:
            for name in (s for s in branch if s in plan):
                ctx.check(job_id)
                try:
                    STAGES[name](ctx, job_id, candidate_id)
                except Cancelled:
                    raise
                except Exception as exc:
                    log.warning(
                        "job %s candidate %s: %s failed: %s", job_id, candidate_id, name, exc
                    )
                    if status == "completed":
                        status, error = "failed", f"{name}: {stages.describe(exc)}"
                    break  # the rest of this branch needs what failed
    except Cancelled:
        status, error = "cancelled", stages.stop_reason(ctx)
    except BaseException as exc:  # KeyboardInterrupt, a bug in a stage wrapper: still settle
        status, error = "failed", stages.describe(exc)
        raise
    finally:
        stages.release(ctx, job_id, candidate_id, status=status, error=error)
    return status


def run_job_stages(ctx: stages.StageContext, job_id: str) -> str:
    """Run every stage of a job this process has claimed; returns the job's final status."""
    failure: BaseException | None = None
    try:
        candidate_ids = stages.initialize(ctx, job_id)
        stages.create_datasets(ctx, job_id)
        workers = max(1, min(ctx.settings.max_parallel_candidates, len(candidate_ids)))
        if workers > 1:
            with ThreadPoolExecutor(workers, thread_name_prefix=f"job-{job_id[:6]}") as pool:
                list(pool.map(lambda cid: run_candidate(ctx, job_id, cid), candidate_ids))
        else:
            for cid in candidate_ids:
                run_candidate(ctx, job_id, cid)
        ctx.check(job_id)
        stages.finalize(ctx, job_id)
    except Cancelled:
        pass
    except BaseException as exc:  # noqa: BLE001 - recorded on the job, never left running
        failure = exc
        if not isinstance(exc, stages.JobFailed):
            log.exception("job %s failed", job_id)
    finally:
        status = _settle(ctx, job_id, failure)
    if failure is not None and not isinstance(failure, Exception):
        raise failure  # KeyboardInterrupt / SystemExit still propagate, after settling
    return status


def _settle(ctx: stages.StageContext, job_id: str, failure: BaseException | None) -> str:
    """Give the job and its children a final status and drop the owner tag."""
    for cid in list(ctx.students):  # a crash between prepare and release
        stages.release(ctx, job_id, cid, status="failed", error="the job stopped early")
    now = utcnow()
    if ctx.shutdown.is_set():
        error = service.INTERRUPTED
    elif failure is not None:
        error = stages.describe(failure)
    else:
        error = "internal error: the job ended without a final status"
    with ctx.db.begin() as conn:
        conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.status == "running")
            .values(status="failed", error=error, finished_at=now)
        )
        final = conn.execute(select(jobs.c.status, jobs.c.error).where(jobs.c.id == job_id)).one()
        child = "cancelled" if final.status == "cancelled" or ctx.shutdown.is_set() else "failed"
        child_error = stages.stop_reason(ctx) if child == "cancelled" else final.error or error
        service._close_children(conn, job_id, child, child_error, now)
        conn.execute(update(jobs).where(jobs.c.id == job_id).values(owner=None))
    ctx.forget(job_id)
    return final.status


def run_claimed_job(
    settings: Settings,
    db: FlywheelDB,
    job_id: str,
    *,
    progress: ProgressFn = no_progress,
    shutdown: threading.Event | None = None,
) -> str:
    """Run a job this process has already claimed; returns its final status."""
    shutdown = shutdown or threading.Event()
    ctx = stages.StageContext(settings, db, progress=progress, shutdown=shutdown)
    return run_job_stages(ctx, job_id)


def run_job(
    settings: Settings,
    job_id: str,
    progress: ProgressFn = no_progress,
    *,
    db: FlywheelDB | None = None,
) -> dict:
    """Claim a pending job and run it inline to the end; returns ``get_job``'s detail.

    Example: ``run_job(settings, create_job(db, store, settings, "news_classifier", "x")["id"])``.
    """
    own_db = db is None
    db = db or open_flywheel_db(settings)
    try:
        service.validate_job_id(job_id)
        if not claim_job(db, job_id, service.process_owner()):
            service.get_job(db, job_id)  # NotFound for an unknown id
            raise JobStateError(
                f"job {job_id} is not pending: another runner has it or it has finished"
            )
        run_claimed_job(settings, db, job_id, progress=progress)
        return service.get_job(db, job_id)
    finally:
        if own_db:
            db.dispose()


class Runner(ABC):
    """Executes queued jobs somewhere. The API starts one on startup and stops it on shutdown."""

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def stop(self, timeout: float = 30.0) -> None: ...

    @property
    @abstractmethod
    def alive(self) -> bool: ...

    @abstractmethod
    def wake(self) -> None:
        """A job was queued: look now instead of at the next poll."""


class ThreadRunner(Runner):
    """``max_parallel_jobs`` worker threads in this process, each claiming jobs from the DB.

    ``stop`` makes running jobs see ``should_stop`` and end ``failed`` ("interrupted..."),
    freeing their models; pending jobs stay queued for the next start.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        db: FlywheelDB | None = None,
        poll_interval: float = 1.0,
        progress: ProgressFn = no_progress,
    ):
        self.settings = settings
        self.db = db or open_flywheel_db(settings)
        self.poll_interval = poll_interval
        self.progress = progress
        self.owner = service.process_owner()
        self._shutdown = threading.Event()
        self._wakeup = threading.Condition()
        self._threads: list[threading.Thread] = []
        self.claimed: list[str] = []  # job ids this runner took, in order (tests, /health)

    def start(self) -> None:
        if self._threads:
            return
        self._shutdown.clear()
        for n in range(self.settings.max_parallel_jobs):
            thread = threading.Thread(target=self._work, name=f"findistil-runner-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        self._shutdown.set()
        self.wake()
        for thread in self._threads:
            thread.join(timeout)
        self._threads = [t for t in self._threads if t.is_alive()]

    @property
    def alive(self) -> bool:
        return (
            bool(self._threads)
            and not self._shutdown.is_set()
            and all(t.is_alive() for t in self._threads)
        )

    def wake(self) -> None:
        with self._wakeup:
            self._wakeup.notify_all()

    def _work(self) -> None:
        while not self._shutdown.is_set():
            try:
                job_id = claim_next(self.db, self.owner)
            except Exception:  # the DB is briefly unreachable: retry at the next poll
                log.exception("runner could not poll the job queue")
                job_id = None
            if job_id is None:
                with self._wakeup:
                    self._wakeup.wait(self.poll_interval)
                continue
            self.claimed.append(job_id)
            try:
                run_claimed_job(
                    self.settings, self.db, job_id, progress=self.progress, shutdown=self._shutdown
                )
            except Exception:  # already recorded on the job; keep the worker alive
                log.exception("runner: job %s raised", job_id)


def make_runner(settings: Settings, **kwargs) -> Runner:
    """The runner ``settings.runner`` names: ``threads`` (embedded) or ``celery``."""
    if settings.runner == "threads":
        return ThreadRunner(settings, **kwargs)
    try:
        module = importlib.import_module("findistil.flywheel.celery_runner")
    except ImportError:
        raise ConfigError(
            "runner: celery is not available in this build: set runner: threads"
        ) from None
    return module.CeleryRunner(settings, **kwargs)
