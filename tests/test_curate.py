"""Curation: upstream's steps and messages, the stratified split with issue 2's fixes, files."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
from typer.testing import CliRunner

from findistil.cli import app
from findistil.config import DataSplitConfig, load_settings
from findistil.curate import (
    TOOL_CALLING,
    class_of,
    curate_records,
    curate_workload,
    detect_workload_type,
    val_size,
)
from findistil.errors import DataError
from findistil.loaders import load_demo
from findistil.logstore import LogStore, open_logstore

# 13 classes, unbalanced like the real traffic (shares in percent)
SHARES = {
    "other": 16,
    "stock price movement": 14,
    "earnings": 12,
    "price targets": 11,
    "analyst rating": 9,
    "guidance": 8,
    "mergers and acquisitions": 8,
    "products-services": 7,
    "regulatory": 5,
    "labour issues": 4,
    "dividends": 3,
    "product approval": 2,
    "credit ratings": 1,
}


def rec(i: int, label: str, text: str | None = None) -> dict:
    return {
        "workload_id": "w",
        "client_id": "c",
        "timestamp": 10_000 - i,  # list order = newest first, as the store returns them
        "request": {"messages": [{"role": "user", "content": text or f"headline {i}"}]},
        "response": {"choices": [{"message": {"role": "assistant", "content": f"[[{label}]]"}}]},
    }


def records_for(n: int) -> list[dict]:
    labels = [c for c, share in SHARES.items() for _ in range(share)]
    return [rec(i, labels[(i * 7) % len(labels)]) for i in range(n)]


def by_class(rows: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for row in rows:
        label = class_of(row) if "request" in row else class_of(_as_record(row))
        out[label] = out.get(label, 0) + 1
    return out


def _as_record(row: dict) -> dict:
    return {"response": {"choices": [{"message": row["messages"][-1]}]}}


@pytest.mark.parametrize(
    ("n", "eval_size", "val_ratio", "expected"),
    [
        (100, 5, 0.1, (5, 10, 85)),
        (200, 20, 0.15, (20, 27, 153)),
        (5000, 100, 0.1, (100, 490, 4410)),
    ],
)
def test_pinned_split_sizes(n, eval_size, val_ratio, expected):
    split = DataSplitConfig(eval_size=eval_size, val_ratio=val_ratio)
    data = curate_records(records_for(n), split)
    assert (len(data.eval_rows), len(data.val_rows), len(data.train_rows)) == expected
    assert (data.counts["eval"], data.counts["val"], data.counts["train"]) == expected


@pytest.mark.parametrize(("n", "eval_size", "val_ratio"), [(200, 20, 0.15), (5000, 100, 0.1)])
def test_stratification_within_one_record(n, eval_size, val_ratio):
    data = curate_records(records_for(n), DataSplitConfig(eval_size=eval_size, val_ratio=val_ratio))
    total = data.class_counts["selected"]
    ev, va, tr = data.class_counts["eval"], data.class_counts["val"], data.class_counts["train"]
    assert by_class(data.eval_rows) == ev and by_class(data.val_rows) == va
    rest = {c: total[c] - ev.get(c, 0) for c in total}
    for c, size in total.items():
        assert abs(ev.get(c, 0) - eval_size * size / n) < 1, c
        assert abs(va.get(c, 0) - len(data.val_rows) * rest[c] / (n - eval_size)) < 1, c
        assert ev.get(c, 0) + va.get(c, 0) + tr.get(c, 0) == size
        if size >= 3:
            assert tr.get(c, 0) >= 1, c


def test_every_class_with_three_records_trains_even_when_eval_is_large():
    recs = [rec(i, "big") for i in range(60)] + [rec(100 + i, f"small{i % 5}") for i in range(15)]
    data = curate_records(recs, DataSplitConfig(eval_size=30, val_ratio=0.5, min_total_records=10))
    assert set(data.class_counts["train"]) == {"big"} | {f"small{k}" for k in range(5)}


def test_singleton_classes_and_val_ratio_zero():
    recs = records_for(80) + [rec(500, "lonely one"), rec(501, "lonely two")]
    data = curate_records(recs, DataSplitConfig(eval_size=20, val_ratio=0.0))
    assert data.val_rows == []
    assert len(data.eval_rows) == 20 and len(data.train_rows) == 62
    single = records_for(80) + [rec(500, "only one")]  # a lone "others" stratum of one
    data = curate_records(single, DataSplitConfig(eval_size=13, val_ratio=0.2))
    assert data.counts["eval"] + data.counts["val"] + data.counts["train"] == 81


def test_unknown_class_and_brackets():
    assert class_of(rec(0, "[ Earnings ]")) == "earnings"
    r = rec(0, "x")
    r["response"]["choices"][0]["message"]["content"] = "no brackets here"
    assert class_of(r) == "unknown"


def test_eval_smaller_than_class_count_falls_back_to_random_and_no_stratify():
    data = curate_records(records_for(100), DataSplitConfig(eval_size=5, val_ratio=0.1))
    assert len(data.eval_rows) == 5
    data = curate_records(
        records_for(100), DataSplitConfig(eval_size=30, val_ratio=0.1, stratify_enabled=False)
    )
    assert (data.counts["eval"], data.counts["val"], data.counts["train"]) == (30, 7, 63)


def test_val_size_has_no_float_noise():
    assert 100 * 0.07 > 7  # the trap: a plain ceil would give 8
    assert val_size(100, 0.07) == 7
    assert val_size(180, 0.15) == 27
    assert val_size(95, 0.1) == 10
    assert val_size(4900, 0.1) == 490
    assert val_size(10, 0.0) == 0
    assert val_size(3, 0.9) == 2  # leaves one to train on
    assert val_size(181, 0.15) == math.ceil(181 * 0.15)


def test_counters_filters_and_dedup_newest_wins():
    recs = records_for(70)
    recs.insert(0, rec(-1, "guidance", text="headline 5"))  # newer duplicate of record 5
    bad = rec(900, "earnings")
    bad["request"]["messages"] = []
    no_choice = rec(901, "earnings")
    no_choice["response"]["choices"] = [{"text": "x"}]
    recs += [bad, no_choice]
    data = curate_records(recs, DataSplitConfig(eval_size=13, min_total_records=50))
    assert data.counts == {
        "total": 73,
        "invalid_format": 2,
        "quality_filtered": 0,
        "duplicates": 1,
        "selected": 70,
        "eval": 13,
        "train": 51,
        "val": 6,
    }
    kept = [r for r in data.eval_rows if r["request"]["messages"][0]["content"] == "headline 5"]
    kept += [
        {"response": {"choices": [{"message": r["messages"][-1]}]}, "timestamp": None}
        for r in data.train_rows + data.val_rows
        if r["messages"][0]["content"] == "headline 5"
    ]
    assert len(kept) == 1 and class_of(kept[0]) == "guidance"


def test_limit_samples_seeded():
    split = DataSplitConfig(eval_size=10, limit=120, min_total_records=50)
    a = curate_records(records_for(400), split)
    b = curate_records(records_for(400), split)
    assert a.counts["selected"] == 120 and a.manifest == b.manifest
    c = curate_records(records_for(400), split.model_copy(update={"random_seed": 7}))
    assert c.manifest["content_sha256"] != a.manifest["content_sha256"]


def test_error_messages():
    with pytest.raises(DataError, match=r"A minimum of 50 records is required, but only 49"):
        curate_records(records_for(49), DataSplitConfig(eval_size=5))
    dupes = records_for(40) + [rec(100 + i, "other", text=f"headline {i}") for i in range(40)]
    with pytest.raises(DataError, match=r"Insufficient valid records. Found 40 but need 50"):
        curate_records(dupes, DataSplitConfig(eval_size=5))
    # eval_size is checked after dedup: 80 raw records pass, 40 unique ones do not
    split = DataSplitConfig(eval_size=60, min_total_records=20)
    with pytest.raises(DataError, match=r"eval_size is 60, but only 40 records remain"):
        curate_records(dupes, split)
    split = DataSplitConfig(eval_size=60, min_total_records=50, limit=50)
    with pytest.raises(DataError, match=r"only 50 records remain .*80 found, limit 50"):
        curate_records(records_for(80), split)
    with pytest.raises(Exception, match="workload_type"):
        curate_records(records_for(60), DataSplitConfig(eval_size=5), workload_type="chat")


def test_files_written_and_byte_identical(tmp_path):
    split = DataSplitConfig(eval_size=20, val_ratio=0.15)
    recs = records_for(200)
    a = curate_records(recs, split, out_dir=tmp_path / "a", source={"workload_id": "w"})
    b = curate_records(list(recs), split, out_dir=tmp_path / "b", source={"workload_id": "w"})
    names = ["eval_data.jsonl", "training/train_data.jsonl", "validation/val_data.jsonl"]
    for name in [*names, "manifest.json"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a.paths["train"] == tmp_path / "a" / "training" / "train_data.jsonl"
    evals = [json.loads(x) for x in a.paths["eval"].read_text().splitlines()]
    assert evals == a.eval_rows and set(evals[0]) == set(recs[0])  # whole records
    train = [json.loads(x) for x in a.paths["train"].read_text().splitlines()]
    assert train == a.train_rows and len(train) == 153
    assert set(train[0]) == {"messages"} and train[0]["messages"][-1]["role"] == "assistant"
    manifest = json.loads(a.paths["manifest"].read_text())
    assert manifest == a.manifest
    assert manifest["counts"]["val"] == 27 and manifest["seed"] == 42
    assert manifest["config"]["eval_size"] == 20 and manifest["source"] == {"workload_id": "w"}
    assert sum(manifest["class_counts"]["train"].values()) == 153
    for key, name in zip(("eval", "train", "val"), names, strict=True):
        digest = hashlib.sha256((tmp_path / "a" / name).read_bytes()).hexdigest()
        assert manifest["files"][key]["sha256"] == digest
    assert b.manifest["content_sha256"] == a.manifest["content_sha256"]


def tool_rec(i: int, name: str | None, args='{"q": 1}', kind="function") -> dict:
    r = rec(i, "x")
    r["request"]["tools"] = [{"type": "function", "function": {"name": "search"}}]
    msg = r["response"]["choices"][0]["message"]
    msg["content"] = None
    if name:
        msg["tool_calls"] = [
            {"id": "1", "type": kind, "function": {"name": name, "arguments": args}}
        ]
    return r


def test_tool_calling_workload():
    recs = [tool_rec(i, ["search", "lookup"][i % 2]) for i in range(60)]
    recs += [
        tool_rec(100, None),
        tool_rec(101, "search", args="{oops"),
        tool_rec(102, "s", kind="x"),
    ]
    wide = tool_rec(103, "search")
    props = {f"p{k}": {"type": "string"} for k in range(9)}
    wide["request"]["tools"][0]["function"]["parameters"] = {"properties": props}
    recs.append(wide)
    assert detect_workload_type(recs) == TOOL_CALLING
    assert detect_workload_type(records_for(3)) == "classification"
    data = curate_records(recs, DataSplitConfig(eval_size=10, val_ratio=0.1))
    assert data.workload_type == TOOL_CALLING
    assert data.counts["invalid_format"] == 1 and data.counts["quality_filtered"] == 3
    assert data.class_counts["selected"] == {"lookup": 30, "search": 30}
    call = data.eval_rows[0]["response"]["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["arguments"] == {"q": 1}  # parsed
    assert data.train_rows[0]["messages"][-1]["content"] == "" and "tools" in data.train_rows[0]
    assert (
        recs[0]["response"]["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
        == '{"q": 1}'
    )  # the caller's records are not modified
    raw = curate_records(
        recs, DataSplitConfig(eval_size=10, parse_function_arguments=False), workload_type="auto"
    )
    assert raw.counts["quality_filtered"] == 2  # bad JSON is kept when not parsing


def test_curate_workload_from_store_and_cli(tmp_path):
    settings = load_settings()
    with open_logstore(settings) as store:
        load_demo(store, records=300)
        data = curate_workload(
            store, "news_classifier", "demo", settings.data_split_config, out_dir=tmp_path / "o"
        )
    assert data.manifest["source"] == {
        "workload_id": "news_classifier",
        "client_id": "demo",
        "records": 300,
    }
    assert (data.counts["eval"], data.counts["val"], data.counts["train"]) == (100, 20, 180)
    runner = CliRunner()
    result = runner.invoke(
        app, ["curate", "--workload-id", "news_classifier", "--client-id", "demo"]
    )
    assert result.exit_code == 0, result.output
    assert "selected" in result.output and "300" in result.output
    out = settings.datasets_dir / "news_classifier--demo"
    assert (out / "eval_data.jsonl").read_bytes() == (
        tmp_path / "o" / "eval_data.jsonl"
    ).read_bytes()
    result = runner.invoke(app, ["curate", "--workload-id", "nope", "--client-id", "demo"])
    assert isinstance(result.exception, DataError)  # main() turns it into exit code 2
    assert "Not enough records" in str(result.exception)


def test_empty_store_message(tmp_path):
    with LogStore(f"sqlite:///{tmp_path / 'x.db'}") as store, pytest.raises(DataError):
        curate_workload(store, "w", "c", DataSplitConfig())
