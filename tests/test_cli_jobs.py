"""``findistil jobs ...`` against a live API (uvicorn in a thread, real SQLite/PostgreSQL).

Each test runs the commands (Typer's CliRunner, or the real console script where the exit
code of a library error matters), asserts exit code and output, then reads the flywheel DB.
"""

# ruff: noqa: F811 - the API tests' fixtures are imported by name and requested by name

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from findistil.cli import app
from findistil.flywheel.db import FlywheelDB, jobs
from tests.api.conftest import (  # noqa: F401 - fixtures
    client,
    database_url,
    demo_records,
    server,
    settings,
    write_config,
)

runner = CliRunner()


def _job_row(settings, job_id):
    db = FlywheelDB(settings.db_url)
    try:
        with db.begin() as conn:
            return conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
    finally:
        db.dispose()


def _cli(*args, api=None):
    argv = [*args, "--api-url", api] if api else list(args)
    result = runner.invoke(app, argv, catch_exceptions=False)
    return result


def _script(*args, columns: int = 200):
    """The real console-script path: library errors become exit code 2 in ``main``."""
    return subprocess.run(
        [sys.executable, "-m", "findistil.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": str(columns)},
        timeout=120,
    )


def test_create_follow_list_show_delete(server, settings):
    created = _cli("jobs", "create", "--client-id", "demo", "--eval-size", "8", api=server.url)
    assert created.exit_code == 0, created.output
    job_id, status = created.output.split()[:2]
    assert status == "pending:" and "NIM workflow started" in created.output
    row = _job_row(settings, job_id)
    assert row.workload_id == "news_classifier" and row.client_id == "demo"
    assert row.config["data_split_config"]["eval_size"] == 8  # merged over the yaml's 10

    followed = _cli("jobs", "show", job_id, "--follow", "--interval", "0.2", api=server.url)
    assert followed.exit_code == 0, followed.output
    assert "customized-eval" in followed.output and "recommended:" in followed.output
    assert (
        f"on {socket.gethostname()}:{os.getpid()} (cpu)" in followed.output
    )  # which worker ran each candidate
    assert _job_row(settings, job_id).status == "completed"

    # an 80-column non-TTY: nothing cut to a stub, no carriage-return frames
    narrow = _script("jobs", "show", job_id, "--follow", "--api-url", server.url, columns=80)
    assert narrow.returncode == 0, narrow.stderr
    assert "…" not in narrow.stdout and "\r" not in narrow.stdout + narrow.stderr
    assert all(len(line) <= 80 for line in narrow.stdout.splitlines())
    for header in ("f1_score", "Δ vs base", "accuracy", "macro-F1", "rows/s"):
        assert header in narrow.stdout
    detail = json.loads(_cli("jobs", "show", job_id, "--json", api=server.url).output)
    for nim in detail["nims"]:
        assert Path(nim["model_name"]).name in narrow.stdout
    start, end = narrow.stdout.index("recommended:"), narrow.stdout.index("\ncascade ")
    recommended = Path(detail["recommendation"]["model_name"]).name
    assert " ".join(narrow.stdout[start:end].split()).count(recommended) == 1  # named once
    cascades = narrow.stdout[end:]  # then each tuned candidate's route calibration
    for nim in detail["nims"]:
        assert f"cascade {Path(nim['model_name']).name}:" in cascades

    listed = _cli("jobs", "list", "--json", api=server.url)
    assert listed.exit_code == 0
    assert [j["id"] for j in json.loads(listed.output)["jobs"]] == [job_id]
    table = _cli("jobs", "list", "--status", "completed", api=server.url)
    assert job_id in table.output and "1 job(s)" in table.output
    empty = _cli("jobs", "list", "--status", "failed", api=server.url)
    assert "0 job(s)" in empty.output

    shown = _cli("jobs", "show", job_id, "--json", api=server.url)
    detail = json.loads(shown.output)
    assert detail["status"] == "completed"
    assert detail["data_split_config"]["eval_size"] == 8
    assert len(detail["nims"][0]["evaluations"]) == 3

    deleted = _cli("jobs", "delete", job_id, api=server.url)
    assert deleted.exit_code == 0
    assert "Job deletion started" in deleted.output
    assert _job_row(settings, job_id) is None
    assert not (settings.artifacts_root / "jobs" / job_id).exists()


def test_cancel_then_follow_exits_1(server, settings, write_config):
    created = _cli("jobs", "create", "--client-id", "demo", api=server.url)
    job_id = created.output.split()[0]
    cancelled = _cli("jobs", "cancel", job_id, api=server.url)
    assert cancelled.exit_code == 0, cancelled.output
    assert "Job cancellation initiated successfully." in cancelled.output
    followed = _cli("jobs", "show", job_id, "--follow", "--interval", "0.2", api=server.url)
    assert followed.exit_code == 1
    row = _job_row(settings, job_id)
    assert (row.status, row.error) == ("cancelled", "Job cancelled by user")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_api_errors_are_exit_code_2_with_upstream_messages(server, settings):
    again = _cli("jobs", "create", "--client-id", "demo", api=server.url).output.split()[0]
    assert _cli("jobs", "cancel", again, api=server.url).exit_code == 0  # now it is finished
    twice = _cli("jobs", "cancel", again, api=server.url)  # upstream: not an error
    assert twice.exit_code == 0 and "Job is already cancelled." in twice.output
    cases = [
        (("jobs", "show", "nope"), "Invalid job_id format (HTTP 400)"),
        (("jobs", "show", "0123456789abcdef01234567"), "Job not found (HTTP 404)"),
        (("jobs", "create", "--client-id", "ghost"), "has 0 records"),
        (("jobs", "create", "--client-id", "demo", "--split-config", "[1]"), "JSON object"),
    ]
    for args, message in cases:
        result = _script(*args, "--api-url", server.url)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert message in " ".join(result.stderr.split()), (args, result.stderr)
    assert _job_row(settings, again).status == "cancelled"


def test_unreachable_api_is_a_clear_error(findistil_home):
    result = _script("jobs", "list", "--api-url", "http://127.0.0.1:9")
    assert result.returncode == 2
    assert "cannot reach the findistil API at http://127.0.0.1:9" in " ".join(result.stderr.split())


@pytest.mark.parametrize("width", [80, 120])
def test_progress_bars_fit_the_terminal_and_keep_stage_names(monkeypatch, width):
    import io

    from rich.console import Console

    from findistil import cli
    from findistil.progress import Progress

    out = io.StringIO()
    monkeypatch.setattr(cli, "err_console", Console(file=out, width=width, force_terminal=False))
    stages = ["SmolLM2-135M-Instruct customization", "all-MiniLM-L6-v2 customized-eval"]
    with cli.progress_bars() as report:
        report(Progress(stages[0], 57, 100, {"epochs": 1, "steps": 57}))
        report(Progress(stages[1], 100, 100, {"f1": 0.8}))
    lines = out.getvalue().splitlines()
    assert lines and all(len(line) <= width for line in lines)
    assert "…" not in out.getvalue() and "\r" not in out.getvalue()
    for stage, line in zip(stages, lines, strict=True):
        assert line.startswith(stage) and " 57%" in lines[0] and "100%" in lines[1]
    assert ("57/100" in lines[0]) == (width >= 110)  # the row count only when there is room
