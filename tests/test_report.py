"""`encmm report` and `encmm ui` on one tiny real sweep (local Ray cluster, SQLite MLflow store); the
report's grouping, claims and FLOP counting on rows and models built here."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from scipy import stats
from typer.testing import CliRunner

from encmm.orchestrator import report_figures as rf
from encmm.orchestrator import report_models as rm
from encmm.orchestrator import report_tables as rt
from encmm.orchestrator import tracking
from encmm.orchestrator.cli import app
from encmm.trainables.config import ConfigError
from tests.conftest import free_port

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SCREENSHOT_COPY = Path("/tmp/encmm-browser-screenshot.png")
PLOTS = {"top1_vs_params.png", "mismatch_sep_rank.png", "training_curves.png", "mismatch_vs_top1.png"}
TABLES = {"report.csv", "report.md", "claims.csv", "mismatch_vs_top1.csv"}


@pytest.fixture(scope="module")
def tiny_sweep(digits_script_sweep):
    """The embedded digits sweep cut to arms none / lift, one epoch each, with its teacher: run once per
    session by a user's script through the API (tests/digits_script.py), shared with test_api."""
    done = digits_script_sweep["process"]
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    result = json.loads((digits_script_sweep["folder"] / "result.json").read_text())
    assert [r["status"] for r in result["rows"]] == ["FINISHED", "FINISHED"]
    return {
        "uri": digits_script_sweep["uri"],
        "name": result["name"],
        "parent": result["parent_run_id"],
        "folder": digits_script_sweep["folder"],
        "experiment": "encmm",
    }


def invoke_report(target: str, uri: str, out: Path):
    return CliRunner().invoke(app, ["report", target, "--out", str(out), "--tracking-uri", uri])


def read_table(out: Path, name: str = "report.csv") -> list[dict]:
    with (out / name).open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.ray
def test_report_by_name_writes_table_claims_and_plots_and_logs_them_to_the_parent_run(tiny_sweep, tmp_path):
    out = tmp_path / "by-name"
    result = invoke_report(tiny_sweep["name"], tiny_sweep["uri"], out)
    assert result.exit_code == 0, result.output
    table = read_table(out)
    assert [r["arm"] for r in table] == ["none", "lift"]  # REMEDY_ORDER, not alphabetical
    assert "img_per_s" not in table[0]
    for row in table:
        assert row["kd.alpha"] == "0.9" and row["width"] == "32" and row["n"] == "1"  # digits-student.yaml
        assert 0 <= float(row["top1_best_mean"]) <= 100
        assert row["top1_best_sd"] == row["top1_best_ci_low"] == row["top1_best_ci_high"] == ""  # n=1: no spread
        assert float(row["gflops"]) > 0 and int(row["params_inference"]) > 0
        assert float(row["svd_rank_p99/0.99"]) >= 1 and row["feat_mse"]
    plain, lift = table
    assert int(lift["params_inference"]) > int(plain["params_inference"])  # the projector stays at inference
    assert float(lift["gflops"]) > float(plain["gflops"])
    assert f"| none | none | 0.9 | 1.0 | 32 | 1 | {float(plain['top1_best_mean']):.2f} (n=1) |" in result.output
    assert "± " not in result.output and "not in the table" not in result.output
    # the claim the sweep declares (lift > none), one seed a side: a difference, no test
    claims = read_table(out, "claims.csv")
    assert [(c["claim"], c["a"], c["b"], c["n_a"], c["n_b"], c["p"], c["verdict"]) for c in claims] == [
        ("Lift improves feature KD", "lift", "none", "1", "1", "", "inconclusive (n=1/1)")
    ]
    diff = float(lift["top1_best_mean"]) - float(plain["top1_best_mean"])
    assert float(claims[0]["diff"]) == pytest.approx(diff, abs=1e-6)
    assert f"| Lift improves feature KD | lift | none | {diff:+.2f} | - | inconclusive (n=1/1) |" in result.output
    # mismatch vs accuracy: two trials are too few for a rank correlation, and the report says so
    correlations = read_table(out, "mismatch_vs_top1.csv")
    assert [c["metric"] for c in correlations] == list(rt.MISMATCH_KEYS)
    assert all(c["n"] == "2" and c["spearman_rho"] == "" for c in correlations)
    assert "| diag/feat_mse | 2 | - | - |" in result.output
    names = {p.name for p in out.iterdir()}
    assert PLOTS | TABLES <= names and "top1_vs_width.png" not in names  # one width: no width plot
    logged = tracking.list_artifact_paths(tiny_sweep["uri"], tiny_sweep["parent"], "report")
    assert {f"report/{name}" for name in PLOTS | TABLES} <= set(logged)


@pytest.mark.ray
def test_report_by_parent_run_id_gives_the_same_rows(tiny_sweep, tmp_path):
    result = invoke_report(tiny_sweep["parent"], tiny_sweep["uri"], tmp_path / "by-id")
    assert result.exit_code == 0, result.output
    assert tiny_sweep["name"] in result.output
    assert [r["remedy"] for r in read_table(tmp_path / "by-id")] == ["none", "lift"]


def test_report_of_an_unknown_sweep_exits_2_with_one_line(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.ensure_experiment(uri, "encmm")
    result = invoke_report("no-such-sweep", uri, tmp_path / "out")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"encmm: error: no sweep named 'no-such-sweep' (and no sweep run with that id) in {uri}"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.ray
def test_report_names_failed_and_running_trials_and_reports_the_rest(tiny_sweep, tmp_path):
    uri, parent = tiny_sweep["uri"], tiny_sweep["parent"]
    extra = {}
    for trial, status in (("trial_failed", "FAILED"), ("trial_running", "RUNNING")):
        run_id = tracking.start_run(
            uri,
            tiny_sweep["experiment"],
            trial,
            parent_run_id=parent,
            params={"student.remedy": "widelast", "student.width": 32, "kd.alpha": 0.5},
            tags={"encmm.kind": "trial", "encmm.parent_run_id": parent, "encmm.trial_id": trial},
        )
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
    assert [r["remedy"] for r in read_table(tmp_path / "partial")] == ["none", "lift"]
    assert [c["claim"] for c in read_table(tmp_path / "partial", "claims.csv")] == ["Lift improves feature KD"]


# ------------------------------------------------------------------ grouping, claims, FLOPs (no sweep)
def trial(arm, remedy, top1, *, seed=0, alpha=0.9, width=32, **metrics) -> dict:
    """A finished trial as ``sweep_command.summarize`` returns it (params as MLflow strings)."""
    return {
        "trial": f"{arm or remedy}_{alpha}_{width}_{seed}",
        "status": "FINISHED",
        "run_id": f"r{seed}{top1}",
        "arm": arm,
        "student.remedy": remedy,
        "student.width": str(width),
        "kd.alpha": str(alpha),
        "kd.beta": "0.2",
        "seed": str(seed),
        "best/val/acc1": top1,
        "val/acc1": top1 - 0.5,
        "params_inference": 5_000_000,
        **metrics,
    }


CLAIMS_ARMS = {
    "ce": ("none", [60.1, 60.5, 59.8]),
    "logit_kd": ("none", [70.0, 70.4, 69.7]),
    "feat_proj": ("none", [69.6, 70.3, 69.9]),
    "feat_pool": ("none", [69.0, 69.4, 68.9]),
    "lift": ("lift", [72.0, 72.6, 71.8]),
    "widelast": ("widelast", [73.1, 73.5, 72.8]),
    "uniformwide": ("uniformwide", [71.0, 71.3, 70.6]),
    "feat_equal": ("none", [74.0, 74.2, 73.9]),
}


def claims_sweep_rows() -> list[dict]:
    rows = [
        trial(
            arm, remedy, top1, seed=seed, alpha=0.0 if arm == "ce" else 0.9, width=384 if arm == "feat_equal" else 192
        )
        for arm, (remedy, tops) in CLAIMS_ARMS.items()
        for seed, top1 in enumerate(tops)
    ]
    rows.append(trial("logit_equal", "none", 75.0, width=384))  # one seed only
    return rows[::-1]  # the order rows arrive in must not matter


def test_arms_are_rows_in_the_claims_sweep_order_with_student_t_intervals():
    groups = rt.group_trials(claims_sweep_rows())
    assert [g.label for g in groups] == list(rt.ARM_ORDER)  # no alpha/width suffix: the arm fixes them
    table = [rt.table_row(g, None) for g in groups]
    lift = table[rt.ARM_ORDER.index("lift")]
    tops = CLAIMS_ARMS["lift"][1]
    low, high = stats.t.interval(0.95, 2, loc=sum(tops) / 3, scale=stats.sem(tops))
    assert (lift["n"], lift["remedy"], lift["kd.alpha"]) == (3, "lift", "0.9")
    assert lift["top1_best_ci_low"] == pytest.approx(low) and lift["top1_best_ci_high"] == pytest.approx(high)
    text = rt.format_markdown(table, "claims")
    assert f"| lift | lift | 0.9 | 0.2 | 192 | 3 | {sum(tops) / 3:.2f} [{low:.2f}, {high:.2f}] |" in text
    assert "| logit_equal | none | 0.9 | 0.2 | 384 | 1 | 75.00 (n=1) | 74.50 (n=1) |" in text
    assert "± 0.00" not in text


def test_a_declared_arm_order_wins_and_unknown_arms_come_last():
    rows = [trial("zeta", "none", 1.0), trial("lift", "lift", 2.0), trial("alpha_arm", "none", 3.0)]
    assert [g.base for g in rt.group_trials(rows)] == ["lift", "alpha_arm", "zeta"]
    assert [g.base for g in rt.group_trials(rows, ["zeta", "lift"])] == ["zeta", "lift", "alpha_arm"]
    assert rt.read_arm_order({"encmm.arms": json.dumps(["zeta", "lift"])}) == ["zeta", "lift"]
    assert rt.read_arm_order({}) is None


def test_tagged_claims_get_welch_differences_and_verdicts():
    tags = {
        "encmm.claims": json.dumps(
            [
                {"name": "logit KD beats CE", "a": "logit_kd", "b": "ce", "expect": "greater"},
                {"name": "uniform width is no remedy", "a": "uniformwide", "b": "widelast", "expect": "greater"},
                {"name": "projector vs pooling", "a": "feat_proj", "b": "logit_kd", "expect": "less"},
                {"name": "equal width feature vs logit", "a": "feat_equal", "b": "logit_equal", "expect": "less"},
                {"name": "lift vs an arm that never ran", "a": "lift", "b": "no_such_arm", "expect": "greater"},
            ]
        )
    }
    claims = rt.evaluate_claims(rt.read_claims(tags, "s"), rt.group_trials(claims_sweep_rows()))
    by_name = {c["claim"]: c for c in claims}
    assert len(claims) == 5
    kd = by_name["logit KD beats CE"]
    ref = stats.ttest_ind(CLAIMS_ARMS["logit_kd"][1], CLAIMS_ARMS["ce"][1], equal_var=False)
    assert kd["p"] == pytest.approx(ref.pvalue) and kd["welch_df"] == pytest.approx(ref.df)
    assert kd["diff_ci_low"] == pytest.approx(ref.confidence_interval().low)
    assert (kd["n_a"], kd["n_b"], kd["verdict"]) == (3, 3, "supported")
    assert by_name["uniform width is no remedy"]["verdict"] == "contradicted"
    assert by_name["projector vs pooling"]["verdict"] == "inconclusive at n=3/3"
    assert by_name["equal width feature vs logit"]["verdict"] == "inconclusive (n=3/1)"
    assert by_name["equal width feature vs logit"]["p"] is None
    missing = by_name["lift vs an arm that never ran"]
    assert (missing["n_b"], missing["diff"], missing["verdict"]) == (0, None, "inconclusive (n=3/0)")
    text = rt.format_claims(claims, "tag encmm.claims")
    assert f"| logit KD beats CE | logit_kd | ce | {kd['diff']:+.2f} [{kd['diff_ci_low']:+.2f}, " in text
    assert "| equal width feature vs logit | feat_equal | logit_equal | -0.97 | - | inconclusive (n=3/1) |" in text


@pytest.mark.parametrize(
    "tag",
    [
        "not json",
        json.dumps([{"name": "x", "a": "lift"}]),
        json.dumps([{"name": "x", "a": "lift", "b": "none", "expect": "bigger"}]),
    ],
)
def test_a_malformed_claims_tag_is_a_config_error_naming_the_tag(tag):
    with pytest.raises(ConfigError, match="tag encmm.claims"):
        rt.read_claims({"encmm.claims": tag}, "s")
    assert rt.read_claims({}, "s") is None


def test_a_sweep_without_arms_is_labelled_by_remedy_and_alpha_and_claims_are_made_per_alpha():
    rows = [
        trial(None, remedy, top1 + seed / 10 + (5 if alpha else 0), seed=seed, alpha=alpha)
        for remedy, top1 in (("widelast", 73.0), ("lift", 72.0), ("none", 70.0), ("uniformwide", 71.0))
        for alpha in (0.0, 0.9)
        for seed in range(3)
    ]
    groups = rt.group_trials(rows)
    assert [g.label for g in groups] == [f"{r} α={a}" for r in rt.REMEDY_ORDER for a in ("0.0", "0.9")]
    claims = rt.evaluate_claims(rt.default_claims(groups), groups)
    assert [(c["claim"], c["a"], c["b"], c["verdict"]) for c in claims] == [
        ("lift > none (α=0.0)", "lift α=0.0", "none α=0.0", "supported"),
        ("lift > none (α=0.9)", "lift α=0.9", "none α=0.9", "supported"),
        ("widelast > none (α=0.0)", "widelast α=0.0", "none α=0.0", "supported"),
        ("widelast > none (α=0.9)", "widelast α=0.9", "none α=0.9", "supported"),
        ("widelast > uniformwide (α=0.0)", "widelast α=0.0", "uniformwide α=0.0", "supported"),
        ("widelast > uniformwide (α=0.9)", "widelast α=0.9", "uniformwide α=0.9", "supported"),
    ]
    assert all(c["diff"] == pytest.approx(3.0 if "none" in c["b"] and "widelast" in c["a"] else 2.0) for c in claims)


def test_a_sweep_without_arms_adds_the_width_only_when_it_varies_and_claims_need_their_remedies():
    rows = [
        trial(None, remedy, 70.0 + width / 100, width=width) for remedy in ("widelast", "none") for width in (64, 16)
    ]
    groups = rt.group_trials(rows)
    assert [g.label for g in groups] == ["none width 16", "none width 64", "widelast width 16", "widelast width 64"]
    assert [g.legend_without("student.width") for g in groups] == ["none α=0.9"] * 2 + ["widelast α=0.9"] * 2
    assert [c.name for c in rt.default_claims(groups)] == ["widelast > none"]  # no lift, no uniformwide
    claims = rt.evaluate_claims(rt.default_claims(groups), groups)
    assert [c["claim"] for c in claims] == ["widelast > none (width 16)", "widelast > none (width 64)"]
    assert [g.label for g in rt.group_trials(rows[:1])] == ["widelast"]


def test_every_figure_gets_one_colour_per_remedy_and_alpha_in_its_labels():
    groups = rt.group_trials(claims_sweep_rows())
    styles = rf.group_styles(groups)
    for g in groups:
        assert styles[g.label]["color"] == rf.REMEDY_COLOURS[g.remedy]
        assert f"α={g.alpha}" in g.legend
    same_remedy = [styles[g.label]["marker"] + styles[g.label]["linestyle"] for g in groups if g.remedy == "none"]
    assert len(set(same_remedy)) == len(same_remedy)  # arms sharing a colour still differ


def test_mismatch_correlations_are_spearman_over_finished_trials(tmp_path):
    rows = [
        trial("lift", "lift", top1, seed=i, **{"diag/svd_rank_p99/0.99": rank, "diag/feat_mse": 0.5})
        for i, (top1, rank) in enumerate([(70.0, 12), (71.0, 15), (72.5, 14), (73.0, 20)])
    ]
    rows[1]["diag/feat_mse"] = None
    by_metric = {c["metric"]: c for c in rt.mismatch_correlations(rows)}
    ref = stats.spearmanr([12, 15, 14, 20], [70.0, 71.0, 72.5, 73.0])
    svd = by_metric["diag/svd_rank_p99/0.99"]
    assert (svd["n"], svd["spearman_rho"], svd["p"]) == (4, pytest.approx(ref.statistic), pytest.approx(ref.pvalue))
    assert by_metric["diag/feat_mse"]["n"] == 3 and by_metric["diag/feat_mse"]["spearman_rho"] is None  # constant
    assert by_metric["diag/pca_rank_p99/0.99"]["n"] == 0
    path = rf.plot_mismatch_vs_top1(rt.group_trials(rows), list(by_metric.values()), tmp_path / "scatter.png")
    assert path.stat().st_size > 10_000


def vit_flops_closed_form(img: int, patch: int, dim: int, depth: int, classes: int, mlp_ratio: float = 4.0) -> int:
    """FLOPs of a timm ViT forward on one image, multiply-add = 2: patch-embed conv, per block qkv,
    q @ k^T, attn @ v (N^2 * dim each, over all heads), proj, fc1, fc2; the head on the CLS token."""
    patches = (img // patch) ** 2
    tokens, hidden = patches + 1, int(dim * mlp_ratio)
    embed = patches * (3 * patch * patch) * dim
    block = tokens * dim * 3 * dim + 2 * tokens * tokens * dim + tokens * dim * dim + 2 * tokens * dim * hidden
    return 2 * (embed + depth * block + dim * classes)


def test_gflops_count_attention_matmuls_and_match_the_closed_form():
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=32,
        num_heads=2,
        num_classes=10,
    ).eval()
    for block in model.blocks:
        block.attn.fused_attn = True  # what the report's students run with
    image = torch.randn(1, 3, 32, 32)
    expected = vit_flops_closed_form(img=32, patch=8, dim=32, depth=2, classes=10)
    assert rm.count_gflops(model, image) * 1e9 == pytest.approx(expected, rel=0.01)
    assert all(block.attn.fused_attn for block in model.blocks)  # fusion switched back on afterwards
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(image)  # fused, uncorrected: the attention matmuls are missing
    attention = 2 * 2 * 2 * 17 * 17 * 32
    assert counter.get_total_flops() == pytest.approx(expected - attention, rel=1e-6)


def test_explicit_attention_restores_each_switch_even_when_the_forward_raises():
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=32,
        num_heads=2,
        num_classes=10,
    )
    model.blocks[0].attn.fused_attn, model.blocks[1].attn.fused_attn = True, False
    with pytest.raises(RuntimeError), rm.explicit_attention(model):
        assert not any(block.attn.fused_attn for block in model.blocks)
        raise RuntimeError("boom")
    assert [block.attn.fused_attn for block in model.blocks] == [True, False]


def start_ui(uri: str, sweep: str, port: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.Popen(
        [sys.executable, "-m", "encmm.orchestrator.cli", "ui", "--port", str(port), "--sweep", sweep],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,
    )
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
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--window-size=2400,1000",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def wait_for_text(driver, texts: list[str], timeout: float = 60) -> str:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout, poll_frequency=0.5).until(
        lambda d: all(t in d.find_element("tag name", "body").text for t in texts)
    )
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
@pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver)",
)
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
        driver.get(f'{base}/#/compare-runs?runs={str(ids).replace(chr(39), chr(34))}&experiments=["{experiment_id}"]')
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
