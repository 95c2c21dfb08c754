"""``POST /api/logs``: applications log straight into findistil, over real HTTP.

Each record is checked as the file loader checks a line; bad ones come back by index and
reason while the good ones are stored; the body is parsed by the loader's strict rules; the
route writes, so it needs an admin token; a job can then run on what was posted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
import yaml

from findistil.api import BackgroundServer, create_app
from findistil.config import load_settings
from findistil.logstore import open_logstore
from findistil.taxonomy import build_messages, format_answer

ADMIN = "admin-token-0123456789abcdef"
READ = "read-token-0123456789abcdef"


def record(headline: str, label: str = "Dividends", client: str = "app-1") -> dict:
    return {
        "timestamp": 1715854074,
        "workload_id": "news_classifier",
        "client_id": client,
        "request": {"model": "teacher", "messages": build_messages(headline)},
        "response": {
            "choices": [{"message": {"role": "assistant", "content": format_answer(label)}}]
        },
    }


def serve(tmp_path, **config) -> BackgroundServer:
    (tmp_path / "findistil.yaml").write_text(yaml.safe_dump(config))
    return BackgroundServer(create_app(load_settings(), start_runner=False))


@pytest.fixture
def api(tmp_path) -> Iterator[httpx.Client]:
    server = serve(tmp_path, max_record_bytes=8192)
    with server, httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def test_good_records_are_stored_and_bad_ones_named_by_index(api, tmp_path):
    batch = [
        record("Acme raises its dividend"),
        {"workload_id": "news_classifier", "client_id": "app-1", "request": {"messages": []}},
        "not an object",
        {
            "messages": build_messages("FDA approves Bolt drug")
            + [{"role": "assistant", "content": "[[Product Approval]]"}]
        },
        record("Zeta beats estimates " + "x" * 9000),  # over max_record_bytes
        record("Kappa downgraded", "Analyst Rating"),
    ]
    answer = api.post(
        "/api/logs", json={"records": batch, "workload_id": "news_classifier", "client_id": "app-1"}
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["stored"], body["rejected"]) == (3, 3), body["errors"]
    reasons = {e["index"]: e["reason"] for e in body["errors"]}
    assert set(reasons) == {1, 2, 4}
    assert reasons[1].startswith("request.messages: ") and reasons[1].endswith("(+1 more)")
    assert reasons[2] == "expected a JSON object, got str"
    assert "over max_record_bytes (8,192)" in reasons[4]
    assert body["targets"] == [
        {"workload_id": "news_classifier", "client_id": "app-1", "records": 3}
    ]
    listed = api.get("/api/logs").json()["workloads"]
    assert listed == [{"workload_id": "news_classifier", "client_id": "app-1", "records": 3}]

    # stored as logged: the upstream records come back equal as JSON
    with open_logstore(load_settings()) as store:
        stored = list(store.iter_records("news_classifier", "app-1"))
    heads = {json.dumps(r["request"], sort_keys=True) for r in stored}
    for i in (0, 5):
        assert json.dumps(batch[i]["request"], sort_keys=True) in heads


@pytest.mark.parametrize(
    "raw, status, words",
    [
        (b'{"records": [{"timestamp": NaN}]}', 400, "NaN is not standard JSON"),
        (b'{"records": [', 400, "invalid JSON"),
        (b"[1, 2]", 400, "expected a JSON object, got list"),
        (b"\xff\xfe{}", 400, "not UTF-8"),
        (b"", 400, "empty"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
        (b'{"records": [], "extra": 1}', 422, "extra"),
        (b'{"records": {"a": 1}}', 422, "records"),
        (b'{"records": [], "client_id": ""}', 422, "client_id"),
    ],
)
def test_a_bad_body_is_one_clear_error(api, raw, status, words):
    answer = api.post("/api/logs", content=raw, headers={"content-type": "application/json"})
    assert answer.status_code == status, answer.text
    assert words in answer.text
    assert api.get("/api/logs").json() == {"workloads": []}


def test_batch_limits_records_and_bytes(tmp_path):
    config = {"max_log_batch_records": 5, "max_log_batch_bytes": 65536}
    with serve(tmp_path, **config) as server:
        many = httpx.post(server.url + "/api/logs", json={"records": [{}] * 6}, timeout=30)
        assert many.status_code == 400
        assert "over max_log_batch_records (5)" in many.json()["detail"]
        big = [record(f"headline {i} " + "y" * 20_000) for i in range(4)]
        large = httpx.post(server.url + "/api/logs", json={"records": big}, timeout=30)
        assert large.status_code == 413
        assert large.json() == {"detail": "Request body too large: the limit is 65536 bytes."}
        # a jobs request keeps its own 64 KiB limit, the logs route its own
        fits = httpx.post(server.url + "/api/logs", json={"records": big[:2]}, timeout=30)
        assert fits.status_code == 200 and fits.json()["stored"] == 2


def test_posting_needs_an_admin_token(tmp_path, monkeypatch):
    monkeypatch.setenv("FINDISTIL_API_READ_TOKEN", READ)
    with serve(tmp_path, api_tokens=[ADMIN]) as server:
        body = {"records": [record("Acme raises its dividend")]}

        def post(token=None):
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            return httpx.post(server.url + "/api/logs", json=body, headers=headers, timeout=30)

        assert post().status_code == 401
        assert post(READ).status_code == 403
        assert post(ADMIN).json()["stored"] == 1
        listed = httpx.get(
            server.url + "/api/logs", headers={"Authorization": f"Bearer {READ}"}, timeout=30
        )
        assert listed.json()["workloads"][0]["records"] == 1


def test_redaction_applies_and_a_job_runs_on_posted_records(tmp_path):
    with serve(tmp_path, redact_pii=True) as server, httpx.Client(base_url=server.url) as api:
        rows = [record(f"Acme {i} raises dividend, ask ir{i}@acme.com") for i in range(60)]
        answer = api.post("/api/logs", json={"records": rows}, timeout=60).json()
        assert answer["stored"] == 60 and answer["redacted"] == {"EMAIL": 60}
        with open_logstore(load_settings()) as store:
            text = json.dumps(list(store.iter_records("news_classifier", "app-1")))
        assert "@acme.com" not in text and "<EMAIL>" in text
        job = api.post("/api/jobs", json={"workload_id": "news_classifier", "client_id": "app-1"})
        assert job.status_code == 200 and job.json()["status"] == "pending"
