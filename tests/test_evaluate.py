"""evaluate(): files, scores, ICL injection, label scoring, cancellation, tiny real models."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from findistil import taxonomy
from findistil.config import EvaluationConfig, ICLConfig
from findistil.errors import Cancelled, DataError
from findistil.evaluate import candidate_answers, evaluate
from findistil.metrics import f1_score
from findistil.progress import Progress
from findistil.students.base import Prediction, Student

DEMO = Path(__file__).resolve().parents[1] / "src/findistil/data/demo_headlines.csv"


def _record(headline: str, label: str, variant: str = "") -> dict:
    answer = taxonomy.format_answer(label)
    return {
        "workload_id": taxonomy.WORKLOAD_ID,
        "client_id": "test",
        "timestamp": 1700000000,
        "request": {"model": "teacher", "messages": taxonomy.build_messages(headline)},
        "response": {"choices": [{"message": {"role": "assistant", "content": variant or answer}}]},
    }


@pytest.fixture(scope="module")
def demo() -> list[tuple[str, str]]:
    with DEMO.open(newline="") as fh:
        return [(r["headline"], r["label"]) for r in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def eval_rows(demo) -> list[dict]:
    rows = [_record(h, lab) for h, lab in demo[:12]]
    # the teacher's answers come trimmed and in upstream's odd variants too
    rows[0]["response"]["choices"][0]["message"]["content"] = " [[[earnings]]]\n"
    return rows


@pytest.fixture(scope="module")
def train_rows(demo) -> list[dict]:
    rows = []
    for h, lab in demo[100:160]:
        rec = _record(h, lab)
        rows.append(
            {"messages": rec["request"]["messages"] + [rec["response"]["choices"][0]["message"]]}
        )
    return rows


class TeacherAnswers(Student):
    """Test double: answers every conversation with the teacher's answer for its headline."""

    kind = "test-teacher"
    model_id = "teacher-answers"
    num_params, dtype, device = 0, "none", "cpu"

    def __init__(self, rows: list[dict]):
        self.answers = {
            r["request"]["messages"][-1]["content"]: r["response"]["choices"][0]["message"][
                "content"
            ]
            for r in rows
        }
        self.seen: list[list[dict]] = []
        self.calls: list[dict] = []

    def predict(
        self,
        conversations,
        *,
        max_new_tokens=24,
        mode="generate",
        labels=None,
        batch_size=16,
        progress=None,
        should_stop=None,
    ):
        self.calls.append({"mode": mode, "labels": labels, "n": len(conversations)})
        self.seen += [list(c) for c in conversations]
        return [
            Prediction(
                self.answers[c[-1]["content"]],
                prompt_tokens=10,
                completion_tokens=3,
                latency_s=0.01,
            )
            for c in conversations
        ]

    def train(self, *args, **kwargs):  # pragma: no cover - not used here
        raise NotImplementedError

    def use_tuned(self, path):  # pragma: no cover - not used here
        raise NotImplementedError


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_reference_answers_score_one_and_files_are_written(eval_rows, tmp_path):
    student = TeacherAnswers(eval_rows)
    events: list[Progress] = []
    result = evaluate(
        student,
        eval_rows,
        "base-eval",
        out_dir=tmp_path / "base",
        eval_config=EvaluationConfig(batch_size=5),
        progress=events.append,
    )
    s = result.scores
    assert s["f1_score"] == 1.0
    assert s["accuracy"] == s["macro_f1"] == s["weighted_f1"] == 1.0
    assert s["unparseable_rate"] == 0.0
    # scores hold only floats (upstream's dict[str, float]); counts and the mode sit beside
    assert all(type(v) is float for v in s.values())
    counts = result.report["counts"]
    assert counts == {"rows": 12, "prompt_tokens": 120, "completion_tokens": 36}
    assert result.report["scoring_mode"] == "generate"
    assert s["mean_latency_s"] == pytest.approx(0.01) and s["rows_per_s"] > 0

    # the student saw exactly the request messages, in batches of 5
    assert student.seen == [r["request"]["messages"] for r in eval_rows]
    assert [c["n"] for c in student.calls] == [5, 5, 2]
    assert [(e.stage, e.done, e.total) for e in events] == [
        ("base-eval", 0, 12),
        ("base-eval", 5, 12),
        ("base-eval", 10, 12),
        ("base-eval", 12, 12),
    ]

    lines = _lines(result.predictions_path)
    assert result.predictions_path == tmp_path / "base" / "predictions.jsonl"
    assert len(lines) == 12
    assert lines[0]["reference"] == "[[[earnings]]]"  # trimmed teacher answer
    assert lines[0]["reference_label"] == "Earnings" and lines[0]["correct"] is True
    assert {"row", "id", "output", "parsed_label", "latency_s", "prompt_tokens"} <= set(lines[0])
    card = json.loads(result.scores_path.read_text())
    assert card["scores"] == s and card["eval_type"] == "base-eval"
    assert len(card["report"]["confusion"]["matrix"]) == 13
    assert card["report"]["per_class"]["Earnings"]["f1"] == 1.0
    assert sorted(p.name for p in (tmp_path / "base").iterdir()) == [
        "predictions.jsonl",
        "scores.json",
    ]


def test_wrong_answers_are_scored_as_such(eval_rows, tmp_path):
    student = TeacherAnswers(eval_rows)
    for key in list(student.answers)[:3]:
        student.answers[key] = "I think this is about the markets."
    result = evaluate(
        student, eval_rows, "customized-eval", out_dir=tmp_path, eval_config=EvaluationConfig()
    )
    assert result.scores["unparseable_rate"] == pytest.approx(3 / 12)
    assert result.scores["accuracy"] == pytest.approx(9 / 12)
    assert result.scores["f1_score"] == pytest.approx(9 / 12)
    bad = _lines(result.predictions_path)[0]
    assert bad["parsed_label"] is None and bad["correct"] is False and bad["token_f1"] == 0.0


def test_icl_eval_injects_examples_and_records_them(eval_rows, train_rows, tmp_path):
    student = TeacherAnswers(eval_rows)
    result = evaluate(
        student,
        eval_rows,
        "icl-eval",
        out_dir=tmp_path,
        eval_config=EvaluationConfig(),
        train_rows=train_rows,
        icl_config=ICLConfig(max_examples=2),
    )
    assert result.scores["accuracy"] == 1.0
    lines = _lines(result.predictions_path)
    for line, seen in zip(lines, student.seen, strict=True):
        assert len(line["icl_example_ids"]) == 2
        for i in line["icl_example_ids"]:
            assert train_rows[i]["messages"][-1]["content"] in seen[0]["content"]
    assert result.report["icl"]["mean_examples"] == 2.0
    with pytest.raises(DataError, match="needs train rows"):
        evaluate(
            student, eval_rows, "icl-eval", out_dir=tmp_path / "x", eval_config=EvaluationConfig()
        )


def test_label_scoring_candidates(eval_rows, train_rows, tmp_path):
    student = TeacherAnswers(eval_rows)
    cfg = EvaluationConfig(scoring_mode="label_scores")
    result = evaluate(
        student, eval_rows, "base-eval", out_dir=tmp_path, eval_config=cfg, train_rows=train_rows
    )
    expected = sorted({r["messages"][-1]["content"] for r in train_rows})
    assert student.calls[0]["mode"] == "label_scores"
    assert student.calls[0]["labels"] == expected == result.report["candidate_answers"]
    assert result.report["scoring_mode"] == "label_scores"
    assert candidate_answers(None) == [taxonomy.format_answer(lab) for lab in taxonomy.LABELS]
    assert candidate_answers(train_rows, ["[[a]]", "[[a]]", "[[b]]"]) == ["[[a]]", "[[b]]"]


def test_cancel_leaves_no_files(eval_rows, tmp_path):
    student = TeacherAnswers(eval_rows)
    calls = iter(range(100))
    out = tmp_path / "cancelled"
    with pytest.raises(Cancelled):
        evaluate(
            student,
            eval_rows,
            "base-eval",
            out_dir=out,
            eval_config=EvaluationConfig(batch_size=4),
            should_stop=lambda: next(calls) >= 2,  # stop before the third batch
        )
    assert len(student.seen) == 8
    assert not out.exists()


def test_bad_input_is_reported(eval_rows, tmp_path):
    student = TeacherAnswers(eval_rows)
    cfg = EvaluationConfig()
    with pytest.raises(DataError, match="unknown eval_type 'zero-shot'"):
        evaluate(student, eval_rows, "zero-shot", out_dir=tmp_path, eval_config=cfg)
    with pytest.raises(DataError, match="no eval rows"):
        evaluate(student, [], "base-eval", out_dir=tmp_path, eval_config=cfg)
    with pytest.raises(DataError, match="eval row 1"):
        evaluate(
            student,
            [eval_rows[0], {"messages": []}],
            "base-eval",
            out_dir=tmp_path,
            eval_config=cfg,
        )


def _expected_from_predictions(path: Path) -> dict:
    lines = _lines(path)
    parsed = [taxonomy.parse_label(x["output"]) for x in lines]
    refs = [taxonomy.parse_label(x["reference"]).label for x in lines]
    return {
        "f1_score": f1_score([x["output"] for x in lines], [x["reference"] for x in lines]),
        "accuracy": sum(p.parseable and p.label == r for p, r in zip(parsed, refs, strict=True))
        / len(lines),
        "unparseable_rate": sum(not p.parseable for p in parsed) / len(lines),
    }


def test_tiny_random_llama_end_to_end(eval_rows, train_rows, tiny_llama_dir, tmp_path):
    from findistil.students import load_student

    student = load_student(str(tiny_llama_dir))
    rows = eval_rows[:6]
    result = evaluate(
        student,
        rows,
        "base-eval",
        out_dir=tmp_path / "gen",
        eval_config=EvaluationConfig(max_new_tokens=8, batch_size=4),
    )
    s = result.scores
    expected = _expected_from_predictions(result.predictions_path)
    # random weights: garbage text, scored exactly as its predictions say
    assert s["f1_score"] == pytest.approx(expected["f1_score"])
    assert s["accuracy"] == pytest.approx(expected["accuracy"])
    assert s["unparseable_rate"] == pytest.approx(expected["unparseable_rate"])
    assert s["f1_score"] < 0.2 and s["accuracy"] < 0.5 and s["unparseable_rate"] > 0.5
    counts = result.report["counts"]
    assert counts["completion_tokens"] > 0 and counts["prompt_tokens"] > 0

    # label scoring: every output is one of the candidate answers, so all parse
    scored = evaluate(
        student,
        rows,
        "base-eval",
        out_dir=tmp_path / "scores",
        eval_config=EvaluationConfig(scoring_mode="label_scores", batch_size=4),
        train_rows=train_rows,
    )
    assert scored.scores["unparseable_rate"] == 0.0
    assert scored.report["scoring_mode"] == "label_scores"
    answers = set(scored.report["candidate_answers"])
    lines = _lines(scored.predictions_path)
    assert all(x["output"] in answers for x in lines)
    assert scored.scores["accuracy"] == pytest.approx(
        _expected_from_predictions(scored.predictions_path)["accuracy"]
    )


def test_generation_stops_past_the_longest_label(eval_rows, train_rows, tiny_llama_dir, tmp_path):
    """A classification answer is a label: free generation gets the longest label's tokens
    plus a margin, not the whole configured budget (random weights never stop early)."""
    import json

    from findistil.evaluate import ANSWER_MARGIN, candidate_answers
    from findistil.students import load_student
    from findistil.workloads import resolve_workload

    student = load_student(str(tiny_llama_dir))
    rows = eval_rows[:4]
    config = EvaluationConfig(max_new_tokens=64, batch_size=4)
    result = evaluate(student, rows, "base-eval", out_dir=tmp_path, eval_config=config,
                      train_rows=train_rows)  # fmt: skip
    workload = resolve_workload("auto", rows)
    longest = max(student.answer_length(a) for a in candidate_answers(train_rows, None, workload))
    budget = longest + ANSWER_MARGIN
    assert budget < 64
    card = json.loads(result.scores_path.read_text())
    assert card["eval_config"]["max_new_tokens"] == budget
    assert max(x["completion_tokens"] for x in _lines(result.predictions_path)) == budget
    # a chat workload has no label to stop at: the configured budget holds
    chat = EvaluationConfig(max_new_tokens=20, batch_size=4, workload_type="chat")
    free = evaluate(student, rows, "base-eval", out_dir=tmp_path / "chat", eval_config=chat)
    assert max(x["completion_tokens"] for x in _lines(free.predictions_path)) == 20


def test_encoder_student_goes_through_the_same_path(eval_rows, train_rows, tiny_bert_dir, tmp_path):
    from findistil.config import LoraConfig, TrainingConfig
    from findistil.students import load_student

    student = load_student(str(tiny_bert_dir))
    assert student.kind == "encoder"
    trained = student.train(
        train_rows,
        train_rows[:8],
        tmp_path / "head",
        training=TrainingConfig(epochs=1, batch_size=16, micro_batch_size=16),
        lora=LoraConfig(),
    )
    student.use_tuned(trained.path)
    result = evaluate(
        student,
        eval_rows,
        "customized-eval",
        out_dir=tmp_path / "ev",
        eval_config=EvaluationConfig(),
    )
    answers = {r["messages"][-1]["content"] for r in train_rows}
    lines = _lines(result.predictions_path)
    assert len(lines) == len(eval_rows)
    assert all(x["output"] in answers for x in lines)  # it answers with teacher answer strings
    assert result.scores["unparseable_rate"] == 0.0
    expected = _expected_from_predictions(result.predictions_path)
    assert result.scores["accuracy"] == pytest.approx(expected["accuracy"])
    assert result.scores["f1_score"] == pytest.approx(expected["f1_score"])
