"""Encoder student on the tiny random BERT: training, prediction, cancel, save/load, embeddings."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from findistil import taxonomy
from findistil.config import LoraConfig, TrainingConfig, load_settings
from findistil.errors import Cancelled, DataError, FindistilError
from findistil.students import load_student
from findistil.students.encoder import EncoderStudent, class_keys, embed_texts
from findistil.students.lora import read_card

DEMO = Path(__file__).resolve().parents[1] / "src/findistil/data/demo_headlines.csv"
CLASSES = ["Earnings", "Dividends", "Price Targets", "Mergers and Acquisitions"]


def _rows(n: int, offset: int = 0, classes=CLASSES) -> list[dict]:
    with DEMO.open(newline="") as fh:
        demo = [r for r in csv.DictReader(fh) if r["label"] in classes][offset : offset + n]
    return [
        {
            "messages": taxonomy.build_messages(r["headline"])
            + [{"role": "assistant", "content": taxonomy.format_answer(r["label"])}]
        }
        for r in demo
    ]


def _requests(rows):
    return [r["messages"][:-1] for r in rows]


TRAINING = TrainingConfig(epochs=10, batch_size=8, micro_batch_size=8, learning_rate=3e-3)


@pytest.fixture
def student(tiny_bert_dir) -> EncoderStudent:
    s = load_student(str(tiny_bert_dir))  # a local BERT folder is detected as an encoder
    assert isinstance(s, EncoderStudent) and s.kind == "encoder"
    return s


def test_predict_before_training_says_what_to_do(student):
    with pytest.raises(FindistilError, match="no classification head"):
        student.predict(_requests(_rows(2)))


def test_trains_and_answers_with_teacher_strings(student, tmp_path):
    train, val = _rows(64), _rows(16, offset=64)
    events = []
    result = student.train(
        train, val, tmp_path / "enc", training=TRAINING, lora=LoraConfig(), progress=events.append
    )
    epochs = result.metrics["epochs"]
    assert epochs[-1]["train_loss"] < 0.75 * epochs[0]["train_loss"]
    assert result.steps_completed == 10 * 8 and events[-1].percent == 100.0
    assert events[-1].info["epochs_completed"] == 10
    card = read_card(result.path)
    assert sorted(card["labels"]) == sorted(taxonomy.format_answer(c) for c in CLASSES)
    assert card["pruning_rule"]["system"] == taxonomy.SYSTEM_PROMPT

    preds = student.predict(_requests(train), batch_size=5)
    assert {p.text for p in preds} <= set(card["labels"])
    right = sum(p.text == r["messages"][-1]["content"] for p, r in zip(preds, train, strict=True))
    assert right / len(train) > 0.5  # chance is ~0.25 over four classes
    # the classifier reads the headline, not the instructions
    assert student.input_text(train[0]["messages"][:-1]) in train[0]["messages"][1]["content"]
    assert len(student.input_text(train[0]["messages"][:-1])) < 200

    # label scoring with the caller's spellings: mapped onto the classes
    asked = ["[[earnings]]", "[[[[dividends]]]]", "[[price targets]]"]
    scored = student.predict(_requests(train[:4]), mode="label_scores", labels=asked)
    for p in scored:
        assert set(p.label_scores) == set(asked)
        assert p.text == max(p.label_scores, key=p.label_scores.get)


def test_save_load_round_trip_gives_identical_predictions(student, tiny_bert_dir, tmp_path):
    train = _rows(32)
    result = student.train(
        train, [], tmp_path / "enc", training=TRAINING.model_copy(update={"epochs": 1})
    )
    requests = _requests(_rows(10, offset=40))
    before = student.predict(requests)
    fresh = EncoderStudent.load("tiny-bert", tiny_bert_dir, load_settings())
    fresh.use_tuned(result.path)
    after = fresh.predict(requests)
    assert [p.text for p in after] == [p.text for p in before]
    for a, b in zip(after, before, strict=True):
        assert a.label_scores == pytest.approx(b.label_scores, abs=1e-5)
    fresh.use_tuned(None)
    with pytest.raises(FindistilError):
        fresh.predict(requests)
    with pytest.raises(DataError, match="not a trained encoder"):
        fresh.use_tuned(tmp_path)


def test_cancel_leaves_no_folder_and_no_head(student, tmp_path):
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Cancelled):
        student.train(_rows(64), [], tmp_path / "enc", training=TRAINING, should_stop=stop)
    assert len(calls) == 4  # checked before every micro-batch, stopped at the first "yes"
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FindistilError):
        student.predict(_requests(_rows(1)))


def test_single_class_is_a_data_error(student, tmp_path):
    with pytest.raises(DataError, match="at least two classes"):
        student.train(_rows(8, classes=["Earnings"]), [], tmp_path / "e", training=TRAINING)


def test_spellings_of_one_class_merge_only_for_taxonomy_answers():
    keys, merged = class_keys(["[[[[no event]]]]", "[[other]]", "[[earnings]]"])
    assert merged and keys["[[[[no event]]]]"] == keys["[[other]]"] == "OTHER"
    keys, merged = class_keys(["yes", "no", "Yes"])
    assert not merged and len(set(keys.values())) == 3


def test_embeddings_are_normalised_and_stable(student, tiny_bert_dir):
    texts = ["Apple beats earnings", "Dividend raised", "Apple beats earnings"]
    emb = student.embed(texts)
    assert emb.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(emb[0], emb[2], rtol=1e-5)
    via_registry = embed_texts(texts, load_settings(), model_id=str(tiny_bert_dir))
    np.testing.assert_allclose(via_registry, emb, atol=1e-5)
    assert embed_texts([], load_settings(), model_id=str(tiny_bert_dir)).shape == (0, 32)


def test_without_pruning_it_reads_the_end_of_the_full_prompt(student, tmp_path):
    rows = _rows(16)
    training = TRAINING.model_copy(update={"epochs": 1, "prompt_pruning": False})
    result = student.train(rows, [], tmp_path / "enc", training=training)
    assert read_card(result.path)["pruning_rule"] is None
    request = rows[0]["messages"][:-1]
    assert student.input_text(request) == request[-1]["content"]
    ids = student._encode([student.input_text(request)])[0]
    assert len(ids) == student.max_length  # truncated from the left ...
    kept = student.tokenizer.decode(ids)  # ... so the end of the prompt is kept
    assert "square brackets" in kept and "read the headline" not in kept
    assert student.predict([request])[0].text in read_card(result.path)["labels"]
