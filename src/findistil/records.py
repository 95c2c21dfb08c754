"""Log records: one logged LLM call (OpenAI chat request + the teacher's response).

Shapes follow upstream's log format (REFERENCE §1) and stay permissive about extra keys, so a
record is stored exactly as the application logged it. ``format_problem`` is the curation
format filter (REFERENCE §2 step 2); it returns the reason a record is unusable, or None.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_TOOL_PROPERTIES = 8  # upstream rejects tools with more parameter properties (serving bug)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ToolCall(_Open):
    id: str | None = None
    type: str = "function"
    function: dict[str, Any]


class ChatMessage(_Open):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[Any] | None = None
    tool_calls: list[ToolCall] | None = None


class ChatRequest(_Open):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None


class Choice(_Open):
    message: ChatMessage


class ChatResponse(_Open):
    choices: list[Choice] = Field(min_length=1)


MIN_TIMESTAMP, MAX_TIMESTAMP = 0, 4_102_444_800  # 1970-01-01 .. 2100-01-01 (UTC)


class LogRecord(_Open):
    """One logged call. ``request``/``response`` keep every key the application logged."""

    workload_id: str = Field(min_length=1)
    client_id: str = Field(min_length=1)
    timestamp: int = Field(default_factory=lambda: int(time.time()))
    request: ChatRequest
    response: ChatResponse

    @field_validator("timestamp", mode="before")
    @classmethod
    def _int_timestamp(cls, v: Any) -> Any:
        """Unix seconds between 1970 and 2100 (a float is cut to whole seconds)."""
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"must be Unix seconds (a number), got {type(v).__name__}")
        if not MIN_TIMESTAMP <= v <= MAX_TIMESTAMP:  # also NaN, which compares False
            hint = (
                "; milliseconds? divide by 1000" if MAX_TIMESTAMP < v < MAX_TIMESTAMP * 1000 else ""
            )
            raise ValueError(f"must be Unix seconds between 1970 and 2100, got {v!r:.30}{hint}")
        return int(v)

    def to_json_dict(self) -> dict[str, Any]:
        """The record as plain JSON data, with keys the application did not send left out."""
        return self.model_dump(mode="json", exclude_unset=True, exclude_none=False) | {
            "workload_id": self.workload_id,
            "client_id": self.client_id,
            "timestamp": self.timestamp,
        }


def format_problem(record: dict[str, Any]) -> str | None:
    """Why a stored record fails upstream's format filter, or None when it passes."""
    request = record.get("request")
    response = record.get("response")
    if not isinstance(request, dict):
        return "request is missing or not an object"
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        return "request.messages must be a non-empty list"
    if not isinstance(response, dict):
        return "response is missing or not an object"
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices:
        return "response.choices must be a non-empty list"
    if not all(isinstance(c, dict) and isinstance(c.get("message"), dict) for c in choices):
        return "every response.choices item needs a message"
    for tool in request.get("tools") or []:
        props = (tool.get("function") or {}).get("parameters", {}).get("properties", {})
        if len(props) > MAX_TOOL_PROPERTIES:
            return f"a tool has {len(props)} parameter properties (max {MAX_TOOL_PROPERTIES})"
    return None


def user_contents(record: dict[str, Any]) -> tuple[str, ...]:
    """The contents of a record's user messages: the dedup key of curation."""
    return tuple(
        m.get("content") if isinstance(m.get("content"), str) else repr(m.get("content"))
        for m in record["request"]["messages"]
        if m.get("role") == "user"
    )


def message_text(message: dict[str, Any]) -> str:
    """An assistant message as text: its content, or, when it only calls tools, each call
    as a ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` line (what a student
    learns to write and evaluation reads back)."""
    content = message.get("content")
    if isinstance(content, str) and content.strip():
        return content
    calls = message.get("tool_calls")
    if not isinstance(calls, list) or not calls:
        return content if isinstance(content, str) else ""
    lines = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            continue
        args = fn.get("arguments", {})
        if isinstance(args, str):
            with contextlib.suppress(json.JSONDecodeError):
                args = json.loads(args)
        body = json.dumps({"name": fn.get("name"), "arguments": args}, sort_keys=True)
        lines.append(f"<tool_call>{body}</tool_call>")
    return "\n".join(lines)


def answer_text(record: dict[str, Any]) -> str:
    """The teacher's answer (first choice) as text: ``message_text`` of its message."""
    return message_text(record["response"]["choices"][0]["message"])


def to_training_row(record: dict[str, Any]) -> dict[str, Any]:
    """Upstream's train/val row: ``{"messages": request.messages + [answer message]}``."""
    answer = dict(record["response"]["choices"][0]["message"])
    if answer.get("content") is None:
        answer["content"] = ""
    row: dict[str, Any] = {"messages": list(record["request"]["messages"]) + [answer]}
    if record["request"].get("tools"):
        row["tools"] = record["request"]["tools"]
    return row
