"""StorySync subject masks: where each character is in each frame, from the UNet's own cross-attention.

Paper: StorySync (Gaur et al., arXiv 2508.03735) §3.1-3.2, Eqs. 2-4, §3.3 last paragraph (mask dropout);
methods.md §5.1 steps 1 and 5.

Per chosen cross-attention layer l (cond rows only) the subject-token probabilities A^(l)_s (Eq. 2) are our own
per-patch softmax over the text keys (ConsiStory/P2P practice, methods.md §5.1 step 1 "Default"), mean over heads.
They are summed over each character's subject tokens (Eq. 4), averaged over the added layers (Eq. 3) and binarised
with Otsu per character map (Table 3a). Masks stay loose: no erosion (App. A.1).

Our choices:
- one map per character (Eq. 4's sum runs over that character's tokens), so a multi-character frame gets one mask
  per character;
- only layers at one grid size are averaged; the mask is resized (nearest, exact index maps) to each
  self-attention grid;
- mask dropout keeps each True position with probability 1 - p, one Bernoulli per (character, position), from one
  generator seeded by the caller with ``stable_seed(run_seed, step, grid_key, "mask", frame)``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..common.async_index import index_tensor

OTSU_BINS = 256


def _otsu_cut(histogram: torch.Tensor, low: torch.Tensor, span: torch.Tensor, bins: int) -> torch.Tensor:
    """(S, bins) float64 counts, (S, 1) minima and spans -> (S,) upper edge of the low class of each histogram."""
    probability = histogram / histogram.sum(-1, keepdim=True).clamp_min(1.0)
    centres = low + (torch.arange(bins, dtype=torch.float64, device=histogram.device) + 0.5) * span / bins
    weight_low = probability.cumsum(-1)
    mean_low_sum = (probability * centres).cumsum(-1)
    total_mean = mean_low_sum[..., -1:]
    weight_high = 1.0 - weight_low
    between = (total_mean * weight_low - mean_low_sum) ** 2 / (weight_low * weight_high)
    between = between.masked_fill((weight_low <= 0) | (weight_high <= 1e-12), -1.0)
    cut = between.argmax(-1, keepdim=True)  # the first maximum
    return (low + (cut + 1) * span / bins).squeeze(-1)


def segment_otsu_thresholds(values: torch.Tensor, segments: torch.Tensor, count: int,
                            bins: int = OTSU_BINS) -> tuple[torch.Tensor, torch.Tensor]:
    """Otsu per segment of a flat ``values`` (n,): ``segments`` (n,) int64 in [0, count) names each value's segment.

    Returns (thresholds float64 (count,), constant bool (count,)): each segment's Otsu threshold as
    ``otsu_thresholds`` defines it, and whether the segment has fewer than two distinct values (or none). One pass
    of tensor ops for every segment (min and max by ``scatter_reduce``, the histograms by ``scatter_add_``), no
    host synchronisation.
    """
    flat = values.detach().to(torch.float64)
    device = flat.device
    low = torch.full((count,), float("inf"), dtype=torch.float64, device=device).scatter_reduce(
        0, segments, flat, "amin")
    high = torch.full((count,), float("-inf"), dtype=torch.float64, device=device).scatter_reduce(
        0, segments, flat, "amax")
    constant = ~(high > low)
    span = torch.where(constant, torch.ones_like(high), high - low)
    safe_low = torch.where(constant, torch.zeros_like(low), low)
    index = ((flat - safe_low[segments]) * bins / span[segments]).floor_().clamp_(0, bins - 1).long()
    histogram = torch.zeros(count * bins, dtype=torch.float64, device=device)
    histogram.scatter_add_(0, segments * bins + index, torch.ones_like(flat))
    cut = _otsu_cut(histogram.view(count, bins), safe_low.unsqueeze(1), span.unsqueeze(1), bins)
    return torch.where(constant, high, cut), constant


def otsu_thresholds(values: torch.Tensor, bins: int = OTSU_BINS) -> torch.Tensor:
    """Otsu's threshold of every row of ``values`` (..., n), n ≥ 1, finite: float64 (...,) on values' device.

    Per row: the cut that maximises the between-class variance of a ``bins``-bin histogram over [min, max] (bin of
    x: ``floor((x − min)·bins / (max − min))``, the maximum in the last bin); the first such cut on a tie. Returns
    the upper edge of the last bin of the low class, so ``values > threshold`` is the high class; a constant row
    returns its value (nothing is above it). Each row is one segment of ``segment_otsu_thresholds``: tensor ops
    only, no host synchronisation.
    """
    rows = values.detach().reshape(-1, values.shape[-1])
    segments = torch.arange(rows.shape[0], device=rows.device).repeat_interleave(rows.shape[1])
    thresholds, _ = segment_otsu_thresholds(rows.reshape(-1), segments, rows.shape[0], bins)
    return thresholds.reshape(values.shape[:-1])


def otsu_threshold(values: torch.Tensor, bins: int = OTSU_BINS) -> float:
    """Otsu's threshold of all of ``values`` (any shape, finite) as a Python float (``otsu_thresholds`` of the
    flattened values; one host synchronisation)."""
    return float(otsu_thresholds(values.reshape(-1), bins))


LOGIT_CHUNK_ELEMENTS = 1 << 24  # float32 logits per chunk of heads: 64 MB


def subject_probabilities(q: torch.Tensor, k: torch.Tensor, heads: int, columns: Sequence[int]) -> torch.Tensor:
    """Per-patch softmax over the text keys, mean over heads, at the subject token columns (Eq. 2).

    Args:
        q: [R, Q, H·d] projected image queries of one cross-attention call (cond rows only), any float dtype.
        k: [R, T, H·d] projected text keys of the same rows.
        heads: H.
        columns: S key positions (subject tokens) whose probabilities are returned.
    Returns:
        [R, Q, S] float32 on q's device.
    Cost: all rows and as many heads at once as keep the [R, h, Q, T] float32 logits within
    ``LOGIT_CHUNK_ELEMENTS`` (64 MB), so a few batched products per layer rather than one per row and head; only
    the S chosen columns of the probabilities are kept (the softmax denominator needs every key).
    """
    rows, queries, width = q.shape
    if k.shape[0] != rows or k.shape[2] != width or width % heads:
        raise ValueError(f"subject_probabilities: q {tuple(q.shape)} and k {tuple(k.shape)} with {heads} heads")
    dim, tokens = width // heads, k.shape[1]
    scale = 1.0 / math.sqrt(dim)
    index = index_tensor(columns, q.device)
    q_heads = q.reshape(rows, queries, heads, dim).transpose(1, 2)  # [R, H, Q, d]
    k_heads = k.reshape(rows, tokens, heads, dim).permute(0, 2, 3, 1)  # [R, H, d, T]
    step = max(1, min(heads, LOGIT_CHUNK_ELEMENTS // max(1, rows * queries * tokens)))
    total = torch.zeros(rows, queries, len(index), dtype=torch.float32, device=q.device)
    for start in range(0, heads, step):
        part = slice(start, start + step)
        logits = torch.matmul(q_heads[:, part].float(), k_heads[:, part].float()).mul_(scale)  # [R, h, Q, T]
        total += (logits.index_select(3, index) - logits.logsumexp(3, keepdim=True)).exp_().sum(1)
    return total / heads


def character_maps(probabilities: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """Eq. 4 per character: [R, Q, S] probabilities -> [R, C, Q] sums over each group's indices into S.

    ``groups[c]`` lists character c's subject tokens (indices into S, non-empty).
    """
    maps = []
    for group in groups:
        if len(group) == 0:
            raise ValueError("character_maps: a character has no subject tokens")
        group = list(group)
        if group == list(range(group[0], group[0] + len(group))):  # a run of columns: a view, no index copy
            maps.append(probabilities[:, :, group[0]:group[0] + len(group)].sum(2))
        else:
            maps.append(probabilities.index_select(2, index_tensor(group, probabilities.device)).sum(2))
    return torch.stack(maps, 1)


class MaskAccumulator:
    """Eq. 3 over one UNet call: the mean over the added cross-attention layers of each frame's character maps.

    Contract: all added layers share one grid (h, w); a frame's maps always have the same C. Rows of one frame
    added twice in the same ``add`` are averaged first. A frame missing from some layers is averaged over the layers
    that had it.
    """

    def __init__(self) -> None:
        self.grid: tuple[int, int] | None = None
        self._sums: dict[int, torch.Tensor] = {}
        self._counts: dict[int, int] = {}

    def add(self, frames: Sequence[int], maps: torch.Tensor, grid: tuple[int, int]) -> None:
        """``maps`` [R, C, h·w] of one layer; ``frames[r]`` is row r's frame."""
        grid = (int(grid[0]), int(grid[1]))
        if self.grid is not None and grid != self.grid:
            raise ValueError(f"MaskAccumulator: grid {grid} differs from the accumulated grid {self.grid}")
        if len(frames) != maps.shape[0] or maps.shape[2] != grid[0] * grid[1]:
            raise ValueError(f"MaskAccumulator: maps {tuple(maps.shape)} for {len(frames)} frames on grid {grid}")
        self.grid = grid
        for frame in dict.fromkeys(int(f) for f in frames):
            rows = [r for r, f in enumerate(frames) if int(f) == frame]
            layer_map = maps[rows[0]].float() if len(rows) == 1 else \
                maps.index_select(0, index_tensor(rows, maps.device)).float().mean(0)
            if frame in self._sums:
                self._sums[frame] = self._sums[frame] + layer_map
                self._counts[frame] += 1
            else:
                self._sums[frame], self._counts[frame] = layer_map, 1

    def mean_maps(self) -> dict[int, torch.Tensor]:
        """{frame: [C, h·w] float32 mean over the layers added since the last ``clear``}."""
        return {frame: total / self._counts[frame] for frame, total in self._sums.items()}

    def clear(self) -> None:
        self.grid = None
        self._sums.clear()
        self._counts.clear()


def binarize(maps: torch.Tensor) -> torch.Tensor:
    """Otsu per character map: [C, Q] -> bool [C, Q], True where the value is above the map's threshold.

    A map with no contrast (constant) gives all False. Compared in float64, as the threshold is computed; no host
    synchronisation (``otsu_thresholds``).
    """
    values = maps.detach().to(torch.float64)
    if values.shape[0] == 0:
        return torch.zeros(maps.shape, dtype=torch.bool, device=maps.device)
    return values > otsu_thresholds(values).unsqueeze(-1)


def _nearest_index(source: int, target: int, device: torch.device) -> torch.Tensor:
    """floor((i + 0.5) · source / target) for i < target, in exact integer arithmetic."""
    return (2 * torch.arange(target, device=device) + 1) * source // (2 * target)


def resize_mask(mask: torch.Tensor, source: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a row-major mask: [C, h·w] on ``source`` (h, w) -> [C, H·W] on ``target`` (H, W).

    Target pixel (i, j) takes source pixel (floor((i + 0.5)·h/H), floor((j + 0.5)·w/W)): the source cell that holds
    the target pixel's centre. Up, down and odd sizes alike; the same grid is the identity.
    """
    (h, w), (big_h, big_w) = source, target
    if mask.shape[-1] != h * w:
        raise ValueError(f"resize_mask: mask {tuple(mask.shape)} is not on a {h}x{w} grid")
    rows = _nearest_index(h, big_h, mask.device)
    cols = _nearest_index(w, big_w, mask.device)
    grid = mask.reshape(mask.shape[0], h, w)
    return grid[:, rows][:, :, cols].reshape(mask.shape[0], big_h * big_w)


def drop_mask(mask: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Mask dropout (paper §3.3): bool [C, N] -> bool [C, N], each True kept with probability 1 - p.

    One Bernoulli per position from one CPU generator seeded with ``seed`` (the caller's
    ``stable_seed(run_seed, step, layer_key, "mask", frame)``), so the draw does not depend on the device or on the
    other frames. p = 0 returns ``mask`` itself; p = 1 gives all False; False never becomes True.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"drop_mask: p = {p} is not a probability")
    if p == 0.0:
        return mask
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(mask.shape, generator=generator, dtype=torch.float64) >= p
    return mask & keep.to(mask.device)
