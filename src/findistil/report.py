"""Teacher versus people: how often each labeller agrees with human labels on gold headlines.

The flywheel distils a teacher, so a student can at best match the teacher; this report says
how good the teacher itself is, against headlines that people labelled (a CSV with
``headline``, ``human_label`` and one or more ``*_label`` columns from models, e.g.
``../shared/data/benchmark/gold_human.csv``). ``score_against_people`` puts any student's
answers for the same headlines on that scale (used by the benchmark).

Labels are read with ``taxonomy.parse_label``, which folds the people's extra class
``Management changes`` into ``Labour Issues``. Run it as ``findistil report-teacher --gold FILE``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from findistil.errors import DataError
from findistil.metrics import UNPARSEABLE, bootstrap_intervals, classification_scores
from findistil.taxonomy import LABELS, parse_label

HUMAN_COLUMN = "human_label"
_NOT_LABELLERS = {"id", "headline", HUMAN_COLUMN}


def _read_gold(gold_csv: Path) -> tuple[list[dict[str, str]], list[str]]:
    path = Path(gold_csv)
    if not path.is_file():
        raise DataError(f"gold file {path} does not exist: pass a CSV with headline,human_label")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    missing = {"headline", HUMAN_COLUMN} - set(columns)
    if missing:
        raise DataError(
            f"gold file {path} lacks column(s) {sorted(missing)}: it needs headline, "
            f"{HUMAN_COLUMN} and one or more model label columns (found {columns})"
        )
    for line, row in enumerate(rows, start=2):
        parsed = parse_label(row[HUMAN_COLUMN])
        if not parsed.parseable:
            raise DataError(
                f"{path}:{line}: human_label {row[HUMAN_COLUMN]!r} is not a taxonomy class: "
                f"use one of {', '.join(LABELS)}"
            )
        row[HUMAN_COLUMN] = parsed.label
    labellers = [c for c in columns if c not in _NOT_LABELLERS]
    return rows, labellers


def _score(answers: list[str], people: list[str]) -> dict[str, Any]:
    """Label scores against people, with 95% bootstrap intervals of accuracy and macro-F1."""
    parsed = [parse_label(a) for a in answers]
    scores = classification_scores([p.label for p in parsed], people, [p.parseable for p in parsed])
    read = [p.label if p.parseable else UNPARSEABLE for p in parsed]
    scores["intervals"] = bootstrap_intervals(read, people) if people else {}
    return scores


def plot_confusion(
    confusion: Mapping[str, Any],
    path: Path,
    title: str,
    *,
    xlabel: str = "labeller",
    ylabel: str = "people",
) -> Path:
    """Draw a confusion matrix (``classification_scores(...)["confusion"]``) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers and CI
    import matplotlib.pyplot as plt

    matrix = confusion["matrix"]
    fig, ax = plt.subplots(figsize=(9, 8))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(confusion["columns"])), confusion["columns"], rotation=60, ha="right")
    ax.set_yticks(range(len(confusion["labels"])), confusion["labels"])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    peak = max((v for row in matrix for v in row), default=0) or 1
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if value:
                color = "white" if value > peak / 2 else "black"
                ax.text(j, i, str(value), ha="center", va="center", fontsize=7, color=color)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def teacher_report(gold_csv: Path | str, out_dir: Path | str | None = None) -> dict[str, Any]:
    """Agreement of every labeller column with the people's labels.

    Args:
        gold_csv: CSV with ``headline``, ``human_label`` and labeller columns (every column
            except ``id``, ``headline`` and ``human_label``).
        out_dir: when given, writes ``teacher_report.json`` and ``confusion_<column>.png``.

    Returns:
        ``{"gold": path, "rows": n, "labellers": {column: classification_scores(...)}}``;
        on ``gold_human.csv`` ``labellers["nemotron_49b_label"]["accuracy"]`` is 0.873.
    """
    rows, labellers = _read_gold(Path(gold_csv))
    if not labellers:
        raise DataError(f"gold file {gold_csv} has no labeller column besides human_label")
    people = [r[HUMAN_COLUMN] for r in rows]
    result: dict[str, Any] = {
        "gold": str(gold_csv),
        "rows": len(rows),
        "labellers": {col: _score([r[col] for r in rows], people) for col in labellers},
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        pngs = {}
        for col, scores in result["labellers"].items():
            title = f"{col} vs people: accuracy {scores['accuracy']:.3f}"
            pngs[col] = str(
                plot_confusion(scores["confusion"], out / f"confusion_{col}.png", title)
            )
        result["plots"] = pngs
        (out / "teacher_report.json").write_text(json.dumps(result, indent=2))
    return result


def score_against_people(
    headlines_to_labels: Mapping[str, str], gold_csv: Path | str
) -> dict[str, Any]:
    """Score anyone's answers (labels or raw outputs like ``[[earnings]]``) against people.

    Headlines are matched to the gold file after stripping whitespace; gold headlines without
    an answer are counted in ``missing`` and left out of the scores.

    Example: ``score_against_people({h: student_answer(h) for h in gold}, gold_csv)["accuracy"]``.
    """
    rows, _ = _read_gold(Path(gold_csv))
    answers = {h.strip(): a for h, a in headlines_to_labels.items()}
    scored = [
        (answers[r["headline"].strip()], r[HUMAN_COLUMN])
        for r in rows
        if r["headline"].strip() in answers
    ]
    if not scored:
        raise DataError(
            f"none of the {len(headlines_to_labels)} headlines given is in {gold_csv}: "
            "pass answers keyed by the gold file's headline text"
        )
    scores = _score([a for a, _ in scored], [p for _, p in scored])
    scores["missing"] = len(rows) - len(scored)
    return scores
