"""Loaders and the `findistil load` / `logs` commands, against a real SQLite store."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from findistil import taxonomy
from findistil.cli import app
from findistil.config import load_settings
from findistil.errors import DataError
from findistil.loaders import client_id_from_path, demo_path, load_demo, load_file
from findistil.logstore import LogStore, open_logstore
from findistil.progress import Progress


@pytest.fixture
def store(tmp_path):
    with LogStore(f"sqlite:///{tmp_path / 'logs.db'}") as s:
        yield s


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def log_line(i: int, **over) -> str:
    rec = {
        "timestamp": 1_700_000_000 + i,
        "workload_id": "w",
        "client_id": "c",
        "request": {"messages": [{"role": "user", "content": f"q{i}"}]},
        "response": {"choices": [{"message": {"role": "assistant", "content": "[[earnings]]"}}]},
    }
    rec.update(over)
    return json.dumps(rec)


def test_upstream_500_exactly(benchmark_dir, store):
    path = benchmark_dir / "upstream_news_classifier_500.jsonl"
    events: list[Progress] = []
    report = load_file(path, store, progress=events.append)
    assert (report.loaded, report.rejected, report.errors) == (500, 0, [])
    assert report.source_format == "log"
    originals = [json.loads(line) for line in path.read_text().splitlines()]
    ((wid, cid),) = {(r["workload_id"], r["client_id"]) for r in originals}
    assert store.workloads() == [(wid, cid, 500)]
    stored = list(store.iter_records(wid, cid))
    key = lambda r: json.dumps(r["request"], sort_keys=True)  # noqa: E731
    assert sorted(stored, key=key) == sorted(originals, key=key)
    # byte-for-byte equivalent JSON: the serialised request/response are identical text
    by_req = {json.dumps(r["request"]): json.dumps(r["response"]) for r in originals}
    assert all(by_req[json.dumps(r["request"])] == json.dumps(r["response"]) for r in stored)
    assert events[-1].done == events[-1].total == 500
    assert events[-1].info == {"loaded": 500, "rejected": 0}


def test_ids_overridden(tmp_path, store):
    path = write(tmp_path / "logs.jsonl", [log_line(i) for i in range(3)])
    report = load_file(path, store, workload_id="w2", client_id="c2")
    assert report.loaded == 3 and store.count("w2", "c2") == 3 and store.count("w", "c") == 0


def test_bad_lines_rejected_with_file_line_and_reason(tmp_path, store):
    lines = [
        log_line(0),
        "{not json",
        "[1, 2]",
        log_line(3, request={"messages": []}),  # empty messages
        log_line(4, timestamp="yesterday"),  # wrong type
        json.dumps({"foo": 1}),  # neither shape
        "",  # blank: not a record
        log_line(7, response={"choices": [{"text": "x"}]}),  # no message
        json.dumps({"messages": [{"role": "user", "content": "only a prompt"}]}),
        log_line(9),
    ]
    path = write(tmp_path / "mixed.jsonl", lines)
    report = load_file(path, store)
    non_blank = sum(1 for line in lines if line.strip())
    assert report.lines == len(lines) == report.loaded + report.rejected + report.blank
    assert report.loaded + report.rejected == non_blank and report.blank == 1
    assert (report.loaded, report.rejected) == (2, 7)
    assert store.count("w", "c") == 2
    assert [e.split(": ", 1)[0] for e in report.errors] == [
        f"{path}:{n}" for n in (2, 3, 4, 5, 6, 8, 9)
    ]
    reasons = dict(e.split(": ", 1) for e in report.errors)
    assert "invalid JSON" in reasons[f"{path}:2"]
    assert "JSON object" in reasons[f"{path}:3"]
    assert "request.messages" in reasons[f"{path}:4"]
    assert "timestamp" in reasons[f"{path}:5"]
    assert "conversation" in reasons[f"{path}:6"]
    assert "response.choices.0.message" in reasons[f"{path}:8"]
    assert "at least 2 messages" in reasons[f"{path}:9"]


def test_conversation_rows_converted(tmp_path, store):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    msgs = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
    ]
    path = write(
        tmp_path / "My Chats.jsonl",
        [json.dumps({"messages": msgs, "tools": tools}), json.dumps({"messages": msgs[1:]})],
    )
    report = load_file(path, store)
    assert report.loaded == 2 and report.source_format == "conversation"
    assert store.workloads() == [("my-chats", "my-chats", 2)]
    recs = list(store.iter_records("my-chats", "my-chats"))
    first = next(r for r in recs if "tools" in r["request"])
    assert first["request"] == {"messages": msgs[:2], "tools": tools}
    assert first["response"] == {"choices": [{"message": msgs[2]}]}


def test_headline_csv(tmp_path, store):
    path = tmp_path / "Teacher_Run-1.csv"
    path.write_text(
        "id,headline,teacher_label\n"
        "h1,Acme beats Q3 EPS estimates,Earnings\n"
        'h2,"Acme, Inc. raises dividend",dividends\n'
        "h3,Something odd,Weather\n"
        "h4,,Earnings\n"
        "h5,Acme names new CFO,Labor Issues\n"
        "h6,too,many,fields\n",
        encoding="utf-8",
    )
    report = load_file(path, store)
    assert (report.loaded, report.rejected) == (3, 3)
    assert client_id_from_path(path) == "teacher-run-1"
    assert store.count(taxonomy.WORKLOAD_ID, "teacher-run-1") == 3
    assert [e.split(": ", 1)[0] for e in report.errors] == [f"{path}:{n}" for n in (4, 5, 7)]
    assert "unknown label 'Weather'" in report.errors[0]
    assert "empty headline" in report.errors[1]
    recs = {r["source_id"]: r for r in store.iter_records(taxonomy.WORKLOAD_ID, "teacher-run-1")}
    assert recs["h2"]["request"]["messages"] == taxonomy.build_messages(
        "Acme, Inc. raises dividend"
    )
    assert recs["h2"]["response"]["choices"][0]["message"]["content"] == "[[dividends]]"
    assert recs["h5"]["response"]["choices"][0]["message"]["content"] == "[[labour issues]]"


def test_csv_without_needed_columns(tmp_path, store):
    path = write(tmp_path / "x.csv", ["title,label", "a,Earnings"])
    with pytest.raises(DataError, match="headline and label"):
        load_file(path, store)


def test_missing_file(tmp_path, store):
    with pytest.raises(DataError, match="does not exist"):
        load_file(tmp_path / "nope.jsonl", store)


def test_append_then_replace(tmp_path, store):
    path = write(tmp_path / "logs.jsonl", [log_line(i) for i in range(4)])
    load_file(path, store)
    load_file(path, store)
    assert store.count("w", "c") == 8  # appends: duplicates are curation's job
    load_file(write(tmp_path / "other.jsonl", [log_line(0, client_id="keep")]), store)
    report = load_file(write(tmp_path / "new.jsonl", [log_line(9)]), store, replace=True)
    assert report.replaced == 8
    assert store.count("w", "c") == 1 and store.count("w", "keep") == 1


def test_replace_with_rejected_lines_still_swaps_atomically(tmp_path, store):
    load_file(write(tmp_path / "a.jsonl", [log_line(i) for i in range(3)]), store)
    report = load_file(write(tmp_path / "b.jsonl", [log_line(7), "oops"]), store, replace=True)
    assert (report.loaded, report.rejected) == (1, 1)
    assert [r["timestamp"] for r in store.iter_records("w", "c")] == [1_700_000_007]


def test_large_file_streams_in_batches(tmp_path, store):
    n = 2500
    path = write(tmp_path / "big.jsonl", [log_line(i) for i in range(n)])
    events: list[Progress] = []
    report = load_file(path, store, progress=events.append)
    assert report.loaded == n and store.count("w", "c") == n
    assert len(events) >= 5 and all(e.total == n for e in events)
    assert [e.done for e in events] == sorted(e.done for e in events)


def test_demo_full_and_subset(store):
    total = sum(1 for _ in demo_path().open()) - 1
    report = load_demo(store)
    assert report.loaded == total and report.rejected == 0
    assert store.workloads() == [(taxonomy.WORKLOAD_ID, "demo", total)]
    sub = load_demo(store, records=130, client_id="small")
    assert sub.loaded == 130
    labels = [
        taxonomy.parse_label(r["response"]["choices"][0]["message"]["content"]).label
        for r in store.iter_records(taxonomy.WORKLOAD_ID, "small")
    ]
    full = [
        taxonomy.parse_label(r["response"]["choices"][0]["message"]["content"]).label
        for r in store.iter_records(taxonomy.WORKLOAD_ID, "demo")
    ]
    for label in set(full):  # stratified: each class within one row of its exact share
        assert abs(labels.count(label) - 130 * full.count(label) / total) < 1
    before = {
        r["request"]["messages"][1]["content"]
        for r in store.iter_records(taxonomy.WORKLOAD_ID, "small")
    }
    load_demo(store, records=130, client_id="small", replace=True)
    after = [
        r["request"]["messages"][1]["content"]
        for r in store.iter_records(taxonomy.WORKLOAD_ID, "small")
    ]
    assert len(after) == 130 and set(after) == before  # replaced, same seeded subset
    with pytest.raises(DataError, match="--records"):
        load_demo(store, records=0)


# ------------------------------------------------------------------------------------- CLI
runner = CliRunner()


def test_cli_load_logs_and_exit_codes(tmp_path):
    good = write(tmp_path / "good.jsonl", [log_line(i) for i in range(3)])
    result = runner.invoke(app, ["load", str(good)])
    assert result.exit_code == 0, result.output
    assert "loaded 3, rejected 0" in result.output
    bad = write(tmp_path / "bad.jsonl", [log_line(5), "{broken"])
    result = runner.invoke(app, ["load", str(bad), "--client-id", "c9"])
    assert result.exit_code == 2
    assert "loaded 1, rejected 1" in result.output
    assert f"{bad}:2: invalid JSON" in result.output.replace("\n", "")
    with open_logstore(load_settings()) as store:
        assert store.workloads() == [("w", "c", 3), ("w", "c9", 1)]
    result = runner.invoke(app, ["load", str(good), "--replace", "--workload-id", "w"])
    assert result.exit_code == 0 and "replaced 3 old records" in result.output
    result = runner.invoke(app, ["logs"])
    assert result.exit_code == 0
    assert "c9" in result.output and "│       1 │" in result.output


def test_cli_demo_and_usage_errors(tmp_path):
    result = runner.invoke(app, ["load", "--demo", "--records", "60"])
    assert result.exit_code == 0, result.output
    with open_logstore(load_settings()) as store:
        assert store.count(taxonomy.WORKLOAD_ID, "demo") == 60
    assert runner.invoke(app, ["load"]).exit_code == 2  # neither FILE nor --demo
    result = runner.invoke(app, ["logs"])
    assert "news_classifier" in result.output


def test_cli_noun_groups_json_and_aliases(tmp_path):
    good = write(tmp_path / "good.jsonl", [log_line(i) for i in range(4)])
    result = runner.invoke(app, ["logs", "load", str(good), "--client-id", "k"])
    assert result.exit_code == 0 and "loaded 4, rejected 0" in result.output
    expected = {"workloads": [{"workload_id": "w", "client_id": "k", "records": 4}]}
    for args in (["logs", "--json"], ["logs", "list", "--json"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and json.loads(result.output) == expected
    result = runner.invoke(app, ["logs", "curate", "--workload-id", "w", "--client-id", "k"])
    assert isinstance(result.exception, DataError)  # too few records: says what to run
    assert "findistil logs load" in str(result.exception)
    helped = runner.invoke(app, ["--help"], terminal_width=100).output
    assert "logs" in helped and "models" in helped
    assert re.search(r"load .*\(deprecated\)", helped)
    assert "Alias of `findistil logs load`" in helped
    result = runner.invoke(app, ["models", "list", "--json"])
    models = {m["model_id"]: m for m in json.loads(result.output)["models"]}
    assert models["sentence-transformers/all-MiniLM-L6-v2"]["installed"] is True
    table = runner.invoke(app, ["models", "list"], terminal_width=80).output
    assert "│ sentence-transformers/all-MiniLM-L6-v2 │ wheel" in table and "…" not in table
