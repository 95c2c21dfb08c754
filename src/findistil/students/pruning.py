"""Prompt pruning: strip the static text a workload repeats in every request.

Where it sits: ``students/lora.py`` and ``students/encoder.py`` detect a ``PruningRule`` on the
curated training rows, train on the compact form and save the rule beside the artefact; the
serving path (``CausalLMStudent`` with that adapter, ``EncoderStudent``) applies the same rule
to every incoming request, so callers keep sending upstream's full messages.

The financial workload sends ~1k tokens of instructions around a ~15-token headline (OpenPipe
calls the fix "pruning rules"). A rule is the longest prefix and suffix shared by the last user
message of every row, plus a system message identical in all rows. Boundaries are snapped to a
line break (or, on one-line templates, a word break) so that rows which happen to share the
first or last characters of their headline do not lose them.

Example::

    rule = PruningRule.detect([row["messages"] for row in train_rows])
    rule.apply(request_messages)
    # [{"role": "system", "content": ""}, {"role": "user", "content": "<the headline>"}]
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from findistil.errors import DataError

Conversation = list[dict[str, Any]]

RULE_VERSION = 1


def _last_user_index(messages: Sequence[dict[str, Any]]) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            return i
    return None


def _snap_prefix(prefix: str) -> str:
    """Cut a common prefix back to a line break, else a word break, if it ends mid-text."""
    if not prefix or prefix.endswith("\n"):
        return prefix
    if "\n" in prefix:
        return prefix[: prefix.rindex("\n") + 1]
    if prefix[-1].isspace():
        return prefix
    cut = max((i for i, ch in enumerate(prefix) if ch.isspace()), default=-1)
    return prefix[: cut + 1]


def _snap_suffix(suffix: str) -> str:
    """Mirror of ``_snap_prefix``: the suffix must start at a line (or word) break."""
    if not suffix or suffix.startswith("\n"):
        return suffix
    if "\n" in suffix:
        return suffix[suffix.index("\n") :]
    if suffix[0].isspace():
        return suffix
    cut = next((i for i, ch in enumerate(suffix) if ch.isspace()), len(suffix))
    return suffix[cut:]


@dataclass(frozen=True)
class PruningRule:
    """Static text of a workload: the user-message prefix/suffix and a fixed system message.

    Attributes:
        prefix: text every (last) user message starts with.
        suffix: text every (last) user message ends with.
        system: content of a system message present and identical in every row, else None.
        rows: how many rows the rule was detected on (0 for a hand-made or identity rule).
    """

    prefix: str = ""
    suffix: str = ""
    system: str | None = None
    rows: int = 0

    # -- detection -----------------------------------------------------------------------
    @classmethod
    def identity(cls) -> PruningRule:
        """A rule that changes nothing."""
        return cls()

    @classmethod
    def detect(cls, conversations: Iterable[Sequence[dict[str, Any]]]) -> PruningRule:
        """Find the static text shared by every conversation's last user message.

        Args:
            conversations: message lists (request messages, optionally followed by the answer).
        Returns:
            The rule; ``identity()`` when fewer than two distinct user texts exist or nothing
            is shared. Example: user texts ``"Intro\\nQ: a\\nEnd"`` and ``"Intro\\nQ: b\\nEnd"``
            give prefix ``"Intro\\n"`` (snapped back to the line break) and suffix ``"\\nEnd"``.
        """
        texts: list[str] = []
        systems: set[str | None] = set()
        for messages in conversations:
            idx = _last_user_index(messages)
            content = messages[idx].get("content") if idx is not None else None
            if not isinstance(content, str):
                return cls.identity()  # multimodal or missing user text: leave it alone
            texts.append(content)
            sys_msgs = [
                m.get("content") for m in messages[:idx] if m.get("role") in ("system", "developer")
            ]
            systems.add(
                sys_msgs[0] if len(sys_msgs) == 1 and isinstance(sys_msgs[0], str) else None
            )
        if len(set(texts)) < 2:
            return cls.identity()

        prefix = _snap_prefix(os.path.commonprefix(texts))
        rests = [t[len(prefix) :] for t in texts]
        suffix = os.path.commonprefix([r[::-1] for r in rests])[::-1]
        suffix = _snap_suffix(suffix)
        system = next(iter(systems)) if len(systems) == 1 else None
        if any(not t[len(prefix) : len(t) - len(suffix)].strip() for t in texts):
            # some row would keep no variable text at all: the "static" part is not static
            return cls(system=system, rows=len(texts)) if system is not None else cls.identity()
        rule = cls(prefix=prefix, suffix=suffix, system=system, rows=len(texts))
        return cls.identity() if rule.is_identity else rule

    # -- use -----------------------------------------------------------------------------
    @property
    def is_identity(self) -> bool:
        return not self.prefix and not self.suffix and self.system is None

    def matches(self, text: str) -> bool:
        """Does ``text`` carry this rule's static prefix and suffix?"""
        return (
            len(text) >= len(self.prefix) + len(self.suffix)
            and text.startswith(self.prefix)
            and text.endswith(self.suffix)
        )

    def variable_part(self, text: str) -> str:
        """The text between prefix and suffix, stripped; ``text`` itself when it does not match."""
        if self.is_identity or not self.matches(text):
            return text
        return text[len(self.prefix) : len(text) - len(self.suffix)].strip()

    def apply(self, messages: Sequence[dict[str, Any]]) -> Conversation:
        """The compact form of a conversation: the static system message emptied, the last
        user message reduced to its variable part. Conversations that do not match (another
        template, already compact, multimodal content) come back unchanged (as a new list).

        The system message is emptied rather than removed because chat templates insert a
        default system prompt when there is none (SmolLM2's is ~20 tokens, a third of a
        pruned row); an empty one costs ~4 tokens.
        """
        messages = [dict(m) for m in messages]
        if self.is_identity:
            return messages
        idx = _last_user_index(messages)
        if idx is None or not isinstance(messages[idx].get("content"), str):
            return messages
        content = messages[idx]["content"]
        if not self.matches(content):
            return messages
        messages[idx]["content"] = self.variable_part(content)
        if self.system is not None:
            for m in messages[:idx]:
                if m.get("role") in ("system", "developer") and m.get("content") == self.system:
                    m["content"] = ""
        return messages

    def savings(self, text: str) -> int:
        """Characters removed from ``text`` (for reports)."""
        return len(text) - len(self.variable_part(text))

    # -- persistence ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": RULE_VERSION,
            "prefix": self.prefix,
            "suffix": self.suffix,
            "system": self.system,
            "rows": self.rows,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> PruningRule:
        """Rebuild a saved rule (``None`` gives the identity rule)."""
        if data is None:
            return cls.identity()
        if not isinstance(data, dict) or data.get("version") != RULE_VERSION:
            raise DataError(
                f"pruning rule {data!r:.80} is not a version-{RULE_VERSION} rule: retrain the "
                "adapter with this findistil version"
            )
        system = data.get("system")
        return cls(
            prefix=str(data.get("prefix", "")),
            suffix=str(data.get("suffix", "")),
            system=system if isinstance(system, str) else None,
            rows=int(data.get("rows", 0)),
        )
