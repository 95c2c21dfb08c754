"""Runners: where and when a job's stages run. The stage graph itself is ``graph.py``.

Jobs queue in the DB (status ``pending``), never in memory, so a restart loses nothing
queued. A runner claims one with a conditional UPDATE (``... WHERE status = 'pending'``): of
two runners racing for a job exactly one sees ``rowcount == 1``. The embedded default,
``ThreadRunner``, keeps ``max_parallel_jobs`` worker threads inside the API/CLI process and
runs a job's candidates on up to ``max_parallel_candidates`` threads; the Celery runner
(``celery_runner.py``, scaled out) implements the same small ``Runner`` interface over the
same graph steps. Both run a ``LeaseKeeper``: leases renewed, silent owners reaped.

Whatever happens inside, ``run_claimed_job`` leaves the job in a final status (try/finally):
upstream could leave jobs ``running`` forever after an error.
"""

from __future__ import annotations

import importlib
import logging
import threading
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor

from findistil.config import Settings
from findistil.errors import Cancelled, ConfigError, JobStateError
from findistil.flywheel import graph, stages
from findistil.flywheel import jobs as service
from findistil.flywheel.db import FlywheelDB, open_flywheel_db
from findistil.flywheel.leases import LeaseKeeper
from findistil.progress import ProgressFn, no_progress

log = logging.getLogger(__name__)


def run_claimed_job(ctx: stages.StageContext, job_id: str) -> str:
    """Run every stage of a job this process has claimed; returns the job's final status."""
    failure: BaseException | None = None
    try:
        candidate_ids = graph.run_job_head(ctx, job_id)
        workers = max(1, min(ctx.settings.max_parallel_candidates, len(candidate_ids)))
        if workers > 1:
            with ThreadPoolExecutor(workers, thread_name_prefix=f"job-{job_id[:6]}") as pool:
                list(pool.map(lambda cid: graph.run_candidate(ctx, job_id, cid), candidate_ids))
        else:
            for cid in candidate_ids:
                graph.run_candidate(ctx, job_id, cid)
        ctx.check(job_id)
        stages.finalize(ctx.db, job_id)
    except Cancelled:
        pass
    except BaseException as exc:  # noqa: BLE001 - recorded on the job, never left running
        failure = exc
        if not isinstance(exc, stages.JobFailed):
            log.exception("job %s failed", job_id)
    finally:
        status = graph.settle_job(ctx, job_id, failure)
    if failure is not None and not isinstance(failure, Exception):
        raise failure  # KeyboardInterrupt / SystemExit still propagate, after settling
    return status


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
    ctx = stages.StageContext(settings, db, progress=progress)
    keeper = LeaseKeeper(
        db,
        timeout_s=settings.lease_timeout_s,
        interval_s=settings.heartbeat_s,
        runner="inline",
        name=ctx.worker,
    )
    try:
        service.validate_job_id(job_id)
        if not graph.claim_job(db, job_id, ctx.worker, settings.lease_timeout_s):
            service.get_job(db, job_id)  # NotFound for an unknown id
            raise JobStateError(
                f"job {job_id} is not pending: another runner has it or it has finished"
            )
        keeper.start()
        run_claimed_job(ctx, job_id)
        return service.get_job(db, job_id)
    finally:
        keeper.stop()
        if own_db:
            db.dispose()


class Runner(ABC):
    """Executes queued jobs somewhere. The API starts one on startup and stops it on shutdown."""

    kind: str = "?"

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

    def cancelled(self, job_id: str) -> None:  # noqa: B027 - optional hook
        """A job was cancelled: drop its queued work (the DB flag stops running stages)."""


class ThreadRunner(Runner):
    """``max_parallel_jobs`` worker threads in this process, each claiming jobs from the DB.

    ``stop`` makes running jobs see ``should_stop`` and end ``failed`` ("interrupted: worker
    ... was shut down"), their candidates and stages too; pending jobs stay queued.
    """

    kind = "threads"

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
        self._shutdown = threading.Event()
        self.ctx = stages.StageContext(
            settings, self.db, progress=progress, shutdown=self._shutdown
        )
        self.owner = self.ctx.worker
        self.keeper = LeaseKeeper(
            self.db,
            timeout_s=settings.lease_timeout_s,
            interval_s=settings.heartbeat_s,
            runner=self.kind,
            device=settings.device,
            name=self.owner,
            after_reap=lambda job_id: graph.finish_job_if_done(self.db, job_id),
        )
        self._wakeup = threading.Condition()
        self._threads: list[threading.Thread] = []
        self.claimed: list[str] = []  # job ids this runner took, in order (tests, /health)

    def start(self) -> None:
        if self._threads:
            return
        self._shutdown.clear()
        self.keeper.start()
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
        self.keeper.stop()

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
                job_id = graph.claim_next(self.db, self.owner, self.settings.lease_timeout_s)
            except Exception:  # the DB is briefly unreachable: retry at the next poll
                log.exception("runner could not poll the job queue")
                job_id = None
            if job_id is None:
                with self._wakeup:
                    self._wakeup.wait(self.poll_interval)
                continue
            self.claimed.append(job_id)
            try:
                run_claimed_job(self.ctx, job_id)
            except Exception:  # already recorded on the job; keep the worker alive
                log.exception("runner: job %s raised", job_id)


def make_runner(settings: Settings, **kwargs) -> Runner:
    """The runner ``settings.runner`` names: ``threads`` (embedded) or ``celery``."""
    if settings.runner == "threads":
        return ThreadRunner(settings, **kwargs)
    try:
        module = importlib.import_module("findistil.flywheel.celery_runner")
    except ImportError as exc:
        raise ConfigError(
            f"runner: celery needs the celery package ({exc}): pip install 'celery[redis]', "
            "or set runner: threads"
        ) from None
    return module.CeleryRunner(settings, **kwargs)
