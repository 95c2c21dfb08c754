"""PruningRule: detection on synthetic templates, apply, persistence, and upstream's real rows."""

from __future__ import annotations

import csv
import json

import pytest

from findistil import taxonomy
from findistil.errors import DataError
from findistil.students.pruning import PruningRule

HEADLINES = [
    "Orrin Foods to Acquire Lakeshore Dairy for $1.2B",
    "Kestrel Beverage Q3 EPS $0.71 vs $0.66 Est.",
    "FDA Approves Ardenholm's Once-Weekly Insulin",
    "Quillon Aerospace Wins $240M Navy Contract",
]


def _conv(user: str, system: str | None = "Be brief.", answer: str | None = "[[x]]"):
    msgs = [] if system is None else [{"role": "system", "content": system}]
    msgs.append({"role": "user", "content": user})
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def test_taxonomy_prompt_prunes_to_the_headline():
    convs = [taxonomy.build_messages(h) for h in HEADLINES]
    rule = PruningRule.detect(convs)
    assert rule.system == taxonomy.SYSTEM_PROMPT
    assert rule.prefix.endswith(taxonomy.HEADLINE_OPEN + "\n")
    assert rule.suffix.startswith("\n" + taxonomy.HEADLINE_CLOSE)
    assert rule.rows == len(HEADLINES)
    for conv, headline in zip(convs, HEADLINES, strict=True):
        assert rule.apply(conv) == [
            {"role": "system", "content": ""},
            {"role": "user", "content": headline},
        ]
    # an unseen headline of the same workload is pruned too (the serving path)
    new = taxonomy.build_messages("Tamsin Utilities Raises Quarterly Dividend")
    assert rule.apply(new)[-1]["content"] == "Tamsin Utilities Raises Quarterly Dividend"


def test_variable_part_in_the_middle_keeps_the_answer_message():
    template = "Intro line.\nItem: {}\nPlease answer in one word.\nThanks"
    convs = [_conv(template.format(x)) for x in ["red apple", "green pear", "blue plum"]]
    rule = PruningRule.detect(convs)
    # "Item: " is not kept in the prefix: the prefix snaps back to the line break
    assert rule.prefix == "Intro line.\n"
    assert rule.suffix == "\nPlease answer in one word.\nThanks"
    out = rule.apply(convs[1])
    assert out == [
        {"role": "system", "content": ""},
        {"role": "user", "content": "Item: green pear"},
        {"role": "assistant", "content": "[[x]]"},
    ]


def test_shared_first_characters_of_the_variable_part_are_not_cut():
    # every headline starts with "Apple" and ends with "Est.": a raw common prefix/suffix
    # would eat them; the rule snaps back to the line breaks instead
    heads = ["Apple Q1 EPS $1 vs $2 Est.", "Applied Materials Q2 Beats Est.", "Apple Sees Est."]
    convs = [_conv(f"Classify:\n{h}\nDone.") for h in heads]
    rule = PruningRule.detect(convs)
    assert rule.prefix == "Classify:\n"
    assert rule.suffix == "\nDone."
    assert [rule.variable_part(c[1]["content"]) for c in convs] == heads


def test_one_line_template_snaps_to_a_word_break():
    convs = [_conv(f"Rate this: {w} now") for w in ["alpha", "alps", "alto"]]
    rule = PruningRule.detect(convs)
    assert rule.prefix == "Rate this: "
    assert rule.suffix == " now"
    assert rule.variable_part("Rate this: alps now") == "alps"


def test_no_common_text_and_no_shared_system_is_identity():
    convs = [_conv("alpha beta", system="s1"), _conv("gamma delta", system="s2")]
    rule = PruningRule.detect(convs)
    assert rule.is_identity
    assert rule == PruningRule.identity()
    assert rule.apply(convs[0]) == convs[0]
    assert rule.apply(convs[0]) is not convs[0]  # a copy: callers may mutate it


def test_shared_system_only_drops_the_system_message():
    convs = [_conv("alpha beta"), _conv("gamma delta")]
    rule = PruningRule.detect(convs)
    assert (rule.prefix, rule.suffix, rule.system) == ("", "", "Be brief.")
    assert not rule.is_identity
    assert rule.apply(convs[0])[:2] == [
        {"role": "system", "content": ""},
        {"role": "user", "content": "alpha beta"},
    ]


def test_too_few_distinct_rows_or_missing_system_in_some_rows():
    same = [_conv("Q:\nsame\nEnd")] * 3
    assert PruningRule.detect(same).is_identity
    assert PruningRule.detect(same[:1]).is_identity
    mixed = [_conv("Q:\na\nEnd"), _conv("Q:\nb\nEnd", system=None)]
    rule = PruningRule.detect(mixed)
    assert rule.system is None and rule.prefix == "Q:\n"


def test_rows_that_would_lose_all_their_text_give_no_prefix():
    convs = [_conv("Head\n"), _conv("Head\nmore\n")]
    rule = PruningRule.detect(convs)
    assert rule.prefix == "" and rule.suffix == ""


def test_non_matching_messages_pass_unchanged():
    rule = PruningRule(prefix="Intro\n", suffix="\nEnd", system="Be brief.")
    other = _conv("something else entirely")
    assert rule.apply(other) == other
    compact = [{"role": "user", "content": "already compact"}]
    assert rule.apply(compact) == compact
    multimodal = [{"role": "user", "content": [{"type": "text", "text": "x"}]}]
    assert rule.apply(multimodal) == multimodal
    assert rule.variable_part("no match") == "no match"


def test_round_trip_to_dict_from_dict():
    rule = PruningRule(prefix="P\n", suffix="\nS", system="sys", rows=7)
    data = json.loads(json.dumps(rule.to_dict()))
    assert PruningRule.from_dict(data) == rule
    assert PruningRule.from_dict(None).is_identity
    assert PruningRule.from_dict(PruningRule.identity().to_dict()).is_identity
    with pytest.raises(DataError, match="version"):
        PruningRule.from_dict({"prefix": "x"})


def test_upstream_rows_prune_to_the_bare_headline(benchmark_dir):
    path = benchmark_dir / "upstream_news_classifier_500.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    convs = [r["request"]["messages"] for r in records]
    rule = PruningRule.detect(convs)
    assert rule.system is not None
    assert len(rule.prefix) > 1000  # the long instructions are static

    compact = [rule.apply(c) for c in convs]
    for full, small in zip(convs, compact, strict=True):
        assert [m["role"] for m in small] == ["system", "user"] and not small[0]["content"]
        headline = small[1]["content"]
        assert headline and "\n" not in headline and len(headline) < 400
        # the headline is a whole line of the original prompt, nothing cut off
        assert headline in [line.strip() for line in full[-1]["content"].splitlines()]

    # the headlines shared with the people-labelled file come out exactly as written there
    with (benchmark_dir / "gold_human.csv").open(newline="") as fh:
        gold = {row["headline"].strip() for row in csv.DictReader(fh)}
    shared = [c[1]["content"] for c in compact if c[1]["content"] in gold]
    assert len(shared) >= 3

    # a rule detected on a handful of rows generalises to the other rows
    small_rule = PruningRule.detect(convs[:5])
    assert [small_rule.apply(c) for c in convs[5:50]] == compact[5:50]
