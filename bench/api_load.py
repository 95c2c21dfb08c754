"""API load benchmark: many concurrent clients on loopback against ``findistil serve``'s app.

What it measures (issue "Hold under bad input, load and faults"):
- 50 concurrent ``POST /api/jobs`` (demo records loaded; the runner is off, so the jobs stay
  queued and nothing else takes CPU), then
- ``--clients`` (default 200) concurrent keep-alive clients for ``--seconds`` each on
  ``GET /api/jobs`` (the 50 jobs), ``GET /api/jobs/{id}`` (ids round-robin) and ``/health``:
  requests, errors (non-2xx, resets, timeouts), req/s, p50 / p99 latency.

The server is a separate process (uvicorn, one worker, as ``findistil serve`` runs it); the
clients are one asyncio process with a minimal HTTP/1.1 keep-alive client (a full client
library would spend the CPU this 2-core machine needs for the server). Both share the two
cores: the figures are a floor for a machine where the clients live elsewhere.

Run: ``python bench/api_load.py [--clients 200 --seconds 10 --database-url URL]``; prints a
table and ends with one JSON line. Target (idle machine): GET /api/jobs >= 500 req/s,
p99 < 0.5 s, 0 errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def serve(port: int) -> None:
    """The child process: the API without a runner, over the env's FINDISTIL_HOME."""
    import uvicorn

    from findistil.api import create_app

    uvicorn.run(create_app(start_runner=False), host="127.0.0.1", port=port, log_level="error")


async def _request(reader, writer, method: str, path: str, body: bytes) -> int:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
    if body:
        head += "Content-Type: application/json\r\n"
    writer.write(head.encode() + b"\r\n" + body)
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("server closed the connection")
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value)
    await reader.readexactly(length)
    return int(status_line.split()[1])


async def _client(port, paths, deadline, latencies, errors, method="GET", body=b"", once=False):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = 0
    try:
        while time.perf_counter() < deadline:
            path = paths[i % len(paths)]
            i += 1
            t0 = time.perf_counter()
            try:
                status = await asyncio.wait_for(_request(reader, writer, method, path, body), 30)
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
                errors.append(type(exc).__name__)
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            latencies.append(time.perf_counter() - t0)
            if not 200 <= status < 300:
                errors.append(str(status))
            if once:
                return
    finally:
        writer.close()


async def _phase(port, clients, seconds, paths, **kw) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    t0 = time.perf_counter()
    deadline = t0 + seconds
    await asyncio.gather(
        *(_client(port, paths[i:] + paths[:i], deadline, latencies, errors, **kw)
          for i in range(clients))
    )  # fmt: skip
    wall = time.perf_counter() - t0
    ordered = sorted(latencies) or [float("nan")]
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
        "req_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(statistics.median(ordered) * 1000, 1),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000, 1),
    }


def _prepare_home(home: Path, database_url: str | None) -> dict:
    env = {**os.environ, "FINDISTIL_HOME": str(home)}
    if database_url:
        env["FINDISTIL_DATABASE_URL"] = database_url
    subprocess.run(
        [sys.executable, "-m", "findistil.cli", "logs", "load", "--demo", "--records", "600"],
        env=env, check=True, capture_output=True,
    )  # fmt: skip
    return env


def run(clients: int, seconds: float, database_url: str | None) -> dict:
    from findistil.api.app import free_port

    with tempfile.TemporaryDirectory(prefix="findistil-load-") as tmp:
        env = _prepare_home(Path(tmp) / "home", database_url)
        port = free_port()
        child = subprocess.Popen([sys.executable, __file__, "--serve", str(port)], env=env, cwd=tmp)
        try:
            _wait_up(port)
            return asyncio.run(_measure(port, clients, seconds))
        finally:
            child.terminate()
            child.wait(30)


def _wait_up(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the API on port {port} did not start in {timeout:.0f} s")


async def _measure(port: int, clients: int, seconds: float) -> dict:
    body = json.dumps({"workload_id": "news_classifier", "client_id": "demo"}).encode()
    results = {
        "POST /api/jobs": await _phase(
            port, 50, 60, ["/api/jobs"], method="POST", body=body, once=True
        )
    }
    ids = [j["id"] for j in httpx.get(f"http://127.0.0.1:{port}/api/jobs").json()["jobs"]]
    for name, paths in (
        ("GET /api/jobs", ["/api/jobs"]),
        ("GET /api/jobs/{id}", [f"/api/jobs/{i}" for i in ids]),
        ("GET /health", ["/health"]),
    ):
        results[name] = await _phase(port, clients, seconds, paths)
    results["jobs_listed"] = len(ids)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--database-url", help="default: SQLite in a temporary home")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    results = run(args.clients, args.seconds, args.database_url)
    print(f"{args.clients} clients x {args.seconds:.0f} s per route, loopback, 2 cores shared")
    print(f"{'route':<22}{'requests':>9}{'errors':>8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}")
    for name, r in results.items():
        if isinstance(r, dict):
            print(
                f"{name:<22}{r['requests']:>9}{r['errors']:>8}{r['req_per_s']:>9}"
                f"{r['p50_ms']:>9}{r['p99_ms']:>9}"
            )
    load = os.getloadavg()[0]
    print(json.dumps({"bench": "api_load", "clients": args.clients, "load_avg_1m": load,
                      "database": "postgresql" if args.database_url else "sqlite",
                      **results}))  # fmt: skip


if __name__ == "__main__":
    main()
