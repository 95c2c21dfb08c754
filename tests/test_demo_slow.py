"""``findistil demo --records 300`` end to end with the real packaged models (slow).

Runs the console script as a user would, on a fresh FINDISTIL_HOME (so it includes the
first-run weight conversion), then reads the finished job from the flywheel DB: the
LoRA-customized SmolLM2 must beat its own base eval.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from sqlalchemy import select

from findistil.config import SMOLLM2, load_settings
from findistil.flywheel import jobs as service
from findistil.flywheel.db import FlywheelDB, jobs


@pytest.mark.slow
def test_demo_customized_smollm2_beats_its_base(findistil_home):
    t0 = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "findistil.cli", "demo", "--records", "300"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "160"},
        timeout=1200,
    )
    print(result.stdout[-6000:])
    print(f"findistil demo --records 300: {time.monotonic() - t0:.0f}s")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "recommended:" in result.stdout and "customized-eval" in result.stdout

    db = FlywheelDB(load_settings().db_url)
    try:
        with db.begin() as conn:
            (job_id,) = conn.execute(select(jobs.c.id)).scalars().all()
        job = service.get_job(db, job_id)
    finally:
        db.dispose()
    assert job["status"] == "completed" and job["num_records"] == 300
    smol = next(n for n in job["nims"] if n["model_name"] == SMOLLM2)
    scores = {e["eval_type"]: e["scores"] for e in smol["evaluations"]}
    assert scores["customized-eval"]["f1_score"] > scores["base-eval"]["f1_score"]
    assert scores["customized-eval"]["macro_f1"] > scores["base-eval"]["macro_f1"]
