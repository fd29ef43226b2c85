"""``encmm diagnose``: the paper's spectral diagnostics (paper.md, "Diagnostics") for any model.

Order matters, as in ``encmm train``: :func:`prepare_diagnose` checks every input (options, the
tracking store, the model, the images or saved features) and creates nothing, raising
:class:`ConfigError` with one line; :func:`run_diagnose` then streams the diagnostics over sharded Ray
worker actors (analysis/ray_tasks.py: each reads its images' features batch by batch and keeps only the
per-layer accumulators of analysis/streaming.py; this process holds no features), writes
``<out>/diagnostics.json``, CSV tables and PNG figures, and logs them all to one MLflow run that ends
FINISHED, or FAILED on a crash.

Several models (``--model`` repeated, ``--models FILE``): :func:`prepare_diagnose_models` runs
:func:`prepare_diagnose` for every model before anything starts, and :func:`run_comparison` diagnoses them
one after another (each over the same sharded workers, so each model fans out over the cluster), each into
``<out>/<model>/`` and an MLflow child run of one parent run, then writes the comparison
(orchestrator/diagnose_compare.py: the paper's table; two overlay figures) to ``<out>/`` and the parent.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field

from encmm.analysis import features as feats
from encmm.analysis.saved_features import SavedFeatures, open_saved_features
from encmm.analysis.spectra import SEP_STATISTICS, check_thresholds, threshold_key
from encmm.orchestrator import tracking
from encmm.orchestrator.outputs import check_out_folder
from encmm.trainables.config import ConfigError, validate_model

log = logging.getLogger(__name__)

DATASET_PREFIXES = ("torch/", "hfds/", "hfids/", "tfds/", "wds/")
RANK_STATS = ("p99", "mean", "median", "std", "q25", "q75")
METRIC_STATS = ("p99", "mean", "median")
SEP_CSV_PERMUTATION = ("original_mean", "std_over_permutations", "delta_mean", "delta_ci_low", "delta_ci_high")


@dataclass
class DiagnoseOptions:
    """The command line, as given (see ``encmm diagnose --help``)."""

    model: str | None = None
    checkpoint: str | None = None
    run: str | None = None
    features: str | None = None
    pretrained: bool = False
    model_args: list[str] = field(default_factory=list)
    data: str | None = None
    data_root: str | None = None
    images_per_class: int = 1
    thresholds: str = "0.8,0.9,0.95,0.99"
    center: bool = False
    permutations: int = 0
    sep_statistic: str = "per-image"
    pairs: int = 500
    seed: int = 0
    layers: str | None = None
    batch_size: int = 64
    device: str = "auto"
    workers: int | None = None  # None: as many as the cluster has free CPUs (GPUs with --device cuda) for
    out: str | None = None
    tracking_uri: str | None = None
    experiment: str = tracking.DEFAULT_EXPERIMENT


@dataclass
class DiagnosePlan:
    """Everything validated: what to run, on which images, and where results go."""

    label: str
    thresholds: tuple[float, ...]
    layer_indices: list[int]  # model layer index of each diagnosed layer
    layer_shapes: list[tuple[int, int]]  # (tokens, channels) of each diagnosed layer
    num_layers: int  # layers the source has (the diagnosed ones are a subset with --layers): depth l/L
    num_images: int
    out: Path
    uri: str
    experiment: str
    params: dict
    options: DiagnoseOptions
    device: torch.device
    # What the workers read, one batch of images at a time: features.ModelFeatures (a model and its image
    # source) or saved_features.SavedFeatures; picklable, holding no features.
    reader: feats.ModelFeatures | SavedFeatures


# --------------------------------------------------------------------------------- validation
def _split_list(text: str, option: str, kind: type) -> list:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{option}: {text!r} is not a comma-separated list of {kind.__name__}s") from None
    if not values:
        raise ConfigError(f"{option}: empty list")
    return values


def _parse_thresholds(text: str) -> tuple[float, ...]:
    values = _split_list(text, "--thresholds", float)
    try:
        return tuple(sorted(set(check_thresholds(values))))
    except ValueError as exc:
        raise ConfigError(f"--thresholds: {exc}") from None


def _select_layers(text: str | None, count: int) -> list[int]:
    if text is None:
        return list(range(count))
    chosen = set()
    for index in _split_list(text, "--layers", int):
        if not -count <= index < count:
            raise ConfigError(f"--layers: {index} is out of range for {count} layers (0..{count - 1} or negative)")
        chosen.add(index % count)
    return sorted(chosen)


def _check_counts(o: DiagnoseOptions) -> None:
    for name, value, low in (
        ("--images-per-class", o.images_per_class, 1),
        ("--permutations", o.permutations, 0),
        ("--pairs", o.pairs, 0),
        ("--batch-size", o.batch_size, 1),
        ("--workers", 1 if o.workers is None else o.workers, 1),
    ):
        if value < low:
            raise ConfigError(f"{name}: must be >= {low}, got {value}")


def _check_sep_statistic(text: str) -> None:
    if text not in SEP_STATISTICS:
        raise ConfigError(f"--sep-statistic: {text!r} is not one of {', '.join(SEP_STATISTICS)}")


def _resolve_device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ConfigError(f"--device: {text!r} is not a torch device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device: {text} requested but no CUDA device is available")
    return device


def _sources(o: DiagnoseOptions) -> list[str]:
    given = {"--model": o.model, "--checkpoint": o.checkpoint, "--run": o.run, "--features": o.features}
    names = [name for name, value in given.items() if value is not None]
    # --model next to --features only names the features (issue 3: `--model cait_s24_224 --features ...`).
    if names == ["--model", "--features"] and not o.pretrained and not o.model_args:
        names = ["--features"]
    if len(names) != 1:
        raise ConfigError(
            f"give exactly one of --model, --checkpoint, --run, --features (got "
            f"{', '.join(names) if names else 'none'})"
        )
    return names


def _model_args(items: list[str]) -> dict:
    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--model-arg: {item!r} is not KEY=VALUE")
        kwargs[key.strip()] = yaml.safe_load(value)
    return kwargs


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{exc.__class__.__name__}: {text.splitlines()[0]}" if text else exc.__class__.__name__


def _timm_model(o: DiagnoseOptions):
    import timm

    if not timm.is_model(o.model):
        close = timm.list_models(f"*{o.model}*")[:5]
        hint = f" (close: {', '.join(close)})" if close else ""
        raise ConfigError(f"--model: unknown timm model {o.model!r}{hint}")
    torch.manual_seed(o.seed)  # a random-init model is then the same on every run
    try:
        model = timm.create_model(o.model, pretrained=o.pretrained, **_model_args(o.model_args))
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - bad overrides, no weights offline, ...: one line
        raise ConfigError(f"--model {o.model}: cannot be created: {_first_line(exc)}") from None
    return model, feats.timm_input_spec(model), o.model


def _encmm_model(path: Path, where: str):
    from encmm.trainables.teacher import load_checkpoint_file, model_from_checkpoint

    try:
        ckpt = load_checkpoint_file(path)
    except Exception as exc:  # noqa: BLE001 - not a torch file, or one holding more than tensors and plain data
        raise ConfigError(
            f"{where}: not an encmm checkpoint: torch.load(weights_only=True) cannot read it ({exc.__class__.__name__})"
        ) from None
    try:
        model, spec = model_from_checkpoint(ckpt)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"{where}: not an encmm checkpoint: {_first_line(exc)}") from None
    size = int(spec["img_size"])
    crop_pct = float(((ckpt.get("config") or {}).get("data") or {}).get("crop_pct", 0.875))
    input_spec = feats.InputSpec(size=(size, size), mean=tuple(spec["mean"]), std=tuple(spec["std"]), crop_pct=crop_pct)
    student = spec["student"]
    return model, input_spec, f"{student['model']}+{student['remedy']}"


def _run_model(run_id: str, uri: str):
    with tempfile.TemporaryDirectory(prefix="encmm-diagnose-") as folder:
        local = tracking.fetch_best_checkpoint(uri, run_id, folder, "--run")
        return _encmm_model(local, f"--run {run_id}")


def _image_source(o: DiagnoseOptions, spec: feats.InputSpec) -> tuple[str, feats.ImageSource]:
    """(data label, a picklable source of normalised `[B, 3, H, W]` batches of the chosen images)."""
    data, k = o.data or "digits", o.images_per_class
    if data == "digits":
        from encmm.trainables.data import DIGITS_MEAN, DIGITS_STD, load_digits_tensors

        # Held at their native 8x8 (an exact copy), resized per batch: equal to load_digits_tensors(size)[chosen]
        # without holding all 1,797 images, or even the chosen ones, at the model's size.
        images, labels = load_digits_tensors(8)
        chosen = feats.first_per_class(labels.tolist(), k)
        return "digits", feats.ResizedImages(images[chosen], spec, DIGITS_MEAN, DIGITS_STD)
    path = Path(data)
    if path.is_dir():
        try:
            files = feats.image_folder_files(path.resolve(), k)
        except (ValueError, OSError) as exc:
            raise ConfigError(f"--data: {exc}") from None
        return str(path.resolve()), feats.ImageFiles(files, spec)
    if not data.startswith(DATASET_PREFIXES):
        raise ConfigError(
            f"--data: {data!r} is neither 'digits', an ImageFolder folder, nor a timm dataset "
            f"name ({', '.join(p + '...' for p in DATASET_PREFIXES)})"
        )
    return _timm_dataset(data, o, spec)


def _timm_dataset(name: str, o: DiagnoseOptions, spec: feats.InputSpec) -> tuple[str, feats.DatasetImages]:
    root = str(Path(o.data_root or "data").resolve())
    source = feats.DatasetImages(name, root, [], spec)
    try:
        dataset = source.open()
        labels = getattr(dataset, "targets", None)
        if labels is None:
            labels = [target for _, target in dataset.reader.samples]
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"--data {name}: cannot be read from {root}: {_first_line(exc)}") from None
    chosen = feats.first_per_class(list(labels), o.images_per_class)
    if not chosen:
        raise ConfigError(f"--data {name}: no images in {root}")
    return name, feats.DatasetImages(name, root, chosen, spec)  # the workers open the dataset themselves


def prepare_diagnose(o: DiagnoseOptions) -> DiagnosePlan:
    """Validate every input; create nothing. Raises ConfigError (one line) or TrackingError."""
    source = _sources(o)[0]
    thresholds = _parse_thresholds(o.thresholds)
    _check_counts(o)
    _check_sep_statistic(o.sep_statistic)
    device = _resolve_device(o.device)
    if source != "--features" and o.data is None:
        o.data = "digits"
    if source == "--features" and (o.data or o.data_root):
        raise ConfigError("--data / --data-root do not apply to --features (the features are already computed)")
    if source != "--model" and (o.pretrained or o.model_args):
        raise ConfigError("--pretrained / --model-arg apply to --model only")
    out = Path(o.out) if o.out else None
    if out is not None:
        check_out_folder(out)
    uri = tracking.resolve_tracking_uri(o.tracking_uri)
    tracking.check_tracking(uri)

    params = {
        "source": source.removeprefix("--"),
        "thresholds": ",".join(threshold_key(p) for p in thresholds),
        "images_per_class": o.images_per_class,
        "center": o.center,
        "permutations": o.permutations,
        "sep_statistic": o.sep_statistic,
        "pairs": o.pairs,
        "seed": o.seed,
    }
    if source == "--features":
        try:
            reader = open_saved_features(o.features)
        except ValueError as exc:
            raise ConfigError(f"--features: {exc}") from None
        num_layers = reader.num_layers
        indices = _select_layers(o.layers, num_layers)
        label, data_label = o.model or f"features:{Path(o.features).name}", "features"
        reader = reader.select(indices)
        shapes = [(reader.tokens, reader.channels)] * len(indices)
        params["features"] = str(Path(o.features).resolve())
    else:
        if source == "--model":
            model, spec, label = _timm_model(o)
        elif source == "--checkpoint":
            if not Path(o.checkpoint).is_file():
                raise ConfigError(f"--checkpoint: {o.checkpoint}: no such file")
            model, spec, label = _encmm_model(Path(o.checkpoint), f"--checkpoint {o.checkpoint}")
            params["checkpoint"] = str(Path(o.checkpoint).resolve())
        else:
            model, spec, label = _run_model(o.run, uri)
            params["run_id"] = o.run
        try:
            all_shapes = feats.probe_layers(model, spec.size)
        except ValueError as exc:
            raise ConfigError(f"{source} {label}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - the model cannot even run one blank image
            raise ConfigError(f"{source} {label}: forward_intermediates failed: {_first_line(exc)}") from None
        num_layers = len(all_shapes)
        indices = _select_layers(o.layers, num_layers)
        shapes = [all_shapes[i] for i in indices]
        data_label, images = _image_source(o, spec)
        reader = feats.ModelFeatures(model, images, indices)
        params.update(
            input_size=f"{spec.size[0]}x{spec.size[1]}",
            pretrained=o.pretrained,
            model_args=",".join(model_arg_strings(dict(sorted(_model_args(o.model_args).items())))) or None,
        )
    num_images = len(reader)
    params.update(model=label, data=data_label, images=num_images, layers=",".join(map(str, indices)))
    if out is None:
        out = Path.cwd() / "diagnostics" / f"{tracking.safe_name(label, 80, 'model')}-{time.strftime('%Y%m%d-%H%M%S')}"
    return DiagnosePlan(
        label=label,
        thresholds=thresholds,
        layer_indices=indices,
        layer_shapes=shapes,
        num_layers=num_layers,
        num_images=num_images,
        out=out.resolve(),
        uri=uri,
        experiment=o.experiment,
        params=params,
        options=o,
        device=device,
        reader=reader,
    )


# ------------------------------------------------------------------------------------ outputs
def select_sep_statistic(result: dict, statistic: str) -> dict:
    """`diagnose_layer`'s result with `sep.permutation` = the block of the chosen permutation statistic
    (both are computed from the same permutations; see `analysis.spectra.diagnose_layer`)."""
    sep = dict(result["sep"])
    blocks = sep.pop("permutation_statistics", None)
    if blocks is not None:
        sep["permutation"] = blocks[statistic]
    return {**result, "sep": sep}


def build_report(plan: DiagnosePlan, results: list[dict]) -> dict:
    """diagnostics.json (README, "encmm diagnose"): model, num_images, thresholds, layers[...]."""
    layers = []
    for index, result in zip(plan.layer_indices, results):
        sep = {"bandwidth": result["sep"]["bandwidth"], "image_bandwidth": result["sep"]["image_bandwidth"]}
        if "permutation" in result["sep"]:
            sep["permutation"] = result["sep"]["permutation"]
        layers.append(
            {
                "index": index,
                "tokens": result["tokens"],
                "channels": result["channels"],
                "svd_rank": result["svd_rank"],
                "pca_rank": result["pca_rank"],
                "sep": sep,
                "rotation": result["rotation"],
            }
        )
    return {"model": plan.label, "num_images": plan.num_images, "thresholds": list(plan.thresholds), "layers": layers}


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_tables(out: Path, report: dict, results: list[dict], last_arrays: dict) -> list[Path]:
    """ranks.csv, sep.csv, rotation.csv, curves (sep_curves.csv, pca_curves.csv) and last-layer per-image ranks."""
    rank_rows, sep_rows, rotation_rows, sep_curve_rows, pca_rows = [], [], [], [], []
    for layer, result in zip(report["layers"], results):
        i = layer["index"]
        for kind in ("svd_rank", "pca_rank"):
            for p, stats in layer[kind].items():
                rank_rows.append(
                    [
                        i,
                        layer["tokens"],
                        layer["channels"],
                        kind.removesuffix("_rank"),
                        p,
                        *(stats[s] for s in RANK_STATS),
                    ]
                )
        permutation = layer["sep"].get("permutation", {})
        for t, band in layer["sep"]["bandwidth"].items():
            perm, image = permutation.get("bandwidth", {}).get(t, {}), layer["sep"]["image_bandwidth"][t]
            sep_rows.append(
                [
                    i,
                    layer["channels"],
                    t,
                    band["d"],
                    band["ratio"],
                    perm.get("mean"),
                    perm.get("ci_low"),
                    perm.get("ci_high"),
                    image["mean"],
                    image["std"],
                    permutation.get("statistic"),
                    *(perm.get(k) for k in SEP_CSV_PERMUTATION),
                ]
            )
        for reference, by_p in layer["rotation"].items():
            for p, stats in by_p.items():
                rotation_rows.append(
                    [i, reference, p, stats["overlap_mean"], stats["overlap_median"], stats["angle_mean_deg"]]
                )
        for j, (mean, std) in enumerate(zip(result["sep"]["mean"], result["sep"]["std"])):
            sep_curve_rows.append([i, j, mean, std])
        energy = result["energy_percentiles"]
        for d, values in enumerate(zip(result["pca_spectrum"], energy["median"], energy["p10"], energy["p1"]), 1):
            pca_rows.append([i, d, *values])
    keys = [threshold_key(p) for p in report["thresholds"]]
    per_image = [
        [n, *svd.tolist(), *pca.tolist()]
        for n, (svd, pca) in enumerate(zip(last_arrays["svd_rank"], last_arrays["pca_rank"]))
    ]
    return [
        _write_csv(out / "ranks.csv", ["layer", "tokens", "channels", "basis", "threshold", *RANK_STATS], rank_rows),
        _write_csv(
            out / "sep.csv",
            [
                "layer",
                "channels",
                "threshold",
                "d",
                "ratio",
                "perm_mean",
                "perm_ci_low",
                "perm_ci_high",
                "image_ratio_mean",
                "image_ratio_std",
                "perm_statistic",
                *(f"perm_{k}" for k in SEP_CSV_PERMUTATION),
            ],
            sep_rows,
        ),
        _write_csv(
            out / "rotation.csv",
            ["layer", "reference", "threshold", "overlap_mean", "overlap_median", "angle_mean_deg"],
            rotation_rows,
        ),
        _write_csv(out / "sep_curves.csv", ["layer", "j", "mean_percent", "std_percent"], sep_curve_rows),
        _write_csv(
            out / "pca_curves.csv",
            ["layer", "d", "global_cumulative", "captured_median", "captured_p10", "captured_p1"],
            pca_rows,
        ),
        _write_csv(
            out / "last_layer_images.csv",
            ["image", *(f"svd_{k}" for k in keys), *(f"pca_{k}" for k in keys)],
            per_image,
        ),
    ]


def layer_metrics(layer: dict) -> dict[str, float]:
    """MLflow metrics of one layer (logged with step = layer index): `diag/svd_rank_p99/0.99`, ..."""
    metrics = {}
    for kind in ("svd_rank", "pca_rank"):
        for p, stats in layer[kind].items():
            metrics.update({f"diag/{kind}_{s}/{p}": stats[s] for s in METRIC_STATS})
    for t, band in layer["sep"]["bandwidth"].items():
        metrics[f"diag/sep_ratio/{t}"] = band["ratio"]
    for reference, by_p in layer["rotation"].items():
        for p, stats in by_p.items():
            metrics[f"diag/overlap_{reference}/{p}"] = stats["overlap_mean"]
            metrics[f"diag/angle_{reference}_deg/{p}"] = stats["angle_mean_deg"]
    return metrics


def format_summary(report: dict, out: Path, run_id: str) -> str:
    """Last layer: SVD p99 vs PCA p99 per threshold, SEP d/D at 90%."""
    last = report["layers"][-1]
    lines = [
        f"{report['model']}, {report['num_images']} images, {len(report['layers'])} layers diagnosed; "
        f"last layer {last['index']} ({last['tokens']} tokens x {last['channels']} channels):",
        f"{'energy':>8}  {'SVD p99':>8}  {'PCA p99':>8}",
    ]
    for p in report["thresholds"]:
        key = threshold_key(p)
        lines.append(f"{key:>8}  {last['svd_rank'][key]['p99']:>8.1f}  {last['pca_rank'][key]['p99']:>8.1f}")
    band = last["sep"]["bandwidth"]["0.9"]
    lines.append(f"SEP d/D at 90%: {band['ratio']:.3f} (d = {band['d']} of {last['channels']})")
    lines.append(f"-> {out / 'diagnostics.json'} (MLflow run {run_id})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- run
def compute_diagnostics(plan: DiagnosePlan) -> tuple[list[dict], dict, list[str]]:
    """Every layer's `diagnose_layer` result (with the chosen SEP statistic), the last layer's
    `per_image_arrays` and the Ray node id of each worker, streamed over sharded Ray workers
    (analysis/ray_tasks.py); Ray must be initialised. A progress bar on stderr counts the images read over
    the three passes."""
    from tqdm import tqdm

    from encmm.analysis.ray_tasks import stream_diagnostics
    from encmm.analysis.streaming import LayerStream

    o = plan.options
    streams = [
        LayerStream(plan.num_images, tokens, channels, plan.thresholds, o.center, o.permutations, o.pairs, o.seed)
        for tokens, channels in plan.layer_shapes
    ]
    with tqdm(desc="images x 3 passes", unit="img", file=sys.stderr) as bar:

        def advance(images: int, total: int) -> None:
            if bar.total != total:
                bar.total = total
            bar.update(images)

        nodes = stream_diagnostics(
            streams,
            plan.reader,
            batch_size=o.batch_size,
            workers=o.workers,
            use_gpu=plan.device.type == "cuda",
            progress=advance,
        )
    results = [select_sep_statistic(stream.result(), o.sep_statistic) for stream in streams]
    return results, streams[-1].arrays(), nodes


def write_outputs(plan: DiagnosePlan, run_id: str, results: list[dict], last_arrays: dict) -> dict:
    """diagnostics.json, the CSV tables and figures in `plan.out`, all logged to MLflow run `run_id` with the
    per-layer metrics; returns the report (diagnostics.json's content)."""
    from encmm.analysis import plots

    report = build_report(plan, results)
    plan.out.mkdir(parents=True, exist_ok=True)
    report_path = plan.out / "diagnostics.json"
    report_path.write_text(json.dumps(report, indent=1))
    tables = write_tables(plan.out, report, results, last_arrays)
    curves = [{"index": i, **r} for i, r in zip(plan.layer_indices, results)]
    figures = plots.write_figures(curves, last_arrays, plan.thresholds, plan.out / "figures")
    for layer in report["layers"]:
        tracking.log_metrics(plan.uri, run_id, layer_metrics(layer), step=layer["index"])
    for path in [report_path, *tables]:
        tracking.log_artifact(plan.uri, run_id, path)
    for path in figures:
        tracking.log_artifact(plan.uri, run_id, path, "figures")
    return report


def start_diagnose_run(plan: DiagnosePlan, parent_run_id: str | None = None) -> str:
    """Open the command's MLflow run (params, tags); it is closed FAILED should this process die (a child run
    of a comparison, by the parent's watchdog)."""
    run_name = f"diagnose-{tracking.safe_name(plan.label, 80, 'model')}-{time.strftime('%Y%m%d-%H%M%S')}"
    tags = {"encmm.kind": "diagnose", "encmm.out": str(plan.out)}
    if plan.options.run:
        tags["encmm.source_run_id"] = plan.options.run
    run_id = tracking.start_run(
        plan.uri, plan.experiment, run_name, params=plan.params, tags=tags, parent_run_id=parent_run_id
    )
    if parent_run_id is None:
        tracking.close_runs_if_process_dies(plan.uri, [run_id])
    return run_id


def run_diagnose(plan: DiagnosePlan, *, address: str | None = None, parent_run_id: str | None = None) -> dict:
    """Stream, write, log. Returns {"run_id", "out", "report", "summary", "sep_curve" (the last layer's mean
    SEP curve, [C])}; the run (a child of `parent_run_id` if given) ends FAILED (KILLED on Ctrl-C) with the
    error in the ``encmm.error`` tag if anything raises."""
    from encmm.orchestrator.ray_cluster import init_ray

    init_ray(address)
    run_id = start_diagnose_run(plan, parent_run_id)
    with tracking.ending_run(plan.uri, run_id):
        results, last_arrays, nodes = compute_diagnostics(plan)
        tracking.set_tags(plan.uri, run_id, {"encmm.workers": len(nodes), "encmm.worker_nodes": ",".join(nodes)})
        report = write_outputs(plan, run_id, results, last_arrays)
    return {
        "run_id": run_id,
        "out": plan.out,
        "report": report,
        "summary": format_summary(report, plan.out, run_id),
        "sep_curve": list(results[-1]["sep"]["mean"]),
    }


# ------------------------------------------------------------------------------ several models
class ModelEntry(BaseModel):
    """One model of a comparison: a ``--model NAME``, or an entry of a ``--models`` file (a name, or this
    mapping). ``model_args`` come after the command's ``--model-arg`` (its keys win); ``pretrained``
    defaults to ``--pretrained``."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str
    model_args: dict[str, Any] = Field(default_factory=dict)
    pretrained: bool | None = None


@dataclass
class ComparisonPlan:
    """Every model validated into its own plan (outputs in ``<out>/<model>/``); the comparison goes to `out`."""

    plans: list[DiagnosePlan]
    out: Path
    uri: str
    experiment: str
    params: dict


def model_arg_strings(model_args: Mapping[str, Any]) -> list[str]:
    """``--model-arg`` strings of a mapping (values written as JSON, which is YAML)."""
    return [f"{key}={json.dumps(value, default=str)}" for key, value in model_args.items()]


def read_models_file(ref: str) -> list[dict | str]:
    """The entries of a ``--models`` file (a path, or a shipped experiment's name): a YAML list of model
    names or of ``{model, model_args, pretrained}`` mappings."""
    from encmm.orchestrator.experiments import resolve_model_list

    try:
        path = resolve_model_list(ref)
    except ConfigError as exc:
        raise ConfigError(f"--models: {exc}") from None
    try:
        entries = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(f"--models {ref}: not valid YAML{f' at line {mark.line + 1}' if mark else ''}") from None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(
            f"--models {ref}: must be a non-empty YAML list of model names or "
            "{model, model_args, pretrained} mappings"
        )
    return entries


def model_entries(models: Sequence[str | Mapping[str, Any]], models_file: str | None = None) -> list[ModelEntry]:
    """The models to diagnose, in order: `models` (names or mappings), then the ``--models`` file's. A model
    given twice is refused (its outputs would share ``<out>/<model>/``)."""
    items = [("--model", item) for item in models]
    if models_file is not None:
        listed = read_models_file(models_file)
        items += [(f"--models {models_file} [entry {i}]", item) for i, item in enumerate(listed, 1)]
    entries, folders = [], {}
    for source, item in items:
        if not isinstance(item, (str, Mapping)):
            raise ConfigError(f"{source}: {item!r} is neither a model name nor a mapping")
        entry = validate_model(ModelEntry, {"model": item} if isinstance(item, str) else dict(item), source)
        folder = tracking.safe_name(entry.model, 80, "model")
        if folder in folders:
            other = folders[folder]
            raise ConfigError(
                f"--model: {entry.model!r} is given twice; give each model once"
                if other == entry.model
                else f"--model: {entry.model!r} and {other!r} would share the output folder {folder}/"
            )
        folders[folder] = entry.model
        entries.append(entry)
    return entries


def _entry_options(o: DiagnoseOptions, entry: ModelEntry, out: str | None) -> DiagnoseOptions:
    return replace(
        o,
        model=entry.model,
        model_args=[*o.model_args, *model_arg_strings(entry.model_args)],
        pretrained=o.pretrained if entry.pretrained is None else entry.pretrained,
        out=out,
    )


def prepare_diagnose_models(
    o: DiagnoseOptions, models: Sequence[str | Mapping[str, Any]] = (), models_file: str | None = None
) -> DiagnosePlan | ComparisonPlan:
    """`encmm diagnose` with its models (``--model`` repeated, ``--models FILE``; `o.model` unused): none or one
    is :func:`prepare_diagnose` as for a single model; several are a :class:`ComparisonPlan` with every model
    validated by :func:`prepare_diagnose`. Creates nothing; raises ConfigError (one line) or TrackingError."""
    entries = model_entries(models, models_file)
    if len(entries) <= 1:
        return prepare_diagnose(_entry_options(o, entries[0], o.out) if entries else o)
    sources = (("--checkpoint", o.checkpoint), ("--run", o.run), ("--features", o.features))
    given = [flag for flag, value in sources if value is not None]
    if given:
        raise ConfigError(
            f"{', '.join(given)}: one source only; {len(entries)} models are compared as timm models (drop {given[0]})"
        )
    out = Path(o.out) if o.out else Path.cwd() / "diagnostics" / f"comparison-{time.strftime('%Y%m%d-%H%M%S')}"
    check_out_folder(out)
    plans = [
        prepare_diagnose(_entry_options(o, entry, str(out / tracking.safe_name(entry.model, 80, "model"))))
        for entry in entries
    ]
    shared = {key: value for key, value in plans[0].params.items() if all(p.params.get(key) == value for p in plans)}
    params = {**shared, "models": ",".join(p.label for p in plans), "num_models": len(plans)}
    return ComparisonPlan(plans=plans, out=out.resolve(), uri=plans[0].uri, experiment=o.experiment, params=params)


def start_comparison_run(plan: ComparisonPlan) -> str:
    """The parent run (tag ``encmm.kind`` = diagnose-comparison); it and its children are closed FAILED
    should this process die."""
    run_name = f"diagnose-comparison-{time.strftime('%Y%m%d-%H%M%S')}"
    tags = {"encmm.kind": "diagnose-comparison", "encmm.out": str(plan.out)}
    run_id = tracking.start_run(plan.uri, plan.experiment, run_name, params=plan.params, tags=tags)
    tracking.close_runs_if_process_dies(plan.uri, [run_id], children_of=[run_id])
    return run_id


def write_comparison(plan: ComparisonPlan, run_id: str, children: list[dict]) -> tuple[list[dict], list[Path]]:
    """comparison.csv, sep_overlay.png and rank_vs_depth.png in `plan.out`, logged to the parent run `run_id`,
    from the children's reports; returns (the table's rows, the paths)."""
    from encmm.analysis import plots
    from encmm.orchestrator import diagnose_compare as compare

    reports = [child["report"] for child in children]
    rows = compare.comparison_rows(reports)
    plan.out.mkdir(parents=True, exist_ok=True)
    paths = [
        _write_csv(plan.out / "comparison.csv", list(rows[0]), [list(row.values()) for row in rows]),
        plots.plot_sep_overlay(
            [(report["model"], child["sep_curve"]) for report, child in zip(reports, children)],
            plan.out / "sep_overlay.png",
        ),
        plots.plot_rank_vs_depth(
            [compare.rank_depth_series(report, p.num_layers) for report, p in zip(reports, plan.plans)],
            plan.out / "rank_vs_depth.png",
        ),
    ]
    for path in paths:
        tracking.log_artifact(plan.uri, run_id, path)
    return rows, paths


def run_comparison(plan: ComparisonPlan, *, address: str | None = None) -> dict:
    """Each model in turn (each one's images sharded over the cluster's workers) into a child run of one parent
    run, then the comparison. Returns {"run_id" (the parent), "out", "children" (each `run_diagnose`'s
    result), "rows", "files", "summary"}. A crash ends the child in flight and the parent FAILED (KILLED on
    Ctrl-C); the children already done stay FINISHED."""
    from encmm.orchestrator import diagnose_compare as compare
    from encmm.orchestrator.ray_cluster import init_ray

    init_ray(address)
    run_id = start_comparison_run(plan)
    children = []
    with tracking.ending_run(plan.uri, run_id):
        for position, child in enumerate(plan.plans, 1):
            log.info("[diagnose] model %d/%d: %s -> %s", position, len(plan.plans), child.label, child.out)
            children.append(run_diagnose(child, address=address, parent_run_id=run_id))
        rows, files = write_comparison(plan, run_id, children)
    summary = f"{compare.format_comparison(rows)}\n-> {files[0]} (MLflow parent run {run_id})"
    return {"run_id": run_id, "out": plan.out, "children": children, "rows": rows, "files": files, "summary": summary}
