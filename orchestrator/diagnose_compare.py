"""The comparison of several models' diagnostics (``encmm diagnose`` with several models).

Pure functions over the reports ``encmm diagnose`` writes for each model (``build_report``, the content of
``diagnostics.json``): nothing is recomputed, no Ray, no MLflow. The table is the paper's (paper.md,
"Diagnostics", reference values): per model, the last diagnosed layer's per-image SVD rank p99 and shared-PCA
rank p99 at each energy threshold, and the SEP bandwidth d/D at 90%; then the same p99 ranks averaged over
the diagnosed layers.
"""

from __future__ import annotations

from collections.abc import Sequence

from encmm.analysis.spectra import threshold_key

SEP_THRESHOLD = "0.9"  # the paper's SEP column: d/D at 90% energy


def comparison_row(report: dict) -> dict:
    """One model's row: ``model``, ``num_images``, ``layer`` (the last diagnosed layer's index), ``layers``
    (how many were diagnosed), its ``tokens`` and ``channels`` (D), ``svd_p99_<p>`` / ``pca_p99_<p>`` (that
    layer's p99 over images of the per-image SVD rank and of the shared-PCA rank at energy p),
    ``sep_d_0.9`` / ``sep_ratio_0.9`` (its SEP bandwidth d and d/D at 90%), then ``svd_p99_<p>_layer_mean`` /
    ``pca_p99_<p>_layer_mean`` (the p99 averaged over the diagnosed layers)."""
    layers, last = report["layers"], report["layers"][-1]
    keys = [threshold_key(p) for p in report["thresholds"]]
    band = last["sep"]["bandwidth"][SEP_THRESHOLD]
    row = {
        "model": report["model"],
        "num_images": report["num_images"],
        "layer": last["index"],
        "layers": len(layers),
        "tokens": last["tokens"],
        "channels": last["channels"],
    }
    for kind in ("svd", "pca"):
        row.update({f"{kind}_p99_{key}": last[f"{kind}_rank"][key]["p99"] for key in keys})
    row.update({f"sep_d_{SEP_THRESHOLD}": band["d"], f"sep_ratio_{SEP_THRESHOLD}": band["ratio"]})
    for kind in ("svd", "pca"):
        for key in keys:
            values = [layer[f"{kind}_rank"][key]["p99"] for layer in layers]
            row[f"{kind}_p99_{key}_layer_mean"] = sum(values) / len(values)
    return row


def comparison_rows(reports: Sequence[dict]) -> list[dict]:
    """The table (comparison.csv): one :func:`comparison_row` per model, in order; every report must have
    the same thresholds (one ``encmm diagnose`` command)."""
    thresholds = {tuple(report["thresholds"]) for report in reports}
    if len(thresholds) != 1:
        raise ValueError(f"the reports have different thresholds: {sorted(thresholds)}")
    return [comparison_row(report) for report in reports]


def rank_depth_series(report: dict, num_layers: int) -> dict:
    """One model's line of the rank-vs-depth figure: {"model", "depth": normalised depth (l + 1) / L of each
    diagnosed layer l of the model's L (the last block is 1), "svd" / "pca": {p: p99 rank / D per layer}}
    (D = that layer's channels)."""
    layers = report["layers"]
    keys = [threshold_key(p) for p in report["thresholds"]]
    return {
        "model": report["model"],
        "depth": [(layer["index"] + 1) / num_layers for layer in layers],
        **{
            kind: {key: [layer[f"{kind}_rank"][key]["p99"] / layer["channels"] for layer in layers] for key in keys}
            for kind in ("svd", "pca")
        },
    }


def format_comparison(rows: Sequence[dict]) -> str:
    """The table as text, as ``encmm diagnose`` prints it: per model its D, the last layer's SVD and PCA p99
    at each threshold and the SEP d/D at 90%."""
    columns = [name for name in rows[0] if name.startswith("svd_p99_") and not name.endswith("_layer_mean")]
    keys = [name.removeprefix("svd_p99_") for name in columns]
    width = max(len("model"), *(len(str(row["model"])) for row in rows))
    ranks = "/".join(keys)
    svd_title, pca_title = f"SVD p99 {ranks}", f"PCA p99 {ranks}"

    def cells(row: dict, kind: str) -> str:
        return " / ".join(f"{row[f'{kind}_p99_{key}']:.1f}" for key in keys)

    texts = [(cells(row, "svd"), cells(row, "pca")) for row in rows]
    svd_width = max(len(svd_title), *(len(s) for s, _ in texts))
    pca_width = max(len(pca_title), *(len(p) for _, p in texts))
    lines = [
        f"{len(rows)} models, last diagnosed layer, p99 over images:",
        f"{'model':<{width}}  {'D':>5}  {svd_title:<{svd_width}}  {pca_title:<{pca_width}}  SEP d/D 90%",
    ]
    for row, (svd, pca) in zip(rows, texts):
        lines.append(
            f"{row['model']:<{width}}  {row['channels']:>5}  {svd:<{svd_width}}  {pca:<{pca_width}}  "
            f"{row[f'sep_ratio_{SEP_THRESHOLD}']:.3f}"
        )
    return "\n".join(lines)
