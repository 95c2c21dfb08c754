"""The stage graph, defined once, and the steps both runners execute.

    job head:   initialize → create_datasets                      (a failure fails the job)
    candidate:  prepare → base-eval | icl-eval | customization → customized-eval → release
    job end:    finalize, once every candidate has a final status

Candidate branches are independent: a failure skips the rest of its own branch (no customized
eval without an adapter) but not the other branches, nor the other candidates. The thread
runner runs all three steps in one process; the Celery runner runs the head in one task and
each candidate in its own task, on whichever worker takes it, and whoever ends the last
candidate finalizes the job (``finish_job_if_done``). Each step claims what it runs with a
lease (``flywheel/leases.py``); a step handed work someone else holds does nothing.
"""

from __future__ import annotations

import logging

from sqlalchemy import select, update

from findistil.errors import Cancelled
from findistil.flywheel import stages
from findistil.flywheel.db import FINISHED, FlywheelDB, candidates, close_unfinished, jobs, utcnow
from findistil.flywheel.leases import lease_until

log = logging.getLogger(__name__)

BRANCHES = (("base-eval",), ("icl-eval",), ("customization", "customized-eval"))
STAGES = {
    "base-eval": stages.base_eval,
    "icl-eval": stages.icl_eval,
    "customization": stages.customization,
    "customized-eval": stages.customized_eval,
}


# -- claims --------------------------------------------------------------------------------
def claim_job(db: FlywheelDB, job_id: str, owner: str, lease_s: float) -> bool:
    """Take a pending job for ``owner``; False when another runner got it first."""
    now = utcnow()
    with db.begin() as conn:
        return (
            conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.status == "pending")
                .values(
                    status="running",
                    owner=owner,
                    started_at=now,
                    lease_expires_at=lease_until(lease_s, now),
                )
            ).rowcount
            == 1
        )


def claim_next(db: FlywheelDB, owner: str, lease_s: float) -> str | None:
    """Claim the oldest pending job, or None when the queue is empty."""
    with db.begin() as conn:
        waiting = list(
            conn.execute(
                select(jobs.c.id)
                .where(jobs.c.status == "pending")
                .order_by(jobs.c.created_at, jobs.c.id)
                .limit(8)
            ).scalars()
        )
    for job_id in waiting:
        if claim_job(db, job_id, owner, lease_s):
            return job_id
    return None


def claim_candidate(ctx: stages.StageContext, job_id: str, candidate_id: int) -> bool:
    """Take a pending candidate of a running job (or one this process already holds)."""
    now = utcnow()
    with ctx.db.begin() as conn:
        running = conn.execute(select(jobs.c.status).where(jobs.c.id == job_id)).scalar()
        if running != "running":
            return False
        lease = lease_until(ctx.settings.lease_timeout_s, now)
        took = conn.execute(
            update(candidates)
            .where(candidates.c.id == candidate_id, candidates.c.status == "pending")
            .values(
                status="running-evals",
                owner=ctx.worker,
                worker=ctx.worker,
                lease_expires_at=lease,
                started_at=now,
            )
        ).rowcount
        if not took:  # a retried task of the owner that holds it: carry on, renew the lease
            took = conn.execute(
                update(candidates)
                .where(
                    candidates.c.id == candidate_id,
                    candidates.c.status == "running-evals",
                    candidates.c.owner == ctx.worker,
                )
                .values(lease_expires_at=lease)
            ).rowcount
        return took == 1


def release_job(db: FlywheelDB, job_id: str, owner: str) -> None:
    with db.begin() as conn:
        conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.owner == owner)
            .values(owner=None, lease_expires_at=None)
        )


# -- steps ---------------------------------------------------------------------------------
def run_job_head(ctx: stages.StageContext, job_id: str) -> list[int]:
    """Create the candidates and the datasets; returns the candidate ids."""
    candidate_ids = stages.initialize(ctx, job_id)
    stages.create_datasets(ctx, job_id)
    return candidate_ids


def run_candidate(ctx: stages.StageContext, job_id: str, candidate_id: int) -> str | None:
    """prepare → the candidate's branches → release; returns its final status, or None when
    it was not this process's to run (someone holds it, it ended, the job stopped)."""
    if not claim_candidate(ctx, job_id, candidate_id):
        return None
    status, error = "failed", "internal error: the candidate stopped without a status"
    try:
        ctx.check(job_id, candidate_id)
        try:
            plan = stages.prepare(ctx, job_id, candidate_id)
        except Cancelled:
            raise
        except Exception as exc:
            status, error = "failed", f"prepare: {stages.describe(exc)}"
            return status
        status, error = _run_branches(ctx, job_id, candidate_id, plan)
    except Cancelled:
        cancelled = not ctx.shutdown.is_set()
        status, error = ("cancelled" if cancelled else "failed"), ctx.stop_reason()
    except BaseException as exc:  # KeyboardInterrupt, a bug in a stage wrapper: still settle
        status, error = "failed", stages.describe(exc)
        raise
    finally:
        stages.release(ctx, job_id, candidate_id, status=status, error=error)
    return status


def _run_branches(ctx, job_id: str, candidate_id: int, plan: list[str]) -> tuple[str, str | None]:
    status, error = "completed", None
    for branch in BRANCHES:
        for name in (s for s in branch if s in plan):
            ctx.check(job_id, candidate_id)
            try:
                STAGES[name](ctx, job_id, candidate_id)
            except Cancelled:
                raise
            except Exception as exc:
                log.warning("job %s candidate %s: %s failed: %s", job_id, candidate_id, name, exc)
                if status == "completed":
                    status, error = "failed", f"{name}: {stages.describe(exc)}"
                break  # the rest of this branch needs what failed
    return status, error


def finish_job_if_done(db: FlywheelDB, job_id: str) -> str | None:
    """Finalize a running job nobody drives once all its candidates ended; its status, or
    None while candidates still run (or a live owner will finalize it itself)."""
    with db.begin() as conn:
        owner = conn.execute(
            select(jobs.c.owner).where(jobs.c.id == job_id, jobs.c.status == "running")
        ).first()
        if owner is None or owner.owner is not None:
            return None
        open_ = conn.execute(
            select(candidates.c.id).where(
                candidates.c.job_id == job_id, candidates.c.status.not_in(FINISHED)
            )
        ).first()
    if open_ is not None:
        return None
    return stages.finalize(db, job_id)


def settle_job(ctx: stages.StageContext, job_id: str, failure: BaseException | None = None) -> str:
    """Give a job this process drove a final status, close its children, drop its lease.

    A running job ends ``failed``: "interrupted: worker ... was shut down" on shutdown, the
    failure's message otherwise. Unfinished children follow the job: ``cancelled`` with the
    user's cancel, ``failed`` with the job's error otherwise.
    """
    now = utcnow()
    if ctx.shutdown.is_set():
        error = ctx.stop_reason()
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
        child = "cancelled" if final.status == "cancelled" else "failed"
        close_unfinished(conn, job_id, child, final.error or error, now)
        conn.execute(
            update(candidates)
            .where(candidates.c.job_id == job_id, candidates.c.owner == ctx.worker)
            .values(owner=None, lease_expires_at=None)
        )
    release_job(ctx.db, job_id, ctx.worker)
    ctx.forget(job_id)
    return final.status
