"""Tool-calling and plain chat workloads.

Tool calling is scored as upstream's generic blueprint scores it: **function-name accuracy**
(the called functions' names, in order, equal the teacher's) and **function-name-and-
arguments accuracy** (names and parsed arguments equal). A student's text answer is read as
tool calls in the shapes models write them: OpenAI's ``tool_calls`` JSON, a ``{"name",
"arguments"}`` object or list, or ``<tool_call>{...}</tool_call>`` blocks. Chat workloads
are scored by upstream's token F1 alone.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence
from typing import Any

_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
NO_CALL = "(no call)"


def _call(obj: Any) -> tuple[str, Any] | None:
    """(name, arguments) of one call in any of the usual shapes."""
    if not isinstance(obj, dict):
        return None
    fn = obj.get("function") if isinstance(obj.get("function"), dict) else obj
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        return None
    args = fn.get("arguments", fn.get("parameters", {}))
    if isinstance(args, str):
        with contextlib.suppress(json.JSONDecodeError):  # else compared as the string it is
            args = json.loads(args)
    return name, args


def answer_calls(message: dict[str, Any]) -> list[tuple[str, Any]]:
    """The (name, arguments) calls of a logged assistant message."""
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        return []
    return [c for c in (_call(x) for x in calls) if c is not None]


def parse_calls(text: str | None) -> list[tuple[str, Any]] | None:
    """The calls a text answer makes, or None when it holds no readable call."""
    text = (text or "").strip()
    blocks = _TAGGED.findall(text) or [text]
    calls: list[tuple[str, Any]] = []
    for block in blocks:
        try:
            obj = json.loads(block)
        except json.JSONDecodeError:
            return None
        if isinstance(obj, dict):
            obj = obj.get("tool_calls", [obj])
        items = obj if isinstance(obj, list) else []
        for item in items:
            call = _call(item)
            if call is None:
                return None
            calls.append(call)
    return calls or None


class ToolCallingWorkload:
    name = "tool_calling"
    agreement_field = "name_and_args_correct"

    def stratum(self, answer: dict[str, Any]) -> str:
        calls = answer_calls(answer) or parse_calls(answer.get("content")) or []
        return calls[0][0] if calls else NO_CALL

    def candidate_answers(self) -> list[str]:
        return []

    def score(
        self, outputs: Sequence[str], references: Sequence[str]
    ) -> tuple[dict[str, float], dict[str, Any], list[dict[str, Any]]]:
        lines = []
        for output, reference in zip(outputs, references, strict=True):
            got, want = parse_calls(output) or [], parse_calls(reference) or []
            names = [n for n, _ in got] == [n for n, _ in want]
            lines.append(
                {
                    "called": [n for n, _ in got],
                    "expected": [n for n, _ in want],
                    "name_correct": names,
                    "name_and_args_correct": names and got == want,
                }
            )
        n = max(1, len(lines))
        scores = {
            "function_name_accuracy": sum(x["name_correct"] for x in lines) / n,
            "function_name_and_args_accuracy": sum(x["name_and_args_correct"] for x in lines) / n,
            "unparseable_rate": sum(parse_calls(o) is None for o in outputs) / n,
        }
        return scores, {}, lines


class ChatWorkload:
    name = "chat"
    agreement_field = None  # free text: no per-row verdict, so no cascade

    def stratum(self, answer: dict[str, Any]) -> str:
        return "chat"

    def candidate_answers(self) -> list[str]:
        return []

    def score(self, outputs, references):
        return {}, {}, [{} for _ in outputs]
