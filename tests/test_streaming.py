"""analysis.streaming agrees with the in-memory diagnostics (spectra.diagnose_layer, ray_tasks.per_image_arrays)
whatever the shard layout: integer ranks identical, every float within 1e-9 (absolute or relative)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from encmm.analysis import spectra
from encmm.analysis.ray_tasks import per_image_arrays
from encmm.analysis.streaming import LayerStream, pair_chunks, pair_images, rotation_pairs, sweep_batches

IMAGES = 23
THRESHOLDS = (0.8, 0.9, 0.95, 0.99)
NUM_PAIRS = 15
SEED = 3
TOLERANCE = 1e-9


def structured_features(images: int, tokens: int, channels: int, seed: int = 0) -> torch.Tensor:
    """`[I, N, C]` float64: per image a rank-r signal (r = 1..3, decaying scales) in a random subspace, a token
    offset (so centring matters) and noise, so that ranks vary across images. Ranks stay <= C / 2, where no two
    subspaces are forced to share a direction: a zero principal angle is arccos of round-off, ~1e-6 degrees
    of noise that no two computations reproduce."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(images):
        r = 1 + i % 3
        scales = 2.0 ** -torch.arange(r, dtype=torch.float64)
        left = torch.randn(tokens, r, generator=generator, dtype=torch.float64)
        right = torch.randn(r, channels, generator=generator, dtype=torch.float64)
        offset = 0.5 * torch.randn(1, channels, generator=generator, dtype=torch.float64)
        noise = 0.01 * torch.randn(tokens, channels, generator=generator, dtype=torch.float64)
        out.append(left * scales @ right + offset + noise)
    return torch.stack(out)


def shard_layouts(images: int) -> dict[int, list[list[list[int]]]]:
    """{shards: [shard: [batch: global indices]]} for 1, 2 and 7 uneven shards of shuffled images."""
    order = torch.randperm(images, generator=torch.Generator().manual_seed(11)).tolist()
    sizes = {1: [images], 2: [9, images - 9], 7: [1, 2, 5, 3, 4, 6, images - 21]}
    layouts = {}
    for shards, counts in sizes.items():
        assert sum(counts) == images
        bounds = np.cumsum([0, *counts])
        layouts[shards] = [[order[a:b][s : s + 4] for s in range(0, b - a, 4)] for a, b in zip(bounds[:-1], bounds[1:])]
    return layouts


def round_trip(state):
    """As a Ray worker receives or returns it."""
    return pickle.loads(pickle.dumps(state))


def stream_layer(features: torch.Tensor, layout: list[list[list[int]]], max_images: int = 5, sweep=False, **options):
    """Run the passes as a driver with one worker per shard would; returns (result, arrays). `sweep`: passes 2
    and 3 in one read (`SweepPass` over `sweep_batches`, dealt round-robin over the shards' workers), as
    `ray_tasks.stream_diagnostics` runs them; else three reads."""
    images, tokens, channels = features.shape
    stream = round_trip(LayerStream(images, tokens, channels, **options))

    def run(empty) -> list:
        shards = []
        for shard in layout:
            state = round_trip(empty())
            for indices in shard:
                state.add(torch.tensor(indices), features[indices])
            shards.append(round_trip(state))
        return shards

    stream.finish_first(*run(stream.first_pass))
    if sweep:
        workers = [round_trip(stream.sweep_pass()) for _ in layout]
        for position, (batch, owned) in enumerate(sweep_batches(images, *stream.pairs, max_images)):
            workers[position % len(workers)].add(batch, features[batch], owned)
        stream.finish_sweep(*map(round_trip, workers))
        return stream.result(), stream.arrays()
    stream.finish_second(*run(stream.second_pass))
    chunks = pair_chunks(*stream.pairs, max_images)
    workers = [round_trip(stream.pair_pass()) for _ in range(min(len(layout), len(chunks)))]
    for position, chunk in enumerate(chunks):
        workers[position % len(workers)].add(chunk, features[chunk])
    stream.finish_pairs(*map(round_trip, workers))
    return stream.result(), stream.arrays()


def assert_same(actual, expected, path: str = "") -> None:
    """Same structure and key order; ints and strings equal, floats within TOLERANCE (absolute or relative)."""
    assert type(actual) is type(expected), f"{path}: {type(actual).__name__} != {type(expected).__name__}"
    if isinstance(expected, dict):
        assert list(actual) == list(expected), f"{path}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert_same(actual[key], expected[key], f"{path}/{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), path
        for position, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{path}[{position}]")
    elif isinstance(expected, np.ndarray):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, path
        if np.issubdtype(expected.dtype, np.integer):
            np.testing.assert_array_equal(actual, expected, err_msg=path)
        else:
            np.testing.assert_allclose(actual, expected, rtol=TOLERANCE, atol=TOLERANCE, err_msg=path)
    elif isinstance(expected, float):
        assert abs(actual - expected) <= TOLERANCE * max(1.0, abs(expected)), f"{path}: {actual} != {expected}"
    else:
        assert actual == expected, f"{path}: {actual} != {expected}"


def assert_ranks_identical(actual: dict, expected: dict) -> None:
    """Everything computed from integer ranks and bandwidths is equal, not merely close."""
    for key in ("svd_rank", "pca_rank"):
        assert actual[key] == expected[key]
    for key in ("bandwidth", "image_bandwidth"):
        assert actual["sep"][key] == expected["sep"][key]
    for name, block in expected["sep"].get("permutation_statistics", {}).items():
        bandwidth = actual["sep"]["permutation_statistics"][name]["bandwidth"]
        for t, stats in block["bandwidth"].items():
            assert bandwidth[t]["mean"] == stats["mean"], (name, t)


@pytest.mark.parametrize("sweep", [False, True], ids=["three-reads", "two-reads"])
@pytest.mark.parametrize("tokens", [12, 6], ids=["N>C", "N<C"])
@pytest.mark.parametrize("center", [False, True], ids=["raw", "centered"])
@pytest.mark.parametrize("permutations", [0, 3])
def test_streamed_layer_equals_in_memory_for_every_shard_layout(tokens, center, permutations, sweep):
    features = structured_features(IMAGES, tokens, 10, seed=tokens + 2 * center)
    options = {"center": center, "permutations": permutations, "num_pairs": NUM_PAIRS, "seed": SEED}
    expected = spectra.diagnose_layer(features, THRESHOLDS, **options)
    expected_arrays = per_image_arrays(features, THRESHOLDS, center, NUM_PAIRS, SEED)
    ranks = expected_arrays["svd_rank"]
    assert len(np.unique(ranks[:, -1])) > 1, "the features should give ranks that vary across images"
    streamed = {}
    for shards, layout in shard_layouts(IMAGES).items():
        result, arrays = stream_layer(features, layout, sweep=sweep, thresholds=THRESHOLDS, **options)
        assert_same(result, expected, f"{shards} shards")
        assert_ranks_identical(result, expected)
        assert_same(arrays, expected_arrays, f"{shards} shards, arrays")
        streamed[shards] = [result, arrays]
    for shards in (2, 7):
        assert_same(streamed[shards], streamed[1], f"{shards} vs 1 shard")


@pytest.mark.parametrize("batch_size", [1, 2, 5, 40])
def test_sweep_batches_own_every_image_once_and_hold_both_images_of_every_pair(batch_size):
    first, second = rotation_pairs(30, 25, SEED)  # 25 pairs: some images in no pair
    batches = sweep_batches(30, first, second, batch_size)
    assert all(len(images) <= max(2, batch_size) for images, _ in batches)
    assert all(set(owned) <= set(images) for images, owned in batches)
    assert sorted(i for _, owned in batches for i in owned) == list(range(30))
    for a, b in zip(first.tolist(), second.tolist()):
        assert any(a in images and b in images for images, _ in batches), (a, b)
    assert sweep_batches(30, first, second, batch_size) == batches  # deterministic


def test_single_batch_of_float32_features_matches_bitwise_where_no_sum_is_reordered():
    features = structured_features(IMAGES, 12, 10).to(torch.float32)
    expected = spectra.diagnose_layer(features, THRESHOLDS, center=True, num_pairs=NUM_PAIRS, seed=SEED)
    options = {"thresholds": THRESHOLDS, "center": True, "num_pairs": NUM_PAIRS, "seed": SEED}
    result, _ = stream_layer(features, [[list(range(IMAGES))]], **options)
    assert result == expected


@pytest.mark.parametrize("center", [False, True], ids=["raw", "centered"])
def test_per_image_arrays_are_the_layer_arrays_of_the_layer_values(center):
    """The assembly `LayerStream.arrays()` shares (`spectra.layer_arrays`) gives `per_image_arrays` bitwise."""
    features = structured_features(9, 6, 10, seed=5)
    thresholds = spectra.check_thresholds(THRESHOLDS)
    x = spectra.prepare(features, center)
    arrays = spectra.layer_arrays(spectra.layer_values(x, thresholds, NUM_PAIRS, SEED), thresholds)
    expected = per_image_arrays(features, THRESHOLDS, center, NUM_PAIRS, SEED)
    assert list(arrays) == list(expected)
    for key, value in expected.items():
        assert arrays[key].dtype == value.dtype and np.array_equal(arrays[key], value), key


def test_rotation_pairs_are_the_pairs_pairwise_rotation_measures():
    features = structured_features(9, 12, 10)
    ranks = spectra.svd_rank(features, [0.9])[:, 0]
    overlap, _ = spectra.pairwise_rotation(features, ranks, 40, SEED)
    first, second = rotation_pairs(9, 40, SEED)
    assert bool((first != second).all())
    bases = spectra.right_singular_bases(features, int(ranks.max()))
    for o, a, b in zip(overlap.tolist(), first.tolist(), second.tolist()):
        k = int(min(ranks[a], ranks[b]))
        cosines = spectra.principal_cosines(bases[a, :, :k], bases[b, :, :k])
        assert abs(float(spectra.subspace_overlap(cosines)) - o) < 1e-12


@pytest.mark.parametrize("max_images", [2, 3, 8])
def test_pair_chunks_cover_every_pair_within_the_image_bound(max_images):
    first, second = rotation_pairs(30, 60, SEED)
    chunks = pair_chunks(first, second, max_images)
    assert all(chunk.numel() <= max_images for chunk in chunks)
    for a, b in zip(first.tolist(), second.tolist()):
        assert any(a in chunk.tolist() and b in chunk.tolist() for chunk in chunks)
    covered = torch.unique(torch.cat(chunks))
    assert torch.equal(covered, pair_images(first, second))


def test_zero_energy_image_raises_the_in_memory_error():
    features = structured_features(6, 12, 10)
    features[4] = 0.0
    with pytest.raises(ValueError) as in_memory:
        spectra.diagnose_layer(features)
    accumulator = LayerStream(6, 12, 10).first_pass()
    with pytest.raises(ValueError) as streamed:
        accumulator.add([3, 4, 5], features[3:])
    assert str(streamed.value) == str(in_memory.value) == "an image has zero energy: its rank is undefined"


def test_one_image_has_no_pairwise_rotation_as_in_memory():
    features = structured_features(1, 12, 10)
    result, arrays = stream_layer(features, [[[0]]], num_pairs=NUM_PAIRS, permutations=2)
    assert result["rotation"]["pairwise"] == {}
    assert_same(result, spectra.diagnose_layer(features, num_pairs=NUM_PAIRS, permutations=2))
    assert_same(arrays, per_image_arrays(features, spectra.DEFAULT_THRESHOLDS, False, NUM_PAIRS, 0))


@pytest.mark.parametrize("shard", [[0, 1, 2, 3], [0, 1, 2, 3, 4, 4]], ids=["missing", "repeated"])
def test_shards_that_do_not_hold_each_image_once_are_refused(shard):
    features = structured_features(5, 12, 10)
    stream = LayerStream(5, 12, 10)
    accumulator = stream.first_pass()
    accumulator.add(shard, features[shard])
    with pytest.raises(ValueError, match="exactly once"):
        stream.finish_first(accumulator)


def test_pairs_without_both_images_in_a_batch_are_refused():
    features = structured_features(5, 12, 10)
    stream = LayerStream(5, 12, 10, num_pairs=4)
    accumulator = stream.first_pass()
    accumulator.add(range(5), features)
    stream.finish_first(accumulator)
    pairs = stream.pair_pass()
    for image in range(5):  # one image per batch: no pair is ever complete
        pairs.add([image], features[image : image + 1])
    with pytest.raises(ValueError, match="4 of 4 pairs"):
        stream.finish_pairs(pairs)


def test_batches_of_wide_models_are_lowered_to_the_memory_budget_and_small_ones_are_not():
    from encmm.analysis.ray_tasks import BATCH_BYTES, batch_within_budget

    vit_large = [LayerStream(500, 196, 1024) for _ in range(24)]  # ~19 MB of block outputs per image
    lowered = batch_within_budget(64, vit_large)
    assert lowered * 24 * 196 * 1024 * 4 <= BATCH_BYTES < (lowered + 1) * 24 * 196 * 1024 * 4
    assert batch_within_budget(64, vit_large, itemsize=8) == lowered // 2
    deit_tiny = [LayerStream(100, 196, 192) for _ in range(12)]
    assert batch_within_budget(64, deit_tiny) == 64  # the digits defaults are untouched
    assert batch_within_budget(4, [LayerStream(2, 10**5, 10**4)]) == 1  # never less than one image


def test_a_feature_folder_reads_the_same_batches_it_always_did(tmp_path):
    from encmm.analysis.saved_features import open_saved_features

    rng = np.random.default_rng(0)
    images = [rng.standard_normal((3, 5, 4)).astype(np.float32) for _ in range(6)]
    for index, image in enumerate(images):
        np.save(tmp_path / f"{index:03d}.npy", image)
    reader = open_saved_features(tmp_path).select([2, 0])
    batch = reader.read([4, 1, 5])
    assert [tuple(layer.shape) for layer in batch] == [(3, 5, 4), (3, 5, 4)]
    for got, layer in zip(batch, [2, 0]):
        assert torch.equal(got, torch.from_numpy(np.stack([images[i][layer] for i in (4, 1, 5)])))


def test_accumulators_sent_back_without_the_basis_give_the_same_layer_result():
    from encmm.analysis.streaming import results_only

    features = torch.randn(6, 7, 5, dtype=torch.float64)

    def run(ship) -> dict:
        stream = LayerStream(6, 7, 5, num_pairs=4)
        first = [stream.first_pass(), stream.first_pass()]
        first[0].add([0, 1, 2], features[:3])
        first[1].add([3, 4, 5], features[3:])
        stream.finish_first(*[ship(a) for a in first])
        sweep = [stream.sweep_pass(), stream.sweep_pass()]
        for position, (indices, owned) in enumerate(sweep_batches(6, *stream.pairs, 3)):
            sweep[position % 2].add(indices, features[indices], owned)
        shipped = [ship(a) for a in sweep]
        if ship is results_only:
            assert all(a.second.eigenvectors.numel() == 0 for a in shipped)  # the basis stays with the driver
        stream.finish_sweep(*shipped)
        return stream.result()

    assert run(results_only) == run(lambda accumulator: accumulator)
