"""Importing upstream's Elasticsearch log index with the official client, against a
protocol-level double (tests/es_double.py): PIT + search_after paging, filters, bad documents
counted, 429 retried, an interrupted import resumed without a gap or a duplicate."""

from __future__ import annotations

import json

import pytest

from findistil.elastic import EsSource, import_es
from findistil.errors import DataError
from findistil.logstore import LogStore
from findistil.taxonomy import build_messages
from tests.es_double import EsDouble


def doc(i: int, ts: int, client: str = "app-1", workload: str = "news_classifier") -> dict:
    return {
        "workload_id": workload,
        "client_id": client,
        "timestamp": ts,
        "request": {"model": "teacher", "messages": build_messages(f"Acme headline number {i}")},
        "response": {"choices": [{"message": {"role": "assistant", "content": "[[Earnings]]"}}]},
    }


def corpus() -> list[tuple[str, dict]]:
    """25 documents of app-1 (several sharing a timestamp across page boundaries), 5 of
    another client, 1 without a response."""
    docs = [(f"a{i}", doc(i, 1_700_000_000 + i // 3)) for i in range(25)]
    docs += [(f"b{i}", doc(100 + i, 1_700_000_000 + i, client="app-2")) for i in range(5)]
    broken = doc(999, 1_700_000_005)
    del broken["response"]
    docs.insert(7, ("bad", broken))
    return docs


@pytest.fixture
def store(sqlite_url):
    with LogStore(sqlite_url) as s:
        yield s


def _stored(store: LogStore, client: str = "app-1") -> list[dict]:
    return list(store.iter_records("news_classifier", client))


def test_imports_page_by_page_with_filters_and_counts(store):
    with EsDouble("flywheel", corpus()) as es:
        source = EsSource(es.url, "flywheel", "news_classifier", "app-1")
        report = import_es(store, source, page_size=4)
        searches = [body for method, path, body in es.requests if path == "/_search"]
        assert not es.open_pits  # closed at the end
    assert (report.loaded, report.rejected) == (25, 1)
    assert report.errors == ["flywheel/_doc/bad: response: Field required"]
    # every page after the first continues from the last hit's sort values, never from=
    assert len(searches) == 8  # 26 matching documents in pages of 4, then an empty page
    assert all(s["search_after"] for s in searches[1:]) and "search_after" not in searches[0]
    filters = searches[0]["query"]["bool"]["filter"]
    assert {"term": {"client_id": "app-1"}} in filters
    stored = _stored(store)
    assert len(stored) == 25 and {r["es_id"] for r in stored} == {f"a{i}" for i in range(25)}
    original = dict(corpus())["a3"]
    (copy,) = [r for r in stored if r["es_id"] == "a3"]
    assert json.dumps(copy["request"]) == json.dumps(original["request"])  # stored as logged
    assert _stored(store, "app-2") == []  # filtered out


def test_an_interrupted_import_resumes_without_gap_or_duplicate(store):
    with EsDouble("flywheel", corpus()) as es:
        source = EsSource(es.url, "flywheel", "news_classifier", "app-1")
        es.fail = [("/_search", 429, 1), ("/_search", 429, 0)]  # retried by the client
        first = import_es(store, source, page_size=4)
        assert first.loaded == 25
        searches = [p for m, p, b in es.requests if p == "/_search"]
        assert len(searches) == 8 + 2  # the pages, and the two refused tries
        assert import_es(store, source, page_size=4).loaded == 0  # nothing new

        # more logs at the last timestamp seen, one of them first in shard order
        es.docs += [(f"n{i}", doc(200 + i, 1_700_000_008)) for i in range(6)]
        es.docs.insert(0, ("late", doc(300, 1_700_000_008)))
        es.requests.clear()
        es.fail = [("/_search", 500, 1)]  # page 1 commits, page 2 fails (500: not retried)
        with pytest.raises(DataError, match="answered 500"):
            import_es(store, source, page_size=3)
        assert not es.open_pits  # closed even after the failure
        assert len(_stored(store)) == 25 + 2  # page 1: "late" and n0 (a24 was there)
        again = import_es(store, source, page_size=3)  # resumes after page 1
    ids = [r["es_id"] for r in _stored(store)]
    assert len(ids) == len(set(ids)) == 25 + 7
    assert again.loaded == 5
    resumed = [b for m, p, b in es.requests if p == "/_search"][-1]["query"]["bool"]["filter"]
    assert {"range": {"timestamp": {"gte": 1_700_000_008}}} in resumed


def test_unreachable_server_and_missing_index_are_one_line(store):
    with pytest.raises(DataError, match=r"cannot reach Elasticsearch at http://127\.0\.0\.1:9"):
        import_es(store, EsSource("http://127.0.0.1:9", "flywheel"), timeout=2)
    missing = r"no index 'logs' \(no such index \[logs\]\)"
    with EsDouble("flywheel", corpus()) as es, pytest.raises(DataError, match=missing):
        import_es(store, EsSource(es.url, "logs"))


def test_the_cli_imports_and_reruns(findistil_home, monkeypatch):
    from typer.testing import CliRunner

    from findistil.cli import app
    from findistil.config import load_settings
    from findistil.logstore import open_logstore

    with EsDouble("flywheel", corpus()) as es:
        monkeypatch.setenv("ELASTICSEARCH_URL", es.url)  # upstream's variable
        first = CliRunner().invoke(app, ["logs", "import-es", "--client-id", "app-1"])
        again = CliRunner().invoke(app, ["logs", "import-es", "--client-id", "app-1"])
    assert first.exit_code == 2  # one document rejected, named
    assert "flywheel/_doc/bad: response: Field required" in " ".join(first.output.split())
    assert "loaded 25, rejected 1" in first.output
    assert again.exit_code == 0 and "loaded 0, rejected 0" in again.output
    with open_logstore(load_settings()) as store:
        assert store.count("news_classifier", "app-1") == 25
