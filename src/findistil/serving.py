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

import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from findistil.config import Settings
from findistil.errors import FindistilError
from findistil.students import Prediction
from findistil.students.base import Conversation, PredictMode
from findistil.students.cache import StudentCache
from findistil.workloads.tool_calling import parse_calls


@dataclass(frozen=True)
class ServedModel:
    """One id ``/v1/models`` lists: a base student, or a base plus a tuned artefact."""

    id: str
    model_name: str  # what load_student takes
    kind: str
    adapter_path: Path | None  # local path of its artefact; None: the base model
    created: int  # unix seconds the artefact was finished (0 when unknown)
    job_id: str | None = None
    workload: str | None = None  # what it was tuned on (tool_calling answers with tool_calls)

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
            "workload": self.workload,
        }


class ContextTooLong(FindistilError):
    """The prompt and the answer budget do not fit the model (OpenAI's
    ``context_length_exceeded``): refused rather than answered from a cut-off prompt."""


def answer(
    cache: StudentCache,
    settings: Settings,
    model: ServedModel,
    conversation: Conversation,
    *,
    max_new_tokens: int,
    mode: PredictMode = "generate",
    labels: Sequence[str] | None = None,
) -> Prediction:
    """Answer one conversation with ``model`` (loading it into the cache first if needed);
    ``mode``/``labels`` as ``Student.predict`` (a route scores as its calibration did).

    A generating student refuses a prompt longer than its context (``ContextTooLong``); a
    classifier reads the end of an over-long prompt and says how much it dropped
    (``Prediction.truncated_tokens``).
    """
    with cache.use(model.model_name, model.kind, settings, adapter=model.adapter_path) as student:
        context = getattr(student, "context_length", None)
        if context is not None:
            needed = student.prompt_length(conversation) + max_new_tokens
            if needed > context:
                raise ContextTooLong(
                    f"This model's maximum context length is {context} tokens, but the "
                    f"messages and max_tokens need {needed}: shorten the messages or lower "
                    "max_tokens."
                )
        return student.predict(
            [conversation], max_new_tokens=max_new_tokens, mode=mode, labels=labels
        )[0]


def chat_completion(
    model: ServedModel, prediction: Prediction, *, max_new_tokens: int, request_id: str
) -> dict:
    """OpenAI's ``chat.completion`` object for one answer; a tool-calling student's calls
    come back as ``message.tool_calls`` with ``finish_reason: tool_calls``."""
    message, finish = answer_message(model, prediction, max_new_tokens)
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model.id,
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": usage(prediction),
    }


def answer_message(model: ServedModel, prediction: Prediction, max_new_tokens: int):
    """(assistant message, finish reason) of an answer: text, or the calls it writes when
    the student was tuned on a tool-calling workload and its text reads as calls."""
    calls = parse_calls(prediction.text) if model.workload == "tool_calling" else None
    if not calls:
        message = {"role": "assistant", "content": prediction.text}
        return message, finish_reason(prediction, max_new_tokens)
    tool_calls = [
        {
            "id": f"call_{i}_{secrets.token_hex(6)}",
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)},
        }
        for i, (name, args) in enumerate(calls)
    ]
    return {"role": "assistant", "content": None, "tool_calls": tool_calls}, "tool_calls"


def usage(prediction: Prediction) -> dict:
    """OpenAI's usage object; ``truncated_prompt_tokens`` (findistil's) counts the prompt
    tokens a classifier did not read, so a cut is never silent."""
    return {
        "prompt_tokens": prediction.prompt_tokens,
        "completion_tokens": prediction.completion_tokens,
        "total_tokens": prediction.prompt_tokens + prediction.completion_tokens,
        "truncated_prompt_tokens": prediction.truncated_tokens,
    }


def finish_reason(prediction: Prediction, max_new_tokens: int) -> str:
    # The engine stops at the end-of-turn token; hitting the budget exactly means cut off.
    return "length" if prediction.completion_tokens >= max_new_tokens else "stop"


def completion_chunks(
    model: ServedModel,
    prediction: Prediction,
    *,
    max_new_tokens: int,
    request_id: str,
    include_usage: bool,
) -> list[dict]:
    """The answer as OpenAI's ``chat.completion.chunk`` stream: the role, the text (one
    chunk: students answer in a few tokens and finish before the first byte goes out), the
    finish reason, then the usage when ``stream_options.include_usage`` asked for it."""
    head = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model.id,
    }
    message, finish = answer_message(model, prediction, max_new_tokens)
    calls = message.get("tool_calls")
    body = (
        {"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}
        if calls
        else {"content": message["content"]}
    )
    deltas = [({"role": "assistant", "content": ""}, None), (body, None), ({}, finish)]
    chunks = [
        {**head, "choices": [{"index": 0, "delta": d, "finish_reason": f, "logprobs": None}]}
        for d, f in deltas
    ]
    if include_usage:
        chunks.append({**head, "choices": [], "usage": usage(prediction)})
    return chunks


def flatten_content(content: str | Sequence[dict] | None) -> str:
    """A message's text: OpenAI also allows a list of ``{"type": "text", "text": ...}`` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")
