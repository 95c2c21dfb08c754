"""Numbered migrations of the flywheel tables (version table ``fw_schema_version``).

Each migration is frozen DDL: the tables as they were when it shipped, written out here
rather than taken from ``flywheel/db.py``'s live objects, so changing a live table can never
change what an old migration does. Never edit a shipped migration; append the next one, and
update the live tables in ``db.py`` to match (``tests/test_migrations.py`` checks that a
migrated database and the live tables agree, from an empty database and from version 1).

1. (release 0.1) jobs, candidates, evaluations, customizations.
2. Scale-out: leases (``owner`` + ``lease_expires_at``) on jobs and candidates, the worker,
   queue and Celery task of each candidate, a ``fw_workers`` registry, artefact **keys**
   instead of absolute paths (``predictions_key``, ``adapter_key``; old paths and ``file://``
   URIs under ``.../jobs/<id>/`` are rewritten to ``jobs/<id>/...``), and one evaluation per
   (candidate, eval type) / one customization per candidate, so a re-run stage updates its
   row instead of adding one.
3. Experiment tracking: job warnings, the customization's MLflow run.
4. Deployments: ``fw_deployments`` (which tuned student answers a workload's route, its
   threshold and teacher, the one it replaced) and ``fw_route_requests`` (every routed
   request: the path taken, confidence, latency, tokens).
"""

from __future__ import annotations

import re

import sqlalchemy as sa
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.engine import Connection

VERSION_TABLE = "fw_schema_version"
_TZ = DateTime(timezone=True)


def _v1(conn: Connection) -> None:
    md = MetaData()
    Table(
        "fw_jobs",
        md,
        Column("id", String(24), primary_key=True),
        Column("workload_id", String(255), nullable=False, index=True),
        Column("client_id", String(255), nullable=False),
        Column("status", String(16), nullable=False, index=True),
        Column("created_at", _TZ, nullable=False),
        Column("started_at", _TZ),
        Column("finished_at", _TZ),
        Column("num_records", Integer),
        Column("datasets", JSON, nullable=False),
        Column("llm_judge", JSON),
        Column("config", JSON, nullable=False),
        Column("recommendation", JSON),
        Column("error", Text),
        Column("owner", String(255)),
        Column("heartbeat_at", _TZ),
    )
    Table(
        "fw_candidates",
        md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("job_id", String(24), ForeignKey("fw_jobs.id", ondelete="CASCADE"), index=True),
        Column("position", Integer, nullable=False),
        Column("model_name", String(1000), nullable=False),
        Column("kind", String(32)),
        Column("customization_enabled", Boolean, nullable=False),
        Column("stages", JSON),
        Column("status", String(16), nullable=False),
        Column("deployment_status", String(16), nullable=False),
        Column("started_at", _TZ),
        Column("finished_at", _TZ),
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
    Table(
        "fw_evaluations",
        md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("job_id", String(24), ForeignKey("fw_jobs.id", ondelete="CASCADE"), index=True),
        Column("candidate_id", Integer, ForeignKey("fw_candidates.id", ondelete="CASCADE")),
        Column("eval_type", String(32), nullable=False),
        Column("status", String(16), nullable=False),
        Column("scores", JSON, nullable=False),
        Column("report", JSON),
        Column("started_at", _TZ),
        Column("finished_at", _TZ),
        Column("runtime_seconds", Float),
        Column("progress", Float, nullable=False),
        Column("nmp_uri", Text),
        Column("mlflow_uri", Text),
        Column("predictions_path", Text),
        Column("error", Text),
    )
    Table(
        "fw_customizations",
        md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("job_id", String(24), ForeignKey("fw_jobs.id", ondelete="CASCADE"), index=True),
        Column("candidate_id", Integer, ForeignKey("fw_candidates.id", ondelete="CASCADE")),
        Column("status", String(16), nullable=False),
        Column("started_at", _TZ),
        Column("finished_at", _TZ),
        Column("runtime_seconds", Float),
        Column("progress", Float, nullable=False),
        Column("epochs_completed", Integer, nullable=False),
        Column("steps_completed", Integer, nullable=False),
        Column("nmp_uri", Text),
        Column("customized_model", Text),
        Column("adapter_path", Text),
        Column("metrics", JSON),
        Column("error", Text),
    )
    md.create_all(conn)


_LEGACY_KEY = re.compile(r"(?:^|/)(jobs/[0-9a-f]{24}(?:/.*)?)$")


def legacy_key(value: str | None) -> str | None:
    """An old absolute path or ``file://`` URI of a job's artefact as an artefact key."""
    if not value:
        return None
    match = _LEGACY_KEY.search(value.removeprefix("file://").rstrip("/"))
    return match.group(1) if match else None


def _add_columns(conn: Connection, table: str, columns: list[Column]) -> None:
    ddl = sa.schema.CreateColumn
    for column in columns:
        spec = ddl(column).compile(dialect=conn.dialect)
        conn.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN {spec}"))


def _dedupe(conn: Connection, table: str, key: str) -> None:
    """Keep the newest row per ``key`` (release 0.1 never re-ran a stage; belt and braces)."""
    conn.execute(
        sa.text(f"DELETE FROM {table} WHERE id NOT IN (SELECT MAX(id) FROM {table} GROUP BY {key})")
    )


def _rewrite_keys(conn: Connection, table: str, columns: tuple[str, ...]) -> None:
    rows = conn.execute(sa.text(f"SELECT id, {', '.join(columns)} FROM {table}")).all()
    for row in rows:
        values = {c: legacy_key(getattr(row, c)) for c in columns}
        sets = ", ".join(f"{c} = :{c}" for c in columns)
        conn.execute(sa.text(f"UPDATE {table} SET {sets} WHERE id = :id"), {**values, "id": row.id})


def _rewrite_dataset_uris(conn: Connection) -> None:
    jobs = Table("fw_jobs", MetaData(), Column("id", String(24)), Column("datasets", JSON))
    for row in conn.execute(sa.select(jobs)).all():
        datasets = [
            {**d, "nmp_uri": legacy_key(d.get("nmp_uri"))} if isinstance(d, dict) else d
            for d in row.datasets or []
        ]
        conn.execute(jobs.update().where(jobs.c.id == row.id).values(datasets=datasets))


def _v2(conn: Connection) -> None:
    _add_columns(
        conn,
        "fw_jobs",
        [Column("lease_expires_at", _TZ), Column("task_id", String(64))],
    )
    _add_columns(
        conn,
        "fw_candidates",
        [
            Column("owner", String(255)),
            Column("lease_expires_at", _TZ),
            Column("worker", String(255)),
            Column("queue", String(255)),
            Column("task_id", String(64)),
        ],
    )
    conn.execute(
        sa.text("ALTER TABLE fw_evaluations RENAME COLUMN predictions_path TO predictions_key")
    )
    conn.execute(sa.text("ALTER TABLE fw_customizations RENAME COLUMN adapter_path TO adapter_key"))
    _rewrite_keys(conn, "fw_evaluations", ("predictions_key", "nmp_uri"))
    _rewrite_keys(conn, "fw_customizations", ("adapter_key", "nmp_uri"))
    _rewrite_dataset_uris(conn)
    _dedupe(conn, "fw_evaluations", "candidate_id, eval_type")
    _dedupe(conn, "fw_customizations", "candidate_id")
    conn.execute(
        sa.text(
            "CREATE UNIQUE INDEX ux_fw_evaluations_candidate_type "
            "ON fw_evaluations (candidate_id, eval_type)"
        )
    )
    conn.execute(
        sa.text(
            "CREATE UNIQUE INDEX ux_fw_customizations_candidate ON fw_customizations (candidate_id)"
        )
    )
    conn.execute(sa.text("CREATE INDEX ix_fw_candidates_owner ON fw_candidates (owner)"))
    conn.execute(sa.text("CREATE INDEX ix_fw_jobs_owner ON fw_jobs (owner)"))
    md = MetaData()
    Table(
        "fw_workers",
        md,
        Column("name", String(255), primary_key=True),
        Column("host", String(255), nullable=False),
        Column("pid", Integer, nullable=False),
        Column("runner", String(16), nullable=False),
        Column("queues", JSON),
        Column("device", String(32)),
        Column("started_at", _TZ, nullable=False),
        Column("heartbeat_at", _TZ, nullable=False),
        Column("stopped_at", _TZ),
    )
    md.create_all(conn)


def _v3(conn: Connection) -> None:
    """Experiment tracking: warnings on the job (an unreachable MLflow never fails it) and
    the training run's address on the customization."""
    _add_columns(conn, "fw_jobs", [Column("warnings", JSON)])
    _add_columns(conn, "fw_customizations", [Column("mlflow_uri", Text)])


def _v4(conn: Connection) -> None:
    md = MetaData()
    Table(
        "fw_deployments",
        md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("workload_id", String(255), nullable=False, index=True),
        Column("client_id", String(255), nullable=False),
        Column("job_id", String(24), nullable=False),
        Column("candidate_id", Integer, nullable=False),
        Column("model_name", String(1000), nullable=False),
        Column("customized_model", Text, nullable=False),
        Column("status", String(16), nullable=False, index=True),
        Column("cascade", JSON, nullable=False),
        Column("teacher", JSON, nullable=False),
        Column("previous_id", Integer),
        Column("created_at", _TZ, nullable=False),
        Column("retired_at", _TZ),
    )
    Table(
        "fw_route_requests",
        md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("deployment_id", Integer, nullable=False, index=True),
        Column("at", _TZ, nullable=False),
        Column("path", String(16), nullable=False),
        Column("confidence", Float),
        Column("latency_s", Float, nullable=False),
        Column("prompt_tokens", Integer, nullable=False),
        Column("completion_tokens", Integer, nullable=False),
        Column("error", Text),
    )
    md.create_all(conn)


# Applied in order; never edit a shipped one, append the next.
MIGRATIONS = {1: _v1, 2: _v2, 3: _v3, 4: _v4}
