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
- several characters (``harmonize_characters``): each character is matched and gated on the original R_i; a
  position in several characters' masks takes the character whose match has the higher cosine (the first on a tie);
- RFH dropout p_rfh: each position r is skipped with probability p, one Bernoulli per position of the frame (so a
  position's draw does not depend on the masks), from a CPU generator the caller seeds with
  ``stable_seed(run_seed, step_key, layer_key, "rfh", frame)``.

Memory: ``match_references`` keeps one float32 unit-length copy of the n queries and of one reference's m tokens at a
time and scores them in chunks of at most ``MATCH_CHUNK_ELEMENTS`` cosines, so its peak is about
4·C·(n + m) bytes + 32 MB; at the SDXL 64-grid (n, m ≤ 4096, C = 640) that is ≤ 53 MB (21 MB + 32 MB). No n × m
matrix is ever whole. ``harmonize_characters`` adds the gathered subject tokens (in the features' dtype) and one
(N, C) target.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .masked_sharing import device_index
from .subject_masks import otsu_threshold

MATCH_CHUNK_ELEMENTS = 1 << 23  # cosines per chunk: 8 M float32 = 32 MB
References = Sequence[tuple[torch.Tensor, torch.Tensor]]  # (features (Nr, C), bool subject mask (Nr,))


def _unit_rows(rows: torch.Tensor) -> torch.Tensor:
    """(n, C) -> float32 (n, C) rows of unit length (zero rows stay zero), in one float32 copy."""
    unit = rows.to(torch.float32, copy=True)
    return unit.div_(unit.norm(dim=1, keepdim=True).clamp_min_(1e-12))


def match_references(queries: torch.Tensor, references: Sequence[torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest reference token by cosine similarity (Eq. 10) for every query.

    queries: (n, C); references[k]: (m_k, C) subject tokens of reference k (m_k may be 0), any float dtype.
    Returns (cosine float32 (n,), reference k int64 (n,), position in references[k] int64 (n,)); a query with no
    reference token at all gets cosine −inf and reference −1. Cosines are float32 dot products of normalised
    vectors (a zero vector has cosine 0 with everything).
    """
    n = queries.shape[0]
    device = queries.device
    best = torch.full((n,), float("-inf"), dtype=torch.float32, device=device)
    which = torch.full((n,), -1, dtype=torch.long, device=device)
    where = torch.zeros((n,), dtype=torch.long, device=device)
    if n == 0:
        return best, which, where
    unit_queries = _unit_rows(queries)
    for k, keys in enumerate(references):
        if keys.shape[0] == 0:
            continue
        unit_keys_t = _unit_rows(keys.to(device)).T
        chunk = max(1, MATCH_CHUNK_ELEMENTS // keys.shape[0])
        for start in range(0, n, chunk):
            part = slice(start, start + chunk)
            cosine, position = (unit_queries[part] @ unit_keys_t).max(dim=1)
            better = cosine > best[part]  # strict: the earlier reference keeps a tie
            best[part] = torch.where(better, cosine, best[part])
            which[part] = torch.where(better, k, which[part])
            where[part] = torch.where(better, position, where[part])
    return best, which, where


def correspondence_gate(cosines: torch.Tensor) -> torch.Tensor:
    """Our gate for "sufficiently high correspondence": bool like ``cosines``, True above Otsu's threshold.

    Fewer than two distinct values (no contrast to split) pass every position.
    """
    if cosines.numel() == 0 or torch.unique(cosines).numel() < 2:
        return torch.ones_like(cosines, dtype=torch.bool)
    return cosines > otsu_threshold(cosines)


def _check(features: torch.Tensor, mask: torch.Tensor, what: str) -> None:
    if features.dim() != 2 or mask.dtype != torch.bool or tuple(mask.shape) != (features.shape[0],):
        raise ValueError(f"harmonize: {what} features {tuple(features.shape)} need a bool ({features.shape[0]},) "
                         f"mask, got {mask.dtype} {tuple(mask.shape)}")


def harmonize_characters(features: torch.Tensor, characters: Sequence[tuple[torch.Tensor, References]],
                         strength: float = 0.3, dropout: float = 0.0,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """RFH (Eq. 11) of one frame for several characters.

    features: (N, C) R_i; characters[c] = (bool (N,) mask M_i of character c, references): the references'
    (features (Nr, C), bool (Nr,) subject mask of character c) pairs, frames other than i. strength: γ in [0, 1].
    dropout: p_rfh in [0, 1] (> 0 needs ``generator``, a seeded CPU generator). Returns (N, C) in features' dtype;
    positions outside every mask, ungated or dropped keep their exact values. ``features`` is never modified; it is
    returned itself when nothing is harmonised (γ = 0, p = 1, empty masks).
    """
    if not 0.0 <= strength <= 1.0 or not 0.0 <= dropout <= 1.0:
        raise ValueError(f"harmonize: strength {strength} and dropout {dropout} must lie in [0, 1]")
    if dropout > 0.0 and generator is None:
        raise ValueError("harmonize: dropout > 0 needs a generator seeded with stable_seed(..., 'rfh', frame)")
    if strength == 0.0 or dropout == 1.0:
        return features
    num_tokens, device = features.shape[0], features.device
    best = torch.full((num_tokens,), float("-inf"), dtype=torch.float32, device=device)
    target = None  # (N, C): the chosen match of every harmonised position
    for mask, references in characters:
        _check(features, mask, "frame")
        positions = device_index(mask.cpu().nonzero().flatten(), device)
        tokens = []
        for ref_features, ref_mask in references:
            _check(ref_features, ref_mask, "reference")
            if ref_features.shape[1] != features.shape[1]:
                raise ValueError(f"harmonize: reference has {ref_features.shape[1]} channels, the frame "
                                 f"{features.shape[1]}")
            tokens.append(ref_features.index_select(0, device_index(ref_mask.cpu().nonzero().flatten(),
                                                                    ref_features.device)))
        cosine, which, where = match_references(features[positions], tokens)
        matched = which >= 0
        gated = matched.clone()
        gated[matched] = correspondence_gate(cosine[matched])
        better = gated & (cosine > best[positions])  # strict: the earlier character keeps a tie
        positions, cosine, which, where = positions[better], cosine[better], which[better], where[better]
        best[positions] = cosine
        if target is None and positions.numel():
            target = torch.empty_like(features)
        for k, ref_tokens in enumerate(tokens):
            chosen = which == k
            if chosen.any():
                target[positions[chosen]] = ref_tokens.to(device=device, dtype=features.dtype)[where[chosen]]
    selected = best > float("-inf")
    if dropout > 0.0:
        keep = torch.rand(num_tokens, generator=generator, dtype=torch.float64) >= dropout
        selected &= keep.to(device)
    if target is None or not selected.any():
        return features
    index = selected.nonzero().flatten()
    output = features.clone()
    output[index] = torch.lerp(features[index], target[index], strength)
    return output


def harmonize(features: torch.Tensor, mask: torch.Tensor, references: References, strength: float = 0.3,
              dropout: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """RFH (Eq. 11) of one frame for one character: ``harmonize_characters`` with a single (mask, references)."""
    return harmonize_characters(features, [(mask, references)], strength, dropout, generator)
