"""The report's matplotlib figures (Agg backend, PNG): top-1 against parameters / width, SEP curves and
SVD-vs-PCA ranks, training curves, mismatch metrics against top-1; one colour per remedy throughout.

Drawn from the groups and rows of ``report_tables`` and from curves / histories the command hands in;
nothing here reads MLflow or loads a model.
"""

from __future__ import annotations

from pathlib import Path

from encmm.orchestrator.report_tables import Group, as_number, p_phrase

MISMATCH_TITLES = {
    "diag/svd_rank_p99/0.99": "per-image SVD rank p99 (99%)",
    "diag/pca_rank_p99/0.99": "shared PCA rank p99 (99%)",
    "diag/sep_ratio_90": "SEP d/D at 90%",
    "diag/feat_mse": "feature MSE to teacher",
}
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
            (as_number(r[x_key]), r["top1_best_mean"], *_ci_error(r))
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


def write_figures(
    groups: list[Group],
    table: list[dict],
    correlations: list[dict],
    curves: dict[str, list[float]],
    ranks: dict[str, tuple],
    styles: dict[str, dict],
    histories: dict[str, tuple[list[tuple[int, float]], dict]],
    out: Path,
) -> list[Path]:
    """Every figure into ``out``; ``curves`` / ``ranks`` / ``styles`` keyed by legend, ``histories`` by line label."""
    plots = [plot_top1(groups, table, "params_inference", "parameters at inference", out / "top1_vs_params.png", True)]
    if len({str(r["width"]) for r in table}) > 1:
        plots.append(plot_top1(groups, table, "width", "student width", out / "top1_vs_width.png"))
    return plots + [
        plot_mismatch(curves, ranks, styles, out / "mismatch_sep_rank.png"),
        plot_curves(histories, out / "training_curves.png"),
        plot_mismatch_vs_top1(groups, correlations, out / "mismatch_vs_top1.png"),
    ]
