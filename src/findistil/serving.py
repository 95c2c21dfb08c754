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

import asyncio
import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from anyio import to_thread

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


@dataclass(frozen=True)
class Batch:
    """What the requests of one micro-batch share: the model and how it is asked."""

    model: ServedModel
    max_new_tokens: int
    mode: PredictMode = "generate"
    labels: tuple[str, ...] | None = None


def answer_many(
    cache: StudentCache, settings: Settings, batch: Batch, conversations: Sequence[Conversation]
) -> list[Prediction | FindistilError]:
    """Answer several conversations with one ``predict`` call (a micro-batch of requests):
    each gets its prediction, or the error that is its alone.

    A generating student refuses a prompt longer than its context (``ContextTooLong``); a
    classifier reads the end of an over-long prompt and says how much it dropped
    (``Prediction.truncated_tokens``).
    """
    model = batch.model
    out: list[Prediction | FindistilError | None] = [None] * len(conversations)
    with cache.use(model.model_name, model.kind, settings, adapter=model.adapter_path) as student:
        context = getattr(student, "context_length", None)
        fits = []
        for i, conversation in enumerate(conversations):
            needed = student.prompt_length(conversation) + batch.max_new_tokens if context else 0
            if context is not None and needed > context:
                out[i] = ContextTooLong(
                    f"This model's maximum context length is {context} tokens, but the "
                    f"messages and max_tokens need {needed}: shorten the messages or lower "
                    "max_tokens."
                )
            else:
                fits.append(i)
        if fits:
            predictions = student.predict(
                [conversations[i] for i in fits],
                max_new_tokens=batch.max_new_tokens,
                mode=batch.mode,
                labels=list(batch.labels) if batch.labels else None,
                batch_size=len(fits),
            )
            for i, prediction in zip(fits, predictions, strict=True):
                out[i] = prediction
    return out  # type: ignore[return-value]


def answer(
    cache: StudentCache, settings: Settings, batch: Batch, conversation: Conversation
) -> Prediction:
    """``answer_many`` for one conversation; its error is raised."""
    (result,) = answer_many(cache, settings, batch, [conversation])
    if isinstance(result, FindistilError):
        raise result
    return result


class MicroBatcher:
    """Gathers concurrent requests of one ``Batch`` into one ``answer_many`` call.

    The first request of a batch key waits ``window_s`` for company (less when
    ``max_batch`` are already queued); the batch then runs on a model-work thread while new
    requests queue for the next one, so one model answers one batch at a time and the two
    cores work on many rows at once instead of interleaving single rows. One client at a
    time pays ``window_s`` of latency; ``max_batch = 1`` turns batching off.
    """

    def __init__(self, run, *, limiter, max_batch: int = 16, window_s: float = 0.004):
        self.run, self.limiter = run, limiter  # run(batch, conversations) -> results
        self.max_batch, self.window_s = max_batch, window_s
        self._queues: dict[Batch, list] = {}
        self._tasks: dict[Batch, asyncio.Task] = {}  # the one draining each key's queue
        self.requests = self.batches = self.largest = 0

    def counts(self) -> dict[str, int]:
        return {"requests": self.requests, "batches": self.batches, "largest_batch": self.largest}

    async def submit(self, batch: Batch, conversation: Conversation) -> Prediction:
        """The prediction for ``conversation``; raises its error (``ContextTooLong``, ...)."""
        future = asyncio.get_running_loop().create_future()
        self._queues.setdefault(batch, []).append((conversation, future))
        if batch not in self._tasks:
            self._tasks[batch] = asyncio.create_task(self._drain(batch))
        return await future

    async def _drain(self, batch: Batch) -> None:
        while self._queues.get(batch):
            if len(self._queues[batch]) < self.max_batch and self.window_s > 0:
                await asyncio.sleep(self.window_s)
            queue = self._queues[batch]
            taken, self._queues[batch] = queue[: self.max_batch], queue[self.max_batch :]
            conversations = [c for c, _ in taken]
            self.requests += len(taken)
            self.batches += 1
            self.largest = max(self.largest, len(taken))
            try:
                results = await to_thread.run_sync(
                    self.run, batch, conversations, limiter=self.limiter
                )
            except Exception as exc:  # the model could not be loaded, ...
                results = [exc] * len(taken)
            for (_, future), result in zip(taken, results, strict=True):
                if future.done():  # the client went away
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        self._queues.pop(batch, None)  # no await since the check: nothing queued meanwhile
        self._tasks.pop(batch, None)


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
