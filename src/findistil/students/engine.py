"""Engine: runs a causal-LM student fast on a CPU (generation, label scoring, adapters).

Sits under ``students/causal.py`` (which adds chat formatting, pruning rules and the
``Student`` contract) and is used by evaluation and ``bench/students.py``. It deals in chat
conversations only as far as applying the model's chat template; everything below is token ids
and KV caches.

What makes it fast:

* **Shared-prefix KV reuse.** Rows whose token ids start alike (the financial prompt repeats
  ~1k tokens of instructions before each headline) share one prefix computation. The prefix KV
  (batch 1) is memoised across calls, extended or cut to fit the next request, and copied into
  each batch's preallocated cache; only the per-row suffixes run through the model. Suffixes
  are left-padded *after* the prefix, pads are masked and position ids are explicit, so the
  outputs equal those of a run without reuse (up to float rounding).
* **Preallocated caches.** A batch's KV lives in one buffer per layer written in place, so a
  decode step does not re-copy the whole (long) cache as ``DynamicCache``'s ``torch.cat`` does.
* **Batches grouped by length** under a token budget, greedy decoding, ``inference_mode``.
* **Label scoring.** Ranks answer strings by total log-likelihood in one forward per batch:
  every row carries all candidate answers after its prompt, each answer sees the prompt and
  itself only (a block mask), so the prompt is computed once per row, not once per label.

Adapters (LoRA, peft format) attach and switch without reloading the base model.

Example::

    engine = Engine.from_pretrained(path)                # or Engine(model, tokenizer, "cpu")
    outs = engine.generate([messages, ...], max_new_tokens=24)
    outs[0].text, outs[0].prompt_tokens, outs[0].completion_tokens, outs[0].latency_s
    ranks = engine.score_labels([messages], ["[[earnings]]", "[[dividends]]"])
    ranks[0].best, ranks[0].scores                       # label -> total log-likelihood
    engine.load_adapter("adapters/run1", name="run1")    # becomes the active adapter
    engine.generate(convs, adapter=None)                 # base model for this call only
    engine.set_adapter(None)                             # base model from now on
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from findistil.errors import Cancelled, ConfigError
from findistil.progress import Progress, ProgressFn, StopFn, never_stop, no_progress
from findistil.students.base import MODEL_LOAD_LOCK

Conversation = list[dict[str, Any]]
_ACTIVE: Any = object()  # "whatever adapter is active": the default of ``adapter=``


@dataclass
class Generation:
    """One generated answer with its token counts and its share of the wall time."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int  # generated tokens, the end-of-turn token included
    latency_s: float
    logprob: float = 0.0  # log-probability of the greedy answer (its tokens, end included)


@dataclass
class LabelRanking:
    """The best answer string of a row and the total log-likelihood of every candidate."""

    best: str
    scores: dict[str, float]
    prompt_tokens: int
    latency_s: float


class _BufferLayer(DynamicLayer):
    """A KV cache layer written in place into a buffer sized for the whole batch run."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        b, h, _, d = key_states.shape
        self._k = key_states.new_empty((b, h, self.capacity, d))
        self._v = value_states.new_empty((b, h, self.capacity, value_states.shape[-1]))
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self._k.shape[-2]:  # should not happen (capacity is planned); grow anyway
            grow = end - self._k.shape[-2]
            self._k = torch.cat(
                [self._k, self._k.new_empty((*self._k.shape[:2], grow, self._k.shape[3]))], 2
            )
            self._v = torch.cat(
                [self._v, self._v.new_empty((*self._v.shape[:2], grow, self._v.shape[3]))], 2
            )
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


@dataclass
class _Prefix:
    key: Any  # the adapter the KV was computed with
    ids: list[int]
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, batch 1


def _common_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _shared_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    """Longest common prefix of all rows, leaving each row at least one token of suffix."""
    lo, hi = min(rows), max(rows)  # lexicographic extremes bound every row's agreement
    return min(_common_len(lo, hi), min(len(r) for r in rows) - 1)


class Engine:
    """Batched greedy generation and label scoring for one causal LM (+ LoRA adapters).

    Args:
        model: a transformers causal LM (or a peft ``PeftModel`` around one).
        tokenizer: its tokenizer; the chat template formats conversations.
        device: ``"cpu"`` or ``"cuda"``.
        prefix_reuse: reuse the KV of a shared prompt prefix (default on).
        min_prefix_tokens: shorter shared prefixes are not worth a separate pass.
        max_batch_tokens: rows x (prompt + new tokens) per batch; bounds cache memory
            (SmolLM2 keeps 46 KB of KV per token).
    """

    def __init__(
        self,
        model,
        tokenizer,
        device: str = "cpu",
        *,
        prefix_reuse: bool = True,
        min_prefix_tokens: int = 16,
        max_batch_tokens: int = 24576,
    ):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.prefix_reuse = prefix_reuse
        self.min_prefix_tokens = min_prefix_tokens
        self.max_batch_tokens = max_batch_tokens
        config = self.model.config
        self._num_layers = config.get_text_config(decoder=True).num_hidden_layers
        # Sliding-window layers keep only a window of KV, so a cut prefix would be wrong.
        layer_types = getattr(config.get_text_config(decoder=True), "layer_types", None) or []
        self._can_reuse = not any("sliding" in str(t) for t in layer_types)
        self._eager = getattr(config, "_attn_implementation", "sdpa") == "eager"
        self.stop_ids = self._stop_ids()
        self.end_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.end_id
        self.adapters: dict[str, str] = {}
        self.active_adapter: str | None = None
        self._memo: _Prefix | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", **kwargs) -> Engine:
        """Load model and tokenizer from an HF folder (see ``registry.resolve_model``)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        with MODEL_LOAD_LOCK:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            return cls(model, AutoTokenizer.from_pretrained(path), device, **kwargs)

    def _stop_ids(self) -> set[int]:
        ids: set[int] = set()
        for value in (
            self.tokenizer.eos_token_id,
            getattr(getattr(self.model, "generation_config", None), "eos_token_id", None),
        ):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(v for v in value if isinstance(v, int))
        end_turn = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(end_turn, int) and end_turn != self.tokenizer.unk_token_id:
            ids.add(end_turn)
        return ids

    # ------------------------------------------------------------------------ formatting

    def encode(self, conversation: Conversation) -> list[int]:
        """Token ids of a conversation ready for the assistant's answer (chat template)."""
        if self.tokenizer.chat_template:
            enc = self.tokenizer.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=True
            )
            return list(enc["input_ids"] if hasattr(enc, "keys") else enc)
        # Base models without a template (Gemma-3-270M): plain text, answer on the next line.
        text = "\n\n".join(str(m.get("content") or "") for m in conversation) + "\n"
        return self.tokenizer.encode(text)

    def answer_ids(self, answer: str) -> list[int]:
        """Token ids of an assistant answer as the chat template closes it (+ end token)."""
        ids = self.tokenizer.encode(answer, add_special_tokens=False)
        return ids + ([self.end_id] if self.end_id is not None else [])

    # -------------------------------------------------------------------------- adapters

    def load_adapter(self, path: str | Path, name: str | None = None) -> str:
        """Attach a peft adapter folder under ``name`` and make it active; returns the name."""
        from peft import PeftModel

        name = name or Path(path).name
        if not (Path(path) / "adapter_config.json").is_file():
            raise ConfigError(f"adapter folder {path} has no adapter_config.json")
        with MODEL_LOAD_LOCK:
            if isinstance(self.model, PeftModel):
                if name in self.adapters:
                    self.model.delete_adapter(name)
                self.model.load_adapter(str(path), adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
        self.model.eval()
        self.adapters[name] = str(path)
        self._memo = None
        self.set_adapter(name)
        return name

    def set_adapter(self, name: str | None) -> None:
        """Answer with adapter ``name`` from now on; ``None`` is the base model."""
        if name is not None and name not in self.adapters:
            raise ConfigError(
                f"adapter {name!r} is not loaded: load it first ({list(self.adapters)})"
            )
        self.active_adapter = name

    @contextlib.contextmanager
    def _using(self, adapter: Any):
        name = self.active_adapter if adapter is _ACTIVE else adapter
        if name is not None and name not in self.adapters:
            raise ConfigError(
                f"adapter {name!r} is not loaded: load it first ({list(self.adapters)})"
            )
        if not self.adapters:
            yield None
        elif name is None:
            with self.model.disable_adapter():
                yield None
        else:
            self.model.set_adapter(name)
            yield name

    @property
    def base_model(self):
        """The plain transformers model (without adapter layers when none are attached)."""
        return self.model.get_base_model() if self.adapters else self.model

    def close(self) -> None:
        self._memo = None
        self.model = None

    # -------------------------------------------------------------------- forward helpers

    def _new_cache(self, batch: int, capacity: int, prefix: _Prefix | None, plen: int) -> Cache:
        cache = Cache(layers=[_BufferLayer(capacity) for _ in range(self._num_layers)])
        if prefix is not None and plen:
            for i, (k, v) in enumerate(prefix.kv):
                cache.update(
                    k[:, :, :plen].expand(batch, -1, -1, -1),
                    v[:, :, :plen].expand(batch, -1, -1, -1),
                    i,
                )
        return cache

    def _prefix(self, ids: list[int], key: Any) -> _Prefix:
        """KV of ``ids`` (batch 1), from the memo when it covers them, else extending it."""
        memo = self._memo
        start = 0
        if memo is not None and memo.key == key:
            start = _common_len(memo.ids, ids)
            if start == len(ids):
                return memo  # callers cut it to len(ids)
            if start < self.min_prefix_tokens:
                start = 0
        cache = self._new_cache(1, len(ids), memo if start else None, start)
        rest = torch.tensor([ids[start:]], device=self.device)
        positions = torch.arange(start, len(ids), device=self.device)[None]
        self.model(
            input_ids=rest, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1
        )
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        self._memo = _Prefix(key, list(ids), kv)
        return self._memo

    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """A 4D bool "may attend" mask in the form the attention implementation wants."""
        if not self._eager:
            return allowed
        dtype = next(self.model.parameters()).dtype
        zero = torch.zeros((), dtype=dtype, device=self.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)

    def _batches(self, lengths: list[int], extra: int, batch_size: int) -> list[list[int]]:
        """Row indices grouped by length (longest first) under the batch token budget."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        batches: list[list[int]] = []
        for i in order:
            cur = batches[-1] if batches else None
            width = (lengths[cur[0]] if cur else lengths[i]) + extra  # first row is longest
            if cur and len(cur) < batch_size and (len(cur) + 1) * width <= self.max_batch_tokens:
                cur.append(i)
            else:
                batches.append([i])
        return batches

    def _plan_prefix(
        self, rows: list[list[int]], key: Any, reuse: bool
    ) -> tuple[_Prefix | None, int]:
        if not (reuse and self._can_reuse) or not rows:
            return None, 0
        plen = _shared_prefix_len(rows)
        if plen < self.min_prefix_tokens:
            return None, 0
        return self._prefix(rows[0][:plen], key), plen

    def _layout(self, rows: list[list[int]], plen: int):
        """Suffixes left-padded after the shared prefix: ids, real-token mask, positions."""
        suffixes = [r[plen:] for r in rows]
        width = max(len(s) for s in suffixes)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        real = torch.zeros((len(rows), width), dtype=torch.bool)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        for b, s in enumerate(suffixes):
            ids[b, width - len(s) :] = torch.tensor(s)
            real[b, width - len(s) :] = True
            pos[b, width - len(s) :] = torch.arange(plen, plen + len(s))
        return ids.to(self.device), real.to(self.device), pos.to(self.device), width

    # ------------------------------------------------------------------------ generation

    @torch.inference_mode()
    def generate(
        self,
        conversations: Sequence[Conversation],
        max_new_tokens: int = 24,
        *,
        adapter: Any = _ACTIVE,
        batch_size: int = 16,
        prefix_reuse: bool | None = None,
        progress: ProgressFn = no_progress,
        should_stop: StopFn = never_stop,
    ) -> list[Generation]:
        """Greedy answers for chat conversations, in input order.

        Args:
            adapter: adapter name for this call; ``None`` = base model; default = active one.
            prefix_reuse: override the engine's setting for this call.
        """
        prompts = [self.encode(c) for c in conversations]
        return self.generate_ids(
            prompts,
            max_new_tokens,
            adapter=adapter,
            batch_size=batch_size,
            prefix_reuse=prefix_reuse,
            progress=progress,
            should_stop=should_stop,
        )

    @torch.inference_mode()
    def generate_ids(
        self,
        prompts: Sequence[list[int]],
        max_new_tokens: int = 24,
        *,
        adapter: Any = _ACTIVE,
        batch_size: int = 16,
        prefix_reuse: bool | None = None,
        progress: ProgressFn = no_progress,
        should_stop: StopFn = never_stop,
    ) -> list[Generation]:
        """``generate`` on token ids (already templated prompts)."""
        reuse = self.prefix_reuse if prefix_reuse is None else prefix_reuse
        results: list[Generation | None] = [None] * len(prompts)
        with self._using(adapter) as key:

            def run(rows, prefix, plen):
                return self._generate_batch(rows, prefix, plen, max_new_tokens)

            for batch, outs, share in self._run_batches(
                prompts,
                key,
                reuse,
                max_new_tokens,
                batch_size,
                run,
                "generate",
                progress,
                should_stop,
            ):
                for i, (ids, logprob) in zip(batch, outs, strict=True):
                    text_ids = [t for t in ids if t not in self.stop_ids]
                    text = self.tokenizer.decode(text_ids, skip_special_tokens=True).strip()
                    results[i] = Generation(text, ids, len(prompts[i]), len(ids), share, logprob)
        return results  # type: ignore[return-value]

    def _run_batches(self, prompts, key, reuse, extra, batch_size, run, stage, progress, stop):
        """The loop generate and label scoring share: plan the shared prefix once, then run
        length-grouped batches; yields (row indices, outputs, seconds per row)."""
        start = time.perf_counter()
        shared, shared_len = self._plan_prefix(list(prompts), key, reuse)
        overhead = (time.perf_counter() - start) / max(1, len(prompts))
        done = 0
        for batch in self._batches([len(p) for p in prompts], extra, batch_size):
            if stop():
                raise Cancelled(f"{stage} cancelled")
            t0 = time.perf_counter()
            rows = [prompts[i] for i in batch]
            prefix, plen = (shared, shared_len)
            if prefix is None:
                prefix, plen = self._plan_prefix(rows, key, reuse)
            outs = run(rows, prefix, plen)
            yield batch, outs, (time.perf_counter() - t0) / len(batch) + overhead
            done += len(batch)
            progress(Progress(stage, done, len(prompts)))

    def _generate_batch(
        self, rows: list[list[int]], prefix: _Prefix | None, plen: int, max_new: int
    ) -> list[tuple[list[int], float]]:
        """Greedy tokens of each row and their summed log-probability (the answer's
        confidence: what a cascade routes on)."""
        ids, real, pos, width = self._layout(rows, plen)
        bsz = len(rows)
        cache = self._new_cache(bsz, plen + width + max_new, prefix, plen)
        # Prefill: prefix keys are visible to every query (pads too, so no row is fully
        # masked); suffix keys are causal and real-only; a pad query also sees itself.
        q = torch.arange(width, device=self.device)
        causal = q[None, :] <= q[:, None]
        allowed = (causal[None] & real[:, None, :]) | torch.eye(
            width, dtype=torch.bool, device=self.device
        )[None]
        full = torch.cat(
            [torch.ones((bsz, width, plen), dtype=torch.bool, device=self.device), allowed], dim=2
        )
        out = self.model(
            input_ids=ids,
            attention_mask=self._mask(full[:, None]),
            position_ids=pos,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        mask2d = torch.cat(
            [torch.ones((bsz, plen), dtype=torch.long, device=self.device), real.long()], dim=1
        )
        next_pos = torch.tensor([len(r) for r in rows], device=self.device)
        finished = torch.zeros(bsz, dtype=torch.bool, device=self.device)
        generated: list[list[int]] = [[] for _ in rows]
        logprobs = [0.0] * bsz
        logits = out.logits[:, -1, :]
        for step in range(max_new):
            token = logits.argmax(-1)
            chosen = torch.log_softmax(logits.float(), -1).gather(1, token[:, None])[:, 0]
            for b in range(bsz):
                if not finished[b]:
                    generated[b].append(int(token[b]))
                    logprobs[b] += float(chosen[b])
                    if int(token[b]) in self.stop_ids:
                        finished[b] = True
            if bool(finished.all()) or step == max_new - 1:
                break
            token = token.masked_fill(finished, self.pad_id)
            mask2d = torch.cat(
                [mask2d, torch.ones((bsz, 1), dtype=torch.long, device=self.device)], dim=1
            )
            out = self.model(
                input_ids=token[:, None],
                attention_mask=mask2d,
                position_ids=next_pos[:, None],
                cache=cache,
                use_cache=True,
            )
            next_pos = next_pos + 1
            logits = out.logits[:, -1, :]
        return list(zip(generated, logprobs, strict=True))

    # --------------------------------------------------------------------- label scoring

    @torch.inference_mode()
    def score_labels(
        self,
        conversations: Sequence[Conversation],
        labels: Sequence[str],
        *,
        adapter: Any = _ACTIVE,
        batch_size: int = 16,
        prefix_reuse: bool | None = None,
        progress: ProgressFn = no_progress,
        should_stop: StopFn = never_stop,
    ) -> list[LabelRanking]:
        """Rank ``labels`` (answer strings) by total log-likelihood after each prompt.

        The score of a label is the sum of log-probabilities of its tokens and the closing
        end-of-turn token, so a label that is a prefix of another is not favoured.
        """
        if not labels:
            raise ConfigError("label scoring needs at least one label")
        reuse = self.prefix_reuse if prefix_reuse is None else prefix_reuse
        prompts = [self.encode(c) for c in conversations]
        tree = _LabelTree.build([self.answer_ids(lab) for lab in labels])
        extra = len(tree.tokens)
        results: list[LabelRanking | None] = [None] * len(prompts)
        with self._using(adapter) as key:

            def run(rows, prefix, plen):
                return self._score_batch(rows, prefix, plen, tree)

            for batch, scores, share in self._run_batches(
                prompts, key, reuse, extra, batch_size, run, "score", progress, should_stop
            ):
                for i, row in zip(batch, scores, strict=True):
                    by_label = {lab: float(s) for lab, s in zip(labels, row, strict=True)}
                    best = max(by_label, key=by_label.__getitem__)
                    results[i] = LabelRanking(best, by_label, len(prompts[i]), share)
        return results  # type: ignore[return-value]

    def _score_batch(
        self, rows: list[list[int]], prefix: _Prefix | None, plen: int, tree: _LabelTree
    ) -> torch.Tensor:
        ids, real, pos, width = self._layout(rows, plen)
        bsz, dev, n = len(rows), self.device, len(tree.tokens)
        lengths = torch.tensor([len(r) - plen for r in rows], device=dev)
        # Columns: [pads | suffix | answer-tree nodes]. A node sees the row's real suffix and
        # its own ancestors (the earlier tokens of its answers), never a sibling answer.
        all_ids = torch.cat([ids, torch.tensor(tree.tokens, device=dev)[None].expand(bsz, -1)], 1)
        depth = torch.tensor(tree.depth, device=dev)
        all_pos = torch.cat([pos, plen + lengths[:, None] + depth[None]], 1)
        q = torch.arange(width, device=dev)
        suffix_q = (q[None, :] <= q[:, None])[None] & real[:, None, :]  # (bsz, width, width)
        suffix_q = torch.cat(
            [suffix_q, torch.zeros((bsz, width, n), dtype=torch.bool, device=dev)], 2
        )
        node_q = torch.cat(
            [real[:, None, :].expand(-1, n, -1), tree.ancestors.to(dev)[None].expand(bsz, -1, -1)],
            2,
        )
        allowed = torch.cat([suffix_q, node_q], 1)
        allowed = allowed | torch.eye(width + n, dtype=torch.bool, device=dev)[None]
        full = torch.cat(
            [torch.ones((bsz, width + n, plen), dtype=torch.bool, device=dev), allowed], dim=2
        )
        # Only the last suffix token and answer-tree inner nodes predict answer tokens, so only
        # they need vocabulary logits.
        predictor = [width - 1 if p < 0 else width + p for p in tree.parent]
        keep = sorted(set(predictor))
        where = {c: k for k, c in enumerate(keep)}
        cache = self._new_cache(bsz, plen + width + n, prefix, plen)
        out = self.model(
            input_ids=all_ids,
            attention_mask=self._mask(full[:, None]),
            position_ids=all_pos,
            cache=cache,
            use_cache=True,
            logits_to_keep=torch.tensor(keep, device=dev),
        )
        logprobs = torch.log_softmax(out.logits.float(), dim=-1)  # (bsz, len(keep), vocab)
        rows_idx = torch.tensor([where[c] for c in predictor], device=dev)
        node_lp = logprobs[:, rows_idx, torch.tensor(tree.tokens, device=dev)]  # (bsz, n)
        return torch.stack([node_lp[:, path].sum(-1) for path in tree.paths], 1).cpu()


@dataclass
class _LabelTree:
    """Candidate answers as a token trie: shared leading tokens are computed once."""

    tokens: list[int]
    parent: list[int]  # node index, -1 for first tokens
    depth: list[int]
    paths: list[list[int]]  # per answer, its node indices
    ancestors: torch.Tensor  # (n, n) bool: column is an ancestor of (or is) the row node

    @classmethod
    def build(cls, answers: list[list[int]]) -> _LabelTree:
        tokens, parent, depth, paths = [], [], [], []
        index: dict[tuple[int, int], int] = {}
        for answer in answers:
            node, path = -1, []
            for token in answer:
                if (node, token) not in index:
                    index[(node, token)] = len(tokens)
                    tokens.append(token)
                    depth.append(depth[node] + 1 if node >= 0 else 0)
                    parent.append(node)
                node = index[(node, token)]
                path.append(node)
            paths.append(path)
        ancestors = torch.zeros((len(tokens), len(tokens)), dtype=torch.bool)
        for i in range(len(tokens)):
            j = i
            while j >= 0:
                ancestors[i, j] = True
                j = parent[j]
        return cls(tokens, parent, depth, paths, ancestors)
