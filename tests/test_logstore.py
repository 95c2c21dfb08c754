"""The log store, the same tests against SQLite and the real PostgreSQL."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa

from findistil.config import load_settings
from findistil.errors import DataError
from findistil.logstore import LogStore, open_logstore


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = LogStore(f"sqlite:///{tmp_path / 'logs.db'}")
    else:
        s = LogStore(request.getfixturevalue("postgres_url"))
    yield s
    s.close()


@pytest.fixture
def wid(store):
    """A workload id of this test only (the PostgreSQL `test` database is shared)."""
    workload = f"wl-{uuid.uuid4().hex[:12]}"
    yield workload
    store.delete(workload)


def record(wid: str, client: str, ts: int, text: str, **extra) -> dict:
    return {
        "workload_id": wid,
        "client_id": client,
        "timestamp": ts,
        "request": {"model": "m", "messages": [{"role": "user", "content": text}]},
        "response": {"choices": [{"message": {"role": "assistant", "content": f"[[{text}]]"}}]},
        **extra,
    }


def test_add_count_and_round_trip(store, wid):
    recs = [record(wid, "a", 100 + i, f"t{i}") for i in range(5)]
    recs.append(record(wid, "a", 200, "extra", source_id="h1"))
    assert store.add_many(recs) == 6
    assert store.count(wid, "a") == 6
    assert store.count(wid, "b") == 0
    got = list(store.iter_records(wid, "a"))
    assert got[0] == recs[-1]  # extra top-level keys come back
    assert sorted(got, key=lambda r: r["timestamp"]) == recs


def test_newest_first_with_limit_and_ties(store, wid):
    store.add_many([record(wid, "a", ts, f"t{ts}") for ts in (5, 9, 1, 7)])
    store.add_many([record(wid, "a", 9, "later-same-ts")])
    got = [r["request"]["messages"][0]["content"] for r in store.iter_records(wid, "a")]
    assert got == ["later-same-ts", "t9", "t7", "t5", "t1"]
    limited = list(store.iter_records(wid, "a", limit=2))
    assert [r["timestamp"] for r in limited] == [9, 9]


def test_json_keeps_key_order_and_unicode(store, wid):
    rec = record(wid, "a", 1, "Ünïcode ✓ “quotes”")
    rec["request"] = {"z": 1, "messages": rec["request"]["messages"], "a": [1.5, None, True]}
    store.add_many([rec])
    (got,) = store.iter_records(wid, "a")
    assert list(got["request"]) == ["z", "messages", "a"]
    assert got == rec


def test_workloads_and_delete(store, wid):
    other = wid + "-x"
    store.add_many([record(wid, "a", 1, "x")] * 3 + [record(wid, "b", 1, "y")])
    store.add_many([record(other, "a", 1, "z")])
    try:
        mine = [w for w in store.workloads() if w[0] in (wid, other)]
        assert mine == [(wid, "a", 3), (wid, "b", 1), (other, "a", 1)]
        assert store.delete(wid, "a") == 3
        assert store.count(wid, "a") == 0 and store.count(wid, "b") == 1
        assert store.delete(wid) == 1
        assert store.delete(wid) == 0
        assert store.count(other, "a") == 1
    finally:
        store.delete(other)


def test_missing_timestamp_gets_now_and_bad_record_rejected(store, wid):
    rec = record(wid, "a", 0, "x")
    del rec["timestamp"]
    store.add_many([rec])
    (got,) = store.iter_records(wid, "a")
    assert got["timestamp"] > 1_700_000_000
    with pytest.raises(DataError, match="request"):
        store.add_many([{"workload_id": wid, "client_id": "a", "response": {}}])


def test_writer_is_atomic(store, wid):
    store.add_many([record(wid, "a", 1, "old")])
    with pytest.raises(RuntimeError), store.writer(replace=True, batch_size=2) as w:
        for i in range(5):
            w.add(record(wid, "a", 2, f"new{i}"))
        raise RuntimeError("crash mid-load")
    got = list(store.iter_records(wid, "a"))
    assert [r["request"]["messages"][0]["content"] for r in got] == ["old"]
    with store.writer(replace=True, batch_size=2) as w:
        for i in range(5):
            w.add(record(wid, "a", 2, f"new{i}"))
    assert store.count(wid, "a") == 5
    assert w.deleted == 1


def test_index_exists(store):
    names = {ix["name"] for ix in sa.inspect(store.engine).get_indexes("log_records")}
    assert "ix_log_records_workload_client_ts" in names


def test_open_logstore_uses_home(findistil_home):
    with open_logstore(load_settings()) as store:
        assert store.workloads() == []
    assert (findistil_home / "findistil.db").is_file()


def test_second_store_sees_same_tables(tmp_path):
    url = f"sqlite:///{tmp_path / 'x' / 'logs.db'}"  # parent folder created on demand
    with LogStore(url) as a:
        a.add_many([record("w", "c", 1, "x")])
    with LogStore(url) as b:
        assert b.count("w", "c") == 1
