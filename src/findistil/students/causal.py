"""The ``causal_lm`` student: a chat LLM (SmolLM2-135M-Instruct by default) with LoRA adapters.

Built by ``findistil.students.load_student`` (registered in ``students/__init__.py`` as
``CausalLMStudent.load``); evaluation and the orchestrator use it only through the ``Student``
contract in ``students/base.py``. Inference runs on ``students/engine.py`` (prefix KV reuse,
label scoring, adapter switching), training on ``students/lora.py``.

When a tuned adapter is active and its ``adapter_card.json`` carries a prompt-pruning rule,
every incoming conversation is reduced with that rule before templating, so callers keep
sending upstream's full messages while the adapter sees the compact form it was trained on.

Example::

    student = load_student("HuggingFaceTB/SmolLM2-135M-Instruct")
    student.predict([messages], mode="label_scores", labels=["[[earnings]]", "[[other]]"])
    result = student.train(train_rows, val_rows, Path("adapter"), training=..., lora=...)
    student.use_tuned(result.path)        # later predictions use the adapter (and its rule)
    student.use_tuned(None)               # back to the base model
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from findistil.config import LoraConfig, Settings, TrainingConfig, load_settings
from findistil.errors import ConfigError
from findistil.progress import ProgressFn, StopFn, never_stop, no_progress
from findistil.students.base import Conversation, Prediction, PredictMode, Student, TrainResult
from findistil.students.engine import Engine

CARD_NAME = "adapter_card.json"


class CausalLMStudent(Student):
    """A causal LM served by an ``Engine``; ``use_tuned`` switches LoRA adapters in place."""

    kind = "causal_lm"

    def __init__(self, model_id: str, engine: Engine, weights_dir: Path | None = None):
        from findistil.students.registry import describe_model

        self.model_id = model_id
        self.engine = engine
        self.weights_dir = weights_dir
        self.device = engine.device
        self.num_params, self.dtype = describe_model(engine.base_model)
        self.rule = None  # PruningRule of the active adapter, if any
        self.tuned_path: Path | None = None

    @classmethod
    def load(
        cls, model_id: str, weights_dir: Path, settings: Settings | None = None
    ) -> CausalLMStudent:
        """Load weights from a resolved HF folder (``registry.resolve_model``)."""
        from findistil.students.registry import pick_device

        device = pick_device(settings or load_settings())
        return cls(model_id, Engine.from_pretrained(weights_dir, device), Path(weights_dir))

    # -------------------------------------------------------------------------- predict

    def _prepare(self, conversations: Sequence[Conversation]) -> list[Conversation]:
        if self.rule is None:
            return [list(c) for c in conversations]
        return [self.rule.apply(c) for c in conversations]

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
        """Answer each conversation; see ``Student.predict``.

        ``mode="label_scores"`` without ``labels`` ranks the 13 taxonomy answers
        (``[[earnings]]``, ...). Token counts are of the prompt the model actually saw
        (after pruning).
        """
        convs = self._prepare(conversations)
        if mode == "generate":
            outs = self.engine.generate(
                convs,
                max_new_tokens,
                batch_size=batch_size,
                progress=progress,
                should_stop=should_stop,
            )
            return [
                Prediction(
                    o.text, o.prompt_tokens, o.completion_tokens, o.latency_s, logprob=o.logprob
                )
                for o in outs
            ]
        if mode != "label_scores":
            raise ConfigError(f"predict mode {mode!r}: expected 'generate' or 'label_scores'")
        if labels is None:
            from findistil import taxonomy

            labels = [taxonomy.format_answer(label) for label in taxonomy.LABELS]
        ranks = self.engine.score_labels(
            convs, list(labels), batch_size=batch_size, progress=progress, should_stop=should_stop
        )
        return [
            Prediction(r.best, r.prompt_tokens, 0, r.latency_s, label_scores=r.scores)
            for r in ranks
        ]

    @property
    def context_length(self) -> int:
        """Tokens the model can attend over: prompt plus answer."""
        config = self.engine.model.config.get_text_config(decoder=True)
        return int(getattr(config, "max_position_embeddings", 0) or 1 << 30)

    def answer_length(self, answer: str) -> int:
        """Tokens this model spends writing ``answer`` (its end-of-turn token included)."""
        return len(self.engine.answer_ids(answer))

    def prompt_length(self, conversation: Conversation) -> int:
        """Tokens of ``conversation``'s prompt as this model would see it (after pruning)."""
        return len(self.engine.encode(self._prepare([conversation])[0]))

    # -------------------------------------------------------------------------- adapters

    def use_tuned(self, path: Path | None) -> None:
        """Serve with the LoRA adapter at ``path`` (and its pruning rule); ``None``: base."""
        from findistil.students.pruning import PruningRule

        if path is None:
            self.engine.set_adapter(None)
            self.rule, self.tuned_path = None, None
            return
        path = Path(path)
        if not (path / "adapter_config.json").is_file():
            raise ConfigError(
                f"{path} is not a LoRA adapter folder (no adapter_config.json): "
                "pass the folder a training run wrote"
            )
        card = _read_card(path)
        rule = PruningRule.from_dict(card.get("pruning_rule"))
        name = _adapter_name(path)
        if name in self.engine.adapters:
            self.engine.set_adapter(name)
        else:
            self.engine.load_adapter(path, name)
        self.rule = None if rule.is_identity else rule
        self.tuned_path = path

    # -------------------------------------------------------------------------- training

    def train(
        self,
        train_rows: Sequence[dict[str, Any]],
        val_rows: Sequence[dict[str, Any]],
        out_dir: Path,
        *,
        training: TrainingConfig,
        lora: LoraConfig,
        progress: ProgressFn = no_progress,
        should_stop: StopFn = never_stop,
    ) -> TrainResult:
        """LoRA fine-tune (``students.lora.train_lora``); the base weights stay untouched."""
        from findistil.students.lora import train_lora

        result = train_lora(
            self.engine.model,
            self.engine.tokenizer,
            train_rows,
            val_rows,
            Path(out_dir),
            training=training,
            lora=lora,
            base_model_id=self.model_id,
            progress=progress,
            should_stop=should_stop,
        )
        stale = _adapter_name(result.path)
        if stale in self.engine.adapters:  # an older adapter of the same folder was loaded
            active = self.engine.active_adapter
            self.engine.load_adapter(result.path, stale)
            self.engine.set_adapter(active)
        return result

    def close(self) -> None:
        self.engine.close()


def _adapter_name(path: Path) -> str:
    """One adapter slot per folder: the name is stable, so re-using a folder is cheap."""
    return "a" + hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:12]


def _read_card(path: Path) -> dict[str, Any]:
    card = path / CARD_NAME
    if not card.is_file():
        return {}
    try:
        data = json.loads(card.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{card} is not valid JSON ({exc}): retrain the adapter") from None
    return data if isinstance(data, dict) else {}
