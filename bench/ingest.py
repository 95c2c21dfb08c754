"""Benchmark of the data plane: convert, load (SQLite, PostgreSQL), read back, curate 5,000.

Measures what a flywheel run pays before any model work: turning the 9,043-row teacher CSV
(``../shared/data/benchmark/news_headlines_teacher.csv``) into log records, storing them,
reading a workload back newest first, and curating 5,000 of them (eval 100 / val 490 / train
4,410). It also loads a JSONL file of ``--scale`` x 9,043 records to show that loading
streams: peak RSS should stay flat as the file grows.

Each step runs in a fresh child process so its peak RSS (``VmHWM``) is its own; the
idle interpreter with findistil imported is reported as ``baseline``. Prints a table, then
one JSON line with the numbers and run info.

    python bench/ingest.py [--postgres-url URL] [--scale 5]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CSV = REPO.parent / "shared" / "data" / "benchmark" / "news_headlines_teacher.csv"
PG_DEFAULT = os.environ.get(
    "FINDISTIL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
WORKLOAD = f"bench-ingest-{os.getpid()}"


def peak_rss_mb() -> float:
    # VmHWM is this process's own high-water mark; ru_maxrss would carry the parent's peak
    # over fork+exec on Linux and blur the per-step numbers.
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step(name: str, url: str, workdir: str) -> dict:
    """One measured step, run inside a child process."""
    from findistil.config import DataSplitConfig
    from findistil.curate import curate_records
    from findistil.loaders import LoadReport, _csv_records, load_file
    from findistil.logstore import LogStore

    if name == "baseline":
        return {"records": 0, "seconds": 0.0}
    if name == "convert":
        t = time.perf_counter()
        n = sum(1 for _, r in _csv_records(CSV, WORKLOAD, "teacher", LoadReport()))
        return {"records": n, "seconds": time.perf_counter() - t}
    store = LogStore(url)
    if name == "load":
        t = time.perf_counter()
        report = load_file(CSV, store, workload_id=WORKLOAD, client_id="teacher", replace=True)
        assert report.rejected == 0, report.errors[:3]
        return {"records": report.loaded, "seconds": time.perf_counter() - t}
    if name == "read":
        t = time.perf_counter()
        n = sum(1 for _ in store.iter_records(WORKLOAD, "teacher"))
        return {"records": n, "seconds": time.perf_counter() - t}
    if name == "curate":
        records = list(store.iter_records(WORKLOAD, "teacher"))
        split = DataSplitConfig(eval_size=100, val_ratio=0.1, limit=5000)
        t = time.perf_counter()
        data = curate_records(records, split, out_dir=Path(workdir) / "datasets")
        c = data.counts
        assert (c["eval"], c["val"], c["train"]) == (100, 490, 4410), c
        return {"records": c["selected"], "seconds": time.perf_counter() - t}
    if name.startswith("stream"):
        path = Path(workdir) / "big.jsonl"
        t = time.perf_counter()
        report = load_file(path, store, workload_id=WORKLOAD, client_id="stream", replace=True)
        return {"records": report.loaded, "seconds": time.perf_counter() - t}
    if name == "cleanup":
        return {"records": store.delete(WORKLOAD), "seconds": 0.0}
    raise ValueError(name)


def make_big_jsonl(url: str, workdir: str, scale: int) -> int:
    """``scale`` copies of the stored teacher records as one upstream-format JSONL file."""
    sys.path.insert(0, str(REPO / "src"))
    from findistil.logstore import LogStore

    store = LogStore(url)
    records = list(store.iter_records(WORKLOAD, "teacher"))
    n = 0
    with open(Path(workdir) / "big.jsonl", "w", encoding="utf-8") as fh:
        for k in range(scale):
            for r in records:
                fh.write(json.dumps({**r, "timestamp": r["timestamp"] + k}) + "\n")
                n += 1
    return n


def run_child(name: str, url: str, workdir: str) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--url", url, "--workdir", workdir]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=_env())
    return json.loads(out.stdout.strip().splitlines()[-1])


def _env() -> dict:
    env = dict(os.environ)
    env["BENCH_WORKLOAD"] = WORKLOAD
    return env


def reachable(url: str) -> bool:
    import sqlalchemy as sa

    try:
        with sa.create_engine(url).connect():
            return True
    except Exception:
        return False


def main() -> None:
    global WORKLOAD
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--postgres-url", default=PG_DEFAULT)
    ap.add_argument("--scale", type=int, default=5, help="copies of the CSV in the stream test")
    ap.add_argument("--child")
    ap.add_argument("--url")
    ap.add_argument("--workdir")
    args = ap.parse_args()
    if args.child:
        WORKLOAD = os.environ["BENCH_WORKLOAD"]
        result = step(args.child, args.url, args.workdir)
        print(json.dumps(result | {"peak_rss_mb": round(peak_rss_mb(), 1)}))
        return
    if not CSV.is_file():
        sys.exit(f"benchmark data not found at {CSV}")

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as workdir:
        backends = {"sqlite": f"sqlite:///{Path(workdir) / 'bench.db'}"}
        if reachable(args.postgres_url):
            backends["postgresql"] = args.postgres_url
        else:
            print(f"PostgreSQL at {args.postgres_url} unreachable: skipped", file=sys.stderr)
        for name in ("baseline", "convert"):
            rows.append(
                {"backend": "-", "step": name} | run_child(name, backends["sqlite"], workdir)
            )
        for backend, url in backends.items():
            try:
                for name in ("load", "read", "curate"):
                    rows.append({"backend": backend, "step": name} | run_child(name, url, workdir))
                n = make_big_jsonl(url, workdir, args.scale)
                r = run_child("stream", url, workdir)
                rows.append({"backend": backend, "step": f"stream x{args.scale}"} | r)
                assert r["records"] == n
            finally:
                run_child("cleanup", url, workdir)

    print(f"{'backend':<11} {'step':<10} {'records':>8} {'seconds':>8} {'rec/s':>9} {'peak MB':>8}")
    for r in rows:
        r["records_per_s"] = round(r["records"] / r["seconds"]) if r["seconds"] else None
        r["seconds"] = round(r["seconds"], 3)
        print(
            f"{r['backend']:<11} {r['step']:<10} {r['records']:>8} {r['seconds']:>8.2f} "
            f"{r['records_per_s'] or '-':>9} {r['peak_rss_mb']:>8.1f}"
        )
    sha = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    import sqlalchemy

    info = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": sha,
        "python": platform.python_version(),
        "sqlalchemy": sqlalchemy.__version__,
        "cpus": os.cpu_count(),
        "csv_rows": 9043,
        "curate": {"limit": 5000, "eval_size": 100, "val_ratio": 0.1},
    }
    print(json.dumps({"bench": "ingest", "results": rows, "info": info}))


if __name__ == "__main__":
    main()
