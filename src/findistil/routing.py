"""The cascade route: the deployed student answers when it is sure, the teacher when not,
and what the teacher answers goes back into the log store.

``findistil/route-<workload_id>`` on ``/v1/chat/completions`` runs the workload's deployed
student (``flywheel/deployments.py``) scored as its calibration was (``cascade.py``). When
its calibrated confidence reaches the deployment's threshold its answer is returned;
otherwise the request goes to the deployment's teacher (any OpenAI-compatible endpoint),
whose answer is returned **and stored as a log record** under the workload and client the
student was trained on, so the next job trains on exactly the traffic the student found
hard. Every routed request leaves a row in ``fw_route_requests`` (path, confidence,
latency, tokens). A teacher that fails is a 502 (``TeacherUnavailable``): the route never
passes off an unsure student answer as a sure one.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import Any

import httpx

from findistil.cascade import confidence
from findistil.errors import FindistilError
from findistil.flywheel.deployments import log_route_request, route_id
from findistil.labelling import Teacher
from findistil.records import message_text
from findistil.redact import redact_record
from findistil.serving import Batch, ServedModel
from findistil.students import Prediction
from findistil.students.base import Conversation

ROUTE_SOURCE = "findistil-route"  # the ``source`` of log records the route wrote


class TeacherUnavailable(FindistilError):
    """The route needed the teacher and the teacher did not answer."""

    http_status = 502


@dataclass(frozen=True)
class RouteEnv:
    """What a route touches: the flywheel DB (deployments, request rows), the log store
    (the teacher's answers), the student cache and the settings."""

    db: Any
    store: Any
    cache: Any
    settings: Any


@dataclass
class Routed:
    """One routed answer: who gave it and how sure the student was."""

    prediction: Prediction
    path: str  # student | teacher
    confidence: float | None
    threshold: float | None
    model: ServedModel  # the student, named as the route (formats the answer)
    deployment_id: int

    def info(self) -> dict[str, Any]:
        """What the response carries beside OpenAI's fields (clients ignore it)."""
        return {
            "route": self.path,
            "confidence": self.confidence,
            "threshold": self.threshold,
            "deployment_id": self.deployment_id,
        }


def route_batch(deployment: dict[str, Any], student: ServedModel, max_new_tokens: int) -> Batch:
    """How the route asks its student: scored as its calibration was."""
    cascade = deployment["cascade"]
    labels = cascade.get("labels")
    return Batch(student, max_new_tokens, cascade.get("scoring_mode", "generate"),
                 tuple(labels) if labels else None)  # fmt: skip


def route(
    env: RouteEnv,
    deployment: dict[str, Any],
    student: ServedModel,
    conversation: Conversation,
    prediction: Prediction,
    *,
    max_new_tokens: int,
    tools: list | None = None,
    started: float | None = None,
) -> Routed:
    """Decide on ``deployment``'s route given the student's ``prediction`` (asked as
    ``route_batch`` says): keep it when sure, else ask the teacher. ``started`` is when the
    request began (``time.perf_counter()``), for the latency on its row."""
    started = time.perf_counter() if started is None else started
    cascade = deployment["cascade"]
    sure = confidence(prediction.label_scores, prediction.logprob, cascade["temperature"])
    threshold = cascade.get("threshold")
    routed = Routed(prediction, "student", sure, threshold,
                    replace(student, id=route_id(deployment["workload_id"])),
                    deployment["id"])  # fmt: skip
    if threshold is None or sure is None or sure < threshold:
        routed.path = "teacher"
        try:
            routed.prediction = _from_teacher(env, deployment, conversation, tools, max_new_tokens,
                                              sure)  # fmt: skip
        except TeacherUnavailable as exc:
            _log(env, routed, time.perf_counter() - started, str(exc))
            raise
    _log(env, routed, time.perf_counter() - started)
    return routed


def _log(env: RouteEnv, routed: Routed, seconds: float, error: str | None = None) -> None:
    log_route_request(
        env.db, routed.deployment_id, routed.path, confidence=routed.confidence,
        latency_s=seconds, prompt_tokens=routed.prediction.prompt_tokens,
        completion_tokens=routed.prediction.completion_tokens, error=error,
    )  # fmt: skip


def ask_teacher(teacher: dict[str, Any], request: dict[str, Any]) -> tuple[dict, float]:
    """POST ``request`` to the teacher's chat completions; (its JSON, seconds)."""
    key = os.environ.get(teacher["api_key_env"]) if teacher.get("api_key_env") else None
    url = Teacher(teacher["base_url"], teacher["model"]).completions_url
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    started = time.perf_counter()
    try:
        reply = httpx.post(url, json=request, headers=headers, timeout=teacher["timeout_s"])
    except httpx.HTTPError as exc:
        raise TeacherUnavailable(f"the teacher at {url} did not answer: {exc}") from None
    if reply.status_code != 200:
        raise TeacherUnavailable(
            f"the teacher at {url} answered {reply.status_code}: {reply.text[:200]}"
        )
    try:
        data = reply.json()
        message = data["choices"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise TeacherUnavailable(f"the teacher at {url} answered no chat completion") from None
    if not isinstance(message, dict):
        raise TeacherUnavailable(f"the teacher at {url} answered no chat completion")
    return data, time.perf_counter() - started


def _from_teacher(
    env: RouteEnv, deployment, conversation, tools, max_new_tokens, sure
) -> Prediction:
    """The teacher's answer, stored as a log record of the deployment's workload."""
    teacher = deployment["teacher"]
    request: dict[str, Any] = {
        "model": teacher["model"],
        "messages": conversation,
        "max_tokens": max_new_tokens,
    }
    if tools:
        request["tools"] = tools
    data, seconds = ask_teacher(teacher, request)
    message = data["choices"][0]["message"]
    usage = data.get("usage") or {}
    tokens = {k: int(usage.get(k) or 0) for k in ("prompt_tokens", "completion_tokens")}
    record = {
        "workload_id": deployment["workload_id"],
        "client_id": deployment["client_id"],
        "timestamp": int(time.time()),
        "request": request,
        "response": {"choices": [{"message": message}], "model": teacher["model"], "usage": tokens},
        "source": ROUTE_SOURCE,
        "route": {"deployment_id": deployment["id"], "student_confidence": sure},
        "latency_s": round(seconds, 4),
    }
    text = message_text(message)  # before redaction: the caller gets the teacher's own words
    if env.settings.redact_pii:
        redact_record(record)
    env.store.add_many([record])
    return Prediction(text, tokens["prompt_tokens"], tokens["completion_tokens"], seconds)
