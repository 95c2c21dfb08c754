"""The contract every student kind meets, so evaluation and the orchestrator never name one.

A student is a loaded model that can ``predict`` answers for chat conversations, ``train``
on curated rows into an artefact (a LoRA adapter, a fine-tuned head) and ``use_tuned`` such an
artefact for later predictions. Kinds register themselves in ``findistil.students`` (peft's
register_peft_method idea): the built-in ``causal_lm`` and ``encoder`` use the same hook an
outside kind would.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from findistil.config import LoraConfig, TrainingConfig
from findistil.progress import ProgressFn, StopFn, never_stop, no_progress

# transformers/accelerate build models under context managers that patch torch globally
# (``init_empty_weights`` swaps ``nn.Module.register_parameter``); two threads loading at
# once can leave the patch installed, after which every later load gets meta tensors.
# Every load in findistil (runner threads, parallel candidates) holds this lock.
MODEL_LOAD_LOCK = threading.RLock()

Conversation = list[dict[str, Any]]  # OpenAI chat messages: [{"role": ..., "content": ...}]
PredictMode = Literal["generate", "label_scores"]


@dataclass
class Prediction:
    """One answer of a student for one conversation."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    # log-likelihood (causal LM) or logit (encoder) of every candidate answer, when scored
    label_scores: dict[str, float] | None = None
    truncated_tokens: int = 0  # prompt tokens dropped to fit the model (encoder: left side)
    logprob: float | None = None  # log-probability of a generated answer (its confidence)


@dataclass
class TrainResult:
    """What ``Student.train`` produced: the artefact folder and how training went."""

    path: Path
    epochs_completed: int
    steps_completed: int
    metrics: dict[str, Any] = field(default_factory=dict)  # train_loss, val_loss, examples_per_s


class Student(ABC):
    """A loaded student model. Build one with ``findistil.students.load_student``."""

    kind: ClassVar[str]
    model_id: str
    num_params: int
    dtype: str
    device: str

    @abstractmethod
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
        """Answer each conversation (the request messages; the answer is not included).

        ``mode="label_scores"`` ranks ``labels`` (answer strings such as ``[[earnings]]``)
        instead of generating freely; ``Prediction.text`` is then the best label.
        Raises ``findistil.errors.Cancelled`` when ``should_stop()`` turns true.
        """

    @abstractmethod
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
        """Fine-tune on upstream train/val rows (``{"messages": [..., assistant answer]}``).

        Writes the artefact into ``out_dir`` only when training finished; a cancelled run
        raises ``Cancelled`` and leaves no half-written artefact behind.
        """

    @abstractmethod
    def use_tuned(self, path: Path | None) -> None:
        """Answer with a trained artefact from now on (``None``: back to the base model)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free memory held by the model (called when a candidate is released)."""
