"""Upstream's own response models accept every answer findistil gives about a job.

The models below re-declare, in this project's words, the types upstream's API declares for
its responses (REFERENCE §8 and §11: ``scores`` is ``dict[str, float]``; ``num_records``,
``started_at``, ``runtime_seconds``, ``progress``, ``epochs_completed`` and
``steps_completed`` are required; statuses are upstream's enums). A client built on those
models must be able to read a completed, a failed and a cancelled job, and the answers of
create, list, cancel and delete, with upstream's messages.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

import pytest
from pydantic import BaseModel, Field

from tests.api.conftest import settled, wait_job

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


class DeploymentStatus(StrEnum):
    created = "created"
    pending = "pending"
    running = "running"
    cancelled = "cancelled"
    failed = "failed"
    completed = "completed"
    ready = "ready"
    unknown = "unknown"


class NimRunStatus(StrEnum):
    pending = "pending"
    deploying = "deploying-nim"
    running = "running-evals"
    cancelled = "cancelled"
    completed = "completed"
    failed = "failed"


class UpJobResponse(BaseModel):
    id: str
    status: str
    message: str


class UpActionResponse(BaseModel):
    id: str
    message: str


class UpDataset(BaseModel):
    name: str
    num_records: int = Field(ge=0)
    nmp_uri: str | None = None


class UpJobListItem(BaseModel):
    id: str
    workload_id: str
    client_id: str | None = None
    status: str
    started_at: datetime
    finished_at: datetime | None = None
    datasets: list[UpDataset] = []
    error: str | None = None


class UpJobsList(BaseModel):
    jobs: list[UpJobListItem]


class UpEvaluation(BaseModel):
    eval_type: str
    scores: dict[str, float] = {}
    started_at: datetime
    finished_at: datetime | None = None
    runtime_seconds: float = Field(ge=0.0)
    progress: float = Field(ge=0.0, le=100.0)
    nmp_uri: str | None = None
    mlflow_uri: str | None = None
    error: str | None = None


class UpCustomization(BaseModel):
    started_at: datetime
    finished_at: datetime | None = None
    runtime_seconds: float = Field(ge=0.0)
    progress: float = Field(ge=0.0, le=100.0)
    epochs_completed: int = Field(ge=0)
    steps_completed: int = Field(ge=0)
    nmp_uri: str | None = None
    customized_model: str | None = None
    error: str | None = None


class UpNim(BaseModel):
    model_name: str
    status: NimRunStatus
    deployment_status: DeploymentStatus
    runtime_seconds: float = Field(ge=0.0)
    evaluations: list[UpEvaluation] = []
    customizations: list[UpCustomization] = []
    error: str | None = None


class UpJobDetail(BaseModel):
    id: str
    workload_id: str
    client_id: str
    status: str
    started_at: datetime
    finished_at: datetime | None = None
    num_records: int = Field(ge=0)
    llm_judge: dict | None = None
    nims: list[UpNim] = []
    datasets: list[UpDataset] = []
    error: str | None = None


def _create(client, **split) -> str:
    body = {"workload_id": "news_classifier", "client_id": "demo"}
    if split:
        body["data_split_config"] = split
    answer = client.post("/api/jobs", json=body)
    assert answer.status_code == 200, answer.text
    return UpJobResponse.model_validate(answer.json()).id


def _detail(client, job_id: str) -> UpJobDetail:
    job = client.get(f"/api/jobs/{job_id}").json()
    detail = UpJobDetail.model_validate(job)
    for nim in job["nims"]:
        for ev in nim["evaluations"]:  # floats, not numbers a lax model happens to coerce
            assert all(type(v) is float for v in ev["scores"].values()), ev["scores"]
    return detail


def _in_training(job: dict) -> bool:
    return job["status"] in ("cancelled", "completed", "failed") or any(
        c["steps_completed"] >= 1 for n in job["nims"] for c in n["customizations"]
    )


def test_upstream_models_read_completed_failed_and_cancelled_jobs(client, write_config):
    completed = _create(client)
    wait_job(client, completed)
    failed = _create(client, eval_size=60)  # 60 records: none left to train on
    wait_job(client, failed)
    cancelled = _create(client)
    wait_job(client, cancelled, until=_in_training)
    answer = UpActionResponse.model_validate(client.post(f"/api/jobs/{cancelled}/cancel").json())
    assert answer.message == "Job cancellation initiated successfully."
    wait_job(client, cancelled)
    queued_then_cancelled = _create(client)
    client.post(f"/api/jobs/{queued_then_cancelled}/cancel")
    wait_job(client, queued_then_cancelled, until=settled)

    done = _detail(client, completed)
    assert done.status == "completed" and done.num_records == 60
    evals = [e for n in done.nims for e in n.evaluations]
    assert evals and all("f1_score" in e.scores for e in evals)
    assert all(c.epochs_completed >= 1 for n in done.nims for c in n.customizations)

    broken = _detail(client, failed)
    assert broken.status == "failed" and "eval_size" in broken.error
    assert broken.num_records == 0  # never curated: 0, not null

    stopped = _detail(client, cancelled)
    assert stopped.status == "cancelled" and stopped.error == "Job cancelled by user"
    rows = [r for n in stopped.nims for r in n.evaluations + n.customizations]
    assert rows and all(r.runtime_seconds >= 0 for r in rows)

    never_ran = _detail(client, queued_then_cancelled)
    assert never_ran.status == "cancelled" and never_ran.started_at is not None

    listed = UpJobsList.model_validate(client.get("/api/jobs").json())
    assert {j.id for j in listed.jobs} == {completed, failed, cancelled, queued_then_cancelled}

    # upstream's messages: cancelling twice, a finished job, unknown ids
    again = UpActionResponse.model_validate(client.post(f"/api/jobs/{cancelled}/cancel").json())
    assert again.message == "Job is already cancelled."
    finished = client.post(f"/api/jobs/{completed}/cancel")
    assert finished.status_code == 400
    assert finished.json() == {"detail": "Cannot cancel a job that has already finished."}
    gone = client.delete(f"/api/jobs/{completed}")
    deleted = UpActionResponse.model_validate(gone.json())
    assert deleted.message.startswith("Job deletion started.")
    for method in ("POST", "DELETE"):
        path = f"/api/jobs/{completed}" + ("/cancel" if method == "POST" else "")
        missing = client.request(method, path)
        assert missing.status_code == 404
        assert missing.json() == {"detail": f"Job with ID {completed} not found"}
