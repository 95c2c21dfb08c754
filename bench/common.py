"""What every benchmark's result carries (date, commit, machine, wall time, the command) and
where it goes (``bench/results/<name>-<date>.json``): the result is printed as the last
stdout line, one JSON object."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def finish(result: dict, name: str, started: float, argv: list[str] | None) -> Path:
    """Stamp ``result``, write it under ``bench/results`` and print it as one JSON line."""
    sha = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    result |= {
        "date": dt.date.today().isoformat(),
        "git_sha": sha,
        "machine": f"{os.cpu_count()} CPU cores, no GPU",
        "total_wall_s": time.perf_counter() - started,
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
    }
    out = REPO / "bench" / "results" / f"{name}-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return out
