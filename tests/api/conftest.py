"""Fixtures of the API tests: a real database (SQLite file or a fresh PostgreSQL database),
tiny random-model candidates, demo records in the log store, and the app served by uvicorn
on a free local port in a thread, driven over real HTTP.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from sqlalchemy import create_engine, text

from findistil import loaders
from findistil.api import BackgroundServer, create_app
from findistil.config import Settings, load_settings
from findistil.logstore import open_logstore

FINISHED = {"completed", "failed", "cancelled"}
DEMO_RECORDS = 60


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request, findistil_home, monkeypatch) -> Iterator[str]:
    """The jobs + log store database: a SQLite file, or a throw-away PostgreSQL database.

    A fresh PostgreSQL database per test keeps the tests independent of each other and of
    other test files that share the server's ``test`` database.
    """
    if request.param == "sqlite":
        url = f"sqlite:///{findistil_home / 'findistil.db'}"
        monkeypatch.setenv("FINDISTIL_DATABASE_URL", url)
        yield url
        return
    base = request.getfixturevalue("postgres_url")
    name = f"findistil_api_{secrets.token_hex(4)}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = base.rsplit("/", 1)[0] + "/" + name
    monkeypatch.setenv("FINDISTIL_DATABASE_URL", url)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def tiny_config(llama: Path, bert: Path, *, llama_epochs: int = 1, **top: object) -> dict:
    """A findistil.yaml for fast jobs: the two tiny random models, a 10-row eval split;
    ``top`` adds top-level keys (``lease_timeout_s=3``)."""
    return {
        **top,
        "nims": [
            {
                "model_name": str(llama),
                "kind": "causal_lm",
                "training_config": {"epochs": llama_epochs},
            },
            {"model_name": str(bert), "kind": "encoder"},
        ],
        "data_split_config": {"eval_size": 10, "min_total_records": 20},
        "training_config": {"epochs": 1, "batch_size": 8, "micro_batch_size": 8},
        "evaluation_config": {"max_new_tokens": 4, "batch_size": 8},
        "icl_config": {"max_examples": 1},
    }


@pytest.fixture
def write_config(tmp_path, tiny_llama_dir, tiny_bert_dir):
    """Write ``findistil.yaml`` in the test's working directory (what load_settings reads)."""

    def write(**kwargs) -> Path:
        path = tmp_path / "findistil.yaml"
        path.write_text(yaml.safe_dump(tiny_config(tiny_llama_dir, tiny_bert_dir, **kwargs)))
        return path

    return write


@pytest.fixture
def settings(database_url, write_config) -> Settings:
    write_config()
    return load_settings()


def load_demo_records(settings: Settings, n: int = DEMO_RECORDS, client_id: str = "demo") -> None:
    with open_logstore(settings) as store:
        loaders.load_demo(store, records=n, client_id=client_id, replace=True)


@pytest.fixture
def demo_records(settings) -> int:
    load_demo_records(settings)
    return DEMO_RECORDS


@pytest.fixture
def server(settings, demo_records) -> Iterator[BackgroundServer]:
    with BackgroundServer(create_app(settings)) as srv:
        yield srv


@pytest.fixture
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


def wait_job(client: httpx.Client, job_id: str, until=None, timeout: float = 180.0) -> dict:
    """Poll GET /api/jobs/{id} until ``until(job)`` (default: finished and candidates settled)."""
    until = until or settled
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/api/jobs/{job_id}").json()
        if until(job):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job did not get there in {timeout}s: {json.dumps(job)[:2000]}")
        time.sleep(0.2)


def settled(job: dict) -> bool:
    """The job and every candidate reached a final status (the worker let go of it)."""
    return job["status"] in FINISHED and all(n["status"] in FINISHED for n in job["nims"])
