"""`encmm report` and `encmm ui` on one tiny real sweep (local Ray cluster, SQLite MLflow store)."""
from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator import tracking
from orchestrator.cli import app
from test_sweep import TINY_BASE, write_yaml

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SCREENSHOT_COPY = Path("/tmp/encmm-browser-screenshot.png")
PLOTS = {"top1_vs_params.png", "top1_vs_width.png", "mismatch_sep_rank.png", "training_curves.png"}


@pytest.fixture(scope="module")
def tiny_sweep(ray_cluster, tmp_path_factory):
    """Teacher + two students (remedy none / lift), 1 epoch each, built once by the real sweep code."""
    from orchestrator import sweep_command as sc

    folder = tmp_path_factory.mktemp("report-sweep")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    old_cwd = Path.cwd()
    os.chdir(folder)
    try:
        write_yaml(folder / "teacher.yaml", {**TINY_BASE, "name": "tiny-teacher",
                                             "student": {**TINY_BASE["student"], "width": 64}})
        sweep_file = write_yaml(folder / "sweep.yaml", {
            "name": "tiny", "teacher_training": "teacher.yaml", "mismatch_images": 40,
            "base": {**TINY_BASE, "kd": {"beta": 1.0, "alpha": 0.5}},
            "search": {"grid": {"student.remedy": ["none", "lift"]}}})
        setup = sc.prepare_sweep(str(sweep_file), [], uri)
        plan = sc.start_sweep(setup, None)
        rows, _ = sc.run_sweep(plan, resume=False, address=None)
    finally:
        os.chdir(old_cwd)
    assert [r["status"] for r in rows] == ["FINISHED", "FINISHED"]
    return {"uri": uri, "name": plan["name"], "parent": plan["parent_run_id"], "folder": folder,
            "experiment": plan["experiment"]}


def invoke_report(target: str, uri: str, out: Path):
    return CliRunner().invoke(app, ["report", target, "--out", str(out), "--tracking-uri", uri])


def read_table(out: Path) -> list[dict]:
    with (out / "report.csv").open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.ray
def test_report_by_name_writes_table_and_plots_and_logs_them_to_the_parent_run(tiny_sweep, tmp_path):
    out = tmp_path / "by-name"
    result = invoke_report(tiny_sweep["name"], tiny_sweep["uri"], out)
    assert result.exit_code == 0, result.output
    table = read_table(out)
    assert sorted(r["remedy"] for r in table) == ["lift", "none"]
    for row in table:
        assert row["kd.alpha"] == "0.5" and row["width"] == "32" and row["seeds"] == "1"
        assert 0 <= float(row["top1_best_mean"]) <= 100 and float(row["top1_best_std"]) == 0.0
        assert float(row["gflops"]) > 0 and float(row["img_per_s"]) > 0 and int(row["params_inference"]) > 0
        assert float(row["svd_rank_p99/0.99"]) >= 1 and row["feat_mse"]
    lift, plain = sorted(table, key=lambda r: r["remedy"])
    assert int(lift["params_inference"]) > int(plain["params_inference"])  # the projector stays at inference
    assert "| lift | 0.5 | 1.0 | 32 |" in result.output and "not in the table" not in result.output
    assert PLOTS | {"report.csv", "report.md"} <= {p.name for p in out.iterdir()}
    logged = tracking.list_artifact_paths(tiny_sweep["uri"], tiny_sweep["parent"], "report")
    assert {f"report/{name}" for name in PLOTS | {"report.csv", "report.md"}} <= set(logged)


@pytest.mark.ray
def test_report_by_parent_run_id_gives_the_same_rows(tiny_sweep, tmp_path):
    result = invoke_report(tiny_sweep["parent"], tiny_sweep["uri"], tmp_path / "by-id")
    assert result.exit_code == 0, result.output
    assert tiny_sweep["name"] in result.output
    assert sorted(r["remedy"] for r in read_table(tmp_path / "by-id")) == ["lift", "none"]


def test_report_of_an_unknown_sweep_exits_2_with_one_line(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.ensure_experiment(uri, "encmm")
    result = invoke_report("no-such-sweep", uri, tmp_path / "out")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"encmm: error: no sweep named 'no-such-sweep' (and no sweep run with that id) in {uri}"]
    assert not (tmp_path / "out").exists()


@pytest.mark.ray
def test_report_names_failed_and_running_trials_and_reports_the_rest(tiny_sweep, tmp_path):
    uri, parent = tiny_sweep["uri"], tiny_sweep["parent"]
    extra = {}
    for trial, status in (("trial_failed", "FAILED"), ("trial_running", "RUNNING")):
        run_id = tracking.start_run(uri, tiny_sweep["experiment"], trial, parent_run_id=parent,
                                    params={"student.remedy": "widelast", "student.width": 32, "kd.alpha": 0.5},
                                    tags={"encmm.kind": "trial", "encmm.parent_run_id": parent,
                                          "encmm.trial_id": trial})
        if status == "FAILED":
            tracking.end_run(uri, run_id, "FAILED", error="RuntimeError: boom")
        extra[trial] = run_id
    try:
        result = invoke_report(tiny_sweep["name"], uri, tmp_path / "partial")
    finally:
        for run_id in extra.values():  # keep the shared sweep as the other tests expect it
            tracking._client(uri).delete_run(run_id)
    assert result.exit_code == 0, result.output
    assert f"trial trial_failed ({extra['trial_failed'][:8]}) is failed: not in the table" in result.output
    assert f"trial trial_running ({extra['trial_running'][:8]}) is still running: not in the table" in result.output
    assert "4 trials, 2 finished, 1 running, 1 failed" in result.output
    assert sorted(r["remedy"] for r in read_table(tmp_path / "partial")) == ["lift", "none"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ui(uri: str, sweep: str, port: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "ui", "--port", str(port), "--sweep", sweep],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                            start_new_session=True)
    deadline = time.time() + 150
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise AssertionError(f"encmm ui exited with {proc.returncode}")
        if "/#/experiments/" in line:
            return proc, line.strip()
    raise AssertionError("encmm ui printed no experiment URL")


def chrome(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={profile}", "--window-size=2400,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def wait_for_text(driver, texts: list[str], timeout: float = 60) -> str:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout, poll_frequency=0.5).until(
        lambda d: all(t in d.find_element("tag name", "body").text for t in texts))
    return driver.find_element("tag name", "body").text


def show_children_and_columns(driver, columns: list[str]) -> None:
    """What a person clicks: the parent row's expander, then the columns picker (MLflow 3.x runs table)."""
    from selenium.webdriver.common.keys import Keys

    for button in driver.find_elements("css selector", "[aria-label='Close'][data-component-id*='assistant']"):
        button.click()
    for button in driver.find_elements("css selector", "button[data-component-id*='runnamecellrenderer']"):
        button.click()
    driver.find_elements("css selector", "button[data-testid='column-selection-dropdown']")[0].click()
    for column in columns:
        wait_for_text(driver, [column], timeout=20)
        driver.find_element("xpath", f"//*[@role='dialog']//*[normalize-space(text())='{column}']").click()
    driver.find_element("tag name", "body").send_keys(Keys.ESCAPE)


@pytest.mark.ray
@pytest.mark.browser
@pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                    reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver)")
def test_ui_shows_child_runs_with_params_and_compares_two_of_them(tiny_sweep, tmp_path):
    uri, parent = tiny_sweep["uri"], tiny_sweep["parent"]
    children = tracking.list_child_runs(uri, parent)
    proc, url = start_ui(uri, tiny_sweep["name"], free_port())
    driver = None
    try:
        assert url.startswith("http://127.0.0.1:")
        experiment_id = url.split("/#/experiments/")[1].split("/")[0]
        driver = chrome(tmp_path / "chrome-profile")
        driver.get(url)
        # the parent sweep run, expanded: its child trials listed, with the flat params as columns
        names = [c.info.run_name for c in children]
        wait_for_text(driver, [tiny_sweep["name"]], timeout=90)
        show_children_and_columns(driver, ["student.remedy", "student.width", "kd.alpha", "val/acc1"])
        body = wait_for_text(driver, names + ["student.remedy", "student.width", "kd.alpha"], timeout=30)
        driver.save_screenshot(str(tmp_path / "encmm-ui-runs.png"))
        ids = sorted(c.info.run_id for c in children)
        base = url.split("/#/")[0]
        driver.get(f"{base}/#/compare-runs?runs={str(ids).replace(chr(39), chr(34))}"
                   f"&experiments=[\"{experiment_id}\"]")
        body = wait_for_text(driver, ["val/acc1"], timeout=90)
        assert "student.remedy" in body and all(n in body for n in names)
        cells = driver.find_elements("xpath", "//*[text()[contains(., 'val/acc1')]]")
        assert cells, "no element shows val/acc1"
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", cells[-1])  # the metrics table
        shot = tmp_path / "encmm-ui-compare.png"
        assert driver.save_screenshot(str(shot))
        shutil.copy(shot, SCREENSHOT_COPY)
    finally:
        if driver is not None:
            driver.quit()
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends: encmm ui stops its server
        assert proc.wait(30) == 0
