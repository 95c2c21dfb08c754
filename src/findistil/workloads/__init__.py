"""Workloads: what a logged task's answers are and how a student's answers are scored.

The seam between the general layers (curation, few-shot selection, evaluation) and any one
task: nothing outside this package knows a label set or a tool schema. A ``Workload`` gives

- ``stratum(answer_message)``: the class a record's teacher answer belongs to (stratified
  splits, few-shot class coverage);
- ``score(outputs, references)``: scores beyond upstream's token F1 (only floats), a report
  (per-class table, confusion, ...) and per-row fields for ``predictions.jsonl``;
- ``candidate_answers()``: the answers ``label_scores`` ranks when the train rows give none;
- ``agreement_field``: the per-row field of ``score``'s lines that says the student agreed
  with the teacher (what a cascade calibrates on; None: no cascade).

Three kinds (``evaluation_config.workload_type``, ``auto`` picks): ``classification`` for any
label set (the financial 13 with their variants, or labels discovered from the teacher's
``[[...]]`` answers, or configured in ``evaluation_config.labels``), ``tool_calling``
(upstream's function-name and name-and-arguments accuracies) and ``chat`` (token F1 only).

Example::

    workload = resolve_workload("auto", eval_rows)
    scores, report, lines = workload.score(outputs, references)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from findistil.errors import ConfigError
from findistil.workloads.classification import ClassificationWorkload
from findistil.workloads.tool_calling import ChatWorkload, ToolCallingWorkload, answer_calls

WORKLOAD_TYPES = ("auto", "classification", "tool_calling", "chat")


class Workload(Protocol):
    name: str
    agreement_field: str | None  # row field of ``score``'s lines: the student agrees

    def stratum(self, answer: dict[str, Any]) -> str: ...

    def score(
        self, outputs: Sequence[str], references: Sequence[str]
    ) -> tuple[dict[str, float], dict[str, Any], list[dict[str, Any]]]: ...

    def candidate_answers(self) -> list[str]: ...


def _answer(record: dict[str, Any]) -> dict[str, Any]:
    """The teacher's answer message of a log record or of a train row."""
    if "messages" in record:
        return record["messages"][-1]
    return record["response"]["choices"][0]["message"]


def _offers_tools(record: dict[str, Any]) -> bool:
    request = record.get("request") or {}
    return bool(request.get("tools") or record.get("tools") or answer_calls(_answer(record)))


def resolve_workload(
    workload_type: str,
    records: Sequence[dict[str, Any]],
    labels: Sequence[str] | None = None,
) -> Workload:
    """The workload of these records (log records or train rows).

    ``auto``: tool calling when any record offers tools or calls one; classification when
    at least half of the teacher answers hold a label (``[[...]]`` or a configured one);
    chat otherwise.
    """
    if workload_type not in WORKLOAD_TYPES:
        raise ConfigError(
            f"evaluation_config.workload_type: {workload_type!r} is not one of "
            f"{', '.join(WORKLOAD_TYPES)}"
        )
    if workload_type == "tool_calling" or (
        workload_type == "auto" and any(_offers_tools(r) for r in records)
    ):
        return ToolCallingWorkload()
    answers = [str(_answer(r).get("content") or "") for r in records]
    classification = ClassificationWorkload.discover(answers, labels)
    if workload_type == "classification" or (
        workload_type == "auto" and classification.covers(answers) >= 0.5
    ):
        return classification
    return ChatWorkload()


def stratum_of(record: dict[str, Any], workload: Workload) -> str:
    """The stratum of a log record or a train row under ``workload``."""
    return workload.stratum(_answer(record))


__all__ = [
    "WORKLOAD_TYPES",
    "ChatWorkload",
    "ClassificationWorkload",
    "ToolCallingWorkload",
    "Workload",
    "resolve_workload",
    "stratum_of",
]
