"""The flywheel's job state: SQLAlchemy tables beside the log store's, in the same database.

``fw_jobs`` (one flywheel run over a workload), ``fw_candidates`` (one student per job;
upstream's "NIM runs"), ``fw_evaluations`` (one per candidate and eval type) and
``fw_customizations`` (one per candidate), plus ``fw_workers`` (the processes that run
stages, with their heartbeats) and ``fw_deployments`` / ``fw_route_requests`` (the tuned
student behind each workload's route, and what the route answered). Fields are
upstream's (REFERENCE §8) plus ours: the full ``scores`` dict, artefact keys (relative to
the artefact root), parameter counts, measured cost (rows/s, s/row, training seconds,
examples/s), and leases: the ``owner`` of a running job or candidate and when its lease runs
out (``flywheel/leases.py``).

These are the *live* table objects queries use; the schema itself is built by the numbered,
frozen migrations in ``flywheel/migrations.py`` (applied on open, recorded in
``fw_schema_version``). SQLite (embedded default) and PostgreSQL both work; the engine comes
from ``findistil.database``, the one engine factory.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
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
    UniqueConstraint,
    select,
    update,
)
from sqlalchemy.orm import Session

from findistil.config import Settings
from findistil.database import make_engine, migrate
from findistil.flywheel.migrations import MIGRATIONS, VERSION_TABLE

SCHEMA_VERSION = max(MIGRATIONS)

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
    Column("owner", String(255), index=True),  # worker holding the lease while it runs
    Column("heartbeat_at", DateTime(timezone=True)),  # unused since migration 2
    Column("lease_expires_at", DateTime(timezone=True)),
    Column("task_id", String(64)),  # Celery task of the job's head stages
    Column("warnings", JSON),  # problems that did not fail the job (tracking server down)
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
    Column("owner", String(255), index=True),  # lease holder while its stages run
    Column("lease_expires_at", DateTime(timezone=True)),
    Column("worker", String(255)),  # who ran it (kept after the lease ends)
    Column("queue", String(255)),
    Column("task_id", String(64)),
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
    Column("predictions_key", Text),
    Column("error", Text),
    UniqueConstraint("candidate_id", "eval_type", name="ux_fw_evaluations_candidate_type"),
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
    Column("mlflow_uri", Text),
    Column("adapter_key", Text),
    Column("metrics", JSON),
    Column("error", Text),
    UniqueConstraint("candidate_id", name="ux_fw_customizations_candidate"),
)

workers = Table(
    "fw_workers",
    metadata,
    Column("name", String(255), primary_key=True),  # the lease owner tag
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("runner", String(16), nullable=False),  # threads | celery | api
    Column("queues", JSON),
    Column("device", String(32)),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("heartbeat_at", DateTime(timezone=True), nullable=False),
    Column("stopped_at", DateTime(timezone=True)),
)


# Which tuned student answers a workload's route (``findistil/route-<workload_id>``):
# one ``active`` row per workload; deploying retires it, rolling back re-activates the
# ``previous_id`` one. ``cascade`` holds the route's temperature, threshold and scoring.
deployments = Table(
    "fw_deployments",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("workload_id", String(255), nullable=False, index=True),
    Column("client_id", String(255), nullable=False),  # the teacher's answers are logged here
    Column("job_id", String(24), nullable=False),
    Column("candidate_id", Integer, nullable=False),
    Column("model_name", String(1000), nullable=False),
    Column("customized_model", Text, nullable=False),
    Column("status", String(16), nullable=False, index=True),  # active | retired | rolled_back
    Column("cascade", JSON, nullable=False),
    Column("teacher", JSON, nullable=False),  # TeacherConfig (the key's env var, never a key)
    Column("previous_id", Integer),
    Column("created_at", DateTime(timezone=True), nullable=False, default=utcnow),
    Column("retired_at", DateTime(timezone=True)),
)

route_requests = Table(
    "fw_route_requests",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("deployment_id", Integer, nullable=False, index=True),
    Column("at", DateTime(timezone=True), nullable=False, default=utcnow),
    Column("path", String(16), nullable=False),  # student | teacher
    Column("confidence", Float),
    Column("latency_s", Float, nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("error", Text),  # the teacher's failure, when it had to answer and could not
)


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
        self.engine = engine or make_engine(url)
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
        return migrate(self.engine, VERSION_TABLE, MIGRATIONS)

    def dispose(self) -> None:
        self.engine.dispose()


def open_flywheel_db(settings: Settings) -> FlywheelDB:
    """The flywheel DB of these settings (``settings.db_url``, the log store's database)."""
    return FlywheelDB(settings.db_url)


def close_unfinished(
    conn, job_id: str, status: str, error: str, now: datetime, *, candidate_id: int | None = None
) -> None:
    """Give every unfinished candidate / evaluation / customization of a job (or of one of
    its candidates) a final ``status`` with ``error``: the cascade of cancel, shutdown and an
    expired lease."""
    for table in (evaluations, customizations, candidates):
        query = update(table).where(table.c.job_id == job_id, table.c.status.not_in(FINISHED))
        key = table.c.id if table is candidates else table.c.candidate_id
        if candidate_id is not None:
            query = query.where(key == candidate_id)
        values = {"status": status, "error": error, "finished_at": now}
        if table is candidates:
            values["deployment_status"] = "cancelled" if status == "cancelled" else "failed"
        conn.execute(query.values(**values))


def add_warning(db: FlywheelDB, job_id: str, message: str) -> None:
    """Note a problem that did not fail the job (shown in its detail); kept once, last 20."""
    with db.begin() as conn:
        current = conn.execute(
            select(jobs.c.warnings).where(jobs.c.id == job_id).with_for_update()
        ).scalar()
        current = list(current or [])
        if message not in current:
            conn.execute(
                update(jobs).where(jobs.c.id == job_id).values(warnings=[*current, message][-20:])
            )
