"""The dashboard in a real browser: Debian's Chromium driven by Selenium over ChromeDriver.

Two completed tiny-model jobs of one workload (120 and 180 records) are served by the real
API on a loopback port; every page is opened, its plots are checked against the API's own
numbers (read from the marks' data-* attributes), any browser console error fails the test,
and a PNG screenshot of each page lands in the test's tmp dir (the path is printed).
`.ci/run` installs chromium and chromium-driver; locally the test skips without them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from findistil.api import BackgroundServer, create_app
from findistil.config import load_settings
from findistil.flywheel import jobs as service
from findistil.flywheel.db import FlywheelDB
from findistil.flywheel.runner import run_job
from findistil.loaders import load_demo

FAST = {
    "data_split_config": {"eval_size": 13, "min_total_records": 20},
    "training_config": {"epochs": 2, "micro_batch_size": 8, "batch_size": 16, "seed": 0},
    "evaluation_config": {"max_new_tokens": 6, "batch_size": 13},
    "icl_config": {"max_examples": 1, "min_examples": 1},
}


def _browser_or_skip():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        driver = None
    if chromium and driver:
        return chromium, driver
    why = "Chromium + ChromeDriver + selenium are needed (apt-get install chromium chromium-driver)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why}; CI=true requires them")
    pytest.skip(why)


@pytest.fixture
def browser(tmp_path):
    chromium, driver_path = _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,3000"):
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def served_jobs(sqlite_url, demo_store, tiny_llama_dir, tiny_bert_dir):
    """Two completed jobs (120, then 180 records) and the API serving them."""
    nims = [
        {"model_name": str(tiny_llama_dir), "kind": "causal_lm"},
        {"model_name": str(tiny_bert_dir), "kind": "encoder"},
    ]
    settings = load_settings(database_url=sqlite_url, nims=nims, **FAST)
    db = FlywheelDB(sqlite_url)
    ids = []
    for records in (120, 180):  # demo_store holds the first 120
        if records > 120:
            load_demo(demo_store, records=records, replace=True)  # more traffic was logged
        job_id = service.create_job(db, demo_store, settings, "news_classifier", "demo")["id"]
        assert run_job(settings, job_id, db=db)["status"] == "completed"
        ids.append(job_id)
    with BackgroundServer(create_app(settings, start_runner=False)) as server:
        yield server.url, ids
    db.dispose()


def _open(driver, url: str, hash_: str, shots: Path, name: str):
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{url}/{hash_}")
    WebDriverWait(driver, 20).until(
        lambda d: d.execute_script("return document.getElementById('app').dataset.ready") == hash_
    )
    path = shots / f"{name}.png"
    driver.save_screenshot(str(path))
    print(f"\nscreenshot: {path}")


def _marks(driver, css: str) -> list[dict]:
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(e => "
        "Object.fromEntries([...e.attributes].map(a => [a.name, a.value])))",
        css,
    )


def _console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _final(nim: dict) -> dict:
    order = ["base-eval", "icl-eval", "customized-eval"]
    done = [e for e in nim["evaluations"] if e["status"] == "completed"]
    return max(done, key=lambda e: order.index(e["eval_type"]))


def test_every_page_draws_the_api_numbers(browser, served_jobs, tmp_path):
    url, (first, second) = served_jobs
    job = httpx.get(f"{url}/api/jobs/{second}").json()

    _open(browser, url, "#/", tmp_path, "jobs")
    rows = _marks(browser, "#jobs tbody tr")
    assert [r["data-job"] for r in rows] == [second, first]  # newest first
    assert browser.find_element("css selector", "#jobs tbody").text.count("completed") == 2

    _open(browser, url, f"#/jobs/{second}", tmp_path, "job")
    _check_scores(browser, job)
    _check_cost(browser, job)
    _check_per_class_and_confusion(browser, job)
    _check_loss_and_timeline(browser, job)
    _check_cascade(browser, job)
    rec = browser.find_element("css selector", "#recommendation").text
    assert rec.startswith(f"recommended: {Path(job['recommendation']['model_name']).name}")

    _open(browser, url, "#/workloads/news_classifier", tmp_path, "workload")
    curves = {m["data-series"]: m for m in _marks(browser, "svg[data-chart=learning-curve] path")}
    assert set(curves) == {Path(n["model_name"]).name for n in job["nims"]}
    points = _marks(browser, "svg[data-chart=learning-curve] circle.point")
    older = httpx.get(f"{url}/api/jobs/{first}").json()
    assert sorted({float(p["data-x"]) for p in points}) == sorted(
        {older["num_records"], job["num_records"]}
    )
    for detail in (older, job):
        for nim in detail["nims"]:
            name = Path(nim["model_name"]).name
            (mark,) = [
                p
                for p in points
                if p["data-label"] == name and float(p["data-x"]) == detail["num_records"]
            ]
            assert float(mark["data-y"]) == pytest.approx(_final(nim)["scores"]["macro_f1"])

    assert _console_errors(browser) == []


def _check_cascade(browser, job):
    """The risk-coverage chart draws each tuned student's curve from nims[].cascade."""
    points = _marks(browser, "svg[data-chart=cascade] circle.point")
    for nim in job["nims"]:
        name = Path(nim["model_name"]).name
        mine = [(float(p["data-x"]), float(p["data-y"])) for p in points if p["data-label"] == name]
        curve = nim["cascade"]["curve"]
        assert mine == [
            (pytest.approx(c["coverage"] * 100, abs=0.5), pytest.approx(c["agreement"]))
            for c in curve
        ]


def _check_scores(browser, job):
    bars = {
        m["data-label"]: float(m["data-value"])
        for m in _marks(browser, "svg[data-chart=scores] rect.bar")
    }
    expected = {
        f"{Path(n['model_name']).name}|{e['eval_type']}": e["scores"]["f1_score"]
        for n in job["nims"]
        for e in n["evaluations"]
    }
    assert bars == pytest.approx(expected)
    (ref,) = _marks(browser, "svg[data-chart=scores] line.reference")
    assert ref["data-reference"].startswith("teacher")


def _check_cost(browser, job):
    points = {m["data-label"]: m for m in _marks(browser, "svg[data-chart=cost] circle.point")}
    for nim in job["nims"]:
        mark = points[Path(nim["model_name"]).name]
        assert float(mark["data-x"]) == pytest.approx(nim["cost_per_1k_rows_s"])
        assert float(mark["data-y"]) == pytest.approx(_final(nim)["scores"]["macro_f1"])
        assert ("recommended" in mark["class"]) == nim["recommended"]
    assert _marks(browser, "svg[data-chart=cost] line.reference")  # the teacher


def _check_per_class_and_confusion(browser, job):
    for i, nim in enumerate(job["nims"]):
        ev = _final(nim)
        bars = _marks(browser, f"svg[data-chart=per-class-{i}] rect.bar")
        expected = {k: v["f1"] for k, v in ev["per_class"].items() if v["support"] > 0}
        assert {b["data-label"]: float(b["data-value"]) for b in bars} == pytest.approx(expected)
        cells = _marks(browser, f"svg[data-chart=confusion-{i}] rect.cell")
        confusion = ev["confusion"]
        assert len(cells) == len(confusion["labels"]) * len(confusion["columns"])
        assert sum(int(c["data-value"]) for c in cells) == sum(map(sum, confusion["matrix"]))
        assert sum(int(c["data-value"]) for c in cells) == job["datasets"][0]["num_records"]


def _check_loss_and_timeline(browser, job):
    lines = {m["data-series"]: m for m in _marks(browser, "svg[data-chart=loss] path.line")}
    for nim in job["nims"]:
        (custom,) = nim["customizations"]
        line = lines[Path(nim["model_name"]).name]
        assert (
            int(line["data-points"]) == custom["steps_completed"] == len(custom["metrics"]["steps"])
        )
    stages = _marks(browser, "svg[data-chart=timeline] rect.stage")
    assert len(stages) == sum(len(n["evaluations"]) + len(n["customizations"]) for n in job["nims"])
    for stage in stages:
        assert 0 <= float(stage["data-start"]) <= float(stage["data-end"])


def test_a_token_protected_api_asks_for_a_token(browser, tmp_path, monkeypatch):
    from selenium.webdriver.support.ui import WebDriverWait

    monkeypatch.setenv("FINDISTIL_API_READ_TOKEN", "dashboard-read-token-0123")
    settings = load_settings()
    with BackgroundServer(create_app(settings, start_runner=False)) as server:
        browser.get(server.url + "/")
        ready = "return document.getElementById('app').dataset.ready"
        WebDriverWait(browser, 20).until(lambda d: d.execute_script(ready) == "token")
        assert browser.find_element("id", "token-why").text == "this API needs a token"
        browser.find_element("id", "token").send_keys("wrong-token-0123456789")
        browser.find_element("css selector", "#token-form button").click()
        # the form is re-rendered after each answer: read its text in one script, never
        # through an element handle that the re-render can leave stale
        why = "return document.getElementById('token-why')?.textContent"
        WebDriverWait(browser, 20).until(
            lambda d: d.execute_script(why) == "that token was refused"
        )
        browser.find_element("id", "token").send_keys("dashboard-read-token-0123")
        browser.find_element("css selector", "#token-form button").click()
        WebDriverWait(browser, 20).until(lambda d: d.execute_script(ready) == "#/")
        assert browser.find_element("css selector", "p.empty").text.startswith("no jobs yet")
        # the only console errors are the two refused fetches
        assert all("401" in e for e in _console_errors(browser))
