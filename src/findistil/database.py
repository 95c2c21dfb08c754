"""The one place that opens SQL databases and applies numbered schema migrations.

Both SQL users, the log store (``logstore.py``) and the flywheel's job tables
(``flywheel/db.py``), get their engine from ``make_engine`` (one set of SQLite pragmas) and
bring their tables up to date with ``migrate``: each owns a chain of numbered migrations and a
version table recording which ran. A shipped migration is never edited; a schema change
appends the next number (STYLE "Storage"). Migrations are written as frozen DDL, never as
``create_all`` over the live table objects, so editing a table cannot silently rewrite history.

SQLite is the embedded default (a file under ``FINDISTIL_HOME``); any SQLAlchemy URL works,
PostgreSQL being the scaled-out one. Several processes may open one database at once: on
PostgreSQL the migration runs under a transaction-scoped advisory lock, on SQLite under the
write lock that ``BEGIN IMMEDIATE`` takes; either way it is one transaction.

    engine = make_engine("sqlite:///findistil.db")
    migrate(engine, "log_schema_version", {1: create_log_table})
"""

from __future__ import annotations

import os
import sqlite3
import time
import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from findistil.errors import ConfigError

Migration = Callable[[Connection], None]


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite files get WAL, foreign keys and a 30 s busy timeout."""
    if not url.startswith("sqlite"):
        return sa.create_engine(url, pool_pre_ping=True)
    path = sa.engine.make_url(url).database
    if path and path != ":memory:":
        check_writable(Path(path).expanduser())
    engine = sa.create_engine(
        url, connect_args={"check_same_thread": False, "timeout": 30}, pool_pre_ping=True
    )

    @sa.event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record):  # noqa: ANN001 - DB-API connection
        # WAL lets the API read while a runner or a load writes; NORMAL sync is safe in WAL.
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout=30000")
        _wal(cur)
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return engine


def _wal(cur, wait_s: float = 30.0) -> None:
    """Switch a SQLite file to WAL. The switch needs the file to itself and SQLite answers
    "database is locked" at once (no busy wait) while another connection migrates a fresh
    file, so it is retried for up to ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def check_writable(db_file: Path) -> None:
    """Create the SQLite file's folder; a ConfigError naming the path when it cannot be
    written (a read-only home, a file in the way), instead of a driver traceback later."""
    hint = "set FINDISTIL_HOME (or database_url) to a writable place"
    try:
        db_file.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {db_file.parent} ({exc.strerror}): {hint}") from None
    target = db_file if db_file.exists() else db_file.parent
    if not os.access(target, os.W_OK) or (db_file.exists() and not db_file.is_file()):
        raise ConfigError(f"cannot write {target}: {hint}")


def _version_table(name: str) -> sa.Table:
    return sa.Table(
        name,
        sa.MetaData(),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
    )


def migrate(engine: Engine, version_table: str, migrations: dict[int, Migration]) -> int:
    """Apply the migrations of ``migrations`` not yet recorded in ``version_table``.

    Returns the version the database had before. All of it is one transaction, so a failed
    migration leaves the schema as it was; several processes opening the same database at
    once are serialised, and the later ones find nothing left to do.
    """
    table = _version_table(version_table)

    def apply(conn: Connection) -> int:
        table.create(conn, checkfirst=True)
        done = {row[0] for row in conn.execute(sa.select(table.c.version))}
        for version in sorted(migrations):
            if version not in done:
                migrations[version](conn)
                conn.execute(table.insert().values(version=version, applied_at=datetime.now(UTC)))
        return max(done, default=0)

    if engine.dialect.name != "sqlite":
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                key = zlib.crc32(version_table.encode())
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
            return apply(conn)
    # SQLite: the driver's implicit transactions would leave DDL outside one; take the write
    # lock up front (BEGIN IMMEDIATE) so a second process waits instead of racing.
    with engine.connect() as plain:
        conn = plain.execution_options(isolation_level="AUTOCOMMIT")
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            before = apply(conn)
        except BaseException:
            conn.exec_driver_sql("ROLLBACK")
            raise
        conn.exec_driver_sql("COMMIT")
    return before


def schema_version(engine: Engine, version_table: str) -> int:
    """The highest migration recorded in ``version_table`` (0 when there is none)."""
    table = _version_table(version_table)
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table(version_table):
            return 0
        return int(conn.execute(sa.select(sa.func.max(table.c.version))).scalar() or 0)
