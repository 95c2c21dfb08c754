"""The OpenAI-compatible serving routes over real HTTP, on the students a real job tuned.

A job runs on the tiny random models (causal LM + encoder); then ``/v1/models`` must list
both tuned artefacts and the causal base, chat completions must answer in OpenAI's shape
from the tuned adapter, the base and the encoder, and unknown models / unsupported options
must answer in OpenAI's error shape. Deleting the job takes its artefacts off the list.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from findistil.students import load_student
from findistil.taxonomy import LABELS, build_messages, parse_label
from tests.api.conftest import wait_job

HEADLINE = "Acme Corp beats quarterly earnings estimates, raises full-year guidance"
ERROR_KEYS = {"message", "type", "code", "param"}


def _completed_job(client: httpx.Client) -> dict:
    body = {"workload_id": "news_classifier", "client_id": "demo"}
    created = client.post("/api/jobs", json=body)
    assert created.status_code == 200, created.text
    job = wait_job(client, created.json()["id"])
    assert job["status"] == "completed", job.get("error")
    return job


def _chat(client: httpx.Client, model: str, **extra) -> httpx.Response:
    body = {"model": model, "messages": build_messages(HEADLINE), "max_tokens": 5, **extra}
    return client.post("/v1/chat/completions", json=body, timeout=120)


def _assert_completion(answer: httpx.Response, model: str) -> dict:
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert data["object"] == "chat.completion"
    assert data["id"].startswith("chatcmpl-") and data["model"] == model
    assert isinstance(data["created"], int) and data["created"] > 0
    (choice,) = data["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in {"stop", "length"}
    usage = data["usage"]
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    return data


def test_no_models_before_any_job_and_unknown_model_is_404(client):
    assert client.get("/v1/models").json() == {"object": "list", "data": []}
    for answer in (
        _chat(client, "no-such-model@adapter-0123"),
        client.get("/v1/models/no-such-model"),
    ):
        assert answer.status_code == 404, answer.text
        error = answer.json()["error"]
        assert set(error) == ERROR_KEYS
        assert error["code"] == "model_not_found" and "no-such-model" in error["message"]
    # a malformed body is a 422 in OpenAI's shape naming the field; too large a body a 413
    bad_role = {"model": "x", "messages": [{"role": "robot", "content": "hi"}]}
    for body, param in (
        ({"model": "x", "messages": []}, "messages"),
        (bad_role, "messages.0.role"),
    ):
        answer = client.post("/v1/chat/completions", json=body)
        assert answer.status_code == 422, answer.text
        error = answer.json()["error"]
        assert set(error) == ERROR_KEYS and error["param"] == param
        assert error["message"].startswith(f"{param}: ")
    huge = {"model": "x", "messages": [{"role": "user", "content": "x" * 200_000}]}
    answer = client.post("/v1/chat/completions", json=huge)
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "request_too_large"
    assert (
        client.post("/api/jobs", content=b"x" * 200_000)
        .json()["detail"]
        .startswith("Request body too large")
    )


def _reference(settings, nim: dict, adapter: str | None) -> tuple[str, int]:
    """What the student answers in-process (load_student + use_tuned), to compare with HTTP."""
    student = load_student(nim["model_name"], nim["kind"], settings)
    try:
        student.use_tuned(Path(adapter) if adapter else None)
        answer = student.predict([build_messages(HEADLINE)], max_new_tokens=5)[0]
        return answer.text, answer.prompt_tokens
    finally:
        student.close()


def test_serves_the_students_a_job_tuned(client, settings):
    job = _completed_job(client)
    llama, bert = job["nims"]
    llama_tuned = llama["customizations"][0]["customized_model"]
    bert_tuned = bert["customizations"][0]["customized_model"]
    assert llama_tuned and bert_tuned and job["id"] in llama_tuned

    listed = client.get("/v1/models").json()
    assert listed["object"] == "list"
    ids = [m["id"] for m in listed["data"]]
    # both artefacts and the causal base; the encoder's base has no head, so it cannot answer
    assert set(ids) == {llama_tuned, bert_tuned, llama["model_name"]}
    for entry in listed["data"]:
        assert entry["object"] == "model" and entry["owned_by"] == "findistil"
    by_id = {m["id"]: m for m in listed["data"]}
    assert by_id[llama_tuned]["parent"] == llama["model_name"]
    assert by_id[llama_tuned]["job_id"] == job["id"] and by_id[llama_tuned]["created"] > 0
    assert client.get(f"/v1/models/{llama_tuned}").json() == by_id[llama_tuned]

    # the tuned adapter answers the full upstream-style messages; temperature is accepted
    tuned = _assert_completion(_chat(client, llama_tuned, temperature=0.7), llama_tuned)
    assert tuned["usage"]["completion_tokens"] >= 1
    assert tuned["usage"]["completion_tokens"] <= 5
    # greedy decoding: the same request gives the same answer, also after switching models
    base = _assert_completion(_chat(client, llama["model_name"]), llama["model_name"])
    assert base["usage"]["completion_tokens"] >= 1
    again = _assert_completion(_chat(client, llama_tuned), llama_tuned)
    assert again["choices"][0]["message"] == tuned["choices"][0]["message"]
    # the tuned id answers through its adapter, whose pruning rule shortens the full prompt
    assert tuned["usage"]["prompt_tokens"] < base["usage"]["prompt_tokens"]
    adapter = settings.artifacts_root / llama["customizations"][0]["adapter_key"]
    for data, path in ((tuned, adapter), (base, None)):
        text, prompt_tokens = _reference(settings, llama, path)
        assert (data["choices"][0]["message"]["content"], data["usage"]["prompt_tokens"]) == (
            text,
            prompt_tokens,
        )
    # the encoder's head answers with one of the labels, in the teacher's answer form
    encoded = _assert_completion(_chat(client, bert_tuned), bert_tuned)
    assert parse_label(encoded["choices"][0]["message"]["content"]).label in LABELS

    for extra, word in (({"stream": True}, "stream"), ({"n": 2}, "n=2")):
        refused = _chat(client, llama_tuned, **extra)
        assert refused.status_code == 400 and word in refused.json()["error"]["message"]
    too_long = _chat(client, llama_tuned, max_tokens=100_000)
    assert too_long.status_code == 422

    # deleting the job deletes its artefacts: nothing is left to serve
    assert client.delete(f"/api/jobs/{job['id']}").status_code == 200
    assert client.get("/v1/models").json()["data"] == []
    gone = _chat(client, llama_tuned)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
