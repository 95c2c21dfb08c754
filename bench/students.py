"""Benchmark of the students: what prompt pruning and prefix reuse buy on a CPU.

Measures, for SmolLM2-135M-Instruct (LoRA) and all-MiniLM-L6-v2 (full fine-tune + head):

* training examples/s with prompt pruning (the headline only) and without (the full prompt);
* peak RSS of each step (every step runs in a fresh child process, ``VmHWM``);
* SmolLM2 greedy generation s/row on the full upstream-style prompt, with and without
  shared-prefix KV reuse (``students/engine.py``; the first call computes the prefix once);
* SmolLM2 label-scoring s/row (13 answers ranked by log-likelihood), full and pruned prompt.

Rows come from ``../shared/data/benchmark/news_headlines_teacher.csv`` (teacher labels) and
the requests of ``upstream_news_classifier_500.jsonl`` when present (else the packaged demo
headlines in findistil's own prompt). Weights come from the model cache under
``FINDISTIL_HOME`` (the first run converts SmolLM2's GGUF once, ~20 s).

The CPU is shared: the load average before and after is printed with the numbers, since
two busy neighbours make a 2-thread torch run several times slower.

    python bench/students.py [--rows 64] [--full-rows 8] [--gen-rows 16] [--only smollm2]

Prints a table, then one JSON line with the numbers and run info.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH_DATA = REPO.parent / "shared" / "data" / "benchmark"
DEMO = REPO / "src" / "findistil" / "data" / "demo_headlines.csv"


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------- data


def headline_rows(n: int) -> list[dict]:
    """Training rows (findistil's prompt + teacher answer) from the teacher-labelled pool."""
    from findistil import taxonomy

    path = BENCH_DATA / "news_headlines_teacher.csv"
    with (path if path.is_file() else DEMO).open(newline="") as fh:
        pool = list(csv.DictReader(fh))
    rows = []
    for r in pool[:n]:
        label = r.get("teacher_label") or r["label"]
        answer = {"role": "assistant", "content": taxonomy.format_answer(label)}
        rows.append({"messages": taxonomy.build_messages(r["headline"]) + [answer]})
    return rows


def upstream_requests(n: int) -> tuple[list[list[dict]], str]:
    """Full upstream-style requests: the real upstream log rows when present."""
    path = BENCH_DATA / "upstream_news_classifier_500.jsonl"
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if line.strip()][:n]
        return [json.loads(line)["request"]["messages"] for line in lines], "upstream"
    return [r["messages"][:-1] for r in headline_rows(n)], "findistil"


# ---------------------------------------------------------------------------- child steps


def step_smollm2_train(args) -> dict:
    from findistil.config import SMOLLM2, LoraConfig, TrainingConfig, load_settings
    from findistil.students import load_student

    student = load_student(SMOLLM2, settings=load_settings())
    pruning = args.pruning == "on"
    n = args.rows if pruning else args.full_rows
    micro = 16 if pruning else 4
    training = TrainingConfig(
        epochs=1, batch_size=min(16, n), micro_batch_size=micro, prompt_pruning=pruning
    )
    out = Path(args.tmp) / f"lora-{args.pruning}"
    res = student.train(headline_rows(n), [], out, training=training, lora=LoraConfig())
    return {
        "rows": n,
        "examples_per_s": res.metrics["examples_per_s"],
        "tokens_per_row": res.metrics["mean_tokens_per_row"],
        "seconds": res.metrics["train_seconds"],
    }


def step_minilm_train(args) -> dict:
    from findistil.config import MINILM, TrainingConfig, load_settings
    from findistil.students import load_student

    student = load_student(MINILM, settings=load_settings())
    pruning = args.pruning == "on"
    n = args.rows * 4 if pruning else args.full_rows * 4
    training = TrainingConfig(
        epochs=1,
        batch_size=32,
        micro_batch_size=32 if pruning else 8,
        learning_rate=5e-5,
        prompt_pruning=pruning,
    )
    res = student.train(
        headline_rows(n), [], Path(args.tmp) / f"enc-{args.pruning}", training=training
    )
    ids = student._encode([student.input_text(r["messages"][:-1]) for r in headline_rows(8)])
    return {
        "rows": n,
        "examples_per_s": res.metrics["examples_per_s"],
        "tokens_per_row": round(sum(map(len, ids)) / len(ids), 1),
        "seconds": res.metrics["train_seconds"],
    }


def step_smollm2_infer(args) -> dict:
    from findistil import taxonomy
    from findistil.config import SMOLLM2, load_settings
    from findistil.students import load_student
    from findistil.students.pruning import PruningRule

    student = load_student(SMOLLM2, settings=load_settings())
    engine = student.engine
    requests, source = upstream_requests(args.gen_rows)
    labels = [taxonomy.format_answer(label) for label in taxonomy.LABELS]
    out: dict = {"prompt_source": source, "rows": len(requests)}

    def timed(fn, rows) -> tuple[float, list]:
        t0 = time.perf_counter()
        result = fn(rows)
        return (time.perf_counter() - t0) / len(rows), result

    s, gens = timed(lambda r: engine.generate(r, 16, prefix_reuse=True), requests)
    out["gen_reuse_s_per_row"] = s
    out["prompt_tokens"] = round(sum(g.prompt_tokens for g in gens) / len(gens), 1)
    few = requests[: max(1, args.gen_rows // 2)]
    s, gens_plain = timed(lambda r: engine.generate(r, 16, prefix_reuse=False), few)
    out["gen_no_reuse_s_per_row"] = s
    out["gen_no_reuse_rows"] = len(few)
    out["same_text"] = all(a.text == b.text for a, b in zip(gens, gens_plain, strict=False))
    s, _ = timed(lambda r: engine.score_labels(r, labels), requests)
    out["score_full_s_per_row"] = s
    rule = PruningRule.detect(requests)
    compact = [rule.apply(r) for r in requests]
    s, _ = timed(lambda r: engine.score_labels(r, labels), compact)
    out["score_pruned_s_per_row"] = s
    s, _ = timed(lambda r: engine.generate(r, 16), compact)
    out["gen_pruned_s_per_row"] = s
    return out


STEPS = {
    "smollm2-train": step_smollm2_train,
    "minilm-train": step_minilm_train,
    "smollm2-infer": step_smollm2_infer,
}


def run_child(name: str, args, **extra) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--tmp", args.tmp]
    for key in ("rows", "full_rows", "gen_rows"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    for key, value in extra.items():
        cmd += [f"--{key}", str(value)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True)
        return out.stdout.decode().strip()
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64, help="SmolLM2 pruned training rows")
    parser.add_argument("--full-rows", type=int, default=8, help="SmolLM2 full-prompt rows")
    parser.add_argument("--gen-rows", type=int, default=16, help="rows for generation/scoring")
    parser.add_argument("--only", choices=["smollm2", "minilm"], default=None)
    parser.add_argument("--child", choices=list(STEPS), help=argparse.SUPPRESS)
    parser.add_argument("--pruning", choices=["on", "off"], default="on", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        import warnings

        warnings.filterwarnings("ignore")
        result = STEPS[args.child](args)
        result["peak_rss_mb"] = round(peak_rss_mb())
        print(json.dumps(result))
        return

    import tempfile

    import torch

    load_before = os.getloadavg()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        if args.only in (None, "smollm2"):
            results["smollm2_train_pruned"] = run_child("smollm2-train", args, pruning="on")
            results["smollm2_train_full"] = run_child("smollm2-train", args, pruning="off")
            results["smollm2_infer"] = run_child("smollm2-infer", args)
        if args.only in (None, "minilm"):
            results["minilm_train_pruned"] = run_child("minilm-train", args, pruning="on")
            results["minilm_train_full"] = run_child("minilm-train", args, pruning="off")
    load_after = os.getloadavg()

    print(f"{'measurement':<44} {'value':>12}  {'peak RSS':>9}")

    def line(label: str, value, unit: str, rss=None) -> None:
        shown = f"{value:.3f} {unit}" if isinstance(value, float) else f"{value} {unit}"
        print(f"{label:<44} {shown:>12}  {'' if rss is None else f'{rss} MB':>9}")

    for key, label in [
        ("smollm2_train_pruned", "SmolLM2 LoRA train, pruned prompt"),
        ("smollm2_train_full", "SmolLM2 LoRA train, full prompt"),
        ("minilm_train_pruned", "MiniLM fine-tune, pruned input"),
        ("minilm_train_full", "MiniLM fine-tune, full prompt (last 512)"),
    ]:
        r = results.get(key)
        if not r:
            continue
        if "error" in r:
            print(f"{label:<44} failed: {r['error']}")
            continue
        line(
            f"{label} ({r['tokens_per_row']} tok/row)",
            r["examples_per_s"],
            "ex/s",
            r["peak_rss_mb"],
        )
    inf = results.get("smollm2_infer")
    if inf and "error" not in inf:
        src = f"{inf['prompt_source']} prompt, {inf['prompt_tokens']} tok"
        line(f"SmolLM2 generate, {src}, prefix reuse", inf["gen_reuse_s_per_row"], "s/row")
        line(
            f"SmolLM2 generate, {src}, no reuse",
            inf["gen_no_reuse_s_per_row"],
            "s/row",
            inf["peak_rss_mb"],
        )
        line("SmolLM2 generate, pruned prompt", inf["gen_pruned_s_per_row"], "s/row")
        line(
            "SmolLM2 label scoring (13), full prompt + reuse", inf["score_full_s_per_row"], "s/row"
        )
        line("SmolLM2 label scoring (13), pruned prompt", inf["score_pruned_s_per_row"], "s/row")
        speedup = inf["gen_no_reuse_s_per_row"] / max(inf["gen_reuse_s_per_row"], 1e-9)
        print(f"prefix reuse speed-up {speedup:.1f}x (same answers: {inf['same_text']})")
    elif inf:
        print(f"SmolLM2 inference failed: {inf['error']}")
    print(
        f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f} "
        f"on {os.cpu_count()} CPUs (torch threads {torch.get_num_threads()})"
    )
    import peft
    import transformers

    print(
        json.dumps(
            {
                "bench": "students",
                "results": results,
                "run": {
                    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    "git_sha": git_sha(),
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "peft": peft.__version__,
                    "cpus": os.cpu_count(),
                    "load_avg_before": load_before[0],
                    "load_avg_after": load_after[0],
                    "args": {k: v for k, v in vars(args).items() if k not in {"child", "tmp"}},
                },
            }
        )
    )


if __name__ == "__main__":
    main()
