"""Leases: which process runs which job and candidate, and what happens when one goes silent.

A process that claims a job (its head stages) or a candidate writes its **owner** tag
(``host:pid:token``) and a lease expiry on the row. One ``LeaseKeeper`` thread per process
renews every lease it holds each ``heartbeat_s`` (a few seconds), independently of progress,
and records the process in ``fw_workers``. Every live process (API, thread runner, Celery
worker) also reaps: a lease that ran out ``lease_timeout_s`` ago means its owner died
(``kill -9``, a lost machine, a frozen host), and the row is failed with
"interrupted: worker <owner> stopped while the job was running", its unfinished children too.

Why fail rather than re-queue: a candidate whose worker died mid-training has lost the
training; re-queueing would silently double its cost, a candidate that killed its worker
(out of memory on a GPU) would likely kill the next one too, and the user decides better
whether to re-run than a retry budget does. Pending work is never lost: it waits in the DB
(threads) or the broker (Celery). Clocks of the machines must agree to well under the lease
timeout (NTP), as for Celery's own ETA tasks.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta

from sqlalchemy import and_, select, update

from findistil.flywheel.db import (
    FlywheelDB,
    candidates,
    close_unfinished,
    jobs,
    utcnow,
    workers,
)

log = logging.getLogger(__name__)


def interrupted(owner: str | None) -> str:
    return f"interrupted: worker {owner} stopped while the job was running"


def shut_down(owner: str | None) -> str:
    return f"interrupted: worker {owner} was shut down while the job was running"


def worker_name() -> str:
    """A fresh owner tag, ``host:pid:token``: the token tells a runner from an earlier
    process that had the same pid (pid 1 in every container) and from a second runner in
    the same process."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def lease_until(timeout_s: float, now: datetime | None = None) -> datetime:
    return (now or utcnow()) + timedelta(seconds=timeout_s)


# -- reaping -------------------------------------------------------------------------------
def reap_expired(db: FlywheelDB, now: datetime | None = None) -> list[str]:
    """Fail what silent owners left running; returns the ids of jobs whose candidates were
    reaped (the caller may finalize them). Conditional updates: two reapers never both act."""
    now = now or utcnow()
    for conn, row in _take_expired(db, jobs, now, jobs.c.status):
        if row.status == "running":  # a job whose driver died: it and its children fail
            message = interrupted(row.owner)
            conn.execute(
                update(jobs)
                .where(jobs.c.id == row.id, jobs.c.status == "running")
                .values(status="failed", error=message, finished_at=now)
            )
            close_unfinished(conn, row.id, "failed", message, now)
            log.warning("job %s: %s", row.id, message)
    touched = set()
    for conn, row in _take_expired(db, candidates, now, candidates.c.job_id):
        message = interrupted(row.owner)
        close_unfinished(conn, row.job_id, "failed", message, now, candidate_id=row.id)
        touched.add(row.job_id)
        log.warning("job %s candidate %s: %s", row.job_id, row.id, message)
    return sorted(touched)


def _take_expired(db: FlywheelDB, table, now: datetime, column) -> Iterator[tuple]:
    """Rows of ``table`` whose lease ran out, each yielded with the open transaction in
    which this reaper cleared the lease (a row another reaper took first is skipped)."""
    expired = and_(table.c.owner.is_not(None), table.c.lease_expires_at < now)
    with db.begin() as conn:
        rows = conn.execute(select(table.c.id, table.c.owner, column).where(expired)).all()
    for row in rows:
        with db.begin() as conn:
            took = conn.execute(
                update(table)
                .where(table.c.id == row.id, table.c.owner == row.owner, expired)
                .values(owner=None, lease_expires_at=None)
            ).rowcount
            if took:
                yield conn, row


def live_lease(db: FlywheelDB, job_id: str, now: datetime | None = None) -> str | None:
    """The owner still holding a lease on the job or one of its candidates, if any."""
    now = now or utcnow()
    with db.begin() as conn:
        owner = conn.execute(
            select(jobs.c.owner).where(
                jobs.c.id == job_id, jobs.c.owner.is_not(None), jobs.c.lease_expires_at >= now
            )
        ).scalar()
        return (
            owner
            or conn.execute(
                select(candidates.c.owner).where(
                    candidates.c.job_id == job_id,
                    candidates.c.owner.is_not(None),
                    candidates.c.lease_expires_at >= now,
                )
            ).scalar()
        )


def live_workers(db: FlywheelDB, timeout_s: float) -> list[dict]:
    """Processes that beat within ``timeout_s`` and did not stop: name, runner, queues, device."""
    since = utcnow() - timedelta(seconds=timeout_s)
    with db.begin() as conn:
        rows = conn.execute(
            select(workers)
            .where(workers.c.heartbeat_at >= since, workers.c.stopped_at.is_(None))
            .order_by(workers.c.started_at)
        ).all()
    return [
        {
            "name": r.name,
            "runner": r.runner,
            "queues": r.queues,
            "device": r.device,
            "pid": r.pid,
            "host": r.host,
        }
        for r in rows
    ]


# -- the keeper ----------------------------------------------------------------------------
class LeaseKeeper:
    """A daemon thread: renew this process's leases, record its heartbeat, reap the silent.

    ``after_reap(job_id)`` runs for each job one of whose candidates was reaped (the runner
    passes the function that finalizes a job whose candidates all ended).
    """

    def __init__(
        self,
        db: FlywheelDB,
        *,
        timeout_s: float,
        interval_s: float,
        runner: str,
        queues: list[str] | None = None,
        device: str | None = None,
        name: str | None = None,
        after_reap: Callable[[str], object] | None = None,
    ) -> None:
        self.db, self.timeout_s, self.interval_s = db, timeout_s, interval_s
        self.name = name or worker_name()
        self.runner, self.queues, self.device = runner, queues, device
        self.after_reap = after_reap
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started_at = utcnow()

    def start(self) -> LeaseKeeper:
        if self._thread is None:
            self.beat()
            self._thread = threading.Thread(target=self._run, name="findistil-leases", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        try:
            with self.db.begin() as conn:
                conn.execute(
                    update(workers).where(workers.c.name == self.name).values(stopped_at=utcnow())
                )
        except Exception:  # the DB went away first: the heartbeat simply stops
            log.warning("could not record that worker %s stopped", self.name)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except Exception:  # a DB hiccup: the next beat comes soon, well inside the lease
                log.exception("lease heartbeat of %s failed", self.name)

    def beat(self) -> None:
        """Renew, record, reap: one round."""
        now = utcnow()
        until = lease_until(self.timeout_s, now)
        with self.db.begin() as conn:
            for table in (jobs, candidates):
                conn.execute(
                    update(table).where(table.c.owner == self.name).values(lease_expires_at=until)
                )
            self._record(conn, now)
        for job_id in reap_expired(self.db, now):
            if self.after_reap is not None:
                self.after_reap(job_id)

    def _record(self, conn, now: datetime) -> None:
        values = {"heartbeat_at": now, "queues": self.queues, "device": self.device}
        if conn.execute(
            update(workers).where(workers.c.name == self.name).values(**values)
        ).rowcount:
            return
        host, pid, _ = self.name.split(":", 2) if self.name.count(":") >= 2 else (self.name, 0, "")
        conn.execute(
            workers.insert().values(
                name=self.name,
                host=host,
                pid=int(pid) if str(pid).isdigit() else 0,
                runner=self.runner,
                started_at=self.started_at,
                **values,
            )
        )
