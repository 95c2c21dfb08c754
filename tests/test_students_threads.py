"""Loading students from several threads at once (parallel jobs/candidates) stays safe.

transformers builds models under context managers that patch torch globally; two threads
loading at once could leave the patch installed and every later load with meta tensors.
"""

from __future__ import annotations

import threading

from transformers import AutoModelForCausalLM

from findistil.config import load_settings
from findistil.students import load_student


def test_parallel_loads_leave_later_loads_intact(tiny_llama_dir, tiny_bert_dir):
    settings = load_settings()
    errors: list[BaseException] = []

    def load(path, kind):
        try:
            for _ in range(3):
                load_student(str(path), kind, settings).close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=load, args=(tiny_llama_dir, "causal_lm")) for _ in range(3)
    ] + [threading.Thread(target=load, args=(tiny_bert_dir, "encoder")) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert not any(p.is_meta for p in model.parameters())
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
