"""The recommendation rule on typed candidate results (no API shapes involved)."""

from __future__ import annotations

import pytest

from findistil.recommend import CandidateResult, EvalResult, recommend


def _cand(name, f1, rows_per_s, params, eval_type="customized-eval"):
    s_per_row = 1.0 / rows_per_s if rows_per_s else None
    return CandidateResult(name, params, s_per_row, [EvalResult(eval_type, {"macro_f1": f1})])


def test_cheapest_within_tolerance():
    cands = [_cand("big", 0.90, 10.0, 135), _cand("small", 0.89, 100.0, 22)]
    rec = recommend(cands, 0.02)
    assert rec["model_name"] == "small" and rec["best_model_name"] == "big"
    assert rec["relative_cost"] == {"big": 10.0, "small": 1.0}
    assert rec["cost_per_1k_rows_s"] == pytest.approx(10.0)
    assert "within 0.02 macro-F1 of the best" in rec["reason"]
    assert "; big costs 10x as much (macro-F1 0.900)" in rec["reason"]
    assert rec["reason"].count("big") == 1 and rec["reason"].count("small") == 1
    # outside the tolerance the best one wins even though it costs more
    assert recommend(cands, 0.005)["model_name"] == "big"
    # same speed: fewer parameters wins
    tie = [_cand("a", 0.8, 10.0, 200), _cand("b", 0.8, 10.0, 100)]
    assert recommend(tie, 0.02)["model_name"] == "b"
    assert recommend([CandidateResult("x", None, None, [])], 0.02) is None


def test_customized_eval_judges_a_candidate_over_a_better_base_eval():
    tuned = CandidateResult(
        "a",
        1,
        0.1,
        [
            EvalResult("base-eval", {"macro_f1": 0.7}),
            EvalResult("customized-eval", {"f1_score": 0.5}),
        ],
    )
    untuned = _cand("b", 0.69, 1.0, 1, eval_type="base-eval")  # no customization: best eval
    rec = recommend([tuned, untuned], 0.02)
    assert rec["model_name"] == "b" and rec["eval_type"] == "base-eval"


def test_cost_falls_back_to_the_eval_speed():
    cand = CandidateResult(
        "a", 5, None, [EvalResult("customized-eval", {"macro_f1": 0.5, "rows_per_s": 4.0})]
    )
    assert recommend([cand], 0.02)["s_per_row"] == pytest.approx(0.25)
