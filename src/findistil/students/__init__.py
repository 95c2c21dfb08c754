"""Students: the small models the flywheel distils into.

``load_student(model_id)`` resolves weights (``registry``) and builds the right kind. Kinds
register here with ``register_student_kind`` (name, loader, detector, capabilities; nothing
else in findistil names a kind); the built-ins are ``causal_lm`` (LoRA on a
chat LLM, ``students/causal.py``) and ``encoder`` (classification head on a sentence encoder,
``students/encoder.py``). Heavy imports happen only when a kind is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from findistil.config import Settings, load_settings
from findistil.errors import ConfigError
from findistil.students.base import Prediction, Student, TrainResult

__all__ = [
    "Prediction",
    "Student",
    "TrainResult",
    "StudentKind",
    "answers_untuned",
    "can",
    "load_student",
    "resolve_kind",
    "register_student_kind",
    "student_kinds",
]


# What a kind can do; stages and serving ask these, never a kind's name.
ANSWERS_UNTUNED = "answers_untuned"  # answers before training (base / ICL evals, serving)
LABEL_SCORES = "label_scores"  # ranks candidate answers (evaluation_config.scoring_mode)
CAPABILITIES = frozenset({ANSWERS_UNTUNED, LABEL_SCORES})

Factory = Callable[[str, Path, Settings], Student]


@dataclass(frozen=True)
class StudentKind:
    """One way to build a student: its name in ``nims[].kind``, how to load it, which
    models it takes (``detect``, for ``kind: auto``), and what it can do."""

    name: str
    factory: str | Factory  # "module:callable" (imported on first use) or the callable
    detect: Callable[[dict], bool]  # given a model's config.json, is it this kind?
    capabilities: frozenset[str] = CAPABILITIES

    def load(self, model_id: str, weights: Path, settings: Settings) -> Student:
        factory = self.factory
        if isinstance(factory, str):
            factory = _resolve_factory(factory)
        return factory(model_id, weights, settings)


_KINDS: dict[str, StudentKind] = {}


def _never(config: dict) -> bool:
    return False


def register_student_kind(
    name: str,
    factory: str | Factory,
    detect: Callable[[dict], bool] = _never,
    *,
    capabilities: frozenset[str] | set[str] = CAPABILITIES,
) -> StudentKind:
    """Make a student kind available to ``load_student`` and to config ``nims[].kind``.

    Example: ``register_student_kind("keywords", KeywordStudent.load, capabilities=set())``
    (a kind without ``answers_untuned`` skips the base and ICL evals).
    """
    unknown = set(capabilities) - CAPABILITIES
    if unknown or not name or name == "auto":
        raise ConfigError(
            f"student kind {name!r}: capabilities must be among {sorted(CAPABILITIES)} "
            f"(got {sorted(unknown)}), and the name neither empty nor 'auto'"
        )
    _KINDS[name] = StudentKind(name, factory, detect, frozenset(capabilities))
    return _KINDS[name]


def can(kind: str, capability: str) -> bool:
    """Whether students of ``kind`` have ``capability`` (unknown kinds: assume they do)."""
    entry = _KINDS.get(kind)
    return capability in entry.capabilities if entry is not None else True


def answers_untuned(kind: str) -> bool:
    """Whether students of ``kind`` answer before training."""
    return can(kind, ANSWERS_UNTUNED)


def student_kinds() -> list[str]:
    return list(_KINDS)


def _architectures(config: dict) -> list[str]:
    return [a for a in config.get("architectures") or [] if isinstance(a, str)]


register_student_kind(
    "causal_lm",
    "findistil.students.causal:CausalLMStudent.load",
    lambda cfg: any(a.endswith("ForCausalLM") for a in _architectures(cfg)),
)
register_student_kind(
    "encoder",
    "findistil.students.encoder:EncoderStudent.load",
    lambda cfg: (
        cfg.get("model_type") in {"bert", "roberta", "distilbert", "mpnet", "xlm-roberta"}
        and not any(a.endswith("ForCausalLM") for a in _architectures(cfg))
    ),
    capabilities={LABEL_SCORES},  # its classification head only exists after training
)


def _resolve_factory(spec: str):
    module, _, attr = spec.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def resolve_kind(model_id: str, kind: str = "auto", settings: Settings | None = None) -> str:
    """``kind`` itself, or for ``auto`` the registered kind whose detector matches the model's
    ``config.json`` (this resolves the weights, which is cheap once they are cached)."""
    import json

    from findistil.students.registry import resolve_model

    if kind != "auto":
        if kind not in _KINDS:
            raise ConfigError(f"unknown student kind {kind!r}: expected one of {student_kinds()}")
        return kind
    weights: Path = resolve_model(model_id, settings or load_settings())
    config = json.loads((weights / "config.json").read_text())
    matches = [k.name for k in _KINDS.values() if k.detect(config)]
    if not matches:
        raise ConfigError(
            f"cannot tell which student kind {model_id!r} is (architectures "
            f"{_architectures(config)}): set nims[].kind to one of {student_kinds()}"
        )
    return matches[0]


def load_student(model_id: str, kind: str = "auto", settings: Settings | None = None) -> Student:
    """Load a student by id (hub id, packaged id or local HF folder).

    Example: ``load_student("HuggingFaceTB/SmolLM2-135M-Instruct").predict([messages])``.
    """
    from findistil.students.registry import resolve_model

    settings = settings or load_settings()
    kind = resolve_kind(model_id, kind, settings)
    weights: Path = resolve_model(model_id, settings)
    return _KINDS[kind].load(model_id, weights, settings)
