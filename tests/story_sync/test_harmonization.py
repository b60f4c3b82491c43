"""StorySync Regional Feature Harmonization (paper §3.2.2, Eqs. 9-11) against brute-force float64 references."""
from __future__ import annotations

import pytest
import torch

from lib_consistency.story_sync import harmonization
from lib_consistency.story_sync.harmonization import (correspondence_gate, harmonize, harmonize_characters,
                                                      harmonize_rows, match_references)

TOKENS, CHANNELS = 40, 6


def randn(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def random_mask(n: int, seed: int, p: float = 0.5) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) < p


def brute_force_matches(queries, references):
    """Per query, float64 (best cosine, reference, position, gap to the runner-up) over every reference token."""
    results = []
    for q in queries.double():
        candidates = sorted(((float(torch.nn.functional.cosine_similarity(q, key.double(), dim=0)), k, p)
                             for k, keys in enumerate(references) for p, key in enumerate(keys)), reverse=True)
        (best, k, p), runner_up = candidates[0], candidates[1][0]
        results.append((best, k, p, best - runner_up))
    return results


def frame_and_references(seed: int = 0, refs: int = 2):
    features = randn(TOKENS, CHANNELS, seed=seed)
    mask = random_mask(TOKENS, seed + 1)
    references = [(randn(TOKENS, CHANNELS, seed=seed + 10 + k), random_mask(TOKENS, seed + 20 + k))
                  for k in range(refs)]
    return features, mask, references


@pytest.mark.parametrize("chunk", [1 << 23, 7])  # one chunk, and chunks of a few queries
def test_matches_equal_brute_force_float64_argmax(monkeypatch, chunk):
    monkeypatch.setattr(harmonization, "MATCH_CHUNK_ELEMENTS", chunk)
    queries = randn(30, CHANNELS, seed=1)
    references = [randn(9, CHANNELS, seed=2), randn(0, CHANNELS, seed=3), randn(14, CHANNELS, seed=4)]
    cosine, which, where = match_references(queries, references)
    for i, (best, k, p, gap) in enumerate(brute_force_matches(queries, references)):
        assert abs(float(cosine[i]) - best) < 1e-6
        if gap > 1e-5:  # a clear maximum: the same token
            assert (int(which[i]), int(where[i])) == (k, p)
    assert (which != 1).all()  # the empty reference is never chosen


def test_strength_zero_and_dropout_one_return_the_input_bit_for_bit():
    features, mask, references = frame_and_references()
    generator = torch.Generator().manual_seed(3)
    assert torch.equal(harmonize(features, mask, references, strength=0.0), features)
    assert torch.equal(harmonize(features, mask, references, strength=0.5, dropout=1.0, generator=generator),
                       features)
    assert not torch.equal(harmonize(features, mask, references, strength=0.5), features)


def test_only_gated_subject_positions_move_towards_their_best_match():
    features, mask, references = frame_and_references(refs=3)
    before = features.clone()
    out = harmonize(features, mask, references, strength=0.3)
    assert torch.equal(features, before)  # the input is never modified
    assert torch.equal(out[~mask], features[~mask])  # outside M_i: bit for bit
    tokens = [ref[ref_mask] for ref, ref_mask in references]
    positions = mask.nonzero().flatten()
    matches = brute_force_matches(features[positions], tokens)
    gate = correspondence_gate(torch.tensor([m[0] for m in matches]))
    assert 0 < int(gate.sum()) < len(positions)  # the test data exercises both sides of the gate
    for r, (_, k, p, _), passed in zip(positions.tolist(), matches, gate.tolist()):
        expected = features[r].double() + 0.3 * (tokens[k][p].double() - features[r].double()) if passed \
            else features[r].double()
        torch.testing.assert_close(out[r].double(), expected, rtol=0, atol=1e-6)


def test_strength_one_copies_the_matched_features_exactly():
    features, mask, references = frame_and_references(seed=5)
    out = harmonize(features, mask, references, strength=1.0)
    tokens = [ref[ref_mask] for ref, ref_mask in references]
    positions = mask.nonzero().flatten()
    cosine, which, where = match_references(features[positions], tokens)
    for r, passed, k, p in zip(positions.tolist(), correspondence_gate(cosine).tolist(), which.tolist(),
                               where.tolist()):
        assert torch.equal(out[r], tokens[k][p] if passed else features[r])


def test_gate_excludes_planted_low_correspondence_positions():
    reference = randn(TOKENS, CHANNELS, seed=1)
    ref_mask = torch.ones(TOKENS, dtype=torch.bool)
    features = reference + 0.05 * randn(TOKENS, CHANNELS, seed=2)  # close copies of the reference
    planted = torch.tensor([3, 11, 27])
    features[planted] = -reference.sum(0) + 0.01 * randn(3, CHANNELS, seed=3)  # far from every reference token
    mask = torch.ones(TOKENS, dtype=torch.bool)
    out = harmonize(features, mask, [(reference, ref_mask)], strength=0.3)
    assert torch.equal(out[planted], features[planted])
    kept = torch.ones(TOKENS, dtype=torch.bool)
    kept[planted] = False
    assert not torch.isclose(out[kept], features[kept]).all(dim=1).any()  # every well-matched position moves


def test_gate_passes_everything_without_contrast():
    assert correspondence_gate(torch.full((5,), 0.7)).all()
    assert correspondence_gate(torch.tensor([0.2, 0.9, 0.9, 0.9])).tolist() == [False, True, True, True]


def test_empty_masks_change_nothing():
    features, mask, references = frame_and_references()
    no_refs = [(ref, torch.zeros(TOKENS, dtype=torch.bool)) for ref, _ in references]
    assert torch.equal(harmonize(features, mask, no_refs), features)
    assert torch.equal(harmonize(features, mask, []), features)
    assert torch.equal(harmonize(features, torch.zeros(TOKENS, dtype=torch.bool), references), features)


def test_dropout_is_seeded_and_only_skips_positions():
    features, mask, references = frame_and_references()
    full = harmonize(features, mask, references, strength=0.5)
    runs = [harmonize(features, mask, references, strength=0.5, dropout=0.5,
                      generator=torch.Generator().manual_seed(seed)) for seed in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    for out in runs:
        moved = (out != features).any(dim=1)
        assert torch.equal(out[moved], full[moved])  # a kept position is harmonised exactly as without dropout
        assert 0 < int(moved.sum()) < int((full != features).any(dim=1).sum())
    with pytest.raises(ValueError, match="generator"):
        harmonize(features, mask, references, dropout=0.5)


def test_overlapping_characters_take_the_better_match_from_the_original_features():
    features, _, references = frame_and_references(seed=8, refs=1)
    (ref, _), = references
    anna, ben = random_mask(TOKENS, 1), random_mask(TOKENS, 2)
    ref_anna, ref_ben = random_mask(TOKENS, 3), random_mask(TOKENS, 4)
    both = harmonize_characters(features, [(anna, [(ref, ref_anna)]), (ben, [(ref, ref_ben)])], strength=1.0)
    alone_anna = harmonize(features, anna, [(ref, ref_anna)], strength=1.0)
    alone_ben = harmonize(features, ben, [(ref, ref_ben)], strength=1.0)
    for r in range(TOKENS):
        moved = [out for out in (alone_anna, alone_ben) if not torch.equal(out[r], features[r])]
        if len(moved) == 2:  # in both characters and gated in both: the higher cosine wins
            cosines = [float(torch.nn.functional.cosine_similarity(features[r], out[r], dim=0)) for out in moved]
            moved = [moved[0] if cosines[0] >= cosines[1] else moved[1]]
        assert torch.equal(both[r], moved[0][r] if moved else features[r])
    assert (anna & ben).any()


def test_half_precision_features_stay_half_and_bad_shapes_are_refused():
    features, mask, references = frame_and_references()
    out = harmonize(features.half(), mask, [(ref.half(), m) for ref, m in references], strength=1.0)
    assert out.dtype == torch.float16
    with pytest.raises(ValueError, match="bool"):
        harmonize(features, mask.float(), references)
    with pytest.raises(ValueError, match="channels"):
        harmonize(features, mask, [(randn(TOKENS, CHANNELS + 1, seed=1), mask)])


@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_batched_rows_equal_each_row_harmonised_alone(dropout):
    """``harmonize_rows`` (one call per layer, as StorySync runs it) gives every row exactly what
    ``harmonize_characters`` gives it alone with the other frames as references; an [NC] row and rows of frames
    missing from the sources are left bit for bit."""
    frames = 4
    features = randn(frames, TOKENS, CHANNELS, seed=30)
    names = {0: ("anna",), 1: ("anna", "ben"), 2: ("ben",), 3: ()}
    masks = {f: {n: random_mask(TOKENS, 40 + 7 * f + i) for i, n in enumerate(names[f])} for f in range(frames)}
    readers = [0, 1, 2]  # frame 3 ([NC]) is no source
    sources = [(features[f], masks[f]) for f in readers]
    targets = [(f, masks[f]) for f in range(frames)]
    readable = [[i for i, r in enumerate(readers) if r != f] for f in range(frames)]
    seeds = [100 + f for f in range(frames)]
    generators = [torch.Generator().manual_seed(s) for s in seeds] if dropout else None
    batched = harmonize_rows(features, targets, sources, readable, 0.5, dropout, generators)
    assert not torch.equal(batched, features)
    for f in range(frames):
        characters = [(masks[f][n], [(features[r], masks[r][n]) for r in readers if r != f and n in masks[r]])
                      for n in names[f]]
        alone = harmonize_characters(features[f], characters, 0.5, dropout,
                                     torch.Generator().manual_seed(seeds[f]) if dropout else None)
        assert torch.equal(batched[f], alone), f
    assert torch.equal(batched[3], features[3])
