"""The orchestrator's terminal side: an HTTP client of the jobs API, rich tables, ``demo``.

``findistil jobs ...`` and ``findistil demo`` (``cli.py``) are thin wrappers over this module.
Everything here talks to the API over HTTP (``ApiClient``), the way any outside client would,
so the CLI exercises exactly the routes upstream's notebook uses. ``follow_job`` turns polled
job details into ``Progress`` events (one bar per candidate and stage); ``results_table``
prints the scores of a finished job beside their baselines, with the recommendation.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from rich.table import Table

from findistil.errors import FindistilError
from findistil.progress import Progress, ProgressFn, no_progress

DEFAULT_API_URL = "http://127.0.0.1:8000"
FINISHED = {"completed", "failed", "cancelled"}
_STATUS_STYLE = {
    "completed": "green",
    "failed": "red",
    "cancelled": "yellow",
    "running": "cyan",
    "pending": "dim",
}


class ApiError(FindistilError):
    """The API refused a request (its ``detail`` is the message) or cannot be reached."""


class ApiClient:
    """A small synchronous client of findistil's (and upstream's) ``/api/jobs`` routes."""

    def __init__(
        self, api_url: str = DEFAULT_API_URL, timeout: float = 30.0, token: str | None = None
    ) -> None:
        self.api_url = api_url.rstrip("/")
        token = token or os.environ.get("FINDISTIL_API_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.api_url, timeout=timeout, headers=headers)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ApiError(
                f"cannot reach the findistil API at {self.api_url} ({type(exc).__name__}): "
                "start it with `findistil serve` or pass --api-url"
            ) from None
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            if not isinstance(detail, str):  # 422: a list of field errors
                detail = "; ".join(
                    f"{'.'.join(str(p) for p in e.get('loc', [])[1:])}: {e.get('msg')}"
                    for e in detail
                )
            if response.status_code in (401, 403):
                detail += " Pass --token or set FINDISTIL_API_TOKEN."
            raise ApiError(f"{detail} (HTTP {response.status_code})")
        return response.json()

    def create_job(
        self, workload_id: str, client_id: str, data_split_config: dict | None = None
    ) -> dict:
        body: dict[str, Any] = {"workload_id": workload_id, "client_id": client_id}
        if data_split_config:
            body["data_split_config"] = data_split_config
        return self._call("POST", "/api/jobs", json=body)

    def list_jobs(self, **filters: Any) -> list[dict]:
        params = {k: v for k, v in filters.items() if v is not None}
        return self._call("GET", "/api/jobs", params=params)["jobs"]

    def get_job(self, job_id: str) -> dict:
        return self._call("GET", f"/api/jobs/{job_id}")

    def cancel_job(self, job_id: str) -> dict:
        return self._call("POST", f"/api/jobs/{job_id}/cancel")

    def delete_job(self, job_id: str) -> dict:
        return self._call("DELETE", f"/api/jobs/{job_id}")

    def health(self) -> dict:
        return self._call("GET", "/health")

    def deploy(self, job_id: str, **fields: Any) -> dict:
        body = {"job_id": job_id, **{k: v for k, v in fields.items() if v is not None}}
        return self._call("POST", "/api/deployments", json=body)

    def list_deployments(self, workload_id: str | None = None) -> list[dict]:
        params = {"workload_id": workload_id} if workload_id else {}
        return self._call("GET", "/api/deployments", params=params)["deployments"]

    def rollback(self, workload_id: str) -> dict:
        return self._call("POST", f"/api/deployments/{workload_id}/rollback")

    def close(self) -> None:
        self.http.close()


# -- following a job ----------------------------------------------------------------------


def short_name(model_name: str) -> str:
    """``HuggingFaceTB/SmolLM2-135M-Instruct`` -> ``SmolLM2-135M-Instruct`` (paths too)."""
    return Path(model_name.rstrip("/")).name or model_name


def job_events(job: dict) -> Iterable[Progress]:
    """The job's state as progress events: datasets, then per candidate each stage (0-100).

    Stages a candidate has planned but not started yet show as empty bars, so the whole
    shape of the job is visible from the first poll after its weights are loaded.
    """
    datasets_done = 1 if job.get("datasets") else 0
    yield Progress("datasets", datasets_done, 1, {"records": job.get("num_records") or 0})
    for nim in job.get("nims") or []:
        name = short_name(nim["model_name"])
        ready = nim.get("deployment_status") in ("ready", "completed") or nim["status"] in FINISHED
        yield Progress(f"{name} prepare", int(ready), 1, {"status": nim.get("deployment_status")})
        seen = set()
        for ev in nim.get("evaluations") or []:
            seen.add(ev["eval_type"])
            info: dict[str, Any] = {}
            f1 = (ev.get("scores") or {}).get("f1_score")
            if f1 is not None:
                info["f1"] = float(f1)
            if ev.get("error"):
                info["error"] = ev["error"][:40]
            yield Progress(f"{name} {ev['eval_type']}", round(ev.get("progress") or 0), 100, info)
        for cust in nim.get("customizations") or []:
            seen.add("customization")
            info = {
                "epochs": cust.get("epochs_completed") or 0,
                "steps": cust.get("steps_completed") or 0,
            }
            if cust.get("error"):
                info["error"] = cust["error"][:40]
            yield Progress(f"{name} customization", round(cust.get("progress") or 0), 100, info)
        for stage in nim.get("stages") or []:
            if stage not in seen:
                yield Progress(f"{name} {stage}", 0, 100, {})


def follow_job(
    client: ApiClient,
    job_id: str,
    progress: ProgressFn = no_progress,
    *,
    interval: float = 1.0,
    timeout: float | None = None,
) -> dict:
    """Poll a job until it finishes, reporting each stage as it moves; returns the last detail."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        job = client.get_job(job_id)
        for event in job_events(job):
            progress(event)
        if job["status"] in FINISHED:
            return job
        if deadline is not None and time.monotonic() > deadline:
            raise ApiError(f"job {job_id} still {job['status']} after {timeout:.0f}s")
        time.sleep(interval)


# -- tables -------------------------------------------------------------------------------


def _status(status: str | None) -> str:
    style = _STATUS_STYLE.get(status or "", "")
    return f"[{style}]{status}[/{style}]" if style else str(status)


def _num(value: Any, fmt: str = ".3f") -> str:
    if value is None:
        return "—"
    try:
        return format(float(value), fmt)
    except (TypeError, ValueError):
        return str(value)


def _secs(value: Any) -> str:
    return "—" if value is None else f"{float(value):.1f}s"


def jobs_table(jobs: list[dict]) -> Table:
    table = Table(title=f"{len(jobs)} job(s)")
    table.add_column("id", no_wrap=True)  # ids are copied from here: never fold them
    for col in ("workload", "client", "status", "started", "finished", "datasets", "error"):
        table.add_column(col, overflow="fold")
    for job in jobs:
        table.add_row(
            job["id"],
            job["workload_id"],
            job["client_id"],
            _status(job["status"]),
            (job.get("started_at") or "—")[:19],
            (job.get("finished_at") or "—")[:19],
            str(len(job.get("datasets") or [])),
            (job.get("error") or "")[:60],
        )
    return table


def job_table(job: dict) -> Table:
    """One job: a row per candidate stage with status, progress, runtime and f1."""
    title = (
        f"job {job['id']}  {job['workload_id']}/{job['client_id']}  {_status(job['status'])}"
        f"  records={job.get('num_records') or '—'}"
    )
    table = Table(title=title)
    table.add_column("candidate / stage", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for col in ("done", "runtime", "f1"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("error", overflow="fold")
    for nim in job.get("nims") or []:
        table.add_row(
            f"[bold]{short_name(nim['model_name'])}[/bold]" + _where(nim),
            _status(nim["status"]),
            nim.get("deployment_status") or "",
            _secs(nim.get("runtime_seconds")),
            "",
            nim.get("error") or "",
        )
        for ev in nim.get("evaluations") or []:
            table.add_row(
                f"  {ev['eval_type']}",
                _status(ev.get("status")),
                f"{ev.get('progress') or 0:.0f}%",
                _secs(ev.get("runtime_seconds")),
                _num((ev.get("scores") or {}).get("f1_score")),
                ev.get("error") or "",
            )
        for cust in nim.get("customizations") or []:
            table.add_row(
                f"  customization ({cust.get('epochs_completed') or 0} ep)",
                _status(cust.get("status")),
                f"{cust.get('progress') or 0:.0f}%",
                _secs(cust.get("runtime_seconds")),
                "",
                cust.get("error") or "",
            )
    sets = ", ".join(
        f"{_set_kind(d['name'])} {d.get('num_records')}" for d in job.get("datasets") or []
    )
    caption = [f"datasets: {sets or '—'}"]
    caption += [f"error: {job['error']}"] if job.get("error") else []
    caption += [f"[yellow]warning: {w}[/yellow]" for w in job.get("warnings") or []]
    table.caption = "\n".join(caption)
    return table


def _where(nim: dict) -> str:
    """`` on host:pid (cpu)``: which worker ran a candidate, on which device."""
    worker = nim.get("worker")
    if not worker:
        return ""
    host_pid = ":".join(worker.split(":")[:2])
    device = nim.get("device")
    return f"\n  on {host_pid}" + (f" ({device})" if device else "")


def _set_kind(name: str) -> str:
    """``flywheel-train-news_classifier-<id>`` -> ``train`` (upstream's dataset names)."""
    parts = name.split("-")
    return parts[1] if len(parts) > 2 and parts[0] == "flywheel" else name


# -- results of a finished job ------------------------------------------------------------

_EVAL_ORDER = {"base-eval": 0, "icl-eval": 1, "customized-eval": 2}


def results_table(job: dict) -> Table:
    """Scores per candidate and eval type, each beside the candidate's base eval.

    Fits 80 columns: a candidate is a row of its own (name, size, training time) above its
    evals, columns fold rather than cut, so no header or model name ends as a stub.
    """
    table = Table(title=f"results of job {job['id']} ({job['status']})")
    table.add_column("candidate / eval", overflow="fold", min_width=15)
    for col in ("f1_score", "Δ vs base", "accuracy", "macro-F1", "rows/s"):
        table.add_column(col, justify="right", overflow="fold", no_wrap=False)
    for nim in job.get("nims") or []:
        _candidate_rows(table, nim)
    return table


def _candidate_rows(table: Table, nim: dict) -> None:
    evals = sorted(nim.get("evaluations") or [], key=lambda e: _EVAL_ORDER.get(e["eval_type"], 9))
    base = next((e for e in evals if e["eval_type"] == "base-eval" and e.get("scores")), None)
    base_f1 = (base or {}).get("scores", {}).get("f1_score")
    train = next(iter(nim.get("customizations") or []), {})
    params = nim.get("params")
    trained = train.get("runtime_seconds")
    facts = [f"{params / 1e6:.1f}M" if params else "", f"train {_secs(trained)}" if trained else ""]
    about = " · ".join(f for f in facts if f)
    star = " ★" if nim.get("recommended") else ""
    status = "" if nim["status"] == "completed" else f" [red]{nim['status']}[/red]"
    head = f"[bold]{short_name(nim['model_name'])}[/bold]{star}{status}"
    table.add_row(head + (f"\n[dim]{about}[/dim]" if about else ""), *[""] * 5)
    for ev in evals:
        s = ev.get("scores") or {}
        f1 = s.get("f1_score")
        delta = "—" if base_f1 is None or f1 is None or ev is base else f"{f1 - base_f1:+.3f}"
        error = f" [red]({ev['error'][:30]})[/red]" if ev.get("error") else ""
        table.add_row(
            f"  {ev['eval_type']}{error}",
            _num(f1),
            delta,
            _num(s.get("accuracy")),
            _num(s.get("macro_f1")),
            _num(s.get("rows_per_s"), ".1f"),
        )


def recommendation_lines(job: dict) -> list[str]:
    """The job's recommendation as one sentence (computed by the job service), then each
    tuned candidate's cascade: what share the student would answer on its route."""
    rec = job.get("recommendation")
    if not rec:
        return ["no recommendation: no candidate finished an evaluation"]
    lines = [f"[bold]recommended:[/bold] {rec['reason']}"]
    for nim in job.get("nims") or []:
        cascade = nim.get("cascade")
        if cascade:
            lines.append(f"cascade {short_name(nim['model_name'])}: {cascade_line(cascade)}")
    return lines


def cascade_line(cascade: dict) -> str:
    """A route's calibration in one line."""
    target = cascade.get("target_agreement")
    if cascade.get("threshold") is None:
        return f"no confidence keeps agreement ≥ {target} on val: the teacher answers all"
    return (
        f"student answers {cascade['coverage']:.0%} of eval at confidence ≥ "
        f"{cascade['threshold']:.3f} (agreement {cascade['agreement']:.3f}, target {target}); "
        f"teacher calls left {cascade['expected_cost_ratio']:.0%}"
    )


def deployments_table(deployments: list[dict]) -> Table:
    table = Table(title=f"{len(deployments)} deployment(s)")
    table.add_column("id", justify="right")
    table.add_column("route", no_wrap=True)
    for col in ("status", "student", "threshold", "requests", "student share"):
        table.add_column(col, overflow="fold")
    for d in deployments:
        share = d.get("student_share")
        table.add_row(
            str(d["id"]),
            d["model"],
            _status(d["status"]),
            short_name(d["model_name"]),
            _num(d.get("threshold")),
            str(d.get("requests", 0)),
            "—" if share is None else f"{share:.0%}",
        )
    return table


def stage_timings(job: dict) -> Table:
    """Wall-clock per stage of a job, from the timestamps and runtimes it recorded."""
    table = Table(title="wall-clock per stage")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    started = _when(job.get("started_at"))
    firsts = [_when(n.get("started_at")) for n in job.get("nims") or []]
    firsts = [t for t in firsts if t is not None]
    if started and firsts:
        table.add_row(
            "initialize + create_datasets", _secs((min(firsts) - started).total_seconds())
        )
    for nim in job.get("nims") or []:
        name = short_name(nim["model_name"])
        staged = 0.0
        for ev in nim.get("evaluations") or []:
            table.add_row(f"{name} {ev['eval_type']}", _secs(ev.get("runtime_seconds")))
            staged += ev.get("runtime_seconds") or 0.0
        for cust in nim.get("customizations") or []:
            table.add_row(f"{name} customization", _secs(cust.get("runtime_seconds")))
            staged += cust.get("runtime_seconds") or 0.0
        if nim.get("runtime_seconds") is not None:
            rest = max(0.0, nim["runtime_seconds"] - staged)
            table.add_row(f"{name} prepare + release", _secs(rest))
            table.add_row(f"[bold]{name} total[/bold]", _secs(nim["runtime_seconds"]))
    finished = _when(job.get("finished_at"))
    if started and finished:
        table.add_row("[bold]job total[/bold]", _secs((finished - started).total_seconds()))
    return table


def _when(stamp: str | None) -> datetime | None:
    return datetime.fromisoformat(stamp) if stamp else None


# -- the demo -----------------------------------------------------------------------------


def demo_settings(
    settings: Any,
    *,
    candidates: list[str] | None = None,
    epochs: int | None = None,
    eval_size: int | None = None,
) -> Any:
    """The demo's settings: embedded runner, with the command line's overrides applied."""
    from findistil.config import NimConfig

    settings.runner = "threads"
    if candidates:
        configured = {nim.model_name: nim for nim in settings.nims}
        settings.nims = [configured.get(c) or NimConfig(model_name=c) for c in candidates]
    if epochs is not None:
        settings.training_config.epochs = epochs
        for nim in settings.nims:  # per-candidate overrides would otherwise win
            nim.training_config = {**nim.training_config, "epochs": epochs}
    if eval_size is not None:
        settings.data_split_config.eval_size = eval_size
    return settings


def quiet_third_party_bars() -> None:
    """transformers / hub / gguf tqdm bars would interleave with our own rich bars on
    stderr and fill non-TTY logs with carriage-return frames: findistil reports long steps
    through its own progress."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # any other tqdm (the GGUF conversion's)
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def run_demo(
    settings: Any,
    *,
    records: int,
    out: Any,
    bars: Any,
    poll: float = 1.0,
) -> tuple[int, dict]:
    """Load the demo log, serve the API in-process, run one job over HTTP, print its results.

    ``out`` is a rich Console; ``bars`` a context manager factory yielding a ProgressFn (the
    CLI's ``progress_bars``). Returns (exit code: 0 when the job completed, the job detail).
    """
    from findistil import loaders, taxonomy
    from findistil.api.app import BackgroundServer, create_app
    from findistil.logstore import open_logstore

    quiet_third_party_bars()
    timings: list[tuple[str, float]] = []
    t0 = time.perf_counter()
    with open_logstore(settings) as store:
        report = loaders.load_demo(store, records=records, client_id="demo", replace=True)
    timings.append(("load demo log", time.perf_counter() - t0))
    out.print(
        f"loaded {report.loaded} demo records as {taxonomy.WORKLOAD_ID}/demo into {settings.db_url}"
    )
    t0 = time.perf_counter()
    with BackgroundServer(create_app(settings)) as server:
        timings.append(("start API + runner", time.perf_counter() - t0))
        admin = [t.token for t in settings.all_api_tokens() if t.scope == "admin"]
        client = ApiClient(server.url, token=admin[0].get_secret_value() if admin else None)
        try:
            created = client.create_job(taxonomy.WORKLOAD_ID, "demo")
            names = ", ".join(short_name(n.model_name) for n in settings.nims)
            out.print(
                f"job {created['id']} {created['status']} on {server.url} — candidates: {names}"
            )
            t0 = time.perf_counter()
            with bars() as report_progress:
                job = follow_job(client, created["id"], report_progress, interval=poll)
            timings.append(("job (all stages)", time.perf_counter() - t0))
        finally:
            client.close()
    out.print(results_table(job))
    for line in recommendation_lines(job):
        out.print(line)
    table = stage_timings(job)
    for name, seconds in timings:
        table.add_row(name, f"{seconds:.1f}s")
    out.print(table)
    if job["status"] != "completed":
        out.print(f"[red]job {job['id']} ended {job['status']}: {job.get('error') or ''}[/red]")
        return 1, job
    return 0, job


def split_override(text: str | None, eval_size: int | None = None) -> dict | None:
    """``--split-config`` JSON plus ``--eval-size``, as a job's ``data_split_config``."""
    import json

    override: dict[str, Any] = {}
    if text:
        try:
            override = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ApiError(f"--split-config is not valid JSON: {exc}") from None
        if not isinstance(override, dict):
            raise ApiError('--split-config must be a JSON object, e.g. {"eval_size": 20}')
    if eval_size is not None:
        override["eval_size"] = eval_size
    return override or None
