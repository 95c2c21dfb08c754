"""Schema migrations of every table (log store and flywheel), on SQLite and PostgreSQL.

From an empty database the migrations build exactly the live tables; from the previous
release's schema (flywheel v1, an unversioned log table, rows with absolute artefact paths)
they keep every row and turn paths into artefact keys. Concurrent opens are safe.
"""

from __future__ import annotations

import re
import threading
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from sqlalchemy import inspect, select

from findistil import logstore
from findistil.database import make_engine, migrate, schema_version
from findistil.flywheel import db as fwdb
from findistil.flywheel import migrations
from findistil.flywheel.db import FlywheelDB, iso, new_job_id

JOB = "0123456789abcdef01234567"
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'sub' / 'fw.db'}"
    return request.getfixturevalue("fresh_postgres_url")


def _live_tables():
    return list(fwdb.metadata.sorted_tables) + list(logstore.metadata.sorted_tables)


def test_empty_database_gets_exactly_the_live_schema(url):
    db = FlywheelDB(url)
    logstore.LogStore(url, engine=db.engine)
    insp = inspect(db.engine)
    for table in _live_tables():
        reflected = {c["name"]: c for c in insp.get_columns(table.name)}
        assert set(reflected) == {c.name for c in table.columns}, table.name
        for column in table.columns:
            assert reflected[column.name]["nullable"] == column.nullable, (table, column.name)
    assert schema_version(db.engine, migrations.VERSION_TABLE) == fwdb.SCHEMA_VERSION == 4
    assert schema_version(db.engine, logstore.VERSION_TABLE) == max(logstore.MIGRATIONS) == 2
    uniques = {i["name"] for i in insp.get_indexes("fw_evaluations") if i["unique"]}
    uniques |= {u["name"] for u in insp.get_unique_constraints("fw_evaluations")}
    assert "ux_fw_evaluations_candidate_type" in uniques
    # a second open (a restart) finds the schema current and applies nothing
    assert FlywheelDB(url, engine=db.engine).migrate() == fwdb.SCHEMA_VERSION
    with db.begin() as conn:
        versions = conn.execute(sa.text("SELECT version FROM fw_schema_version")).scalars()
        assert sorted(versions) == [1, 2, 3, 4]
    db.dispose()


def _previous_release(url: str) -> sa.Engine:
    """A database as release 0.1 left it: flywheel v1, log table without a version."""
    engine = make_engine(url)
    migrate(engine, migrations.VERSION_TABLE, {1: migrations.MIGRATIONS[1]})
    with engine.begin() as conn:
        logstore._log_v1(conn)  # 0.1 created it with create_all, unversioned
        conn.execute(
            sa.text(
                "INSERT INTO log_records (workload_id, client_id, timestamp, request, response) "
                "VALUES ('w', 'c', 1, '{\"messages\": []}', '{\"choices\": []}')"
            )
        )
        home = "/home/someone/.findistil"
        datasets = f'[{{"name": "e", "nmp_uri": "file://{home}/jobs/{JOB}/datasets/eval.jsonl"}}]'
        conn.execute(
            sa.text(
                "INSERT INTO fw_jobs (id, workload_id, client_id, status, created_at, datasets, "
                "config) VALUES (:id, 'w', 'c', 'completed', :now, :ds, '{}')"
            ),
            {"id": JOB, "now": NOW, "ds": datasets},
        )
        conn.execute(
            sa.text(
                "INSERT INTO fw_candidates (id, job_id, position, model_name, "
                "customization_enabled, status, deployment_status) "
                "VALUES (1, :id, 0, 'm', true, 'completed', 'completed')"
            ),
            {"id": JOB},
        )
        for eval_id, score in ((1, 0.1), (2, 0.9)):  # a duplicate: the newest one is kept
            conn.execute(
                sa.text(
                    "INSERT INTO fw_evaluations (id, job_id, candidate_id, eval_type, status, "
                    "scores, progress, predictions_path, nmp_uri) VALUES (:e, :id, 1, "
                    "'base-eval', 'completed', :s, 100, :p, :u)"
                ),
                {
                    "e": eval_id,
                    "id": JOB,
                    "s": f'{{"f1_score": {score}}}',
                    "p": f"{home}/jobs/{JOB}/candidates/0/base-eval/predictions.jsonl",
                    "u": f"file://{home}/jobs/{JOB}/candidates/0/base-eval",
                },
            )
        conn.execute(
            sa.text(
                "INSERT INTO fw_customizations (id, job_id, candidate_id, status, progress, "
                "epochs_completed, steps_completed, adapter_path) VALUES (1, :id, 1, "
                "'completed', 100, 1, 5, :p)"
            ),
            {"id": JOB, "p": f"{home}/jobs/{JOB}/candidates/0/adapter"},
        )
    return engine


def test_previous_release_is_migrated_keeping_rows_and_keying_paths(url):
    engine = _previous_release(url)
    db = FlywheelDB(url, engine=engine)
    store = logstore.LogStore(url, engine=engine)
    assert store.count("w", "c") == 1  # the unversioned log table was adopted, not recreated
    assert schema_version(engine, logstore.VERSION_TABLE) == 2  # and the cursors added
    assert store.cursor("es|any") is None
    with db.begin() as conn:
        job = conn.execute(select(fwdb.jobs)).one()
        evals = conn.execute(select(fwdb.evaluations)).all()
        custom = conn.execute(select(fwdb.customizations)).one()
    assert job.datasets[0]["nmp_uri"] == f"jobs/{JOB}/datasets/eval.jsonl"
    assert len(evals) == 1 and evals[0].scores == {"f1_score": 0.9}
    assert evals[0].predictions_key == f"jobs/{JOB}/candidates/0/base-eval/predictions.jsonl"
    assert evals[0].nmp_uri == f"jobs/{JOB}/candidates/0/base-eval"
    assert custom.adapter_key == f"jobs/{JOB}/candidates/0/adapter"
    with pytest.raises(sa.exc.IntegrityError), db.begin() as conn:  # one row per eval type now
        conn.execute(
            fwdb.evaluations.insert().values(
                job_id=JOB, candidate_id=1, eval_type="base-eval", scores={}, progress=0.0
            )
        )
    engine.dispose()


def test_legacy_key_rewrites_only_job_artefact_paths():
    assert migrations.legacy_key(f"/x/jobs/{JOB}/a/b") == f"jobs/{JOB}/a/b"
    assert migrations.legacy_key(f"file:///x/jobs/{JOB}/") == f"jobs/{JOB}"
    assert migrations.legacy_key("/somewhere/else/model") is None
    assert migrations.legacy_key(None) is None


def test_sqlite_wal_and_foreign_keys(tmp_path):
    db = FlywheelDB(f"sqlite:///{tmp_path / 'fw.db'}")
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_concurrent_opens_migrate_once(url):
    # API, workers and tests open the same database at the same moment
    errors: list[BaseException] = []

    def open_one():
        try:
            FlywheelDB(url).dispose()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    db = FlywheelDB(url)
    with db.begin() as conn:
        versions = sorted(conn.execute(sa.text("SELECT version FROM fw_schema_version")).scalars())
        assert versions == list(range(1, fwdb.SCHEMA_VERSION + 1))
        conn.execute(
            fwdb.jobs.insert().values(
                id=JOB, workload_id="w", client_id="c", datasets=[], config={"a": [1]}
            )
        )
        row = conn.execute(select(fwdb.jobs).where(fwdb.jobs.c.id == JOB)).one()
    assert row.status == "pending" and row.config == {"a": [1]}
    assert fwdb.as_utc(row.created_at).tzinfo is not None
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
