"""Elasticsearch as a log source: ``findistil logs import-es`` copies upstream's log index into
the SQL log store.

Upstream's applications log each call as a document of the index ``flywheel``
(``ES_COLLECTION_NAME``) at ``ELASTICSEARCH_URL``: ``workload_id``, ``client_id`` (keywords),
``timestamp``, ``request``, ``response`` (REFERENCE §9, §11). This module reads those
documents with the official ``elasticsearch`` client, page by page through a point in time
(``_pit``) and ``search_after`` -- never ``from``/``size`` deep paging, which Elasticsearch
caps at 10,000 hits -- oldest first, filtered by workload and client when given. Each page
goes through the loaders' checks (``loaders.load_objects``: bad documents are counted and
named by their ``_id``) and is committed together with the import's cursor (the last
timestamp and the ids seen at it), so a rerun resumes after the last committed page: an
interrupted import loses nothing and stores nothing twice. The client retries 429 and 5xx
answers itself (``retry_on_status``).

Example::

    report = import_es(store, url="http://es:9200", index="flywheel", workload_id="news")
    report.loaded, report.rejected
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Any

from findistil.errors import DataError
from findistil.loaders import LoadReport, load_objects
from findistil.logstore import LogStore
from findistil.progress import Progress, ProgressFn, no_progress

DEFAULT_URL = "http://localhost:9200"
DEFAULT_INDEX = "flywheel"
KEEP_ALIVE = "2m"  # how long the point in time lives between two pages


@dataclass(frozen=True)
class EsSource:
    """Which documents an import reads; ``key`` names its cursor in the log store."""

    url: str
    index: str
    workload_id: str | None = None
    client_id: str | None = None

    @property
    def key(self) -> str:
        return f"es|{self.url}|{self.index}|{self.workload_id or '*'}|{self.client_id or '*'}"

    def query(self, cursor: dict[str, Any] | None) -> dict[str, Any]:
        """Upstream's keyword filters, and ``timestamp >=`` the cursor when resuming."""
        filters: list[dict[str, Any]] = []
        if self.workload_id:
            filters.append({"term": {"workload_id": self.workload_id}})
        if self.client_id:
            filters.append({"term": {"client_id": self.client_id}})
        if cursor:
            filters.append({"range": {"timestamp": {"gte": cursor["timestamp"]}}})
        return {"bool": {"filter": filters}} if filters else {"match_all": {}}


def source_from_env(
    url: str | None = None,
    index: str | None = None,
    workload_id: str | None = None,
    client_id: str | None = None,
) -> EsSource:
    """Upstream's environment variables fill what is not given."""
    return EsSource(
        url or os.environ.get("ELASTICSEARCH_URL", DEFAULT_URL),
        index or os.environ.get("ES_COLLECTION_NAME", DEFAULT_INDEX),
        workload_id,
        client_id,
    )


def _client(url: str, timeout: float):
    try:
        from elasticsearch import Elasticsearch
    except ImportError:
        raise DataError(
            "importing from Elasticsearch needs the elasticsearch client: "
            "pip install 'findistil[elasticsearch]'"
        ) from None
    return Elasticsearch(
        url, request_timeout=timeout, max_retries=5, retry_on_timeout=True,
        retry_on_status=(429, 502, 503, 504),
    )  # fmt: skip


def _es_error(source: EsSource, exc: Exception) -> DataError:
    """One line for what went wrong talking to Elasticsearch, naming what to check."""
    status = getattr(exc, "status_code", None) or getattr(exc, "status", None)
    body = getattr(exc, "body", None)
    reason = ""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        reason = body["error"].get("reason") or body["error"].get("type") or ""
    if status == 404:
        return DataError(
            f"Elasticsearch at {source.url} has no index {source.index!r} ({reason}): "
            "check --index (or ES_COLLECTION_NAME)"
        )
    if status is None:
        return DataError(
            f"cannot reach Elasticsearch at {source.url} ({type(exc).__name__}: "
            f"{str(exc)[:120]}): check --url (or ELASTICSEARCH_URL)"
        )
    return DataError(f"Elasticsearch at {source.url} answered {status}: {reason or exc}")


def import_es(
    store: LogStore,
    source: EsSource,
    *,
    page_size: int = 1000,
    max_record_bytes: int = 1 << 20,
    redact_pii: bool = False,
    timeout: float = 30.0,
    progress: ProgressFn = no_progress,
) -> LoadReport:
    """Copy the documents of ``source`` into ``store``, resuming after the last import.

    Raises ``DataError`` for an unreachable server, a missing index or another refusal.
    """
    from elasticsearch import ApiError, TransportError

    es = _client(source.url, timeout)
    report = LoadReport(source_format="elasticsearch")
    cursor = store.cursor(source.key)
    try:
        pit = es.open_point_in_time(index=source.index, keep_alive=KEEP_ALIVE)["id"]
    except (ApiError, TransportError) as exc:
        raise _es_error(source, exc) from None
    try:
        _pages(es, store, source, pit, cursor, report, page_size, progress,
               max_record_bytes=max_record_bytes, redact_pii=redact_pii)  # fmt: skip
    except (ApiError, TransportError) as exc:
        raise _es_error(source, exc) from None
    finally:
        with contextlib.suppress(ApiError, TransportError):  # else it expires by itself
            es.close_point_in_time(id=pit)
        es.close()
    return report


def _pages(es, store, source, pit, cursor, report, page_size, progress, **load) -> None:
    """Read pages with ``search_after`` until one comes back empty; commit each with the
    cursor it leaves."""
    after = None
    total = None
    seen = 0
    while True:
        answer = es.search(
            pit={"id": pit, "keep_alive": KEEP_ALIVE},
            query=source.query(cursor),
            sort=[{"timestamp": {"order": "asc"}}],  # the PIT adds its _shard_doc tiebreaker
            size=page_size,
            search_after=after,
            track_total_hits=total is None,
        )
        pit = answer.get("pit_id", pit)
        hits = answer["hits"]["hits"]
        if total is None:
            total = int(answer["hits"].get("total", {}).get("value", 0))
        if not hits:
            return
        after = hits[-1]["sort"]
        fresh = [h for h in hits if not _already(h, cursor)]
        cursor = _advance(cursor, hits)
        docs = [{**(h.get("_source") or {}), "es_id": h["_id"]} for h in fresh]
        names = [f"{source.index}/_doc/{h['_id']}" for h in fresh]
        commit = functools.partial(_commit_cursor, source.key, dict(cursor))
        load_objects(docs, store, names=names, report=report, finish=commit, **load)
        seen += len(hits)
        progress(Progress("import-es", seen, max(total, seen), {"loaded": report.loaded}))


def _commit_cursor(key: str, position: dict[str, Any], writer) -> None:
    writer.set_cursor(key, position)


def _timestamp(hit: dict[str, Any]) -> Any:
    """The hit's timestamp as Elasticsearch sorted it (its first sort value)."""
    return hit["sort"][0]


def _already(hit: dict[str, Any], cursor: dict[str, Any] | None) -> bool:
    """Imported by an earlier run: at the cursor's timestamp and among the ids seen there."""
    return bool(cursor) and _timestamp(hit) == cursor["timestamp"] and hit["_id"] in cursor["ids"]


def _advance(cursor: dict[str, Any] | None, hits: list[dict[str, Any]]) -> dict[str, Any]:
    """The cursor after ``hits`` (oldest first): their last timestamp and every id seen at
    it, including earlier pages' when the timestamp did not move."""
    last = _timestamp(hits[-1])
    ids = [h["_id"] for h in hits if _timestamp(h) == last]
    if cursor and cursor["timestamp"] == last:
        ids = list(dict.fromkeys([*cursor["ids"], *ids]))
    return {"timestamp": last, "ids": ids}
