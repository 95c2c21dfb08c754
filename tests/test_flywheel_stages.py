"""The stage graph and runner end to end on tiny random-model candidates (real DB, real files).

Covers: the full lifecycle with a LoRA candidate and an encoder candidate, a failing candidate
next to a working one, dataset failure, cancellation during training (latency printed),
worker shutdown, restart recovery with the runner, delete, atomic claiming by 2 runners of 2
threads each, and idempotent stages (every stage run twice leaves the same rows).
"""

from __future__ import annotations

import shutil
import threading
import time

import pytest
from sqlalchemy import select

from findistil.artifacts import ArtifactStore, job_key
from findistil.config import load_settings
from findistil.flywheel import graph, stages
from findistil.flywheel import jobs as service
from findistil.flywheel.db import FlywheelDB, candidates, customizations, evaluations, jobs
from findistil.flywheel.graph import claim_job
from findistil.flywheel.leases import shut_down
from findistil.flywheel.runner import ThreadRunner, run_claimed_job, run_job
from findistil.loaders import load_demo
from findistil.logstore import LogStore
from findistil.students.cache import StudentCache, shared_cache

FAST = {
    "data_split_config": {"eval_size": 13, "min_total_records": 20},
    "training_config": {"epochs": 1, "micro_batch_size": 8, "batch_size": 16, "seed": 0},
    "evaluation_config": {"max_new_tokens": 6, "batch_size": 13},
    "icl_config": {"max_examples": 1, "min_examples": 1},
}


def _settings(url: str, nims: list[dict], **extra):
    values = {**FAST, **extra}
    return load_settings(database_url=url, nims=nims, **values)


@pytest.fixture
def tiny_nims(tiny_llama_dir, tiny_bert_dir):
    return [
        {"model_name": str(tiny_llama_dir), "kind": "causal_lm"},
        {"model_name": str(tiny_bert_dir), "kind": "encoder"},
    ]


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        pause.wait(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_job_lifecycle_end_to_end(sqlite_url, demo_store, tiny_nims):
    settings = _settings(sqlite_url, tiny_nims)
    db = FlywheelDB(sqlite_url)
    job_id = service.create_job(db, demo_store, settings, "news_classifier", "demo")["id"]
    seen: list[str] = []
    detail = run_job(settings, job_id, progress=lambda p: seen.append(p.stage), db=db)
    artifacts = ArtifactStore(settings.artifacts_root)
    assert artifacts.root == settings.home  # the embedded default

    assert detail["status"] == "completed", detail["error"]
    assert detail["error"] is None and detail["finished_at"] and detail["progress"] == 100.0
    assert detail["num_records"] == 120
    names = [d["name"] for d in detail["datasets"]]
    assert names == [f"flywheel-{n}-news_classifier-{job_id}" for n in ("eval", "train", "val")]
    assert detail["datasets"][0]["num_records"] == 13

    llama, bert = detail["nims"]
    assert [e["eval_type"] for e in llama["evaluations"]] == [
        "base-eval",
        "icl-eval",
        "customized-eval",
    ]
    assert [e["eval_type"] for e in bert["evaluations"]] == ["customized-eval"]  # no zero-shot
    for nim in (llama, bert):
        assert nim["status"] == "completed" and nim["deployment_status"] == "completed"
        assert nim["error"] is None and nim["params"] > 0 and nim["s_per_row"] > 0
        assert nim["runtime_seconds"] > 0 and nim["training_seconds"] > 0
        for ev in nim["evaluations"]:
            assert ev["status"] == "completed" and ev["progress"] == 100.0
            assert 0.0 <= ev["scores"]["f1_score"] <= 1.0 and ev["counts"]["rows"] == 13
            assert ev["predictions_url"] == f"/api/jobs/{job_id}/evaluations/{ev['id']}/predictions"
            key = service.predictions_key(db, artifacts, job_id, ev["id"])
            position = detail["nims"].index(nim)
            assert key == job_key(
                job_id, "candidates", position, ev["eval_type"], "predictions.jsonl"
            )
            assert ev["nmp_uri"] == job_key(job_id, "candidates", position, ev["eval_type"])
            assert len(artifacts.read_text(key).splitlines()) == 13
        (custom,) = nim["customizations"]
        assert custom["status"] == "completed" and custom["progress"] == 100.0
        assert custom["epochs_completed"] == 1 and custom["steps_completed"] >= 1
        position = detail["nims"].index(nim)
        assert custom["adapter_key"] == job_key(job_id, "candidates", position, "adapter")
        assert nim["worker"] and nim["worker"].count(":") == 2  # host:pid:token
        cascade = nim["cascade"]  # calibrated on val, measured on the 13 eval rows
        assert cascade["temperature"] > 0 and cascade["val_rows"] > 0
        assert cascade["source"] == ("label_scores" if nim is bert else "logprob")
        assert 0.0 <= cascade["coverage"] <= 1.0 and len(cascade["curve"]) == 10
        assert cascade["expected_cost_ratio"] == pytest.approx(1.0 - cascade["coverage"])
    rec = detail["recommendation"]
    assert rec["model_name"] in {llama["model_name"], bert["model_name"]}
    assert sum(n["recommended"] for n in detail["nims"]) == 1
    assert set(rec["relative_cost"]) == {llama["model_name"], bert["model_name"]}
    with db.begin() as conn:  # stored at finalize, not only computed on read
        assert conn.execute(select(jobs.c.recommendation).where(jobs.c.id == job_id)).scalar()
    assert {"datasets", "0:base-eval", "0:icl-eval", "0:train", "1:train"} <= set(seen)

    assert [d["nmp_uri"] for d in detail["datasets"]][0] == job_key(
        job_id, "datasets", "eval_data.jsonl"
    )
    # delete removes the job's files and rows
    assert artifacts.exists(job_key(job_id, "datasets", "eval_data.jsonl"))
    service.delete_job(db, artifacts, job_id)
    assert not artifacts.exists(job_key(job_id))
    with db.begin() as conn:
        for table in (candidates, evaluations, customizations):
            assert conn.execute(select(table).where(table.c.job_id == job_id)).first() is None


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_failing_candidate_does_not_stop_the_other(backend, request, sqlite_url, tiny_bert_dir):
    url = request.getfixturevalue("postgres_url") if backend == "postgres" else sqlite_url
    nims = [
        {"model_name": str(tiny_bert_dir.parent / "no-such-model"), "kind": "encoder"},
        {"model_name": str(tiny_bert_dir), "kind": "encoder"},
    ]
    settings = _settings(url, nims)
    db, store = FlywheelDB(url), LogStore(url)
    client = f"test-{service.new_job_id()}"
    load_demo(store, records=60, client_id=client)
    job_id = service.create_job(db, store, settings, "news_classifier", client)["id"]
    try:
        detail = run_job(settings, job_id, db=db)
        bad, good = detail["nims"]
        assert detail["status"] == "completed"
        assert bad["status"] == "failed" and bad["deployment_status"] == "failed"
        assert bad["error"].startswith("prepare: ") and bad["evaluations"] == []
        assert good["status"] == "completed" and good["evaluations"][0]["scores"]
        assert detail["recommendation"]["model_name"] == str(tiny_bert_dir)
    finally:
        store.delete("news_classifier", client)
        store.close()
        service.delete_job(db, ArtifactStore(settings.artifacts_root), job_id)


def test_dataset_failure_fails_the_job_with_the_curation_message(sqlite_url, demo_store, tiny_nims):
    settings = _settings(sqlite_url, tiny_nims)
    db = FlywheelDB(sqlite_url)
    job_id = service.create_job(db, demo_store, settings, "news_classifier", "demo")["id"]
    demo_store.delete("news_classifier", "demo")  # records gone between queueing and running
    detail = run_job(settings, job_id, db=db)
    assert detail["status"] == "failed" and detail["finished_at"]
    assert detail["error"].startswith("Not enough records found for the given workload.")
    assert [n["status"] for n in detail["nims"]] == ["failed", "failed"]
    assert not ArtifactStore(settings.artifacts_root).exists(job_key(job_id, "datasets"))


def _long_training(sqlite_url, tiny_nims, **extra):
    # enough epochs that training is still running when the test cancels it
    settings = _settings(sqlite_url, tiny_nims, **extra)
    settings.training_config.epochs = 400
    return settings


def _start_in_thread(settings, db, job_id, shutdown=None):
    ctx = stages.StageContext(settings, db, shutdown=shutdown or threading.Event())
    assert claim_job(db, job_id, ctx.worker, settings.lease_timeout_s)
    result: dict = {"worker": ctx.worker}

    def target():
        result["status"] = run_claimed_job(ctx, job_id)

    thread = threading.Thread(target=target)
    thread.start()
    return thread, result


def _cancel_and_time(db, job_id, thread, during: str) -> float:
    """Cancel, wait for the job's thread to end; the latency (printed)."""
    t0 = time.monotonic()
    service.cancel_job(db, job_id)
    thread.join(30)
    latency = time.monotonic() - t0
    print(f"\ncancel-to-stopped latency during {during}: {latency:.2f} s")
    assert not thread.is_alive()
    return latency


def _training_steps(db, job_id):
    with db.begin() as conn:
        return conn.execute(
            select(customizations.c.steps_completed).where(customizations.c.job_id == job_id)
        ).scalar()


def test_cancel_during_training_stops_within_seconds(sqlite_url, demo_store, tiny_nims):
    settings = _long_training(sqlite_url, tiny_nims)
    db = FlywheelDB(sqlite_url)
    job_id = service.create_job(db, demo_store, settings, "news_classifier", "demo")["id"]
    thread, result = _start_in_thread(settings, db, job_id)
    # progress reaches the DB while training runs (throttled writes)
    _wait(lambda: (_training_steps(db, job_id) or 0) >= 2, 60, "training progress in the DB")
    latency = _cancel_and_time(db, job_id, thread, "training")
    assert latency < 10
    assert result["status"] == "cancelled"
    detail = service.get_job(db, job_id)
    assert detail["status"] == "cancelled" and detail["error"] == "Job cancelled by user"
    llama, bert = detail["nims"]
    assert llama["status"] == "cancelled" and llama["deployment_status"] == "cancelled"
    assert llama["customizations"][0]["status"] == "cancelled"
    assert bert["status"] == "cancelled" and bert["evaluations"] == []  # never started
    artifacts = ArtifactStore(settings.artifacts_root)
    assert not artifacts.exists(job_key(job_id, "candidates", 0, "adapter"))
    assert not artifacts.exists(job_key(job_id, "candidates", 1))
    with db.begin() as conn:
        assert conn.execute(select(jobs.c.owner).where(jobs.c.id == job_id)).scalar() is None
        owners = conn.execute(select(candidates.c.owner).where(candidates.c.job_id == job_id))
        assert set(owners.scalars()) == {None}  # every lease let go
    service.delete_job(db, artifacts, job_id)  # deletable once stopped


def test_cancel_during_a_cold_load_stops_within_2_s(
    sqlite_url, demo_store, tiny_bert_dir, tmp_path, monkeypatch
):
    """A cold load (from_pretrained, a GGUF conversion) cannot be interrupted: prepare waits
    for it polling the cancel, so the job stops, lets go and can be deleted at once; the load
    ends in the background and stays cached."""
    slow = tmp_path / "slow-bert"  # a model key no earlier test has in the shared cache
    shutil.copytree(tiny_bert_dir, slow)
    settings = _settings(sqlite_url, [{"model_name": str(slow), "kind": "encoder"}])
    loading, release = threading.Event(), threading.Event()
    real_load = StudentCache._load

    def slow_load(self, name, kind, s):
        if name == str(slow):
            loading.set()
            release.wait(60)  # a 60-second cold load, unless the test lets it go
        return real_load(self, name, kind, s)

    monkeypatch.setattr(StudentCache, "_load", slow_load)
    db = FlywheelDB(sqlite_url)
    job_id = service.create_job(db, demo_store, settings, "news_classifier", "demo")["id"]
    thread, result = _start_in_thread(settings, db, job_id)
    try:
        assert loading.wait(60), "prepare never started loading"
        assert _cancel_and_time(db, job_id, thread, "a cold load") < 2
        assert result["status"] == "cancelled"
        (nim,) = service.get_job(db, job_id)["nims"]
        assert (nim["status"], nim["deployment_status"]) == ("cancelled", "cancelled")
        service.delete_job(db, ArtifactStore(settings.artifacts_root), job_id)  # at once
    finally:
        release.set()
    key = (str(slow), "encoder")
    _wait(lambda: key in shared_cache().loaded(), 60, "the load to land in the cache")


def test_worker_shutdown_interrupts_running_job(sqlite_url, demo_store, tiny_nims):
    settings = _long_training(sqlite_url, tiny_nims)
    db = FlywheelDB(sqlite_url)
    job_id = service.create_job(db, demo_store, settings, "news_classifier", "demo")["id"]
    shutdown = threading.Event()
    thread, result = _start_in_thread(settings, db, job_id, shutdown)
    _wait(lambda: (_training_steps(db, job_id) or 0) >= 1, 60, "training to start")
    shutdown.set()
    thread.join(30)
    assert not thread.is_alive() and result["status"] == "failed"
    detail = service.get_job(db, job_id)
    message = shut_down(result["worker"])
    assert detail["error"] == message and message.startswith("interrupted: worker ")
    # one consistent outcome: the job, both candidates and the training all failed, same reason
    assert [(n["status"], n["error"]) for n in detail["nims"]] == [("failed", message)] * 2
    (custom,) = detail["nims"][0]["customizations"]
    assert (custom["status"], custom["error"]) == ("failed", message)


def test_restart_recovery_then_runner_runs_the_queue(sqlite_url, demo_store, tiny_bert_dir):
    nims = [{"model_name": str(tiny_bert_dir), "kind": "encoder"}]
    settings = _settings(sqlite_url, nims)
    db = FlywheelDB(sqlite_url)
    left_running = service.create_job(db, demo_store, settings, "news_classifier", "demo")["id"]
    queued = service.create_job(db, demo_store, settings, "news_classifier", "demo")["id"]
    # a worker claimed the first job, then its process died: its lease ran out
    assert claim_job(db, left_running, "gone-host:99:dead", lease_s=-1)
    assert service.recover_interrupted(db) == 1
    runner = ThreadRunner(settings, db=db, poll_interval=0.2)
    runner.start()
    try:
        assert runner.alive
        done = _wait(
            lambda: service.get_job(db, queued)["status"] in ("completed", "failed"), 60, "queue"
        )
        assert done
    finally:
        runner.stop(10)
    assert not runner.alive
    assert service.get_job(db, left_running)["status"] == "failed"
    assert service.get_job(db, left_running)["error"] == (
        "interrupted: worker gone-host:99:dead stopped while the job was running"
    )
    assert service.get_job(db, queued)["status"] == "completed"
    assert runner.claimed == [queued]


def test_two_runners_with_two_threads_claim_each_job_once(sqlite_url, demo_store, tiny_bert_dir):
    nims = [{"model_name": str(tiny_bert_dir), "kind": "encoder"}]
    settings = _settings(sqlite_url, nims, max_parallel_jobs=2, max_parallel_candidates=2)
    settings.nims = settings.nims * 2  # two candidates per job, run in parallel threads
    db = FlywheelDB(sqlite_url)
    ids = [
        service.create_job(db, demo_store, settings, "news_classifier", "demo")["id"]
        for _ in range(4)
    ]
    runners = [ThreadRunner(settings, db=db, poll_interval=0.1) for _ in range(2)]
    for r in runners:
        r.start()
    try:
        _wait(
            lambda: all(service.get_job(db, j)["status"] == "completed" for j in ids),
            120,
            "all jobs",
        )
    finally:
        for r in runners:
            r.stop(10)
    claimed = runners[0].claimed + runners[1].claimed
    assert sorted(claimed) == sorted(ids)
    for job_id in ids:
        nims_out = service.get_job(db, job_id)["nims"]
        assert [n["status"] for n in nims_out] == ["completed", "completed"]


def _rows(db, job_id):
    """Every row of a job, as plain tuples (what "the same rows" means); lease expiries are
    liveness, renewed all the time, not results."""
    out = {}
    with db.begin() as conn:
        for table in (jobs, candidates, evaluations, customizations):
            key = table.c.id if table is jobs else table.c.job_id
            cols = [c for c in table.columns if c.name != "lease_expires_at"]
            out[table.name] = [tuple(r) for r in conn.execute(select(*cols).where(key == job_id))]
    return out


def test_every_stage_run_twice_leaves_the_same_rows(sqlite_url, demo_store, tiny_nims):
    settings = _settings(sqlite_url, tiny_nims)
    db = FlywheelDB(sqlite_url)
    job_id = service.create_job(db, demo_store, settings, "news_classifier", "demo")["id"]
    ctx = stages.StageContext(settings, db)
    assert claim_job(db, job_id, ctx.worker, 60)

    def run_all():
        ids = graph.run_job_head(ctx, job_id)
        for cid in ids:
            assert graph.claim_candidate(ctx, job_id, cid)  # re-entry by the same owner
            for name in stages.prepare(ctx, job_id, cid):
                graph.STAGES[name](ctx, job_id, cid)
        return ids

    ids = run_all()
    first = _rows(db, job_id)
    assert len(first["fw_evaluations"]) == 4 and len(first["fw_customizations"]) == 2
    assert run_all() == ids
    assert _rows(db, job_id) == first  # a retried task changes nothing

    # a stage whose row failed (a crash, a retry) runs again into the same row
    (llama_base,) = [r for r in first["fw_evaluations"] if r[2] == ids[0] and r[3] == "base-eval"]
    with db.begin() as conn:
        conn.execute(
            evaluations.update().where(evaluations.c.id == llama_base[0]).values(status="failed")
        )
    again = stages.base_eval(ctx, job_id, ids[0])
    rows = _rows(db, job_id)["fw_evaluations"]
    assert len(rows) == 4
    (row,) = [r for r in rows if r[0] == llama_base[0]]
    assert row[4] == "completed"
    assert again["f1_score"] == llama_base[5]["f1_score"]  # greedy decoding: same answers
    assert again["accuracy"] == llama_base[5]["accuracy"]
    for cid in ids:
        stages.release(ctx, job_id, cid)
    assert stages.finalize(db, job_id) == "completed"


def test_stages_run_inline_and_record_their_own_failure(sqlite_url, demo_store, tiny_bert_dir):
    # stages are plain functions of ids: callable one by one without a runner
    nims = [{"model_name": str(tiny_bert_dir), "kind": "encoder"}]
    settings = _settings(sqlite_url, nims)
    db = FlywheelDB(sqlite_url)
    job_id = service.create_job(db, demo_store, settings, "news_classifier", "demo")["id"]
    ctx = stages.StageContext(settings, db)
    assert claim_job(db, job_id, ctx.worker, 60)
    (cid,) = stages.initialize(ctx, job_id)
    assert stages.initialize(ctx, job_id) == [cid]  # idempotent
    stages.create_datasets(ctx, job_id)
    assert graph.claim_candidate(ctx, job_id, cid)
    assert stages.prepare(ctx, job_id, cid) == ["customization", "customized-eval"]
    key = stages.customization(ctx, job_id, cid)
    ctx.artifacts.delete(key)  # the artefact vanished before the customized eval
    with pytest.raises(Exception, match="no trained adapter"):
        stages.customized_eval(ctx, job_id, cid)
    stages.release(ctx, job_id, cid, status="failed", error="customized-eval: no adapter")
    (ev,) = service.get_job(db, job_id)["nims"][0]["evaluations"]
    assert ev["status"] == "failed" and "no trained adapter" in ev["error"]
    assert ev["predictions_url"] is None
    assert stages.finalize(db, job_id) == "failed"  # its only candidate failed
    assert "every candidate failed" in service.get_job(db, job_id)["error"]
