"""The job service on a real SQLite file and the real PostgreSQL: create (with the frozen
config), list, show, cancel (cascading), delete (waiting for leases), atomic claiming."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import delete, select, update

from findistil.artifacts import ArtifactStore, job_key
from findistil.config import load_settings
from findistil.errors import DataError, JobStateError, NotFound
from findistil.flywheel import jobs as service
from findistil.flywheel.db import FlywheelDB, candidates, evaluations, jobs, new_job_id, utcnow
from findistil.flywheel.graph import claim_job, claim_next
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
    for bad in [
        "",
        "xyz",
        "0123456789ABCDEF01234567",
        "0123456789abcdef0123456",
        "../" * 8,
        "0123456789abcdef01234567\n",
    ]:
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
    # upstream requires started_at: a queued job shows when it was created
    assert detail["started_at"] == detail["created_at"] is not None
    assert detail["error"] is None and detail["llm_judge"] is None
    # the whole resolved config is frozen on the job: stages read this, never live settings
    config = detail["config"]
    assert config["data_split_config"] == split
    assert [n["model_name"] for n in config["nims"]] == [n.model_name for n in settings.nims]
    smollm = config["nims"][0]
    assert smollm["training_config"]["learning_rate"] == 2e-3  # its own override, resolved
    assert smollm["training_config"]["micro_batch_size"] == 16  # the global value
    assert smollm["lora_config"]["adapter_dim"] == 16
    assert config["icl_config"] == settings.icl_config.model_dump()
    assert config["evaluation_config"]["scoring_mode"] == "generate"


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
    # asking again is no error: upstream answers "Job is already cancelled."
    assert service.cancel_job(db, job_id) == {"id": job_id, "message": "Job is already cancelled."}
    with db.begin() as conn:  # a job that ended on its own cannot be cancelled
        conn.execute(jobs.update().where(jobs.c.id == job_id).values(status="completed"))
    with pytest.raises(JobStateError, match="Cannot cancel a job that has already finished."):
        service.cancel_job(db, job_id)
    unknown = new_job_id()
    with pytest.raises(NotFound, match=f"Job with ID {unknown} not found"):
        service.cancel_job(db, unknown)


def test_delete_only_finished_and_only_its_own_files(env):
    settings, db, *_ = env
    artifacts = ArtifactStore(settings.artifacts_root)
    keep, gone = _create(env), _create(env)
    for job_id in (keep, gone):
        folder = artifacts.path(job_key(job_id, "candidates", 0, "adapter"))
        folder.mkdir(parents=True)
        (folder / "weights.bin").write_bytes(b"x")
    with pytest.raises(JobStateError, match="Cannot delete a running job. Please cancel"):
        service.delete_job(db, artifacts, gone)  # pending is not finished
    service.cancel_job(db, gone)
    out = service.delete_job(db, artifacts, gone)
    assert out["id"] == gone and "Resources will be cleaned up" in out["message"]
    assert not artifacts.exists(job_key(gone))
    assert artifacts.exists(job_key(keep, "candidates", 0, "adapter", "weights.bin"))
    with pytest.raises(NotFound):
        service.get_job(db, gone)
    assert service.get_job(db, keep)["status"] == "pending"


def test_cancel_cascades_to_every_unfinished_child(env):
    _, db, *_ = env
    job_id = _create(env)
    assert claim_job(db, job_id, "someone:1:dead", 60)
    with db.begin() as conn:
        done, running = (
            conn.execute(
                candidates.insert().values(
                    job_id=job_id, position=n, model_name="m", status=s, owner="someone:1:dead"
                )
            ).inserted_primary_key[0]
            for n, s in ((0, "completed"), (1, "running-evals"))
        )
        conn.execute(
            evaluations.insert().values(
                job_id=job_id, candidate_id=running, eval_type="base-eval", status="running"
            )
        )
    service.cancel_job(db, job_id)
    detail = service.get_job(db, job_id)
    assert detail["status"] == "cancelled"
    by_id = {n["id"]: n for n in detail["nims"]}
    assert by_id[done]["status"] == "completed"  # finished work keeps its status
    assert by_id[running]["status"] == "cancelled"
    assert by_id[running]["deployment_status"] == "cancelled"
    assert by_id[running]["evaluations"][0]["status"] == "cancelled"
    assert by_id[running]["evaluations"][0]["error"] == "Job cancelled by user"


def test_delete_waits_while_a_cancelled_job_still_stops(env):
    settings, db, *_ = env
    artifacts = ArtifactStore(settings.artifacts_root)
    job_id = _create(env)
    assert claim_job(db, job_id, "busy-host:7:abc", 60)  # its lease runs for a minute
    service.cancel_job(db, job_id)
    with pytest.raises(JobStateError, match="busy-host:7:abc is still stopping"):
        service.delete_job(db, artifacts, job_id)
    with db.begin() as conn:  # the worker went silent: its lease ran out
        past = utcnow() - timedelta(seconds=1)
        conn.execute(update(jobs).where(jobs.c.id == job_id).values(lease_expires_at=past))
    service.delete_job(db, artifacts, job_id)


def test_claim_is_atomic_across_threads(env):
    _, db, *_ = env
    ids = {_create(env) for _ in range(6)}
    claimed: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(4)

    def worker(n):
        barrier.wait()
        while True:
            job_id = claim_next(db, f"worker-{n}", 60)
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
    assert not claim_job(db, next(iter(ids)), "late", 60)


def test_predictions_key_not_found(env):
    settings, db, *_ = env
    job_id = _create(env)
    with pytest.raises(NotFound, match="Evaluation 12345 not found"):
        service.predictions_key(db, ArtifactStore(settings.artifacts_root), job_id, 12345)
