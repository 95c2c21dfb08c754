"""Bearer tokens, scopes, Host check and CORS, over real HTTP against the served app."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from findistil.api import BackgroundServer, create_app
from findistil.api.auth import check_bind, is_loopback, required_scope
from findistil.cli import app as cli_app
from findistil.config import load_settings
from findistil.errors import ConfigError

ADMIN = "admin-token-0123456789abcdef"
READ = "read-token-0123456789abcdef"
JOB = "0123456789abcdef01234567"  # a well-formed id nobody has


def serve(tmp_path, **config) -> BackgroundServer:
    (tmp_path / "findistil.yaml").write_text(yaml.safe_dump(config))
    return BackgroundServer(create_app(load_settings(), start_runner=False))


@pytest.fixture
def secured(tmp_path, monkeypatch) -> Iterator[str]:
    monkeypatch.setenv("FINDISTIL_API_READ_TOKEN", READ)
    with serve(tmp_path, api_tokens=[ADMIN]) as server:  # a plain string is an admin token
        yield server.url


def call(url: str, method: str, path: str, token: str | None = None, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.request(method, url + path, headers=headers, timeout=30, **kw)


@pytest.mark.parametrize("path", ["/health", "/", "/openapi.json", "/static/dashboard.js"])
def test_public_routes_need_no_token(secured, path):
    assert call(secured, "GET", path).status_code == 200


@pytest.mark.parametrize(
    "header", [None, "Bearer wrong-token-0123456789", "Basic " + ADMIN, ADMIN, "Bearer"]
)
def test_missing_or_wrong_token_is_401_in_upstream_shape(secured, header):
    headers = {"Authorization": header} if header else {}
    answer = httpx.get(secured + "/api/jobs", headers=headers, timeout=30)
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in answer.json()["detail"]


def test_read_token_reads_and_admin_token_writes(secured):
    assert call(secured, "GET", "/api/jobs", READ).json() == {"jobs": []}
    assert call(secured, "GET", f"/api/jobs/{JOB}", READ).status_code == 404
    body = {"workload_id": "news_classifier", "client_id": "nobody"}
    for method, path, kw in [
        ("POST", "/api/jobs", {"json": body}),
        ("POST", f"/api/jobs/{JOB}/cancel", {}),
        ("DELETE", f"/api/jobs/{JOB}", {}),
    ]:
        refused = call(secured, method, path, READ, **kw)
        assert refused.status_code == 403, (method, path)
        assert refused.json() == {"detail": "This route needs an admin token; yours is read-only."}
        allowed = call(secured, method, path, ADMIN, **kw)
        assert allowed.status_code in (400, 404), allowed.text  # the route answers itself


def test_v1_errors_are_in_openai_shape(secured):
    answer = call(secured, "GET", "/v1/models")
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "invalid_api_key"
    assert call(secured, "GET", "/v1/models", READ).status_code == 200


def test_an_unauthenticated_upload_is_refused_before_it_is_read(secured):
    answer = call(secured, "POST", "/api/jobs", content=b"x" * 10_000_000)
    assert answer.status_code == 401


def test_without_tokens_the_loopback_api_is_open(tmp_path):
    with serve(tmp_path) as server:
        assert call(server.url, "GET", "/api/jobs").json() == {"jobs": []}


def test_cli_passes_the_token(secured, monkeypatch):
    runner = CliRunner()
    refused = runner.invoke(cli_app, ["jobs", "list", "--api-url", secured])
    assert refused.exit_code != 0
    assert "Pass --token or set FINDISTIL_API_TOKEN" in str(refused.exception)  # main() prints it
    ok = runner.invoke(cli_app, ["jobs", "list", "--api-url", secured, "--token", READ])
    assert ok.exit_code == 0, ok.output
    monkeypatch.setenv("FINDISTIL_API_TOKEN", ADMIN)
    assert runner.invoke(cli_app, ["jobs", "list", "--api-url", secured]).exit_code == 0


def test_serve_refuses_an_open_api_on_a_public_address(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINDISTIL_API")}
    done = subprocess.run(
        [sys.executable, "-m", "findistil.cli", "serve", "--host", "0.0.0.0", "--port", "1"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "refusing to serve on 0.0.0.0 without an API token" in done.stderr.replace("\n", "")
    assert "FINDISTIL_API_TOKEN" in done.stderr


def test_bind_and_scope_rules():
    assert all(map(is_loopback, ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "10.1.2.3", "::", "api.example.com"]))
    check_bind("127.0.0.1", [])  # open on loopback: fine
    with pytest.raises(ConfigError, match="refusing to serve on 10.1.2.3"):
        check_bind("10.1.2.3", [])
    assert required_scope("GET", "/api/jobs") == "read"
    assert required_scope("POST", "/v1/chat/completions") == "read"
    assert required_scope("POST", "/api/jobs") == "admin"
    assert required_scope("GET", "/health") is None


def test_short_tokens_are_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FINDISTIL_API_TOKEN", "short")
    with pytest.raises(ConfigError, match="at least 16 characters"):
        load_settings()


def test_trusted_hosts_and_cors(tmp_path):
    with serve(tmp_path) as server:  # CORS closed by default: no allow-origin header
        pre = httpx.options(
            server.url + "/api/jobs",
            headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"},
        )
        assert "access-control-allow-origin" not in pre.headers
    config = {"trusted_hosts": ["api.example"], "cors_origins": ["http://app.example"]}
    with serve(tmp_path, **config) as server:
        assert httpx.get(server.url + "/health", headers={"Host": "evil"}).status_code == 400
        ok = httpx.get(server.url + "/health", headers={"Host": "api.example"})
        assert ok.status_code == 200
        pre = httpx.options(
            server.url + "/api/jobs",
            headers={
                "Host": "api.example",
                "Origin": "http://app.example",
                "Access-Control-Request-Method": "GET",
            },
        )
        assert pre.headers["access-control-allow-origin"] == "http://app.example"
