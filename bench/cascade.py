"""Cascade benchmark: a tuned student in front of a teacher, on real headlines, end to end.

What it measures (issue "Close the loop", part 3): one flywheel job over ``--records``
teacher-labelled pool headlines (``../shared/data/benchmark/news_headlines_teacher.csv``,
stratified, seed 42) with the encoder student only (all-MiniLM-L6-v2 + head, the demo's
recommendation); its calibration (temperature, threshold for ``cascade.target_agreement``,
coverage and agreement on the eval split) as the job reports it; then the student is
deployed behind ``findistil/route-news_classifier`` with the packaged local teacher
(Qwen2.5-Coder-1.5B on xllamacpp, label grammar) as the fallback, and ``--rows`` headlines
of the human-labelled gold set (never trained on) go through the route over real HTTP.
Each of the three systems — student alone, local teacher alone, the cascade — is scored
against the big teacher's labels and against people, with its share of teacher calls and
mean latency. The calibration targets agreement with the job's teacher (the 70B labels in
the pool); the local fallback is a weaker teacher, so the cascade's figure against people
is bounded by both.

Run: ``python bench/cascade.py`` (3,000 records, 100 gold rows; ~15 min here). Writes
``bench/results/cascade-<date>.json``, prints a markdown table, ends with one JSON line.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import finish  # noqa: E402
from flywheel import GOLD_CSV, POOL_CSV, peak_rss_mb, write_subset  # noqa: E402

ROUTE = "findistil/route-news_classifier"


def _ask(http: httpx.Client, model: str, headline: str) -> tuple[dict, float]:
    from findistil import taxonomy

    body = {"model": model, "messages": taxonomy.build_messages(headline), "max_tokens": 16}
    started = time.perf_counter()
    answer = http.post("/v1/chat/completions", json=body, timeout=300)
    answer.raise_for_status()
    return answer.json(), time.perf_counter() - started


def _label(answer: dict) -> str | None:
    from findistil import taxonomy

    parsed = taxonomy.parse_label(answer["choices"][0]["message"]["content"])
    return parsed.label if parsed.parseable else None


def _scores(name: str, labels: list, gold: list[dict], latencies: list, teacher_calls: int):
    from findistil import taxonomy

    n = len(gold)
    pairs = list(zip(labels, gold, strict=True))
    vs_teacher = sum(lab == taxonomy.canonical_label(r["teacher_label"]) for lab, r in pairs)
    vs_people = sum(lab == taxonomy.canonical_label(r["human_label"]) for lab, r in pairs)
    return {
        "system": name,
        "accuracy_vs_teacher": vs_teacher / n,
        "accuracy_vs_people": vs_people / n,
        "teacher_calls": teacher_calls / n,
        "mean_latency_s": sum(latencies) / n,
    }


def _job(client, settings, records: int, eval_size: int, home: Path) -> dict:
    from findistil import taxonomy
    from findistil.console import follow_job
    from findistil.loaders import load_file
    from findistil.logstore import open_logstore

    pool = list(csv.DictReader(POOL_CSV.open()))
    subset = write_subset(pool, records, home / "pool.csv")
    with open_logstore(settings) as store:
        load_file(subset, store, client_id="bench", replace=True)
    created = client.create_job(taxonomy.WORKLOAD_ID, "bench", {"eval_size": eval_size})
    job = follow_job(client, created["id"], lambda _e: None, interval=2.0)
    if job["status"] != "completed":
        raise SystemExit(f"job {job['id']} {job['status']}: {job.get('error')}")
    return job


def run(records: int, rows: int, eval_size: int, home: Path) -> dict:
    os.environ["FINDISTIL_HOME"] = str(home)
    from findistil import taxonomy
    from findistil.api.app import BackgroundServer, create_app
    from findistil.config import MINILM, load_settings
    from findistil.console import ApiClient
    from findistil.local_teacher import TEACHER_MODEL, label_grammar, start_server

    nim = {"model_name": MINILM, "kind": "encoder",
           "training_config": {"epochs": 6, "learning_rate": 3e-4, "batch_size": 16}}  # fmt: skip
    settings = load_settings(nims=[nim])
    gold = list(csv.DictReader(GOLD_CSV.open()))[:rows]
    teacher = start_server(
        settings, grammar=label_grammar([taxonomy.format_answer(x) for x in taxonomy.LABELS])
    )
    teacher_url = teacher.listening_address + "/v1"
    with BackgroundServer(create_app(settings)) as server:
        client = ApiClient(server.url, timeout=300)
        t0 = time.perf_counter()
        job = _job(client, settings, records, eval_size, home)
        job_s = time.perf_counter() - t0
        fallback = {"base_url": teacher_url, "model": TEACHER_MODEL}
        deployed = client.deploy(job["id"], teacher=fallback)
        http = httpx.Client(base_url=server.url)
        systems = []
        for name, model in (("student alone", deployed["customized_model"]), ("cascade", ROUTE)):
            labels, latencies, calls = [], [], 0
            for r in gold:
                answer, seconds = _ask(http, model, r["headline"])
                labels.append(_label(answer))
                latencies.append(seconds)
                calls += (answer.get("findistil") or {}).get("route") == "teacher"
            systems.append(_scores(name, labels, gold, latencies, calls))
        teacher_http = httpx.Client(base_url=teacher_url.removesuffix("/v1"))
        labels, latencies = [], []
        for r in gold:
            answer, seconds = _ask(teacher_http, TEACHER_MODEL, r["headline"])
            labels.append(_label(answer))
            latencies.append(seconds)
        systems.insert(1, _scores("local teacher alone", labels, gold, latencies, len(gold)))
        logged = client.list_deployments("news_classifier")[0]
    (cand,) = job["nims"]
    cascade = cand["cascade"]
    return {
        "records": records,
        "job_id": job["id"],
        "job_s": job_s,
        "eval": {k: cand["evaluations"][-1]["scores"].get(k) for k in ("accuracy", "macro_f1")},
        "calibration": {k: v for k, v in cascade.items() if k != "labels"},
        "gold_rows": rows,
        "systems": systems,
        "route_requests": logged["requests"],
        "route_student_share": logged["student_share"],
    }


def print_table(result: dict) -> None:
    c = result["calibration"]
    print(
        f"calibration on val ({c['val_rows']} rows): T = {c['temperature']:.2f}, threshold "
        f"{c['threshold']}, target agreement {c['target_agreement']}; on eval: coverage "
        f"{c['coverage']:.3f}, agreement {c['agreement']:.3f}, ECE {c['calibration_error']:.3f} "
        f"(uncalibrated {c['calibration_error_uncalibrated']:.3f})\n"
    )
    lines = [
        f"| system ({result['gold_rows']} gold headlines) | acc vs 70B teacher | acc vs people | "
        "teacher calls | mean latency s |",
        "|---|---|---|---|---|",
    ]
    for s in result["systems"]:
        lines.append(
            f"| {s['system']} | {s['accuracy_vs_teacher']:.3f} | {s['accuracy_vs_people']:.3f} | "
            f"{s['teacher_calls']:.0%} | {s['mean_latency_s']:.3f} |"
        )
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=3000)
    parser.add_argument("--rows", type=int, default=100, help="gold headlines routed")
    parser.add_argument("--eval-size", type=int, default=200)
    args = parser.parse_args(argv)
    from findistil.local_teacher import PIP, gguf_available

    if not POOL_CSV.exists() or not GOLD_CSV.exists():
        print(f"benchmark data not found under {POOL_CSV.parent}: skipping")
        return 0
    if not gguf_available():
        print(f"the local teacher is not installed ({PIP}): skipping")
        return 0
    home = Path(tempfile.mkdtemp(prefix="findistil-cascade-"))
    started = time.perf_counter()
    result = run(args.records, args.rows, args.eval_size, home)
    result["peak_rss_mb"] = peak_rss_mb()
    finish(result, "cascade", started, argv)
    print_table(result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
