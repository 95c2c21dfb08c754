"""Loaders: files of logged LLM calls -> the log store.

Three input shapes (REFERENCE §1), detected per file/line:

- upstream log JSONL: rows with ``workload_id`` (and ``request``/``response``), stored
  unchanged except for ids given on the command line;
- conversation JSONL: ``{"messages": [...], "tools"?}``, converted as upstream does (request =
  every message but the last, response = the last);
- headline CSV: ``headline,label`` or ``headline,teacher_label`` (optional ``id``), converted the
  way upstream's notebook did: system + user message with findistil's classification prompt and
  the teacher answer ``[[label]]``.

Files stream line by line into batched inserts, so memory does not grow with the file. A bad
line (not UTF-8, not JSON, NaN/Infinity, too deep, over ``max_record_bytes``, a bad field or
timestamp) is rejected with ``file:line: reason`` and loading goes on; ``lines = loaded +
rejected + blank`` always holds. A UTF-8 BOM is accepted; only standard JSON is stored.
``replace=True`` swaps a workload/client's records in one transaction.
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from findistil import taxonomy
from findistil.errors import DataError
from findistil.logstore import LogStore, LogWriter
from findistil.progress import Progress, ProgressFn, no_progress
from findistil.records import LogRecord
from findistil.redact import redact_record

BOM = b"\xef\xbb\xbf"
MAX_RECORD_BYTES = 1 << 20  # Settings.max_record_bytes
MAX_ERRORS_KEPT = 200  # messages kept in the report; every rejection is still counted
PROGRESS_EVERY = 500  # lines between progress events
DEMO_FILE = "demo_headlines.csv"


@dataclass
class LoadReport:
    """What a load did. ``lines == loaded + rejected + blank``; ``errors`` holds
    ``file:line: reason``."""

    loaded: int = 0
    rejected: int = 0
    blank: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)  # (where, reason), bounded
    replaced: int = 0
    source_format: str = ""
    targets: dict[tuple[str, str], int] = field(default_factory=dict)
    redacted: Counter[str] = field(default_factory=Counter)  # placeholders per PII type

    @property
    def lines(self) -> int:
        return self.loaded + self.rejected + self.blank

    @property
    def errors(self) -> list[str]:
        """The kept rejections as ``where: reason`` lines."""
        return [f"{where}: {reason}" for where, reason in self.problems]

    def reject(self, where: str, reason: str) -> None:
        self.rejected += 1
        if len(self.problems) < MAX_ERRORS_KEPT:
            self.problems.append((where, reason))


class _Rejected(Exception):
    """A line that cannot become a record; the message is the reason."""


def client_id_from_path(path: Path) -> str:
    """A client id from a file name: ``News Headlines_v2.csv`` -> ``news-headlines-v2``."""
    slug = re.sub(r"[^a-z0-9]+", "-", path.stem.lower()).strip("-")
    return slug or "default"


def _count_lines(path: Path) -> int:
    n = 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            n += chunk.count(b"\n")
    return n


def _pydantic_reason(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "record"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{loc}: {err['msg']}{more}"


def _from_log_row(
    obj: dict[str, Any], workload_id: str | None, client_id: str | None, derived: str
) -> dict[str, Any]:
    record = dict(obj)
    if workload_id:
        record["workload_id"] = workload_id
    if client_id:
        record["client_id"] = client_id
    elif not record.get("client_id"):
        record["client_id"] = derived  # a row without a client gets the file-derived id
    return record


def headline_record(headline: str, label: str, workload_id: str, client_id: str) -> dict[str, Any]:
    """A classification log record for a teacher-labelled headline (raises ValueError on label)."""
    answer = taxonomy.format_answer(label)
    return {
        "workload_id": workload_id,
        "client_id": client_id,
        "request": {"messages": taxonomy.build_messages(headline)},
        "response": {"choices": [{"message": {"role": "assistant", "content": answer}}]},
    }


def _from_conversation(obj: dict[str, Any], workload_id: str, client_id: str) -> dict[str, Any]:
    messages = obj.get("messages")
    if not isinstance(messages, list) or len(messages) < 2:
        raise _Rejected("messages must be a list of at least 2 messages (prompt and answer)")
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant":
        raise _Rejected("the last message must be the assistant's answer (role 'assistant')")
    request: dict[str, Any] = {"messages": messages[:-1]}
    if obj.get("tools") is not None:
        request["tools"] = obj["tools"]
    record = {
        "workload_id": workload_id,
        "client_id": client_id,
        "request": request,
        "response": {"choices": [{"message": last}]},
    }
    if "timestamp" in obj:
        record["timestamp"] = obj["timestamp"]
    return record


def _validated(record: dict[str, Any]) -> dict[str, Any]:
    try:
        parsed = LogRecord.model_validate(record)
    except ValidationError as exc:
        raise _Rejected(_pydantic_reason(exc)) from None
    # The record is stored as logged; only the timestamp is normalised (int, default now).
    record["timestamp"] = parsed.timestamp
    try:
        text = json.dumps(record, ensure_ascii=False, allow_nan=False)
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _Rejected(
            "a string holds a lone surrogate (e.g. \\ud800): not valid Unicode"
        ) from None
    if "\\u0000" in text or "\x00" in text:
        raise _Rejected("a string holds a NUL character (\\u0000): not storable")
    return record


def _read_lines(fh, limit: int) -> Iterator[tuple[int, bytes | int]]:
    """(line number, bytes) per line of a binary file; for a line over ``limit`` bytes its
    size instead, read on in chunks so that memory stays bounded."""
    lineno = 0
    while line := fh.readline(limit + 1):
        lineno += 1
        if len(line) <= limit or line.endswith(b"\n") and len(line) == limit + 1:
            yield lineno, line
            continue
        size = len(line)
        while not line.endswith(b"\n") and (line := fh.readline(1 << 20)):
            size += len(line)
        yield lineno, size


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not standard JSON")


def _json_object(raw: bytes | int, lineno: int, limit: int) -> dict[str, Any] | None:
    """The line's JSON object, None for a blank line; raises _Rejected with the reason."""
    if isinstance(raw, int):
        raise _Rejected(
            f"record is {raw:,} bytes, over max_record_bytes ({limit:,}): split the record "
            "or raise max_record_bytes"
        )
    if lineno == 1 and raw.startswith(BOM):
        raw = raw[len(BOM) :]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Rejected(
            f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
        ) from None
    if not text.strip():
        return None
    try:
        obj = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise _Rejected(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise _Rejected("invalid JSON (nested too deeply)") from None
    except ValueError as exc:  # NaN/Infinity, or an integer of thousands of digits
        raise _Rejected(f"invalid JSON ({str(exc)[:80]})") from None
    if not isinstance(obj, dict):
        raise _Rejected(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def parse_json_object(raw: bytes, what: str = "request body") -> dict[str, Any]:
    """A JSON object from ``raw`` by the loader's rules (UTF-8, standard JSON only, bounded
    nesting); ``DataError`` naming the problem otherwise."""
    try:
        obj = _json_object(raw, 1, len(raw))
    except _Rejected as exc:  # _json_object turns deep nesting into one too
        raise DataError(f"{what}: {exc}") from None
    if obj is None:
        raise DataError(f"{what} is empty: send a JSON object")
    return obj


def _jsonl_records(
    path: Path, workload_id: str | None, client_id: str | None, report: LoadReport, limit: int
) -> Iterator[tuple[int, dict[str, Any] | _Rejected | None]]:
    derived = client_id or client_id_from_path(path)
    with path.open("rb") as fh:
        for lineno, raw in _read_lines(fh, limit):
            try:
                obj = _json_object(raw, lineno, limit)
                if obj is None:
                    yield lineno, None
                    continue
                yield lineno, record_from_object(obj, workload_id, client_id, derived, report)
            except _Rejected as exc:
                yield lineno, exc
            except RecursionError:
                yield lineno, _Rejected("record nested too deeply")


def record_from_object(
    obj: dict[str, Any],
    workload_id: str | None,
    client_id: str | None,
    derived: str | None,
    report: LoadReport,
) -> dict[str, Any]:
    """One parsed JSON object -- a log record or a conversation -- as a validated log record.

    ``workload_id``/``client_id`` override the object's; ``derived`` is the client id of a
    row that has none. Raises ``_Rejected`` naming the field at fault.
    """
    if "workload_id" in obj or "request" in obj:
        report.source_format = report.source_format or "log"
        record = _from_log_row(obj, workload_id, client_id, derived)
    elif "messages" in obj:
        report.source_format = report.source_format or "conversation"
        record = _from_conversation(obj, workload_id or derived, client_id or derived)
    else:
        raise _Rejected(
            "not a log record (no workload_id/request) nor a conversation (no messages)"
        )
    return _validated(record)


def _csv_lines(fh, report: LoadReport, limit: int) -> Iterator[str]:
    """The file's lines for csv, counting blank ones (csv skips them); an over-long line is
    cut to ``limit`` characters plus a marker the row check rejects."""
    for line in fh:
        if not line.strip():
            report.blank += 1
        yield line if len(line) <= limit else line[:limit] + _TOO_LONG + "\n"


_TOO_LONG = "\x00findistil-over-max-record-bytes"


def _csv_row_problem(row: dict[str | None, Any], columns: list[str], lineno: int) -> str | None:
    """Why a CSV row cannot be a record, or None."""
    values = [v for key, v in row.items() if key is not None and v is not None]
    if any(_TOO_LONG in v for v in values):
        return "row over max_record_bytes: split it or raise max_record_bytes"
    if any("\n" in v or "\r" in v for v in values):
        return f"a quoted field runs over several lines up to line {lineno} (unterminated quote?)"
    if None in row or len(values) < len(columns):
        got = len(values) + len(row.get(None) or [])
        return f"{got} fields, expected {len(columns)}"
    try:
        "".join(values).encode("utf-8")
    except UnicodeEncodeError:
        return "not UTF-8 text"
    return None


def _csv_records(
    path: Path, workload_id: str | None, client_id: str | None, report: LoadReport, limit: int
) -> Iterator[tuple[int, dict[str, Any] | _Rejected | None]]:
    report.source_format = "headline-csv"
    workload = workload_id or taxonomy.WORKLOAD_ID
    client = client_id or client_id_from_path(path)
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        reader = csv.DictReader(_csv_lines(fh, report, limit))
        columns = [c.strip() for c in reader.fieldnames or []]
        reader.fieldnames = columns
        label_col = "teacher_label" if "teacher_label" in columns else "label"
        if "headline" not in columns or label_col not in columns:
            raise DataError(
                f"{path}:1: a headline CSV needs the columns headline and label (or "
                f"teacher_label); found {', '.join(columns) or 'no header'}"
            )
        for row in reader:
            lineno = reader.line_num
            try:
                yield lineno, _csv_record(row, columns, label_col, lineno, workload, client)
            except _Rejected as exc:
                yield lineno, exc


def _csv_record(row, columns, label_col, lineno, workload, client) -> dict[str, Any]:
    problem = _csv_row_problem(row, columns, lineno)
    if problem:
        raise _Rejected(problem)
    headline = (row.get("headline") or "").strip()
    label = (row.get(label_col) or "").strip()
    if not headline:
        raise _Rejected("empty headline")
    try:
        record = headline_record(headline, label, workload, client)
    except ValueError:
        raise _Rejected(
            f"unknown label {label!r} in column {label_col}: use one of the 13 classes "
            f"({', '.join(taxonomy.LABELS)})"
        ) from None
    if row.get("id"):
        record["source_id"] = row["id"]
    return _validated(record)


def load_file(
    path: str | Path,
    store: LogStore,
    *,
    workload_id: str | None = None,
    client_id: str | None = None,
    replace: bool = False,
    progress: ProgressFn = no_progress,
    max_record_bytes: int = MAX_RECORD_BYTES,
    redact_pii: bool = False,
) -> LoadReport:
    """Load one JSONL or CSV file into ``store``.

    Args:
        path: ``.csv`` = headline CSV; anything else is read as JSONL (log or conversation rows).
        workload_id, client_id: override/set the ids of every record (see module docstring).
        replace: empty each workload/client the file writes to first, in the same transaction.
        progress: receives ``Progress("load", lines_read, lines_total, {loaded, rejected})``.
        max_record_bytes: a longer line (or CSV row) is rejected, read without being held.
        redact_pii: replace e-mails, phones, cards, IBANs and SSNs in request and response
            text by typed placeholders before storing (counts in ``report.redacted``).

    Returns:
        a LoadReport; rejected lines are listed as ``file:line: reason``. A missing,
        unreadable or empty file, a directory or a FIFO raises DataError instead.

    Example: ``load_file("logs.jsonl", store, client_id="app-1").loaded``.
    """
    path = Path(path)
    _check_readable(path)
    report = LoadReport()
    total = _count_lines(path)
    reader = _csv_records if path.suffix.lower() == ".csv" else _jsonl_records
    items = reader(path, workload_id, client_id, report, max_record_bytes)
    at_line = lambda lineno: f"{path}:{lineno}"  # noqa: E731
    last = _store_items(items, store, report, replace, redact_pii, progress, total, at_line)
    progress(Progress("load", max(last, total), max(last, total), _info(report)))
    return report


def _store_items(
    items: Iterable[tuple[int, dict[str, Any] | _Rejected | None]],
    store: LogStore,
    report: LoadReport,
    replace: bool,
    redact_pii: bool,
    progress: ProgressFn,
    total: int,
    where: Callable[[int], str],
    finish: Callable[[LogWriter], None] | None = None,
) -> int:
    """Write each record of ``items`` (position, record | rejection | None for blank) in one
    transaction, counting every item in ``report``; ``where(position)`` names a rejected
    item; ``finish(writer)`` runs last in the transaction. Returns the last position seen."""
    position = 0
    with store.writer(replace=replace) as writer:
        for position, item in items:
            if item is None:
                report.blank += 1
            elif isinstance(item, _Rejected):
                report.reject(where(position), str(item))
            else:
                if redact_pii:
                    report.redacted.update(redact_record(item))
                writer.add(item)
                report.loaded += 1
                key = (item["workload_id"], item["client_id"])
                report.targets[key] = report.targets.get(key, 0) + 1
            if report.lines % PROGRESS_EVERY == 0:
                progress(Progress("load", position, total, _info(report)))
        report.replaced = writer.deleted
        if finish is not None:
            finish(writer)
    return position


def load_objects(
    objects: Sequence[Any],
    store: LogStore,
    *,
    workload_id: str | None = None,
    client_id: str | None = None,
    max_record_bytes: int = MAX_RECORD_BYTES,
    redact_pii: bool = False,
    names: Sequence[str] | None = None,
    report: LoadReport | None = None,
    finish: Callable[[LogWriter], None] | None = None,
) -> LoadReport:
    """Store a batch of parsed JSON values (``POST /api/logs``, an Elasticsearch page), each
    a log record or a conversation, with the file loader's checks, in one transaction.

    Args:
        names: what a rejection is called (default: the value's index in ``objects``).
        report: counts add up into this one (default: a new report).
        finish: runs last inside the transaction (an import writes its cursor there).

    Example: ``load_objects([record], store).loaded == 1``.
    """
    report = report if report is not None else LoadReport()
    where = (lambda i: names[i]) if names is not None else str

    def items() -> Iterator[tuple[int, dict[str, Any] | _Rejected]]:
        for index, obj in enumerate(objects):
            try:
                yield index, _object_record(obj, workload_id, client_id, report, max_record_bytes)
            except _Rejected as exc:
                yield index, exc

    total = len(objects)
    _store_items(items(), store, report, False, redact_pii, no_progress, total, where, finish)
    return report


def _object_record(obj, workload_id, client_id, report, limit) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise _Rejected(f"expected a JSON object, got {type(obj).__name__}")
    try:
        size = len(json.dumps(obj, ensure_ascii=False, allow_nan=False).encode("utf-8", "replace"))
    except RecursionError:
        raise _Rejected("record nested too deeply") from None
    if size > limit:
        raise _Rejected(
            f"record is {size:,} bytes, over max_record_bytes ({limit:,}): split the record "
            "or raise max_record_bytes"
        )
    try:
        return record_from_object(dict(obj), workload_id, client_id, None, report)
    except RecursionError:
        raise _Rejected("record nested too deeply") from None


def _check_readable(path: Path) -> None:
    """One clear file-level error for a path that is not a readable, non-empty file."""
    if not path.exists():
        raise DataError(f"{path} does not exist: give the path of a .jsonl or .csv file")
    if path.is_dir():
        raise DataError(f"{path} is a directory: give the path of a .jsonl or .csv file in it")
    if not path.is_file():
        raise DataError(f"{path} is not a regular file (a FIFO or device?): copy it to a file")
    try:
        with path.open("rb") as fh:
            empty = not fh.read(1)
    except OSError as exc:
        raise DataError(f"{path} cannot be read ({exc.strerror}): check its permissions") from None
    if empty:
        raise DataError(f"{path} is empty: nothing to load")


def _info(report: LoadReport) -> dict[str, int]:
    return {"loaded": report.loaded, "rejected": report.rejected}


def demo_path() -> Path:
    """The packaged synthetic demo log (``findistil/data/demo_headlines.csv``)."""
    return Path(str(resources.files("findistil") / "data" / DEMO_FILE))


def load_demo(
    store: LogStore,
    *,
    records: int | None = None,
    client_id: str = "demo",
    replace: bool = False,
    progress: ProgressFn = no_progress,
) -> LoadReport:
    """Load the built-in demo headlines as workload ``news_classifier``, client ``client_id``.

    ``records=N`` loads a seeded, class-stratified subset of N rows (same N -> same rows).
    """
    path = demo_path()
    if records is None:
        return load_file(path, store, client_id=client_id, replace=replace, progress=progress)
    with path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if records < 1 or records > len(rows):
        raise DataError(f"--records must be between 1 and {len(rows)} (the demo log's size)")
    keep = _stratified_subset(rows, records, seed=0)
    report = LoadReport(source_format="headline-csv")
    with store.writer(replace=replace) as writer:
        for i in keep:
            row = rows[i]
            writer.add(
                _validated(
                    headline_record(row["headline"], row["label"], taxonomy.WORKLOAD_ID, client_id)
                )
            )
            report.loaded += 1
        report.replaced = writer.deleted
    report.targets[(taxonomy.WORKLOAD_ID, client_id)] = report.loaded
    progress(Progress("load", report.loaded, report.loaded, _info(report)))
    return report


def _stratified_subset(rows: list[dict[str, str]], n: int, seed: int) -> list[int]:
    """Indices of ``n`` rows with the class shares of ``rows`` (largest remainders), sorted."""
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_class[row["label"]].append(i)
    rng = random.Random(seed)
    quotas = {c: n * len(ix) / len(rows) for c, ix in by_class.items()}
    take = {c: int(q) for c, q in quotas.items()}
    order = sorted(by_class, key=lambda c: (-(quotas[c] - take[c]), c))
    for c in order[: n - sum(take.values())]:
        take[c] += 1
    keep: list[int] = []
    for c in sorted(by_class):
        ix = list(by_class[c])
        rng.shuffle(ix)
        keep.extend(ix[: take[c]])
    return sorted(keep)
