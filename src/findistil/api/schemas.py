"""Request and response models of the REST API: upstream's JSON shapes (REFERENCE §8).

Field names are upstream's (``nims``, ``evaluations``, ``customizations``, ``scores.f1_score``)
so upstream's notebook client reads our jobs unchanged. What findistil adds (full metric set,
eval ids, predictions links, parameter counts, recommendation, progress) rides along as extra
fields, which upstream clients ignore. Response models allow extra keys so a field the job
service adds later is passed through rather than silently dropped.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

JobStatus = Literal["pending", "running", "completed", "failed", "cancelled"]
# ISO 8601 text (as the job service returns it) or a datetime (serialised to ISO 8601).
Timestamp = datetime | str | None


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


# -- requests -----------------------------------------------------------------------------


class DataSplitOverride(BaseModel):
    """A job's ``data_split_config``: only the fields named here change (merged field by field).

    Types are checked here (422); cross-field rules (``limit >= min_total_records``) are checked
    after the merge and come back as 400 naming the key.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    eval_size: int | None = Field(None, ge=1)
    val_ratio: float | None = Field(None, ge=0.0, lt=1.0)
    min_total_records: int | None = Field(None, ge=1)
    random_seed: int | None = None
    limit: int | None = Field(None, ge=1)
    parse_function_arguments: bool | None = None
    stratify_enabled: bool | None = None
    min_samples_per_class: int | None = Field(None, ge=1)
    rare_class_threshold: int | None = Field(None, ge=0)


class JobRequest(BaseModel):
    """Body of ``POST /api/jobs``."""

    model_config = ConfigDict(extra="forbid")

    workload_id: str = Field(..., min_length=1, max_length=256)
    client_id: str = Field(..., min_length=1, max_length=256)
    data_split_config: DataSplitOverride | None = None

    @field_validator("workload_id", "client_id")
    @classmethod
    def _storable(cls, value: str) -> str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("holds a lone surrogate (\\ud800...): not valid Unicode") from None
        if "\x00" in value:
            raise ValueError("holds a NUL character")
        return value


class TeacherRequest(BaseModel):
    """The teacher a route falls back to (unset fields: the config's ``teacher``)."""

    model_config = ConfigDict(extra="forbid")

    base_url: str | None = Field(None, min_length=1, max_length=2000)
    model: str | None = Field(None, min_length=1, max_length=1000)
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    timeout_s: float | None = Field(None, gt=0, le=600)


class DeploymentRequest(BaseModel):
    """Body of ``POST /api/deployments``: a completed job's tuned student behind its route."""

    model_config = ConfigDict(extra="forbid")

    job_id: str = Field(..., min_length=1, max_length=64)
    candidate: str | None = Field(
        None, min_length=1, max_length=1000, description="model_name (default: recommended)"
    )
    teacher: TeacherRequest | None = None
    threshold: float | None = Field(
        None, ge=0, le=1, description="override the calibrated confidence threshold"
    )


class LogBatch(BaseModel):
    """Body of ``POST /api/logs``: logged calls, each an upstream log record or a
    conversation (``{"messages": [..., assistant answer], "tools"?}``)."""

    model_config = ConfigDict(extra="forbid")

    records: list[Any] = Field(..., description="log records or conversations")
    workload_id: str | None = Field(
        None, min_length=1, max_length=256, description="set on every record (overrides)"
    )
    client_id: str | None = Field(
        None, min_length=1, max_length=256, description="set on every record (overrides)"
    )


# -- responses ----------------------------------------------------------------------------


class LogRejection(BaseModel):
    index: int = Field(description="position of the record in the batch")
    reason: str


class LogTarget(BaseModel):
    workload_id: str
    client_id: str
    records: int


class LogBatchResponse(BaseModel):
    """Answer of ``POST /api/logs``: ``stored + rejected`` is the batch's size."""

    stored: int
    rejected: int
    errors: list[LogRejection] = Field(description="the first 200 rejections")
    targets: list[LogTarget] = Field(description="records stored per workload/client")
    redacted: dict[str, int] = Field(
        default_factory=dict, description="PII placeholders put in (redact_pii)"
    )


class LogWorkloadsResponse(BaseModel):
    """Answer of ``GET /api/logs``: what the log store holds."""

    workloads: list[LogTarget]


class JobResponse(_Open):
    """Answer of ``POST /api/jobs``."""

    id: str
    status: JobStatus
    message: str


class Dataset(_Open):
    name: str
    num_records: int | None = None
    nmp_uri: str | None = None


class JobListItem(_Open):
    id: str
    workload_id: str
    client_id: str
    status: JobStatus
    started_at: Timestamp = None
    finished_at: Timestamp = None
    datasets: list[Dataset] = Field(default_factory=list)
    error: str | None = None


class JobListResponse(_Open):
    jobs: list[JobListItem]


class Evaluation(_Open):
    eval_type: str
    scores: dict[str, float] = Field(
        default_factory=dict, description="only floats, as upstream types them"
    )
    scoring_mode: str | None = Field(None, description="generate | label_scores")
    counts: dict[str, int] = Field(
        default_factory=dict, description="rows, prompt_tokens, completion_tokens"
    )
    started_at: Timestamp = None
    finished_at: Timestamp = None
    runtime_seconds: float = Field(0.0, description="so far, while it runs")
    progress: float = 0.0
    nmp_uri: str | None = None
    mlflow_uri: str | None = None
    error: str | None = None


class Customization(_Open):
    started_at: Timestamp = None
    finished_at: Timestamp = None
    runtime_seconds: float = 0.0
    progress: float = 0.0
    epochs_completed: int = 0
    steps_completed: int = 0
    nmp_uri: str | None = None
    customized_model: str | None = None
    mlflow_uri: str | None = None
    error: str | None = None


class Nim(_Open):
    model_name: str
    status: str
    deployment_status: str | None = None
    runtime_seconds: float = 0.0
    error: str | None = None
    evaluations: list[Evaluation] = Field(default_factory=list)
    customizations: list[Customization] = Field(default_factory=list)


class JobDetail(_Open):
    """Answer of ``GET /api/jobs/{id}``: upstream's job detail plus findistil's extras."""

    id: str
    workload_id: str
    client_id: str
    status: JobStatus
    started_at: Timestamp = Field(None, description="when a runner started it, else created")
    finished_at: Timestamp = None
    created_at: Timestamp = None
    num_records: int = Field(0, description="records curated (0 until datasets exist)")
    llm_judge: dict[str, Any] | None = None
    datasets: list[Dataset] = Field(default_factory=list)
    nims: list[Nim] = Field(default_factory=list)
    error: str | None = None
    warnings: list[str] = Field(
        default_factory=list, description="problems that did not fail the job"
    )


class Deployment(_Open):
    """One deployment: the tuned student behind ``model`` (``findistil/route-<workload>``)."""

    id: int
    model: str
    workload_id: str
    job_id: str
    customized_model: str
    status: Literal["active", "retired", "rolled_back"]
    threshold: float | None = Field(None, description="calibrated confidence the student needs")
    requests: int = 0
    student_share: float | None = None


class DeploymentList(_Open):
    deployments: list[Deployment]


class JobActionResponse(_Open):
    """Answer of cancel and delete."""

    id: str
    message: str


class HealthResponse(BaseModel):
    """Answer of ``GET /health`` (findistil's addition; upstream has none)."""

    status: Literal["ok", "degraded"]
    database: str
    runner: Literal["alive", "stopped", "disabled"]
    runner_kind: str | None = None  # threads | celery
    workers: list[dict[str, Any]] = Field(
        default_factory=list, description="processes that run stages and beat recently"
    )
    students: list[dict[str, Any]] = Field(
        default_factory=list,
        description="students loaded in this process (an LRU of student_cache_size)",
    )
    rss_mb: float | None = Field(None, description="this process's resident memory")
    serving: dict[str, int] = Field(
        default_factory=dict, description="/v1 requests answered and the batches they took"
    )
    version: str


class ErrorResponse(BaseModel):
    detail: str


# 401/403 come from the token check (api/auth.py) when tokens are configured.
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse},
    403: {"model": ErrorResponse},
}


class ValidationErrorResponse(BaseModel):
    """422: each bad field with ``loc``, ``msg``, ``type`` and an excerpt of the input."""

    detail: list[dict[str, Any]]


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class OpenAIErrorResponse(BaseModel):
    """OpenAI's error shape, used by every ``/v1`` error but FastAPI's 422."""

    error: OpenAIErrorBody


def openai_error_body(
    message: str, code: str | None = None, param: str | None = None
) -> dict[str, dict[str, str | None]]:
    """``{"error": {...}}`` as OpenAI's API answers a request it refuses."""
    error = {"message": message, "type": "invalid_request_error", "code": code, "param": param}
    return {"error": error}
