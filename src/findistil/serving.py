"""Serving the chosen student: which models can answer, and one loaded student that answers.

The last step of the flywheel (after evaluation picks a student): every completed
customization's artefact is a servable model under the ``customized_model`` name the job
service stored (``<base>@adapter-<job id>``), and so is the base of each of those candidates
whose kind answers untuned (a causal LM; an encoder has no head before training).
``api/openai.py`` puts this behind ``/v1/models`` and ``/v1/chat/completions``.

``StudentCache`` keeps the most recently used student loaded (one: a 135M model is a few
hundred MB and the machine is small) behind a lock; switching between two adapters of the
same base only swaps the adapter, switching bases loads the new one and closes the old.
The tuned adapter applies its own prompt-pruning rule, so callers send the same full
upstream-style messages the teacher got.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from findistil.config import Settings
from findistil.errors import NotFound
from findistil.flywheel.db import FlywheelDB, as_utc, candidates, customizations
from findistil.students import Prediction, Student, load_student
from findistil.students.base import Conversation

# Kinds whose base model cannot answer before training (see students/encoder.py).
NO_BASE_KINDS = frozenset({"encoder"})


@dataclass(frozen=True)
class ServedModel:
    """One id ``/v1/models`` lists: a base student, or a base plus a tuned artefact."""

    id: str
    model_name: str  # what load_student takes
    kind: str
    adapter_path: Path | None  # None: the base model
    created: int  # unix seconds the artefact was finished (0 when unknown)
    job_id: str | None = None

    def as_openai(self) -> dict:
        """OpenAI's model object plus findistil's fields (clients ignore unknown keys)."""
        return {
            "id": self.id,
            "object": "model",
            "created": self.created,
            "owned_by": "findistil",
            "root": self.model_name,
            "parent": self.model_name if self.adapter_path else None,
            "kind": self.kind,
            "job_id": self.job_id,
        }


def served_models(db: FlywheelDB) -> list[ServedModel]:
    """Every tuned artefact of a completed customization (newest first), then their bases.

    An artefact whose folder was deleted (``jobs delete``) is not listed: it cannot answer.
    """
    query = (
        select(
            customizations.c.customized_model,
            customizations.c.adapter_path,
            customizations.c.finished_at,
            customizations.c.job_id,
            candidates.c.model_name,
            candidates.c.kind,
        )
        .join(candidates, customizations.c.candidate_id == candidates.c.id)
        .where(
            customizations.c.status == "completed",
            customizations.c.customized_model.is_not(None),
            customizations.c.adapter_path.is_not(None),
        )
        .order_by(customizations.c.finished_at.desc(), customizations.c.id.desc())
    )
    with db.begin() as conn:
        rows = conn.execute(query).all()
    tuned: list[ServedModel] = []
    bases: dict[str, ServedModel] = {}
    for row in rows:
        path = Path(row.adapter_path)
        if not path.exists():
            continue
        finished = as_utc(row.finished_at)
        created = int(finished.timestamp()) if finished else 0
        kind = row.kind or "auto"
        tuned.append(
            ServedModel(row.customized_model, row.model_name, kind, path, created, row.job_id)
        )
        if kind not in NO_BASE_KINDS and row.model_name not in bases:
            bases[row.model_name] = ServedModel(row.model_name, row.model_name, kind, None, 0)
    return tuned + list(bases.values())


def find_model(db: FlywheelDB, model_id: str) -> ServedModel:
    """The servable model called ``model_id``; raises ``NotFound`` naming the choices' source."""
    for model in served_models(db):
        if model.id == model_id:
            return model
    raise NotFound(
        f"The model {model_id!r} does not exist: GET /v1/models lists the tuned students of "
        "completed jobs and their bases"
    )


class StudentCache:
    """The most recently used student, loaded once and shared by requests under a lock.

    One request generates at a time: the student's adapter is global state of the loaded
    model, and the CPU has no room for two generations in parallel anyway.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._key: tuple[str, str] | None = None
        self._student: Student | None = None

    @property
    def loaded(self) -> tuple[str, str] | None:
        """``(model_name, kind)`` of the student held now, or None."""
        return self._key

    def predict(
        self, model: ServedModel, conversation: Conversation, *, max_new_tokens: int
    ) -> Prediction:
        """Answer one conversation with ``model`` (loading or switching to it first)."""
        with self._lock:
            student = self._student_for(model)
            student.use_tuned(model.adapter_path)
            return student.predict([conversation], max_new_tokens=max_new_tokens)[0]

    def _student_for(self, model: ServedModel) -> Student:
        key = (model.model_name, model.kind)
        if self._student is not None and self._key == key:
            return self._student
        self._release()
        self._student = load_student(model.model_name, model.kind, self.settings)
        self._key = key
        return self._student

    def _release(self) -> None:
        if self._student is not None:
            self._student.close()
        self._student, self._key = None, None

    def close(self) -> None:
        with self._lock:
            self._release()


def chat_completion(
    model: ServedModel, prediction: Prediction, *, max_new_tokens: int, request_id: str
) -> dict:
    """OpenAI's ``chat.completion`` object for one answer."""
    # The engine stops at the end-of-turn token; hitting the budget exactly means cut off.
    finish = "length" if prediction.completion_tokens >= max_new_tokens else "stop"
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model.id,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": prediction.text},
                "finish_reason": finish,
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prediction.prompt_tokens,
            "completion_tokens": prediction.completion_tokens,
            "total_tokens": prediction.prompt_tokens + prediction.completion_tokens,
        },
    }


def flatten_content(content: str | Sequence[dict] | None) -> str:
    """A message's text: OpenAI also allows a list of ``{"type": "text", "text": ...}`` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")
