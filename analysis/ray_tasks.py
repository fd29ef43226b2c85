"""The one module of analysis/ that speaks Ray: the diagnostics streamed over sharded worker actors.

`stream_diagnostics` runs the passes of `analysis.streaming` (one `LayerStream` per layer) over the images
of a picklable feature reader (`features.ModelFeatures`: a model and its image source, or a
`saved_features.SavedFeatures`). The reader goes into the object store once (`ray.put`: one model replica
per worker, on that worker's device) and N `ShardWorker` actors each read a shard of the images batch by
batch, feed every layer's accumulator and drop the batch's features right away; after each read the driver
fetches the accumulators and merges them. Two reads: pass 1 (`finish_first`), then passes 2 and 3 together
over the batches of `streaming.sweep_batches` (`finish_sweep`), dealt round-robin. Nobody holds a layer's
`[I, N, C]` features: a worker holds its accumulators (O(layers x C^2) plus a few numbers per image) and
one batch.

Shards, call order and merge order are fixed by the image count, the batch size and the worker count, so
a run is reproducible; different worker counts agree to float64 round-off (see `analysis.streaming`).

`per_image_arrays` is the in-memory reference of `LayerStream.arrays`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np
import ray
import torch

from encmm.analysis import spectra
from encmm.analysis.streaming import LayerStream, results_only, sweep_batches

BATCHES_PER_CALL = 2  # per actor call: small, so that the driver's progress bar moves often
CALLS_IN_FLIGHT = 2  # per actor: the next call is queued while one runs


def per_image_arrays(
    features: torch.Tensor, thresholds: Sequence[float], center: bool, num_pairs: int, seed: int
) -> dict[str, np.ndarray]:
    """Per-image values behind one layer's summaries, for histograms.

    {"svd_rank", "pca_rank": `[I, P]`, and for p in spectra.ROTATION_THRESHOLDS:
    "overlap_to_shared/<p>", "angle_to_shared/<p>": `[I]`, "overlap_pairwise/<p>", "angle_pairwise/<p>":
    `[num_pairs]` (absent with < 2 images)}: the same definitions and seed as `diagnose_layer`.
    """
    arrays = spectra.layer_rank_arrays(features, thresholds, center)
    x = spectra.check_features(features)
    if center:  # as diagnose_layer: subtract each image's token mean
        x = x - x.mean(dim=1, keepdim=True)
    rotation_p = list(spectra.ROTATION_THRESHOLDS)
    ranks = spectra.svd_rank(x, rotation_p)
    eigenvectors = spectra.shared_basis(x)[1]
    bases = spectra.right_singular_bases(x, int(ranks.max()))
    for col, p in enumerate(rotation_p):
        key = spectra.threshold_key(p)
        overlap, angle = spectra.rotation_to_shared(x, ranks[:, col], eigenvectors, bases=bases)
        arrays[f"overlap_to_shared/{key}"], arrays[f"angle_to_shared/{key}"] = overlap.numpy(), angle.numpy()
        if x.shape[0] >= 2 and num_pairs >= 1:
            overlap, angle = spectra.pairwise_rotation(x, ranks[:, col], num_pairs, seed, bases=bases)
            arrays[f"overlap_pairwise/{key}"], arrays[f"angle_pairwise/{key}"] = overlap.numpy(), angle.numpy()
    return arrays


# ------------------------------------------------------------------------------------ the workers
def _libc_malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def release_freed_memory() -> None:
    """Hand the heap's freed pages back to the OS (glibc ``malloc_trim``). A batch's buffers (tens of MB
    each) are freed into glibc's heap, which keeps them: measured on 24 x 196 x 1024 features, a worker grew
    from 0.7 to 2.5 GiB over 100 images without this, and stayed at 0.75 GiB with it."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@ray.remote
class ShardWorker:
    """One reader replica on its own device, and the accumulators of every diagnosed layer for the pass in
    progress. `add` reads batches (`reader.read(positions)` -> one `[b, N_l, C_l]` per layer) into them."""

    def __init__(self, reader, device: str, threads: int):
        torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
        self.reader = reader.to(device)
        self.accumulators: list = []

    def node_id(self) -> str:
        """The id of the Ray node this worker runs on."""
        return ray.get_runtime_context().get_node_id()

    def start(self, accumulators: list) -> None:
        """Begin a pass with one empty accumulator per layer."""
        self.accumulators = accumulators

    def add(self, batches: list[tuple[list[int], list[int] | None]]) -> int:
        """Read each batch of image positions and add it to every layer, with the positions it owns where a
        pass takes them (`SweepPass`; None: all); returns the number of images read."""
        for positions, owned in batches:
            features = self.reader.read(positions)
            for accumulator, layer in zip(self.accumulators, features):
                if owned is None:
                    accumulator.add(positions, layer)
                else:
                    accumulator.add(positions, layer, owned)
            del features  # before the next batch is read
            release_freed_memory()
        return sum(len(positions) for positions, _ in batches)

    def take(self) -> list:
        """The pass's filled accumulators, one per layer (the worker keeps none)."""
        accumulators, self.accumulators = self.accumulators, []
        return [results_only(accumulator) for accumulator in accumulators]


def _fraction(total: float, count: int) -> float:
    """1 per worker when `total` allows it, else an equal share (Ray takes multiples of 1e-4)."""
    return 1.0 if count <= total else max(1e-4, math.floor(total / count * 1e4) / 1e4)


def worker_placement(workers: int | None, max_workers: int, use_gpu: bool) -> tuple[int, dict, str, int]:
    """(worker count, actor resources, device, torch threads per worker) on the connected cluster.

    With `use_gpu` and GPUs in the cluster: one GPU per worker, default as many workers as GPUs are free.
    Otherwise one CPU per worker, default as many as CPUs are free. Capped by `max_workers` (the number of
    batches); more workers than the cluster has share its CPUs / GPUs in fractions (whole ones would leave
    some workers waiting for ever for resources the others hold until the end). Each worker runs torch on
    the cluster's CPUs divided by the worker count (at least 1 thread).
    """
    cluster, free = ray.cluster_resources(), ray.available_resources()
    cpus, gpus = cluster.get("CPU", 1.0), cluster.get("GPU", 0.0) if use_gpu else 0.0
    if gpus >= 1:
        count = workers or max(1, int(free.get("GPU", 0.0)))
    else:
        count = workers or max(1, int(free.get("CPU", 0.0)))
    count = max(1, min(count, max_workers))
    resources = {"num_cpus": _fraction(cpus, count)}
    if gpus >= 1:
        resources["num_gpus"] = _fraction(gpus, count)
    return count, resources, "cuda" if gpus >= 1 else "cpu", max(1, int(cpus // count))


# ------------------------------------------------------------------------------------- the driver
def _contiguous_shards(batches: list, count: int) -> list[list]:
    """`count` runs of consecutive batches, as even as the batch count allows."""
    bounds = np.linspace(0, len(batches), count + 1).round().astype(int)
    return [batches[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _run_pass(actors: list, start: Callable[[], list], shards: list[list], progress) -> list:
    """One pass: every actor starts from `start()` (one empty accumulator per layer) and reads its shard, a
    few batches per call; returns one accumulator per layer, the actors' merged in actor order.

    The start state (for pass 2 every layer's shared basis: 24 x 8 MB for ViT-Large) goes into the object
    store once for all actors, and their filled accumulators come back one actor at a time, each merged
    before the next is fetched: the driver holds two actors' state at most, whatever the worker count."""
    state = ray.put(start())
    ray.get([actor.start.remote(state) for actor in actors])
    del state
    calls = [deque(shard[i : i + BATCHES_PER_CALL] for i in range(0, len(shard), BATCHES_PER_CALL)) for shard in shards]
    pending: dict = {}

    def submit(position: int) -> None:
        if calls[position]:
            pending[actors[position].add.remote(calls[position].popleft())] = position

    for position in range(len(actors)):
        for _ in range(CALLS_IN_FLIGHT):
            submit(position)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        position = pending.pop(done[0])
        progress(ray.get(done[0]))
        submit(position)
    merged = ray.get(actors[0].take.remote())
    for actor in actors[1:]:
        taken = ray.get(actor.take.remote())
        merged = [mine.merge(theirs) for mine, theirs in zip(merged, taken)]
        del taken
    return merged


BATCH_BYTES = 128 * 2**20  # one batch's features, all layers: what a worker holds beyond its accumulators


def batch_within_budget(batch_size: int, streams: Sequence[LayerStream], itemsize: int = 4) -> int:
    """``batch_size``, lowered so that one batch of every stream's layer fits :data:`BATCH_BYTES` (at
    least 1 image): a ViT-Large image is ~19 MB of block outputs, 64 of them 1.2 GB per worker."""
    per_image = sum(stream.layer.tokens * stream.layer.channels for stream in streams) * itemsize
    return max(1, min(batch_size, BATCH_BYTES // max(1, per_image)))


def stream_diagnostics(
    streams: Sequence[LayerStream],
    reader,
    *,
    batch_size: int,
    workers: int | None = None,
    use_gpu: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Run the passes of every layer's `LayerStream` (same images, pairs and seed; in the order of
    `reader.read`'s layers) over `reader`'s images on sharded `ShardWorker` actors; afterwards each
    stream's `result()` and `arrays()` are ready. Returns the Ray node id of each worker used.

    Read 1 (pass 1): images 0..I-1 in batches of `batch_size` consecutive positions (lowered to fit
    :data:`BATCH_BYTES`, see :func:`batch_within_budget`), each worker one
    contiguous run of batches. Read 2 (passes 2 and 3): the batches of `sweep_batches`, batch j on worker
    j mod N. `progress(images, total)` once with 0 images, then after each call; total = images read over
    both reads.
    Ray must be initialised by the caller; the actors are killed on return or error.
    """
    num_images = len(reader)
    itemsize = getattr(reader, "dtype", torch.float32).itemsize
    batch_size = batch_within_budget(batch_size, streams, itemsize)
    batches = [(list(range(a, min(a + batch_size, num_images))), None) for a in range(0, num_images, batch_size)]
    sweep = sweep_batches(num_images, *streams[0].pairs, batch_size)
    total = num_images + sum(len(images) for images, _ in sweep)
    report = (lambda n: progress(n, total)) if progress is not None else (lambda n: None)
    report(0)
    count, resources, device, threads = worker_placement(workers, len(batches), use_gpu)
    reader_ref = ray.put(reader)
    actors = [ShardWorker.options(**resources).remote(reader_ref, device, threads) for _ in range(count)]

    def run(empty: Callable[[LayerStream], object], shards: list) -> list[tuple[LayerStream, object]]:
        return list(zip(streams, _run_pass(actors, lambda: [empty(s) for s in streams], shards, report)))

    stopping = False
    try:
        nodes = ray.get([actor.node_id.remote() for actor in actors])
        for stream, merged in run(LayerStream.first_pass, _contiguous_shards(batches, count)):
            stream.finish_first(merged)
        release_freed_memory()  # the shards' accumulators, merged: the driver keeps only the merged rows
        for stream, merged in run(LayerStream.sweep_pass, [sweep[position::count] for position in range(count)]):
            stream.finish_sweep(merged)
        release_freed_memory()
    except (KeyboardInterrupt, SystemExit):
        # Stopping on a signal: the process exits next, and Ray kills the actors of a driver that is gone. A
        # terminal's Ctrl-C or hang-up also reaches the local cluster's own processes: a call to a GCS that died
        # of it would wait a minute for it and then end the process with exit code 1, not 128 + the signal.
        stopping = True
        raise
    finally:
        if not stopping:
            for actor in actors:
                ray.kill(actor)
        del reader_ref
    return nodes
