"""Metrics against values computed by hand."""

from __future__ import annotations

import pytest

from findistil.metrics import (
    UNPARSEABLE,
    classification_scores,
    f1_score,
    normalize_answer,
    token_f1,
)
from findistil.taxonomy import LABELS


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[[Price Targets]]", "price targets"),
        ("The  analyst rating.", "analyst rating"),
        ("An apple a day", "apple day"),
        ("[[products-services]]", "productsservices"),
        ("theory of another", "theory of another"),  # articles only as whole words
        ("", ""),
        (None, ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("pred", "ref", "expected"),
    [
        ("[[earnings]]", "[[earnings]]", 1.0),
        ("[[[Earnings]]]", "[[earnings]]", 1.0),  # brackets and case do not count
        # P = 1/2, R = 1/3 -> 2 * (1/6) / (5/6) = 0.4
        ("[[price targets]]", "[[stock price movement]]", 0.4),
        ("[[stock price movement]]", "[[price targets]]", 0.4),
        # P = 2/2, R = 2/3 -> 0.8
        ("stock price", "[[stock price movement]]", 0.8),
        ("[[dividends]]", "[[earnings]]", 0.0),
        # the article is dropped: tokens {analyst, rating} both sides
        ("The analyst rating", "[[analyst rating]]", 1.0),
        # repeated tokens count once per occurrence: overlap 1, P = 1/3, R = 1 -> 0.5
        ("earnings earnings earnings", "earnings", 0.5),
        ("", "", 1.0),
        ("", "[[earnings]]", 0.0),
        ("[[earnings]]", "", 0.0),
        ("[[ ]]", "", 1.0),  # only punctuation: empty after normalising
    ],
)
def test_token_f1_hand_computed(pred, ref, expected):
    assert token_f1(pred, ref) == pytest.approx(expected)


def test_f1_score_averages_rows():
    preds = ["[[earnings]]", "[[price targets]]", "nonsense", ""]
    refs = ["[[earnings]]", "[[stock price movement]]", "[[dividends]]", ""]
    assert f1_score(preds, refs) == pytest.approx((1.0 + 0.4 + 0.0 + 1.0) / 4)
    assert f1_score([], []) == 0.0
    with pytest.raises(ValueError, match="1 predictions but 2 references"):
        f1_score(["a"], ["a", "b"])


def test_classification_scores_hand_checked():
    refs = ["Earnings", "Earnings", "Dividends", "Dividends", "OTHER"]
    preds = ["Earnings", "Dividends", "Dividends", "OTHER", "OTHER"]
    flags = [True, True, True, False, True]  # row 4 is unparseable (fallback OTHER)
    s = classification_scores(preds, refs, flags)

    assert s["rows"] == 5
    assert s["accuracy"] == pytest.approx(3 / 5)
    assert s["unparseable_rate"] == pytest.approx(1 / 5)
    pc = s["per_class"]
    # Earnings: tp 1, predicted 1, support 2 -> P 1, R 0.5, F1 2/3
    assert pc["Earnings"] == pytest.approx(
        {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2}
    )
    # Dividends: tp 1, predicted 2, support 2 -> P 0.5, R 0.5, F1 0.5
    assert pc["Dividends"] == pytest.approx(
        {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    )
    # OTHER: the unparseable fallback OTHER must not count as a hit -> tp 1, predicted 1
    assert pc["OTHER"] == pytest.approx({"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1})
    assert pc["Guidance"]["support"] == 0
    # averages over the three classes present
    assert s["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 1.0) / 3)
    assert s["weighted_f1"] == pytest.approx((2 / 3 * 2 + 0.5 * 2 + 1.0 * 1) / 5)

    conf = s["confusion"]
    assert conf["labels"] == list(LABELS)
    assert conf["columns"] == list(LABELS) + [UNPARSEABLE]
    assert len(conf["matrix"]) == 13
    assert all(len(row) == 14 for row in conf["matrix"])
    e, d, o = LABELS.index("Earnings"), LABELS.index("Dividends"), LABELS.index("OTHER")
    assert conf["matrix"][e][e] == 1 and conf["matrix"][e][d] == 1
    assert conf["matrix"][d][d] == 1 and conf["matrix"][d][13] == 1
    assert conf["matrix"][o][o] == 1
    assert sum(map(sum, conf["matrix"])) == 5


def test_classification_scores_edge_cases():
    empty = classification_scores([], [], [])
    assert empty["rows"] == 0 and empty["accuracy"] == 0.0
    assert len(empty["confusion"]["matrix"]) == 13

    all_bad = classification_scores(["OTHER"] * 3, ["OTHER"] * 3, [False] * 3)
    assert all_bad["accuracy"] == 0.0
    assert all_bad["unparseable_rate"] == 1.0
    assert all_bad["macro_f1"] == 0.0

    with pytest.raises(ValueError, match="not classes"):
        classification_scores(["Earnings"], ["Earning"], [True])
    with pytest.raises(ValueError, match="one of each per row"):
        classification_scores(["Earnings"], ["Earnings"], [])


def test_bootstrap_intervals_match_resampled_sklearn_scores_and_hold_the_estimate():
    import numpy as np

    from findistil.metrics import UNPARSEABLE, bootstrap_intervals, classification_scores

    rng = np.random.default_rng(3)
    labels = ["a", "b", "c", "d"]
    refs = [labels[i] for i in rng.integers(0, 4, 120)]
    preds = [r if rng.random() < 0.7 else labels[rng.integers(0, 4)] for r in refs]
    preds[:6] = [UNPARSEABLE] * 6
    got = bootstrap_intervals(preds, refs, resamples=400, seed=5)
    # the same draws scored one by one with the slow path
    draws = np.random.default_rng(5).integers(0, 120, size=(400, 120))
    slow = []
    for d in draws:
        p = [preds[i] for i in d]
        s = classification_scores([x if x != UNPARSEABLE else "a" for x in p],
                                  [refs[i] for i in d], [x != UNPARSEABLE for x in p],
                                  labels=labels)  # fmt: skip
        slow.append((s["accuracy"], s["macro_f1"]))
    for k, name in enumerate(("accuracy", "macro_f1")):
        values = [v[k] for v in slow]
        assert got[name] == pytest.approx([np.percentile(values, 2.5), np.percentile(values, 97.5)])
    point = classification_scores(
        [x if x != UNPARSEABLE else "a" for x in preds], refs, [x != UNPARSEABLE for x in preds],
        labels=labels,
    )  # fmt: skip
    assert got["accuracy"][0] < point["accuracy"] < got["accuracy"][1]
    assert got["macro_f1"][0] < point["macro_f1"] < got["macro_f1"][1]
    assert 0.1 < got["accuracy"][1] - got["accuracy"][0] < 0.25  # +-0.08 at n=120
    assert bootstrap_intervals(preds, refs, seed=1) == bootstrap_intervals(preds, refs, seed=1)
