"""An upstream-style client against findistil's API: the notebook's monitor loop, unchanged.

Upstream's tutorial notebook starts a job with ``requests.post(f"{API}/api/jobs", json=...)``,
then polls ``GET /api/jobs/{id}`` and builds its progress tables from
``job["nims"][i]["evaluations"][j]["scores"]["f1_score"]`` and
``job["nims"][i]["customizations"][k]["epochs_completed"]`` until the status leaves
running/pending. The code below reads the job the same way (our own words, same field
accesses); if a field were renamed or reshaped it would raise a KeyError/TypeError here.
"""

from __future__ import annotations

import time

import httpx


def start_job(api: str, workload_id: str, client_id: str, split: dict) -> str:
    response = httpx.post(
        f"{api}/api/jobs",
        json={"workload_id": workload_id, "client_id": client_id, "data_split_config": split},
    )
    response.raise_for_status()
    return response.json()["id"]


def job_tables(job: dict) -> tuple[list[dict], list[dict]]:
    """The notebook's two tables: evaluations and customizations, one row per model stage."""
    evals, customs = [], []
    for nim in job["nims"]:
        for ev in nim["evaluations"]:
            evals.append(
                {
                    "Model": nim["model_name"],
                    "Eval Type": ev["eval_type"].upper(),
                    "Percent Done": ev["progress"],
                    "Runtime": ev["runtime_seconds"],
                    "Status": "Completed" if ev["finished_at"] else "Running",
                    "Started": ev["started_at"],
                    "Finished": ev["finished_at"],
                    "Score": ev["scores"]["f1_score"] if ev["scores"] else None,
                }
            )
        for custom in nim["customizations"]:
            customs.append(
                {
                    "Model": nim["model_name"],
                    "Started": custom["started_at"],
                    "Epochs Completed": custom["epochs_completed"],
                    "Steps Completed": custom["steps_completed"],
                    "Finished": custom["finished_at"],
                    "Status": "Completed" if custom["finished_at"] else "Running",
                    "Runtime": custom["runtime_seconds"],
                    "Percent Done": custom["progress"],
                }
            )
    return evals, customs


def monitor_job(api: str, job_id: str, poll_s: float = 0.3, timeout_s: float = 300) -> tuple:
    """Poll until the job is neither running nor pending; keep every snapshot of the tables."""
    snapshots = []
    deadline = time.monotonic() + timeout_s
    while True:
        response = httpx.get(f"{api}/api/jobs/{job_id}")
        response.raise_for_status()
        job = response.json()
        snapshots.append((job["status"], *job_tables(job)))
        if job["status"] not in ("running", "pending"):
            return job, snapshots
        assert time.monotonic() < deadline, f"job still {job['status']} after {timeout_s}s"
        time.sleep(poll_s)


def test_upstream_monitor_reads_a_job_to_the_end(server):
    api = server.url
    split = {"eval_size": 10, "val_ratio": 0.1, "min_total_records": 20, "random_seed": 42}
    job_id = start_job(api, "news_classifier", "demo", split)
    listed = httpx.get(f"{api}/api/jobs").json()["jobs"]
    assert [j["id"] for j in listed] == [job_id]

    job, snapshots = monitor_job(api, job_id)
    assert job["status"] == "completed", job["error"]
    _, evals, customs = snapshots[-1]

    # the notebook's direct reads
    llm, encoder = job["nims"]
    assert isinstance(llm["evaluations"][0]["scores"]["f1_score"], float)
    assert llm["customizations"][0]["epochs_completed"] == 1
    assert encoder["customizations"][0]["epochs_completed"] == 1
    assert {(r["Model"], r["Eval Type"]) for r in evals} == {
        (llm["model_name"], "BASE-EVAL"),
        (llm["model_name"], "ICL-EVAL"),
        (llm["model_name"], "CUSTOMIZED-EVAL"),
        (encoder["model_name"], "CUSTOMIZED-EVAL"),
    }
    assert all(r["Status"] == "Completed" and r["Percent Done"] == 100 for r in evals + customs)
    assert all(0.0 <= r["Score"] <= 1.0 for r in evals)
    assert all(r["Runtime"] > 0 for r in evals + customs)
    # the monitor saw the job move: it started before the job ended
    assert snapshots[0][0] in ("pending", "running") and len(snapshots) >= 2

    # upstream's cancel/delete answers, read the way the notebook prints them
    cancel = httpx.post(f"{api}/api/jobs/{job_id}/cancel")
    assert cancel.status_code == 400 and "already finished" in cancel.json()["detail"]
    delete = httpx.delete(f"{api}/api/jobs/{job_id}")
    assert delete.status_code == 200 and delete.json()["id"] == job_id
