"""The cascade: when a student's answer can stand, and when the teacher must answer instead.

A deployed student answers a routed request when its calibrated confidence reaches the
route's threshold; below it, the request goes to the teacher. Both numbers are set at the
customized eval, from the student's own answers:

- *confidence* of one answer: the top softmax probability of its label scores at temperature
  ``T`` (an encoder's logits, a causal LM's label log-likelihoods), else the probability of a
  generated answer, ``exp(logprob / T)``;
- *calibration*: ``T`` is fitted on the val split so that the confidence matches how often
  the student agrees with the teacher (binary cross-entropy over a log-spaced grid of ``T``);
- *threshold*: the lowest confidence at which the val rows the student would answer still
  agree with the teacher at ``cascade.target_agreement``. Coverage (share answered by the
  student), agreement and the risk-coverage curve are then measured on the eval split, which
  took no part in either choice.

Agreement is the workload's own per-row verdict (``Workload.agreement_field``: a label
match, a tool call with the same name and arguments); a workload without one (free chat)
has no cascade.

    calibration = calibrate(student, val_rows, eval_lines, workload, eval_config, config)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from findistil.config import CascadeConfig, EvaluationConfig
from findistil.progress import StopFn, never_stop
from findistil.records import message_text
from findistil.students.base import Prediction, Student

TEMPERATURES = np.exp(np.linspace(math.log(0.05), math.log(20.0), 121))
CURVE_POINTS = 10  # coverage levels of the risk-coverage curve
_EPS = 1e-6


def confidence(
    label_scores: dict[str, float] | None, logprob: float | None, temperature: float = 1.0
) -> float | None:
    """Calibrated confidence of one answer (None when the student gave no signal)."""
    if label_scores:
        z = np.asarray(list(label_scores.values()), dtype=np.float64) / temperature
        z = np.exp(z - z.max())
        return float(z.max() / z.sum())
    if logprob is not None:
        return float(min(1.0, math.exp(logprob / temperature)))
    return None


def _signal(item: dict[str, Any] | Prediction) -> tuple[dict | None, float | None]:
    if isinstance(item, Prediction):
        return item.label_scores, item.logprob
    return item.get("label_scores"), item.get("logprob")


def confidences(items: Sequence[dict[str, Any] | Prediction], temperature: float) -> list:
    return [confidence(*_signal(item), temperature) for item in items]


def fit_temperature(items: Sequence[dict[str, Any] | Prediction], agrees: Sequence[bool]) -> float:
    """The ``T`` whose confidences best predict agreement (least binary cross-entropy)."""
    y = np.asarray(agrees, dtype=np.float64)
    best, best_loss = 1.0, math.inf
    for t in TEMPERATURES:
        p = np.clip(np.asarray(confidences(items, float(t)), dtype=np.float64), _EPS, 1 - _EPS)
        loss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
        if loss < best_loss - 1e-12:
            best, best_loss = float(t), loss
    return best


def choose_threshold(conf: Sequence[float], agrees: Sequence[bool], target: float) -> float | None:
    """The lowest confidence at which the rows at or above it agree at ``target`` or better
    (None: no such point, the teacher answers everything)."""
    order = sorted(range(len(conf)), key=lambda i: -conf[i])
    agreed, best = 0, None
    for k, i in enumerate(order, start=1):
        agreed += bool(agrees[i])
        boundary = k == len(order) or conf[order[k]] < conf[i]
        if boundary and agreed / k >= target:
            best = conf[i]
    return best


def at_threshold(conf: Sequence[float], agrees: Sequence[bool], threshold: float | None) -> dict:
    """Coverage and agreement of the student's share when it answers at ``conf >= threshold``."""
    taken = [
        a for c, a in zip(conf, agrees, strict=True) if threshold is not None and c >= threshold
    ]
    n = max(1, len(conf))
    return {
        "coverage": len(taken) / n,
        "agreement": sum(taken) / len(taken) if taken else 1.0,
        "expected_cost_ratio": 1.0 - len(taken) / n,  # teacher calls left (student compute free)
    }


def risk_coverage(conf: Sequence[float], agrees: Sequence[bool]) -> list[dict[str, float]]:
    """Agreement of the student's most confident share, at 10%, 20%, ... 100% coverage."""
    order = sorted(range(len(conf)), key=lambda i: -conf[i])
    curve = []
    for step in range(1, CURVE_POINTS + 1):
        k = max(1, math.ceil(len(order) * step / CURVE_POINTS))
        top = order[:k]
        curve.append(
            {
                "coverage": k / len(order),
                "agreement": sum(bool(agrees[i]) for i in top) / k,
                "threshold": conf[top[-1]],
            }
        )
    return curve


def calibration_error(conf: Sequence[float], agrees: Sequence[bool], bins: int = 10) -> float:
    """Expected calibration error: the row-weighted gap between confidence and agreement."""
    conf_a, y = np.asarray(conf, dtype=np.float64), np.asarray(agrees, dtype=np.float64)
    edges = np.minimum((conf_a * bins).astype(int), bins - 1)
    gap = 0.0
    for b in range(bins):
        mask = edges == b
        if mask.any():
            gap += mask.sum() * abs(conf_a[mask].mean() - y[mask].mean())
    return float(gap / max(1, len(conf_a)))


def _val_answers(
    student: Student,
    val_rows: Sequence[dict[str, Any]],
    eval_config: EvaluationConfig,
    answers: list[str] | None,
    should_stop: StopFn,
) -> tuple[list[Prediction], list[str]]:
    conversations = [list(r["messages"][:-1]) for r in val_rows]
    references = [message_text(r["messages"][-1]).strip() for r in val_rows]
    predictions = student.predict(
        conversations,
        max_new_tokens=eval_config.max_new_tokens,
        mode=eval_config.scoring_mode,
        labels=answers,
        batch_size=eval_config.batch_size,
        should_stop=should_stop,
    )
    return predictions, references


def calibrate(
    student: Student,
    val_rows: Sequence[dict[str, Any]],
    eval_lines: Sequence[dict[str, Any]],
    workload: Any,
    eval_config: EvaluationConfig,
    config: CascadeConfig,
    answers: list[str] | None = None,
    should_stop: StopFn = never_stop,
) -> dict[str, Any] | None:
    """The candidate's cascade: ``T`` and threshold from val, measured on the eval lines
    (``predictions.jsonl`` rows with the workload's fields). None with no signal to route on."""
    field = getattr(workload, "agreement_field", None)
    rows = [r for r in val_rows if r.get("messages")][: config.calibration_rows]
    if field is None or not rows or not eval_lines:
        return None
    predictions, references = _val_answers(student, rows, eval_config, answers, should_stop)
    if any(confidence(*_signal(p)) is None for p in predictions):
        return None  # a kind that reports neither label scores nor a log-probability
    _, _, row_fields = workload.score([p.text or "" for p in predictions], references)
    val_agrees = [bool(f.get(field)) for f in row_fields]
    temperature = fit_temperature(predictions, val_agrees)
    threshold = choose_threshold(
        confidences(predictions, temperature), val_agrees, config.target_agreement
    )
    eval_agrees = [bool(line.get(field)) for line in eval_lines]
    eval_conf = confidences(eval_lines, temperature)
    if any(c is None for c in eval_conf):
        return None
    return {
        "workload": workload.name,
        "scoring_mode": eval_config.scoring_mode,  # how a route asks the student, as here
        "labels": answers,
        "temperature": temperature,
        "threshold": threshold,
        "target_agreement": config.target_agreement,
        "source": "label_scores" if predictions[0].label_scores else "logprob",
        "val_rows": len(rows),
        "val": at_threshold(confidences(predictions, temperature), val_agrees, threshold),
        **at_threshold(eval_conf, eval_agrees, threshold),
        "calibration_error": calibration_error(eval_conf, eval_agrees),
        "calibration_error_uncalibrated": calibration_error(
            confidences(eval_lines, 1.0), eval_agrees
        ),
        "curve": risk_coverage(eval_conf, eval_agrees),
    }
