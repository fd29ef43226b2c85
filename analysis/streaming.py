"""One layer's diagnostics from batches of images: `spectra.diagnose_layer` and `ray_tasks.per_image_arrays`
without holding the layer's `[I, N, C]` features.

Images carry a global index 0..I-1, their position in the dataset. A shard is any subset of the indices,
its batches `[b, N, C]` come in any order, and each shard fills its own accumulator (picklable, so it can
live in a Ray worker); the driver's `LayerStream` merges the shards' accumulators after each pass. Three
passes over the images, recomputing the features each time (cheap next to the math):

1. `FirstPass`: per image the SVD ranks (`spectra.svd_rank`) and SEP moments (`spectra.image_sep_moments`:
   token count, mean curve, squared deviations), and under each channel permutation the per-image bandwidth
   ratios; per shard the float64 token Gram sum_i X_i^T X_i (`spectra.token_gram_sum`), the token count and,
   per permutation, the pooled SEP sums (both `spectra.permuted_sep_terms`). Merged: the shared basis,
   eigenvectors of C = Gram / T (`spectra.basis_from_gram`; paper.md, Diagnostics 2).
2. `SecondPass` (carries the basis and the ranks): per image the captured-energy curve
   (`spectra.captured_energy`) and the rotation against the shared subspace (`spectra.rotations_to_shared`)
   at each of `spectra.ROTATION_THRESHOLDS`.
3. `PairPass` (carries the ranks): the rotation between the two images of each pair that
   `spectra.pairwise_rotation` draws (`spectra.rotation_pairs`, re-exported here), computed by
   `spectra.pair_angles` when one batch holds both images.
   `pair_chunks` groups the pairs so that a batch of at most `max_images` images covers each group.

Passes 2 and 3 need only pass 1's results, so a caller reads the images a second time only: `SweepPass` does
both over the batches of `sweep_batches` (the pair groups, each image of which pass 2 takes once, then the
images in no pair), computing each image's right singular bases once. Two reads in all, plus the images
that recur across pair groups.

Memory per accumulator: the `[C, C]` Gram and `[R, C]` permutation sums, one batch's working set, and its
images' rows of O(C + R * P) numbers each (R permutations, P = 5 SEP thresholds); the driver holds those
rows for all I images. Pass 3 holds the right singular bases `[m, C, k]` of one batch of m images.

Exactness. Per-image values come from the same `spectra` functions applied image by image, and the
statistics over images run on rows put back in dataset order, so they match the in-memory path whatever
the shard layout. The exceptions are the sums over images: the Gram (hence the shared basis, captured
energies and rotation to it) and the pooled SEP curve under each permutation. Those are summed in shard
and batch order, so they agree to float64 round-off (~1e-15), and the ranks and bandwidths drawn from them
agree exactly unless a value sits within that round-off of `p - spectra.RANK_TOLERANCE`. The natural-order
pooled SEP moments are merged from the stored per-image moments in dataset order, so they match bitwise.
The statistics themselves are `spectra`'s: `LayerStream.result()` and `arrays()` hand the merged values to
`spectra.sep_report`, `spectra.layer_report` and `spectra.layer_arrays`, as `diagnose_layer` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import reduce

import numpy as np
import torch
from torch import Tensor

from encmm.analysis import spectra
from encmm.analysis.spectra import rotation_pairs

__all__ = [
    "FirstPass",
    "LayerStream",
    "PairPass",
    "SecondPass",
    "SweepPass",
    "pair_chunks",
    "pair_images",
    "results_only",
    "rotation_pairs",
    "sweep_batches",
]


# ------------------------------------------------------------------------------------ image pairs
def pair_images(first: Tensor, second: Tensor) -> Tensor:
    """Sorted unique indices of the images that appear in the pairs."""
    return torch.unique(torch.cat([first, second]))


def pair_chunks(first: Tensor, second: Tensor, max_images: int) -> list[Tensor]:
    """Groups of pairs: sorted unique image indices, at most `max_images` per group, such that both images of
    every pair lie in one group. Each group grows along the pairs that add the fewest new images (pairs
    share images), so the images read over all groups stay few; an image can recur across groups.
    Deterministic: the same pairs give the same groups."""
    if max_images < 2:
        raise ValueError(f"max_images must be >= 2 (a pair has two images), got {max_images}")
    pairs = list(zip(first.tolist(), second.tolist()))
    touching: dict[int, list[int]] = {}
    for index, (a, b) in enumerate(pairs):
        touching.setdefault(a, []).append(index)
        touching.setdefault(b, []).append(index)
    taken = [False] * len(pairs)
    chunks, start = [], 0
    while True:
        while start < len(pairs) and taken[start]:
            start += 1
        if start == len(pairs):
            return chunks
        images: set[int] = set()
        candidate: int | None = start
        while candidate is not None:
            taken[candidate] = True
            images.update(pairs[candidate])
            best = None  # (new images, pair) over the pairs touching the group that still fit
            for image in sorted(images):
                for index in touching[image]:
                    new = len(set(pairs[index]) - images)
                    if not taken[index] and len(images) + new <= max_images and (best is None or (new, index) < best):
                        best = (new, index)
            if best is not None:
                candidate = best[1]
            else:  # nothing touching fits: the next pair in order, if both its images fit
                candidate = next((i for i in range(start, len(pairs)) if not taken[i]), None)
                if candidate is not None and len(images | set(pairs[candidate])) > max_images:
                    candidate = None
        chunks.append(torch.tensor(sorted(images)))


def sweep_batches(num_images: int, first: Tensor, second: Tensor, batch_size: int) -> list[tuple[list[int], list[int]]]:
    """The batches of the second read sweep (`SweepPass`: passes 2 and 3 together), as (images, owned).

    First the `pair_chunks` of at most max(2, `batch_size`) images, then the images in no pair, `batch_size`
    at a time. `owned` are the images a batch adds to pass 2: each image in exactly one batch (the first
    that holds it); every image of a batch serves its pairs.
    """
    batches, seen = [], set()
    for chunk in pair_chunks(first, second, max(2, batch_size)) if first.numel() else []:
        images = chunk.tolist()
        batches.append((images, [i for i in images if i not in seen]))
        seen.update(images)
    rest = [i for i in range(num_images) if i not in seen]
    batches += [(rest[a : a + batch_size], rest[a : a + batch_size]) for a in range(0, len(rest), batch_size)]
    return batches


def _flat(rotations: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """{key: (overlap, angle)} as rows {"overlap/<key>": overlap, "angle/<key>": angle}; `_rotations` undoes it."""
    return {
        f"{name}/{key}": value for key, pair in rotations.items() for name, value in zip(("overlap", "angle"), pair)
    }


def _rotations(rows: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    return {key: (rows[f"overlap/{key}"], rows[f"angle/{key}"]) for key in spectra.ROTATION_KEYS}


# ------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class _Layer:
    """What every pass needs to know about the layer and the diagnostics asked for."""

    num_images: int
    tokens: int
    channels: int
    thresholds: tuple[float, ...]
    center: bool
    permutations: int
    num_pairs: int
    seed: int

    @property
    def all_p(self) -> list[float]:
        """The thresholds whose SVD ranks pass 1 keeps: the requested ones and the rotation ones."""
        return spectra.rank_thresholds(self.thresholds)

    def batch(self, indices: Tensor | Sequence[int], batch: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
        """(global indices `[b]` long on the CPU, features `[b, N, C]` centred as `diagnose_layer` does)."""
        x = spectra.prepare(batch, self.center)
        indices = torch.as_tensor(indices).to(device="cpu", dtype=torch.long).reshape(-1)
        if tuple(x.shape[1:]) != (self.tokens, self.channels):
            raise ValueError(
                f"batch must be [b, {self.tokens}, {self.channels}] (images, tokens, channels), got {tuple(x.shape)}"
            )
        if indices.numel() != x.shape[0] or not ((indices >= 0) & (indices < self.num_images)).all():
            raise ValueError(f"a batch of {x.shape[0]} images needs as many indices in [0, {self.num_images})")
        return indices, x


@dataclass
class _Rows:
    """Per-image rows of some images, kept with their global indices until `ordered` sorts them."""

    indices: list[Tensor] = field(default_factory=list)
    values: dict[str, list[Tensor]] = field(default_factory=dict)

    def add(self, indices: Tensor, **values: Tensor) -> None:
        self.indices.append(indices)
        for name, value in values.items():
            self.values.setdefault(name, []).append(value.cpu())

    def merge(self, other: _Rows) -> None:
        self.indices += other.indices
        for name, parts in other.values.items():
            self.values.setdefault(name, []).extend(parts)

    def ordered(self, num_images: int) -> dict[str, Tensor]:
        """Every row in dataset order; each of the `num_images` images must have come exactly once."""
        indices = torch.cat(self.indices) if self.indices else torch.empty(0, dtype=torch.long)
        if not torch.equal(indices.sort().values, torch.arange(num_images)):
            missing = num_images - torch.unique(indices).numel()
            raise ValueError(
                f"the shards must hold each of the {num_images} images exactly once: got {indices.numel()} "
                f"images, {missing} missing"
            )
        order = indices.argsort()
        return {name: torch.cat(parts)[order] for name, parts in self.values.items()}


def _merged(shards: Sequence, kind: type):
    if not shards:
        raise ValueError(f"no {kind.__name__} to merge")
    if not all(isinstance(shard, kind) for shard in shards):
        raise TypeError(f"expected {kind.__name__} accumulators, got {[type(s).__name__ for s in shards]}")
    return reduce(lambda merged, shard: merged.merge(shard), shards[1:], shards[0])


# ------------------------------------------------------------------------------------- pass 1
@dataclass
class FirstPass:
    """Pass-1 accumulator of one shard: SVD ranks, SEP moments, token Gram (see the module docstring)."""

    layer: _Layer
    gram: Tensor
    tokens: int = 0
    permuted_sum: Tensor | None = None  # [R, C]: `spectra.permuted_sep_terms`' sums, added over batches
    permuted_count: Tensor | None = None  # [R]: its token counts, likewise
    rows: _Rows = field(default_factory=_Rows)

    def add(self, indices: Tensor | Sequence[int], batch: Tensor | np.ndarray) -> None:
        """Add a batch `[b, N, C]` of the images at global `indices` `[b]`."""
        layer = self.layer
        indices, x = layer.batch(indices, batch)
        rows = {"svd_rank": spectra.svd_rank(x, layer.all_p)}
        # As spectra.shared_basis sums it, so one batch of all the images gives its Gram bitwise.
        self.gram += spectra.token_gram_sum(x).cpu()
        self.tokens += x.shape[0] * x.shape[1]
        rows["sep_count"], rows["sep_curve"], rows["sep_m2"] = spectra.image_sep_moments(x)
        if layer.permutations > 0:  # sep_permuted: [b, R, P] ratios
            sums, counts, rows["sep_permuted"] = spectra.permuted_sep_terms(x, layer.permutations, layer.seed)
            self.permuted_sum += sums.cpu()
            self.permuted_count += counts.cpu()
        self.rows.add(indices, **rows)

    def merge(self, other: FirstPass) -> FirstPass:
        """Fold another shard's accumulator into this one; returns self."""
        self.gram += other.gram
        self.tokens += other.tokens
        if self.permuted_sum is not None:
            self.permuted_sum += other.permuted_sum
            self.permuted_count += other.permuted_count
        self.rows.merge(other.rows)
        return self


# ------------------------------------------------------------------------------------- pass 2
@dataclass
class SecondPass:
    """Pass-2 accumulator of one shard: captured energy and rotation to the shared basis per image."""

    layer: _Layer
    eigenvectors: Tensor  # [C, C] float64, columns in descending eigenvalue order
    rotation_ranks: Tensor  # [I, len(ROTATION_THRESHOLDS)] long: SVD ranks of every image
    rows: _Rows = field(default_factory=_Rows)

    def add(self, indices: Tensor | Sequence[int], batch: Tensor | np.ndarray) -> None:
        """Add a batch `[b, N, C]` of the images at global `indices` `[b]`."""
        self.add_prepared(*self.layer.batch(indices, batch))

    @property
    def bases_columns(self) -> int:
        """As many columns as the in-memory path computes (its maximum rank over all images), so that each
        image's basis is the same product."""
        return int(self.rotation_ranks.max())

    def add_prepared(self, indices: Tensor, x: Tensor, bases: Tensor | None = None) -> None:
        """`add` of a batch already through `layer.batch`; `bases`: its `right_singular_bases`, if computed."""
        captured = spectra.captured_energy(x, self.eigenvectors)
        if bases is None:
            bases = spectra.right_singular_bases(x, self.bases_columns)
        rotations = spectra.rotations_to_shared(x, self.rotation_ranks[indices], self.eigenvectors, bases=bases)
        self.rows.add(indices, captured=captured, **_flat(rotations))

    def merge(self, other: SecondPass) -> SecondPass:
        """Fold another shard's accumulator into this one; returns self."""
        self.rows.merge(other.rows)
        return self


# ------------------------------------------------------------------------------------- pass 3
@dataclass
class PairPass:
    """Pass-3 accumulator: overlap and angle of each pair whose two images came in one batch."""

    layer: _Layer
    first: Tensor  # [M] long, global indices
    second: Tensor  # [M]
    sizes: Tensor  # [len(ROTATION_THRESHOLDS), M] long: k = min of the pair's two ranks
    bases_columns: int  # columns of the right singular bases (the maximum rank over all images)
    overlap: Tensor  # [len(ROTATION_THRESHOLDS), M] float64
    angle: Tensor  # same
    done: Tensor  # [M] bool

    def add(self, indices: Tensor | Sequence[int], batch: Tensor | np.ndarray) -> None:
        """Add a batch `[b, N, C]` of the images at global `indices` `[b]` (e.g. one of `pair_chunks`):
        computes every pair not yet done whose two images are both in it."""
        self.add_prepared(*self.layer.batch(indices, batch))

    def add_prepared(self, indices: Tensor, x: Tensor, bases: Tensor | None = None) -> None:
        """`add` of a batch already through `layer.batch`; `bases`: its `right_singular_bases`, if computed."""
        local = torch.full((self.layer.num_images,), -1, dtype=torch.long)
        local[indices] = torch.arange(indices.numel())
        a, b = local[self.first], local[self.second]
        todo = ((a >= 0) & (b >= 0) & ~self.done).nonzero().squeeze(-1)
        if todo.numel() == 0:
            return
        if bases is None:
            bases = spectra.right_singular_bases(x, self.bases_columns)
        for col in range(len(spectra.ROTATION_KEYS)):
            k_max = int(self.sizes[col].max())  # over all pairs, as pairwise_rotation pads
            overlap, angle = spectra.pair_angles(bases, a[todo], b[todo], self.sizes[col, todo], k_max)
            self.overlap[col, todo], self.angle[col, todo] = overlap.cpu(), angle.cpu()
        self.done[todo] = True

    def merge(self, other: PairPass) -> PairPass:
        """Fold another accumulator's pairs into this one; returns self. A pair done in both is the same."""
        new = other.done & ~self.done
        self.overlap[:, new], self.angle[:, new] = other.overlap[:, new], other.angle[:, new]
        self.done |= other.done
        return self


# ---------------------------------------------------------------------------- passes 2 and 3 together
@dataclass
class SweepPass:
    """Passes 2 and 3 in one read of the images (`sweep_batches`): the images a batch owns go to pass 2,
    all of them serve pass 3's pairs; each image's right singular bases are computed once for both."""

    second: SecondPass
    pairs: PairPass | None  # None without pairs

    def add(self, indices: Tensor | Sequence[int], batch: Tensor | np.ndarray, owned: Sequence[int] | None = None):
        """Add a batch `[b, N, C]` of the images at global `indices`; `owned` (default: all) go to pass 2."""
        indices, x = self.second.layer.batch(indices, batch)
        bases = spectra.right_singular_bases(x, self.second.bases_columns)
        keep = (
            torch.ones_like(indices, dtype=torch.bool)
            if owned is None
            else torch.isin(indices, torch.tensor(owned, dtype=torch.long))
        )
        if keep.any():
            self.second.add_prepared(indices[keep], x[keep.to(x.device)], bases[keep.to(bases.device)])
        if self.pairs is not None:
            self.pairs.add_prepared(indices, x, bases)

    def merge(self, other: SweepPass) -> SweepPass:
        """Fold another shard's accumulator into this one; returns self."""
        self.second.merge(other.second)
        if self.pairs is not None:
            self.pairs.merge(other.pairs)
        return self


def results_only(accumulator):
    """A filled accumulator as the driver needs it back: a pass-2 one (alone or in a `SweepPass`) without the
    shared basis and ranks the driver gave it (24 x 8 MB per worker for ViT-Large: pickled, stored and
    unpickled once more at the end of the pass for nothing). Other kinds are returned as they are."""
    if isinstance(accumulator, SecondPass):
        return replace(accumulator, eigenvectors=torch.empty(0), rotation_ranks=torch.empty(0, dtype=torch.long))
    if isinstance(accumulator, SweepPass):
        return replace(accumulator, second=results_only(accumulator.second))
    return accumulator


# ----------------------------------------------------------------------------------- the driver
class LayerStream:
    """Driver side of the streaming diagnostics of one layer of `num_images` images `[N, C]` each.

    The arguments after the shape mean what they mean for `spectra.diagnose_layer`. Per pass: hand each
    shard an empty accumulator (`first_pass()`, `second_pass()`, `pair_pass()`), let it `add(indices,
    batch)` its batches, and pass the filled accumulators to `finish_first`, `finish_second`,
    `finish_pairs`. Then `result()` is `diagnose_layer`'s dict and `arrays()` `per_image_arrays`'.
    """

    def __init__(
        self,
        num_images: int,
        tokens: int,
        channels: int,
        thresholds: Sequence[float] = spectra.DEFAULT_THRESHOLDS,
        center: bool = False,
        permutations: int = 0,
        num_pairs: int = 500,
        seed: int = 0,
    ):
        if min(num_images, tokens, channels) < 1:
            raise ValueError(f"features are empty: shape {(num_images, tokens, channels)}")
        self.layer = _Layer(
            num_images, tokens, channels, spectra.check_thresholds(thresholds), center, permutations, num_pairs, seed
        )
        self._first: dict[str, Tensor] | None = None
        self._second: dict[str, Tensor] | None = None
        self._pairs: PairPass | None = None
        if num_images >= 2 and num_pairs >= 1:
            self.pairs = rotation_pairs(num_images, num_pairs, seed)
        else:  # diagnose_layer reports no pairwise rotation
            self.pairs = (torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))

    # ----------------------------------------------------------------------------------- pass 1
    def first_pass(self) -> FirstPass:
        """An empty pass-1 accumulator for one shard."""
        c, r = self.layer.channels, self.layer.permutations
        state = FirstPass(self.layer, torch.zeros(c, c, dtype=torch.float64))
        if r > 0:
            state.permuted_sum = torch.zeros(r, c, dtype=torch.float64)
            state.permuted_count = torch.zeros(r, dtype=torch.float64)
        return state

    def finish_first(self, *shards: FirstPass) -> None:
        """Merge the shards' pass-1 accumulators (together they hold every image once; the first one absorbs
        the others); build the shared basis as `spectra.shared_basis` does."""
        merged = _merged(shards, FirstPass)
        self._first = merged.rows.ordered(self.layer.num_images)
        self._first["eigenvalues"], self._first["eigenvectors"] = spectra.basis_from_gram(merged.gram, merged.tokens)
        if merged.permuted_sum is not None:
            self._first["permuted_sum"], self._first["permuted_count"] = merged.permuted_sum, merged.permuted_count

    def _rotation_ranks(self) -> Tensor:
        first = self._require(self._first, "finish_first")
        return spectra.ranks_at(first["svd_rank"], self.layer.thresholds, spectra.ROTATION_THRESHOLDS)

    # ----------------------------------------------------------------------------------- pass 2
    def second_pass(self) -> SecondPass:
        """An empty pass-2 accumulator for one shard (needs `finish_first`)."""
        ranks = self._rotation_ranks()
        return SecondPass(self.layer, self._first["eigenvectors"], ranks)

    def finish_second(self, *shards: SecondPass) -> None:
        """Merge the shards' pass-2 accumulators (together they hold every image once)."""
        self._second = _merged(shards, SecondPass).rows.ordered(self.layer.num_images)

    # ----------------------------------------------------------------------------------- pass 3
    def pair_pass(self) -> PairPass:
        """An empty pass-3 accumulator (needs `finish_first`); feed it batches of `pair_chunks(*self.pairs, m)`."""
        ranks = self._rotation_ranks()
        first, second = self.pairs
        sizes = torch.minimum(ranks[first], ranks[second]).mT.contiguous()
        shape = (len(spectra.ROTATION_KEYS), first.numel())
        return PairPass(
            self.layer,
            first,
            second,
            sizes,
            int(ranks.max()),
            torch.zeros(shape, dtype=torch.float64),
            torch.zeros(shape, dtype=torch.float64),
            torch.zeros(first.numel(), dtype=torch.bool),
        )

    def finish_pairs(self, *shards: PairPass) -> None:
        """Merge the pass-3 accumulators; together they must have done every pair (none to pass without pairs)."""
        if self.pairs[0].numel() == 0 and not shards:
            return
        merged = _merged(shards, PairPass)
        if not merged.done.all():
            raise ValueError(f"{int((~merged.done).sum())} of {merged.done.numel()} pairs never had both images")
        self._pairs = merged

    def _pairwise(self) -> dict[str, tuple[Tensor, Tensor]]:
        if self.pairs[0].numel() == 0:
            return {}
        pairs = self._require(self._pairs, "finish_pairs")
        return {key: (pairs.overlap[col], pairs.angle[col]) for col, key in enumerate(spectra.ROTATION_KEYS)}

    # --------------------------------------------------------------------------- passes 2 and 3 in one
    def sweep_pass(self) -> SweepPass:
        """An empty accumulator for passes 2 and 3 in one read (needs `finish_first`); feed it the batches of
        `sweep_batches(num_images, *self.pairs, batch_size)` with their `owned` images."""
        return SweepPass(self.second_pass(), self.pair_pass() if self.pairs[0].numel() else None)

    def finish_sweep(self, *shards: SweepPass) -> None:
        """Merge the `SweepPass` accumulators: `finish_second` and `finish_pairs` of their halves."""
        merged = _merged(shards, SweepPass)
        self.finish_second(merged.second)
        self.finish_pairs(*([merged.pairs] if merged.pairs is not None else []))

    # ---------------------------------------------------------------------------------- results
    @staticmethod
    def _require(value, step: str):
        if value is None:
            raise RuntimeError(f"call {step} first")
        return value

    def _values(self) -> spectra.LayerValues:
        first = self._require(self._first, "finish_first")
        second = self._require(self._second, "finish_second")
        pairwise = self._pairwise()
        return spectra.LayerValues(
            first["svd_rank"], first["eigenvalues"], second["captured"], _rotations(second), pairwise
        )

    def result(self) -> dict:
        """`spectra.diagnose_layer`'s dict for the layer: same keys, same order, same numbers."""
        values, first, layer = self._values(), self._first, self.layer
        permuted = None
        if layer.permutations > 0:  # the sums over every shard, the ratios [I, R, P] in dataset order
            permuted = first["permuted_sum"], first["permuted_count"], first["sep_permuted"]
        sep = spectra.sep_report(first["sep_count"], first["sep_curve"], first["sep_m2"], permuted, layer.seed)
        return spectra.layer_report(values, layer.thresholds, layer.tokens, sep)

    def arrays(self) -> dict[str, np.ndarray]:
        """`ray_tasks.per_image_arrays`' dict for the layer: per-image ranks, overlaps and angles, numpy."""
        return spectra.layer_arrays(self._values(), self.layer.thresholds)
