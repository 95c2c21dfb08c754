"""Deployments and the cascade route over real HTTP, on the students a real job tuned.

A job runs on the tiny random models; its tuned encoder is deployed behind
``findistil/route-news_classifier`` with a teacher to fall back to. The teacher is a small
fake OpenAI-compatible server (a test double: real teachers are remote NIMs / vLLM /
OpenAI), which answers ``[[Earnings]]``, counts its calls and can be told to fail. The
thresholds are set at deploy time (0: the student answers everything; 1: no random model is
that sure, the teacher answers) so each path is taken on purpose; the calibrated ones are
checked in ``tests/test_cascade.py`` and the stage tests.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from typer.testing import CliRunner

from findistil.api.app import BackgroundServer
from findistil.cli import app as cli_app
from findistil.logstore import open_logstore
from findistil.taxonomy import build_messages
from tests.api.conftest import DEMO_RECORDS, wait_job

ROUTE = "findistil/route-news_classifier"
HEADLINE = "Acme Corp beats quarterly earnings estimates, raises full-year guidance"


class FakeTeacher:
    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.failing = False
        self.lock = threading.Lock()
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self.complete)

    async def complete(self, request: Request):
        body = await request.json()
        with self.lock:
            self.calls.append(body)
        if self.failing:
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
        return {
            "model": body["model"],
            "choices": [{"message": {"role": "assistant", "content": "[[Earnings]]"}}],
            "usage": {"prompt_tokens": 120, "completion_tokens": 4},
        }


@pytest.fixture
def teacher():
    fake = FakeTeacher()
    with BackgroundServer(fake.app) as srv:
        fake.url = srv.url + "/v1"
        yield fake


def _route(client: httpx.Client) -> httpx.Response:
    body = {"model": ROUTE, "messages": build_messages(HEADLINE), "max_tokens": 8}
    return client.post("/v1/chat/completions", json=body, timeout=120)


def _deploy(client, job, teacher, threshold):
    bert = job["nims"][1]["model_name"]
    body = {
        "job_id": job["id"],
        "candidate": bert,
        "teacher": {"base_url": teacher.url, "model": "big-teacher"},
        "threshold": threshold,
    }
    return client.post("/api/deployments", json=body)


def test_deploy_route_teacher_fallback_logged_and_rollback(client, settings, teacher):
    created = client.post("/api/jobs", json={"workload_id": "news_classifier", "client_id": "demo"})
    job = wait_job(client, created.json()["id"])
    assert job["status"] == "completed", job.get("error")
    cascade = job["nims"][1]["cascade"]
    assert cascade["source"] == "label_scores" and cascade["scoring_mode"] == "generate"
    assert 0 <= cascade["coverage"] <= 1 and len(cascade["curve"]) == 10

    # no teacher given and none configured: refused, naming what to give
    refused = client.post("/api/deployments", json={"job_id": job["id"]})
    assert refused.status_code == 400 and "teacher" in refused.json()["detail"]
    assert _route(client).json()["error"]["code"] == "model_not_found"  # nothing deployed yet

    first = _deploy(client, job, teacher, 0.0)
    assert first.status_code == 201, first.text
    first = first.json()
    assert first["status"] == "active" and first["model"] == ROUTE
    assert first["threshold"] == 0.0 and first["cascade"]["temperature"] > 0
    listed = client.get("/v1/models").json()["data"]
    assert listed[0]["id"] == ROUTE and listed[0]["kind"] == "route"
    assert client.get(f"/v1/models/{ROUTE}").json()["parent"] == first["customized_model"]

    answer = _route(client).json()  # threshold 0: the student answers
    assert answer["model"] == ROUTE and answer["findistil"]["route"] == "student"
    assert 0 < answer["findistil"]["confidence"] <= 1 and teacher.calls == []

    second = _deploy(client, job, teacher, 1.0).json()  # no random model is that sure
    assert second["previous_id"] == first["id"]
    answer = _route(client).json()
    assert answer["findistil"]["route"] == "teacher", answer
    assert answer["choices"][0]["message"]["content"] == "[[Earnings]]"
    (call,) = teacher.calls
    assert call["model"] == "big-teacher" and call["messages"] == build_messages(HEADLINE)
    with open_logstore(settings) as store:  # the hard case went back into the log store
        records = list(store.iter_records("news_classifier", "demo"))
    assert len(records) == DEMO_RECORDS + 1
    logged = [r for r in records if r.get("source") == "findistil-route"]
    assert logged[0]["response"]["choices"][0]["message"]["content"] == "[[Earnings]]"
    assert logged[0]["route"]["deployment_id"] == second["id"]

    teacher.failing = True
    failed = _route(client)
    assert failed.status_code == 502 and failed.json()["error"]["code"] == "teacher_unavailable"
    teacher.failing = False

    deployments = client.get("/api/deployments").json()["deployments"]
    assert [d["status"] for d in deployments] == ["active", "retired"]
    assert deployments[0]["requests"] == 2 and deployments[0]["student_share"] == 0.0
    assert deployments[1]["requests"] == 1 and deployments[1]["student_share"] == 1.0

    back = client.post("/api/deployments/news_classifier/rollback")
    assert back.status_code == 200 and back.json()["id"] == first["id"]
    assert _route(client).json()["findistil"]["route"] == "student"
    again = client.post("/api/deployments/news_classifier/rollback")
    assert again.status_code == 400 and "nothing to roll back" in again.json()["detail"]

    cli = CliRunner().invoke(cli_app, ["deployments", "--json", "--api-url", str(client.base_url)])
    assert cli.exit_code == 0, cli.output
    shown = json.loads(cli.output)["deployments"]
    assert [(d["id"], d["status"]) for d in shown] == [
        (second["id"], "rolled_back"),
        (first["id"], "active"),
    ]
