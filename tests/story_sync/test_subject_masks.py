"""StorySync subject masks (paper §3.1-3.2 Eqs. 2-4, §3.3; methods.md §5.1): each piece against a naive reference."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from lib_consistency.common.addresses import stable_seed
from lib_consistency.story_sync import subject_masks
from lib_consistency.story_sync.subject_masks import (MaskAccumulator, binarize, character_maps, drop_mask,
                                                      otsu_threshold, otsu_thresholds, resize_mask,
                                                      segment_otsu_thresholds, subject_probabilities)

# --- Otsu -------------------------------------------------------------------------------------------------------

def brute_force_otsu(values: torch.Tensor, bins: int = 256) -> float:
    """Every cut of numpy's bins-bin histogram over [min, max]; the first cut with the largest w0·w1·(mu0 - mu1)²."""
    data = values.reshape(-1).double().numpy()
    low, high = float(data.min()), float(data.max())
    counts, edges = np.histogram(data, bins=bins, range=(low, high))
    p = [c / counts.sum() for c in counts]
    centres = [(edges[i] + edges[i + 1]) / 2 for i in range(bins)]
    best, best_cut = -1.0, None
    for cut in range(bins - 1):
        w0, w1 = sum(p[:cut + 1]), sum(p[cut + 1:])
        if w0 == 0 or w1 == 0:
            continue
        mu0 = sum(pi * ci for pi, ci in zip(p[:cut + 1], centres[:cut + 1])) / w0
        mu1 = sum(pi * ci for pi, ci in zip(p[cut + 1:], centres[cut + 1:])) / w1
        between = w0 * w1 * (mu0 - mu1) ** 2
        if between > best:
            best, best_cut = between, cut
    return low + (best_cut + 1) * (high - low) / bins


@pytest.mark.parametrize("seed", range(4))
def test_otsu_matches_brute_force_on_bimodal_data(seed):
    g = torch.Generator().manual_seed(seed)
    share = 0.15 + 0.2 * seed
    n = 3000
    low = torch.randn(int(n * share), generator=g) * 0.05 + 0.1
    high = torch.randn(n - int(n * share), generator=g) * 0.1 + 0.6 + 0.1 * seed
    values = torch.cat([low, high])[torch.randperm(n, generator=g)].reshape(50, 60)
    assert otsu_threshold(values) == pytest.approx(brute_force_otsu(values), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_otsu_matches_brute_force_on_uniform_data(seed):
    g = torch.Generator().manual_seed(100 + seed)
    values = torch.rand(2000, generator=g) * (seed + 1) - seed
    assert otsu_threshold(values) == pytest.approx(brute_force_otsu(values), rel=1e-12, abs=1e-12)


def test_row_and_segment_otsu_equal_otsu_of_each_part():
    g = torch.Generator().manual_seed(9)
    rows = torch.cat([torch.rand(3, 50, generator=g) ** (1 + i) for i in range(2)])  # 6 rows of 50
    rows[4] = 0.5  # a constant row
    expected = torch.tensor([otsu_threshold(row) for row in rows], dtype=torch.float64)
    assert torch.equal(otsu_thresholds(rows), expected)
    lengths = [7, 1, 0, 19, 2, 30]  # segments of other sizes, an empty one, a single value
    values = torch.rand(sum(lengths), generator=g)
    values[26:28] = 0.25  # segment 4: two equal values
    segments = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    order = torch.randperm(len(values), generator=g)  # segments need not be contiguous
    thresholds, constant = segment_otsu_thresholds(values[order], segments[order], len(lengths))
    start = 0
    for i, n in enumerate(lengths):
        part = values[start:start + n]
        start += n
        assert bool(constant[i]) == (n == 0 or bool(part.max() == part.min()))
        if n:
            assert float(thresholds[i]) == otsu_threshold(part)


def test_otsu_of_a_constant_is_its_value_and_binarizes_to_nothing():
    values = torch.full((2, 16), 0.25)
    assert otsu_threshold(values) == 0.25
    assert not binarize(values).any()


# --- cross-attention probabilities ------------------------------------------------------------------------------

def naive_probabilities(q, k, heads, columns):
    """Explicit per-row, per-head float64 softmax over the text keys, mean over heads."""
    q, k = q.double(), k.double()
    rows, queries, width = q.shape
    dim = width // heads
    out = torch.zeros(rows, queries, len(columns), dtype=torch.float64)
    for r in range(rows):
        for h in range(heads):
            qh, kh = q[r, :, h * dim:(h + 1) * dim], k[r, :, h * dim:(h + 1) * dim]
            logits = qh @ kh.T / math.sqrt(dim)
            weights = torch.exp(logits - logits.max(1, keepdim=True).values)
            weights = weights / weights.sum(1, keepdim=True)
            out[r] += weights[:, list(columns)] / heads
    return out


@pytest.mark.parametrize("tokens", [77, 154])
@pytest.mark.parametrize("chunk", [1 << 24, 1])  # every head at once; one head per product
def test_subject_probabilities_match_naive_float64(monkeypatch, tokens, chunk):
    monkeypatch.setattr(subject_masks, "LOGIT_CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(tokens)
    heads, dim = 3, 8
    q = torch.randn(2, 40, heads * dim, generator=g) * 2
    k = torch.randn(2, tokens, heads * dim, generator=g) * 2
    columns = [0, 5, 6, tokens - 1, 5]
    got = subject_probabilities(q, k, heads, columns)
    assert got.shape == (2, 40, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), naive_probabilities(q, k, heads, columns), rtol=0, atol=1e-5)


@pytest.mark.parametrize("tokens", [77, 154])
def test_subject_probabilities_of_fp16_inputs_are_computed_in_float32(tokens):
    g = torch.Generator().manual_seed(7 + tokens)
    heads, dim = 4, 16
    q = (torch.randn(2, 32, heads * dim, generator=g) * 2).half()
    k = (torch.randn(2, tokens, heads * dim, generator=g) * 2).half()
    columns = [1, 2, 40]
    got = subject_probabilities(q, k, heads, columns)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), naive_probabilities(q, k, heads, columns), rtol=0, atol=1e-4)


def test_all_columns_sum_to_one_per_query():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 10, 12, generator=g) * 3, torch.randn(1, 77, 12, generator=g) * 3
    total = subject_probabilities(q, k, 2, range(77)).sum(2)
    torch.testing.assert_close(total, torch.ones(1, 10), rtol=0, atol=1e-5)


def test_character_maps_sum_each_group():
    g = torch.Generator().manual_seed(4)
    probabilities = torch.rand(3, 20, 5, generator=g)
    groups = [[0, 2], [4], [1, 3, 4]]
    got = character_maps(probabilities, groups)
    assert got.shape == (3, 3, 20)
    for r in range(3):
        for c, group in enumerate(groups):
            for i in range(20):
                expected = sum(float(probabilities[r, i, s]) for s in group)
                assert float(got[r, c, i]) == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError):
        character_maps(probabilities, [[0], []])


# --- planted regions --------------------------------------------------------------------------------------------

GRID = (8, 10)
HEADS, DIM = 2, 8


def planted_call(regions, tokens, background_token, seed=0):
    """Queries inside ``regions[c]`` (row-major index sets, one per character) point at character c's subject keys
    ``tokens[c]``; all other queries point at ``background_token``; every other key is small noise."""
    g = torch.Generator().manual_seed(seed)
    queries, width = GRID[0] * GRID[1], HEADS * DIM
    directions = torch.eye(DIM)
    k = torch.randn(1, 77, width, generator=g) * 0.1
    q = torch.randn(1, queries, width, generator=g) * 0.1
    for h in range(HEADS):
        part = slice(h * DIM, (h + 1) * DIM)
        k[0, background_token, part] += 6 * directions[DIM - 1]
        q[0, :, part] += 6 * directions[DIM - 1]
        for c, (region, own) in enumerate(zip(regions, tokens)):
            for token in own:
                k[0, token, part] += 6 * directions[c]
            q[0, sorted(region), part] += 6 * directions[c] - 6 * directions[DIM - 1]
    return q, k


def rectangle(top, left, height, width):
    return {(top + i) * GRID[1] + left + j for i in range(height) for j in range(width)}


def test_planted_region_is_recovered_exactly():
    region = rectangle(2, 3, 4, 5)
    q, k = planted_call([region], [[6]], background_token=30)
    maps = character_maps(subject_probabilities(q, k, HEADS, [6]), [[0]])
    mask = binarize(maps[0])
    assert set(torch.nonzero(mask[0]).flatten().tolist()) == region


def test_two_characters_each_recover_their_region():
    first, second = rectangle(0, 0, 3, 4), rectangle(4, 5, 4, 3)
    q, k = planted_call([first, second], [[5, 6], [9]], background_token=40, seed=1)
    columns = [5, 6, 9]
    maps = character_maps(subject_probabilities(q, k, HEADS, columns), [[0, 1], [2]])
    mask = binarize(maps[0])
    assert set(torch.nonzero(mask[0]).flatten().tolist()) == first
    assert set(torch.nonzero(mask[1]).flatten().tolist()) == second


# --- accumulation over layers -----------------------------------------------------------------------------------

def test_accumulator_means_over_layers_and_averages_duplicate_rows():
    g = torch.Generator().manual_seed(5)
    layers = [torch.rand(3, 2, 12, generator=g) for _ in range(3)]
    frames = [4, 1, 4]  # frame 4 twice in every layer: averaged first
    accumulator = MaskAccumulator()
    for maps in layers:
        accumulator.add(frames, maps, (3, 4))
    got = accumulator.mean_maps()
    assert sorted(got) == [1, 4]
    expected_1 = sum(layer[1] for layer in layers) / 3
    expected_4 = sum((layer[0] + layer[2]) / 2 for layer in layers) / 3
    torch.testing.assert_close(got[1], expected_1)
    torch.testing.assert_close(got[4], expected_4)


def test_accumulator_averages_a_frame_over_the_layers_that_had_it():
    a, b = torch.rand(2, 1, 6), torch.rand(1, 1, 6)
    accumulator = MaskAccumulator()
    accumulator.add([0, 1], a, (2, 3))
    accumulator.add([1], b, (2, 3))
    got = accumulator.mean_maps()
    torch.testing.assert_close(got[0], a[0])
    torch.testing.assert_close(got[1], (a[1] + b[0]) / 2)


def test_accumulator_refuses_another_grid_and_clear_empties():
    accumulator = MaskAccumulator()
    accumulator.add([0], torch.rand(1, 1, 12), (3, 4))
    with pytest.raises(ValueError):
        accumulator.add([0], torch.rand(1, 1, 12), (4, 3))
    with pytest.raises(ValueError):
        accumulator.add([0], torch.rand(1, 1, 10), (3, 4))
    accumulator.clear()
    assert accumulator.mean_maps() == {} and accumulator.grid is None
    accumulator.add([2], torch.ones(1, 1, 12), (4, 3))
    torch.testing.assert_close(accumulator.mean_maps()[2], torch.ones(1, 12))


# --- resize -----------------------------------------------------------------------------------------------------

def naive_resize(mask, source, target):
    """Each target pixel takes the source cell containing its centre (exact rational arithmetic)."""
    (h, w), (big_h, big_w) = source, target
    grid = mask.reshape(mask.shape[0], h, w)
    out = torch.zeros(mask.shape[0], big_h, big_w, dtype=torch.bool)

    def cell(i, size, big):
        centre = Fraction(2 * i + 1, 2 * big)
        return next(r for r in range(size) if Fraction(r, size) <= centre < Fraction(r + 1, size))

    for i in range(big_h):
        for j in range(big_w):
            out[:, i, j] = grid[:, cell(i, h, big_h), cell(j, w, big_w)]
    return out.reshape(mask.shape[0], big_h * big_w)


@pytest.mark.parametrize("source,target", [((38, 26), (76, 52)), ((38, 26), (19, 13)), ((19, 13), (38, 26)),
                                           ((7, 5), (3, 11)), ((16, 16), (64, 64)), ((5, 9), (5, 4))])
def test_resize_matches_naive_loop(source, target):
    g = torch.Generator().manual_seed(source[0] * 100 + target[1])
    mask = torch.rand(2, source[0] * source[1], generator=g) > 0.5
    got = resize_mask(mask, source, target)
    assert got.dtype == torch.bool
    assert torch.equal(got, naive_resize(mask, source, target))


def test_resize_to_the_same_grid_is_the_identity():
    mask = torch.rand(3, 38 * 26, generator=torch.Generator().manual_seed(9)) > 0.3
    assert torch.equal(resize_mask(mask, (38, 26), (38, 26)), mask)
    with pytest.raises(ValueError):
        resize_mask(mask, (26, 26), (38, 26))


# --- dropout ----------------------------------------------------------------------------------------------------

def test_drop_mask_is_seeded():
    mask = torch.rand(2, 500, generator=torch.Generator().manual_seed(1)) > 0.2
    seed = stable_seed(11, 3, "output_blocks.1.1", "mask", 2)
    assert torch.equal(drop_mask(mask, 0.5, seed), drop_mask(mask, 0.5, seed))
    assert not torch.equal(drop_mask(mask, 0.5, seed), drop_mask(mask, 0.5, seed + 1))


def test_drop_mask_zero_is_the_input_and_one_is_empty():
    mask = torch.rand(2, 100, generator=torch.Generator().manual_seed(2)) > 0.5
    assert drop_mask(mask, 0.0, 5) is mask
    assert not drop_mask(mask, 1.0, 5).any()
    with pytest.raises(ValueError):
        drop_mask(mask, 1.5, 5)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_drop_mask_keeps_about_one_minus_p_and_never_adds(p):
    full = torch.ones(2, 50_000, dtype=torch.bool)
    kept = drop_mask(full, p, 123).float().mean().item()
    assert abs(kept - (1 - p)) < 0.01
    mask = torch.rand(2, 50_000, generator=torch.Generator().manual_seed(3)) > 0.5
    dropped = drop_mask(mask, p, 123)
    assert not (dropped & ~mask).any()
    assert dropped.sum() < mask.sum()
