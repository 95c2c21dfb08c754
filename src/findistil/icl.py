"""Few-shot (in-context) prompts for ``icl-eval``: pick solved train rows, show them to the model.

Where it sits: ``evaluate(..., eval_type="icl-eval")`` calls ``build_icl_prompts`` to turn each
eval row's request messages into the same messages plus a few solved examples from the train
split, appended to the system message (the generic upstream blueprint's way, REFERENCE §4).

Two selections (``icl_config.example_selection``):

- ``uniform``: round-robin over the answer classes, shortest example first within a class, the
  same examples for every eval row. Upstream takes the k shortest rows overall, which can show
  a single class; one fixed set also keeps the prompt prefix identical across rows, so the
  engine's shared-prefix KV reuse still applies.
- ``semantic_similarity``: embed the variable part of the last user message (the headline, found
  with ``students.pruning.PruningRule``) with all-MiniLM-L6-v2 and take the k train rows nearest
  by cosine (brute-force numpy; fine up to ~100k rows). With a ``similarity_config``, only
  ``relevance_ratio`` of them are the nearest; the rest cover answer classes those miss.

Examples show the variable part of the user message (not the ~1k tokens of instructions the
financial workload repeats) and the teacher's answer. They are added in rank order while the
whole prompt stays within ``max_context_length - reserved_tokens`` tokens; an example that
does not fit is skipped. Each prompt records the indices (into ``train_rows``) it got.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from findistil.config import ICLConfig, Settings
from findistil.errors import DataError
from findistil.records import message_text
from findistil.students.pruning import PruningRule
from findistil.workloads import Workload, resolve_workload, stratum_of

Conversation = list[dict[str, Any]]
TokenCounter = Callable[[str], int]
Embedder = Callable[[list[str]], np.ndarray]

# How many candidates to try per row, as a multiple of k: spares for examples that are
# skipped because they do not fit the token budget.
_NEIGHBOUR_SPARES = 4

EXAMPLES_INTRO = (
    "Below are solved examples of this task. Each shows an input and the expected reply; "
    "answer the next input the same way."
)


def approx_tokens(text: str) -> int:
    """Cheap token estimate: the larger of the word count and characters / 4.

    Real tokenisers give ~4 characters per token on English prose; counting words as well
    keeps the estimate from undercounting text of many short words. Example: ``approx_tokens
    ("Acme Q3 EPS $1.10 beats") == 6``.
    """
    return max(len(text.split()), math.ceil(len(text) / 4))


@dataclass
class ICLPrompt:
    """One eval row's messages with examples injected, and which train rows they came from."""

    messages: Conversation
    example_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0  # by the counting function used for the budget


def _last_user_text(messages: Sequence[dict[str, Any]]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            content = m.get("content")
            return content if isinstance(content, str) else json.dumps(content)
    return ""


def _answer_text(row: dict[str, Any]) -> str:
    return message_text(row["messages"][-1]).strip()


def _check_train_rows(train_rows: Sequence[dict[str, Any]]) -> None:
    if not train_rows:
        raise DataError("icl-eval needs train rows to pick examples from, but got none")
    for i, row in enumerate(train_rows):
        msgs = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(msgs, list) or len(msgs) < 2 or msgs[-1].get("role") != "assistant":
            raise DataError(
                f"train row {i}: expected {{'messages': [..., assistant answer]}}; "
                "pass the rows of training/train_data.jsonl"
            )


def example_class(row: dict[str, Any], workload: Workload | None = None) -> str:
    """The class a train row's answer belongs to under ``workload`` (default: the one its
    own answer implies), or ``unknown``."""
    return stratum_of(row, workload or resolve_workload("auto", [row]))


def uniform_order(
    train_rows: Sequence[dict[str, Any]],
    *,
    rule: PruningRule | None = None,
    seed: int = 42,
    workload: Workload | None = None,
) -> list[int]:
    """All train row indices in ``uniform`` order: round-robin over classes, shortest first.

    Classes take turns, most frequent class first (ties broken by a seeded shuffle); within a
    class rows go shortest first (by the text an example shows; ties by seeded shuffle).
    Example: classes A (2 rows), B (1 row) -> ``[A_shortest, B, A_second]``.
    """
    rule = rule or PruningRule.identity()
    workload = workload or resolve_workload("auto", train_rows)
    rng = random.Random(seed)
    by_class: dict[str, list[tuple[int, float, int]]] = defaultdict(list)
    for i, row in enumerate(train_rows):
        shown = rule.variable_part(_last_user_text(row["messages"][:-1])) + _answer_text(row)
        by_class[example_class(row, workload)].append((len(shown), rng.random(), i))
    counts = Counter({c: len(v) for c, v in by_class.items()})
    tiebreak = {c: rng.random() for c in sorted(by_class)}
    classes = sorted(by_class, key=lambda c: (-counts[c], tiebreak[c]))
    queues = [sorted(by_class[c]) for c in classes]
    order: list[int] = []
    for depth in range(max(len(q) for q in queues)):
        order += [q[depth][2] for q in queues if depth < len(q)]
    return order


def nearest_rows(
    query_vecs: np.ndarray,
    train_vecs: np.ndarray,
    k: int,
    *,
    exclude: Sequence[Sequence[int]] | None = None,
) -> list[list[int]]:
    """For each query, the indices of the ``k`` train vectors with the highest cosine.

    ``exclude[q]`` lists train rows query q must not get (the same text: no answer leaks).
    Ties go to the lower index, so the result is deterministic.
    """
    q = query_vecs / np.maximum(np.linalg.norm(query_vecs, axis=1, keepdims=True), 1e-12)
    t = train_vecs / np.maximum(np.linalg.norm(train_vecs, axis=1, keepdims=True), 1e-12)
    sims = q @ t.T
    for qi, banned in enumerate(exclude or []):
        sims[qi, list(banned)] = -np.inf
    k = min(k, sims.shape[1])
    out = []
    for row in sims:
        # stable sort on -sim keeps equal similarities in index order
        idx = np.argsort(-row, kind="stable")[:k]
        out.append([int(i) for i in idx if np.isfinite(row[i])])
    return out


def relevance_coverage(
    candidates: Sequence[int], classes: Sequence[str], k: int, ratio: float
) -> list[int]:
    """Nearest-first ``candidates`` reordered for relevance plus coverage (upstream's
    ``similarity_config.relevance_ratio``, which it applies to tool names).

    The first ``int(k * ratio)`` stay; then the nearest row of each answer class they do not
    show yet; then the rest in nearness order. Example: candidates ``[a1, a2, a3, b1]`` with
    k 3 and ratio 0.34 -> ``[a1, b1, a2, a3]``.
    """
    chosen = list(candidates[: int(k * ratio)])
    covered = {classes[i] for i in chosen}
    for i in candidates[len(chosen) :]:
        if len(chosen) >= k:
            break
        if classes[i] not in covered:
            chosen.append(i)
            covered.add(classes[i])
    taken = set(chosen)
    return chosen + [i for i in candidates if i not in taken]


def format_examples(examples: Sequence[tuple[str, str]]) -> str:
    """The text block added to the system message: an intro, then input/reply pairs."""
    parts = [EXAMPLES_INTRO]
    for n, (question, answer) in enumerate(examples, start=1):
        parts.append(f"Example {n}\nInput:\n{question.strip()}\nReply:\n{answer}")
    return "\n\n".join(parts)


def inject_examples(messages: Sequence[dict[str, Any]], block: str) -> Conversation:
    """A copy of ``messages`` with ``block`` appended to the system message (or a new one)."""
    out = [dict(m) for m in messages]
    for m in out:
        if m.get("role") == "system" and isinstance(m.get("content"), str):
            m["content"] = f"{m['content'].rstrip()}\n\n{block}" if m["content"].strip() else block
            return out
    return [{"role": "system", "content": block}] + out


def _prompt_tokens(messages: Sequence[dict[str, Any]], count: TokenCounter) -> int:
    return sum(
        count(m["content"] if isinstance(m.get("content"), str) else json.dumps(m.get("content")))
        for m in messages
    )


def fit_examples(
    messages: Sequence[dict[str, Any]],
    candidates: Sequence[int],
    shown: Sequence[tuple[str, str]],
    *,
    k: int,
    budget: int,
    count_tokens: TokenCounter = approx_tokens,
) -> ICLPrompt:
    """Add up to ``k`` candidates (in order) while the whole prompt fits ``budget`` tokens.

    ``shown[i]`` is the (input, reply) pair train row i shows. A candidate that would push the
    prompt over the budget is skipped and the next one tried.
    """
    chosen: list[int] = []
    best = ICLPrompt([dict(m) for m in messages], [], _prompt_tokens(messages, count_tokens))
    for i in candidates:
        if len(chosen) >= k:
            break
        trial = chosen + [i]
        msgs = inject_examples(messages, format_examples([shown[j] for j in trial]))
        tokens = _prompt_tokens(msgs, count_tokens)
        if tokens <= budget:
            chosen = trial
            best = ICLPrompt(msgs, list(trial), tokens)
    return best


def build_icl_prompts(
    conversations: Sequence[Sequence[dict[str, Any]]],
    train_rows: Sequence[dict[str, Any]],
    icl_config: ICLConfig,
    *,
    seed: int = 42,
    count_tokens: TokenCounter = approx_tokens,
    embed: Embedder | None = None,
    settings: Settings | None = None,
) -> list[ICLPrompt]:
    """Each eval conversation with few-shot examples from ``train_rows`` injected.

    Args:
        conversations: eval rows' ``request.messages``.
        train_rows: upstream train rows (``{"messages": [..., assistant answer]}``).
        icl_config: ``max_examples`` (k), ``example_selection``, ``max_context_length``,
            ``reserved_tokens``, ``embedding_model``.
        seed: tie-breaking seed; the same seed gives the same prompts.
        count_tokens: token counter for the budget (default ``approx_tokens``; pass a real
            tokenizer's ``lambda s: len(tok(s).input_ids)`` for exact budgets).
        embed: texts -> (n, d) array, for ``semantic_similarity``; default all-MiniLM-L6-v2
            mean-pooled embeddings.
        settings: used to find the embedding model.

    Example: ``build_icl_prompts([row["request"]["messages"]], train, ICLConfig())[0].example_ids``.
    """
    _check_train_rows(train_rows)
    k = icl_config.max_examples
    budget = icl_config.max_context_length - icl_config.reserved_tokens
    rule = PruningRule.detect([row["messages"] for row in train_rows])
    train_inputs = [rule.variable_part(_last_user_text(r["messages"][:-1])) for r in train_rows]
    shown = [(text, _answer_text(r)) for text, r in zip(train_inputs, train_rows, strict=True)]
    if k == 0:
        return [
            ICLPrompt([dict(m) for m in c], [], _prompt_tokens(c, count_tokens))
            for c in conversations
        ]

    workload = resolve_workload("auto", train_rows)  # whose classes coverage spreads over
    if icl_config.example_selection == "uniform":
        order = uniform_order(train_rows, rule=rule, seed=seed, workload=workload)
        order = order[: k * _NEIGHBOUR_SPARES]
        candidates = [order] * len(conversations)
    else:
        queries = [rule.variable_part(_last_user_text(c)) for c in conversations]
        embed = embed or _default_embedder(icl_config, settings)
        vectors = np.asarray(embed(queries + train_inputs), dtype=np.float32)
        where: dict[str, list[int]] = defaultdict(list)
        for i, text in enumerate(train_inputs):
            where[text].append(i)
        candidates = nearest_rows(
            vectors[: len(queries)],
            vectors[len(queries) :],
            k * _NEIGHBOUR_SPARES,
            exclude=[where.get(q, []) for q in queries],
        )
        if icl_config.relevance_ratio < 1.0:
            classes = [example_class(r, workload) for r in train_rows]
            ratio = icl_config.relevance_ratio
            candidates = [relevance_coverage(c, classes, k, ratio) for c in candidates]
    return [
        fit_examples(conv, cands, shown, k=k, budget=budget, count_tokens=count_tokens)
        for conv, cands in zip(conversations, candidates, strict=True)
    ]


def _default_embedder(icl_config: ICLConfig, settings: Settings | None) -> Embedder:
    """all-MiniLM-L6-v2 (or ``icl_config.embedding_model``) through the encoder student's
    mean-pooled ``embed_texts``: one place loads encoders."""
    from findistil.students.encoder import embed_texts

    model_id = icl_config.embedding_model
    return lambda texts: embed_texts(texts, settings, model_id=model_id)
