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
    """A ProgressFn that draws one rich bar per stage name."""
    bars = RichProgress(
        TextColumn("[bold]{task.description:<18}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=err_console,
        transient=transient,
    )
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


# --- data commands (load, curate) -------------------------------------------------------

# --- evaluation commands (report-teacher) -----------------------------------------------


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


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except FindistilError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise SystemExit(exc.exit_code) from None


if __name__ == "__main__":
    main()
