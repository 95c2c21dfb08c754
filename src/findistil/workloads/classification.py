"""Classification workloads over any label set.

The financial 13 (``findistil.taxonomy``) are one label set: their parser knows variants
(``Labor Issues``, ``M&A``, ...) and falls back to ``OTHER``. Any other set comes from
configuration (``evaluation_config.labels``) or is discovered from the teacher's answers:
the distinct contents of their first ``[[...]]``, compared case- and space-insensitively.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from findistil import metrics, taxonomy
from findistil.taxonomy import ParsedLabel

UNKNOWN = "unknown"
_BRACKETED = re.compile(r"\[+\s*([^\[\]]*?)\s*\]+")


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def first_bracketed(text: str) -> str | None:
    """The first ``[[...]]`` content of an answer, normalised; None when there is none."""
    match = _BRACKETED.search(text or "")
    return _norm(match.group(1)) or None if match else None


@dataclass(frozen=True)
class ClassificationWorkload:
    """Label metrics for one label set. ``parse(text) -> ParsedLabel``."""

    labels: tuple[str, ...]
    parse: Callable[[str | None], ParsedLabel]
    answer_format: Callable[[str], str]
    name: str = "classification"
    agreement_field: ClassVar[str] = "correct"  # row field: agrees with the teacher

    @classmethod
    def financial(cls) -> ClassificationWorkload:
        return cls(taxonomy.LABELS, taxonomy.parse_label, taxonomy.format_answer)

    @classmethod
    def of_labels(cls, labels: Sequence[str]) -> ClassificationWorkload:
        """A label set given as names; answers match them case- and space-insensitively."""
        by_norm = {_norm(label): label for label in labels}
        fallback = labels[0] if labels else UNKNOWN

        def parse(text: str | None) -> ParsedLabel:
            inner = first_bracketed(text or "")
            label = by_norm.get(inner) if inner else by_norm.get(_norm(text or ""))
            return ParsedLabel(label, True) if label else ParsedLabel(fallback, False)

        return cls(tuple(labels), parse, lambda label: f"[[{label}]]")

    @classmethod
    def discover(
        cls, answers: Sequence[str], labels: Sequence[str] | None = None
    ) -> ClassificationWorkload:
        """Configured ``labels``; else the financial set when it reads most answers; else
        the labels the answers hold."""
        if labels:
            return cls.of_labels(list(labels))
        financial = cls.financial()
        if answers and financial.covers(answers) >= 0.9:
            return financial
        found = sorted({b for b in (first_bracketed(a) for a in answers) if b})
        return cls.of_labels(found)

    def covers(self, answers: Sequence[str]) -> float:
        """Share of ``answers`` that read as one of the labels."""
        if not answers:
            return 0.0
        return sum(self.parse(a).parseable for a in answers) / len(answers)

    def stratum(self, answer: dict[str, Any]) -> str:
        parsed = self.parse(str(answer.get("content") or ""))
        return parsed.label.lower() if parsed.parseable else UNKNOWN

    def candidate_answers(self) -> list[str]:
        return [self.answer_format(label) for label in self.labels]

    def score(
        self, outputs: Sequence[str], references: Sequence[str]
    ) -> tuple[dict[str, float], dict[str, Any], list[dict[str, Any]]]:
        parsed = [self.parse(o) for o in outputs]
        refs = [self.parse(r) for r in references]
        # a reference outside the label set is scored under its own name, never as another
        ref_labels = [r.label if r.parseable else (first_bracketed(t) or UNKNOWN)
                      for r, t in zip(refs, references, strict=True)]  # fmt: skip
        labels = list(dict.fromkeys([*self.labels, *ref_labels]))
        cls = metrics.classification_scores(
            [p.label for p in parsed], ref_labels, [p.parseable for p in parsed], labels=labels
        )
        scores = {k: float(cls[k]) for k in ("accuracy", "macro_f1", "weighted_f1")}
        scores["unparseable_rate"] = float(cls["unparseable_rate"])
        read = [p.label if p.parseable else metrics.UNPARSEABLE for p in parsed]
        report = {
            "labels": labels,
            "per_class": cls["per_class"],
            "confusion": cls["confusion"],
            # 95% bootstrap intervals: a 100-row eval moves by several points on resampling
            "intervals": metrics.bootstrap_intervals(read, ref_labels) if references else {},
        }
        lines = [
            {
                "parsed_label": p.label if p.parseable else None,
                "reference_label": ref,
                "correct": p.parseable and p.label == ref,
            }
            for p, ref in zip(parsed, ref_labels, strict=True)
        ]
        return scores, report, lines
