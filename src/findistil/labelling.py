"""Teacher labelling: raw texts -> any OpenAI-compatible teacher -> log records in the store.

The first arrow of the flywheel when no application has logged traffic yet (the seed
notebook's first part): each headline goes to the teacher with the workload's prompt, and
the call is stored as an upstream log record, exactly as an application would have logged it,
plus ``teacher_label`` (the taxonomy's normalised label, None when unparseable),
``label_key`` and ``latency_s``.

- Bounded concurrency: ``concurrency`` requests in flight on one async HTTP client.
- Retries: 429, 5xx, timeouts and dropped connections are retried up to ``max_retries`` times
  with exponential backoff and full jitter, waiting at least the server's ``Retry-After``;
  any other 4xx is the caller's mistake and fails the row at once (counted, reason kept).
- Resumable: every stored record carries ``label_key`` = sha256(model, text); a rerun skips
  texts already labelled by that model for that workload/client. Each answer is stored as
  soon as it arrives, so a crash loses at most the rows in flight.

    report = asyncio.run(label_texts(texts, store, Teacher(url, "meta/llama-3.3-70b"), ...))
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from findistil import taxonomy
from findistil.errors import DataError
from findistil.logstore import LogStore
from findistil.progress import Progress, ProgressFn, no_progress

RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_LISTED = 20  # failed / unparseable rows named in the report


@dataclass
class Teacher:
    """Where the teacher answers: an OpenAI-compatible base URL (``.../v1`` or the root)."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 60.0
    max_tokens: int = 24

    @property
    def completions_url(self) -> str:
        root = self.base_url.rstrip("/")
        return root + ("/chat/completions" if root.endswith("/v1") else "/v1/chat/completions")


@dataclass
class LabelReport:
    rows: int = 0
    labelled: int = 0
    skipped: int = 0  # labelled by an earlier run
    failed: int = 0
    unparseable: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    unparseable_rows: list[str] = field(default_factory=list)

    def cost(self, price_per_1k_tokens: float) -> float:
        return (self.prompt_tokens + self.completion_tokens) / 1000 * price_per_1k_tokens


class _Refused(Exception):
    """The teacher refused the row for good (a 4xx that retrying will not change)."""


def read_texts(path: str | Path) -> list[str]:
    """The texts of a headline CSV (``headline`` or ``text`` column; a label column is
    ignored) or a JSONL file of ``{"headline": ...}`` / ``{"text": ...}`` objects."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} is not a file: give a .csv or .jsonl of texts to label")
    with path.open(encoding="utf-8-sig", newline="") as fh:
        if path.suffix.lower() == ".csv":
            rows = list(csv.DictReader(fh))
        else:
            rows = [_json_row(path, n, line) for n, line in enumerate(fh, 1) if line.strip()]
    texts = [(row.get("headline") or row.get("text") or "").strip() for row in rows]
    if not any(texts):
        raise DataError(f"{path}: no 'headline' or 'text' values found")
    return [t for t in texts if t]


def _json_row(path: Path, lineno: int, line: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise DataError(f"{path}:{lineno}: expected an object with 'headline' or 'text'")
    return row


def label_key(model: str, text: str) -> str:
    return hashlib.sha256(f"{model}\0{text}".encode()).hexdigest()


def labelled_keys(store: LogStore, workload_id: str, client_id: str) -> set[str]:
    return {
        r["label_key"] for r in store.iter_records(workload_id, client_id) if r.get("label_key")
    }


async def _post(
    http: httpx.AsyncClient, teacher: Teacher, body: dict, max_retries: int, report: LabelReport
) -> tuple[dict, float]:
    """The teacher's JSON answer and its latency, retrying what is worth retrying."""
    for attempt in range(max_retries + 1):
        t0 = time.perf_counter()
        try:
            answer = await http.post(teacher.completions_url, json=body)
            if answer.status_code < 400:
                return answer.json(), time.perf_counter() - t0
            if answer.status_code not in RETRY_STATUSES:
                raise _Refused(f"HTTP {answer.status_code}: {answer.text[:200]}")
            reason, wait_at_least = f"HTTP {answer.status_code}", _retry_after(answer)
        except (httpx.TimeoutException, httpx.TransportError) as exc:
            reason, wait_at_least = type(exc).__name__, 0.0
        if attempt == max_retries:
            raise _Refused(f"{reason} after {max_retries + 1} attempts")
        report.retries += 1
        backoff = random.uniform(0, min(30.0, 0.5 * 2**attempt))  # full jitter
        await asyncio.sleep(max(wait_at_least, backoff))
    raise AssertionError("unreachable")


def _retry_after(answer: httpx.Response) -> float:
    try:
        return min(60.0, max(0.0, float(answer.headers.get("retry-after", 0))))
    except ValueError:  # an HTTP date: wait the usual backoff
        return 0.0


def _record(text: str, data: dict, latency: float, teacher: Teacher, ids: tuple[str, str]):
    messages = taxonomy.build_messages(text)
    content = ((data.get("choices") or [{}])[0].get("message") or {}).get("content") or ""
    parsed = taxonomy.parse_label(content)
    usage = data.get("usage") or {}
    response = {
        "choices": [{"message": {"role": "assistant", "content": content}}],
        "model": data.get("model") or teacher.model,
        "usage": {k: int(usage.get(k) or 0) for k in ("prompt_tokens", "completion_tokens")},
    }
    return {
        "workload_id": ids[0],
        "client_id": ids[1],
        "timestamp": int(time.time()),
        "request": {"model": teacher.model, "messages": messages},
        "response": response,
        "teacher_label": parsed.label if parsed.parseable else None,
        "label_key": label_key(teacher.model, text),
        "latency_s": round(latency, 4),
    }


async def label_texts(
    texts: Sequence[str],
    store: LogStore,
    teacher: Teacher,
    *,
    workload_id: str = taxonomy.WORKLOAD_ID,
    client_id: str = "labelled",
    concurrency: int = 8,
    max_retries: int = 5,
    progress: ProgressFn = no_progress,
) -> LabelReport:
    """Label ``texts`` with ``teacher`` into ``store`` (see the module docstring)."""
    report = LabelReport(rows=len(texts))
    done = labelled_keys(store, workload_id, client_id)
    todo = [t for t in dict.fromkeys(texts) if label_key(teacher.model, t) not in done]
    report.skipped = len(texts) - len(todo)
    queue: asyncio.Queue[str] = asyncio.Queue()
    for text in todo:
        queue.put_nowait(text)
    headers = {"Authorization": f"Bearer {teacher.api_key}"} if teacher.api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=teacher.timeout_s, headers=headers, limits=limits) as http:

        async def worker() -> None:
            while not queue.empty():
                text = queue.get_nowait()
                await _label_one(http, teacher, text, (workload_id, client_id), store, report,
                                 max_retries)  # fmt: skip
                progress(Progress("label", report.skipped + report.labelled + report.failed,
                                  report.rows, _info(report)))  # fmt: skip

        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    report.seconds = time.perf_counter() - t0
    return report


async def _label_one(http, teacher, text, ids, store, report, max_retries) -> None:
    body = {
        "model": teacher.model,
        "messages": taxonomy.build_messages(text),
        "max_tokens": teacher.max_tokens,
        "temperature": 0,
    }
    try:
        data, latency = await _post(http, teacher, body, max_retries, report)
        record = _record(text, data, latency, teacher, ids)
    except (_Refused, ValueError, AttributeError, TypeError) as exc:
        report.failed += 1
        if len(report.errors) < MAX_LISTED:
            report.errors.append(f"{text[:60]!r}: {exc}")
        return
    store.add_many([record])  # stored now: a crash loses only the rows in flight
    report.labelled += 1
    usage = record["response"]["usage"]
    report.prompt_tokens += usage["prompt_tokens"]
    report.completion_tokens += usage["completion_tokens"]
    if record["teacher_label"] is None:
        report.unparseable += 1
        if len(report.unparseable_rows) < MAX_LISTED:
            answer = record["response"]["choices"][0]["message"]["content"]
            report.unparseable_rows.append(f"{text[:60]!r} -> {answer[:60]!r}")


def _info(report: LabelReport) -> dict[str, int]:
    return {
        "labelled": report.labelled,
        "failed": report.failed,
        "tokens": report.prompt_tokens + report.completion_tokens,
    }
