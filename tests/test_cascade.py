"""The cascade's numbers: confidence, temperature fit, threshold choice, coverage and the
risk-coverage curve, on hand-made cases whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from findistil.cascade import (
    at_threshold,
    calibration_error,
    choose_threshold,
    confidence,
    confidences,
    fit_temperature,
    risk_coverage,
)


def test_confidence_of_label_scores_and_of_a_generated_answer():
    scores = {"[[a]]": 2.0, "[[b]]": 0.0, "[[c]]": 0.0}
    top = math.exp(2) / (math.exp(2) + 2)
    assert confidence(scores, None) == pytest.approx(top)
    assert confidence(scores, None, 2.0) < top < confidence(scores, None, 0.5)  # T softens
    assert confidence(None, math.log(0.8)) == pytest.approx(0.8)
    assert confidence(None, math.log(0.8), 2.0) == pytest.approx(math.sqrt(0.8))
    assert confidence(None, None) is None


def test_an_overconfident_student_gets_a_temperature_above_one():
    rng = np.random.default_rng(0)
    items, agrees = [], []
    for _ in range(400):  # logits say ~0.99 sure, the student is right 60% of the time
        logits = {"[[a]]": 5.0 + rng.normal(0, 0.5), "[[b]]": 0.0, "[[c]]": 0.0}
        items.append({"label_scores": logits})
        agrees.append(bool(rng.random() < 0.6))
    t = fit_temperature(items, agrees)
    assert t > 1.5
    before = calibration_error(confidences(items, 1.0), agrees)
    after = calibration_error(confidences(items, t), agrees)
    assert before > 0.3 and after < 0.1


def test_threshold_is_the_lowest_confidence_that_keeps_the_target():
    conf = [0.9, 0.8, 0.7, 0.6]
    agree = [True, True, False, True]
    assert choose_threshold(conf, agree, 1.0) == 0.8
    assert choose_threshold(conf, agree, 0.75) == 0.6  # 3 of 4
    assert choose_threshold(conf, [False, True, True, True], 0.99) is None
    # tied confidences are answered together: no threshold splits them
    assert choose_threshold([0.9, 0.9, 0.5], [True, False, True], 1.0) is None


def test_coverage_agreement_and_the_curve():
    conf = [0.95, 0.9, 0.8, 0.4, 0.3]
    agree = [True, True, True, False, True]
    got = at_threshold(conf, agree, 0.8)
    assert got == {"coverage": 0.6, "agreement": 1.0, "expected_cost_ratio": pytest.approx(0.4)}
    assert at_threshold(conf, agree, None)["coverage"] == 0.0  # the teacher answers all
    curve = risk_coverage(conf, agree)
    assert len(curve) == 10 and curve[-1] == {"coverage": 1.0, "agreement": 0.8, "threshold": 0.3}
    assert [p["agreement"] for p in curve[:6]] == [1.0] * 6  # the 3 surest are right
