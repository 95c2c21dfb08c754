"""Serving the chosen student: the models ``/v1`` lists, and answering with one of them.

The last step of the flywheel (after evaluation picks a student): every completed
customization's artefact is a servable model under the ``customized_model`` name the job
stored, and so is the base of each of those candidates whose kind answers untuned (a causal
LM; an encoder has no head before training). Which artefacts exist is the orchestrator's to
say (``flywheel.jobs.served_models`` builds the ``ServedModel`` list from its rows);
``api/openai.py`` puts them behind ``/v1/models`` and ``/v1/chat/completions``.

Students come from the per-process ``StudentCache`` that the flywheel's stages use too, so a
student a job just tuned in this process answers without a reload, and switching between
tuned adapters of one base only swaps the adapter. The tuned adapter applies its own
prompt-pruning rule, so callers send the same full upstream-style messages the teacher got.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from findistil.config import Settings
from findistil.students import Prediction
from findistil.students.base import Conversation
from findistil.students.cache import StudentCache


@dataclass(frozen=True)
class ServedModel:
    """One id ``/v1/models`` lists: a base student, or a base plus a tuned artefact."""

    id: str
    model_name: str  # what load_student takes
    kind: str
    adapter_path: Path | None  # local path of its artefact; None: the base model
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


def answer(
    cache: StudentCache,
    settings: Settings,
    model: ServedModel,
    conversation: Conversation,
    *,
    max_new_tokens: int,
) -> Prediction:
    """Answer one conversation with ``model`` (loading it into the cache first if needed)."""
    with cache.use(model.model_name, model.kind, settings, adapter=model.adapter_path) as student:
        return student.predict([conversation], max_new_tokens=max_new_tokens)[0]


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
