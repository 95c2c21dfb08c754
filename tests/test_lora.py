"""LoRA training on the tiny random Llama: masking, learning, cancel, save/load, seeding."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from findistil import taxonomy
from findistil.config import LoraConfig, TrainingConfig
from findistil.errors import Cancelled, DataError
from findistil.students.lora import (
    CARD_NAME,
    answer_loss_sum,
    collate,
    encode_rows,
    plan_steps,
    read_card,
    train_lora,
)
from findistil.students.pruning import PruningRule

DEMO = Path(__file__).resolve().parents[1] / "src/findistil/data/demo_headlines.csv"


def _rows(n: int, offset: int = 0) -> list[dict]:
    with DEMO.open(newline="") as fh:
        demo = list(csv.DictReader(fh))[offset : offset + n]
    return [
        {
            "messages": taxonomy.build_messages(r["headline"])
            + [{"role": "assistant", "content": taxonomy.format_answer(r["label"])}]
        }
        for r in demo
    ]


def _load(path: Path):
    model = AutoModelForCausalLM.from_pretrained(path)
    # The random model's logits span well under one nat (tiny init, frozen tied embeddings,
    # and LoRA does not touch the final norm), so no adapter could make it confident. A
    # sharper final norm gives the adapter an output layer it can actually steer.
    with torch.no_grad():
        model.model.norm.weight.mul_(20)
    return model


@pytest.fixture
def llama(tiny_llama_dir):
    return _load(tiny_llama_dir), AutoTokenizer.from_pretrained(tiny_llama_dir)


def _cfg(**kw) -> TrainingConfig:
    base = {"epochs": 2, "batch_size": 8, "micro_batch_size": 4, "learning_rate": 1e-2}
    return TrainingConfig(**(base | kw))


LORA = LoraConfig(adapter_dim=4, alpha=8, adapter_dropout=0.0)


def test_loss_is_on_the_answer_only_and_prompts_are_pruned(llama):
    _, tok = llama
    rows = _rows(6)
    rule = PruningRule.detect([r["messages"] for r in rows])
    pruned = encode_rows(tok, rows, rule, 2048, "train")
    full = encode_rows(tok, rows, None, 2048, "train")
    batch = collate(pruned[:3], tok.pad_token_id)
    for row, ex in enumerate(pruned[:3]):
        labels = batch["labels"][row]
        kept = labels[labels != -100].tolist()
        assert tok.decode(kept) == rows[row]["messages"][-1]["content"] + tok.eos_token
        # masked positions are exactly the prompt and the padding
        n_prompt = len(ex.input_ids) - len(kept)
        assert (labels[:n_prompt] == -100).all()
        assert batch["attention_mask"][row].sum() == len(ex.input_ids)
    text = tok.decode(pruned[0].input_ids)
    headline = rows[0]["messages"][1]["content"].split(taxonomy.HEADLINE_OPEN)[1]
    assert headline.split(taxonomy.HEADLINE_CLOSE)[0].strip() in text
    assert taxonomy.INSTRUCTIONS[:40] not in text
    # pruning is what makes CPU training feasible: many times fewer tokens
    assert sum(len(e.input_ids) for e in full) > 5 * sum(len(e.input_ids) for e in pruned)


def test_answer_only_head_gives_the_full_logits_loss(llama):
    model, tok = llama
    batch = collate(encode_rows(tok, _rows(5), None, 2048, "x"), tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)),
            batch["labels"][:, 1:].reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        torch.testing.assert_close(answer_loss_sum(model, batch), expected)


def test_steps_are_length_grouped_and_cover_every_row_once(llama):
    import random

    _, tok = llama
    ex = encode_rows(tok, _rows(40), None, 2048, "train")
    steps = plan_steps(ex, batch_size=8, micro_batch_size=3, rng=random.Random(0))
    seen = [i for step in steps for mb in step for i in mb]
    assert sorted(seen) == list(range(40))
    assert all(len(step) == 3 and sum(map(len, step)) == 8 for step in steps)
    for step in steps:  # inside a step, micro-batches go from short rows to long rows
        lengths = [len(ex[i].input_ids) for mb in step for i in mb]
        assert lengths == sorted(lengths)


def test_loss_decreases_and_card_is_written(llama, tmp_path):
    model, tok = llama
    events = []
    result = train_lora(
        model,
        tok,
        _rows(16),
        _rows(8, offset=100),
        tmp_path / "adapter",
        training=_cfg(epochs=4, learning_rate=3e-2),
        lora=LORA,
        base_model_id="tiny/llama",
        progress=events.append,
    )
    epochs = result.metrics["epochs"]
    assert epochs[-1]["train_loss"] < 0.6 * epochs[0]["train_loss"]
    assert epochs[-1]["val_loss"] < epochs[0]["val_loss"]
    assert result.epochs_completed == 4 and result.steps_completed == 8
    assert events[-1].percent == 100.0
    assert events[-1].info["epochs_completed"] == 4
    assert {"steps_completed", "loss"} <= set(events[0].info)
    card = read_card(result.path)
    assert card["base_model"] == "tiny/llama"
    assert card["pruning_rule"]["system"] == taxonomy.SYSTEM_PROMPT
    assert PruningRule.from_dict(card["pruning_rule"]).prefix.endswith(
        taxonomy.HEADLINE_OPEN + "\n"
    )
    assert len(card["data"]["sha256"]) == 64
    assert card["metrics"]["val_loss"] == epochs[-1]["val_loss"]
    config = json.loads((result.path / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == "tiny/llama"


def test_saved_adapter_reloads_identically_and_base_is_untouched(llama, tmp_path):
    from peft import PeftModel

    model, tok = llama
    probe = collate(encode_rows(tok, _rows(3, offset=200), None, 2048, "x"), tok.pad_token_id)
    with torch.no_grad():
        base_before = model(input_ids=probe["input_ids"]).logits.clone()
    trained = {}

    def capture(event):
        # the LoRA layers live inside ``model`` while training runs: record its outputs
        if event.info.get("epochs_completed") == 2:
            model.eval()
            with torch.no_grad():
                trained["logits"] = model(input_ids=probe["input_ids"]).logits.clone()
            model.train()

    out = tmp_path / "adapter"
    train_lora(
        model,
        tok,
        _rows(8),
        [],
        out,
        training=_cfg(),
        lora=LORA,
        base_model_id="t",
        progress=capture,
    )
    assert not hasattr(model, "peft_config")
    assert not any("lora" in name for name, _ in model.named_modules())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=probe["input_ids"]).logits, base_before)
        assert not torch.allclose(trained["logits"], base_before, atol=1e-4)
        loaded = PeftModel.from_pretrained(model, out)
        loaded.eval()
        torch.testing.assert_close(loaded(input_ids=probe["input_ids"]).logits, trained["logits"])


def test_cancel_stops_within_one_micro_batch_and_leaves_nothing(llama, tmp_path):
    model, tok = llama
    forwards = []
    stop = {"now": False}

    def on_forward(*_):
        forwards.append(1)
        if len(forwards) == 3:
            stop["now"] = True

    handle = model.get_decoder().register_forward_hook(on_forward)
    with pytest.raises(Cancelled):
        train_lora(
            model,
            tok,
            _rows(16),
            [],
            tmp_path / "adapter",
            training=_cfg(),
            lora=LORA,
            base_model_id="t",
            should_stop=lambda: stop["now"],
        )
    handle.remove()
    assert len(forwards) == 3  # the micro-batch after the stop request never ran
    assert list(tmp_path.iterdir()) == []  # no adapter, no temp folder
    assert not any("lora" in name for name, _ in model.named_modules())


def test_same_seed_same_adapter_other_seed_differs(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    lora = LoraConfig(adapter_dim=4, alpha=8, adapter_dropout=0.1)
    weights, losses = [], []
    for name, seed in [("a", 1), ("b", 1), ("c", 2)]:
        model = _load(tiny_llama_dir)
        res = train_lora(
            model,
            tok,
            _rows(12),
            _rows(4, offset=50),
            tmp_path / name,
            training=_cfg(seed=seed),
            lora=lora,
            base_model_id="t",
        )
        weights.append(load_file(res.path / "adapter_model.safetensors"))
        losses.append([e["train_loss"] for e in res.metrics["epochs"]])
    assert losses[0] == losses[1]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key])
    assert losses[0] != losses[2]


def test_bad_rows_name_the_row(llama, tmp_path):
    model, tok = llama
    rows = _rows(3)
    rows[1] = {"messages": rows[1]["messages"][:-1]}  # no assistant answer
    with pytest.raises(DataError, match="train row 1"):
        train_lora(
            model, tok, rows, [], tmp_path / "a", training=_cfg(), lora=LORA, base_model_id="t"
        )
    with pytest.raises(DataError, match="no training rows"):
        train_lora(
            model, tok, [], [], tmp_path / "a", training=_cfg(), lora=LORA, base_model_id="t"
        )
    assert not (tmp_path / "a").exists()
    assert not (tmp_path / "a" / CARD_NAME).exists()


def test_training_beside_loaded_adapters_leaves_them_alone(llama, tiny_llama_dir, tmp_path):
    """The engine's model is a PeftModel once an adapter is attached: train next to it."""
    from peft import PeftModel

    model, tok = llama
    probe = collate(encode_rows(tok, _rows(2, offset=300), None, 2048, "x"), tok.pad_token_id)
    kw = {"training": _cfg(), "lora": LORA, "base_model_id": "t"}
    train_lora(model, tok, _rows(8), [], tmp_path / "a", **kw)
    served = PeftModel.from_pretrained(model, tmp_path / "a", adapter_name="a").eval()
    with torch.no_grad():
        with_a = served(input_ids=probe["input_ids"]).logits.clone()

    train_lora(served, tok, _rows(8, offset=20), [], tmp_path / "b", **kw)
    assert list(served.peft_config) == ["a"] and served.active_adapter == "a"
    assert not served.training
    assert not any(p.requires_grad for p in served.parameters())  # as from_pretrained left it
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=probe["input_ids"]).logits, with_a)
        # the new adapter is a plain peft folder that loads anywhere
        assert (tmp_path / "b" / "adapter_config.json").is_file()
        served.load_adapter(str(tmp_path / "b"), adapter_name="b")
        served.set_adapter("b")
        with_b = served(input_ids=probe["input_ids"]).logits
        assert not torch.allclose(with_b, with_a, atol=1e-4)
        fresh = PeftModel.from_pretrained(_load(tiny_llama_dir), tmp_path / "b").eval()
        torch.testing.assert_close(fresh(input_ids=probe["input_ids"]).logits, with_b)
