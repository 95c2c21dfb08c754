"""The Workload seam: classification over any label set, tool calling with upstream's metrics,
chat; curation, few-shot selection and evaluation read classes only through it."""

from __future__ import annotations

import json

import pytest

from findistil.config import EvaluationConfig, load_settings
from findistil.curate import curate_records
from findistil.evaluate import evaluate
from findistil.flywheel import jobs as service
from findistil.flywheel.db import FlywheelDB
from findistil.flywheel.runner import run_job
from findistil.logstore import LogStore
from findistil.records import answer_text
from findistil.students.base import Prediction, Student
from findistil.workloads import resolve_workload, stratum_of
from findistil.workloads.tool_calling import parse_calls
from tests.tool_log import tool_records


def chat_record(question: str, answer: str, i: int = 0) -> dict:
    return {
        "workload_id": "w",
        "client_id": "c",
        "timestamp": 1_700_000_000 + i,
        "request": {"messages": [{"role": "user", "content": question}]},
        "response": {"choices": [{"message": {"role": "assistant", "content": answer}}]},
    }


class Echo(Student):
    """Answers with whatever ``answers`` maps the question to."""

    kind, model_id, num_params, dtype, device = "echo", "echo", 0, "none", "cpu"

    def __init__(self, answers: dict[str, str]):
        self.answers = answers

    def predict(self, conversations, **_):
        return [Prediction(self.answers[c[-1]["content"]], 1, 1) for c in conversations]

    def train(self, *args, **kwargs):
        raise NotImplementedError

    def use_tuned(self, path):
        pass


def test_any_label_set_is_discovered_and_scored_under_its_own_names(tmp_path):
    labels = ["positive", "negative", "neutral"]
    rows = [chat_record(f"review {i}", f"[[{labels[i % 3]}]]", i) for i in range(12)]
    workload = resolve_workload("auto", rows)
    assert workload.name == "classification" and workload.labels == tuple(sorted(labels))
    wrong = {f"review {i}": "[[Negative]]" for i in range(12)}  # case does not matter
    result = evaluate(Echo(wrong), rows, "base-eval", out_dir=tmp_path,
                      eval_config=EvaluationConfig())  # fmt: skip
    assert result.scores["accuracy"] == pytest.approx(4 / 12)
    assert result.report["workload"] == "classification"
    assert result.report["confusion"]["labels"] == sorted(labels)  # not the financial 13
    assert result.report["per_class"]["negative"]["recall"] == 1.0
    lines = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert lines[1] == {**lines[1], "parsed_label": "negative", "correct": True}

    configured = EvaluationConfig(labels=["positive", "negative", "neutral", "mixed"])
    result = evaluate(Echo(wrong), rows, "base-eval", out_dir=tmp_path / "c",
                      eval_config=configured)  # fmt: skip
    assert "mixed" in result.report["per_class"]


def test_financial_answers_fold_their_variants():
    rows = [chat_record("a", "[[labor issues]]"), chat_record("b", "[[[Labour Issues]]]")]
    workload = resolve_workload("auto", rows)
    assert {stratum_of(r, workload) for r in rows} == {"labour issues"}
    assert len(workload.labels) == 13


def test_free_text_answers_are_a_chat_workload(tmp_path):
    rows = [chat_record(f"q{i}", f"a long free answer number {i}", i) for i in range(4)]
    assert resolve_workload("auto", rows).name == "chat"
    echo = Echo({f"q{i}": f"a long free answer number {i}" for i in range(4)})
    result = evaluate(echo, rows, "base-eval", out_dir=tmp_path, eval_config=EvaluationConfig())
    assert result.scores["f1_score"] == 1.0 and "accuracy" not in result.scores


@pytest.mark.parametrize(
    "text, calls",
    [
        ('<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>', [("f", {"x": 1})]),
        ('{"name": "f", "arguments": "{\\"x\\": 1}"}', [("f", {"x": 1})]),
        ('[{"type": "function", "function": {"name": "g", "arguments": {}}}]', [("g", {})]),
        ('{"tool_calls": [{"function": {"name": "h", "arguments": {}}}]}', [("h", {})]),
        ("I would call get_quote", None),
        ('{"arguments": {}}', None),
    ],
)
def test_tool_calls_are_read_in_the_shapes_models_write(text, calls):
    assert parse_calls(text) == calls


def test_tool_calling_scores_names_and_arguments(tmp_path):
    rows = tool_records(8)
    workload = resolve_workload("auto", rows)
    assert workload.name == "tool_calling"
    assert [stratum_of(r, workload) for r in rows[:4]] == [
        "get_quote", "get_news", "convert_currency", "get_dividend"
    ]  # fmt: skip
    references = {r["request"]["messages"][-1]["content"]: answer_text(r) for r in rows}
    assert all(t.startswith("<tool_call>{") for t in references.values())  # calls as text
    answers = dict(references)
    questions = list(answers)
    answers[questions[0]] = answers[questions[0]].replace('"ticker": "', '"ticker": "X')  # args
    answers[questions[1]] = "no idea"  # no call at all
    result = evaluate(Echo(answers), rows, "base-eval", out_dir=tmp_path,
                      eval_config=EvaluationConfig())  # fmt: skip
    s = result.scores
    assert s["function_name_accuracy"] == pytest.approx(7 / 8)
    assert s["function_name_and_args_accuracy"] == pytest.approx(6 / 8)
    assert s["unparseable_rate"] == pytest.approx(1 / 8)
    assert result.report["workload"] == "tool_calling"


def test_a_tool_calling_log_curates_by_tool_and_runs_a_whole_job(sqlite_url, tiny_llama_dir):
    records = tool_records(300)
    data = curate_records(records, load_settings().data_split_config.model_copy(
        update={"eval_size": 40, "min_total_records": 50}))  # fmt: skip
    assert data.workload_type == "tool_calling"
    assert data.class_counts["eval"] == {
        "convert_currency": 10, "get_dividend": 10, "get_news": 10, "get_quote": 10
    }  # fmt: skip
    assert data.train_rows[0]["tools"] and data.train_rows[0]["messages"][-1]["tool_calls"]

    store = LogStore(sqlite_url)
    store.add_many(records)
    settings = load_settings(
        database_url=sqlite_url,
        nims=[{"model_name": str(tiny_llama_dir), "kind": "causal_lm"}],
        data_split_config={"eval_size": 20, "min_total_records": 50},
        training_config={"epochs": 1, "batch_size": 16, "micro_batch_size": 16},
        evaluation_config={"max_new_tokens": 8, "batch_size": 20},
        icl_config={"max_examples": 1},
    )
    db = FlywheelDB(sqlite_url)
    job_id = service.create_job(db, store, settings, "finance_assistant", "tools")["id"]
    detail = run_job(settings, job_id, db=db)
    assert detail["status"] == "completed", detail["error"]
    (nim,) = detail["nims"]
    assert [e["status"] for e in nim["evaluations"]] == ["completed"] * 3
    for evaluation in nim["evaluations"]:
        scores = evaluation["scores"]
        assert 0.0 <= scores["function_name_accuracy"] <= 1.0
        assert scores["function_name_and_args_accuracy"] <= scores["function_name_accuracy"]
    assert nim["customizations"][0]["steps_completed"] >= 1
    store.close()

    # the tuned student is served as a tool-calling model: tools are taken, not refused
    import openai

    from findistil.api import BackgroundServer, create_app

    with BackgroundServer(create_app(settings, start_runner=False)) as server:
        sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        tuned = nim["customizations"][0]["customized_model"]
        listed = {m.id: m for m in sdk.models.list()}
        assert listed[tuned].workload == "tool_calling"
        question = records[0]["request"]["messages"]
        reply = sdk.chat.completions.create(
            model=tuned, messages=question, tools=records[0]["request"]["tools"], max_tokens=8
        )
        assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_a_tool_calling_student_answers_with_tool_calls_over_v1(tmp_path):
    """A tuned tool-calling model's text is read back as OpenAI ``tool_calls`` (plain and
    streamed); a classifier's stays text and refuses ``tools``."""
    from findistil.serving import ServedModel, chat_completion, completion_chunks

    tools_model = ServedModel("t", "base", "causal_lm", tmp_path, 0, "j", "tool_calling")
    text = '<tool_call>{"name": "get_quote", "arguments": {"ticker": "ACME"}}</tool_call>'
    done = chat_completion(tools_model, Prediction(text, 9, 12), max_new_tokens=64,
                           request_id="chatcmpl-x")  # fmt: skip
    (choice,) = done["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_quote"
    assert json.loads(call["function"]["arguments"]) == {"ticker": "ACME"}
    chunks = completion_chunks(tools_model, Prediction(text, 9, 12), max_new_tokens=64,
                               request_id="chatcmpl-x", include_usage=False)  # fmt: skip
    assert chunks[1]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "get_quote"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    # a text answer of a tool-calling model, and any classifier answer, stay text
    plain = chat_completion(tools_model, Prediction("no call", 9, 2), max_new_tokens=64,
                            request_id="chatcmpl-y")  # fmt: skip
    assert plain["choices"][0]["message"]["content"] == "no call"
    classifier = ServedModel("c", "base", "encoder", tmp_path, 0, "j", "classification")
    labelled = chat_completion(classifier, Prediction(text, 9, 12), max_new_tokens=64,
                               request_id="chatcmpl-z")  # fmt: skip
    assert labelled["choices"][0]["message"]["content"] == text

    from findistil.api.openai import ChatRequest, unsupported

    body = ChatRequest(model="t", messages=[{"role": "user", "content": "hi"}],
                       tools=[{"type": "function", "function": {"name": "get_quote"}}])  # fmt: skip
    assert unsupported(body, tools_model) is None
    assert unsupported(body, classifier) == "tools"
