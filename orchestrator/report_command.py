"""``encmm report``: the evidence one sweep gives, read back from MLflow only.

- One row per arm (a named arm of the sweep, or for a sweep without arms the remedy plus the KD
  setting / width when the sweep varies them): n finished trials, best and last-epoch val top-1 as mean
  and 95% Student-t interval over seeds (one trial: the value and "n=1"), parameters at inference,
  inference GFLOPs per image (the arm's best checkpoint, ``torch.utils.flop_counter.FlopCounterMode``
  with timm's fused attention switched off so q@k^T and attn@v are counted; a multiply-add is 2 FLOPs),
  and the mismatch metrics each trial logged (``diag/*``, mean over trials).
- The claims (parent tag ``encmm.claims``, else lift > none, widelast > none, widelast > uniformwide in
  each KD/width setting): Welch difference of best top-1, its 95% interval, p and a verdict
  (``orchestrator.evidence``).
- Mismatch metrics against best top-1 over finished trials: Spearman rho and p, and a scatter figure.
Throughput is not measured here (it belongs to bench/). Trials that failed or still run are named and
left out.
"""

from __future__ import annotations

import csv
import json
import math
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

from encmm.orchestrator import evidence, tracking
from encmm.orchestrator.outputs import check_out_folder
from encmm.orchestrator.sweep_results import summarize
from encmm.trainables.config import ConfigError, DataConfig, TeacherConfig

GROUP_KEYS = ("student.remedy", "kd.alpha", "kd.beta", "student.width")
LABEL_PREFIX = {"student.remedy": "", "kd.alpha": "α=", "kd.beta": "β=", "student.width": "width "}
MISMATCH_KEYS = ("diag/svd_rank_p99/0.99", "diag/pca_rank_p99/0.99", "diag/sep_ratio_90", "diag/feat_mse")
MISMATCH_TITLES = {
    "diag/svd_rank_p99/0.99": "per-image SVD rank p99 (99%)",
    "diag/pca_rank_p99/0.99": "shared PCA rank p99 (99%)",
    "diag/sep_ratio_90": "SEP d/D at 90%",
    "diag/feat_mse": "feature MSE to teacher",
}
REMEDY_ORDER = ("none", "lift", "widelast", "uniformwide")
ARM_ORDER = ("ce", "logit_kd", "feat_proj", "feat_pool", "lift", "widelast", "uniformwide", "feat_equal", "logit_equal")
DEFAULT_CLAIMS = (("lift", "none"), ("widelast", "none"), ("widelast", "uniformwide"))  # a > b
REMEDY_COLOURS = {
    "teacher": "black",
    "none": "tab:blue",
    "lift": "tab:orange",
    "widelast": "tab:green",
    "uniformwide": "tab:red",
}  # every figure; anything else is OTHER_COLOUR
OTHER_COLOUR = "tab:gray"
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
LINESTYLES = ("-", "--", ":", "-.")
CLAIM_COLUMNS = (
    "claim",
    "a",
    "b",
    "expect",
    "n_a",
    "n_b",
    "mean_a",
    "mean_b",
    "diff",
    "diff_ci_low",
    "diff_ci_high",
    "welch_df",
    "p",
    "verdict",
)  # claims.csv
SEP_IMAGES = 64  # the fixed val subset (first images) the SEP curves are recomputed on


@dataclass
class SweepRecord:
    uri: str
    name: str
    parent: object  # mlflow Run
    children: list
    rows: list[dict]  # one per child run (sweep_results.summarize)
    checkpoints: dict = field(default_factory=dict)  # run id -> local best.pt


@dataclass
class ReportResult:
    text: str
    rows: list[dict]
    out: Path
    files: list[Path]
    not_reported: list[dict]
    claims: list[dict] = field(default_factory=list)
    correlations: list[dict] = field(default_factory=list)


@dataclass
class Group:
    """The finished trials of one table row."""

    base: str  # the arm name; the remedy for a sweep without arms
    context: tuple[tuple[str, str], ...]  # (key, value) of the settings that vary (see group_trials)
    trials: list[dict]

    @property
    def label(self) -> str:
        return " ".join([self.base, *(f"{LABEL_PREFIX[k]}{v}" for k, v in self.context)])

    @property
    def remedy(self) -> str:
        return str(self.trials[0].get("student.remedy"))

    @property
    def alpha(self) -> str:
        return str(self.trials[0].get("kd.alpha"))

    @property
    def legend(self) -> str:
        """The label with kd.alpha always in it (figures)."""
        return self.legend_without("")

    def legend_without(self, key: str) -> str:
        """``legend`` less the setting ``key`` (the one a figure puts on its x axis)."""
        shown = [(k, v) for k, v in self.context if k != key]
        alpha = [] if any(k == "kd.alpha" for k, _ in shown) else [f"α={self.alpha}"]
        return " ".join([self.base, *alpha, *(f"{LABEL_PREFIX[k]}{v}" for k, v in shown)])


@dataclass(frozen=True)
class Claim:
    name: str
    a: str
    b: str
    expect: evidence.Expect


# --------------------------------------------------------------------------------------------- reading
def load_sweep(uri: str, name_or_id: str) -> SweepRecord:
    tracking.check_tracking(uri)
    parent = tracking.find_sweep_run(uri, name_or_id)
    children = tracking.list_child_runs(uri, parent.info.run_id)
    rows = summarize(uri, tracking.experiment_name(uri, parent.info.experiment_id), parent.info.run_id)[0]
    by_id = {r["run_id"]: r for r in rows}
    for child in children:  # children found by mlflow.parentRunId only: summarise them too
        if child.info.run_id not in by_id:
            rows.append(
                {
                    "trial": child.data.tags.get("encmm.trial_id", child.info.run_name),
                    "status": child.info.status,
                    "run_id": child.info.run_id,
                }
            )
    params = {c.info.run_id: c.data.params for c in children}
    for row in rows:
        row["seed"] = row.get("seed") or params.get(row["run_id"], {}).get("seed")
    name = parent.data.tags.get("encmm.sweep_name", parent.info.run_name)
    return SweepRecord(uri, name, parent, children, rows)


def read_claims(tags: dict, sweep: str) -> list[Claim] | None:
    """The claims of tag ``encmm.claims`` (JSON list of {name, a, b, expect}); None when the tag is absent."""
    text = tags.get("encmm.claims")
    if text is None:
        return None
    try:
        claims = [Claim(str(c["name"]), str(c["a"]), str(c["b"]), c["expect"]) for c in json.loads(text)]
        for claim in claims:
            if claim.expect not in ("greater", "less"):
                raise ValueError(f"claim {claim.name!r}: expect {claim.expect!r}")
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(
            f"sweep {sweep}: tag encmm.claims is not a JSON list of {{name, a, b, expect: greater|less}}: {exc}"
        ) from None
    return claims


def read_arm_order(tags: dict) -> list[str] | None:
    """The sweep's declared arm order (tag ``encmm.arms``, a JSON list of names), when the sweep wrote one."""
    try:
        order = json.loads(tags["encmm.arms"])
    except (KeyError, ValueError):
        return None
    return [str(name) for name in order] if isinstance(order, list) else None


def by_run(runs: list, run_id: str):
    return next(r for r in runs if r.info.run_id == run_id)


def parse_param(text: str):
    return None if text == "None" else yaml.safe_load(text)


def section_from_params(params: dict, section: str) -> dict:
    prefix = section + "."
    return {k.removeprefix(prefix): parse_param(v) for k, v in params.items() if k.startswith(prefix)}


def checkpoint_of(record: SweepRecord, run_id: str, folder: Path) -> Path:
    if run_id not in record.checkpoints:
        record.checkpoints[run_id] = tracking.fetch_best_checkpoint(
            record.uri, run_id, folder / run_id, f"run {run_id}"
        )
    return record.checkpoints[run_id]


# ------------------------------------------------------------------------------------------- measuring
def load_student(path: Path) -> torch.nn.Module:
    from encmm.trainables.teacher import load_checkpoint_file, model_from_checkpoint

    return model_from_checkpoint(load_checkpoint_file(path))[0].eval()


@contextmanager
def explicit_attention(model: torch.nn.Module):
    """Every module with timm's ``fused_attn`` switch set to False inside the block, restored after.

    ``F.scaled_dot_product_attention`` counts as 0 FLOPs under ``FlopCounterMode`` on the CPU; timm's
    unfused path computes the same attention as explicit ``q @ k^T`` and ``attn @ v`` matmuls, which count.
    """
    switches = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    try:
        for module, _ in switches:
            module.fused_attn = False
        yield model
    finally:
        for module, fused in switches:
            module.fused_attn = fused


@torch.no_grad()
def count_gflops(model: torch.nn.Module, image: torch.Tensor) -> float:
    """Inference GFLOPs of one ``[1, 3, H, W]`` forward, attention included (multiply-add = 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with explicit_attention(model), counter:
        model(image[:1])
    return counter.get_total_flops() / 1e9


def val_images(record: SweepRecord, params: dict) -> tuple[torch.Tensor, object]:
    """The first ``SEP_IMAGES`` val images of the trials' data config (from the child's flat params)."""
    from encmm.trainables.mismatch import val_subset

    try:
        data = DataConfig.model_validate(section_from_params(params, "data"))
    except Exception as exc:  # noqa: BLE001 - a sweep logged by another encmm version
        raise ConfigError(f"sweep {record.name}: cannot rebuild data config from the run params: {exc}") from None
    return val_subset(SimpleNamespace(data=data), SEP_IMAGES)


def teacher_model(record: SweepRecord, params: dict, data, folder: Path):
    from encmm.trainables.teacher import build_teacher

    cfg = TeacherConfig.model_validate(section_from_params(params, "teacher"))
    if cfg.source == "none":
        return None
    path = checkpoint_of(record, cfg.run_id, folder) if cfg.source == "run" else None
    return build_teacher(
        cfg,
        student_mean=data.mean,
        student_std=data.std,
        checkpoint_path=path,
        img_size=parse_param(params.get("data.img_size", "None")),
    )


def mean_sep_curve(model: torch.nn.Module, images: torch.Tensor) -> list[float]:
    """Mean SEP curve ``[D]`` of the distilled (last-layer) map over every token of ``images``."""
    from encmm.analysis.spectra import sep_curves
    from encmm.trainables.mismatch import distilled_features

    feats = distilled_features(model, images)
    return sep_curves(feats.reshape(-1, feats.shape[-1]))[0].tolist()


# ------------------------------------------------------------------------------------------- grouping
def _number(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _sort_key(text: str) -> tuple:
    value = _number(text)
    return (1, 0.0, text) if math.isnan(value) else (0, value, text)


def _varying(rows: list[dict], keys) -> list[str]:
    return [k for k in keys if len({str(r.get(k)) for r in rows}) > 1]


def group_trials(done: list[dict], declared: list[str] | None = None) -> list[Group]:
    """Finished trials -> table rows, ordered.

    With arms (``row["arm"]``): one group per arm, split further only by a setting that varies inside
    the arm. Without: one group per remedy, split by every setting of ``GROUP_KEYS`` the sweep varies.
    Order: ``declared`` (the sweep's arm order), else ``ARM_ORDER`` / ``REMEDY_ORDER``, then any other
    name alphabetically; inside a name by the varying settings, numerically.
    """
    with_arms = any(r.get("arm") is not None for r in done)
    bases: dict[str, list[dict]] = {}
    for row in done:
        bases.setdefault(str(row["arm"] if with_arms else row.get("student.remedy")), []).append(row)
    sweep_keys = _varying(done, GROUP_KEYS[1:])
    groups = []
    for base, rows in bases.items():
        keys = _varying(rows, GROUP_KEYS) if with_arms else sweep_keys
        split: dict[tuple, list[dict]] = {}
        for row in rows:
            split.setdefault(tuple((k, str(row.get(k))) for k in keys), []).append(row)
        groups += [Group(base, context, trials) for context, trials in split.items()]
    order = list(declared or (ARM_ORDER if with_arms else REMEDY_ORDER))
    rank = {name: i for i, name in enumerate(order)}
    return sorted(groups, key=lambda g: (rank.get(g.base, len(order)), g.base, [_sort_key(v) for _, v in g.context]))


def default_claims(groups: list[Group]) -> list[Claim]:
    """lift > none, widelast > none, widelast > uniformwide: the pairs whose two names both ran."""
    present = {g.base for g in groups}
    return [Claim(f"{a} > {b}", a, b, "greater") for a, b in DEFAULT_CLAIMS if a in present and b in present]


def _matching(groups: list[Group], base: str, context: tuple) -> Group | None:
    """The group of ``base`` in ``context``; an arm that varies nothing stands for every context."""
    mine = [g for g in groups if g.base == base]
    return next((g for g in mine if g.context == context), None) or next((g for g in mine if not g.context), None)


def _text(x: float | None, digits: int = 2, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def evaluate_claims(claims: list[Claim], groups: list[Group]) -> list[dict]:
    """One row per claim and setting it can be checked in (each context of its arms; () if none varies)."""
    rows = []
    for claim in claims:
        contexts = list(dict.fromkeys(g.context for g in groups if g.base in (claim.a, claim.b) and g.context))
        for context in contexts or [()]:
            ga, gb = _matching(groups, claim.a, context), _matching(groups, claim.b, context)
            top1 = [[t.get("best/val/acc1") for t in g.trials] if g else [] for g in (ga, gb)]
            d = evidence.welch_difference(*top1)
            where = " ".join(f"{LABEL_PREFIX[k]}{v}" for k, v in context if k != "student.remedy")
            rows.append(
                {
                    "claim": f"{claim.name} ({where})" if where else claim.name,
                    "a": ga.label if ga else claim.a,
                    "b": gb.label if gb else claim.b,
                    "expect": claim.expect,
                    "n_a": d.n_a,
                    "n_b": d.n_b,
                    "mean_a": evidence.estimate(top1[0]).mean,
                    "mean_b": evidence.estimate(top1[1]).mean,
                    "diff": d.diff,
                    "diff_ci_low": d.ci_low,
                    "diff_ci_high": d.ci_high,
                    "welch_df": d.df,
                    "p": d.p,
                    "verdict": evidence.claim_verdict(d, claim.expect),
                }
            )
    return rows


def mismatch_correlations(done: list[dict]) -> list[dict]:
    """Spearman rho (and p) of each diag metric against best val top-1, one point per finished trial."""
    rows = []
    for metric in MISMATCH_KEYS:
        c = evidence.spearman([t.get(metric) for t in done], [t.get("best/val/acc1") for t in done])
        rows.append({"metric": metric, "n": c.n, "spearman_rho": c.rho, "p": c.p})
    return rows


def table_row(group: Group, gflops: float | None) -> dict:
    trials = group.trials
    first = trials[0]
    row = {
        "arm": group.label,
        "remedy": group.remedy,
        "kd.alpha": first.get("kd.alpha"),
        "kd.beta": first.get("kd.beta"),
        "width": first.get("student.width"),
        "n": len(trials),
    }
    for name, key in (("top1_best", "best/val/acc1"), ("top1_last", "val/acc1")):
        e = evidence.estimate(t.get(key) for t in trials)
        row.update(
            {f"{name}_mean": e.mean, f"{name}_sd": e.sd, f"{name}_ci_low": e.ci_low, f"{name}_ci_high": e.ci_high}
        )
    row.update({"params_inference": first.get("params_inference"), "gflops": gflops})
    for metric in MISMATCH_KEYS:
        row[metric.removeprefix("diag/")] = evidence.estimate(t.get(metric) for t in trials).mean
    return row


# ------------------------------------------------------------------------------------------ formatting
def fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def fmt_gflops(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"  # 4 significant digits: 1.258 (DeiT-Tiny) or 0.0009594


def fmt_estimate(row: dict, name: str) -> str:
    """``mean [low, high]`` (95% CI); one trial: ``value (n=1)``, never a spread of 0."""
    mean, low, high = row[f"{name}_mean"], row[f"{name}_ci_low"], row[f"{name}_ci_high"]
    if mean is None:
        return "-"
    return f"{mean:.2f} (n=1)" if low is None else f"{mean:.2f} [{low:.2f}, {high:.2f}]"


def fmt_p(p: float | None) -> str:
    return "-" if p is None else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def p_phrase(p: float | None) -> str:
    return "-" if p is None else ("< 0.001" if p < 0.001 else f"= {p:.3f}")


def markdown_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def format_markdown(rows: list[dict], title: str) -> str:
    head = [
        "arm",
        "remedy",
        "kd.alpha",
        "kd.beta",
        "width",
        "n",
        "top-1 best (95% CI)",
        "top-1 last (95% CI)",
        "params (inf.)",
        "GFLOPs/img",
        "SVD rank p99",
        "PCA rank p99",
        "SEP d/D 90%",
        "feat MSE",
    ]
    cells = [
        [
            r["arm"],
            r["remedy"],
            str(r["kd.alpha"]),
            str(r["kd.beta"]),
            str(r["width"]),
            str(r["n"]),
            fmt_estimate(r, "top1_best"),
            fmt_estimate(r, "top1_last"),
            fmt(r["params_inference"]),
            fmt_gflops(r["gflops"]),
            fmt(r["svd_rank_p99/0.99"], 1),
            fmt(r["pca_rank_p99/0.99"], 1),
            fmt(r["sep_ratio_90"], 3),
            fmt(r["feat_mse"], 4),
        ]
        for r in rows
    ]
    return "\n".join([f"## {title}", "", *markdown_table(head, cells)]) + "\n"


def format_claims(claims: list[dict], source: str) -> str:
    cells = [
        [
            c["claim"],
            c["a"],
            c["b"],
            _text(c["diff"], sign=True)
            + (
                ""
                if c["diff_ci_low"] is None
                else f" [{_text(c['diff_ci_low'], sign=True)}, {_text(c['diff_ci_high'], sign=True)}]"
            ),
            fmt_p(c["p"]),
            c["verdict"],
        ]
        for c in claims
    ]
    lines = [f"### Claims ({source}): best top-1 difference a - b, Welch 95% CI and two-sided p", ""]
    head = ["claim", "a", "b", "diff [95% CI]", "p", "verdict"]
    lines += markdown_table(head, cells) if cells else ["no claim to check"]
    return "\n".join(lines) + "\n"


def format_correlations(correlations: list[dict]) -> str:
    cells = [[c["metric"], str(c["n"]), _text(c["spearman_rho"]), fmt_p(c["p"])] for c in correlations]
    return (
        "\n".join(
            [
                "### Mismatch metric vs best top-1 across finished trials (Spearman)",
                "",
                *markdown_table(["metric", "n", "Spearman ρ", "p"], cells),
            ]
        )
        + "\n"
    )


def write_csv(rows: list[dict], path: Path, columns: tuple[str, ...]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else list(columns))
        writer.writeheader()
        writer.writerows(rows)
    return path


# -------------------------------------------------------------------------------------------- plotting
def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _figure().close(fig)
    return path


def group_styles(groups: list[Group]) -> dict[str, dict]:
    """Per group label: colour by remedy (``REMEDY_COLOURS``); marker and line style by rank among the
    groups of the same remedy, so arms that share a remedy (or its alpha/width variants) stay apart."""
    seen: dict[str, int] = {}
    styles = {}
    for g in groups:
        k = seen[g.remedy] = seen.get(g.remedy, -1) + 1
        styles[g.label] = {
            "color": REMEDY_COLOURS.get(g.remedy, OTHER_COLOUR),
            "marker": MARKERS[k % len(MARKERS)],
            "linestyle": LINESTYLES[k % len(LINESTYLES)],
        }
    return styles


def _ci_error(row: dict) -> tuple[float, float]:
    if row["top1_best_ci_low"] is None:
        return 0.0, 0.0
    return row["top1_best_mean"] - row["top1_best_ci_low"], row["top1_best_ci_high"] - row["top1_best_mean"]


def plot_top1(groups: list[Group], table: list[dict], x_key: str, xlabel: str, path: Path, log_x: bool = False) -> Path:
    """Best val top-1 (mean, 95% CI bars) against ``x_key``; one line per arm across widths."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    styles = group_styles(groups)
    series: dict[tuple, list] = {}
    for g, row in zip(groups, table):
        rest = tuple(kv for kv in g.context if kv[0] != "student.width")
        series.setdefault((g.base, rest), []).append((g, row))
    for members in series.values():
        points = sorted(
            (_number(r[x_key]), r["top1_best_mean"], *_ci_error(r))
            for _, r in members
            if r["top1_best_mean"] is not None and r[x_key] is not None
        )
        if not points:
            continue
        g = members[0][0]
        xs, ys, lo, hi = zip(*points)
        ax.errorbar(xs, ys, yerr=[lo, hi], capsize=3, label=g.legend_without("student.width"), **styles[g.label])
    ax.set(xlabel=xlabel, ylabel="best val top-1 (%), mean and 95% CI")
    if log_x:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_mismatch(curves: dict[str, list[float]], ranks: dict[str, tuple], styles: dict[str, dict], path: Path) -> Path:
    """Left: last-layer SEP mean curves against j/D; right: SVD (solid) vs PCA (hatched) rank p99 bars."""
    plt = _figure()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, curve in curves.items():
        d = len(curve)
        style = styles.get(label, {"color": REMEDY_COLOURS["teacher"], "marker": "", "linestyle": "-"})
        left.plot([(j + 1) / d for j in range(d)], curve, label=f"{label} (D={d})", markevery=max(1, d // 8), **style)
    left.axhline(90, color="grey", lw=0.8, ls="--")
    left.set(
        xlabel="channel frequency j / D",
        ylabel="cumulative spectral energy (%)",
        title="last-layer SEP (mean over tokens)",
    )
    left.legend(fontsize=7)
    labels = list(ranks)
    colours = [styles.get(k, {}).get("color", REMEDY_COLOURS["teacher"]) for k in labels]
    xs = range(len(labels))
    right.bar(
        [x - 0.2 for x in xs],
        [ranks[k][0] or 0 for k in labels],
        0.4,
        color=colours,
        label="per-image SVD rank p99 (solid)",
    )
    right.bar(
        [x + 0.2 for x in xs],
        [ranks[k][1] or 0 for k in labels],
        0.4,
        color=colours,
        alpha=0.45,
        hatch="//",
        label="shared PCA rank p99 (hatched)",
    )
    right.set_xticks(list(xs), labels, rotation=25, ha="right", fontsize=7)
    right.set(ylabel="rank at 99% energy", title="SVD vs PCA rank (mismatch = PCA >> SVD)")
    right.legend(fontsize=8)
    return _save(fig, path)


def plot_curves(histories: dict[str, tuple[list[tuple[int, float]], dict]], path: Path) -> Path:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, (history, style) in histories.items():
        if history:
            steps, values = zip(*history)
            ax.plot(steps, values, label=label, markersize=4, **style)
    ax.set(xlabel="epoch", ylabel="val top-1 (%)", title="best trial per arm")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_mismatch_vs_top1(groups: list[Group], correlations: list[dict], path: Path) -> Path:
    """One panel per diag metric: metric vs best top-1, a point per finished trial; Spearman in the title."""
    plt = _figure()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    styles = group_styles(groups)
    for ax, corr in zip(axes.flat, correlations):
        metric = corr["metric"]
        for g in groups:
            points = [(t[metric], t["best/val/acc1"]) for t in g.trials if t.get(metric) is not None]
            if points:
                xs, ys = zip(*points)
                ax.scatter(
                    xs, ys, color=styles[g.label]["color"], marker=styles[g.label]["marker"], label=g.legend, alpha=0.8
                )
        stat = (
            f"Spearman ρ = {corr['spearman_rho']:.2f}, p {p_phrase(corr['p'])}"
            if corr["spearman_rho"] is not None
            else "Spearman ρ: too few or constant points"
        )
        ax.set(xlabel=metric, ylabel="best val top-1 (%)", title=f"{MISMATCH_TITLES[metric]}\n{stat} (n={corr['n']})")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    legend = {}  # one entry per arm, from whichever panel has its points
    for ax in axes.flat:
        legend.update({label: handle for handle, label in zip(*ax.get_legend_handles_labels())})
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=min(4, len(legend)), fontsize=8)
    fig.tight_layout(rect=(0, 0.1 if legend else 0, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ main
def describe_unreported(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """Trials left out of the table (not FINISHED, or FINISHED without final metrics), one line each."""
    left_out = [r for r in rows if r["status"] != "FINISHED" or r.get("best/val/acc1") is None]
    lines = []
    for r in left_out:
        state = {"RUNNING": "still running", "FINISHED": "finished but logged no final metrics"}.get(
            r["status"], r["status"].lower()
        )
        lines.append(f"trial {r['trial']} ({r['run_id'][:8]}) is {state}: not in the table")
    return left_out, lines


def best_trial(group: Group) -> dict:
    return max(group.trials, key=lambda t: t["best/val/acc1"])


def write_plots(
    record: SweepRecord,
    groups: list[Group],
    table: list[dict],
    correlations: list[dict],
    images: torch.Tensor,
    teacher,
    out: Path,
    work: Path,
) -> list[Path]:
    """The figures; SEP curves recomputed for the teacher and each arm's best trial."""
    styles = group_styles(groups)
    curves, ranks = {}, {}
    if teacher is not None:
        pm = record.parent.data.metrics
        curves["teacher"] = mean_sep_curve(teacher, images)
        ranks["teacher"] = (pm.get("teacher/svd_rank_p99/0.99"), pm.get("teacher/pca_rank_p99/0.99"))
    legend_styles = {}
    for g in groups:
        row = best_trial(g)
        curves[g.legend] = mean_sep_curve(load_student(checkpoint_of(record, row["run_id"], work)), images)
        ranks[g.legend] = (row.get("diag/svd_rank_p99/0.99"), row.get("diag/pca_rank_p99/0.99"))
        legend_styles[g.legend] = styles[g.label]
    histories = {
        f"{g.legend} ({best_trial(g)['trial']})": (
            tracking.metric_history(record.uri, best_trial(g)["run_id"], "val/acc1"),
            styles[g.label],
        )
        for g in groups
    }
    (out / "sep_curves.json").write_text(json.dumps(curves))
    plots = [plot_top1(groups, table, "params_inference", "parameters at inference", out / "top1_vs_params.png", True)]
    if len({str(r["width"]) for r in table}) > 1:
        plots.append(plot_top1(groups, table, "width", "student width", out / "top1_vs_width.png"))
    return plots + [
        plot_mismatch(curves, ranks, legend_styles, out / "mismatch_sep_rank.png"),
        plot_curves(histories, out / "training_curves.png"),
        plot_mismatch_vs_top1(groups, correlations, out / "mismatch_vs_top1.png"),
        out / "sep_curves.json",
    ]


def format_report(
    record: SweepRecord,
    table: list[dict],
    claims: list[dict],
    claim_source: str,
    correlations: list[dict],
    notes: list[str],
    any_done: bool,
) -> str:
    counts = {s: sum(r["status"] == s for r in record.rows) for s in ("FINISHED", "RUNNING", "FAILED", "KILLED")}
    title = (
        f"sweep {record.name} (parent run {record.parent.info.run_id}, {record.parent.info.status}): "
        f"{len(record.rows)} trials, " + ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n)
    )
    text = format_markdown(table, title)
    pm = record.parent.data.metrics
    if pm.get("teacher/svd_rank_p99/0.99") is not None:
        text += (
            f"\nteacher: SVD rank p99 {fmt(pm.get('teacher/svd_rank_p99/0.99'), 1)}, PCA rank p99 "
            f"{fmt(pm.get('teacher/pca_rank_p99/0.99'), 1)}, "
            f"SEP d/D 90% {fmt(pm.get('teacher/sep_ratio_90'), 3)}\n"
        )
    text += "\n" + format_claims(claims, claim_source) + "\n" + format_correlations(correlations)
    text += "".join(f"\n- {line}" for line in notes) + ("\n" if notes else "")
    return text if any_done else text + "\nno finished trial to report yet\n"


def build_report(record: SweepRecord, out: Path, work: Path) -> ReportResult:
    left_out, notes = describe_unreported(record.rows)
    done = [r for r in record.rows if r not in left_out]
    tags = record.parent.data.tags
    groups = group_trials(done, read_arm_order(tags))
    tagged = read_claims(tags, record.name)
    claims = evaluate_claims(default_claims(groups) if tagged is None else tagged, groups)
    correlations = mismatch_correlations(done)
    table, plots = [], []
    out.mkdir(parents=True, exist_ok=True)
    if done:
        params = by_run(record.children, done[0]["run_id"]).data.params
        images, data = val_images(record, params)
        for g in groups:
            student = load_student(checkpoint_of(record, best_trial(g)["run_id"], work))
            table.append(table_row(g, count_gflops(student, images)))
        teacher = teacher_model(record, params, data, work)
        plots = write_plots(record, groups, table, correlations, images, teacher, out, work)
    source = "default: lift / widelast > none, widelast > uniformwide" if tagged is None else "tag encmm.claims"
    text = format_report(record, table, claims, source, correlations, notes, bool(done))
    (out / "report.md").write_text(text)
    files = [
        write_csv(table, out / "report.csv", ("arm", *GROUP_KEYS)),
        write_csv(claims, out / "claims.csv", CLAIM_COLUMNS),
        write_csv(correlations, out / "mismatch_vs_top1.csv", ("metric", "n", "spearman_rho", "p")),
        out / "report.md",
        *plots,
    ]
    return ReportResult(text, table, out, files, left_out, claims, correlations)


def run_report(name_or_id: str, out: str | None, tracking_uri: str | None) -> ReportResult:
    """Read the sweep from MLflow, write table + plots to ``out``, log them to the parent run under ``report/``."""
    uri = tracking.resolve_tracking_uri(tracking_uri)
    record = load_sweep(uri, name_or_id)
    # the default folder is one plain name under ./reports, whatever the sweep's tag says ('/', '..' -> '_')
    folder = Path(out) if out else Path("reports") / tracking.safe_name(record.name)
    check_out_folder(folder)
    with tempfile.TemporaryDirectory(prefix="encmm-report-") as work:
        result = build_report(record, folder.resolve(), Path(work))
    tracking.log_artifacts(uri, record.parent.info.run_id, result.out, "report")
    return result
