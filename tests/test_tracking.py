"""Experiment tracking through MLflow: a real local store, a real `mlflow server` on loopback,
and a tracking server that is down (a warning on the job, never a failure).

Everything is read back through MLflow's own client: experiments, runs, params, metrics,
metric histories and artefacts.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from findistil.api.app import free_port
from findistil.artifacts import ArtifactStore
from findistil.config import load_settings
from findistil.flywheel import jobs as service
from findistil.flywheel.db import FlywheelDB
from findistil.flywheel.runner import run_job
from findistil.tracking import MlflowTracker, RunRecord, make_tracker
from tests.processes import Proc, wait_http

mlflow = pytest.importorskip("mlflow", reason="mlflow is in the [dev] extra")
from mlflow.tracking import MlflowClient  # noqa: E402

FAST = {
    "data_split_config": {"eval_size": 13, "min_total_records": 20},
    "training_config": {"epochs": 2, "micro_batch_size": 8, "batch_size": 16, "seed": 0},
    "evaluation_config": {"max_new_tokens": 6, "batch_size": 13},
    "icl_config": {"max_examples": 1, "min_examples": 1},
}


def _run(sqlite_url, store, nims, mlflow_config):
    settings = load_settings(
        database_url=sqlite_url, nims=nims, mlflow_config=mlflow_config, **FAST
    )
    db = FlywheelDB(sqlite_url)
    job_id = service.create_job(db, store, settings, "news_classifier", "demo")["id"]
    detail = run_job(settings, job_id, db=db)
    return settings, db, detail


def _runs(client: MlflowClient, experiment_id: str) -> dict:
    return {r.info.run_name: r for r in client.search_runs([experiment_id])}


def test_local_store_holds_a_run_per_stage_and_goes_with_the_job(
    sqlite_url, demo_store, tiny_llama_dir, tiny_bert_dir, findistil_home
):
    nims = [
        {"model_name": str(tiny_llama_dir), "kind": "causal_lm"},
        {"model_name": str(tiny_bert_dir), "kind": "encoder"},
    ]
    settings, db, detail = _run(sqlite_url, demo_store, nims, {"enabled": True})
    assert detail["status"] == "completed" and detail["warnings"] == []
    job_id = detail["id"]
    client = MlflowClient(f"sqlite:///{findistil_home / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(f"findistil-{job_id}")
    assert experiment is not None
    runs = _runs(client, experiment.experiment_id)
    llama, bert = tiny_llama_dir.name, tiny_bert_dir.name
    assert set(runs) == {
        f"{llama}_base-eval",
        f"{llama}_icl-eval",
        f"{llama}_customization",
        f"{llama}_customized-eval",
        f"{bert}_customization",
        f"{bert}_customized-eval",
    }
    for nim in detail["nims"]:
        name = Path(nim["model_name"]).name
        config = detail["config"]["nims"][detail["nims"].index(nim)]
        for ev in nim["evaluations"]:
            run = runs[f"{name}_{ev['eval_type']}"]
            assert ev["mlflow_uri"].endswith(f"/runs/{run.info.run_id}")
            assert run.info.status == "FINISHED"
            # every score, at the value the API shows
            for key in ("f1_score", "accuracy", "macro_f1", "rows_per_s"):
                assert run.data.metrics[key] == pytest.approx(ev["scores"][key]), key
            assert run.data.metrics["s_per_row"] == pytest.approx(1 / ev["scores"]["rows_per_s"])
            assert any(k.startswith("f1.") for k in run.data.metrics)  # per-class F1
            lr = config["training_config"]["learning_rate"]
            assert float(run.data.params["training_config.learning_rate"]) == lr
            assert run.data.params["eval_type"] == ev["eval_type"]
            assert run.data.params["data_split_config.eval_size"] == "13"
            files = {a.path for a in client.list_artifacts(run.info.run_id)}
            assert {"confusion_matrix.png", "predictions.jsonl", "dataset"} <= files, files
            local = client.download_artifacts(run.info.run_id, "confusion_matrix.png")
            assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        (custom,) = nim["customizations"]
        run = runs[f"{name}_customization"]
        assert custom["mlflow_uri"].endswith(f"/runs/{run.info.run_id}")
        loss = client.get_metric_history(run.info.run_id, "loss")
        assert [m.step for m in loss] == list(range(1, custom["steps_completed"] + 1))
        assert len(client.get_metric_history(run.info.run_id, "lr")) == len(loss)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "epoch_val_loss")] == [
            1,
            2,
        ]
        assert len(custom["metrics"]["steps"]) == custom["steps_completed"]  # for the dashboard
        files = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "adapter_card.json" in files
        manifest = client.list_artifacts(run.info.run_id, "dataset")
        assert [a.path for a in manifest] == ["dataset/manifest.json"]

    service.delete_job(db, ArtifactStore(settings.artifacts_root), job_id)
    assert client.get_experiment(experiment.experiment_id).lifecycle_stage == "deleted"
    db.dispose()


def test_a_rerun_stage_replaces_its_run(findistil_home):
    tracker = make_tracker({"enabled": True}, findistil_home)
    assert isinstance(tracker, MlflowTracker)
    job = "a" * 24
    first = tracker.log_run(job, RunRecord("m_base-eval", "0/base-eval", metrics={"f1_score": 0.1}))
    second = tracker.log_run(
        job, RunRecord("m_base-eval", "0/base-eval", metrics={"f1_score": 0.2})
    )
    assert first != second
    client = tracker.client
    experiment = client.get_experiment_by_name(f"findistil-{job}")
    (run,) = client.search_runs([experiment.experiment_id])
    assert second.endswith(run.info.run_id) and run.data.metrics["f1_score"] == 0.2


def test_tracking_is_off_unless_asked_and_on_with_a_tracking_uri(findistil_home):
    assert not make_tracker(None, findistil_home).enabled
    assert not make_tracker({"experiment_name_prefix": "x"}, findistil_home).enabled
    assert make_tracker({"tracking_uri": "http://127.0.0.1:1"}, findistil_home).enabled
    assert not make_tracker({"enabled": False, "tracking_uri": "http://x"}, findistil_home).enabled
    settings = load_settings(mlflow_config={"enabled": True, "experiment_name_prefix": "fin"})
    assert settings.job_config().mlflow_config.experiment_name_prefix == "fin"  # frozen on jobs
    assert not (findistil_home / "mlflow").exists()  # nothing is created while it is off


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on a loopback port, with its own SQLite store and artefacts."""
    exe = shutil.which("mlflow", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("the mlflow command is not installed (the [dev] extra has it)")
    port = free_port()
    root = tmp_path / "mlflow-server"
    root.mkdir()
    args = [
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{root / 'store.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--workers",
        "1",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FINDISTIL_", "MLFLOW_"))}
    proc = Proc(args, env, root, root / "server.log", program=[exe])
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", proc, timeout=120)
        yield url
    finally:
        proc.stop()


def test_a_real_mlflow_server_gets_the_runs_over_http(
    sqlite_url, demo_store, tiny_bert_dir, mlflow_server
):
    nims = [{"model_name": str(tiny_bert_dir), "kind": "encoder"}]
    config = {"tracking_uri": mlflow_server, "experiment_name_prefix": "team"}
    _, db, detail = _run(sqlite_url, demo_store, nims, config)
    assert detail["status"] == "completed" and detail["warnings"] == []
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(f"team-{detail['id']}")
    runs = _runs(client, experiment.experiment_id)
    name = tiny_bert_dir.name
    assert set(runs) == {f"{name}_customization", f"{name}_customized-eval"}
    ev = detail["nims"][0]["evaluations"][0]
    assert ev["mlflow_uri"].startswith(mlflow_server + "/#/experiments/")
    run = runs[f"{name}_customized-eval"]
    assert run.data.metrics["f1_score"] == pytest.approx(ev["scores"]["f1_score"])
    png = client.download_artifacts(run.info.run_id, "confusion_matrix.png")
    assert Path(png).read_bytes()[:4] == b"\x89PNG"  # uploaded through the server
    db.dispose()


def test_an_unreachable_tracking_server_is_a_warning_not_a_failure(
    sqlite_url, demo_store, tiny_bert_dir
):
    nims = [{"model_name": str(tiny_bert_dir), "kind": "encoder"}]
    dead = f"http://127.0.0.1:{free_port()}"
    settings, db, detail = _run(sqlite_url, demo_store, nims, {"tracking_uri": dead})
    assert detail["status"] == "completed"
    assert detail["nims"][0]["status"] == "completed"
    (warning,) = detail["warnings"]  # said once, though two stages tried
    assert warning.startswith("experiment tracking: ") and dead in warning
    assert "did not answer" in warning
    assert all(e["mlflow_uri"] is None for e in detail["nims"][0]["evaluations"])
    # deleting the job does not depend on the server either
    service.delete_job(db, ArtifactStore(settings.artifacts_root), detail["id"])
    db.dispose()
