"""The log store: where logged LLM calls wait until a flywheel run curates them.

First stop of the data flow (app logs -> **logstore** -> curate -> datasets). One SQL table
``log_records`` behind a small interface: add many, count, iterate newest first by
``(workload_id, client_id)``, list workloads, delete. SQLite under ``FINDISTIL_HOME`` by
default, PostgreSQL (or any SQLAlchemy URL) by ``database_url``; the ``log_`` prefix lets the
table share a database with the orchestrator's job tables.

The table is built by numbered migrations (``log_schema_version``, ``findistil.database``);
``log_records`` below is the live object queries use and must match them.

``request`` and ``response`` are stored as JSON exactly as logged (plain ``JSON``, not
``JSONB``, so PostgreSQL keeps the key order too); any other top-level keys of a record go to
``extra`` and come back merged, so a record round-trips unchanged.

    store = open_logstore(load_settings())
    store.add_many(records)
    for record in store.iter_records("news_classifier", "demo", limit=100): ...
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from findistil.config import Settings
from findistil.database import make_engine, migrate
from findistil.errors import DataError

BATCH_SIZE = 1000  # rows per INSERT: bounds memory while amortising round trips (PostgreSQL)

metadata = sa.MetaData()
log_records = sa.Table(
    "log_records",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("workload_id", sa.String(255), nullable=False),
    sa.Column("client_id", sa.String(255), nullable=False),
    sa.Column("timestamp", sa.BigInteger, nullable=False),
    sa.Column("request", sa.JSON, nullable=False),
    sa.Column("response", sa.JSON, nullable=False),
    sa.Column("extra", sa.JSON, nullable=True),
    sa.Index("ix_log_records_workload_client_ts", "workload_id", "client_id", "timestamp"),
)

# Where an import from another log store (Elasticsearch) got to, written in the same
# transaction as the records of each page, so a rerun resumes without a gap or a duplicate.
import_cursors = sa.Table(
    "log_import_cursors",
    metadata,
    sa.Column("source", sa.String(512), primary_key=True),
    sa.Column("position", sa.JSON, nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
)

VERSION_TABLE = "log_schema_version"


def _log_v1(conn: Connection) -> None:
    """The log table as release 0.1 made it (unversioned then: adopted when it exists)."""
    md = sa.MetaData()
    sa.Table(
        "log_records",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("workload_id", sa.String(255), nullable=False),
        sa.Column("client_id", sa.String(255), nullable=False),
        sa.Column("timestamp", sa.BigInteger, nullable=False),
        sa.Column("request", sa.JSON, nullable=False),
        sa.Column("response", sa.JSON, nullable=False),
        sa.Column("extra", sa.JSON, nullable=True),
        sa.Index("ix_log_records_workload_client_ts", "workload_id", "client_id", "timestamp"),
    )
    md.create_all(conn, checkfirst=True)


def _log_v2(conn: Connection) -> None:
    """Import cursors (``findistil logs import-es``)."""
    md = sa.MetaData()
    sa.Table(
        "log_import_cursors",
        md,
        sa.Column("source", sa.String(512), primary_key=True),
        sa.Column("position", sa.JSON, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
    )
    md.create_all(conn, checkfirst=True)


# Numbered, frozen migrations of the log tables (see findistil.database); append, never edit.
MIGRATIONS = {1: _log_v1, 2: _log_v2}

_CORE_KEYS = ("workload_id", "client_id", "timestamp", "request", "response")


def _row(record: dict[str, Any]) -> dict[str, Any]:
    """A record dict as a table row (validation of the shape is the loaders' job)."""
    try:
        workload_id, client_id = record["workload_id"], record["client_id"]
        request, response = record["request"], record["response"]
    except KeyError as exc:
        raise DataError(
            f"log record is missing the key {exc.args[0]!r}: every record needs "
            "workload_id, client_id, request and response"
        ) from None
    timestamp = record.get("timestamp")
    extra = {k: v for k, v in record.items() if k not in _CORE_KEYS}
    return {
        "workload_id": str(workload_id),
        "client_id": str(client_id),
        "timestamp": int(timestamp) if timestamp is not None else int(time.time()),
        "request": request,
        "response": response,
        "extra": extra or None,
    }


def _record(row: Any) -> dict[str, Any]:
    record = {
        "workload_id": row.workload_id,
        "client_id": row.client_id,
        "timestamp": row.timestamp,
        "request": row.request,
        "response": row.response,
    }
    if row.extra:
        record.update(row.extra)
    return record


class LogWriter:
    """Batched inserts inside one transaction (see ``LogStore.writer``)."""

    def __init__(self, conn: Connection, replace: bool, batch_size: int = BATCH_SIZE):
        self._conn = conn
        self._replace = replace
        self._batch: list[dict[str, Any]] = []
        self._batch_size = batch_size
        self._replaced: set[tuple[str, str]] = set()
        self.written = 0
        self.deleted = 0

    def add(self, record: dict[str, Any]) -> None:
        row = _row(record)
        key = (row["workload_id"], row["client_id"])
        if self._replace and key not in self._replaced:
            # --replace: the old rows of a workload/client go the first time the input names
            # it, inside the same transaction as the new rows, so readers see old or new.
            self.flush()
            self.deleted += _delete(self._conn, *key)
            self._replaced.add(key)
        self._batch.append(row)
        if len(self._batch) >= self._batch_size:
            self.flush()

    def flush(self) -> None:
        if self._batch:
            self._conn.execute(log_records.insert(), self._batch)
            self.written += len(self._batch)
            self._batch = []

    def set_cursor(self, source: str, position: dict[str, Any]) -> None:
        """Record how far an import from ``source`` got, committed with these records."""
        self.flush()
        where = import_cursors.c.source == source
        self._conn.execute(import_cursors.delete().where(where))
        row = {"source": source, "position": position, "updated_at": int(time.time())}
        self._conn.execute(import_cursors.insert().values(**row))


def _delete(conn: Connection, workload_id: str, client_id: str | None) -> int:
    stmt = log_records.delete().where(log_records.c.workload_id == workload_id)
    if client_id is not None:
        stmt = stmt.where(log_records.c.client_id == client_id)
    return conn.execute(stmt).rowcount or 0


class LogStore:
    """Logged LLM calls in a SQL database. ``LogStore("sqlite:///logs.db")``."""

    def __init__(self, url: str, *, engine: Engine | None = None):
        self.url = url
        self.engine = engine if engine is not None else make_engine(url)
        migrate(self.engine, VERSION_TABLE, MIGRATIONS)

    # -- writing ------------------------------------------------------------------------
    @contextlib.contextmanager
    def writer(self, *, replace: bool = False, batch_size: int = BATCH_SIZE) -> Iterator[LogWriter]:
        """One transaction of batched inserts; all or nothing when the block raises.

        With ``replace=True`` each workload/client the block writes to is emptied first, in
        the same transaction (the loaders' atomic ``--replace``).
        """
        with self.engine.begin() as conn:
            writer = LogWriter(conn, replace, batch_size)
            yield writer
            writer.flush()

    def add_many(self, records: Iterable[dict[str, Any]]) -> int:
        """Store records (one transaction, batched); returns how many were stored."""
        with self.writer() as w:
            for record in records:
                w.add(record)
        return w.written

    def delete(self, workload_id: str, client_id: str | None = None) -> int:
        """Delete a workload's records (only one client's when given); returns the count."""
        with self.engine.begin() as conn:
            return _delete(conn, workload_id, client_id)

    # -- reading ------------------------------------------------------------------------
    def count(self, workload_id: str, client_id: str) -> int:
        stmt = (
            sa.select(sa.func.count())
            .select_from(log_records)
            .where(log_records.c.workload_id == workload_id, log_records.c.client_id == client_id)
        )
        with self.engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    def iter_records(
        self, workload_id: str, client_id: str, limit: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """Records of one workload/client, newest first (ties: last stored first).

        Streams in batches, so a large workload is never held in memory here.
        """
        stmt = (
            sa.select(log_records)
            .where(log_records.c.workload_id == workload_id, log_records.c.client_id == client_id)
            .order_by(log_records.c.timestamp.desc(), log_records.c.id.desc())
        )
        if limit is not None:
            stmt = stmt.limit(limit)
        with self.engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=BATCH_SIZE).execute(stmt)
            for row in result:
                yield _record(row)

    def cursor(self, source: str) -> dict[str, Any] | None:
        """The position an import from ``source`` last committed, or None."""
        stmt = sa.select(import_cursors.c.position).where(import_cursors.c.source == source)
        with self.engine.connect() as conn:
            return conn.execute(stmt).scalar()

    def workloads(self) -> list[tuple[str, str, int]]:
        """Every (workload_id, client_id, record count), sorted by ids."""
        stmt = (
            sa.select(log_records.c.workload_id, log_records.c.client_id, sa.func.count())
            .group_by(log_records.c.workload_id, log_records.c.client_id)
            .order_by(log_records.c.workload_id, log_records.c.client_id)
        )
        with self.engine.connect() as conn:
            return [(w, c, int(n)) for w, c, n in conn.execute(stmt)]

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> LogStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_logstore(settings: Settings) -> LogStore:
    """The log store of these settings (``settings.db_url``)."""
    return LogStore(settings.db_url)
