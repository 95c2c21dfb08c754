"""Few-shot example selection and injection: budget, class coverage, determinism, similarity."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from findistil import taxonomy
from findistil.config import ICLConfig
from findistil.errors import DataError
from findistil.icl import (
    EXAMPLES_INTRO,
    approx_tokens,
    build_icl_prompts,
    example_class,
    nearest_rows,
    relevance_coverage,
    uniform_order,
)

DEMO = Path(__file__).resolve().parents[1] / "src/findistil/data/demo_headlines.csv"


def _train_row(headline: str, label: str) -> dict:
    return {
        "messages": taxonomy.build_messages(headline)
        + [{"role": "assistant", "content": taxonomy.format_answer(label)}]
    }


@pytest.fixture(scope="module")
def demo_rows() -> list[tuple[str, str]]:
    with DEMO.open(newline="") as fh:
        return [(r["headline"], r["label"]) for r in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def train_rows(demo_rows) -> list[dict]:
    return [_train_row(h, lab) for h, lab in demo_rows[:300]]


@pytest.fixture(scope="module")
def eval_convs(demo_rows) -> list[list[dict]]:
    return [taxonomy.build_messages(h) for h, _ in demo_rows[300:310]]


def test_uniform_covers_classes_round_robin_shortest_first(train_rows):
    classes = {example_class(r) for r in train_rows}
    assert len(classes) == 13
    order = uniform_order(train_rows, seed=1)
    assert sorted(order) == list(range(len(train_rows)))
    first = order[: len(classes)]
    assert {example_class(train_rows[i]) for i in first} == classes
    # within a class, the earlier pick shows no longer a headline than the later one
    seen: dict[str, int] = {}
    for i in order:
        label = example_class(train_rows[i])
        length = len(taxonomy.format_answer(label)) + len(train_rows[i]["messages"][1]["content"])
        assert length >= seen.get(label, 0)
        seen[label] = length

    prompts = build_icl_prompts(
        [taxonomy.build_messages("Acme Q3 EPS $1.10")], train_rows, ICLConfig(max_examples=13)
    )
    got = {example_class(train_rows[i]) for i in prompts[0].example_ids}
    assert got == classes


def test_injection_goes_into_system_message_with_variable_part_only(train_rows, eval_convs):
    prompts = build_icl_prompts(eval_convs, train_rows, ICLConfig(max_examples=3))
    for conv, prompt in zip(eval_convs, prompts, strict=True):
        assert len(prompt.example_ids) == 3
        assert len(prompt.messages) == len(conv)
        system = prompt.messages[0]["content"]
        assert system.startswith(taxonomy.SYSTEM_PROMPT) and EXAMPLES_INTRO in system
        for i in prompt.example_ids:
            row = train_rows[i]
            headline = row["messages"][1]["content"].split(taxonomy.HEADLINE_OPEN)[1]
            assert headline.split(taxonomy.HEADLINE_CLOSE)[0].strip() in system
            assert row["messages"][2]["content"] in system
        # the instructions are not repeated inside the examples
        assert taxonomy.ANSWER_REQUEST not in system
        assert prompt.messages[1] == conv[1]  # the user message is untouched
    assert eval_convs[0][0]["content"] == taxonomy.SYSTEM_PROMPT  # input not mutated
    # uniform: the same examples for every row (keeps the prompt prefix shared)
    assert len({tuple(p.example_ids) for p in prompts}) == 1


def test_no_system_message_gets_one():
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
        for i in range(3)
    ]
    (prompt,) = build_icl_prompts(
        [[{"role": "user", "content": "q9"}]], rows, ICLConfig(max_examples=2)
    )
    assert prompt.messages[0]["role"] == "system"
    assert prompt.messages[0]["content"].startswith(EXAMPLES_INTRO)
    assert prompt.messages[1] == {"role": "user", "content": "q9"}


def test_budget_respected(train_rows, eval_convs):
    two = build_icl_prompts(eval_convs[:1], train_rows, ICLConfig(max_examples=2))[0]
    three = build_icl_prompts(eval_convs[:1], train_rows, ICLConfig(max_examples=3))[0]
    assert two.prompt_tokens < three.prompt_tokens
    # exactly room for row 0 with two examples: a third one never fits
    budget = two.prompt_tokens
    cfg = ICLConfig(max_examples=3, max_context_length=budget + 256, reserved_tokens=256)
    prompts = build_icl_prompts(eval_convs, train_rows, cfg)
    assert prompts[0].example_ids == two.example_ids
    for p in prompts:
        tokens = sum(approx_tokens(m["content"]) for m in p.messages)
        assert tokens == p.prompt_tokens <= budget
        assert len(p.example_ids) < 3

    # a prompt already over budget gets no examples, and stays as it was
    tight = ICLConfig(max_examples=3, max_context_length=300, reserved_tokens=200)
    (p,) = build_icl_prompts(eval_convs[:1], train_rows, tight)
    assert p.example_ids == [] and p.messages == eval_convs[0]

    # a custom token counter drives the budget
    calls = []

    def count(text: str) -> int:
        calls.append(text)
        return len(text)

    build_icl_prompts(eval_convs[:1], train_rows, ICLConfig(max_examples=1), count_tokens=count)
    assert calls


def test_deterministic_with_seed(demo_rows):
    # many equal-length headlines so the seed has ties to break
    rows = [_train_row(f"Acme {i:03d} news", lab) for i, (_, lab) in enumerate(demo_rows[:200])]
    convs = [taxonomy.build_messages("Acme 999 news")]
    cfg = ICLConfig(max_examples=5)
    a = build_icl_prompts(convs, rows, cfg, seed=7)[0].example_ids
    b = build_icl_prompts(convs, rows, cfg, seed=7)[0].example_ids
    assert a == b
    others = {tuple(build_icl_prompts(convs, rows, cfg, seed=s)[0].example_ids) for s in range(8)}
    assert len(others) > 1  # the seed does break ties


def test_nearest_rows_cosine_and_exclusion():
    train = np.array([[1, 0], [0, 1], [1, 1], [-1, 0]], dtype=np.float32)
    queries = np.array([[2, 0.1], [0, 3]], dtype=np.float32)
    assert nearest_rows(queries, train, 2) == [[0, 2], [1, 2]]
    assert nearest_rows(queries, train, 2, exclude=[[0], []]) == [[2, 1], [1, 2]]
    assert nearest_rows(queries, train, 10)[0][-1] == 3  # k larger than the pool


def test_similarity_with_custom_embedder_picks_nearest(train_rows):
    # a transparent embedder: one dimension per word of a small vocabulary
    vocab = ["fda", "approves", "dividend", "raises", "eps", "downgrades"]

    def embed(texts: list[str]) -> np.ndarray:
        return np.array([[t.lower().count(w) + 1e-3 for w in vocab] for t in texts])

    rows = [
        _train_row("Acme raises quarterly dividend", "Dividends"),
        _train_row("FDA approves Bolt drug", "Product Approval"),
        _train_row("Zeta Q1 EPS $0.10", "Earnings"),
        _train_row("Broker downgrades Kappa", "Analyst Rating"),
    ] + train_rows[:20]
    convs = [taxonomy.build_messages("FDA approves Acme implant")]
    cfg = ICLConfig(max_examples=1, example_selection="semantic_similarity")
    (prompt,) = build_icl_prompts(convs, rows, cfg, embed=embed)
    assert prompt.example_ids == [1]


def test_relevance_coverage_fills_missed_classes_after_the_nearest():
    classes = ["a", "a", "a", "b", "c", "b"]
    nearest = [0, 1, 2, 3, 4, 5]
    assert relevance_coverage(nearest, classes, 3, 1.0) == nearest  # pure nearness
    assert relevance_coverage(nearest, classes, 3, 0.34) == [0, 3, 4, 1, 2, 5]
    assert relevance_coverage(nearest, classes, 3, 0.67) == [0, 1, 3, 2, 4, 5]
    assert relevance_coverage(nearest, classes, 3, 0.0) == [0, 3, 4, 1, 2, 5]
    assert relevance_coverage([0, 1, 2], classes, 3, 0.34) == [0, 1, 2]  # one class: order kept


def test_similarity_config_shows_other_classes_beside_the_nearest(train_rows):
    vocab = ["dividend", "fda"]

    def embed(texts: list[str]) -> np.ndarray:
        return np.array([[t.lower().count(w) + 1e-3 for w in vocab] for t in texts])

    rows = [_train_row(f"Acme {n} raises dividend", "Dividends") for n in range(4)]
    rows.append(_train_row("FDA clears Bolt drug", "Product Approval"))
    convs = [taxonomy.build_messages("Zeta lifts dividend")]
    near = ICLConfig(max_examples=2, example_selection="semantic_similarity")
    covered = ICLConfig(**{**near.model_dump(), "similarity_config": {"relevance_ratio": 0.5}})
    (nearest,) = build_icl_prompts(convs, rows, near, embed=embed)
    (mixed,) = build_icl_prompts(convs, rows, covered, embed=embed)
    assert {example_class(rows[i]) for i in nearest.example_ids} == {"dividends"}
    assert [example_class(rows[i]) for i in mixed.example_ids] == ["dividends", "product approval"]


def test_bad_train_rows_are_reported():
    with pytest.raises(DataError, match="needs train rows"):
        build_icl_prompts([[{"role": "user", "content": "x"}]], [], ICLConfig())
    with pytest.raises(DataError, match="train row 0"):
        build_icl_prompts(
            [[{"role": "user", "content": "x"}]],
            [{"messages": [{"role": "user", "content": "x"}]}],
            ICLConfig(),
        )


@pytest.mark.slow
def test_similarity_with_minilm_picks_obvious_neighbours():
    pairs = [
        ("FDA Approves Ardenholm's Once-Weekly Insulin", "Product Approval"),
        ("Tamsin Utilities Raises Quarterly Dividend 6% to $0.42/Share", "Dividends"),
        ("Moody's Cuts Fenwick Steel to Ba2; Outlook Negative", "Credit Ratings"),
        ("Orrin Foods to Acquire Lakeshore Dairy for $1.2B", "Mergers and Acquisitions"),
        ("Kestrel Beverage Q3 EPS $0.71 vs $0.66 Est.", "Earnings"),
    ]
    rows = [_train_row(h, lab) for h, lab in pairs]
    queries = [
        "EMA approves Calderwood Bio's gene therapy",
        "Brightwater Rail lifts its quarterly dividend to $0.30 a share",
        "S&P downgrades Quillon Aerospace credit rating to BB",
    ]
    cfg = ICLConfig(max_examples=1, example_selection="semantic_similarity")
    prompts = build_icl_prompts([taxonomy.build_messages(q) for q in queries], rows, cfg)
    assert [p.example_ids for p in prompts] == [[0], [1], [2]]
