"""The taxonomy: label parsing (table-driven), canonical labels, the prompt and answer form."""

from __future__ import annotations

import pytest

from findistil import taxonomy
from findistil.taxonomy import (
    HEADLINE_CLOSE,
    HEADLINE_OPEN,
    LABELS,
    ParsedLabel,
    build_messages,
    build_user_prompt,
    canonical_label,
    format_answer,
    parse_label,
)

OK, BAD = True, False

# (model output, expected label, parseable)
CASES = [
    # upstream's answer form, any number of brackets
    ("[[earnings]]", "Earnings", OK),
    ("[[[analyst rating]]]", "Analyst Rating", OK),
    ("[[[[price targets]]]]", "Price Targets", OK),
    ("[dividends]", "Dividends", OK),
    ("[[ credit ratings ]]", "Credit Ratings", OK),
    ("[[[Mergers and Acquisitions]]]", "Mergers and Acquisitions", OK),
    ("[[Labour Issues]]", "Labour Issues", OK),
    ("[[OTHER]]", "OTHER", OK),
    ("[[other]]", "OTHER", OK),
    # bare labels, any case
    ("Earnings", "Earnings", OK),
    ("EARNINGS", "Earnings", OK),
    ("guidance", "Guidance", OK),
    ("Analyst rating", "Analyst Rating", OK),
    ("stock price movement", "Stock price movement", OK),
    ("Stock Price Movement", "Stock price movement", OK),
    ("Product approval", "Product Approval", OK),
    ("products-services", "Products-Services", OK),
    ("regulatory", "Regulatory", OK),
    ("other", "OTHER", OK),
    # surrounding text
    ("The answer is [[Dividends]].", "Dividends", OK),
    ("Category: Regulatory", "Regulatory", OK),
    ("Answer: guidance", "Guidance", OK),
    ("regulatory\nbecause the SEC is involved", "Regulatory", OK),
    ("I think this is about Stock Price Movement here", "Stock price movement", OK),
    ("[[earnings]] and [[dividends]]", "Earnings", OK),  # the first label wins
    ("[[foo]] [[guidance]]", "Guidance", OK),  # the first *known* label wins
    # known variants
    ("Labor Issues", "Labour Issues", OK),
    ("[[labor issues]]", "Labour Issues", OK),
    ("Management changes", "Labour Issues", OK),
    ("M&A", "Mergers and Acquisitions", OK),
    ("[[M&A]]", "Mergers and Acquisitions", OK),
    ("mergers & acquisitions", "Mergers and Acquisitions", OK),
    ("[[Products and Services]]", "Products-Services", OK),
    ("price target", "Price Targets", OK),
    ("[[price-targets]]", "Price Targets", OK),
    ("no event", "OTHER", OK),
    ("[[no event]]", "OTHER", OK),
    ("none", "OTHER", OK),
    ("fda approval", "Product Approval", OK),
    ("outlook", "Guidance", OK),
    # garbage -> OTHER, flagged unparseable
    ("garbage", "OTHER", BAD),
    ("[[weather]]", "OTHER", BAD),
    ("[[[[x]]]]", "OTHER", BAD),
    ("[[]]", "OTHER", BAD),
    ("12345", "OTHER", BAD),
    ("", "OTHER", BAD),
    ("   \n ", "OTHER", BAD),
    (None, "OTHER", BAD),
    ("The headline is ambiguous.", "OTHER", BAD),
]


@pytest.mark.parametrize(("text", "label", "parseable"), CASES, ids=[repr(c[0]) for c in CASES])
def test_parse_label(text, label, parseable):
    assert parse_label(text) == ParsedLabel(label, parseable)


def test_table_is_large_and_covers_every_label():
    assert len(CASES) >= 40
    assert {label for _, label, ok in CASES if ok} == set(LABELS)


def test_every_label_round_trips_through_the_answer_form():
    assert len(LABELS) == 13 and len(set(LABELS)) == 13
    for label in LABELS:
        answer = format_answer(label)
        assert answer == f"[[{label.lower()}]]"
        assert parse_label(answer) == ParsedLabel(label, True)
        assert parse_label(label.upper()) == ParsedLabel(label, True)
        assert canonical_label(label.lower()) == label


def test_canonical_label_rejects_unknown():
    assert canonical_label("Labor Issues") == "Labour Issues"
    with pytest.raises(ValueError, match="unknown label 'Weather'"):
        canonical_label("Weather")
    with pytest.raises(ValueError):
        format_answer("Weather")


def test_prompt_lists_every_label_and_wraps_the_headline():
    headline = "Acme Corp Q2 EPS $1.10 Beats $0.95 Estimate"
    prompt = build_user_prompt(f"  {headline}\n")
    for label in LABELS:
        assert label in prompt
    start = prompt.index(HEADLINE_OPEN) + len(HEADLINE_OPEN)
    end = prompt.index(HEADLINE_CLOSE, start)
    assert prompt[start:end].strip() == headline
    assert prompt.count(HEADLINE_OPEN) == 1 and prompt.count(HEADLINE_CLOSE) == 1
    assert "[[" in prompt  # asks for the bracketed answer form


def test_build_messages_shape_and_shared_prefix():
    a, b = build_messages("first headline"), build_messages("second headline")
    assert [m["role"] for m in a] == ["system", "user"]
    assert a[0] == b[0] and a[0]["content"] == taxonomy.SYSTEM_PROMPT
    # everything before the headline is shared (what prompt pruning and KV reuse rely on)
    prefix = a[1]["content"].split(HEADLINE_OPEN)[0]
    assert b[1]["content"].startswith(prefix) and len(prefix) > 500
