"""Scaled out for real: ``findistil worker`` processes over Redis + PostgreSQL, and several
``findistil serve`` processes on one SQLite file, killed and stopped the way an operator would.

No Celery eager mode anywhere: each worker is its own process with its own FINDISTIL_HOME;
the workers and the API share only the database, the broker and the artefact root.
"""

from __future__ import annotations

import re
import signal
import time

import httpx
import pytest
import redis
import yaml

from findistil.api.app import free_port
from tests.api.conftest import DEMO_RECORDS, FINISHED, load_demo_records, tiny_config
from tests.processes import Proc, child_env, wait_for, wait_http

LEASE_S = 4  # short leases: a dead worker is noticed within seconds


@pytest.fixture
def cluster(tmp_path, tiny_llama_dir, tiny_bert_dir):
    """Start findistil processes sharing one database, broker and artefact root."""
    procs: list[Proc] = []

    def configure(database_url: str, *, llama_epochs: int = 1, broker: str | None = None):
        config = tiny_config(
            tiny_llama_dir,
            tiny_bert_dir,
            llama_epochs=llama_epochs,
            database_url=database_url,
            artifact_root=str(tmp_path / "shared"),
            lease_timeout_s=LEASE_S,
        )
        if broker:
            config["broker_url"] = broker
            config["nims"][0]["queue"] = "q-llm"  # the causal LM on one worker ...
            config["nims"][1]["queue"] = "q-enc"  # ... the encoder on the other
        path = tmp_path / "findistil.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def start(name: str, *args: str) -> Proc:
        home = tmp_path / name
        proc = Proc(
            list(args),
            child_env(home, tmp_path / "findistil.yaml"),
            tmp_path,
            home.with_suffix(".log"),
        )
        procs.append(proc)
        return proc

    def serve(name: str, *extra: str) -> tuple[Proc, str]:
        port = free_port()
        proc = start(name, "serve", "--port", str(port), *extra)
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", proc)
        return proc, url

    cluster = type("Cluster", (), {})()
    cluster.configure, cluster.start, cluster.serve, cluster.procs = configure, start, serve, procs
    cluster.root = tmp_path / "shared"
    yield cluster
    for proc in procs:
        proc.stop()


@pytest.fixture
def broker(redis_url):
    client = redis.Redis.from_url(redis_url)
    client.flushdb()  # a clean queue: nothing left from another test
    yield redis_url
    client.flushdb()


def _seed(config_path, home):
    from findistil.config import load_settings

    load_demo_records(load_settings(config_path, home=home), n=DEMO_RECORDS)


def _job(url: str, job_id: str) -> dict:
    return httpx.get(f"{url}/api/jobs/{job_id}", timeout=10).json()


def _create(url: str) -> str:
    answer = httpx.post(
        f"{url}/api/jobs", json={"workload_id": "news_classifier", "client_id": "demo"}
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["id"]


def _settled(job: dict) -> bool:
    return job["status"] in FINISHED and all(n["status"] in FINISHED for n in job["nims"])


def _training(job: dict, position: int = 0) -> bool:
    customs = job["nims"][position]["customizations"] if job["nims"] else []
    return bool(customs) and customs[0]["steps_completed"] > 0 and customs[0]["status"] == "running"


def _workers(cluster, *queues: str) -> list[Proc]:
    return [
        cluster.start(f"w{n}", "worker", "--queues", f"findistil,{q}") for n, q in enumerate(queues)
    ]


# -- Celery ---------------------------------------------------------------------------------


def test_two_workers_run_one_candidate_each_and_the_api_serves_and_deletes(
    cluster, fresh_postgres_url, broker
):
    config = cluster.configure(fresh_postgres_url, broker=broker)
    llm_worker, enc_worker = _workers(cluster, "q-llm", "q-enc")
    api, url = cluster.serve("api", "--runner", "celery")
    _seed(config, cluster.root.parent / "api")
    wait_for(
        lambda: len(httpx.get(url + "/health").json()["workers"]) == 2,
        90,
        "2 live workers",
        cluster.procs,
    )
    health = httpx.get(url + "/health").json()
    assert health["runner_kind"] == "celery" and health["runner"] == "alive"
    assert {tuple(w["queues"]) for w in health["workers"]} == {
        ("findistil", "q-llm"),
        ("findistil", "q-enc"),
    }

    job_id = _create(url)
    job = wait_for(lambda: _settled(j := _job(url, job_id)) and j, 180, "the job", cluster.procs)
    assert job["status"] == "completed", job
    llama, bert = job["nims"]
    # one candidate on each worker process, as their queues say
    assert f":{llm_worker.pid}:" in llama["worker"] and f":{enc_worker.pid}:" in bert["worker"]
    assert llama["queue"] == "q-llm" and llama["device"] == "cpu"
    assert [e["eval_type"] for e in llama["evaluations"]] == [
        "base-eval",
        "icl-eval",
        "customized-eval",
    ]
    assert job["recommendation"]["model_name"] in {llama["model_name"], bert["model_name"]}

    # the API (a third process, its own FINDISTIL_HOME) serves what the workers wrote ...
    ev = bert["evaluations"][0]
    lines = httpx.get(url + ev["predictions_url"]).text.splitlines()
    assert len(lines) == 10
    models = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
    tuned = bert["customizations"][0]["customized_model"]
    assert tuned in models
    chat = httpx.post(
        url + "/v1/chat/completions",
        json={"model": tuned, "messages": [{"role": "user", "content": "Acme beats Q3 estimates"}]},
        timeout=60,
    )
    assert chat.status_code == 200, chat.text
    # ... and deletes it
    assert (cluster.root / "jobs" / job_id).is_dir()
    assert httpx.delete(f"{url}/api/jobs/{job_id}").status_code == 200
    assert not (cluster.root / "jobs" / job_id).exists()


def test_kill_9_of_a_worker_mid_training_fails_its_candidate_within_the_lease(
    cluster, fresh_postgres_url, broker
):
    config = cluster.configure(fresh_postgres_url, llama_epochs=2000, broker=broker)
    llm_worker, _ = _workers(cluster, "q-llm", "q-enc")
    api, url = cluster.serve("api", "--runner", "celery")
    _seed(config, cluster.root.parent / "api")
    job_id = _create(url)
    wait_for(lambda: _training(_job(url, job_id)), 120, "LoRA training", cluster.procs)
    llm_worker.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    job = wait_for(
        lambda: _settled(j := _job(url, job_id)) and j,
        LEASE_S + 10,
        "the job to end",
        cluster.procs,
    )
    print(f"\nkill -9 -> job settled in {time.monotonic() - killed_at:.1f}s (lease {LEASE_S}s)")
    llama, bert = job["nims"]
    assert llama["status"] == "failed"
    assert re.fullmatch(
        rf"interrupted: worker \S+:{llm_worker.pid}:\w+ stopped while the job was running",
        llama["error"],
    )
    assert llama["customizations"][0]["status"] == "failed"
    assert bert["status"] == "completed"  # the other worker's candidate is not touched
    assert (
        job["status"] == "completed" and job["recommendation"]["model_name"] == bert["model_name"]
    )
    # the failed job can be deleted: nobody holds a lease on it any more
    assert httpx.delete(f"{url}/api/jobs/{job_id}").status_code == 200


def test_sigterm_is_a_warm_shutdown_with_consistent_statuses(cluster, fresh_postgres_url, broker):
    config = cluster.configure(fresh_postgres_url, llama_epochs=2000, broker=broker)
    llm_worker, _ = _workers(cluster, "q-llm", "q-enc")
    api, url = cluster.serve("api", "--runner", "celery")
    _seed(config, cluster.root.parent / "api")
    job_id = _create(url)
    wait_for(lambda: _training(_job(url, job_id)), 120, "LoRA training", cluster.procs)
    llm_worker.signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    assert llm_worker.wait(30) is not None, llm_worker.tail()
    print(f"\nSIGTERM -> worker exited in {time.monotonic() - stopped_at:.1f}s")
    job = wait_for(
        lambda: _settled(j := _job(url, job_id)) and j, 30, "the job to end", cluster.procs
    )
    llama = job["nims"][0]
    message = llama["error"]
    assert re.fullmatch(
        rf"interrupted: worker \S+:{llm_worker.pid}:\w+ was shut down while the job was running",
        message,
    )
    assert (llama["status"], llama["customizations"][0]["status"]) == ("failed", "failed")
    assert llama["customizations"][0]["error"] == message
    assert job["status"] == "completed"  # the encoder candidate finished on the other worker
    live = [w["name"] for w in httpx.get(url + "/health").json()["workers"]]
    assert not any(f":{llm_worker.pid}:" in name for name in live)  # it said goodbye


def test_an_api_restart_while_workers_run_loses_nothing(cluster, fresh_postgres_url, broker):
    config = cluster.configure(fresh_postgres_url, llama_epochs=60, broker=broker)
    _workers(cluster, "q-llm", "q-enc")
    api, url = cluster.serve("api", "--runner", "celery")
    _seed(config, cluster.root.parent / "api")
    job_id = _create(url)
    wait_for(
        lambda: _job(url, job_id)["status"] == "running", 60, "the job to start", cluster.procs
    )
    api.signal(signal.SIGKILL)
    api.wait(10)
    api2, url2 = cluster.serve("api2", "--runner", "celery")
    queued = _create(url2)  # and the new API queues more work meanwhile
    for jid in (job_id, queued):
        job = wait_for(
            lambda jid=jid: _settled(j := _job(url2, jid)) and j, 240, "jobs to end", cluster.procs
        )
        assert job["status"] == "completed", job
        assert all(n["status"] == "completed" for n in job["nims"])


def test_cancel_reaches_a_running_task_and_queued_ones_never_run(
    cluster, fresh_postgres_url, broker
):
    config = cluster.configure(fresh_postgres_url, llama_epochs=2000, broker=broker)
    (llm_worker,) = _workers(cluster, "q-llm")  # nobody listens on q-enc yet
    api, url = cluster.serve("api", "--runner", "celery")
    _seed(config, cluster.root.parent / "api")
    job_id = _create(url)
    wait_for(lambda: _training(_job(url, job_id)), 120, "LoRA training", cluster.procs)
    t0 = time.monotonic()
    assert httpx.post(f"{url}/api/jobs/{job_id}/cancel").status_code == 200
    # the live worker keeps renewing its lease until its task stops: deletable = stopped
    wait_for(
        lambda: httpx.delete(f"{url}/api/jobs/{job_id}").status_code == 200,
        LEASE_S,  # less than a lease: the task let go itself, nobody reaped it
        "the running task to stop",
        cluster.procs,
    )
    print(f"\ncancel -> Celery task stopped and job deleted in {time.monotonic() - t0:.1f}s")
    assert llm_worker.alive()
    # the encoder's task was queued all along; a worker that comes later does not run it
    job_id = _create(url)
    wait_for(lambda: _training(_job(url, job_id)), 120, "LoRA training", cluster.procs)
    assert httpx.post(f"{url}/api/jobs/{job_id}/cancel").status_code == 200
    late = cluster.start("late", "worker", "--queues", "q-enc")
    wait_for(lambda: "ready" in late.log.read_text(), 90, "the late worker", cluster.procs)
    wait_for(lambda: "run_candidate" in late.log.read_text(), 30, "the queued task", cluster.procs)
    bert = _job(url, job_id)["nims"][1]
    assert bert["status"] == "cancelled" and bert["worker"] is None and bert["evaluations"] == []


def test_tasks_ack_late_and_retry_only_transient_errors():
    from sqlalchemy.exc import OperationalError

    from findistil.config import load_settings
    from findistil.errors import FindistilError
    from findistil.flywheel import celery_runner

    app = celery_runner.make_celery(load_settings())
    celery_runner.register_tasks(app)
    for name in (celery_runner.RUN_JOB, celery_runner.RUN_CANDIDATE):
        task = app.tasks[name]
        assert task.acks_late and app.conf.task_reject_on_worker_lost
        assert OperationalError in task.autoretry_for and task.retry_backoff
        assert not any(issubclass(FindistilError, e) for e in task.autoretry_for)
    assert app.conf.worker_prefetch_multiplier == 1


# -- two `findistil serve` processes, thread runner, one SQLite file -------------------------


def _owner_pid(job: dict) -> int | None:
    for nim in job["nims"]:
        if nim["worker"] and nim["status"] == "running-evals":
            return int(nim["worker"].split(":")[1])
    return None


def test_kill_9_of_one_of_two_serve_processes(cluster, tmp_path):
    cluster.configure(f"sqlite:///{tmp_path / 'one.db'}", llama_epochs=2000)
    first, url1 = cluster.serve("s1")
    second, url2 = cluster.serve("s2")
    _seed(tmp_path / "findistil.yaml", tmp_path / "s1")
    by_pid = {first.pid: (first, url2), second.pid: (second, url1)}

    # a killed owner: the survivor fails its job within the lease
    job_id = _create(url1)
    wait_for(lambda: _training(_job(url1, job_id)), 120, "training", cluster.procs)
    victim, survivor = by_pid[_owner_pid(_job(url1, job_id))]
    victim.signal(signal.SIGKILL)
    t0 = time.monotonic()
    job = wait_for(
        lambda: _settled(j := _job(survivor, job_id)) and j, LEASE_S + 10, "reaping", cluster.procs
    )
    print(f"\nkill -9 of a serve process -> its job failed in {time.monotonic() - t0:.1f}s")
    assert job["status"] == "failed"
    assert f":{victim.pid}:" in job["error"] and "stopped while the job was running" in job["error"]
    assert {n["status"] for n in job["nims"]} == {"failed"}
    assert job["nims"][0]["customizations"][0]["status"] == "failed"
    assert httpx.delete(f"{survivor}/api/jobs/{job_id}").status_code == 200


def test_cancel_through_the_survivor_reaches_rows_a_dead_process_owned(cluster, tmp_path):
    cluster.configure(f"sqlite:///{tmp_path / 'one.db'}", llama_epochs=2000)
    first, url1 = cluster.serve("s1")
    second, url2 = cluster.serve("s2")
    _seed(tmp_path / "findistil.yaml", tmp_path / "s1")
    by_pid = {first.pid: (first, url2), second.pid: (second, url1)}
    job_id = _create(url1)
    wait_for(lambda: _training(_job(url1, job_id)), 120, "training", cluster.procs)
    victim, survivor = by_pid[_owner_pid(_job(url1, job_id))]
    victim.signal(signal.SIGKILL)
    victim.wait(10)
    assert httpx.post(f"{survivor}/api/jobs/{job_id}/cancel").status_code == 200
    job = _job(survivor, job_id)  # at once: the job and every child it had
    assert job["status"] == "cancelled"
    assert {n["status"] for n in job["nims"]} == {"cancelled"}
    assert job["nims"][0]["customizations"][0]["status"] == "cancelled"
    # the dead owner's lease runs out, then the job can be deleted
    t0 = time.monotonic()
    wait_for(
        lambda: httpx.delete(f"{survivor}/api/jobs/{job_id}").status_code == 200,
        LEASE_S + 10,
        "delete to be allowed",
        cluster.procs,
    )
    print(f"\ncancelled job of a dead process deletable after {time.monotonic() - t0:.1f}s")
    assert victim.wait(1) is not None and victim.popen.returncode == -signal.SIGKILL
