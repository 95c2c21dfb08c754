"""The job service on a real SQLite file and the real PostgreSQL: create, list, show, cancel,
delete, restart recovery, atomic claiming and the recommendation rule."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import delete, select, update

from findistil.config import load_settings
from findistil.errors import DataError, JobStateError, NotFound
from findistil.flywheel import jobs as service
from findistil.flywheel.db import FlywheelDB, candidates, evaluations, jobs, new_job_id, utcnow
from findistil.flywheel.runner import claim_job, claim_next
from findistil.loaders import load_demo
from findistil.logstore import LogStore


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def env(request, findistil_home):
    """(settings, db, store, client_id) on one backend; PostgreSQL rows are removed after."""
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
    else:
        url = f"sqlite:///{findistil_home / 'findistil.db'}"
        findistil_home.mkdir(parents=True, exist_ok=True)
    settings = load_settings(database_url=url)
    db, store = FlywheelDB(url), LogStore(url)
    client_id = f"test-{new_job_id()}"  # the PostgreSQL database is shared: own rows only
    load_demo(store, records=60, client_id=client_id)
    made: list[str] = []
    yield settings, db, store, client_id, made
    store.delete("news_classifier", client_id)
    with db.begin() as conn:
        for table in (evaluations, candidates):
            conn.execute(delete(table).where(table.c.job_id.in_(made)))
        conn.execute(delete(jobs).where(jobs.c.id.in_(made)))
    store.close()
    db.dispose()


def _create(env, **split):
    settings, db, store, client_id, made = env
    out = service.create_job(db, store, settings, "news_classifier", client_id, split or None)
    made.append(out["id"])
    return out["id"]


def test_validate_job_id():
    assert service.validate_job_id("0123456789abcdef01234567") == "0123456789abcdef01234567"
    for bad in ["", "xyz", "0123456789ABCDEF01234567", "0123456789abcdef0123456", "../" * 8]:
        with pytest.raises(service.InvalidJobId, match="Invalid job_id format") as info:
            service.validate_job_id(bad)
        assert info.value.http_status == 400


def test_create_job_queues_pending_with_merged_split(env):
    settings, db, *_ = env
    job_id = _create(env, eval_size=7)
    detail = service.get_job(db, job_id)
    assert detail["status"] == "pending" and detail["progress"] == 0.0
    split = detail["data_split_config"]
    assert split["eval_size"] == 7  # the request's field ...
    assert split["val_ratio"] == settings.data_split_config.val_ratio  # ... the rest configured
    assert detail["nims"] == [] and detail["datasets"] == [] and detail["recommendation"] is None
    assert detail["started_at"] is None and detail["error"] is None and detail["llm_judge"] is None


def test_create_job_refuses_too_few_records_with_the_count(env):
    settings, db, store, client_id, _ = env
    with pytest.raises(DataError, match=r"has 60 records.*min_total_records=100"):
        service.create_job(
            db, store, settings, "news_classifier", client_id, {"min_total_records": 100}
        )
    with pytest.raises(DataError, match="has 0 records"):
        service.create_job(db, store, settings, "news_classifier", "nobody-" + client_id, None)


def test_list_jobs_filters_and_pages(env):
    _, db, _, client_id, _ = env
    ids = [_create(env) for _ in range(3)]
    service.cancel_job(db, ids[0])
    mine = [j for j in service.list_jobs(db, workload_id="news_classifier") if j["id"] in ids]
    assert [j["id"] for j in mine] == ids[::-1]  # newest first
    assert set(mine[0]) == {
        "id",
        "workload_id",
        "client_id",
        "status",
        "started_at",
        "finished_at",
        "datasets",
        "error",
    }
    cancelled = {j["id"] for j in service.list_jobs(db, status="cancelled")}
    assert ids[0] in cancelled and ids[1] not in cancelled
    page = service.list_jobs(db, limit=1, offset=1)
    assert len(page) == 1
    assert service.count_jobs(db, status="pending") >= 2


def test_get_job_errors(env):
    _, db, *_ = env
    with pytest.raises(NotFound, match="Job not found"):
        service.get_job(db, new_job_id())
    with pytest.raises(service.InvalidJobId):
        service.get_job(db, "not-an-id")


def test_cancel_marks_job_and_refuses_finished(env):
    _, db, *_ = env
    job_id = _create(env)
    out = service.cancel_job(db, job_id)
    assert out == {"id": job_id, "message": "Job cancellation initiated successfully."}
    detail = service.get_job(db, job_id)
    assert detail["status"] == "cancelled" and detail["error"] == "Job cancelled by user"
    assert detail["finished_at"] is not None
    with pytest.raises(JobStateError, match="Cannot cancel a job that has already finished."):
        service.cancel_job(db, job_id)
    with pytest.raises(NotFound):
        service.cancel_job(db, new_job_id())


def test_delete_only_finished_and_only_its_own_files(env):
    settings, db, *_ = env
    keep, gone = _create(env), _create(env)
    for job_id in (keep, gone):
        folder = service.job_dir(settings, job_id) / "candidates" / "0" / "adapter"
        folder.mkdir(parents=True)
        (folder / "weights.bin").write_bytes(b"x")
    with pytest.raises(JobStateError, match="Cannot delete a running job. Please cancel"):
        service.delete_job(db, settings, gone)  # pending is not finished
    service.cancel_job(db, gone)
    out = service.delete_job(db, settings, gone)
    assert out["id"] == gone and "Resources will be cleaned up" in out["message"]
    assert not service.job_dir(settings, gone).exists()
    assert (service.job_dir(settings, keep) / "candidates/0/adapter/weights.bin").is_file()
    with pytest.raises(NotFound):
        service.get_job(db, gone)
    assert service.get_job(db, keep)["status"] == "pending"


def test_delete_waits_while_a_cancelled_job_still_stops(env):
    settings, db, *_ = env
    job_id = _create(env)
    assert claim_job(db, job_id, service.process_owner())  # this live process runs it
    service.cancel_job(db, job_id)
    with pytest.raises(JobStateError):
        service.delete_job(db, settings, job_id)
    with db.begin() as conn:  # the worker finished stopping
        conn.execute(update(jobs).where(jobs.c.id == job_id).values(owner=None))
    service.delete_job(db, settings, job_id)


def test_recover_interrupted(env):
    _, db, *_ = env
    dead, mine, queued, remote_fresh, remote_stale = (_create(env) for _ in range(5))
    host = service.socket.gethostname()
    owners = {
        dead: f"{host}:999999999:dead",  # no such pid: the worker process is gone
        mine: service.process_owner(),  # still running in this process
        remote_fresh: "other-host:12:abc",
        remote_stale: "other-host:13:abc",
    }
    with db.begin() as conn:
        for job_id, owner in owners.items():
            beat = utcnow() - timedelta(hours=1 if job_id == remote_stale else 0)
            conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id)
                .values(status="running", owner=owner, heartbeat_at=beat, started_at=beat)
            )
        conn.execute(
            candidates.insert().values(
                job_id=dead, position=0, model_name="m", status="running-evals"
            )
        )
    # >= : the PostgreSQL database is shared, another crashed test run may have left jobs
    assert service.recover_interrupted(db) >= 2
    status = {j: service.get_job(db, j) for j in owners | {queued: None}}
    for job_id in (dead, remote_stale):
        assert status[job_id]["status"] == "failed"
        assert status[job_id]["error"] == service.INTERRUPTED
        assert status[job_id]["finished_at"] is not None
    assert status[dead]["nims"][0]["status"] == "failed"
    assert status[mine]["status"] == "running"
    assert status[remote_fresh]["status"] == "running"
    assert status[queued]["status"] == "pending"  # queued work survives a restart
    service.recover_interrupted(db)  # a second pass changes nothing of ours
    assert service.get_job(db, mine)["status"] == "running"
    assert service.get_job(db, dead)["finished_at"] == status[dead]["finished_at"]
    with db.begin() as conn:  # leave nothing running in the shared database
        conn.execute(
            update(jobs).where(jobs.c.id.in_([mine, remote_fresh])).values(status="failed")
        )


def test_claim_is_atomic_across_threads(env):
    _, db, *_ = env
    ids = {_create(env) for _ in range(6)}
    claimed: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(4)

    def worker(n):
        barrier.wait()
        while True:
            job_id = claim_next(db, f"worker-{n}")
            if job_id is None:
                return
            with lock:
                claimed.append(job_id)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    mine = [j for j in claimed if j in ids]
    assert sorted(mine) == sorted(ids)  # every job claimed exactly once
    with db.begin() as conn:
        rows = conn.execute(select(jobs.c.status).where(jobs.c.id.in_(ids))).scalars()
        assert set(rows) == {"running"}
        conn.execute(update(jobs).where(jobs.c.id.in_(ids)).values(status="failed", owner=None))
    assert not claim_job(db, next(iter(ids)), "late")


def test_predictions_path_not_found(env):
    _, db, *_ = env
    job_id = _create(env)
    with pytest.raises(NotFound, match="Evaluation 12345 not found"):
        service.predictions_path(db, job_id, 12345)


def _nim(name, f1, rows_per_s, params, eval_type="customized-eval"):
    return {
        "model_name": name,
        "params": params,
        "s_per_row": 1.0 / rows_per_s if rows_per_s else None,
        "evaluations": [{"eval_type": eval_type, "scores": {"macro_f1": f1}}],
    }


def test_recommend_cheapest_within_tolerance():
    nims = [_nim("big", 0.90, 10.0, 135), _nim("small", 0.89, 100.0, 22)]
    rec = service.recommend(nims, 0.02)
    assert rec["model_name"] == "small" and rec["best_model_name"] == "big"
    assert rec["relative_cost"] == {"big": 10.0, "small": 1.0}
    assert rec["cost_per_1k_rows_s"] == pytest.approx(10.0)
    assert "within 0.02 macro-F1" in rec["reason"] and "big 10x" in rec["reason"]
    # outside the tolerance the best one wins even though it costs more
    assert service.recommend(nims, 0.005)["model_name"] == "big"
    # same speed: fewer parameters wins
    tie = [_nim("a", 0.8, 10.0, 200), _nim("b", 0.8, 10.0, 100)]
    assert service.recommend(tie, 0.02)["model_name"] == "b"
    assert service.recommend([{"model_name": "x", "evaluations": []}], 0.02) is None


def test_recommend_prefers_customized_eval_over_better_base():
    nim = _nim("a", 0.5, 10.0, 1)
    nim["evaluations"].append({"eval_type": "base-eval", "scores": {"macro_f1": 0.7}})
    other = _nim("b", 0.69, 1.0, 1, eval_type="base-eval")  # no customization: its best eval
    rec = service.recommend([nim, other], 0.02)
    assert rec["model_name"] == "b" and rec["eval_type"] == "base-eval"
