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

    refused = _chat(client, llama_tuned, n=2)
    assert refused.status_code == 400 and "n=2" in refused.json()["error"]["message"]
    too_long = _chat(client, llama_tuned, max_tokens=100_000)
    assert too_long.status_code == 422

    # deleting the job deletes its artefacts: nothing is left to serve
    assert client.delete(f"/api/jobs/{job['id']}").status_code == 200
    assert client.get("/v1/models").json()["data"] == []
    gone = _chat(client, llama_tuned)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"


def test_the_official_openai_sdk_sync_async_streaming_and_errors(client):
    """Any OpenAI client works: the official SDK, sync and async, streaming, its errors."""
    import asyncio

    import openai

    job = _completed_job(client)
    llama, bert = job["nims"]
    tuned = llama["customizations"][0]["customized_model"]
    bert_tuned = bert["customizations"][0]["customized_model"]
    base_url = f"{client.base_url}/v1"
    sdk = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    messages = build_messages(HEADLINE)

    assert {m.id for m in sdk.models.list()} >= {tuned, bert_tuned}
    reply = sdk.chat.completions.create(model=tuned, messages=messages, max_tokens=5)
    text = reply.choices[0].message.content
    assert reply.model == tuned and isinstance(text, str)
    assert reply.usage.truncated_prompt_tokens == 0

    async def in_async() -> str:
        async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", timeout=120) as aio:
            done = await aio.chat.completions.create(model=tuned, messages=messages, max_tokens=5)
            return done.choices[0].message.content

    assert asyncio.run(in_async()) == text  # greedy: the same answer

    stream = sdk.chat.completions.create(
        model=tuned, messages=messages, max_tokens=5, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens

    # a parameter the students cannot honour is a 400 naming it, never ignored
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    for extra, param in (
        ({"tools": [tool]}, "tools"),
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"stop": ["]]"]}, "stop"),
    ):
        try:
            sdk.chat.completions.create(model=tuned, messages=messages, max_tokens=5, **extra)
        except openai.BadRequestError as exc:
            assert exc.code == "unsupported_parameter" and exc.param == param, exc.body
        else:
            raise AssertionError(f"{param} was accepted")
    neutral = {"n": 1, "logprobs": False, "response_format": {"type": "text"}, "seed": 3}
    same = sdk.chat.completions.create(model=tuned, messages=messages, max_tokens=5, **neutral)
    assert same.choices[0].message.content == text
    try:
        sdk.chat.completions.create(model="no/such-model", messages=messages)
    except openai.NotFoundError as exc:
        assert exc.code == "model_not_found"
    else:
        raise AssertionError("an unknown model answered")

    # over-long input: the classifier reads the end and says what it dropped; a generating
    # student past its context (2,048 for the tiny llama) refuses
    long_text = " ".join(f"word{i % 97}" for i in range(6000))
    long_messages = [{"role": "user", "content": long_text}]
    cut = sdk.chat.completions.create(model=bert_tuned, messages=long_messages)
    assert cut.usage.truncated_prompt_tokens > 0 and cut.usage.prompt_tokens == 512
    try:
        sdk.chat.completions.create(model=llama["model_name"], messages=long_messages)
    except openai.BadRequestError as exc:
        assert exc.code == "context_length_exceeded" and "2048" in exc.message
    else:
        raise AssertionError("an over-long prompt was answered")

    # each student is loaded once and kept (an LRU of student_cache_size, 2 here), its
    # memory shown in /health
    health = client.get("/health").json()
    loaded = {(s["model"], s["kind"]) for s in health["students"]}
    assert loaded == {(llama["model_name"], "causal_lm"), (bert["model_name"], "encoder")}
    assert all(s["params"] > 0 and s["weights_mb"] > 0 for s in health["students"])
    assert health["rss_mb"] > 50


def test_concurrent_requests_are_batched_and_answered_as_alone(client):
    """Concurrent requests of one model share a predict call (micro-batching) and each gets
    the answer it would get alone; a too-long prompt fails only its own request."""
    import asyncio

    import openai

    job = _completed_job(client)
    llama, bert = job["nims"]
    models = [
        llama["customizations"][0]["customized_model"],
        bert["customizations"][0]["customized_model"],
    ]
    headlines = [f"{HEADLINE} ({i})" for i in range(6)]
    base_url = f"{client.base_url}/v1"

    def alone(model: str, headline: str) -> str:
        answer = _assert_completion(_chat(client, model, messages=build_messages(headline)), model)
        return answer["choices"][0]["message"]["content"]

    expected = {(m, h): alone(m, h) for m in models for h in headlines}
    before = client.get("/health").json()["serving"]

    async def together() -> list:
        async with openai.AsyncOpenAI(
            base_url=base_url, api_key="-", max_retries=0, timeout=120
        ) as aio:
            calls = [
                aio.chat.completions.create(model=m, messages=build_messages(h), max_tokens=5)
                for m in models
                for h in headlines
            ]
            long_prompt = [{"role": "user", "content": "word " * 3000}]
            calls.append(
                aio.chat.completions.create(model=models[0], messages=long_prompt, max_tokens=5)
            )
            return await asyncio.gather(*calls, return_exceptions=True)

    *answers, refused = asyncio.run(together())
    got = [a.choices[0].message.content for a in answers]
    assert got == [expected[(m, h)] for m in models for h in headlines]
    assert isinstance(refused, openai.BadRequestError) and refused.code == "context_length_exceeded"
    after = client.get("/health").json()["serving"]
    requests = after["requests"] - before["requests"]
    assert requests == 2 * len(headlines) + 1
    assert after["batches"] - before["batches"] < requests and after["largest_batch"] > 1
