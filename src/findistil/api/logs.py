"""The ``/api/logs`` router: applications log their LLM calls straight into the log store.

``POST /api/logs`` takes a batch (``{"records": [...], "workload_id"?, "client_id"?}``) and
stores it with the file loader's rules (``loaders.load_objects``): each record is checked on
its own, a bad one is answered by index and reason, and the good ones are stored in one
transaction. It writes, so it needs an admin token when tokens are configured. The body is
parsed here by the loader's strict rules (standard JSON only, bounded nesting), not by
FastAPI, and may be as large as ``max_log_batch_bytes`` (the other routes allow 64 KiB).
``GET /api/logs`` lists the workloads/clients stored.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from findistil.api.deps import SettingsDep, StoreDep
from findistil.api.schemas import (
    AUTH_RESPONSES,
    ErrorResponse,
    LogBatch,
    LogBatchResponse,
    LogWorkloadsResponse,
    ValidationErrorResponse,
)
from findistil.errors import DataError
from findistil.loaders import load_objects, parse_json_object

router = APIRouter(prefix="/api/logs", tags=["logs"], responses=AUTH_RESPONSES)

_BODY = {
    "required": True,
    "content": {"application/json": {"schema": LogBatch.model_json_schema()}},
}


def _batch(raw: bytes, max_records: int) -> LogBatch:
    try:
        batch = LogBatch.model_validate(parse_json_object(raw))
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]
        ) from None
    if len(batch.records) > max_records:
        raise DataError(
            f"records: {len(batch.records)} in one batch, over max_log_batch_records "
            f"({max_records}): send them in smaller batches"
        )
    return batch


@router.post(
    "",
    response_model=LogBatchResponse,
    openapi_extra={"requestBody": _BODY},
    responses={
        400: {"model": ErrorResponse, "description": "not a JSON object, or too many records"},
        413: {"model": ErrorResponse, "description": "body over max_log_batch_bytes"},
        422: {"model": ValidationErrorResponse, "description": "a field of the batch is wrong"},
    },
)
async def post_logs(request: Request, store: StoreDep, settings: SettingsDep):
    """Store a batch of logged calls; each bad record is named by index and reason."""
    batch = _batch(await request.body(), settings.max_log_batch_records)
    report = await run_in_threadpool(
        load_objects,
        batch.records,
        store,
        workload_id=batch.workload_id,
        client_id=batch.client_id,
        max_record_bytes=settings.max_record_bytes,
        redact_pii=settings.redact_pii,
    )
    return {
        "stored": report.loaded,
        "rejected": report.rejected,
        "errors": [{"index": int(i), "reason": why} for i, why in report.problems],
        "targets": [
            {"workload_id": w, "client_id": c, "records": n} for (w, c), n in report.targets.items()
        ],
        "redacted": dict(report.redacted),
    }


@router.get("", response_model=LogWorkloadsResponse)
def list_logs(store: StoreDep):
    """Every workload/client in the log store, with its record count."""
    rows = store.workloads()
    return {"workloads": [{"workload_id": w, "client_id": c, "records": n} for w, c, n in rows]}
