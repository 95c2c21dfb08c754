"""``findistil label`` against a small fake OpenAI-compatible teacher served over real HTTP
(a test double: the real teachers are remote NIMs/vLLM/OpenAI, or the optional local one).

The fake answers ``[[label]]`` from a table, and can be told to answer 429 with Retry-After,
503, 400 or an unparseable text for given headlines, or to count concurrent requests."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from typer.testing import CliRunner

from findistil.api.app import BackgroundServer
from findistil.cli import app as cli_app
from findistil.labelling import Teacher, label_texts, read_texts
from findistil.logstore import LogStore

HEADLINES = [f"Acme {i} beats earnings estimates" for i in range(12)]


class FakeTeacher:
    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.fail: dict[str, list[tuple[int, dict]]] = {}  # headline -> answers before success
        self.refuse: set[str] = set()
        self.babble: set[str] = set()
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self.complete)

    async def complete(self, request: Request):
        body = await request.json()
        prompt = body["messages"][-1]["content"]
        headline = prompt.split("<<<HEADLINE>>>")[-1].split("<<<END>>>")[0].strip()
        with self.lock:
            self.calls[headline] = self.calls.get(headline, 0) + 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.05)
            pending = self.fail.get(headline)
            if pending:
                status, headers = pending.pop(0)
                return JSONResponse({"error": "busy"}, status_code=status, headers=headers)
            if headline in self.refuse:
                return JSONResponse({"error": {"message": "bad request"}}, status_code=400)
            content = "I cannot say" if headline in self.babble else "[[Earnings]]"
            return {
                "model": body["model"],
                "choices": [{"message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 5},
            }
        finally:
            with self.lock:
                self.in_flight -= 1


@pytest.fixture
def fake():
    teacher = FakeTeacher()
    with BackgroundServer(teacher.app) as server:
        teacher.url = server.url
        yield teacher


@pytest.fixture
def store(tmp_path):
    with LogStore(f"sqlite:///{tmp_path / 'logs.db'}") as s:
        yield s


def run(store, fake, texts=HEADLINES, **kw):
    teacher = Teacher(fake.url + "/v1", "big-teacher", timeout_s=10)
    return asyncio.run(label_texts(texts, store, teacher, client_id="c", **kw))


def test_labels_every_text_into_upstream_records_with_bounded_concurrency(store, fake):
    report = run(store, fake, concurrency=4)
    assert (report.labelled, report.failed, report.skipped) == (12, 0, 0)
    assert 2 <= fake.max_in_flight <= 4  # concurrent, never above the bound
    assert report.prompt_tokens == 1200 and report.completion_tokens == 60
    assert report.cost(0.5) == pytest.approx(1260 / 1000 * 0.5)
    records = list(store.iter_records("news_classifier", "c"))
    assert len(records) == 12
    record = records[0]
    assert record["request"]["model"] == "big-teacher"
    assert record["response"]["choices"][0]["message"]["content"] == "[[Earnings]]"
    assert record["teacher_label"] == "Earnings" and len(record["label_key"]) == 64


def test_retries_429_and_5xx_honouring_retry_after(store, fake):
    fake.fail[HEADLINES[0]] = [(429, {"Retry-After": "0.6"}), (503, {})]
    fake.fail[HEADLINES[1]] = [(500, {})]
    t0 = time.monotonic()
    report = run(store, fake, texts=HEADLINES[:3])
    assert report.labelled == 3 and report.failed == 0 and report.retries == 3
    assert fake.calls[HEADLINES[0]] == 3
    assert time.monotonic() - t0 >= 0.6  # waited at least what the server asked


def test_a_refused_row_fails_alone_and_is_not_retried(store, fake):
    fake.refuse.add(HEADLINES[2])
    fake.babble.add(HEADLINES[3])
    report = run(store, fake, texts=HEADLINES[:5])
    assert (report.labelled, report.failed, report.unparseable) == (4, 1, 1)
    assert fake.calls[HEADLINES[2]] == 1
    assert "HTTP 400" in report.errors[0] and HEADLINES[2][:20] in report.errors[0]
    assert "I cannot say" in report.unparseable_rows[0]
    babbled = [r for r in store.iter_records("news_classifier", "c") if r["teacher_label"] is None]
    assert len(babbled) == 1  # stored (it is what the teacher said), counted, listed


def test_a_rerun_resumes_where_a_failed_run_stopped(store, fake):
    for headline in HEADLINES[6:]:
        fake.fail[headline] = [(503, {})] * 2
    first = run(store, fake, max_retries=0)
    assert (first.labelled, first.failed) == (6, 6)
    second = run(store, fake, max_retries=0)  # the 503s are used up: the server recovered
    assert (second.skipped, second.labelled, second.failed) == (6, 0, 6)
    third = run(store, fake, max_retries=0)
    assert (third.skipped, third.labelled, third.failed) == (6, 6, 0)
    assert store.count("news_classifier", "c") == 12  # no duplicates
    assert all(fake.calls[h] == 1 for h in HEADLINES[:6])  # never asked twice


def test_cli_labels_a_csv_and_exits_2_on_failures(tmp_path, fake, monkeypatch):
    path = tmp_path / "raw.csv"
    path.write_text("headline\n" + "\n".join(HEADLINES[:4]) + "\n")
    fake.refuse.add(HEADLINES[3])
    monkeypatch.setenv("TEACHER_KEY", "secret")
    args = ["label", str(path), "--teacher-url", fake.url, "--model", "big-teacher",
            "--api-key-env", "TEACHER_KEY", "--price-per-1k-tokens", "1"]  # fmt: skip
    result = CliRunner().invoke(cli_app, args)
    assert result.exit_code == 2, result.output
    assert "labelled 3, already labelled 0, failed 1" in result.output
    assert "est. cost 0.3150" in result.output
    again = CliRunner().invoke(cli_app, args[:-2])
    assert "labelled 0, already labelled 3, failed 1" in again.output
    assert read_texts(path) == HEADLINES[:4]
    missing = CliRunner().invoke(cli_app, [*args[:5], "--api-key-env", "NOPE_NOT_SET"])
    assert missing.exit_code == 2 and "NOPE_NOT_SET" in missing.output
