"""Student kinds are pluggable: a kind registered from outside runs a whole job, stages ask its
capabilities (never its name), and candidate configs are strict."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from findistil import students
from findistil.config import load_settings
from findistil.errors import ConfigError, FindistilError
from findistil.flywheel import jobs as service
from findistil.flywheel.db import FlywheelDB
from findistil.flywheel.runner import run_job
from findistil.students.base import Prediction, Student, TrainResult

WORD = re.compile(r"[a-z]+")


class KeywordStudent(Student):
    """Each word of the last user message votes for the answers it came with in training;
    words in over half of the rows (the prompt's fixed instructions) do not vote."""

    kind = "keywords"

    def __init__(self, model_id: str):
        self.model_id, self.num_params, self.dtype, self.device = model_id, 0, "none", "cpu"
        self.votes: dict[str, Counter] | None = None

    @classmethod
    def load(cls, model_id: str, weights: Path, settings) -> KeywordStudent:
        return cls(model_id)

    @staticmethod
    def _words(messages) -> set[str]:
        users = [m for m in messages if m.get("role") == "user"]
        return set(WORD.findall(str(users[-1].get("content") or "").lower())) if users else set()

    def train(self, train_rows, val_rows, out_dir, *, training, lora, progress=None, **_):
        seen: dict[str, Counter] = defaultdict(Counter)
        for row in train_rows:
            for word in self._words(row["messages"][:-1]):
                seen[word][row["messages"][-1]["content"].strip()] += 1
        common = {w for w, c in seen.items() if sum(c.values()) > len(train_rows) / 2}
        votes = {w: dict(c) for w, c in seen.items() if w not in common}
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "keywords.json").write_text(json.dumps(votes))
        return TrainResult(Path(out_dir), 1, len(train_rows), {"words": len(votes)})

    def use_tuned(self, path: Path | None) -> None:
        raw = json.loads((Path(path) / "keywords.json").read_text()) if path else None
        self.votes = {w: Counter(c) for w, c in raw.items()} if raw is not None else None

    def predict(self, conversations, *, max_new_tokens=24, mode="generate", **_):
        if self.votes is None:
            raise FindistilError("the keyword student answers only after training")
        out = []
        for messages in conversations:
            words = sorted(self._words(messages))  # a set's order varies with the hash seed
            tally = sum((self.votes.get(w, Counter()) for w in words), Counter())
            best = tally.most_common(1)[0][0] if tally else "[[Other]]"
            out.append(Prediction(best, prompt_tokens=len(words), completion_tokens=1))
        return out


@pytest.fixture
def keyword_kind(tmp_path):
    kind = students.register_student_kind("keywords", KeywordStudent.load, capabilities=set())
    folder = tmp_path / "keywords-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # a model folder, as any candidate has
    yield kind, folder
    students._KINDS.pop("keywords", None)


def test_an_outside_kind_runs_a_whole_job(sqlite_url, demo_store, keyword_kind):
    _, folder = keyword_kind
    settings = load_settings(
        database_url=sqlite_url,
        nims=[{"model_name": str(folder), "kind": "keywords"}],
        data_split_config={"eval_size": 20, "min_total_records": 20},
    )
    db = FlywheelDB(sqlite_url)
    job_id = service.create_job(db, demo_store, settings, "news_classifier", "demo")["id"]
    detail = run_job(settings, job_id, db=db)
    assert detail["status"] == "completed", detail["error"]
    (nim,) = detail["nims"]
    assert nim["status"] == "completed" and nim["kind"] == "keywords"
    # no answers_untuned capability: no base or ICL eval, only the one after training
    assert [e["eval_type"] for e in nim["evaluations"]] == ["customized-eval"]
    assert nim["customizations"][0]["metrics"]["words"] > 50
    scores = nim["evaluations"][0]["scores"]
    # far above chance on 13 classes (0.45-0.6 seen): the demo headlines carry telling words
    assert scores["accuracy"] > 0.3, scores
    assert detail["recommendation"]["model_name"] == str(folder)


def test_a_kind_without_label_scores_refuses_that_scoring_mode(
    sqlite_url, demo_store, keyword_kind
):
    _, folder = keyword_kind
    settings = load_settings(
        database_url=sqlite_url,
        nims=[{"model_name": str(folder), "kind": "keywords"}],
        data_split_config={"eval_size": 20, "min_total_records": 20},
        evaluation_config={"scoring_mode": "label_scores"},
    )
    db = FlywheelDB(sqlite_url)
    job_id = service.create_job(db, demo_store, settings, "news_classifier", "demo")["id"]
    (nim,) = run_job(settings, job_id, db=db)["nims"]
    (evaluation,) = nim["evaluations"]
    assert evaluation["status"] == "failed"
    assert "keywords students cannot rank candidate answers" in evaluation["error"]


@pytest.mark.parametrize(
    "nim, words",
    [
        ({"model_name": "m", "kind": "keyword"}, "unknown student kind 'keyword'"),
        ({"model_name": "m", "trainng_config": {}}, "nims.0.trainng_config"),
        ({"model_name": "m", "kind": "auto", "gpu": 1}, "nims.0.gpu"),
    ],
)
def test_candidate_configs_are_strict(nim, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        load_settings(nims=[nim])


def test_upstream_nim_keys_are_accepted_and_capabilities_checked():
    nim = {"model_name": "meta/llama-3.2-1b-instruct", "tag": "1.8.3", "gpus": 1,
           "pvc_size": "25Gi", "model_type": "llm", "context_length": 8192}  # fmt: skip
    assert load_settings(nims=[nim]).nims[0].gpus == 1
    assert students.can("causal_lm", students.ANSWERS_UNTUNED)
    assert not students.can("encoder", students.ANSWERS_UNTUNED)
    with pytest.raises(ConfigError, match="capabilities"):
        students.register_student_kind("bad", KeywordStudent.load, capabilities={"flies"})
