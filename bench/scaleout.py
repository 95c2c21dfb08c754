"""Scale-out benchmark: one flywheel job under each runner, and a queue of small jobs.

What it measures (issue "Scale out"), on this machine, against the real PostgreSQL and Redis:
- the default two-candidate job (SmolLM2-135M + LoRA, all-MiniLM-L6-v2 + head; demo
  settings: 600 synthetic demo records, 100-row eval) end to end, created over HTTP:
  (a) ``findistil serve`` with the thread runner (embedded; candidates one after another),
  (b) ``serve --runner celery`` + one ``findistil worker`` (all cores),
  (c) ``serve --runner celery`` + two workers, one torch thread each (the candidates run in
      parallel, one per worker);
  wall-clock of each, the ratios to (a), per-candidate stage time and which worker ran it;
- the throughput of 20 queued jobs with tiny random models (2-layer Llama + BERT, built
  here) through two workers: jobs/min, and the spread of each job's queue-to-done time.

Every process is a real subprocess with its own FINDISTIL_HOME; they share only the
database, the broker and the artefact root. Run: ``python bench/scaleout.py`` (about 15 min
here; ``--skip-default`` for the queue part only). Writes ``bench/results/scaleout-<date>.json``,
prints a table and ends stdout with one JSON line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.processes: the same process helpers the tests use

from tests.processes import Proc, child_env, wait_for, wait_http  # noqa: E402

PG_ADMIN = os.environ.get(
    "FINDISTIL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
BROKER = os.environ.get("FINDISTIL_BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
FINISHED = {"completed", "failed", "cancelled"}


class Cluster:
    """API + workers for one scenario, on a fresh database and an empty broker DB."""

    def __init__(self, root: Path, config: dict) -> None:
        from sqlalchemy import create_engine, text

        self.root, self.procs = root, []
        root.mkdir(parents=True)
        name = f"findistil_bench_{os.getpid()}_{int(time.time())}"
        self._admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        with self._admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        self.db_name = name
        import redis

        redis.Redis.from_url(BROKER).flushdb()
        self.config = root / "findistil.yaml"
        full = {
            **config,
            "database_url": PG_ADMIN.rsplit("/", 1)[0] + "/" + name,
            "broker_url": BROKER,
            "artifact_root": str(root / "shared"),
        }
        self.config.write_text(yaml.safe_dump(full))

    def start(self, name: str, *args: str, threads: int | None = None) -> Proc:
        env = child_env(self.root / name, self.config)
        if threads is None:
            env.pop("OMP_NUM_THREADS")
        else:
            env["OMP_NUM_THREADS"] = str(threads)
        proc = Proc(list(args), env, self.root, self.root / f"{name}.log")
        self.procs.append(proc)
        return proc

    def serve(self, *extra: str) -> str:
        from findistil.api.app import free_port

        port = free_port()
        proc = self.start("api", "serve", "--port", str(port), *extra)
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", proc)
        return url

    def load_demo(self, records: int) -> None:
        env = child_env(self.root / "api", self.config)
        subprocess.run(
            [sys.executable, "-m", "findistil.cli", "load", "--demo", "--records", str(records)],
            env=env,
            cwd=self.root,
            check=True,
            capture_output=True,
        )

    def close(self) -> None:
        from sqlalchemy import text

        for proc in self.procs:
            proc.stop()
        with self._admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)'))
        self._admin.dispose()


def create(url: str, client_id: str = "demo", **split) -> str:
    body = {"workload_id": "news_classifier", "client_id": client_id}
    if split:
        body["data_split_config"] = split
    answer = httpx.post(url + "/api/jobs", json=body, timeout=30)
    answer.raise_for_status()
    return answer.json()["id"]


def job(url: str, job_id: str) -> dict:
    return httpx.get(f"{url}/api/jobs/{job_id}", timeout=30).json()


def settled(detail: dict) -> bool:
    return detail["status"] in FINISHED and all(n["status"] in FINISHED for n in detail["nims"])


def wait_workers(url: str, n: int, cluster: Cluster) -> None:
    wait_for(
        lambda: len(httpx.get(url + "/health").json()["workers"]) >= n,
        120,
        "workers",
        cluster.procs,
    )


# -- (a)-(c): the default job ---------------------------------------------------------------


def default_job(root: Path, scenario: str, records: int) -> dict:
    cluster = Cluster(root / scenario, {"data_split_config": {"eval_size": 100}})
    try:
        cluster.load_demo(records)
        if scenario == "threads":
            url = cluster.serve()
        else:
            url = cluster.serve("--runner", "celery")
            count, threads = (1, None) if scenario == "celery-1" else (2, 1)
            for n in range(count):
                cluster.start(f"w{n}", "worker", threads=threads)
            wait_workers(url, count, cluster)
        t0 = time.perf_counter()
        job_id = create(url)
        detail = wait_for(
            lambda: settled(d := job(url, job_id)) and d, 3600, "the job", cluster.procs
        )
        wall = time.perf_counter() - t0
        return {
            "scenario": scenario,
            "wall_s": wall,
            "status": detail["status"],
            "recommendation": (detail.get("recommendation") or {}).get("model_name"),
            "candidates": [
                {
                    "model": Path(n["model_name"]).name,
                    "status": n["status"],
                    "worker": n["worker"],
                    "device": n["device"],
                    "runtime_s": n["runtime_seconds"],
                    "training_s": n["training_seconds"],
                    "customized_f1": next(
                        (
                            e["scores"].get("f1_score")
                            for e in n["evaluations"]
                            if e["eval_type"] == "customized-eval"
                        ),
                        None,
                    ),
                }
                for n in detail["nims"]
            ],
        }
    finally:
        cluster.close()


# -- (d): a queue of tiny jobs ----------------------------------------------------------------


def tiny_queue(root: Path, jobs: int) -> dict:
    from tests.tiny_models import build_tiny_bert, build_tiny_llama

    llama, bert = build_tiny_llama(root / "tiny-llama"), build_tiny_bert(root / "tiny-bert")
    config = {
        "nims": [
            {"model_name": str(llama), "kind": "causal_lm"},
            {"model_name": str(bert), "kind": "encoder"},
        ],
        "data_split_config": {"eval_size": 10, "min_total_records": 20},
        "training_config": {"epochs": 1, "batch_size": 8, "micro_batch_size": 8},
        "evaluation_config": {"max_new_tokens": 4, "batch_size": 8},
        "icl_config": {"max_examples": 1},
    }
    cluster = Cluster(root / "tiny-queue", config)
    try:
        cluster.load_demo(60)
        url = cluster.serve("--runner", "celery")
        for n in range(2):
            cluster.start(f"w{n}", "worker", threads=1)
        wait_workers(url, 2, cluster)
        t0 = time.perf_counter()
        created = {create(url): time.perf_counter() for _ in range(jobs)}
        done: dict[str, float] = {}

        def all_done() -> bool:
            for job_id in created.keys() - done.keys():
                if settled(job(url, job_id)):
                    done[job_id] = time.perf_counter()
            return len(done) == len(created)

        wait_for(all_done, 1800, "the queue", cluster.procs)
        wall = time.perf_counter() - t0
        details = [job(url, j) for j in created]
        workers = {n["worker"] for d in details for n in d["nims"]}
        latencies = sorted(done[j] - created[j] for j in created)
        return {
            "jobs": jobs,
            "wall_s": wall,
            "jobs_per_min": 60 * jobs / wall,
            "completed": sum(d["status"] == "completed" for d in details),
            "workers_used": len(workers),
            "latency_s": {
                "min": latencies[0],
                "median": statistics.median(latencies),
                "max": latencies[-1],
            },
        }
    finally:
        cluster.close()


def print_table(default: list[dict], queue: dict | None) -> None:
    base = next((r["wall_s"] for r in default if r["scenario"] == "threads"), None)
    lines = [
        "| runner | wall-clock | vs threads | candidates (worker, s) | status |",
        "|---|---|---|---|---|",
    ]
    for r in default:
        cands = "; ".join(
            f"{c['model']} on {':'.join((c['worker'] or '?').split(':')[:2])} {c['runtime_s']:.0f}s"
            for c in r["candidates"]
        )
        ratio = f"{r['wall_s'] / base:.2f}x" if base else "–"
        lines.append(
            f"| {r['scenario']} | {r['wall_s']:.0f} s | {ratio} | {cands} | {r['status']} |"
        )
    if queue:
        lines.append(
            f"\n{queue['jobs']} tiny jobs through 2 workers: {queue['wall_s']:.0f} s, "
            f"{queue['jobs_per_min']:.1f} jobs/min, {queue['completed']} completed, "
            f"{queue['workers_used']} workers used, queue-to-done {queue['latency_s']['min']:.0f}"
            f"-{queue['latency_s']['max']:.0f} s (median {queue['latency_s']['median']:.0f} s)"
        )
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=600)
    parser.add_argument("--scenarios", default="threads,celery-1,celery-2")
    parser.add_argument("--skip-default", action="store_true", help="only the tiny-job queue")
    parser.add_argument("--queue-jobs", type=int, default=20)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="findistil-scaleout-"))
    started = time.perf_counter()
    default = []
    if not args.skip_default:
        for scenario in args.scenarios.split(","):
            default.append(default_job(root, scenario, args.records))
            print_table(default, None)
    queue = tiny_queue(root, args.queue_jobs) if args.queue_jobs else None
    print_table(default, queue)
    sha = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    result = {
        "date": dt.date.today().isoformat(),
        "git_sha": sha,
        "machine": f"{os.cpu_count()} CPU cores, no GPU",
        "records": args.records,
        "default_job": default,
        "tiny_queue": queue,
        "total_wall_s": time.perf_counter() - started,
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
    }
    out = REPO / "bench" / "results" / f"scaleout-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {out.relative_to(REPO)}")
    summary = {r["scenario"]: round(r["wall_s"], 1) for r in default}
    print(
        json.dumps(
            {
                "default_job_wall_s": summary,
                "tiny_jobs_per_min": queue and round(queue["jobs_per_min"], 2),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
