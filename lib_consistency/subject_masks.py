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
  generator seeded by the caller with ``stable_seed(run_seed, step, layer_key, "mask", frame)``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

OTSU_BINS = 256


def otsu_threshold(values: torch.Tensor, bins: int = OTSU_BINS) -> float:
    """Otsu's threshold of ``values`` (any shape, finite): the cut that maximises the between-class variance of a
    ``bins``-bin histogram over [min, max]. Returns the upper edge of the last bin of the low class, so
    ``values > threshold`` is the high class; a constant input returns its value (nothing is above it).
    """
    flat = values.detach().reshape(-1).to(torch.float64)
    low, high = float(flat.min()), float(flat.max())
    if not high > low:
        return high
    histogram = torch.histc(flat, bins=bins, min=low, max=high)
    probability = histogram / histogram.sum()
    centres = low + (torch.arange(bins, dtype=torch.float64, device=flat.device) + 0.5) * (high - low) / bins
    weight_low = probability.cumsum(0)
    mean_low_sum = (probability * centres).cumsum(0)
    total_mean = mean_low_sum[-1]
    weight_high = 1.0 - weight_low
    between = (total_mean * weight_low - mean_low_sum) ** 2 / (weight_low * weight_high)
    between[(weight_low <= 0) | (weight_high <= 1e-12)] = -1.0
    cut = int(torch.argmax(between))
    return low + (cut + 1) * (high - low) / bins


def subject_probabilities(q: torch.Tensor, k: torch.Tensor, heads: int, columns: Sequence[int]) -> torch.Tensor:
    """Per-patch softmax over the text keys, mean over heads, at the subject token columns (Eq. 2).

    Args:
        q: [R, Q, H·d] projected image queries of one cross-attention call (cond rows only), any float dtype.
        k: [R, T, H·d] projected text keys of the same rows.
        heads: H.
        columns: S key positions (subject tokens) whose probabilities are returned.
    Returns:
        [R, Q, S] float32 on q's device.
    Memory: one head at a time in float32; only the [R, Q, T] logits of that head and the S chosen columns are
    materialised (the softmax denominator needs every key).
    """
    rows, queries, width = q.shape
    if k.shape[0] != rows or k.shape[2] != width or width % heads:
        raise ValueError(f"subject_probabilities: q {tuple(q.shape)} and k {tuple(k.shape)} with {heads} heads")
    dim = width // heads
    scale = 1.0 / math.sqrt(dim)
    index = torch.as_tensor(list(columns), dtype=torch.long, device=q.device)
    total = torch.zeros(rows, queries, len(index), dtype=torch.float32, device=q.device)
    for head in range(heads):
        part = slice(head * dim, (head + 1) * dim)
        logits = torch.bmm(q[..., part].float(), k[..., part].float().transpose(1, 2)) * scale  # [R, Q, T]
        total += (logits.index_select(2, index) - logits.logsumexp(2, keepdim=True)).exp_()
    return total / heads


def character_maps(probabilities: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """Eq. 4 per character: [R, Q, S] probabilities -> [R, C, Q] sums over each group's indices into S.

    ``groups[c]`` lists character c's subject tokens (indices into S, non-empty).
    """
    maps = []
    for group in groups:
        if len(group) == 0:
            raise ValueError("character_maps: a character has no subject tokens")
        index = torch.as_tensor(list(group), dtype=torch.long, device=probabilities.device)
        maps.append(probabilities.index_select(2, index).sum(2))
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
            layer_map = maps[rows].float().mean(0)
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

    A map with no contrast (constant) gives all False. Compared in float64, as the threshold is computed.
    """
    values = maps.detach().to(torch.float64)
    masks = [row > otsu_threshold(row) for row in values]
    return torch.stack(masks) if masks else torch.zeros(maps.shape, dtype=torch.bool, device=maps.device)


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
