"""Teacher-versus-people report: reproduces the published agreement figures."""

from __future__ import annotations

import csv

import pytest
from typer.testing import CliRunner

from findistil.errors import DataError
from findistil.report import score_against_people, teacher_report


def test_reproduces_reference_agreement(benchmark_dir, tmp_path):
    result = teacher_report(benchmark_dir / "gold_human.csv", tmp_path / "out")
    labellers = result["labellers"]
    assert result["rows"] == 1025
    assert round(labellers["nemotron_49b_label"]["accuracy"], 3) == 0.873
    assert round(labellers["teacher_label"]["accuracy"], 3) == 0.820
    for scores in labellers.values():
        assert 0.7 < scores["macro_f1"] < 1.0
        # people's "Management changes" is folded into Labour Issues, not dropped
        assert scores["per_class"]["Labour Issues"]["support"] == 110
        assert sum(map(sum, scores["confusion"]["matrix"])) == 1025
    png = tmp_path / "out" / "confusion_teacher_label.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "out" / "teacher_report.json").is_file()


def test_score_against_people_scores_any_answers(benchmark_dir):
    gold = benchmark_dir / "gold_human.csv"
    with gold.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    # the upstream teacher's labels, written as a student would answer
    answers = {r["headline"]: f"[[{r['nemotron_49b_label'].lower()}]]" for r in rows}
    scores = score_against_people(answers, gold)
    assert round(scores["accuracy"], 3) == 0.873
    assert scores["missing"] == 0 and scores["unparseable_rate"] == 0.0

    half = dict(list(answers.items())[:100])
    half[rows[0]["headline"]] = "I cannot tell"
    partial = score_against_people(half, gold)
    assert partial["rows"] == 100 and partial["missing"] == 925
    assert partial["unparseable_rate"] == pytest.approx(0.01)

    with pytest.raises(DataError, match="none of the 1 headlines"):
        score_against_people({"no such headline": "[[earnings]]"}, gold)


def test_bad_gold_files_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        teacher_report(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("headline,human_label,model_label\nAcme beats,Weather,Earnings\n")
    with pytest.raises(DataError, match=r"bad.csv:2: human_label 'Weather'"):
        teacher_report(bad)
    no_cols = tmp_path / "nocols.csv"
    no_cols.write_text("headline,label\nAcme beats,Earnings\n")
    with pytest.raises(DataError, match="lacks column"):
        teacher_report(no_cols)


def test_cli_prints_table(tmp_path):
    from findistil.cli import app

    gold = tmp_path / "gold.csv"
    gold.write_text(
        "id,headline,human_label,model_label\n"
        "1,Acme Q3 EPS $1.10,Earnings,Earnings\n"
        "2,Acme names new CFO,Management changes,Labour Issues\n"
        "3,Acme raises dividend,Dividends,Earnings\n"
        "4,Acme shares jump,Stock price movement,[[stock price movement]]\n"
    )
    result = CliRunner().invoke(app, ["report-teacher", "--gold", str(gold), "--out", "rep"])
    assert result.exit_code == 0, result.output
    assert "model_label" in result.output and "0.750" in result.output
    assert (tmp_path / "rep" / "confusion_model_label.png").is_file()
