"""Encoder student: a sentence encoder (all-MiniLM-L6-v2) with a classification head.

Where it sits: the second built-in student kind (``kind="encoder"``, registered in
``students/__init__.py``). The ``customize`` stage trains it like the LoRA student and the
evaluator calls the same ``predict``; it answers with the teacher's own answer strings
(``[[earnings]]``), so metrics treat both kinds alike. It has no zero-shot mode: before
training (or ``use_tuned``) ``predict`` raises, and the orchestrator skips base/ICL evals.

What it reads: the variable part of the last user message (a ``PruningRule`` detected on the
training rows), i.e. the headline rather than 1k tokens of instructions MiniLM could not even
fit in its 512 positions. With ``training.prompt_pruning`` off it reads the whole message,
keeping its last 512 tokens (the headline sits near the end of the financial prompt), which
is slower and there only to measure what pruning buys (``bench/students.py``).

Classes are the distinct teacher answers; when every answer parses as a taxonomy label,
spellings of one class (``[[[[no event]]]]``, ``[[other]]``) are merged and the class answers
with its most frequent spelling.

Also here: ``embed_texts(texts, settings)`` — mean-pooled, L2-normalised MiniLM embeddings,
used by ``icl.py`` for similarity-based few-shot selection.
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from findistil import taxonomy
from findistil.artifacts import staged_dir
from findistil.config import MINILM, LoraConfig, Settings, TrainingConfig
from findistil.errors import Cancelled, DataError, FindistilError
from findistil.progress import Progress, ProgressFn, StopFn, never_stop, no_progress
from findistil.students.base import (
    MODEL_LOAD_LOCK,
    Conversation,
    Prediction,
    PredictMode,
    Student,
    TrainResult,
)
from findistil.students.lora import (
    CARD_FORMAT,
    CARD_NAME,
    _lr_lambda,
    _versions,
    data_hash,
    plan_steps,
    read_card,
    split_row,
)
from findistil.students.pruning import PruningRule

TUNED_HEADS_KEPT = 4  # tuned heads kept loaded per student (MiniLM: ~90 MB each)
MAX_POSITIONS = 512  # BERT-style encoders; MiniLM was trained on 256 but accepts 512


@dataclass
class _Row:
    input_ids: list[int]
    label: int = -1


def last_user_text(messages: Sequence[dict[str, Any]]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            content = m.get("content")
            return content if isinstance(content, str) else str(content or "")
    return ""


def class_keys(answers: Sequence[str]) -> tuple[dict[str, str], bool]:
    """(stripped answer -> class key, merged). Taxonomy spellings of one class share a key
    only when every answer parses as a taxonomy label (another workload keeps raw strings).
    """
    distinct = {a.strip() for a in answers}
    parsed = {a: taxonomy.parse_label(a) for a in distinct}
    if all(p.parseable for p in parsed.values()):
        return {a: parsed[a].label for a in distinct}, True
    return {a: a for a in distinct}, False


def _key_of(answer: str, merged: bool) -> str:
    answer = answer.strip()
    if merged:
        parsed = taxonomy.parse_label(answer)
        if parsed.parseable:
            return parsed.label
    return answer


class EncoderStudent(Student):
    """all-MiniLM-L6-v2 (or any BERT-like folder) plus a classification head."""

    kind = "encoder"

    def __init__(self, model_id: str, weights_dir: Path, settings: Settings, device: str):
        from transformers import AutoModel, AutoTokenizer

        from findistil.students.registry import describe_model

        self.model_id = model_id
        self.weights_dir = Path(weights_dir)
        self.settings = settings
        self.device = device
        with MODEL_LOAD_LOCK:
            self.tokenizer = AutoTokenizer.from_pretrained(self.weights_dir)
            self.tokenizer.truncation_side = "left"  # long prompts end with the part that varies
            self._encoder = AutoModel.from_pretrained(self.weights_dir).to(device).eval()
        self.num_params, self.dtype = describe_model(self._encoder)
        self.max_length = min(
            MAX_POSITIONS, getattr(self._encoder.config, "max_position_embeddings", MAX_POSITIONS)
        )
        self._model = None  # the fine-tuned classifier, once trained or loaded
        self._labels: list[str] = []  # answer string of each class index
        self._keys: list[str] = []  # merge key of each class index
        self._merged = False
        self._rule = PruningRule.identity()
        self.tuned_path: Path | None = None
        self._heads: OrderedDict[str, tuple[Any, dict]] = OrderedDict()  # path -> (model, card)

    @classmethod
    def load(cls, model_id: str, weights_dir: Path, settings: Settings) -> EncoderStudent:
        """Factory used by ``findistil.students.load_student``."""
        from findistil.students.registry import pick_device

        return cls(model_id, weights_dir, settings, pick_device(settings))

    @property
    def labels(self) -> list[str]:
        return list(self._labels)

    # ---------------------------------------------------------------------- inputs
    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [ids for ids, _ in self._encode_counted(texts)]

    def _encode_counted(self, texts: Sequence[str]) -> list[tuple[list[int], int]]:
        """(token ids, tokens dropped) per text: a text over ``max_length`` keeps its first
        (CLS) token and its end, where the variable part of a prompt is."""
        if not texts:
            return []
        full = self.tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]
        out = []
        for ids in full:
            cut = max(0, len(ids) - self.max_length)
            out.append((ids[:1] + ids[1 + cut :] if cut else ids, cut))
        return out

    def _batch(self, rows: Sequence[_Row]) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id or 0
        width = max(len(r.input_ids) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r.input_ids)] = torch.tensor(r.input_ids)
            mask[i, : len(r.input_ids)] = 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def input_text(self, messages: Sequence[dict[str, Any]]) -> str:
        """What the classifier reads of a conversation: the pruned last user message."""
        return last_user_text(self._rule.apply(messages))

    # ---------------------------------------------------------------------- training
    def train(
        self,
        train_rows: Sequence[dict[str, Any]],
        val_rows: Sequence[dict[str, Any]],
        out_dir: Path,
        *,
        training: TrainingConfig,
        lora: LoraConfig | None = None,
        progress: ProgressFn = no_progress,
        should_stop: StopFn = never_stop,
    ) -> TrainResult:
        """Full fine-tune of encoder + head; the student answers with it afterwards.

        ``lora`` is accepted for the common signature and ignored.
        """
        from transformers import AutoModelForSequenceClassification

        if not train_rows:
            raise DataError("no training rows: curate a dataset with a non-empty training split")
        out_dir = Path(out_dir)
        train_split = [split_row(r, i, "train") for i, r in enumerate(train_rows)]
        val_split = [split_row(r, i, "validation") for i, r in enumerate(val_rows)]
        rule = (
            PruningRule.detect([p for p, _ in train_split])
            if training.prompt_pruning
            else PruningRule.identity()
        )
        answers = [a["content"] for _, a in train_split]
        keys_of, merged = class_keys(answers)
        spellings: dict[str, Counter] = {}
        for a in answers:
            spellings.setdefault(keys_of[a.strip()], Counter())[a.strip()] += 1
        keys = sorted(spellings)
        if len(keys) < 2:
            raise DataError(
                f"the training rows hold {len(keys)} distinct answer(s): a classifier needs at "
                "least two classes; curate more varied records"
            )
        texts_of = [spellings[k].most_common(1)[0][0] for k in keys]
        index = {k: i for i, k in enumerate(keys)}

        def rows_of(split) -> list[_Row]:
            ids = self._encode([last_user_text(rule.apply(p)) for p, _ in split])
            labels = [index.get(_key_of(a["content"], merged), -1) for _, a in split]
            return [_Row(i, lab) for i, lab in zip(ids, labels, strict=True)]

        train_ex = rows_of(train_split)
        val_ex = [r for r in rows_of(val_split) if r.label >= 0]  # unseen classes: no loss

        torch.manual_seed(training.seed)
        rng = random.Random(training.seed)
        with MODEL_LOAD_LOCK:
            model = AutoModelForSequenceClassification.from_pretrained(
                self.weights_dir,
                num_labels=len(keys),
                id2label=dict(enumerate(texts_of)),
                label2id={t: i for i, t in enumerate(texts_of)},
            ).to(self.device)
        batch_size = min(training.batch_size, len(train_ex))
        micro = min(training.micro_batch_size, batch_size)
        total_steps = math.ceil(len(train_ex) / batch_size) * training.epochs
        warmup = min(total_steps, math.ceil(training.warmup_ratio * total_steps))
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=training.learning_rate, weight_decay=training.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, warmup))
        model.train()
        step, history = 0, []
        started = time.perf_counter()
        for epoch in range(training.epochs):
            epoch_loss = 0.0
            for plan in plan_steps(train_ex, batch_size, micro, rng):
                n_rows = sum(len(mb) for mb in plan)
                step_loss = 0.0
                for mb in plan:
                    if should_stop():
                        raise Cancelled(f"training cancelled at step {step} of {total_steps}")
                    rows = [train_ex[i] for i in mb]
                    logits = model(**self._batch(rows)).logits
                    target = torch.tensor([r.label for r in rows], device=self.device)
                    loss = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
                    (loss / n_rows).backward()
                    step_loss += float(loss.detach()) / n_rows
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                epoch_loss += step_loss * n_rows
                info = {
                    "epochs_completed": epoch,
                    "steps_completed": step,
                    "loss": step_loss,
                    "lr": scheduler.get_last_lr()[0],
                }
                progress(Progress("train", step, total_steps, info))
            val_loss, val_acc = self._validate(model, val_ex, micro, should_stop)
            history.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": epoch_loss / len(train_ex),
                    "val_loss": val_loss,
                    "val_accuracy": val_acc,
                }
            )
            info = {
                "epochs_completed": epoch + 1,
                "steps_completed": step,
                "loss": history[-1]["train_loss"],
                "val_loss": val_loss,
            }
            progress(Progress("train", step, total_steps, info))
        seconds = time.perf_counter() - started
        if should_stop():
            raise Cancelled("training cancelled before the model was saved")
        model.eval()
        metrics = {
            "train_loss": history[-1]["train_loss"],
            "val_loss": history[-1]["val_loss"],
            "val_accuracy": history[-1]["val_accuracy"],
            "epochs": history,
            "train_seconds": round(seconds, 3),
            "examples_per_s": round(len(train_ex) * training.epochs / max(seconds, 1e-9), 3),
            "train_rows": len(train_ex),
            "val_rows": len(val_ex),
            "classes": len(keys),
        }
        card = {
            "format": CARD_FORMAT,
            "kind": "encoder",
            "base_model": self.model_id,
            "labels": texts_of,
            "label_keys": keys,
            "merged_spellings": merged,
            "training_config": training.model_dump(mode="json"),
            "pruning_rule": None if rule.is_identity else rule.to_dict(),
            "data": {
                "train_rows": len(train_rows),
                "val_rows": len(val_rows),
                "sha256": data_hash(train_rows, val_rows),
            },
            "metrics": metrics,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": _versions(),
        }
        with staged_dir(out_dir) as tmp:  # never a half-written folder at out_dir
            model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            (tmp / CARD_NAME).write_text(json.dumps(card, indent=2, ensure_ascii=False))
        self._set_tuned(model, card, out_dir)
        return TrainResult(out_dir, training.epochs, step, metrics)

    def _validate(self, model, rows, micro, should_stop) -> tuple[float | None, float | None]:
        if not rows:
            return None, None
        model.eval()
        loss, right = 0.0, 0
        with torch.inference_mode():
            for start in range(0, len(rows), micro):
                if should_stop():
                    raise Cancelled("training cancelled during validation")
                chunk = rows[start : start + micro]
                logits = model(**self._batch(chunk)).logits
                target = torch.tensor([r.label for r in chunk], device=self.device)
                loss += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
                right += int((logits.argmax(-1) == target).sum())
        model.train()
        return loss / len(rows), right / len(rows)

    # ---------------------------------------------------------------------- artefacts
    def _set_tuned(self, model, card: dict, path: Path | None) -> None:
        if path is not None:
            self._heads[str(Path(path).absolute())] = (model, card)
            while len(self._heads) > TUNED_HEADS_KEPT:
                self._heads.popitem(last=False)
        self._model = model.eval()
        self._labels = list(card["labels"])
        self._keys = list(card.get("label_keys") or card["labels"])
        self._merged = bool(card.get("merged_spellings"))
        self._rule = PruningRule.from_dict(card.get("pruning_rule"))
        self.tuned_path = path

    def use_tuned(self, path: Path | None) -> None:
        """Answer with a trained folder from now on (``None``: drop the head again).

        The last few heads stay loaded (``TUNED_HEADS_KEPT``), so switching between tuned
        folders, or asking for the active one again, does not reload weights.
        """
        from transformers import AutoModelForSequenceClassification

        if path is None:
            self._model, self._labels, self._keys = None, [], []
            self._rule, self.tuned_path = PruningRule.identity(), None
            return
        path = Path(path)
        if self.tuned_path is not None and self.tuned_path == path and self._model is not None:
            return
        held = self._heads.pop(str(path.absolute()), None)
        if held is None:
            card = read_card(path)
            if card.get("kind") != "encoder" or not card.get("labels"):
                raise DataError(
                    f"{path} is not a trained encoder folder (no encoder {CARD_NAME}): pass the "
                    "folder EncoderStudent.train wrote"
                )
            with MODEL_LOAD_LOCK:
                model = AutoModelForSequenceClassification.from_pretrained(path).to(self.device)
            held = (model, card)
        self._set_tuned(held[0], held[1], path)

    # ---------------------------------------------------------------------- inference
    def predict(
        self,
        conversations: Sequence[Conversation],
        *,
        max_new_tokens: int = 24,
        mode: PredictMode = "generate",
        labels: Sequence[str] | None = None,
        batch_size: int = 16,
        progress: ProgressFn = no_progress,
        should_stop: StopFn = never_stop,
    ) -> list[Prediction]:
        """Classify each conversation; both modes return the class's answer string.

        ``label_scores`` holds the head's logit of every class (or, when ``labels`` is given,
        of each given label that maps to a class; the best of those is the answer).
        """
        if self._model is None:
            raise FindistilError(
                f"encoder student {self.model_id} has no classification head yet: train it "
                "first or load a trained folder with use_tuned(path) (an encoder has no "
                "zero-shot base or few-shot evaluation)"
            )
        encoded = self._encode_counted([self.input_text(c) for c in conversations])
        rows = [_Row(ids) for ids, _ in encoded]
        wanted: list[tuple[str, int]] = []
        if labels:
            index = {k: i for i, k in enumerate(self._keys)}
            for label in labels:
                i = index.get(_key_of(label, self._merged))
                if i is not None:
                    wanted.append((label, i))
        if not wanted:
            wanted = list(zip(self._labels, range(len(self._labels)), strict=True))
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))
        out: list[Prediction | None] = [None] * len(rows)
        done = 0
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                if should_stop():
                    raise Cancelled("prediction cancelled")
                idx = order[start : start + batch_size]
                began = time.perf_counter()
                logits = self._model(**self._batch([rows[i] for i in idx])).logits.float().cpu()
                per_row = (time.perf_counter() - began) / len(idx)
                for j, i in enumerate(idx):
                    scores = {name: float(logits[j, c]) for name, c in wanted}
                    best = max(scores, key=scores.get)
                    out[i] = Prediction(
                        text=best,
                        prompt_tokens=len(rows[i].input_ids),
                        latency_s=per_row,
                        label_scores=scores,
                        truncated_tokens=encoded[i][1],
                    )
                done += len(idx)
                progress(Progress("predict", done, len(rows)))
        return [p for p in out if p is not None]

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Mean-pooled, L2-normalised embeddings of the base encoder, shape (n, dim)."""
        return _mean_pool(self._encoder, self.tokenizer, texts, self.device, batch_size)

    def close(self) -> None:
        self._model = None
        self._encoder = None
        self._heads.clear()


# -------------------------------------------------------------------------- embeddings


def _mean_pool(model, tokenizer, texts: Sequence[str], device: str, batch_size: int) -> np.ndarray:
    dim = model.config.hidden_size
    if not texts:
        return np.zeros((0, dim), dtype=np.float32)
    max_len = min(MAX_POSITIONS, getattr(model.config, "max_position_embeddings", MAX_POSITIONS))
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), dim), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=max_len,
                return_tensors="pt",
            ).to(device)
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
            out[idx] = pooled.float().cpu().numpy()
    return out


_EMBEDDERS: dict[str, tuple[Any, Any, str]] = {}
_EMBEDDERS_LOCK = threading.Lock()


def embed_texts(
    texts: Sequence[str],
    settings: Settings | None = None,
    *,
    model_id: str = MINILM,
    batch_size: int = 64,
) -> np.ndarray:
    """Sentence embeddings for similarity search (cosine = dot product of the rows).

    The encoder is loaded once per process through ``registry.resolve_model``. Example:
    ``embed_texts(["Apple beats", "Apple misses"]) @ embed_texts(["Apple Q3"]).T``.
    """
    from transformers import AutoModel, AutoTokenizer

    from findistil.config import load_settings
    from findistil.students.registry import pick_device, resolve_model

    settings = settings or load_settings()
    path = resolve_model(model_id, settings)
    with _EMBEDDERS_LOCK, MODEL_LOAD_LOCK:
        if str(path) not in _EMBEDDERS:
            device = pick_device(settings)
            model = AutoModel.from_pretrained(path).to(device).eval()
            _EMBEDDERS[str(path)] = (model, AutoTokenizer.from_pretrained(path), device)
        model, tokenizer, device = _EMBEDDERS[str(path)]
    return _mean_pool(model, tokenizer, list(texts), device, batch_size)
