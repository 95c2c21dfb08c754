"""The recommendation: the cheapest student that matches the best one.

Last step of a flywheel run (evaluate -> **recommend** -> serve). Works on typed results
(``CandidateResult``), which the orchestrator builds from its rows; it knows nothing of the
API's JSON. A candidate is judged by its customized eval, or by its best eval when it has none;
among those within ``tolerance`` macro-F1 of the best, the one with the lowest measured
seconds per row of inference wins (then the smaller parameter count).

    recommend([CandidateResult("a", 22_700_000, 0.007, [EvalResult("customized-eval",
              {"macro_f1": 0.8})])], tolerance=0.02)["model_name"]  # -> "a"
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class EvalResult:
    eval_type: str
    scores: Mapping[str, Any] = field(default_factory=dict)

    @property
    def macro_f1(self) -> float | None:
        value = self.scores.get("macro_f1", self.scores.get("f1_score"))
        return float(value) if isinstance(value, int | float) else None

    @property
    def s_per_row(self) -> float | None:
        rate = self.scores.get("rows_per_s")
        return 1.0 / rate if isinstance(rate, int | float) and rate > 0 else None


@dataclass(frozen=True)
class CandidateResult:
    model_name: str
    params: int | None
    s_per_row: float | None  # measured cost of serving it (customized eval's speed)
    evaluations: Sequence[EvalResult]

    def judged_by(self) -> EvalResult | None:
        scored = [e for e in self.evaluations if e.macro_f1 is not None]
        custom = [e for e in scored if e.eval_type == "customized-eval"]
        if custom:
            return custom[0]
        return max(scored, key=lambda e: e.macro_f1, default=None)


def recommend(candidates: Sequence[CandidateResult], tolerance: float) -> dict | None:
    """The recommendation as stored on the job (None when no candidate has a score).

    ``relative_cost`` gives every candidate's s/row divided by the recommended one's.
    """
    scored = []
    for cand in candidates:
        chosen = cand.judged_by()
        if chosen is not None:
            scored.append((cand, chosen, chosen.macro_f1, cand.s_per_row or chosen.s_per_row))
    if not scored:
        return None
    best, best_eval, best_f1, _ = max(scored, key=lambda t: t[2])
    within = [t for t in scored if t[2] >= best_f1 - tolerance]
    inf = float("inf")
    cand, chosen, f1, s_per_row = min(within, key=lambda t: (t[3] or inf, t[0].params or inf))
    relative = {
        other.model_name: round(s / s_per_row, 3) for other, _, _, s in scored if s and s_per_row
    }
    cost_1k = s_per_row * 1000 if s_per_row else None
    return {
        "model_name": cand.model_name,
        "eval_type": chosen.eval_type,
        "macro_f1": f1,
        "best_model_name": best.model_name,
        "best_macro_f1": best_f1,
        "tolerance": tolerance,
        "s_per_row": s_per_row,
        "cost_per_1k_rows_s": cost_1k,
        "params": cand.params,
        "relative_cost": relative,
        "reason": _reason(
            cand,
            chosen,
            f1,
            cost_1k,
            best is cand,
            tolerance,
            [
                (o.model_name, relative.get(o.model_name), score)
                for o, _, score, _ in scored
                if o is not cand
            ],
        ),
    }


def _short(model_name: str) -> str:
    return model_name.rstrip("/").rsplit("/", 1)[-1]


def _reason(cand, chosen, f1, cost_1k, is_best, tolerance, others) -> str:
    """One sentence that names the recommended model once, with its score and cost, then
    each other candidate's cost ratio and score."""
    text = (
        f"{_short(cand.model_name)} ({chosen.eval_type}) scores macro-F1 {f1:.3f} "
        "against the teacher"
    )
    if is_best:
        text += ", the best of the candidates"
    else:
        text += f", within {tolerance:g} macro-F1 of the best"
    if cost_1k is not None:
        text += f", at {cost_1k:.1f} s of compute per 1k rows"
    for name, ratio, score in others:
        cost = f"costs {ratio:.3g}x as much" if ratio else "has no measured cost"
        text += f"; {_short(name)} {cost} (macro-F1 {score:.3f})"
    return text + "."
