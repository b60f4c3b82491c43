"""StorySync Regional Feature Harmonization (RFH), host-free.

Paper: StorySync (Gaur et al., arXiv 2508.03735) §3.2.2, Eqs. 9-11, App. A.4 (γ = 0.3), §3.3 last paragraph (RFH
dropout); methods.md §5.1 steps 3 and 5, §5.3 "RFH cost".

R_i are the self-attention output features of frame i at one layer (cond rows only), (N, C). For each subject
position r of frame i (mask M_i) the nearest subject position of a reference frame j ≠ i is found by cosine
similarity: Eq. 10 takes the argmax of a softmax over cos/τ (Eq. 9), which is the argmax of the cosine, so τ plays
no part. Eq. 11 then moves the gated positions towards their match:
``R̂_i(r) = R_i(r) + γ·(R_j(match) − R_i(r))``, computed as ``torch.lerp`` (γ = 0 and γ = 1 are exact).

Our choices (the paper leaves them open, methods.md §5.1 step 3, §5.2):
- gate ("sufficiently high correspondence"): Otsu (``subject_masks.otsu_threshold``) over the best cosines of the
  positions of M_i that found a match; only positions above the threshold are harmonised; with fewer than two
  distinct cosines every matched position is;
- several references: per r the reference with the highest cosine (the first on a tie);
- several characters: each character is matched and gated on the original R_i; a position in several characters'
  masks takes the character whose match has the higher cosine (on a tie the character met first, in the order of
  the frames' mask dictionaries);
- RFH dropout p_rfh: each position r is skipped with probability p, one Bernoulli per position of the frame (so a
  position's draw does not depend on the masks), from a CPU generator the caller seeds with
  ``stable_seed(run_seed, step_key, layer_key, "rfh", frame)``.

Batching (``harmonize_rows``): one layer call harmonises every cond row at once. Per character, the subject
positions of all target rows are the queries and the subject tokens of all sources (in-batch frames, bank entries)
are the keys of one matrix product per query chunk; a 0 / −inf bias keeps each row to the sources it may read
(never its own frame; Eq. 13's references). The gate is an Otsu threshold per row over that row's best cosines
(``subject_masks.segment_otsu_thresholds``), so the result equals harmonising each row alone. Characters stay a
loop (our choice): batching them as well would score every character's queries against every other character's
keys (masked out afterwards), up to C× the cosine products for C characters in disjoint regions, to save one fixed
chain of kernels per character (most stories have one or two).

Memory: one float32 unit-length copy of the n queries and of the m keys, scored in chunks of at most
``MATCH_CHUNK_ELEMENTS`` cosines (with their bias), so the peak is about 4·C·(n + m) bytes + 64 MB; at the SDXL
64-grid with 8 frames of 30 % subject (n = m ≈ 9 830, C = 640) that is ≈ 114 MB. No n × m matrix is ever whole.
The output adds one (R, N, C) copy and the chosen match of every touched position.

Host contract (GPU): which positions and tokens take part is read from the masks, which live on the CPU
(``story_sync``); everything that depends on feature values (matches, gate, choice between characters, dropout
mask) stays a tensor op, so a CUDA caller's queue never waits for the host. A layer call costs a few dozen kernel
launches whatever the number of frames.
"""
from __future__ import annotations

from typing import Collection, Mapping, Sequence

import torch

from ..common.async_index import device_index
from .subject_masks import otsu_thresholds, segment_otsu_thresholds

MATCH_CHUNK_ELEMENTS = 1 << 23  # cosines per chunk: 8 M float32 = 32 MB
References = Sequence[tuple[torch.Tensor, torch.Tensor]]  # (features (Nr, C), bool subject mask (Nr,))
Source = tuple[torch.Tensor, Mapping[str, torch.Tensor]]  # (features (Ns, C), {character: bool (Ns,) mask})


def _unit_rows(rows: torch.Tensor) -> torch.Tensor:
    """(n, C) -> float32 (n, C) rows of unit length (zero rows stay zero), in one float32 copy."""
    unit = rows.to(torch.float32, copy=True)
    return unit.div_(unit.norm(dim=1, keepdim=True).clamp_min_(1e-12))


def _nearest(unit_queries: torch.Tensor, unit_keys: torch.Tensor,
             bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best cosine (+ bias) and key index of every unit query against unit keys (m ≥ 1), in query chunks of at most
    ``MATCH_CHUNK_ELEMENTS`` cosines; the first key on a tie. ``bias`` = (table (U, S) float32, query group (n,),
    key group (m,)) adds ``table[query group, key group]``, built per chunk."""
    n, m = unit_queries.shape[0], unit_keys.shape[0]
    chunk = max(1, MATCH_CHUNK_ELEMENTS // m)
    values, indices = [], []
    for start in range(0, n, chunk):
        cosine = unit_queries[start:start + chunk] @ unit_keys.T
        if bias is not None:
            table, query_group, key_group = bias
            cosine += table.index_select(0, query_group[start:start + chunk]).index_select(1, key_group)
        best = cosine.max(dim=1)
        values.append(best.values)
        indices.append(best.indices)
    return (values[0], indices[0]) if len(values) == 1 else (torch.cat(values), torch.cat(indices))


def match_references(queries: torch.Tensor, references: Sequence[torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest reference token by cosine similarity (Eq. 10) for every query.

    queries: (n, C); references[k]: (m_k, C) subject tokens of reference k (m_k may be 0), any float dtype.
    Returns (cosine float32 (n,), reference k int64 (n,), position in references[k] int64 (n,)); a query with no
    reference token at all gets cosine −inf and reference −1. Cosines are float32 dot products of normalised
    vectors (a zero vector has cosine 0 with everything); on a tie the earlier reference, then the earlier token.
    """
    n, device = queries.shape[0], queries.device
    sizes = [int(keys.shape[0]) for keys in references]
    if n == 0 or sum(sizes) == 0:
        return (torch.full((n,), float("-inf"), dtype=torch.float32, device=device),
                torch.full((n,), -1, dtype=torch.long, device=device),
                torch.zeros((n,), dtype=torch.long, device=device))
    keys = torch.cat([keys.to(device) for keys in references if keys.shape[0]])
    best, flat = _nearest(_unit_rows(queries), _unit_rows(keys))
    owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))  # flat key -> reference k
    which = device_index(owner, device)[flat]
    return best, which, flat - device_index(torch.tensor([0] + sizes[:-1]).cumsum(0), device)[which]


def correspondence_gate(cosines: torch.Tensor) -> torch.Tensor:
    """Our gate for "sufficiently high correspondence": bool like ``cosines`` (n ≥ 0,), True above Otsu's threshold.

    Fewer than two distinct values (no contrast to split) pass every position. No host synchronisation.
    """
    values = cosines.to(torch.float64)
    if values.numel() == 0:
        return torch.ones_like(values, dtype=torch.bool)
    return (values > otsu_thresholds(values.reshape(-1))) | (values.amax() <= values.amin())


def _check(features: torch.Tensor, mask: torch.Tensor, what: str) -> None:
    if features.dim() != 2 or mask.dtype != torch.bool or tuple(mask.shape) != (features.shape[0],):
        raise ValueError(f"harmonize: {what} features {tuple(features.shape)} need a bool ({features.shape[0]},) "
                         f"mask, got {mask.dtype} {tuple(mask.shape)}")


def _positions(mask: torch.Tensor, found: dict[int, torch.Tensor]) -> torch.Tensor:
    """True positions of a mask, once per mask object and call (a frame's mask serves as query and as key).
    Masks live on the CPU (``story_sync``): no device sync."""
    if id(mask) not in found:
        found[id(mask)] = mask.cpu().nonzero().flatten()
    return found[id(mask)]


def _character_match(flat: torch.Tensor, num_tokens: int, targets, keys_flat: torch.Tensor, key_offsets,
                     sources, readable, character: str, found: dict[int, torch.Tensor]):
    """One character's matches over every target row: (query flat positions, CPU and device int64 (n,), best
    cosines (n,), gate (n,), matched key tokens (n, C)), or None when no target row has both positions and readable
    tokens. ``keys_flat`` is every source's features concatenated ((Σ Ns, C)), source s starting at
    ``key_offsets[s]``. Every index this needs goes to the device in one asynchronous copy."""
    device = flat.device
    key_index, key_source = [], []
    for s, (_, masks) in enumerate(sources):
        if character in masks:
            positions = _positions(masks[character], found)
            if positions.numel():
                key_index.append(key_offsets[s] + positions)
                key_source.append(torch.full((positions.numel(),), s))
    have = {int(part[0]) for part in key_source}
    queries, query_target, rows_used = [], [], []
    for t, (row, masks) in enumerate(targets):
        if character in masks and have & set(readable[t]):
            positions = _positions(masks[character], found)
            if positions.numel():
                queries.append(row * num_tokens + positions)
                query_target.append(torch.full((positions.numel(),), len(rows_used)))
                rows_used.append(t)
    if not queries:
        return None
    allowed = torch.zeros(len(rows_used), len(sources), dtype=torch.long)
    for u, t in enumerate(rows_used):
        allowed[u, list(readable[t])] = 1
    biased = not bool(allowed[:, sorted(have)].all())  # some row may not read some source (its own frame)
    parts = [torch.cat(queries), torch.cat(query_target), torch.cat(key_index), torch.cat(key_source),
             allowed.flatten()]
    sizes = [part.numel() for part in parts]
    query_flat, query_target, key_index, key_source, allowed = device_index(torch.cat(parts), device).split(sizes)
    bias = None
    if biased:
        table = torch.zeros(len(rows_used), len(sources), dtype=torch.float32, device=device).masked_fill_(
            allowed.view(len(rows_used), len(sources)) == 0, float("-inf"))
        bias = (table, query_target, key_source)
    key_tokens = keys_flat.index_select(0, key_index)
    best, index = _nearest(_unit_rows(flat.index_select(0, query_flat)), _unit_rows(key_tokens), bias)
    thresholds, constant = segment_otsu_thresholds(best, query_target, len(rows_used))
    gate = (best.to(torch.float64) > thresholds[query_target]) | constant[query_target]
    return parts[0], query_flat, best, gate, key_tokens[index]


def harmonize_rows(features: torch.Tensor, targets: Sequence[tuple[int, Mapping[str, torch.Tensor]]],
                   sources: Sequence[Source], readable: Sequence[Collection[int]], strength: float = 0.3,
                   dropout: float = 0.0, generators: Sequence[torch.Generator | None] | None = None) -> torch.Tensor:
    """RFH (Eq. 11) of several rows of one layer call at once.

    features: (R, N, C) self-attention outputs; targets[t] = (row of ``features``, {character: bool (N,) mask M}):
    the rows to harmonise; sources[s] = (features (Ns, C), {character: bool (Ns,) mask}): every frame that may serve
    as a reference (in-batch rows, bank entries), in tie order; readable[t]: the indices of the sources target t may
    read (never its own frame). strength γ, dropout p_rfh in [0, 1]; with p > 0 ``generators[t]`` is target t's
    seeded CPU generator (one Bernoulli per position of its row). Returns (R, N, C): ``features`` itself when
    nothing can move (γ = 0, p = 1, no position with a readable token), else a new tensor in which only gated,
    undropped subject positions of target rows differ. Equal to harmonising each target row on its own.
    """
    if not 0.0 <= strength <= 1.0 or not 0.0 <= dropout <= 1.0:
        raise ValueError(f"harmonize: strength {strength} and dropout {dropout} must lie in [0, 1]")
    if dropout > 0.0 and (generators is None or any(g is None for g in generators)):
        raise ValueError("harmonize: dropout > 0 needs a generator seeded with stable_seed(..., 'rfh', frame)")
    if len(readable) != len(targets) or (generators is not None and len(generators) != len(targets)):
        raise ValueError("harmonize: one readable set (and generator) per target row")
    rows, num_tokens, channels = features.shape
    for row, masks in targets:
        for mask in masks.values():
            _check(features[row], mask, "frame")
    for source, masks in sources:
        for mask in masks.values():
            _check(source, mask, "reference")
        if source.shape[1] != channels:
            raise ValueError(f"harmonize: reference has {source.shape[1]} channels, the frame {channels}")
    if strength == 0.0 or dropout == 1.0 or not targets:
        return features
    device = features.device
    flat = features.reshape(rows * num_tokens, channels)
    best = torch.full((rows * num_tokens,), float("-inf"), dtype=torch.float32, device=device)
    target = None  # (R·N, C): the chosen match of every harmonised position
    touched = torch.zeros(rows * num_tokens, dtype=torch.bool)  # CPU: positions some character may move
    characters = list(dict.fromkeys(name for _, masks in targets for name in masks))
    key_offsets = torch.tensor([0] + [source.shape[0] for source, _ in sources]).cumsum(0).tolist()
    keys_flat = torch.cat([source.to(device=device, dtype=features.dtype) for source, _ in sources]) \
        if sources else None  # one copy of every source, so each character gathers its keys at once
    found_positions: dict[int, torch.Tensor] = {}
    for character in characters:
        found = _character_match(flat, num_tokens, targets, keys_flat, key_offsets, sources, readable, character,
                                 found_positions)
        if found is None:
            continue
        query_flat, positions, cosine, gate, matched = found
        touched[query_flat] = True
        current = best.index_select(0, positions)
        better = gate & (cosine > current)  # strict: the character met first keeps a tie
        best.index_copy_(0, positions, torch.where(better, cosine, current))
        if target is None:
            target = flat.clone()
        target.index_copy_(0, positions, torch.where(better.unsqueeze(1), matched,
                                                     target.index_select(0, positions)))
    if target is None:
        return features
    keep = torch.ones(rows * num_tokens, dtype=torch.bool)
    if dropout > 0.0:
        for (row, _), generator in zip(targets, generators):
            draw = torch.rand(num_tokens, generator=generator, dtype=torch.float64) >= dropout
            keep[row * num_tokens:(row + 1) * num_tokens] = draw
    cpu_index = touched.nonzero().flatten()
    index, kept = device_index(torch.cat([cpu_index, keep[cpu_index].long()]), device).split(cpu_index.numel())
    selected = (best.index_select(0, index) > float("-inf")) & (kept == 1)
    before = flat.index_select(0, index)
    moved = torch.lerp(before, target.index_select(0, index), strength)
    output = flat.clone()
    output.index_copy_(0, index, torch.where(selected.unsqueeze(1), moved, before))
    return output.view(rows, num_tokens, channels)


def harmonize_characters(features: torch.Tensor, characters: Sequence[tuple[torch.Tensor, References]],
                         strength: float = 0.3, dropout: float = 0.0,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """RFH (Eq. 11) of one frame for several characters (``harmonize_rows`` of one row).

    features: (N, C) R_i; characters[c] = (bool (N,) mask M_i of character c, references): the references'
    (features (Nr, C), bool (Nr,) subject mask of character c) pairs, frames other than i. strength: γ in [0, 1].
    dropout: p_rfh in [0, 1] (> 0 needs ``generator``, a seeded CPU generator). Returns (N, C) in features' dtype;
    positions outside every mask, ungated or dropped keep their exact values. ``features`` is never modified; it is
    returned itself when nothing can be harmonised (γ = 0, p = 1, empty masks or references), else a new tensor.
    """
    names = [str(c) for c in range(len(characters))]  # harmonize_rows checks every mask
    sources = [(ref_features, {name: ref_mask}) for name, (_, references) in zip(names, characters)
               for ref_features, ref_mask in references]
    batch = features.unsqueeze(0)
    result = harmonize_rows(batch, [(0, {n: mask for n, (mask, _) in zip(names, characters)})], sources,
                            [range(len(sources))], strength, dropout, [generator])
    return features if result is batch else result.squeeze(0)


def harmonize(features: torch.Tensor, mask: torch.Tensor, references: References, strength: float = 0.3,
              dropout: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """RFH (Eq. 11) of one frame for one character: ``harmonize_characters`` with a single (mask, references)."""
    return harmonize_characters(features, [(mask, references)], strength, dropout, generator)
