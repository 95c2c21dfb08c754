"""The REST API over real HTTP (uvicorn on a free port) against SQLite and PostgreSQL.

Every route and every upstream error message, paging and filters, the body limit, and the
job lifecycle end to end on tiny random-model candidates: create -> run -> detail ->
predictions download -> delete; cancellation during training; restart recovery.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
from sqlalchemy import select

from findistil.api import BackgroundServer, create_app
from findistil.api.app import free_port
from findistil.config import load_settings
from findistil.flywheel.db import FlywheelDB, candidates, jobs
from findistil.logstore import open_logstore
from tests.api.conftest import FINISHED, load_demo_records, wait_job

UNKNOWN_ID = "0123456789abcdef01234567"
SCORE_KEYS = {"f1_score", "accuracy", "macro_f1", "rows_per_s"}


def _create(client: httpx.Client, **body) -> dict:
    body = {"workload_id": "news_classifier", "client_id": "demo", **body}
    response = client.post("/api/jobs", json=body)
    assert response.status_code == 200, response.text
    return response.json()


# -- health -----------------------------------------------------------------------------


def test_health_reports_database_and_runner(client):
    answer = client.get("/health")
    assert answer.status_code == 200
    assert answer.json()["status"] == "ok"
    assert answer.json()["database"] == "ok"
    assert answer.json()["runner"] == "alive"
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/static/dashboard.js">' in page.text
    script = client.get("/static/dashboard.js")
    assert script.status_code == 200 and 'getJSON("/api/jobs' in script.text


# -- the job lifecycle ------------------------------------------------------------------


def test_job_lifecycle_end_to_end(client, settings):
    created = _create(client)
    assert created["status"] == "pending"
    assert created["message"] == "NIM workflow started"
    assert len(created["id"]) == 24 and int(created["id"], 16) >= 0

    job = wait_job(client, created["id"])
    assert job["status"] == "completed", job.get("error")
    assert job["error"] is None
    assert job["started_at"] and job["finished_at"]
    assert job["num_records"] == 60
    names = {d["name"] for d in job["datasets"]}
    assert len(names) == 3 and sum(d["num_records"] for d in job["datasets"]) <= 60

    llama, bert = job["nims"]
    assert llama["status"] == "completed" and bert["status"] == "completed"
    assert llama["params"] > 0 and bert["params"] > 0
    llama_evals = {e["eval_type"]: e for e in llama["evaluations"]}
    assert set(llama_evals) == {"base-eval", "icl-eval", "customized-eval"}
    # the encoder has no zero-shot answer to score: only its customized eval runs
    assert [e["eval_type"] for e in bert["evaluations"]] == ["customized-eval"]
    for ev in [*llama["evaluations"], *bert["evaluations"]]:
        assert set(ev["scores"]) >= SCORE_KEYS, ev
        assert 0.0 <= ev["scores"]["f1_score"] <= 1.0
        assert ev["progress"] == 100
        assert ev["error"] is None and ev["runtime_seconds"] > 0
    for nim in (llama, bert):
        (custom,) = nim["customizations"]
        assert custom["epochs_completed"] == 1 and custom["steps_completed"] >= 1
        assert custom["progress"] == 100 and custom["error"] is None
    assert job["recommendation"]["model_name"] in {llama["model_name"], bert["model_name"]}

    # the predictions of an eval download as JSONL, one row per eval record
    ev = llama_evals["customized-eval"]
    download = client.get(f"/api/jobs/{job['id']}/evaluations/{ev['id']}/predictions")
    assert download.status_code == 200
    assert download.headers["content-type"].startswith("application/x-ndjson")
    rows = [json.loads(line) for line in download.text.splitlines()]
    assert len(rows) == 10

    listed = client.get("/api/jobs").json()
    assert [j["id"] for j in listed["jobs"]] == [job["id"]]
    assert set(listed) == {"jobs"}
    assert set(listed["jobs"][0]) >= {
        "id",
        "workload_id",
        "client_id",
        "status",
        "started_at",
        "finished_at",
        "datasets",
        "error",
    }

    folder = settings.artifacts_root / "jobs" / job["id"]
    assert folder.is_dir() and any(folder.rglob("*.jsonl"))
    deleted = client.delete(f"/api/jobs/{job['id']}")
    assert deleted.status_code == 200
    assert deleted.json() == {
        "id": job["id"],
        "message": "Job deletion started. Resources will be cleaned up in the background.",
    }
    assert not folder.exists()
    assert client.get(f"/api/jobs/{job['id']}").status_code == 404
    assert client.get("/api/jobs").json() == {"jobs": []}


# -- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/api/jobs/{id}"),
        ("POST", "/api/jobs/{id}/cancel"),
        ("DELETE", "/api/jobs/{id}"),
        ("GET", "/api/jobs/{id}/evaluations/1/predictions"),
    ],
)
def test_bad_and_unknown_job_ids(client, method, path):
    for bad in ("xyz", "0123456789ABCDEF01234567", "0123456789abcdef0123456"):
        answer = client.request(method, path.format(id=bad))
        assert answer.status_code == 400, (bad, answer.text)
        assert answer.json() == {"detail": "Invalid job_id format"}
    answer = client.request(method, path.format(id=UNKNOWN_ID))
    assert answer.status_code == 404
    # upstream's words: GET says "Job not found", cancel and delete name the id
    named = method in ("POST", "DELETE")
    expected = f"Job with ID {UNKNOWN_ID} not found" if named else "Job not found"
    assert answer.json() == {"detail": expected}


@pytest.mark.parametrize(
    "body, where",
    [
        ({"client_id": "demo"}, "workload_id"),
        ({"workload_id": "news_classifier"}, "client_id"),
        ({"workload_id": "", "client_id": "demo"}, "workload_id"),
        ({"workload_id": 5, "client_id": "demo"}, "workload_id"),
        (
            {"workload_id": "w", "client_id": "c", "data_split_config": {"eval_size": 0}},
            "eval_size",
        ),
        (
            {"workload_id": "w", "client_id": "c", "data_split_config": {"val_ratio": 1.5}},
            "val_ratio",
        ),
        ({"workload_id": "w", "client_id": "c", "data_split_config": {"bogus": 1}}, "bogus"),
        ({"workload_id": "w", "client_id": "c", "extra": 1}, "extra"),
    ],
)
def test_invalid_bodies_are_422_naming_the_field(client, body, where):
    answer = client.post("/api/jobs", json=body)
    assert answer.status_code == 422, answer.text
    assert any(where in [str(p) for p in err["loc"]] for err in answer.json()["detail"])


def test_non_json_body_is_422(client):
    answer = client.post(
        "/api/jobs", content=b"not json", headers={"content-type": "application/json"}
    )
    assert answer.status_code == 422


@pytest.mark.parametrize(
    "raw, where",
    [
        (
            b'{"workload_id": "w", "client_id": "c", "data_split_config": {"val_ratio": NaN}}',
            "val_ratio",
        ),
        (
            b'{"workload_id": "w", "client_id": "c", "data_split_config": {"eval_size": Infinity}}',
            "eval_size",
        ),
        (b'{"workload_id": "\\ud800", "client_id": "c"}', "workload_id"),
        (b'{"workload_id": "w", "client_id": "a\\u0000b"}', "client_id"),
        (b'{"workload_id": "w", "client_id": "c", "extra": "' + b"x" * 60_000 + b'"}', "extra"),
    ],
)
def test_hostile_bodies_are_short_422s_never_500(client, raw, where):
    answer = client.post("/api/jobs", content=raw, headers={"content-type": "application/json"})
    assert answer.status_code == 422, answer.text
    assert len(answer.content) < 2_000  # an excerpt of the value, not the body echoed back
    assert any(where in err["loc"] for err in answer.json()["detail"])
    assert client.get("/health").status_code == 200  # the connection and the server live on


def test_too_few_records_is_400_with_the_count(client):
    answer = client.post(
        "/api/jobs", json={"workload_id": "news_classifier", "client_id": "nobody"}
    )
    assert answer.status_code == 400
    assert "has 0 records" in answer.json()["detail"]
    answer = client.post(
        "/api/jobs",
        json={
            "workload_id": "news_classifier",
            "client_id": "demo",
            "data_split_config": {"min_total_records": 61},
        },
    )
    assert answer.status_code == 400
    assert "has 60 records" in answer.json()["detail"]
    assert "min_total_records=61" in answer.json()["detail"]
    assert client.get("/api/jobs").json() == {"jobs": []}  # nothing queued


def test_split_override_cross_field_error_is_400_naming_the_key(client):
    body = {
        "workload_id": "news_classifier",
        "client_id": "demo",
        "data_split_config": {"limit": 30, "min_total_records": 40},
    }
    answer = client.post("/api/jobs", json=body)
    assert answer.status_code == 400
    assert "data_split_config" in answer.json()["detail"]


def test_body_over_the_limit_is_413(client):
    big = {"workload_id": "news_classifier", "client_id": "demo", "pad": "x" * 70_000}
    answer = client.post("/api/jobs", json=big)
    assert answer.status_code == 413
    assert "too large" in answer.json()["detail"]

    def chunks():  # no Content-Length: the streamed size is what counts
        for _ in range(80):
            yield b"x" * 1024

    answer = client.post(
        "/api/jobs", content=chunks(), headers={"content-type": "application/json"}
    )
    assert answer.status_code == 413
    assert client.get("/api/jobs").json() == {"jobs": []}


def test_cancel_finished_and_delete_running_are_refused(client):
    job_id = _create(client)["id"]
    answer = client.delete(f"/api/jobs/{job_id}")
    assert answer.status_code == 400
    assert answer.json() == {"detail": "Cannot delete a running job. Please cancel the job first."}
    job = wait_job(client, job_id)
    assert job["status"] == "completed"
    answer = client.post(f"/api/jobs/{job_id}/cancel")
    assert answer.status_code == 400
    assert answer.json() == {"detail": "Cannot cancel a job that has already finished."}
    answer = client.get(f"/api/jobs/{job_id}/evaluations/999999/predictions")
    assert answer.status_code == 404


# -- paging and filters (an API without a runner: jobs stay queued) -----------------------


@pytest.fixture
def idle_client(settings, demo_records):
    with open_logstore(settings) as store:
        rows = list(store.iter_records("news_classifier", "demo"))
        store.add_many({**r, "workload_id": "other_workload"} for r in rows)
    app = create_app(settings, start_runner=False)
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        yield http


def test_paging_and_filters(idle_client):
    assert idle_client.get("/health").json()["runner"] == "disabled"
    ids = []
    for i in range(5):
        workload = "other_workload" if i % 2 else "news_classifier"
        ids.append(_create(idle_client, workload_id=workload)["id"])
        time.sleep(0.01)  # distinct creation times: newest first is well defined
    newest_first = ids[::-1]
    assert [j["id"] for j in idle_client.get("/api/jobs").json()["jobs"]] == newest_first
    page = idle_client.get("/api/jobs", params={"limit": 2, "offset": 1}).json()
    assert [j["id"] for j in page["jobs"]] == newest_first[1:3]
    assert idle_client.get("/api/jobs", params={"offset": 5}).json() == {"jobs": []}

    other = idle_client.get("/api/jobs", params={"workload_id": "other_workload"}).json()["jobs"]
    assert [j["id"] for j in other] == [ids[3], ids[1]]

    assert idle_client.post(f"/api/jobs/{ids[0]}/cancel").json() == {
        "id": ids[0],
        "message": "Job cancellation initiated successfully.",
    }
    cancelled = idle_client.get("/api/jobs", params={"status": "cancelled"}).json()["jobs"]
    assert [(j["id"], j["error"]) for j in cancelled] == [(ids[0], "Job cancelled by user")]
    pending = idle_client.get("/api/jobs", params={"status": "pending"}).json()["jobs"]
    assert len(pending) == 4 and all(j["status"] == "pending" for j in pending)
    both = {"status": "pending", "workload_id": "news_classifier"}
    assert [j["id"] for j in idle_client.get("/api/jobs", params=both).json()["jobs"]] == [
        ids[4],
        ids[2],
    ]
    huge = {"offset": 2**63}
    for bad in ({"limit": 0}, {"offset": -1}, {"status": "queued"}, {"limit": "x"}, huge):
        assert idle_client.get("/api/jobs", params=bad).status_code == 422, bad


# -- cancellation during training ----------------------------------------------------------


def test_cancel_during_training_stops_every_candidate(database_url, write_config, tmp_path):
    write_config(llama_epochs=500)  # long enough to be caught mid-training
    settings = load_settings()
    load_demo_records(settings)
    with BackgroundServer(create_app(settings)) as srv, httpx.Client(base_url=srv.url) as client:
        job_id = _create(client)["id"]

        def training(job):
            return any(c["steps_completed"] > 0 for n in job["nims"] for c in n["customizations"])

        wait_job(client, job_id, until=training, timeout=120)
        t0 = time.monotonic()
        answer = client.post(f"/api/jobs/{job_id}/cancel")
        assert answer.status_code == 200
        job = wait_job(client, job_id, timeout=60)
        stopped_s = time.monotonic() - t0
        print(f"cancel -> every row cancelled in {stopped_s:.2f}s")
        assert job["status"] == "cancelled"
        assert job["error"] == "Job cancelled by user"
        assert job["nims"][0]["status"] == "cancelled"
        assert job["nims"][0]["customizations"][0]["epochs_completed"] < 500
        assert all(
            n["status"] in {"cancelled", "pending"} or n["status"] in FINISHED for n in job["nims"]
        )
        assert all(n["status"] != "completed" for n in job["nims"])
        # a cancelled job can be deleted once its worker let go of it (within a second or so)
        deadline = time.monotonic() + 10
        while (deleted := client.delete(f"/api/jobs/{job_id}")).status_code != 200:
            assert "is still stopping its stages" in deleted.json()["detail"], deleted.text
            assert time.monotonic() < deadline, deleted.text
            time.sleep(0.1)
        print(f"cancel -> deletable in {time.monotonic() - t0:.2f}s")
        assert not (settings.artifacts_root / "jobs" / job_id).exists()


# -- restart recovery ----------------------------------------------------------------------


def test_restart_fails_jobs_a_killed_server_left_running(database_url, write_config, tmp_path):
    """A real ``findistil serve`` is SIGKILLed mid-job; once its lease runs out the next
    start marks the job failed, naming the dead worker."""
    write_config(llama_epochs=500, lease_timeout_s=3)
    settings = load_settings()
    load_demo_records(settings)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "findistil.cli", "serve", "--port", str(port)],
        env={**os.environ},
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "findistil serve did not come up"
            time.sleep(0.3)
        with httpx.Client(base_url=url) as client:
            job_id = _create(client)["id"]
            wait_job(client, job_id, until=lambda j: j["status"] == "running", timeout=120)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)

    db = FlywheelDB(settings.db_url)
    with db.begin() as conn:
        assert (
            conn.execute(select(jobs.c.status).where(jobs.c.id == job_id)).scalar_one() == "running"
        )
    db.dispose()
    with BackgroundServer(create_app(settings)) as srv, httpx.Client(base_url=srv.url) as client:
        job = wait_job(client, job_id, timeout=3 + 10)
        assert job["status"] == "failed"
        assert re.fullmatch(
            r"interrupted: worker \S+:\d+:\w+ stopped while the job was running", job["error"]
        )
        assert str(proc.pid) in job["error"]
        assert job["finished_at"] is not None
        assert all(n["status"] in FINISHED for n in job["nims"])
        # and the failed job can be deleted
        assert client.delete(f"/api/jobs/{job_id}").status_code == 200


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # PG: see the lifecycle test
def test_delete_removes_only_its_own_job(client, settings):
    first = _create(client)["id"]
    wait_job(client, first)
    second = _create(client)["id"]
    wait_job(client, second)
    assert (settings.artifacts_root / "jobs" / first).is_dir() and (
        settings.artifacts_root / "jobs" / second
    ).is_dir()
    assert client.delete(f"/api/jobs/{first}").status_code == 200
    assert not (settings.artifacts_root / "jobs" / first).exists()
    assert (settings.artifacts_root / "jobs" / second).is_dir()
    kept = client.get(f"/api/jobs/{second}").json()
    assert kept["status"] == "completed" and len(kept["nims"]) == 2
    db = FlywheelDB(settings.db_url)
    with db.begin() as conn:
        left = {r.job_id for r in conn.execute(select(candidates.c.job_id))}
    db.dispose()
    assert left == {second}
