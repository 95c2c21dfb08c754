"""Shared fixtures: an isolated FINDISTIL_HOME per test, real services, tiny models.

Service fixtures skip with a reason when the server is down locally and fail when CI=true
(CI always has PostgreSQL and Redis running).
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
from sqlalchemy import create_engine, text

from tests.tiny_models import build_tiny_bert, build_tiny_llama

REPO = Path(__file__).resolve().parents[1]
BENCHMARK_DIR = REPO.parent / "shared" / "data" / "benchmark"
POSTGRES_URL = os.environ.get(
    "FINDISTIL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("FINDISTIL_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture(autouse=True)
def findistil_home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own FINDISTIL_HOME; no test sees a user's real config."""
    home = tmp_path / "home"
    monkeypatch.setenv("FINDISTIL_HOME", str(home))
    for key in list(os.environ):
        if key.startswith("FINDISTIL_") and not key.startswith(
            ("FINDISTIL_TEST_", "FINDISTIL_HOME")
        ):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return home


def _reachable(url: str) -> bool:
    parsed = urlparse(url.replace("+psycopg", ""))
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=1):
            return True
    except OSError:
        return False


def _service_or_skip(name: str, url: str) -> str:
    if _reachable(url):
        return url
    if os.environ.get("CI") == "true":
        pytest.fail(f"{name} at {url} is not reachable, and CI=true requires it")
    pytest.skip(f"{name} at {url} is not reachable (start it to run this test)")


@pytest.fixture(scope="session")
def postgres_url() -> str:
    return _service_or_skip("PostgreSQL", POSTGRES_URL)


@pytest.fixture
def fresh_postgres_url(postgres_url) -> Iterator[str]:
    """A throw-away PostgreSQL database (created empty, dropped after the test)."""
    name = f"findistil_t_{secrets.token_hex(4)}"
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield postgres_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def redis_url() -> str:
    return _service_or_skip("Redis", REDIS_URL)


@pytest.fixture(scope="session")
def benchmark_dir() -> Path:
    if not BENCHMARK_DIR.is_dir():
        pytest.skip(f"benchmark data not found at {BENCHMARK_DIR}")
    return BENCHMARK_DIR


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama with a ChatML template, saved as a local HF folder."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer random BERT with a WordPiece tokenizer, saved as a local HF folder."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def sqlite_url(findistil_home):
    """The default SQLite database of this test's FINDISTIL_HOME."""
    findistil_home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{findistil_home / 'findistil.db'}"


@pytest.fixture
def demo_store(sqlite_url):
    """A log store there holding 120 demo records."""
    from findistil.loaders import load_demo
    from findistil.logstore import LogStore

    store = LogStore(sqlite_url)
    load_demo(store, records=120)
    yield store
    store.close()
