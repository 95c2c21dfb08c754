"""The ``findistil`` command line: each command is a thin call into the library.

Library errors (``FindistilError``) become a one-line message and exit code 2 here, at the
boundary; progress events become rich progress bars.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress
from rich.table import Column

from findistil import console as console_mod
from findistil.config import Settings, load_settings
from findistil.errors import FindistilError
from findistil.progress import Progress, ProgressFn

app = typer.Typer(
    help="findistil: distil a big teacher LLM into small, cheap students.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config file (default ./findistil.yaml)")
]


def get_settings(config: Path | None = None) -> Settings:
    return load_settings(config)


@contextlib.contextmanager
def progress_bars(transient: bool = False) -> Iterator[ProgressFn]:
    """A ProgressFn that draws one rich bar per stage name.

    Stage names (model + stage) are never cut. The bar narrows with the terminal; below 110
    columns the row count and time-left columns go, so a row fits 80 columns; info wraps.
    """
    wide = err_console.width >= 110
    whole = Column(no_wrap=True)
    columns = [
        TextColumn("[bold]{task.description}", table_column=Column(no_wrap=True)),
        BarColumn(bar_width=max(10, min(40, err_console.width - 90)), table_column=whole),
        *([MofNCompleteColumn(table_column=whole)] if wide else []),
        TaskProgressColumn(table_column=whole),
        TimeElapsedColumn(table_column=whole),
        *([TimeRemainingColumn(table_column=whole)] if wide else []),
        TextColumn("{task.fields[info]}", table_column=Column(overflow="fold")),
    ]
    bars = RichProgress(*columns, console=err_console, transient=transient)
    tasks: dict[str, int] = {}

    def report(event: Progress) -> None:
        info = "  ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in event.info.items()
        )
        if event.stage not in tasks:
            tasks[event.stage] = bars.add_task(event.stage, total=event.total, info=info)
        bars.update(tasks[event.stage], completed=event.done, total=event.total, info=info)

    with bars:
        yield report


# --- data commands (logs load|list|curate) ---------------------------------------------
# ``findistil load`` and ``findistil curate`` stay as top-level aliases for one release.

logs_app = typer.Typer(
    help="Load, list and curate logged LLM calls (no subcommand: list).",
    invoke_without_command=True,
)
app.add_typer(logs_app, name="logs")
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]


@logs_app.command("load")
def load(
    file: Annotated[Path | None, typer.Argument(help="JSONL log/conversation file or CSV")] = None,
    workload_id: Annotated[str | None, typer.Option(help="set every record's workload")] = None,
    client_id: Annotated[str | None, typer.Option(help="set every record's client")] = None,
    replace: Annotated[bool, typer.Option(help="swap out the workload/client's records")] = False,
    demo: Annotated[bool, typer.Option(help="load the built-in demo headlines")] = False,
    records: Annotated[int | None, typer.Option(help="--demo: a stratified subset")] = None,
    redact_pii: Annotated[
        bool | None,
        typer.Option(
            "--redact-pii/--no-redact-pii",
            help="replace e-mails, phones, cards, IBANs, SSNs by placeholders [config redact_pii]",
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Load logged LLM calls into the log store (exit code 2 when lines were rejected)."""

    from findistil.loaders import load_demo, load_file
    from findistil.logstore import open_logstore

    if (file is None) == (not demo):
        raise typer.BadParameter("give a FILE or --demo (not both)")
    settings = get_settings(config)
    redact = settings.redact_pii if redact_pii is None else redact_pii
    with open_logstore(settings) as store, progress_bars() as progress:
        if demo:
            report = load_demo(
                store, records=records, client_id=client_id or "demo", replace=replace,
                progress=progress,
            )  # fmt: skip
        else:
            report = load_file(
                file, store, workload_id=workload_id, client_id=client_id, replace=replace,
                progress=progress, max_record_bytes=settings.max_record_bytes,
                redact_pii=redact,
            )  # fmt: skip
    _print_load_report(report, "lines", replace=replace, redact=redact and not demo)


def _print_load_report(report, unit: str, *, replace: bool = False, redact: bool = False):
    """The rejections (first 20), the records per workload/client and the counts; exit 2
    when anything was rejected."""
    from rich.table import Table

    for line in report.errors[:20]:
        err_console.print(f"[yellow]rejected[/yellow] {line}", markup=True, highlight=False)
    if report.rejected > len(report.errors[:20]):
        err_console.print(f"... {report.rejected - 20} more rejected")
    table = Table(title=f"load ({report.source_format or 'empty file'})")
    for col in ("workload_id", "client_id", "loaded"):
        table.add_column(col)
    for (w, c), n in report.targets.items():
        table.add_row(w, c, str(n))
    console.print(table)
    console.print(
        f"{unit} {report.lines}: loaded {report.loaded}, rejected {report.rejected}"
        + (f", blank {report.blank}" if report.blank else "")
        + (f", replaced {report.replaced} old records" if replace else "")
    )
    if redact:
        found = ", ".join(f"{k} {n}" for k, n in sorted(report.redacted.items())) or "none found"
        console.print(f"redacted: {found}")
    if report.rejected:
        raise typer.Exit(2)


@logs_app.command("import-es")
def import_es_command(
    url: Annotated[
        str | None, typer.Option(help="Elasticsearch URL [env ELASTICSEARCH_URL, localhost:9200]")
    ] = None,
    index: Annotated[
        str | None, typer.Option(help="index to read [env ES_COLLECTION_NAME, flywheel]")
    ] = None,
    workload_id: Annotated[str | None, typer.Option(help="only this workload")] = None,
    client_id: Annotated[str | None, typer.Option(help="only this client")] = None,
    page_size: Annotated[int, typer.Option(min=1, max=10_000, help="documents per page")] = 1000,
    redact_pii: Annotated[
        bool | None,
        typer.Option("--redact-pii/--no-redact-pii", help="[config redact_pii]"),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Copy upstream's Elasticsearch log index into the log store; a rerun resumes after
    the last page committed (exit code 2 when documents were rejected)."""
    from findistil.elastic import import_es, source_from_env
    from findistil.logstore import open_logstore

    settings = get_settings(config)
    redact = settings.redact_pii if redact_pii is None else redact_pii
    source = source_from_env(url, index, workload_id, client_id)
    with open_logstore(settings) as store, progress_bars() as progress:
        report = import_es(
            store, source, page_size=page_size, max_record_bytes=settings.max_record_bytes,
            redact_pii=redact, progress=progress,
        )  # fmt: skip
    _print_load_report(report, f"documents from {source.url}/{source.index}", redact=redact)


@logs_app.command("curate")
def curate(
    workload_id: Annotated[str, typer.Option(help="workload to curate")],
    client_id: Annotated[str, typer.Option(help="client to curate")],
    out: Annotated[Path | None, typer.Option(help="output folder")] = None,
    config: ConfigOption = None,
) -> None:
    """Curate a workload's records into eval/train/val dataset files."""
    from rich.table import Table

    from findistil.curate import curate_workload
    from findistil.logstore import open_logstore

    settings = get_settings(config)
    out = out or settings.datasets_dir / f"{workload_id}--{client_id}"
    with open_logstore(settings) as store, progress_bars(transient=True) as progress:
        data = curate_workload(
            store, workload_id, client_id, settings.data_split_config, out_dir=out,
            workload_type=settings.evaluation_config.workload_type, progress=progress,
        )  # fmt: skip
    table = Table(title=f"curated {workload_id}/{client_id} ({data.workload_type})")
    table.add_column("step")
    table.add_column("records", justify="right")
    for key, value in data.counts.items():
        table.add_row(key, str(value))
    console.print(table)
    for name, path in data.paths.items():
        console.print(f"{name:>8}: {path}")


@logs_app.callback()
def logs_main(ctx: typer.Context, config: ConfigOption = None, as_json: JsonOption = False):
    """Load, list and curate logged LLM calls; with no subcommand, list them."""
    if ctx.invoked_subcommand is None:
        logs_list(config, as_json)


@logs_app.command("list")
def logs_list(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """List the stored workloads with their record counts."""
    from rich.table import Table

    from findistil.logstore import open_logstore

    with open_logstore(get_settings(config)) as store:
        rows = store.workloads()
    if as_json:
        keys = ("workload_id", "client_id", "records")
        console.print_json(data={"workloads": [dict(zip(keys, r, strict=True)) for r in rows]})
        return
    table = Table(title="log store")
    for col in ("workload_id", "client_id", "records"):
        table.add_column(col, justify="right" if col == "records" else "left")
    for w, c, n in rows:
        table.add_row(w, c, str(n))
    console.print(table)
    if not rows:
        console.print("no records yet: load some with `findistil logs load FILE` or `--demo`")


app.command("load", deprecated=True, help="Alias of `findistil logs load` (for one release).")(load)
app.command("curate", deprecated=True, help="Alias of `findistil logs curate` (one release).")(
    curate
)


# --- models list ---------------------------------------------------------------------

models_app = typer.Typer(help="The student weights this machine has or can get.")
app.add_typer(models_app, name="models", no_args_is_help=True)


def _size(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.0f} MB"


@models_app.command("list")
def models_list(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Packaged and cached models: installed or not, size on disk, where, how to install."""
    from dataclasses import asdict

    from rich.table import Table

    from findistil.students.registry import model_inventory

    rows = model_inventory(get_settings(config))
    if as_json:
        console.print_json(data={"models": [asdict(r) for r in rows]})
        return
    table = Table(title="models")
    table.add_column("model", no_wrap=True)
    table.add_column("on this machine", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    for r in rows:
        table.add_row(r.model_id, _model_place(r), _size(r.size_bytes))
    console.print(table)
    for r in rows:
        if r.install:
            console.print(f"{r.model_id}: {r.install}", highlight=False, soft_wrap=True)


def _model_place(info) -> str:
    if info.cached:
        return "cache" + (" + wheel" if info.installed else "")
    if info.installed:
        return "wheel"
    return "wheel not installed"


# --- evaluation commands (report-teacher) -----------------------------------------------


@app.command("label")
def label(
    file: Annotated[Path, typer.Argument(help="CSV (headline column) or JSONL of texts")],
    teacher_url: Annotated[str, typer.Option(help="OpenAI-compatible base URL of the teacher")],
    model: Annotated[str, typer.Option(help="the teacher's model name")],
    api_key_env: Annotated[
        str | None, typer.Option(help="environment variable holding the teacher's API key")
    ] = None,
    workload_id: Annotated[str, typer.Option("--workload-id")] = "news_classifier",
    client_id: Annotated[str | None, typer.Option(help="default: the file's name")] = None,
    concurrency: Annotated[int, typer.Option(min=1, max=256, help="requests in flight")] = 8,
    max_retries: Annotated[int, typer.Option(min=0, help="per row, on 429/5xx/timeouts")] = 5,
    timeout: Annotated[float, typer.Option(help="seconds per request")] = 60.0,
    price_per_1k_tokens: Annotated[float, typer.Option(help="for the cost estimate")] = 0.0,
    config: ConfigOption = None,
) -> None:
    """Label raw texts with a teacher into the log store (resumable; exit 2 if rows failed)."""
    import asyncio
    import os

    from findistil.labelling import Teacher, label_texts, read_texts
    from findistil.logstore import open_logstore

    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise typer.BadParameter(f"${api_key_env} is not set", param_hint="--api-key-env")
    texts = read_texts(file)
    teacher = Teacher(teacher_url, model, api_key=api_key, timeout_s=timeout)
    with open_logstore(get_settings(config)) as store, progress_bars() as progress:
        report = asyncio.run(
            label_texts(
                texts, store, teacher, workload_id=workload_id,
                client_id=client_id or file.stem, concurrency=concurrency,
                max_retries=max_retries, progress=progress,
            )
        )  # fmt: skip
    for line in report.errors:
        err_console.print(f"[yellow]failed[/yellow] {line}", markup=True, highlight=False)
    for line in report.unparseable_rows:
        err_console.print(f"[yellow]unparseable[/yellow] {line}", markup=True, highlight=False)
    tokens = report.prompt_tokens + report.completion_tokens
    rate = report.labelled / report.seconds if report.seconds else 0.0
    console.print(
        f"rows {report.rows}: labelled {report.labelled}, already labelled {report.skipped}, "
        f"failed {report.failed}, unparseable {report.unparseable}; {rate:.1f} rows/s, "
        f"{report.retries} retries, {tokens:,} tokens, "
        f"est. cost {report.cost(price_per_1k_tokens):.4f}"
    )
    if report.failed:
        raise typer.Exit(2)


teacher_app = typer.Typer(help="The packaged local teacher (Qwen2.5-Coder-1.5B on xllamacpp).")
app.add_typer(teacher_app, name="teacher", no_args_is_help=True)


@teacher_app.command("serve")
def teacher_serve(
    port: Annotated[int, typer.Option(min=0, max=65535, help="0: a free port")] = 8090,
    parallel: Annotated[int, typer.Option(min=1, help="requests decoded together")] = 2,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads")] = None,
    grammar: Annotated[
        bool, typer.Option(help="hold answers to the label grammar ([[label]] of the 13)")
    ] = True,
    config: ConfigOption = None,
) -> None:
    """Serve the local teacher as an OpenAI-compatible endpoint on 127.0.0.1 (Ctrl-C stops)."""
    import time

    from findistil import taxonomy
    from findistil.local_teacher import TEACHER_MODEL, label_grammar, start_server

    rules = label_grammar([taxonomy.format_answer(x) for x in taxonomy.LABELS]) if grammar else None
    server = start_server(
        get_settings(config), port=port, parallel=parallel, threads=threads, grammar=rules
    )
    console.print(
        f"teacher {TEACHER_MODEL} at {server.listening_address}/v1 "
        f"({'label grammar' if grammar else 'free text'}); Ctrl-C stops it"
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.print("teacher stopped")


@app.command("report-teacher")
def report_teacher(
    gold: Annotated[Path, typer.Option("--gold", help="CSV: headline, human_label, *_label")],
    out: Annotated[
        Path | None, typer.Option("--out", help="folder for teacher_report.json and PNGs")
    ] = None,
) -> None:
    """Agreement of each labeller column with people (accuracy, macro-F1, per class)."""
    from rich.table import Table

    from findistil.report import teacher_report

    result = teacher_report(gold, out)
    labellers = result["labellers"]
    summary = Table(title=f"Labellers vs people ({result['rows']} headlines)")
    for column in ("labeller", "accuracy", "macro F1", "weighted F1", "unparseable"):
        summary.add_column(column, justify="left" if column == "labeller" else "right")
    for name, s in labellers.items():
        summary.add_row(
            name,
            f"{s['accuracy']:.3f}",
            f"{s['macro_f1']:.3f}",
            f"{s['weighted_f1']:.3f}",
            f"{s['unparseable_rate']:.3f}",
        )
    per_class = Table(title="F1 per class (support = people's count)")
    per_class.add_column("class")
    per_class.add_column("support", justify="right")
    for name in labellers:
        per_class.add_column(name, justify="right")
    first = next(iter(labellers.values()))
    for label, row in first["per_class"].items():
        f1s = [f"{s['per_class'][label]['f1']:.3f}" for s in labellers.values()]
        per_class.add_row(label, str(row["support"]), *f1s)
    console.print(summary)
    console.print(per_class)
    if out is not None:
        console.print(f"wrote {out / 'teacher_report.json'} and confusion PNGs")


# --- orchestrator commands (serve, jobs, demo) ------------------------------------------
# Bodies live in findistil.console (HTTP client, tables, demo) and findistil.api (the app).

jobs_app = typer.Typer(help="Create, list, follow, cancel and delete jobs (over the API).")
app.add_typer(jobs_app, name="jobs", no_args_is_help=True)
ApiUrlOption = Annotated[
    str,
    typer.Option("--api-url", envvar="FINDISTIL_API_URL", help="base URL of a running API"),
]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token", envvar="FINDISTIL_API_TOKEN", show_envvar=True, help="the API's bearer token"
    ),
]


@app.command()
def serve(
    config: ConfigOption = None,
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    runner: Annotated[
        str | None,
        typer.Option(help="threads: run jobs in this process; celery: only enqueue them"),
    ] = None,
) -> None:
    """Serve the jobs API (upstream's /api/jobs routes); run jobs here or on Celery workers."""
    import uvicorn

    from findistil.api import create_app
    from findistil.api.auth import check_bind

    settings = get_settings(config)
    if runner is not None:
        settings = _with(settings, runner=runner)
    _check_database(settings)
    check_bind(host, settings.all_api_tokens())
    console_mod.quiet_third_party_bars()
    uvicorn.run(create_app(settings), host=host, port=port)


@app.command()
def worker(
    config: ConfigOption = None,
    concurrency: Annotated[int, typer.Option(help="stages run at once (threads)")] = 1,
    queues: Annotated[
        str | None, typer.Option(help="comma-separated queues (default: task_queue)")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: auto)")] = None,
    torch_threads: Annotated[
        int | None, typer.Option(help="CPU threads per torch op (OMP_NUM_THREADS)")
    ] = None,
) -> None:
    """Run a Celery worker: take findistil's stages from the broker and run them here."""
    import os

    from findistil.flywheel.celery_runner import run_worker

    settings = get_settings(config)
    if device is not None:
        settings = _with(settings, device=device)
    if torch_threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(torch_threads)
    names = [q.strip() for q in (queues or "").split(",") if q.strip()] or None
    _check_database(settings)
    console_mod.quiet_third_party_bars()
    run_worker(settings, concurrency=concurrency, queues=names)


def _check_database(settings: Settings) -> None:
    """Fail before start-up, in one line, when the home or the SQLite file is not writable."""
    from findistil.database import make_engine

    make_engine(settings.db_url).dispose()


def _with(settings: Settings, **values) -> Settings:
    """``settings`` with ``values`` changed, validated (a bad value names its key)."""
    from pydantic import ValidationError

    from findistil.config import _describe
    from findistil.errors import ConfigError

    try:
        return Settings.model_validate({**settings.model_dump(), **values})
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


@jobs_app.command("create")
def jobs_create(
    client_id: Annotated[str, typer.Option("--client-id", help="whose records to use")],
    workload_id: Annotated[str, typer.Option("--workload-id")] = "news_classifier",
    eval_size: Annotated[int | None, typer.Option(help="override data_split_config")] = None,
    split: Annotated[
        str | None, typer.Option("--split-config", help="JSON, e.g. '{\"val_ratio\": 0.2}'")
    ] = None,
    api_url: ApiUrlOption = console_mod.DEFAULT_API_URL,
    token: TokenOption = None,
) -> None:
    """Queue a flywheel job over a workload/client's logged records."""
    created = console_mod.ApiClient(api_url, token=token).create_job(
        workload_id, client_id, console_mod.split_override(split, eval_size)
    )
    console.print(f"{created['id']} {created['status']}: {created['message']}")


@jobs_app.command("list")
def jobs_list(
    status: Annotated[str | None, typer.Option(help="only jobs in this status")] = None,
    workload_id: Annotated[str | None, typer.Option("--workload-id")] = None,
    limit: Annotated[int | None, typer.Option(help="at most this many")] = None,
    offset: Annotated[int, typer.Option(help="skip this many (newest first)")] = 0,
    api_url: ApiUrlOption = console_mod.DEFAULT_API_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """List jobs, newest first."""
    jobs = console_mod.ApiClient(api_url, token=token).list_jobs(
        status=status, workload_id=workload_id, limit=limit, offset=offset or None
    )
    if as_json:
        console.print_json(data={"jobs": jobs})
    else:
        console.print(console_mod.jobs_table(jobs))


@jobs_app.command("show")
def jobs_show(
    job_id: str,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="live bars until done")] = False,
    interval: Annotated[float, typer.Option(help="seconds between polls")] = 1.0,
    api_url: ApiUrlOption = console_mod.DEFAULT_API_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one job; --follow draws live bars until it ends (exit 1 unless it completed)."""
    client = console_mod.ApiClient(api_url, token=token)
    if follow:
        with progress_bars() as report:
            job = console_mod.follow_job(client, job_id, report, interval=interval)
    else:
        job = client.get_job(job_id)
    if as_json:
        console.print_json(data=job)
    else:
        console.print(console_mod.job_table(job))
        if job["status"] == "completed":
            console.print(console_mod.results_table(job))
            for line in console_mod.recommendation_lines(job):
                console.print(line)
    if follow and job["status"] != "completed":
        raise typer.Exit(1)


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: str, api_url: ApiUrlOption = console_mod.DEFAULT_API_URL, token: TokenOption = None
) -> None:
    """Ask a pending or running job to stop."""
    answer = console_mod.ApiClient(api_url, token=token).cancel_job(job_id)
    console.print(f"{answer['id']}: {answer['message']}")


@jobs_app.command("delete")
def jobs_delete(
    job_id: str, api_url: ApiUrlOption = console_mod.DEFAULT_API_URL, token: TokenOption = None
) -> None:
    """Delete a finished job and its datasets, adapters and predictions."""
    answer = console_mod.ApiClient(api_url, token=token).delete_job(job_id)
    console.print(f"{answer['id']}: {answer['message']}")


@app.command("deploy")
def deploy_command(
    job_id: Annotated[str | None, typer.Argument(help="a completed job")] = None,
    candidate: Annotated[
        str | None, typer.Option(help="model_name to deploy (default: the recommended one)")
    ] = None,
    teacher_url: Annotated[str | None, typer.Option(help="the teacher's base URL")] = None,
    teacher_model: Annotated[str | None, typer.Option(help="the teacher's model")] = None,
    api_key_env: Annotated[str | None, typer.Option(help="env var with its API key")] = None,
    threshold: Annotated[
        float | None, typer.Option(help="override the calibrated confidence threshold")
    ] = None,
    rollback: Annotated[
        str | None, typer.Option(help="WORKLOAD_ID: bring back its previous deployment")
    ] = None,
    api_url: ApiUrlOption = console_mod.DEFAULT_API_URL,
    token: TokenOption = None,
) -> None:
    """Put a job's tuned student behind findistil/route-<workload> (teacher as fallback)."""
    client = console_mod.ApiClient(api_url, token=token)
    if rollback:
        done = client.rollback(rollback)
        console.print(f"{done['model']}: deployment {done['id']} ({done['model_name']}) again")
        return
    if not job_id:
        raise console_mod.ApiError("give a JOB_ID to deploy, or --rollback WORKLOAD_ID")
    teacher = {"base_url": teacher_url, "model": teacher_model, "api_key_env": api_key_env}
    teacher = {k: v for k, v in teacher.items() if v is not None} or None
    done = client.deploy(job_id, candidate=candidate, teacher=teacher, threshold=threshold)
    console.print(f"{done['model']}: deployment {done['id']} serves {done['customized_model']}")
    console.print(console_mod.cascade_line(done["cascade"]))


@app.command("deployments")
def deployments_command(
    workload_id: Annotated[str | None, typer.Option("--workload-id")] = None,
    api_url: ApiUrlOption = console_mod.DEFAULT_API_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """List deployments (newest first) with what their routes answered."""
    found = console_mod.ApiClient(api_url, token=token).list_deployments(workload_id)
    if as_json:
        console.print_json(data={"deployments": found})
    else:
        console.print(console_mod.deployments_table(found))


@app.command()
def demo(
    config: ConfigOption = None,
    records: Annotated[int, typer.Option(help="demo records to load")] = 600,
    candidates: Annotated[
        list[str] | None,
        typer.Option("--candidates", help="model ids (repeat or comma-separate); default: nims"),
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="training epochs of every candidate")] = None,
    eval_size: Annotated[int | None, typer.Option(help="records held out for evaluation")] = 100,
) -> None:
    """Run the whole flywheel on the built-in demo log, in-process, and print the results."""
    names = [c.strip() for item in candidates or [] for c in item.split(",") if c.strip()]
    settings = console_mod.demo_settings(
        get_settings(config), candidates=names, epochs=epochs, eval_size=eval_size
    )
    code, _ = console_mod.run_demo(settings, records=records, out=console, bars=progress_bars)
    raise typer.Exit(code)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except FindistilError as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise SystemExit(exc.exit_code) from None
    except Exception as exc:
        from sqlalchemy.exc import OperationalError

        if not isinstance(exc, OperationalError):
            raise
        err_console.print(
            f"[red]error:[/red] the database refused ({exc.orig}): check that database_url "
            "(or FINDISTIL_HOME) is reachable and writable",
            highlight=False,
        )
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
