"""Flywheel benchmark: the whole flywheel on real teacher-labelled headlines, per data size.

What it measures (issue "Benchmark harness"): for each size (1,000 / 3,000 / 9,043 records,
stratified subsets of ``../shared/data/benchmark/news_headlines_teacher.csv``, seed 42, like
upstream's 5K/10K/25K runs) one flywheel job over the real API with the default candidates
(SmolLM2-135M + LoRA, all-MiniLM-L6-v2 + head), eval_size 200, and records
- base / ICL / customized ``f1_score``, accuracy and macro-F1 against the teacher;
- accuracy and macro-F1 against *people* on ``gold_human.csv`` (1,025 headlines, never trained
  on: the script checks that no gold headline is in a training set) for each tuned student;
- wall-clock per stage, training examples/s, inference s/row and rows/s, peak RSS;
- the local teacher (Qwen2.5-Coder-1.5B via xllamacpp, when installed) labelling the same 200
  eval headlines: s/headline, params, agreement with the teacher labels, and the cost ratio.

Run: ``python bench/flywheel.py --quick`` (1,000 only) or ``--sizes 1000,3000,9043``.
Writes ``bench/results/flywheel-<date>-<sizes>.json``, prints a markdown table and ends stdout with
one JSON line.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
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
BENCH_DATA = REPO.parent / "shared" / "data" / "benchmark"
POOL_CSV = BENCH_DATA / "news_headlines_teacher.csv"
GOLD_CSV = BENCH_DATA / "gold_human.csv"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_subset(rows: list[dict], n: int, out: Path) -> Path:
    from findistil.loaders import _stratified_subset

    keyed = [{"label": r["teacher_label"], **r} for r in rows]
    keep = range(len(rows)) if n >= len(rows) else _stratified_subset(keyed, n, seed=42)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "headline", "teacher_label"])
        writer.writeheader()
        for i in keep:
            writer.writerow({k: rows[i][k] for k in ("id", "headline", "teacher_label")})
    return out


def headline_of(messages: list[dict]) -> str:
    from findistil import taxonomy

    text = next(m["content"] for m in messages if m["role"] == "user")
    return text.split(taxonomy.HEADLINE_OPEN, 1)[1].split(taxonomy.HEADLINE_CLOSE, 1)[0].strip()


def check_gold_not_trained(job_dir: Path, gold: set[str]) -> int:
    """Number of training/validation rows checked; raises if a gold headline is among them."""
    checked = 0
    for path in job_dir.rglob("*_data.jsonl"):
        if path.name == "eval_data.jsonl":
            continue
        for line in path.read_text().splitlines():
            headline = headline_of(json.loads(line)["messages"])
            if headline in gold:
                raise SystemExit(f"gold headline found in training data {path}: {headline!r}")
            checked += 1
    return checked


def score_students_on_gold(settings, job: dict, gold_rows: list[dict]) -> dict:
    from findistil import taxonomy
    from findistil.report import score_against_people
    from findistil.students import load_student

    conversations = [taxonomy.build_messages(r["headline"]) for r in gold_rows]
    results = {}
    tuned = {
        nim["model_name"]: settings.artifacts_root / cust["adapter_key"]
        for nim in job["nims"]
        for cust in nim.get("customizations", [])
        if cust.get("adapter_key")
    }
    for nim_cfg in settings.nims:
        path = tuned.get(nim_cfg.model_name)
        if not path:
            continue
        student = load_student(nim_cfg.model_name, nim_cfg.kind, settings)
        student.use_tuned(Path(path))
        start = time.perf_counter()
        preds = student.predict(
            conversations,
            max_new_tokens=settings.evaluation_config.max_new_tokens,
            mode=settings.evaluation_config.scoring_mode,
            labels=[taxonomy.format_answer(label) for label in taxonomy.LABELS],
            batch_size=settings.evaluation_config.batch_size,
        )
        seconds = time.perf_counter() - start
        student.close()
        answers = {r["headline"]: p.text for r, p in zip(gold_rows, preds, strict=True)}
        scores = score_against_people(answers, GOLD_CSV)
        results[nim_cfg.model_name] = {
            "accuracy": scores["accuracy"],
            "macro_f1": scores["macro_f1"],
            "intervals": scores.get("intervals"),  # 95% bootstrap [lo, hi]
            "s_per_row": seconds / len(gold_rows),
        }
    return results


def run_teacher(settings, eval_path: Path) -> dict | None:
    from findistil import records, taxonomy, teacher
    from findistil.metrics import classification_scores

    if not teacher.local_teacher_available():
        return None
    rows = [json.loads(line) for line in eval_path.read_text().splitlines()]
    local = teacher.LocalTeacher(settings)
    grammar = teacher.label_grammar()
    local.chat(rows[0]["request"]["messages"], grammar=grammar)  # warm the prompt cache
    start = time.perf_counter()
    outputs = [local.chat(r["request"]["messages"], grammar=grammar).text for r in rows]
    seconds = time.perf_counter() - start
    local.close()
    pred = [taxonomy.parse_label(o) for o in outputs]
    ref = [taxonomy.parse_label(records.answer_text(r)).label for r in rows]
    scores = classification_scores([p.label for p in pred], ref, [p.parseable for p in pred])
    return {
        "model": teacher.LOCAL_TEACHER_ID,
        "params": teacher.LocalTeacher.params_count,
        "rows": len(rows),
        "s_per_row": seconds / len(rows),
        "accuracy_vs_teacher_labels": scores["accuracy"],
        "macro_f1_vs_teacher_labels": scores["macro_f1"],
    }


def run(sizes: list[int], eval_size: int, home: Path) -> dict:
    os.environ["FINDISTIL_HOME"] = str(home)
    from findistil import taxonomy
    from findistil.api.app import BackgroundServer, create_app
    from findistil.config import load_settings
    from findistil.console import ApiClient, follow_job
    from findistil.loaders import load_file
    from findistil.logstore import open_logstore

    settings = load_settings()
    pool = list(csv.DictReader(POOL_CSV.open()))
    gold_rows = list(csv.DictReader(GOLD_CSV.open()))
    gold = {r["headline"].strip() for r in gold_rows}
    data_dir = home / "bench-input"
    data_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    teacher_row = None
    with BackgroundServer(create_app(settings)) as server:
        client = ApiClient(server.url, timeout=120)
        for n in sizes:
            client_id = f"news-classifier-{min(n, len(pool))}"
            subset = write_subset(pool, n, data_dir / f"{client_id}.csv")
            t0 = time.perf_counter()
            with open_logstore(settings) as store:
                report = load_file(subset, store, client_id=client_id, replace=True)
            load_s = time.perf_counter() - t0
            created = client.create_job(taxonomy.WORKLOAD_ID, client_id, {"eval_size": eval_size})
            t0 = time.perf_counter()
            job = follow_job(client, created["id"], lambda _e: None, interval=2.0)
            job_s = time.perf_counter() - t0
            job_dir = settings.artifacts_root / "jobs" / created["id"]
            checked = check_gold_not_trained(job_dir, gold)
            t0 = time.perf_counter()
            gold_scores = score_students_on_gold(settings, job, gold_rows)
            gold_s = time.perf_counter() - t0
            if teacher_row is None:
                eval_path = next(job_dir.rglob("eval_data.jsonl"), None)
                if eval_path is not None:
                    teacher_row = run_teacher(settings, eval_path)
            results.append(
                {
                    "records": report.loaded,
                    "client_id": client_id,
                    "job_id": created["id"],
                    "status": job["status"],
                    "error": job.get("error"),
                    "load_s": load_s,
                    "job_s": job_s,
                    "gold_scoring_s": gold_s,
                    "train_rows_checked_against_gold": checked,
                    "peak_rss_mb": peak_rss_mb(),
                    "recommendation": job.get("recommendation"),
                    "nims": [summarise_nim(nim, gold_scores) for nim in job["nims"]],
                }
            )
            print_table(results, teacher_row)
        client.close()
    return {"sizes": results, "teacher": teacher_row}


def summarise_nim(nim: dict, gold_scores: dict) -> dict:
    evals = {}
    for ev in nim.get("evaluations", []):
        s = ev.get("scores") or {}
        evals[ev["eval_type"]] = {
            k: s.get(k)
            for k in ("f1_score", "accuracy", "macro_f1", "rows_per_s", "mean_latency_s")
        } | {
            "intervals": ev.get("intervals"),  # 95% bootstrap [lo, hi] of accuracy, macro-F1
            "runtime_s": ev.get("runtime_seconds"),
            "error": ev.get("error"),
        }
    cust = (nim.get("customizations") or [{}])[0]
    return {
        "model": nim["model_name"],
        "status": nim.get("status"),
        "params": nim.get("params"),
        "evals": evals,
        "training_s": cust.get("runtime_seconds"),
        "examples_per_s": nim.get("examples_per_s"),
        "runtime_s": nim.get("runtime_seconds"),
        "gold": gold_scores.get(nim["model_name"]),
        "error": nim.get("error"),
    }


def _f(v, fmt=".3f") -> str:
    return "–" if v is None else format(v, fmt)


def _ci(scores: dict, key: str) -> str:
    """``0.820 [0.77, 0.87]``: the score and its 95% bootstrap interval when there is one."""
    value = _f(scores.get(key))
    interval = (scores.get("intervals") or {}).get(key)
    return f"{value} [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else value


def print_table(results: list[dict], teacher_row: dict | None) -> None:
    lines = [
        "| records | student | eval | f1_score | accuracy | macro-F1 | rows/s | "
        "vs people acc / macro-F1 | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for size in results:
        for nim in size["nims"]:
            for name, ev in nim["evals"].items():
                gold = nim["gold"] if name == "customized-eval" else None
                people = f"{_ci(gold, 'accuracy')} / {_ci(gold, 'macro_f1')}" if gold else ""
                lines.append(
                    f"| {size['records']} | {Path(nim['model']).name} | {name} | "
                    f"{_f(ev['f1_score'])} | {_ci(ev, 'accuracy')} | {_ci(ev, 'macro_f1')} | "
                    f"{_f(ev['rows_per_s'], '.1f')} | {people} | "
                    f"{_f(nim['training_s'], '.0f') if name == 'customized-eval' else ''} |"
                )
    if teacher_row:
        lines.append(
            f"\nlocal teacher {teacher_row['model']} ({teacher_row['params'] / 1e9:.2f}B): "
            f"{teacher_row['s_per_row']:.2f} s/headline, agreement with teacher labels "
            f"{teacher_row['accuracy_vs_teacher_labels']:.3f} on {teacher_row['rows']} rows"
        )
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,3000,9043")
    parser.add_argument("--quick", action="store_true", help="1,000 records only")
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--home", type=Path, default=None, help="FINDISTIL_HOME (default: tmp)")
    args = parser.parse_args(argv)
    if not POOL_CSV.exists() or not GOLD_CSV.exists():
        print(f"benchmark data not found under {BENCH_DATA}: skipping")
        return 0
    sizes = [1000] if args.quick else [int(s) for s in args.sizes.split(",")]
    home = args.home or Path(tempfile.mkdtemp(prefix="findistil-bench-"))
    started = time.perf_counter()
    result = run(sizes, args.eval_size, home)
    sha = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    import torch
    import transformers

    result |= {
        "date": dt.date.today().isoformat(),
        "git_sha": sha,
        "machine": f"{os.cpu_count()} CPU cores, no GPU, {platform.platform()}",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "eval_size": args.eval_size,
        "total_wall_s": time.perf_counter() - started,
        "peak_rss_mb": peak_rss_mb(),
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
    }
    tag = "-".join(str(n) for n in sizes)
    out = REPO / "bench" / "results" / f"flywheel-{result['date']}-{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {out.relative_to(REPO)}; total {result['total_wall_s']:.0f}s")
    print(json.dumps({"total_wall_s": result["total_wall_s"], "sizes": sizes}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
