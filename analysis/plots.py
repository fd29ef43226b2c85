"""PNG figures of `encmm diagnose`, after the paper's (matplotlib, Agg backend, no display).

Every function takes the per-layer results of `analysis.spectra.diagnose_layer` (a list in layer
order, with "index" added) and, for the last-layer histograms, the per-image arrays of
`analysis.ray_tasks.per_image_arrays`; each writes one PNG and returns its path. The comparison of several
models (`plot_sep_overlay`, `plot_rank_vs_depth`) takes one curve or series per model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

DPI = 120


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _band_key(thresholds: Sequence[float]) -> str:
    """The rank curve shows d_0.99 when asked for, else the largest threshold."""
    from encmm.analysis.spectra import threshold_key

    return threshold_key(0.99 if 0.99 in thresholds else max(thresholds))


def plot_rank_by_layer(layers: list[dict], thresholds: Sequence[float], path: Path) -> Path:
    """Layer-wise d_p (p = 0.99): mean over images with +-std and IQR bands, per-image SVD vs shared PCA."""
    key = _band_key(thresholds)
    x = [layer["index"] for layer in layers]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for kind, label, color in (("svd_rank", "per-image SVD", "tab:blue"), ("pca_rank", "shared PCA", "tab:orange")):
        stats = [layer[kind][key] for layer in layers]
        mean = np.array([s["mean"] for s in stats])
        std = np.array([s["std"] for s in stats])
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
        ax.fill_between(x, [s["q25"] for s in stats], [s["q75"] for s in stats], color=color, alpha=0.3, linewidth=0)
        ax.plot(x, mean, "o-", color=color, label=f"{label} (mean, ±std, IQR)", markersize=3)
    ax.set(xlabel="layer", ylabel=f"d at {float(key):.0%} energy", title=f"Rank needed for {float(key):.0%} energy")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_rank_histograms(arrays: dict, thresholds: Sequence[float], index: int, path: Path) -> Path:
    """Per-image SVD rank vs per-image rank in the shared PCA basis, one panel per threshold."""
    fig, axes = plt.subplots(1, len(thresholds), figsize=(3.2 * len(thresholds), 3.0), squeeze=False)
    for col, (p, ax) in enumerate(zip(thresholds, axes[0])):
        svd, pca = arrays["svd_rank"][:, col], arrays["pca_rank"][:, col]
        bins = np.histogram_bin_edges(np.concatenate([svd, pca]), bins=30)
        ax.hist(svd, bins=bins, alpha=0.6, label="per-image SVD")
        ax.hist(pca, bins=bins, alpha=0.6, label="shared PCA")
        ax.set(title=f"{p:.0%} energy", xlabel="d", ylabel="images" if col == 0 else None)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Layer {index}: per-image rank, own basis vs shared basis", fontsize=10)
    return _save(fig, path)


def plot_pca_energy(layers: list[dict], path: Path) -> Path:
    """Left: cumulative eigen-spectrum of the shared basis per layer. Right: last layer's captured
    energy vs d, median / 10th / 1st percentile over images, with the global spectrum for reference."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.8))
    colors = plt.cm.viridis(np.linspace(0, 1, len(layers)))
    for layer, color in zip(layers, colors):
        spectrum = np.asarray(layer["pca_spectrum"])
        left.plot(np.arange(1, spectrum.size + 1), spectrum, color=color, linewidth=1)
    left.set(xlabel="d", ylabel="cumulative eigen-energy", title="Shared PCA spectrum (dark: first layer)")
    last = layers[-1]
    d = np.arange(1, len(last["pca_spectrum"]) + 1)
    right.plot(d, last["pca_spectrum"], "k--", linewidth=1, label="global spectrum")
    for name, style in (("median", "-"), ("p10", "-."), ("p1", ":")):
        right.plot(d, last["energy_percentiles"][name], style, label=f"per image, {name}")
    right.set(xlabel="d", ylabel="energy captured", title=f"Layer {last['index']}: energy in the top-d PCA basis")
    right.legend(fontsize=8)
    return _save(fig, path)


def plot_sep(layers: list[dict], path: Path) -> Path:
    """Token SEP curves (channel index j/D on x): each layer's mean, the last layer's +-std band, diagonal."""
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    colors = plt.cm.viridis(np.linspace(0, 1, len(layers)))
    for layer, color in zip(layers, colors):
        mean = np.asarray(layer["sep"]["mean"])
        ax.plot((np.arange(mean.size) + 1) / mean.size, mean, color=color, linewidth=1)
    last = layers[-1]
    mean, std = np.asarray(last["sep"]["mean"]), np.asarray(last["sep"]["std"])
    x = (np.arange(mean.size) + 1) / mean.size
    ax.fill_between(
        x,
        np.clip(mean - std, 0, 100),
        np.clip(mean + std, 0, 100),
        color="tab:red",
        alpha=0.2,
        label=f"layer {last['index']} ±std",
    )
    _finish_sep_axes(ax, "Token Spectral Energy Pattern", legend_size=8)
    return _save(fig, path)


def _finish_sep_axes(ax, title: str, legend_size: int) -> None:
    """The diagonal of a white spectrum, the axes of a SEP curve (normalised frequency index, cumulative %)."""
    ax.plot([0, 1], [0, 100], "k--", linewidth=1, label="diagonal (white spectrum)")
    ax.set(xlabel="frequency index (j+1)/D", ylabel="cumulative energy (%)", xlim=(0, 1), ylim=(0, 100), title=title)
    ax.legend(fontsize=legend_size)


def plot_sep_permutation(layers: list[dict], path: Path) -> Path | None:
    """SEP bandwidth d/D at each threshold, natural channel order vs random orders (mean, 95% bootstrap
    interval), last layer, in the permutation block's statistic (per-image or pooled). None when no
    permutations were run."""
    last = layers[-1]
    permutation = last["sep"].get("permutation")
    if not permutation:
        return None
    keys = list(last["sep"]["bandwidth"])
    t = np.array([float(k) for k in keys])
    stats = [permutation["bandwidth"][k] for k in keys]
    natural = np.array([s.get("original_mean", last["sep"]["bandwidth"][k]["ratio"]) for k, s in zip(keys, stats)])
    mean = np.array([s["mean"] for s in stats])
    err = np.array([[m - s["ci_low"] for m, s in zip(mean, stats)], [s["ci_high"] - m for m, s in zip(mean, stats)]])
    fig, ax = plt.subplots(figsize=(5.0, 4.0))
    ax.plot(t, t, "k--", linewidth=1, label="diagonal")
    ax.plot(t, natural, "o", label="natural channel order")
    ax.errorbar(
        t,
        mean,
        yerr=np.clip(err, 0, None),
        fmt="s",
        capsize=3,
        markersize=4,
        label=f"{permutation['num_permutations']} random orders (mean, 95% CI)",
    )
    statistic = permutation.get("statistic", "pooled")
    ax.set(
        xlabel="energy threshold",
        ylabel="bandwidth d/D",
        title=f"Layer {last['index']}: SEP under permutations ({statistic})",
    )
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_rotation(layers: list[dict], arrays: dict, path: Path) -> Path:
    """Left: last layer's distribution of subspace overlap (mean cos^2 of the principal angles), image vs
    shared basis and image vs image. Right: mean overlap per layer."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.8))
    keys = sorted({k.split("/", 1)[1] for k in arrays if k.startswith("overlap_to_shared/")}, key=float)
    bins = np.linspace(0, 1, 41)
    for key in keys:
        for kind, label in (("to_shared", "image vs shared"), ("pairwise", "image vs image")):
            values = arrays.get(f"overlap_{kind}/{key}")
            if values is not None:
                left.hist(values, bins=bins, alpha=0.5, density=True, label=f"{label}, k = d_{key}")
    left.set(
        xlabel="overlap = mean cos² of principal angles",
        ylabel="density",
        title=f"Layer {layers[-1]['index']}: subspace overlap",
    )
    left.legend(fontsize=7)
    x = [layer["index"] for layer in layers]
    for kind, style in (("to_shared", "-"), ("pairwise", "--")):
        for key in keys:
            values = [layer["rotation"][kind].get(key, {}).get("overlap_mean", np.nan) for layer in layers]
            if not np.all(np.isnan(values)):
                right.plot(x, values, style, marker="o", markersize=3, label=f"{kind}, k = d_{key}")
    right.set(xlabel="layer", ylabel="mean overlap", ylim=(0, 1.02), title="Subspace overlap by layer")
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.legend(fontsize=7)
    return _save(fig, path)


def plot_sep_overlay(curves: Sequence[tuple[str, Sequence[float]]], path: Path) -> Path:
    """Several models' last-layer mean SEP curves on one axes, channel index normalised to (j+1)/D (models of
    different widths side by side), with the diagonal of a white spectrum. `curves`: (model, `[D]` percents)."""
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    for model, curve in curves:
        mean = np.asarray(curve, dtype=float)
        ax.plot((np.arange(mean.size) + 1) / mean.size, mean, linewidth=1.2, label=f"{model} (D = {mean.size})")
    _finish_sep_axes(ax, "Token SEP, last layer of each model", legend_size=7)
    return _save(fig, path)


def plot_rank_vs_depth(series: Sequence[dict], path: Path) -> Path:
    """Per-image SVD rank p99 / D (solid) and shared-PCA rank p99 / D (dashed) against normalised depth l/L,
    one colour per model, one panel per energy threshold. `series`: {"model", "depth": [layers], "svd" /
    "pca": {threshold key: [layers]}} per model (`orchestrator.diagnose_compare.rank_depth_series`)."""
    keys = list(series[0]["svd"])
    fig, axes = plt.subplots(1, len(keys), figsize=(3.4 * len(keys), 3.4), squeeze=False, sharey=True)
    colors = plt.cm.tab10(np.arange(len(series)) % 10)
    for ax, key in zip(axes[0], keys):
        for line, color in zip(series, colors):
            ax.plot(line["depth"], line["svd"][key], "o-", color=color, markersize=3, label=line["model"])
            ax.plot(line["depth"], line["pca"][key], "--", color=color, linewidth=1)
        ax.set(title=f"{float(key):.0%} energy", xlabel="normalised depth l/L", xlim=(0, 1.02))
    axes[0][0].set_ylabel("rank p99 / D")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Rank needed against depth (solid: per-image SVD, dashed: shared PCA)", fontsize=10)
    return _save(fig, path)


def write_figures(layers: list[dict], last_arrays: dict, thresholds: Sequence[float], folder: Path) -> list[Path]:
    """Every figure into `folder` (created); returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [
        plot_rank_by_layer(layers, thresholds, folder / "rank_by_layer.png"),
        plot_rank_histograms(last_arrays, thresholds, layers[-1]["index"], folder / "rank_histograms.png"),
        plot_pca_energy(layers, folder / "pca_energy.png"),
        plot_sep(layers, folder / "sep_curves.png"),
        plot_sep_permutation(layers, folder / "sep_permutation.png"),
        plot_rotation(layers, last_arrays, folder / "rotation.png"),
    ]
    return [p for p in paths if p is not None]
