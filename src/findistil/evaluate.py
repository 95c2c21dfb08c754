"""One evaluation: a student answers every eval row, its answers are scored against the teacher.

Where it sits: after curation (eval rows = whole log records, REFERENCE §4) and, for
``customized-eval``, after training; the orchestrator's eval stages call ``evaluate`` and
store ``EvalResult.scores`` as the API's ``scores``. A notebook can call it directly::

    student = load_student("HuggingFaceTB/SmolLM2-135M-Instruct")
    result = evaluate(student, curated.eval_rows, "base-eval", out_dir=Path("evals/base"),
                      eval_config=settings.evaluation_config)
    result.scores["f1_score"], result.scores["accuracy"]

The three types differ only in what the student is given: ``base-eval`` and
``customized-eval`` (the caller has switched the student to its adapter with ``use_tuned``)
send ``request.messages`` unchanged; ``icl-eval`` injects few-shot examples from the train rows
(``findistil.icl``). The reference is the teacher's trimmed answer. Every student kind goes
through the same path: an encoder student's ``predict`` returns answer strings too.

Scoring modes (``eval_config.scoring_mode``, recorded in ``report["scoring_mode"]``):
``generate`` is upstream-faithful free greedy generation; ``label_scores`` has the student rank
the candidate answers instead (the distinct teacher answers of the train rows when given, else
``[[label]]`` for all 13 classes), so every output parses.

Files (written only when the whole evaluation finished, each via temp file + rename, so a
cancelled or failed run leaves nothing half-written): ``out_dir/predictions.jsonl`` (one line
per row) and ``out_dir/scores.json`` (scores, per-class report, confusion matrix, configs).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from findistil import metrics
from findistil.artifacts import write_files_atomically
from findistil.config import EvaluationConfig, ICLConfig
from findistil.errors import Cancelled, DataError
from findistil.progress import Progress, ProgressFn, StopFn, never_stop, no_progress
from findistil.records import answer_text
from findistil.students.base import Prediction, Student
from findistil.workloads import ClassificationWorkload, Workload, resolve_workload

EVAL_TYPES = ("base-eval", "icl-eval", "customized-eval")
PREDICTIONS_FILE = "predictions.jsonl"
SCORES_FILE = "scores.json"


@dataclass
class EvalResult:
    """What one evaluation produced (``scores`` is what the jobs API shows)."""

    eval_type: str
    scores: dict[str, Any]
    predictions_path: Path
    scores_path: Path
    report: dict[str, Any] = field(default_factory=dict)


def _conversations(eval_rows: Sequence[dict[str, Any]]) -> tuple[list[list[dict]], list[str]]:
    conversations, references = [], []
    for i, row in enumerate(eval_rows):
        try:
            messages = row["request"]["messages"]
            reference = answer_text(row).strip()
        except (KeyError, IndexError, TypeError, AttributeError):
            raise DataError(
                f"eval row {i}: expected a log record with request.messages and "
                "response.choices[0].message; pass the rows of eval_data.jsonl"
            ) from None
        if not isinstance(messages, list) or not messages:
            raise DataError(f"eval row {i}: request.messages must be a non-empty list")
        conversations.append([dict(m) for m in messages])
        references.append(reference)
    return conversations, references


def candidate_answers(
    train_rows: Sequence[dict[str, Any]] | None,
    labels: Sequence[str] | None = None,
    workload: Workload | None = None,
) -> list[str]:
    """The answers ``label_scores`` ranks: ``labels`` if given, else the distinct teacher
    answers in ``train_rows`` (sorted), else the workload's (the 13 financial classes)."""
    if labels:
        return list(dict.fromkeys(labels))
    answers = sorted(
        {
            str(row["messages"][-1].get("content") or "").strip()
            for row in train_rows or []
            if row.get("messages")
        }
        - {""}
    )
    workload = workload or ClassificationWorkload.financial()
    return answers or workload.candidate_answers()


ANSWER_MARGIN = 4  # tokens a classification answer may take beyond the longest label


def _generation_budget(student, workload, train_rows, labels, eval_config) -> int:
    """``max_new_tokens`` for free generation. A classification answer is a label: text past
    the longest one (+ ``ANSWER_MARGIN``) parses as no label, so generating it only costs
    time (a base model echoing the headline until the budget runs out). Other workloads, and
    students that cannot count an answer's tokens, get the configured budget."""
    length = getattr(student, "answer_length", None)
    if not isinstance(workload, ClassificationWorkload) or not callable(length):
        return eval_config.max_new_tokens
    answers = candidate_answers(train_rows, labels, workload)
    longest = max(length(a) for a in answers)
    return min(eval_config.max_new_tokens, longest + ANSWER_MARGIN)


def _token_counter(student: Student):
    """The student's own tokenizer for the ICL budget when it exposes one, else the heuristic."""
    from findistil.icl import approx_tokens

    tokenizer = getattr(student, "tokenizer", None)
    if tokenizer is None or not callable(tokenizer):
        return approx_tokens
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def evaluate(
    student: Student,
    eval_rows: Sequence[dict[str, Any]],
    eval_type: str,
    *,
    out_dir: Path,
    eval_config: EvaluationConfig,
    train_rows: Sequence[dict[str, Any]] | None = None,
    icl_config: ICLConfig | None = None,
    labels: Sequence[str] | None = None,
    progress: ProgressFn = no_progress,
    should_stop: StopFn = never_stop,
) -> EvalResult:
    """Run ``student`` over ``eval_rows`` and score its answers against the teacher's.

    Args:
        student: any loaded student (causal LM with or without adapter, encoder).
        eval_rows: whole log records (``eval_data.jsonl``).
        eval_type: ``base-eval``, ``icl-eval`` or ``customized-eval``.
        out_dir: where ``predictions.jsonl`` and ``scores.json`` go (created at the end).
        eval_config: scoring mode, ``max_new_tokens``, ``batch_size``, ``workload_type``.
        train_rows: ``icl-eval``'s example pool; also the candidate answers of label scoring.
        icl_config: few-shot settings (default ``ICLConfig()``).
        labels: candidate answers for ``label_scores`` (overrides the train answers).
        progress: called after every batch with stage = ``eval_type``.
        should_stop: checked between batches; when true, raises ``Cancelled``, writes nothing.

    Returns:
        ``EvalResult`` whose ``scores`` hold only floats (upstream types them
        ``dict[str, float]``): ``f1_score`` (upstream's token F1), ``mean_latency_s``,
        ``rows_per_s`` and, for classification workloads, ``accuracy``, ``macro_f1``,
        ``weighted_f1``, ``unparseable_rate``; ``report`` holds ``scoring_mode``, ``counts``
        (``rows``, ``prompt_tokens``, ``completion_tokens``), per-class scores, the confusion.
    """
    if eval_type not in EVAL_TYPES:
        raise DataError(f"unknown eval_type {eval_type!r}: use one of {', '.join(EVAL_TYPES)}")
    if not eval_rows:
        raise DataError("no eval rows to evaluate: curate a dataset with eval_size >= 1 first")
    conversations, references = _conversations(eval_rows)
    workload = resolve_workload(eval_config.workload_type, eval_rows, eval_config.labels)
    mode = eval_config.scoring_mode
    answers = candidate_answers(train_rows, labels, workload) if mode == "label_scores" else None
    if mode == "generate":
        budget = _generation_budget(student, workload, train_rows, labels, eval_config)
        eval_config = eval_config.model_copy(update={"max_new_tokens": budget})
    example_ids: list[list[int]] | None = None
    report: dict[str, Any] = {"workload": workload.name, "scoring_mode": mode}
    if eval_type == "icl-eval":
        icl_config = icl_config or ICLConfig()
        conversations, example_ids, report["icl"] = _with_examples(
            student, conversations, train_rows, icl_config
        )
    if answers is not None:
        report["candidate_answers"] = answers

    started = time.perf_counter()
    predictions = _predict_all(
        student, conversations, eval_type, eval_config, answers, progress, should_stop
    )
    wall = time.perf_counter() - started
    outputs = [p.text or "" for p in predictions]
    scores, report["counts"] = _scores(predictions, outputs, references, wall)
    extra, details, row_fields = workload.score(outputs, references)
    scores.update(extra)
    report.update(details)
    lines = _prediction_lines(eval_rows, predictions, references, row_fields, example_ids)
    return _write_outputs(student, eval_type, scores, report, lines, Path(out_dir),
                          eval_config, icl_config)  # fmt: skip


def _write_outputs(student, eval_type, scores, report, lines, out_dir, eval_config, icl_config):
    """``predictions.jsonl`` and ``scores.json`` (the card), both or neither."""
    card = {
        "eval_type": eval_type,
        "model_id": getattr(student, "model_id", None),
        "student_kind": getattr(student, "kind", None),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "scores": scores,
        "report": report,
        "eval_config": eval_config.model_dump(),
        "icl_config": icl_config.model_dump() if eval_type == "icl-eval" and icl_config else None,
    }
    predictions_path, scores_path = out_dir / PREDICTIONS_FILE, out_dir / SCORES_FILE
    write_files_atomically(
        {
            predictions_path: "\n".join(lines) + "\n",
            scores_path: json.dumps(card, indent=2, ensure_ascii=False),
        }
    )
    return EvalResult(eval_type, scores, predictions_path, scores_path, report)


def _with_examples(
    student: Student,
    conversations: list[list[dict]],
    train_rows: Sequence[dict[str, Any]] | None,
    icl_config: ICLConfig,
) -> tuple[list[list[dict]], list[list[int]], dict[str, Any]]:
    """``icl-eval``'s conversations with few-shot examples, which rows each got, and a summary."""
    from findistil.icl import build_icl_prompts

    prompts = build_icl_prompts(
        conversations, train_rows or [], icl_config, count_tokens=_token_counter(student)
    )
    example_ids = [p.example_ids for p in prompts]
    counts = [len(ids) for ids in example_ids]
    summary = {
        "example_selection": icl_config.example_selection,
        "relevance_ratio": icl_config.relevance_ratio,
        "max_examples": icl_config.max_examples,
        "mean_examples": float(np.mean(counts)),
        "rows_below_min_examples": sum(c < icl_config.min_examples for c in counts),
    }
    return [p.messages for p in prompts], example_ids, summary


def _predict_all(
    student: Student,
    conversations: list[list[dict]],
    eval_type: str,
    eval_config: EvaluationConfig,
    answers: list[str] | None,
    progress: ProgressFn,
    should_stop: StopFn,
) -> list[Prediction]:
    """The student's answers to every conversation, in batches; ``Cancelled`` when stopped."""
    total = len(conversations)
    batch = eval_config.batch_size
    predictions: list[Prediction] = []
    progress(Progress(eval_type, 0, total))
    for start in range(0, total, batch):
        if should_stop():
            raise Cancelled(f"{eval_type} cancelled after {start} of {total} rows")
        chunk = conversations[start : start + batch]
        out = student.predict(
            chunk,
            max_new_tokens=eval_config.max_new_tokens,
            mode=eval_config.scoring_mode,
            labels=answers,
            batch_size=batch,
            should_stop=should_stop,
        )
        if len(out) != len(chunk):
            raise RuntimeError(
                f"{type(student).__name__}.predict returned {len(out)} answers for {len(chunk)}"
            )
        predictions += out
        progress(Progress(eval_type, len(predictions), total, {"rows": len(predictions)}))
    if should_stop():
        raise Cancelled(f"{eval_type} cancelled after {total} of {total} rows")
    return predictions


def _scores(
    predictions: list[Prediction], outputs: list[str], references: list[str], wall: float
) -> tuple[dict[str, float], dict[str, int]]:
    """Scores (only floats, as upstream's ``dict[str, float]``) and counts, kept apart."""
    total = len(predictions)
    scores = {
        "f1_score": metrics.f1_score(outputs, references),
        "mean_latency_s": float(np.mean([p.latency_s for p in predictions])),
        "rows_per_s": total / wall if wall > 0 else 0.0,
    }
    counts = {
        "rows": total,
        "prompt_tokens": int(sum(p.prompt_tokens for p in predictions)),
        "completion_tokens": int(sum(p.completion_tokens for p in predictions)),
    }
    return scores, counts


def _prediction_lines(
    eval_rows: Sequence[dict[str, Any]],
    predictions: list[Prediction],
    references: list[str],
    row_fields: list[dict[str, Any]],
    example_ids: list[list[int]] | None,
) -> list[str]:
    """One JSON line per eval row: its answer, the reference, token F1, usage and what the
    workload read from it (``row_fields``: parsed label, called functions, ...)."""
    lines = []
    for i, (row, pred) in enumerate(zip(eval_rows, predictions, strict=True)):
        output = pred.text or ""
        line: dict[str, Any] = {
            "row": i,
            "id": row.get("id", row.get("_id", i)),
            "reference": references[i],
            "output": output,
            "token_f1": metrics.token_f1(output, references[i]),
            "latency_s": pred.latency_s,
            "prompt_tokens": pred.prompt_tokens,
            "completion_tokens": pred.completion_tokens,
        }
        line.update(row_fields[i])
        if example_ids is not None:
            line["icl_example_ids"] = example_ids[i]
        if pred.label_scores is not None:
            line["label_scores"] = pred.label_scores
        if pred.logprob is not None:
            line["logprob"] = round(pred.logprob, 6)
        lines.append(json.dumps(line, ensure_ascii=False))
    return lines
