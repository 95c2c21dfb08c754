"""Experiment tracking: the one seam the stages log runs through (MLflow, or nothing).

``make_tracker(config, artifacts_root)`` returns a ``Tracker``: the no-op one when
``mlflow_config`` is off, an ``MlflowTracker`` otherwise. Nothing else imports mlflow, and a
job never needs it: the stages log a finished evaluation or training as one ``RunRecord`` and
treat any ``TrackingError`` as a warning on the job.

Layout (upstream's): one experiment per job, ``{experiment_name_prefix}-{job_id}``; one run
per candidate and eval type, ``{model}_{eval_type}`` (``{model}_customization`` for the
training), with the candidate's resolved config as params, every score as a metric, step
series (training loss and learning rate per step, val loss per epoch) and artefacts
(confusion-matrix PNG, predictions JSONL, adapter card, dataset manifest). A stage that runs
again replaces its run (found by the ``findistil.stage`` tag), so runs stay one per stage.

``mlflow_config.enabled`` with no ``tracking_uri``: a local store under the artefact root
(``mlflow/mlflow.db`` + ``mlflow/artifacts``; the artefact root is ``FINDISTIL_HOME`` unless
scaled out), read with ``mlflow ui --backend-store-uri sqlite:///<that file>``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from findistil.config import MlflowConfig
from findistil.errors import FindistilError

log = logging.getLogger(__name__)

STAGE_TAG = "findistil.stage"
MAX_PARAMS, MAX_METRICS = 100, 1000  # MLflow's limits for one log_batch request
PARAM_LIMIT = 6000  # characters MLflow keeps of a param value
PROBE_TIMEOUT_S = 3.0


class TrackingError(FindistilError):
    """The tracking backend could not take a run; the job goes on, with a warning."""


@dataclass
class RunRecord:
    """One finished stage, as a tracker logs it.

    Args:
        name: the run's name (``{model}_{eval_type}``).
        stage: a stable id of the stage (``<candidate position>/<eval type>``): a re-run of
            the stage replaces the run that has it.
        params: flat ``{key: value}``; values are logged as text.
        metrics: final numbers, logged at step 0.
        series: ``{key: [(step, value), ...]}`` (loss per training step, val loss per epoch).
        files: local files to attach, with the artefact folder each goes into ("" = root).
        figures: ``{file name: callable(path)}`` that draw a picture into ``path``.
    """

    name: str
    stage: str
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    files: list[tuple[Path, str]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)


class Tracker:
    """Tracking off: every call does nothing."""

    enabled = False

    def log_run(self, job_id: str, record: RunRecord) -> str | None:
        """Log one finished stage; returns the run's address (``mlflow_uri``) or None."""
        return None

    def delete_job(self, job_id: str) -> None:
        """Remove the job's experiment (its runs go with it)."""


def make_tracker(config: MlflowConfig | Mapping | None, artifacts_root: Path) -> Tracker:
    config = MlflowConfig.model_validate(config or {})
    if not config.is_enabled:
        return Tracker()
    return MlflowTracker(config, Path(artifacts_root))


class MlflowTracker(Tracker):
    """Runs in an MLflow tracking store: a server (``http(s)://``) or a local one."""

    enabled = True

    def __init__(self, config: MlflowConfig, artifacts_root: Path) -> None:
        self.config = config
        local = artifacts_root / "mlflow"
        if config.tracking_uri:
            self.uri = config.tracking_uri
        else:
            local.mkdir(parents=True, exist_ok=True)
            self.uri = f"sqlite:///{local / 'mlflow.db'}"
        self.artifact_location = config.artifact_location or (
            None if config.tracking_uri else (local / "artifacts").as_uri()
        )
        # An unreachable server must cost seconds, not MLflow's default minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        self._client = None

    # -- plumbing ------------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            self._probe()
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _probe(self) -> None:
        """Fail fast (seconds) when a tracking server does not answer at all."""
        if not self.uri.startswith(("http://", "https://")):
            return
        try:
            httpx.get(self.uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S)
        except httpx.HTTPError as exc:
            raise TrackingError(
                f"MLflow tracking server {self.uri} did not answer ({type(exc).__name__}); "
                "start it or fix mlflow_config.tracking_uri"
            ) from None

    def experiment_name(self, job_id: str) -> str:
        return f"{self.config.experiment_name_prefix}-{job_id}"

    def _experiment_id(self, job_id: str, create: bool) -> str | None:
        name = self.experiment_name(job_id)
        found = self.client.get_experiment_by_name(name)
        if found is not None and found.lifecycle_stage == "active":
            return found.experiment_id
        if found is not None:  # a deleted experiment of the same name blocks the name
            self.client.restore_experiment(found.experiment_id)
            return found.experiment_id
        if not create:
            return None
        from mlflow.exceptions import MlflowException

        try:
            return self.client.create_experiment(name, artifact_location=self.artifact_location)
        except MlflowException:  # another worker created it meanwhile
            return self.client.get_experiment_by_name(name).experiment_id

    def run_uri(self, experiment_id: str, run_id: str) -> str:
        return f"{self.uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"

    # -- the seam --------------------------------------------------------------------------
    def log_run(self, job_id: str, record: RunRecord) -> str:
        try:
            return self._log_run(job_id, record)
        except TrackingError:
            raise
        except Exception as exc:  # any backend failure: the caller turns it into a warning
            raise TrackingError(
                f"MLflow ({self.uri}) refused run {record.name}: {type(exc).__name__}: {exc}"
            ) from exc

    def _log_run(self, job_id: str, record: RunRecord) -> str:
        from mlflow.entities import Metric, Param

        experiment_id = self._experiment_id(job_id, create=True)
        self._drop_earlier(experiment_id, record.stage)
        tags = {STAGE_TAG: record.stage, "findistil.job_id": job_id}
        run = self.client.create_run(experiment_id, run_name=record.name, tags=tags)
        run_id = run.info.run_id
        params = [Param(k, str(v)[:PARAM_LIMIT]) for k, v in record.params.items()]
        for chunk in _chunks(params, MAX_PARAMS):
            self.client.log_batch(run_id, params=chunk)
        stamp = int(run.info.start_time or 0)
        metrics = [Metric(k, float(v), stamp, 0) for k, v in record.metrics.items()]
        metrics += [
            Metric(k, float(v), stamp, int(step))
            for k, points in record.series.items()
            for step, v in points
        ]
        for chunk in _chunks(metrics, MAX_METRICS):
            self.client.log_batch(run_id, metrics=chunk)
        self._attach(run_id, record)
        self.client.set_terminated(run_id, "FINISHED")
        return self.run_uri(experiment_id, run_id)

    def _drop_earlier(self, experiment_id: str, stage: str) -> None:
        earlier = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{STAGE_TAG}` = '{stage}'"
        )
        for run in earlier:
            self.client.delete_run(run.info.run_id)

    def _attach(self, run_id: str, record: RunRecord) -> None:
        for path, folder in record.files:
            if path.is_dir():
                self.client.log_artifacts(run_id, str(path), folder or None)
            elif path.is_file():
                self.client.log_artifact(run_id, str(path), folder or None)
        if record.figures:
            with tempfile.TemporaryDirectory(prefix="findistil-figures-") as tmp:
                for name, draw in record.figures.items():
                    draw(Path(tmp) / name)
                    self.client.log_artifact(run_id, str(Path(tmp) / name))

    def delete_job(self, job_id: str) -> None:
        try:
            found = self.client.get_experiment_by_name(self.experiment_name(job_id))
            if found is not None and found.lifecycle_stage == "active":
                self.client.delete_experiment(found.experiment_id)
        except TrackingError:
            raise
        except Exception as exc:
            raise TrackingError(
                f"MLflow ({self.uri}) could not delete experiment "
                f"{self.experiment_name(job_id)}: {type(exc).__name__}: {exc}"
            ) from exc


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``; lists are kept as one value."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        elif value is not None:
            out[name] = value
    return out


def numbers(data: Mapping[str, Any], keys: Iterable[str] | None = None) -> dict[str, float]:
    """The plain numeric entries of ``data`` (booleans and NaN left out)."""
    wanted = set(keys) if keys is not None else None
    return {
        k: float(v)
        for k, v in data.items()
        if (wanted is None or k in wanted)
        and isinstance(v, int | float)
        and not isinstance(v, bool)
        and v == v
    }


# -- what the stages log ---------------------------------------------------------------------
def metric_name(text: str) -> str:
    """A label as an MLflow metric name (letters, digits, ``_-. /`` only)."""
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in text)


def candidate_params(job_config: Mapping[str, Any], position: int) -> dict[str, Any]:
    """The resolved config one candidate ran with, flat: its own keys (model, kind,
    ``training_config.*``, ``lora_config.*``) and the job's split / ICL / eval sections."""
    params = flatten(job_config["nims"][position])
    for section in ("data_split_config", "icl_config", "evaluation_config"):
        params.update(flatten(job_config.get(section) or {}, section + "."))
    return params


def eval_record(
    *,
    model: str,
    position: int,
    eval_type: str,
    params: dict[str, Any],
    scores: Mapping[str, Any],
    report: Mapping[str, Any] | None,
    predictions: Path | None,
    manifest: Path | None,
) -> RunRecord:
    """An evaluation's run: every score, per-class F1, cost, the confusion matrix."""
    from functools import partial

    from findistil.report import plot_confusion

    metrics = numbers(scores)
    rate = metrics.get("rows_per_s")
    if rate and "s_per_row" not in metrics:
        metrics["s_per_row"] = 1.0 / rate
    report = report or {}
    for label, row in (report.get("per_class") or {}).items():
        metrics.update({f"f1.{metric_name(label)}": float(row["f1"])})
    figures = {}
    if report.get("confusion"):
        title = f"{Path(model).name} {eval_type} vs the teacher"
        figures["confusion_matrix.png"] = partial(
            plot_confusion, report["confusion"], title=title, xlabel="student", ylabel="teacher"
        )
    files = [(p, folder) for p, folder in ((predictions, ""), (manifest, "dataset")) if p]
    return RunRecord(
        name=f"{Path(model).name}_{eval_type}",
        stage=f"{position}/{eval_type}",
        params={**params, "eval_type": eval_type},
        metrics=metrics,
        files=files,
        figures=figures,
    )


def training_record(
    *,
    model: str,
    position: int,
    params: dict[str, Any],
    metrics: Mapping[str, Any],
    steps: list[dict[str, Any]],
    adapter_dir: Path | None,
    manifest: Path | None,
) -> RunRecord:
    """A customization's run: ``loss`` and ``lr`` per step, ``epoch_*`` per epoch (val loss,
    val accuracy), the final numbers (``train_loss``, ``val_loss``, ``examples_per_s``)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for point in steps:
        for key in ("loss", "lr"):
            if isinstance(point.get(key), int | float):
                series.setdefault(key, []).append((point["step"], point[key]))
    for epoch in metrics.get("epochs") or []:
        for key, value in epoch.items():
            if key != "epoch" and isinstance(value, int | float):
                series.setdefault(f"epoch_{key}", []).append((epoch["epoch"], value))
    card = adapter_dir / "adapter_card.json" if adapter_dir else None
    files = [(p, folder) for p, folder in ((card, ""), (manifest, "dataset")) if p]
    return RunRecord(
        name=f"{Path(model).name}_customization",
        stage=f"{position}/customization",
        params=params,
        metrics=numbers(metrics),
        series=series,
        files=files,
    )
