"""The flywheel's job state: four SQLAlchemy tables beside the log store's, in the same database.

``fw_jobs`` (one flywheel run over a workload), ``fw_candidates`` (one student per job;
upstream's "NIM runs"), ``fw_evaluations`` and ``fw_customizations`` (one row per eval /
training of a candidate). Fields are upstream's (REFERENCE §8) plus ours: the full ``scores``
dict, predictions/adapter paths, parameter counts, measured cost (rows/s, s/row, training
seconds, examples/s) and who runs a job (``owner``, ``heartbeat_at``) for restart recovery.

The schema is created on open and versioned in ``fw_schema_version``: a shipped migration is
never edited, a change appends one (STYLE "Storage"). SQLite (embedded default) and
PostgreSQL both work; stages and the runner only ever go through ``FlywheelDB``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    insert,
    select,
)
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from findistil.config import Settings

SCHEMA_VERSION = 1

JOB_STATUSES = ("pending", "running", "completed", "failed", "cancelled")
FINISHED = ("completed", "failed", "cancelled")
# Upstream's deployment_status values (REFERENCE §7); "prepare" loads weights instead of deploying.
DEPLOYMENT_STATUSES = (
    "created",
    "pending",
    "running",
    "ready",
    "completed",
    "cancelled",
    "failed",
    "unknown",
)

metadata = MetaData()


def utcnow() -> datetime:
    return datetime.now(UTC)


schema_version = Table(
    "fw_schema_version",
    metadata,
    Column("version", Integer, primary_key=True),
    Column("applied_at", DateTime(timezone=True), nullable=False, default=utcnow),
)

jobs = Table(
    "fw_jobs",
    metadata,
    Column("id", String(24), primary_key=True),
    Column("workload_id", String(255), nullable=False, index=True),
    Column("client_id", String(255), nullable=False),
    Column("status", String(16), nullable=False, index=True, default="pending"),
    Column("created_at", DateTime(timezone=True), nullable=False, default=utcnow),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("num_records", Integer),
    Column("datasets", JSON, nullable=False, default=list),
    Column("llm_judge", JSON),
    Column("config", JSON, nullable=False, default=dict),  # resolved split config + nims
    Column("recommendation", JSON),
    Column("error", Text),
    Column("owner", String(255)),  # "host:pid:token" of the process running it
    Column("heartbeat_at", DateTime(timezone=True)),
)

candidates = Table(
    "fw_candidates",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(24), ForeignKey("fw_jobs.id", ondelete="CASCADE"), index=True),
    Column("position", Integer, nullable=False),  # index in the job's nims; the artefact folder
    Column("model_name", String(1000), nullable=False),
    Column("kind", String(32)),
    Column("customization_enabled", Boolean, nullable=False, default=True),
    Column("stages", JSON),  # planned stage names, known once the student is loaded
    Column("status", String(16), nullable=False, default="pending"),
    Column("deployment_status", String(16), nullable=False, default="created"),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("runtime_seconds", Float),
    Column("error", Text),
    Column("params", BigInteger),
    Column("dtype", String(32)),
    Column("device", String(32)),
    Column("rows_per_s", Float),
    Column("s_per_row", Float),
    Column("training_s", Float),
    Column("examples_per_s", Float),
)

evaluations = Table(
    "fw_evaluations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(24), ForeignKey("fw_jobs.id", ondelete="CASCADE"), index=True),
    Column("candidate_id", Integer, ForeignKey("fw_candidates.id", ondelete="CASCADE")),
    Column("eval_type", String(32), nullable=False),
    Column("status", String(16), nullable=False, default="running"),
    Column("scores", JSON, nullable=False, default=dict),
    Column("report", JSON),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("runtime_seconds", Float),
    Column("progress", Float, nullable=False, default=0.0),
    Column("nmp_uri", Text),
    Column("mlflow_uri", Text),
    Column("predictions_path", Text),
    Column("error", Text),
)

customizations = Table(
    "fw_customizations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(24), ForeignKey("fw_jobs.id", ondelete="CASCADE"), index=True),
    Column("candidate_id", Integer, ForeignKey("fw_candidates.id", ondelete="CASCADE")),
    Column("status", String(16), nullable=False, default="running"),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("runtime_seconds", Float),
    Column("progress", Float, nullable=False, default=0.0),
    Column("epochs_completed", Integer, nullable=False, default=0),
    Column("steps_completed", Integer, nullable=False, default=0),
    Column("nmp_uri", Text),
    Column("customized_model", Text),
    Column("adapter_path", Text),
    Column("metrics", JSON),
    Column("error", Text),
)


def _create_v1(conn) -> None:
    metadata.create_all(conn, tables=[jobs, candidates, evaluations, customizations])


# Numbered migrations, applied in order; never edit a shipped one, append the next.
MIGRATIONS: dict[int, Callable] = {1: _create_v1}


def new_job_id() -> str:
    """A fresh job id: 24 lower-case hex chars (upstream's MongoDB ObjectId format)."""
    return secrets.token_hex(12)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def iso(value: datetime | None) -> str | None:
    value = as_utc(value)
    return value.isoformat() if value is not None else None


class FlywheelDB:
    """The flywheel tables behind one engine. ``FlywheelDB("sqlite:///...")`` creates them.

    Example: ``db = FlywheelDB(settings.db_url); with db.begin() as conn: conn.execute(...)``.
    """

    def __init__(self, url: str, *, engine: Engine | None = None):
        self.url = url
        self.engine = engine or _make_engine(url)
        self.migrate()

    @contextmanager
    def begin(self) -> Iterator:
        """A connection inside one transaction (committed on exit)."""
        with self.engine.begin() as conn:
            yield conn

    def session(self) -> Session:
        return Session(self.engine)

    def migrate(self) -> int:
        """Bring the schema to ``SCHEMA_VERSION``; returns the version found before."""
        # Several processes (API, tests, workers) may open the same PostgreSQL at once: a
        # concurrent CREATE loses the race with an IntegrityError, and the retry sees the tables.
        for attempt in range(3):
            try:
                return self._migrate_once()
            except (IntegrityError, DBAPIError):
                if attempt == 2:
                    raise
        return SCHEMA_VERSION  # pragma: no cover - unreachable

    def _migrate_once(self) -> int:
        with self.engine.begin() as conn:
            metadata.create_all(conn, tables=[schema_version])
            done = {row[0] for row in conn.execute(select(schema_version.c.version))}
            before = max(done, default=0)
            for version in sorted(MIGRATIONS):
                if version not in done:
                    MIGRATIONS[version](conn)
                    row = {"version": version, "applied_at": utcnow()}
                    conn.execute(insert(schema_version).values(**row))
        return before

    def dispose(self) -> None:
        self.engine.dispose()


def _make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, pool_pre_ping=True
        )

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            # WAL lets the API read job state while a runner thread writes progress.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def open_flywheel_db(settings: Settings) -> FlywheelDB:
    """The flywheel DB of these settings (``settings.db_url``, the log store's database)."""
    return FlywheelDB(settings.db_url)
