"""OpenAI-compatible routes that serve the flywheel's students: ``/v1/models`` and
``/v1/chat/completions``.

Any OpenAI client can point its base URL at ``findistil serve`` and call the tuned student
by the ``customized_model`` name a job reports. Errors use OpenAI's shape
(``{"error": {"message", "type", "code", "param"}}``) so those clients show them, a
malformed body (422, ``param`` naming the field) and a too-large one (413) included. The
model work lives in ``findistil.serving``; generation runs on its own two threads
(``MODEL_WORK``) so the event loop and ``/api/jobs`` keep answering meanwhile.

Decoding is always greedy: ``temperature``/``top_p``/``seed`` are accepted (clients send
them by default) and change nothing. A parameter that would change the answer and that the
students cannot honour (``n`` > 1, ``tools``, ``tool_choice``, a non-text
``response_format``, ``logprobs``, ``stop``, penalties, ``logit_bias``) is a 400 naming it,
never silently ignored. ``stream: true`` answers in OpenAI's server-sent events. A prompt
longer than a generating student's context is a 400 ``context_length_exceeded``; a
classifier reads the end of it and reports the cut as ``usage.truncated_prompt_tokens``.
"""

from __future__ import annotations

import functools
import json
import secrets
import time
from datetime import datetime
from typing import Any, Literal

from anyio import CapacityLimiter
from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from findistil.api.deps import ArtifactsDep, BatcherDep, CacheDep, DBDep, SettingsDep, StoreDep
from findistil.api.schemas import OpenAIErrorResponse, openai_error_body
from findistil.errors import FindistilError
from findistil.flywheel.deployments import ROUTE_PREFIX, active_deployment, list_deployments
from findistil.flywheel.jobs import find_served_model, served_models
from findistil.routing import RouteEnv, TeacherUnavailable, route, route_batch
from findistil.serving import (
    Batch,
    ContextTooLong,
    MicroBatcher,
    ServedModel,
    answer_many,
    chat_completion,
    completion_chunks,
    flatten_content,
)

_ERROR = {"model": OpenAIErrorResponse}
router = APIRouter(
    prefix="/v1",
    tags=["openai"],
    responses={400: _ERROR, 401: _ERROR, 403: _ERROR, 404: _ERROR, 413: _ERROR, 422: _ERROR},
)

# Generation runs on its own threads, so a slow model never takes the threads that answer
# /api/jobs (api_threads); two at a time is what two cores can use.
MODEL_WORK = CapacityLimiter(2)
DEFAULT_MAX_TOKENS = 64


def model_batcher(settings, cache) -> MicroBatcher:
    """The app's micro-batcher: concurrent requests of one model in one predict call."""
    run = functools.partial(answer_many, cache, settings)
    return MicroBatcher(run, limiter=MODEL_WORK, max_batch=settings.serve_max_batch,
                        window_s=settings.serve_batch_window_ms / 1000)  # fmt: skip


MAX_TOKENS_LIMIT = 1024  # a classifier answers in ~6 tokens; this bounds a CPU-minute request


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(BaseModel):
    """OpenAI's chat body; fields it has and we do not use are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(default=None, ge=0, le=2)  # ignored: always greedy
    n: int | None = 1
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None


# Parameters that change an answer, with the values that leave it unchanged (what clients
# send by default); any other value is refused, naming the parameter.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "stop": (None, [], ""),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
}


# A student tuned on a tool-calling workload writes calls: it takes tools (as the schema it
# learnt; they are not shown to it) and may be asked to call.
_TOOL_PARAMS = ("tools", "tool_choice")


def unsupported(body: ChatRequest, model: ServedModel) -> str | None:
    """The first parameter of ``body`` that ``model`` cannot honour, or None."""
    values = {"n": body.n, **(body.model_extra or {})}
    for name, neutral in _NEUTRAL.items():
        if name in _TOOL_PARAMS and model.workload == "tool_calling":
            continue
        if name in values and not any(_same(values[name], v) for v in neutral):
            return name
    return None


def _same(value: Any, neutral: Any) -> bool:
    """Equal, where a bool only equals a bool (``true`` is not ``n=1``)."""
    if isinstance(value, bool) != isinstance(neutral, bool):
        return False
    return value == neutral


def openai_error(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> JSONResponse:
    return JSONResponse(openai_error_body(message, code, param), status)


def _resolve(db, artifacts, model_id: str) -> tuple[dict | None, ServedModel]:
    """(deployment or None, the student that answers) of a requested model id."""
    if not model_id.startswith(ROUTE_PREFIX):
        return None, find_served_model(db, artifacts, model_id)
    deployment = active_deployment(db, model_id.removeprefix(ROUTE_PREFIX))
    return deployment, find_served_model(db, artifacts, deployment["customized_model"])


def _route_model(deployment: dict) -> dict:
    return {
        "id": deployment["model"],
        "object": "model",
        "created": int(datetime.fromisoformat(deployment["created_at"]).timestamp()),
        "owned_by": "findistil",
        "root": deployment["model_name"],
        "parent": deployment["customized_model"],
        "kind": "route",
        "job_id": deployment["job_id"],
        "workload": deployment["cascade"].get("workload"),
    }


@router.get("/models")
def list_models(db: DBDep, artifacts: ArtifactsDep) -> dict:
    """Each workload's route (its deployed student, teacher as fallback), then the tuned
    students of completed jobs (newest first) and the bases they were tuned from."""
    routes = [_route_model(d) for d in list_deployments(db) if d["status"] == "active"]
    students = [m.as_openai() for m in served_models(db, artifacts)]
    return {"object": "list", "data": routes + students}


@router.get("/models/{model_id:path}", response_model=None)
def get_model(model_id: str, db: DBDep, artifacts: ArtifactsDep) -> dict | JSONResponse:
    try:
        if model_id.startswith(ROUTE_PREFIX):
            return _route_model(active_deployment(db, model_id.removeprefix(ROUTE_PREFIX)))
        return find_served_model(db, artifacts, model_id).as_openai()
    except FindistilError as exc:
        return openai_error(exc.http_status, str(exc), "model_not_found")


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatRequest,
    db: DBDep,
    store: StoreDep,
    artifacts: ArtifactsDep,
    settings: SettingsDep,
    cache: CacheDep,
    batcher: BatcherDep,
) -> dict | JSONResponse:
    """Answer the conversation with the named student (greedy decoding), or on a
    workload's route (``findistil/route-<workload_id>``: the deployed student when sure,
    else the teacher)."""
    try:
        deployment, model = await run_in_threadpool(_resolve, db, artifacts, body.model)
    except FindistilError as exc:
        return openai_error(exc.http_status, str(exc), "model_not_found")
    refused = unsupported(body, model)
    if refused is not None:
        value = (body.model_extra or {}).get(refused, body.n)
        return openai_error(
            400,
            f"{refused}={json.dumps(value)[:80]} is not supported by {model.id} "
            f"(it answers one greedy text reply): leave {refused} out",
            "unsupported_parameter",
            refused,
        )
    conversation = [{"role": m.role, "content": flatten_content(m.content)} for m in body.messages]
    budget = body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS
    started = time.perf_counter()
    batch = Batch(model, budget) if deployment is None else route_batch(deployment, model, budget)
    try:
        prediction = await batcher.submit(batch, conversation)
        extra = None
        if deployment is not None:
            tools = (body.model_extra or {}).get("tools")
            work = functools.partial(route, RouteEnv(db, store, cache, settings), deployment,
                                     model, conversation, prediction, max_new_tokens=budget,
                                     tools=tools, started=started)  # fmt: skip
            routed = await run_in_threadpool(work)
            prediction, model, extra = routed.prediction, routed.model, routed.info()
    except ContextTooLong as exc:
        return openai_error(400, str(exc), "context_length_exceeded", "messages")
    except TeacherUnavailable as exc:
        return openai_error(exc.http_status, str(exc), "teacher_unavailable")
    except FindistilError as exc:  # weights gone, adapter unreadable, ...
        return openai_error(exc.http_status, str(exc), "model_error")
    request_id = "chatcmpl-" + secrets.token_hex(12)
    if not body.stream:
        completion = chat_completion(
            model, prediction, max_new_tokens=budget, request_id=request_id
        )
        return completion if extra is None else {**completion, "findistil": extra}
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    chunks = completion_chunks(
        model, prediction, max_new_tokens=budget, request_id=request_id,
        include_usage=include_usage,
    )  # fmt: skip
    events = [f"data: {json.dumps(c)}\n\n" for c in chunks] + ["data: [DONE]\n\n"]
    return StreamingResponse(iter(events), media_type="text/event-stream")
