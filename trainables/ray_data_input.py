"""Ray Data as the ImageFolder input (``data.loader=ray_data``): CPU-only nodes can feed GPU nodes.

Files are read, decoded and augmented in Ray Data tasks, which Ray schedules on any node with a free CPU;
the Train worker only iterates the finished batches. :class:`RayDataLoader` is a drop-in for the engine's
``DataLoader`` (``sampler.set_epoch``, ``len``, ``(images, labels)`` batches, ``dataset.skipped_images``).

Same recipe and same order as the DataLoader path, by construction rather than by re-implementation:

- the samples are the dataset objects of ``build_datasets`` (their ``__getitem__``: decode, bad-image
  policy and the split's own train/eval transform), shipped once to Ray's object store;
- each epoch's order is this rank's index list read from the very sampler ``build_loaders`` built
  (``DistributedSampler(shuffle=True, seed, drop_last=True)`` after ``set_epoch``, ``RepeatAugSampler``, or
  the strided val range), cut to whole batches where the DataLoader drops the last partial one;
- Ray Data maps positions of that list through ``__getitem__`` with ``preserve_order`` on, so batch ``k`` of
  an epoch holds exactly the images DataLoader batch ``k`` would.

Why a per-epoch ``ray.data.range`` over positions rather than Ray Train's dataset sharding
(``TorchTrainer(datasets=...)`` + ``random_shuffle`` / ``streaming_split``): that path assigns rows to ranks
dynamically and shuffles with its own seed, so neither the order nor the shard of an image would match the
sampler's. ``range`` blocks are generated inside the tasks themselves (read fused with the map: nothing is
``ray.put`` per chunk) and the epoch's index list travels as one object. Tasks rather than an actor pool:
each epoch is a new dataset, and tasks need no start-up per epoch nor hold CPUs between epochs.

Augmentation randomness: every task seeds ``random``, numpy and torch from (run seed, epoch, rank, chunk),
so a chunk's images do not depend on which process or node ran it (a retried task gives the same ones).
"""

from __future__ import annotations

import copy
import math
import multiprocessing
import random
from collections import OrderedDict
from dataclasses import dataclass
from multiprocessing.sharedctypes import SynchronizedBase

import numpy as np
import ray
import ray.data
import torch
from torch.utils.data import DataLoader, Dataset

from encmm.trainables.execution import INPUT_TASK_CPUS

IMAGES_PER_TASK = 32  # ~0.25 s of DeiT decode + augment per core: fine-grained over nodes, task overhead small
CACHED_DATASETS = 2  # per task process: a run's train and val datasets (ImageNet's sample list: ~80 MB each)


class RayDataLoader:
    """A loader whose batches come from Ray Data tasks, in the order of ``loader``'s sampler.

    ``loader`` is the DataLoader ``build_loaders`` built (never iterated: its sampler, batch size,
    ``drop_last`` and dataset are taken over). Batches: images ``[B, 3, S, S]`` float32 (uint8 from a
    ``data.pipeline=fast`` dataset), labels ``[B]`` int64, on the CPU (pinned when ``loader`` pins), as the
    DataLoader yields them. ``seed`` seeds the tasks'
    augmentation per (epoch, rank, chunk).
    """

    def __init__(self, loader: DataLoader, *, seed: int):
        if not ray.is_initialized():
            raise RuntimeError("data.loader=ray_data needs a running Ray cluster (encmm train / encmm sweep)")
        self.sampler = loader.sampler
        self.batch_size = loader.batch_size
        self.drop_last = loader.drop_last
        self.pin_memory = loader.pin_memory
        self.dataset = DatasetWithTaskSkips(loader.dataset)
        self.seed = seed
        self._samples = ray.put(detach_shared_values(loader.dataset))

    def __len__(self) -> int:
        """Batches per epoch: the DataLoader's count, partial last batch dropped or kept as it says."""
        samples = len(self.sampler)
        return samples // self.batch_size if self.drop_last else math.ceil(samples / self.batch_size)

    def epoch_indices(self) -> np.ndarray:
        """Dataset indices of this epoch, in order ``[N]``: the sampler's list, cut to whole batches where
        the DataLoader drops the partial one (those images are never loaded there either)."""
        indices = np.fromiter(iter(self.sampler), dtype=np.int64)
        return indices[: len(self) * self.batch_size] if self.drop_last else indices

    def epoch_dataset(self) -> ray.data.Dataset:
        """This epoch's Ray Data pipeline: positions ``0..N-1`` -> sampler indices -> ``dataset[index]``."""
        indices = self.epoch_indices()
        chunk_seed = ChunkSeed(self.seed, getattr(self.sampler, "epoch", 0), getattr(self.sampler, "rank", 0))
        # One block of <= IMAGES_PER_TASK positions per task; whole blocks as batches (batch_size=None) let Ray
        # Data fuse the range generation into the same task (a batch size would keep them apart).
        blocks = max(1, math.ceil(len(indices) / IMAGES_PER_TASK))
        pipeline = ray.data.range(len(indices), override_num_blocks=blocks).map_batches(
            load_samples,
            batch_size=None,
            batch_format="numpy",
            fn_kwargs={"samples": self._samples, "indices": ray.put(indices), "chunk_seed": chunk_seed},
            num_cpus=INPUT_TASK_CPUS,
        )
        # Tasks finish out of order; the consumer must still see blocks in position order.
        pipeline.context.execution_options.preserve_order = True
        pipeline.context.enable_progress_bars = False  # one dataset per epoch: no bars nor start lines in the logs
        pipeline.context.print_on_execution_start = False
        return pipeline

    def __iter__(self):
        if len(self) == 0:  # fewer samples than one batch (or a rank's val shard empty): no batch, as DataLoader
            return
        batches = self.epoch_dataset().iter_torch_batches(
            batch_size=self.batch_size, drop_last=self.drop_last, device="cpu", pin_memory=self.pin_memory
        )
        for batch in batches:
            self.dataset.count_task_skips(int(batch["skipped"].sum()))
            yield batch["image"], batch["label"]


@dataclass(frozen=True)
class ChunkSeed:
    """What a task's augmentation seed derives from, besides its chunk's first position."""

    seed: int
    epoch: int
    rank: int

    def seed_chunk(self, first_position: int) -> None:
        """Seed ``random`` (timm's crop and RandAugment ops), numpy (RandAugment's op choice) and torch
        (colour jitter, random erasing) of this process for the chunk starting at ``first_position``."""
        state = np.random.SeedSequence([self.seed, self.epoch, self.rank, first_position]).generate_state(2)
        random.seed(int(state[0]))
        np.random.seed(int(state[1]))
        torch.manual_seed(int(state[0]) << 32 | int(state[1]))


def load_samples(batch: dict[str, np.ndarray], *, samples, indices, chunk_seed: ChunkSeed) -> dict[str, np.ndarray]:
    """Ray Data task: positions ``batch["id"]`` ``[n]`` -> ``dataset[indices[position]]`` for each.

    Returns image ``[n, 3, S, S]`` (float32, or uint8 for ``data.pipeline=fast``), label ``[n]`` int64 and
    skipped ``[n]`` int64: the number of files this chunk skipped as undecodable (``data.on_bad_image=skip``)
    in its first row, 0 elsewhere, so the Train worker's per-epoch count sums it back.
    """
    dataset = cached_dataset(samples)
    positions = batch["id"]
    chunk_seed.seed_chunk(int(positions[0]))
    take_skip_count(dataset)  # zero this process's count: the chunk reports only what it skipped itself
    images, labels = zip(*(dataset[int(index)] for index in ray.get(indices)[positions]))
    skipped = np.zeros(len(positions), dtype=np.int64)
    skipped[0] = take_skip_count(dataset)
    return {
        "image": np.stack([np.asarray(image) for image in images]),  # torch tensors or uint8 arrays alike
        "label": np.asarray(labels, dtype=np.int64),
        "skipped": skipped,
    }


_datasets: OrderedDict[str, Dataset] = OrderedDict()


def cached_dataset(ref: ray.ObjectRef) -> Dataset:
    """The dataset behind ``ref``, unpickled once per task process (ImageNet's 1.28M sample paths pickle to ~80 MB)."""
    key = ref.hex()
    if key not in _datasets:
        _datasets[key] = check_root_is_here(attach_shared_values(ray.get(ref)))
        while len(_datasets) > CACHED_DATASETS:
            _datasets.popitem(last=False)
    _datasets.move_to_end(key)
    return _datasets[key]


def check_root_is_here(dataset: Dataset) -> Dataset:
    """``dataset`` if its ImageFolder root exists on this node; else one clear error naming the node. Every node
    that runs input tasks reads the files at the run's ``data.root`` path (shared storage, or a copy at the same
    path): a missing folder would otherwise look like an undecodable file per image."""
    import socket
    from pathlib import Path

    root = getattr(getattr(dataset, "reader", None), "root", None)
    if root is not None and not Path(root).is_dir():
        raise FileNotFoundError(
            f"data.root: {root} is not on node {socket.gethostname()} ({ray.get_runtime_context().get_node_id()}); "
            "with data.loader=ray_data every node with free CPUs reads the ImageFolder at the same path"
        )
    return dataset


def take_skip_count(dataset: Dataset) -> int:
    """Files ``dataset`` skipped since the last call (0 for a dataset that never skips)."""
    return dataset.skipped_images() if hasattr(dataset, "skipped_images") else 0


@dataclass(frozen=True)
class FreshValue:
    """Stands in for a ``multiprocessing.Value`` on the way into a Ray task; becomes a new zeroed one there."""

    ctype: type


def detach_shared_values(dataset: Dataset) -> Dataset:
    """Shallow copy of ``dataset`` that pickles into Ray: its ``multiprocessing.Value`` attributes (the
    ImageFolder's skipped-image counter) refuse pickling outside process spawning, so each is replaced by a
    :class:`FreshValue`; tasks report their counts with their batches instead."""
    detached = copy.copy(dataset)
    for name, value in vars(dataset).items():
        if isinstance(value, SynchronizedBase):
            setattr(detached, name, FreshValue(type(value.get_obj())))
    return detached


def attach_shared_values(dataset: Dataset) -> Dataset:
    """Undo :func:`detach_shared_values` in the task process: a zeroed ``multiprocessing.Value`` each."""
    for name, value in vars(dataset).items():
        if isinstance(value, FreshValue):
            setattr(dataset, name, multiprocessing.Value(value.ctype, 0))
    return dataset


class DatasetWithTaskSkips(Dataset):
    """``dataset`` as the engine and the Train worker see it: its items and length, and ``skipped_images()``
    that adds the files skipped in Ray Data tasks (reported back with each batch) to its own count."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self._task_skips = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset[index]

    def count_task_skips(self, count: int) -> None:
        self._task_skips += count

    def skipped_images(self) -> int:
        """Files skipped since the last call, here and in the tasks (the engine reports it once per epoch)."""
        count, self._task_skips = self._task_skips + take_skip_count(self.dataset), 0
        return count


def ray_data_loaders(train: DataLoader, val: DataLoader, *, seed: int) -> tuple[RayDataLoader, RayDataLoader]:
    """The train and val loaders ``build_loaders`` built, fed by Ray Data tasks instead of loader workers."""
    return RayDataLoader(train, seed=seed), RayDataLoader(val, seed=seed)
