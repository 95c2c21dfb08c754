"""Serving benchmark: requests per second and latency of the tuned students over real HTTP,
with micro-batching on and off.

What it measures (issue "Close the loop": 8 concurrent clients got 0.9 req/s from the tuned
SmolLM2 and 9 req/s from MiniLM while a batched eval scores 130 rows/s): one small flywheel
job on the packaged demo log (``--records`` records, both default candidates), then for each
tuned student and for ``serve_max_batch`` 16 (default) and 1 (batching off), ``--requests``
chat completions at 1, 8 and 32 concurrent clients (the official async ``openai`` SDK, real
HTTP to ``findistil serve``'s app in this process): requests/s, p50 and p95 latency, and the
mean batch the server formed. Every answer must equal the one the same request gets alone.

Run: ``python bench/serving.py`` (~10 min here). Writes ``bench/results/serving-<date>.json``,
prints a markdown table, ends with one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import finish  # noqa: E402

CONCURRENCY = (1, 8, 32)


async def _load(base_url: str, model: str, prompts: list, clients: int) -> tuple[list, float, list]:
    import openai

    gate = asyncio.Semaphore(clients)
    latencies: list[float] = []

    sdk = openai.AsyncOpenAI(base_url=base_url, api_key="-", max_retries=0, timeout=600)
    async with sdk as aio:

        async def one(messages):
            async with gate:
                t0 = time.perf_counter()
                reply = await aio.chat.completions.create(
                    model=model, messages=messages, max_tokens=8
                )
                latencies.append(time.perf_counter() - t0)
                return reply.choices[0].message.content

        started = time.perf_counter()
        answers = await asyncio.gather(*(one(m) for m in prompts))
    return answers, time.perf_counter() - started, latencies


def _job(settings, records: int) -> dict:
    from findistil import taxonomy
    from findistil.api.app import BackgroundServer, create_app
    from findistil.console import ApiClient, follow_job
    from findistil.loaders import load_demo
    from findistil.logstore import open_logstore

    with open_logstore(settings) as store:
        load_demo(store, records=records, client_id="bench", replace=True)
    with BackgroundServer(create_app(settings)) as server:
        client = ApiClient(server.url, timeout=300)
        created = client.create_job(taxonomy.WORKLOAD_ID, "bench", {"eval_size": 50})
        job = follow_job(client, created["id"], lambda _e: None, interval=2.0)
    if job["status"] != "completed":
        raise SystemExit(f"job {job['id']} {job['status']}: {job.get('error')}")
    return job


def _measure(settings, models: list[str], prompts: list, requests: int) -> list[dict]:
    from findistil.api.app import BackgroundServer, create_app

    rows = []
    with BackgroundServer(create_app(settings, start_runner=False)) as server:
        base_url = server.url + "/v1"
        import httpx

        for model in models:
            alone, _, _ = asyncio.run(_load(base_url, model, prompts[:8], 1))  # also warms up
            for clients in CONCURRENCY:
                before = httpx.get(server.url + "/health").json()["serving"]
                answers, wall, latencies = asyncio.run(
                    _load(base_url, model, prompts[:requests], clients)
                )
                after = httpx.get(server.url + "/health").json()["serving"]
                batches = after["batches"] - before["batches"]
                rows.append(
                    {
                        "model": model,
                        "max_batch": settings.serve_max_batch,
                        "clients": clients,
                        "requests": len(answers),
                        "req_per_s": len(answers) / wall,
                        "p50_s": statistics.median(latencies),
                        "p95_s": sorted(latencies)[int(0.95 * (len(latencies) - 1))],
                        "mean_batch": (after["requests"] - before["requests"]) / max(1, batches),
                        "same_as_alone": answers[:8] == alone,
                    }
                )
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def run(records: int, requests: int, home: Path) -> dict:
    os.environ["FINDISTIL_HOME"] = str(home)
    from findistil import taxonomy
    from findistil.config import load_settings
    from findistil.loaders import demo_path

    settings = load_settings(data_split_config={"eval_size": 50, "min_total_records": 50})
    t0 = time.perf_counter()
    job = _job(settings, records)
    job_s = time.perf_counter() - t0
    models = [n["customizations"][0]["customized_model"] for n in job["nims"]]
    with demo_path().open(encoding="utf-8") as f:  # the demo's headlines, last first
        headlines = [row["headline"] for row in csv.DictReader(f)][::-1][:requests]
    prompts = [taxonomy.build_messages(h) for h in headlines]
    rows = []
    for max_batch in (16, 1):
        rows += _measure(settings.model_copy(update={"serve_max_batch": max_batch}), models,
                         prompts, requests)  # fmt: skip
    return {"records": records, "job_id": job["id"], "job_s": job_s, "rows": rows}


def print_table(result: dict) -> None:
    lines = [
        "| student | batching | clients | req/s | p50 s | p95 s | mean batch | same answers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        name = r["model"].split("/")[-1].split("@")[0]
        lines.append(
            f"| {name} | {'on (16)' if r['max_batch'] > 1 else 'off'} | {r['clients']} | "
            f"{r['req_per_s']:.1f} | {r['p50_s']:.3f} | {r['p95_s']:.3f} | "
            f"{r['mean_batch']:.1f} | {r['same_as_alone']} |"
        )
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=300)
    parser.add_argument("--requests", type=int, default=64, help="per model and concurrency")
    args = parser.parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="findistil-serving-"))
    started = time.perf_counter()
    result = run(args.records, args.requests, home)
    finish(result, "serving", started, argv)
    print_table(result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
