"""Real findistil processes for the scale-out tests: ``findistil worker`` / ``serve`` as
subprocesses with their own ``FINDISTIL_HOME``, logs captured to files, killed at the end."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx


class Proc:
    """One ``findistil ...`` subprocess (or another ``program``); ``log`` is its output."""

    def __init__(
        self, args: list[str], env: dict, cwd: Path, log: Path, program: list[str] | None = None
    ) -> None:
        self.args, self.log = args, log
        self._out = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            [*(program or [sys.executable, "-m", "findistil.cli"]), *args],
            env=env,
            cwd=cwd,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() takes its children too
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """Kill it and everything it started (``mlflow server`` leaves workers behind)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.wait(30)
        self._out.close()

    def tail(self, n: int = 40) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])


def wait_http(url: str, proc: Proc, timeout: float = 90.0) -> None:
    """Until ``url`` answers 200 (the process must stay alive meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.alive(), f"{proc.args} exited:\n{proc.tail()}"
        assert time.monotonic() < deadline, f"{url} did not answer:\n{proc.tail()}"
        time.sleep(0.3)


def wait_for(predicate, timeout: float, what: str, procs: list[Proc] = ()):
    """Poll ``predicate`` until truthy; on timeout the processes' logs go in the message."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.args}:\n{p.tail()}" for p in procs)
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{logs}")
        time.sleep(0.2)


def child_env(home: Path, config: Path) -> dict:
    """The environment of a findistil process: its own home, the shared config file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINDISTIL_")}
    env.update(
        FINDISTIL_HOME=str(home),
        FINDISTIL_CONFIG=str(config),
        OMP_NUM_THREADS="1",  # two workers on a 2-core machine: one torch thread each
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    return env
