"""Flywheel job tables: schema creation/versioning on SQLite and PostgreSQL, ids, timestamps."""

from __future__ import annotations

import re
import threading
from datetime import UTC, datetime

import pytest
from sqlalchemy import delete, inspect, select

from findistil.flywheel import db as fwdb
from findistil.flywheel.db import FlywheelDB, iso, new_job_id

TABLES = {"fw_schema_version", "fw_jobs", "fw_candidates", "fw_evaluations", "fw_customizations"}


def test_sqlite_schema_is_created_and_versioned(tmp_path):
    url = f"sqlite:///{tmp_path / 'sub' / 'fw.db'}"
    db = FlywheelDB(url)
    assert set(inspect(db.engine).get_table_names()) >= TABLES
    with db.begin() as conn:
        versions = list(conn.execute(select(fwdb.schema_version.c.version)).scalars())
    assert versions == [fwdb.SCHEMA_VERSION]
    # a second open (a restart) finds the schema current and adds nothing
    again = FlywheelDB(url)
    assert again.migrate() == fwdb.SCHEMA_VERSION
    with again.begin() as conn:
        assert len(list(conn.execute(select(fwdb.schema_version.c.version)))) == 1
    cols = {c["name"] for c in inspect(db.engine).get_columns("fw_evaluations")}
    assert {"scores", "predictions_path", "progress", "nmp_uri", "mlflow_uri", "error"} <= cols
    cols = {c["name"] for c in inspect(db.engine).get_columns("fw_candidates")}
    assert {"params", "rows_per_s", "s_per_row", "training_s", "examples_per_s"} <= cols
    cols = {c["name"] for c in inspect(db.engine).get_columns("fw_customizations")}
    assert {"epochs_completed", "steps_completed", "adapter_path", "customized_model"} <= cols


def test_sqlite_wal_and_foreign_keys(tmp_path):
    db = FlywheelDB(f"sqlite:///{tmp_path / 'fw.db'}")
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


@pytest.mark.postgres
def test_postgres_schema_concurrent_open(postgres_url):
    # API, runner and tests open the shared database at the same moment
    errors: list[BaseException] = []

    def open_one():
        try:
            FlywheelDB(postgres_url).dispose()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    db = FlywheelDB(postgres_url)
    assert set(inspect(db.engine).get_table_names()) >= TABLES
    job_id = new_job_id()
    try:
        with db.begin() as conn:
            conn.execute(
                fwdb.jobs.insert().values(
                    id=job_id, workload_id="w", client_id="c", datasets=[], config={"a": [1]}
                )
            )
            row = conn.execute(select(fwdb.jobs).where(fwdb.jobs.c.id == job_id)).one()
        assert row.status == "pending" and row.config == {"a": [1]}
        assert row.created_at.tzinfo is not None
    finally:
        with db.begin() as conn:
            conn.execute(delete(fwdb.jobs).where(fwdb.jobs.c.id == job_id))
        db.dispose()


def test_new_job_id_is_object_id_shaped():
    ids = {new_job_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch(r"[0-9a-f]{24}", i) for i in ids)


def test_iso_treats_naive_times_as_utc():
    naive = datetime(2024, 5, 1, 12, 0, 0)
    assert iso(naive) == "2024-05-01T12:00:00+00:00"
    assert iso(naive.replace(tzinfo=UTC)) == "2024-05-01T12:00:00+00:00"
    assert iso(None) is None
