"""Hostile input to the loaders: every bad line is a counted ``file:line: reason`` rejection,
every good line around it is stored, and nothing raises but a clear file-level DataError."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from findistil import taxonomy
from findistil.errors import DataError
from findistil.loaders import load_file
from findistil.logstore import LogStore
from tests.test_loaders import log_line


@pytest.fixture
def store(tmp_path):
    with LogStore(f"sqlite:///{tmp_path / 'logs.db'}") as s:
        yield s


def _with_timestamp(value: str) -> bytes:
    return log_line(0).replace('"timestamp": 1700000000', f'"timestamp": {value}').encode()


def _content(text: str) -> bytes:
    """A good record whose user message is the raw JSON string text ``text``."""
    return log_line(0).replace('"q0"', f'"{text}"').encode()


BAD_LINES = [
    (b"\xff\xfe\x00binary garbage", "not UTF-8 text (byte 0xff at column 1)"),
    (log_line(0).encode().replace(b'"q0"', b'"caf\xe9"'), "not UTF-8 text (byte 0xe9"),
    (_with_timestamp("1e30"), "timestamp: Value error, must be Unix seconds between 1970 and 2100"),
    (_with_timestamp(str(2**70)), "between 1970 and 2100"),
    (_with_timestamp("1700000000000"), "milliseconds? divide by 1000"),
    (_with_timestamp("-5"), "between 1970 and 2100"),
    (_with_timestamp("true"), "must be Unix seconds (a number), got bool"),
    (_with_timestamp('"yesterday"'), "got str"),
    (_with_timestamp("Infinity"), "Infinity is not standard JSON"),
    (_with_timestamp("NaN"), "NaN is not standard JSON"),
    (_with_timestamp("9" * 5000), "invalid JSON (Exceeds the limit"),
    (b"[" * 200_000, "nested too deeply"),
    (_content("\\ud800"), "lone surrogate"),
    (_content("a\\u0000b"), "NUL character"),
    (_content("x" * (2 << 20)), "over max_record_bytes (1,048,576)"),
    (b'{"workload_id": "w"', "invalid JSON"),
]


def test_each_bad_line_is_rejected_and_every_good_line_kept(tmp_path, store):
    good = [log_line(i).encode() for i in range(1, len(BAD_LINES) + 2)]
    lines = [good[0]]
    for (bad, _), ok in zip(BAD_LINES, good[1:], strict=True):
        lines += [bad, ok]
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n\n")  # and one blank line at the end
    report = load_file(path, store)
    assert report.loaded == len(good) and store.count("w", "c") == len(good)
    assert report.rejected == len(BAD_LINES) and report.blank == 1
    assert report.lines == len(lines) + 1
    reasons = dict(e.split(": ", 1) for e in report.errors)
    for i, (_, expected) in enumerate(BAD_LINES):
        assert expected in reasons[f"{path}:{2 * i + 2}"], (i, reasons[f"{path}:{2 * i + 2}"])
    for record in store.iter_records("w", "c"):
        json.dumps(record, allow_nan=False).encode("utf-8")  # only standard JSON stored


def test_byte_order_mark_is_accepted(tmp_path, store):
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + log_line(1).encode() + b"\n" + log_line(2).encode())
    assert load_file(jsonl, store).loaded == 2
    csv_file = tmp_path / "bom.csv"
    csv_file.write_bytes(b"\xef\xbb\xbfheadline,label\nAcme beats estimates,Earnings\n")
    report = load_file(csv_file, store)
    assert report.loaded == 1 and report.rejected == 0


def test_csv_rows_short_unterminated_undecodable_and_blank(tmp_path, store):
    path = tmp_path / "rows.csv"
    path.write_bytes(
        b"headline,label\n"
        b"Acme beats estimates,Earnings\n"
        b"a short row\n"
        b"\n"
        b"Caf\xe9 chain cuts dividend,Dividends\n"
        b'"Unclosed quote,Earnings\n'
        b"Swallowed line,Earnings\n"
    )
    report = load_file(path, store)
    assert report.loaded == 1 and report.rejected == 3 and report.blank == 1
    reasons = dict(e.split(": ", 1) for e in report.errors)
    assert reasons[f"{path}:3"] == "1 fields, expected 2"
    assert reasons[f"{path}:5"] == "not UTF-8 text"
    assert "runs over several lines up to line 7" in reasons[f"{path}:7"]


def test_csv_row_over_the_size_limit(tmp_path, store):
    path = tmp_path / "big.csv"
    path.write_text(f"headline,label\n{'x' * 5000},Earnings\nFine headline,Earnings\n")
    report = load_file(path, store, max_record_bytes=1024)
    assert report.loaded == 1 and report.rejected == 1
    assert "over max_record_bytes" in report.errors[0] and f"{path}:2" in report.errors[0]


def test_file_level_problems_are_one_clear_error(tmp_path, store):
    with pytest.raises(DataError, match="is a directory"):
        load_file(tmp_path, store)
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="not a regular file"):
        load_file(fifo, store)
    for name in ("empty.jsonl", "empty.csv"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(DataError, match="is empty: nothing to load"):
            load_file(tmp_path / name, store)
    with pytest.raises(DataError, match="does not exist"):
        load_file(tmp_path / "missing.jsonl", store)


line_bytes = st.binary(max_size=200).filter(lambda b: b"\n" not in b)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(noise=st.lists(line_bytes, max_size=12))
def test_any_bytes_in_leave_stored_plus_rejected_plus_blank_equal_lines(tmp_path, noise):
    path = tmp_path / "noise.jsonl"
    lines = [log_line(1).encode(), *noise, log_line(2).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    with LogStore(f"sqlite:///{tmp_path / 'noise.db'}") as store:
        report = load_file(path, store, replace=True)
        assert report.lines == len(lines)
        assert report.loaded == store.count("w", "c") >= 2


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.none(), st.text(max_size=300)))
def test_label_parser_takes_any_text(text):
    parsed = taxonomy.parse_label(text)
    assert parsed.label in taxonomy.LABELS


@pytest.mark.parametrize(
    "args", [["logs"], ["logs", "load", "--demo"], ["serve", "--port", "1"], ["worker"]]
)
def test_unwritable_home_is_one_line_and_exit_2(tmp_path, args):
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    env = {**os.environ, "FINDISTIL_HOME": str(blocker / "home")}
    env.pop("FINDISTIL_DATABASE_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "findistil.cli", *args],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert f"cannot create {blocker / 'home'}" in done.stderr.replace("\n", "")
    assert "FINDISTIL_HOME" in done.stderr
