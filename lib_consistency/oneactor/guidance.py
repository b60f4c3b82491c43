"""OneActor guidance math: the Δ window, the token-row offset and cluster guidance (pure functions, host-free).

Method: OneActor (Wang et al., NeurIPS 2024), paper §3.3; methods.md §6.4.

- Semantic interpolation (paper Eq. 15): the base word's rows of the cond context get ``v·Δ_tar``
  (``offset_token_rows``; the row of Eq. 19's η2 term gets ``1·Δ_avg``).
- Cluster guidance (paper Eq. 19): ``ε̂ = ε(∅) + η1·[ε(c + vΔ_tar) − ε(∅)] − η2·[ε(c + Δ_avg) − ε(∅)]``; η1 is the
  host's CFG scale (``cluster_guidance``).
- Both only in the leading window of the steps: steps 1-20 of 30 in the paper (App. H.1), 0-based 0..19
  (``window_steps``, ``in_window``).

Our choices:
- **Window rounding.** ``window_steps(T, w) = floor(T·w + 1/2)`` (round half up, with a 1e-9 tolerance so that
  float noise in ``T·w`` cannot move a step across): 30 -> 20 and 20 -> 13 at the default w = 2/3.
- **Folding into the host's CFG** (``fold_into_cond``): the host combines one cond and one uncond prediction as
  ``u + η1·(c − u)``. Replacing c by ``c' = c − (η2/η1)(a − u)`` gives Eq. 19 exactly, so the η2 term needs no
  change to the host's combination. The folded combination is affine with weights ``(1 − η1 + η2) + η1 − η2 = 1``,
  so it commutes with any map ``D = x − σ·ε`` (or any other affine map with the same x and σ for all three rows,
  v-prediction included): folding in the "denoised" (x0) space the WebUI samplers combine in equals folding in ε
  space.
- **Strength 0 is a no-op**: ``offset_token_rows`` with scale 0 leaves the row bit for bit (no ``x + 0·Δ``, which
  would turn −0.0 into +0.0 and a non-finite Δ into NaN); ``cluster_guidance`` with η2 = 0 is plain CFG exactly.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import torch

DEFAULT_WINDOW = 2 / 3  # steps 1-20 of 30 (paper App. H.1)


def _check_unit(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"OneActor {name} must be a number in [0, 1], got {value!r}")
    return float(value)


def window_steps(total_steps: int, window: float = DEFAULT_WINDOW) -> int:
    """Leading steps of a ``total_steps`` pass in the Δ window: floor(total·window + 1/2), in [0, total]."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 0:
        raise ValueError(f"OneActor total_steps must be an integer >= 0, got {total_steps!r}")
    window = _check_unit("window", window)
    return min(total_steps, math.floor(total_steps * window + 0.5 + 1e-9))


def in_window(step: int, total_steps: int, window: float = DEFAULT_WINDOW) -> bool:
    """Whether 0-based ``step`` of a ``total_steps`` pass gets Δ and cluster guidance (a step outside the pass: no)."""
    return 0 <= step < window_steps(total_steps, window)


def _scales(scale: float | Sequence[float], batch: int) -> list[float]:
    values = [scale] * batch if isinstance(scale, numbers.Real) else list(scale)
    if len(values) != batch:
        raise ValueError(f"OneActor offset: {len(values)} scales for a batch of {batch} rows")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"OneActor offset: scale must be a finite number, got {value!r}")
    return [float(value) for value in values]


def offset_token_rows(context: torch.Tensor, rows: Sequence[Sequence[int]], delta: torch.Tensor,
                      scale: float | Sequence[float]) -> torch.Tensor:
    """A new context with ``scale_b·delta`` added at token positions ``rows[b]`` of batch row b (paper Eqs. 8, 15).

    context: (B, T, D), any float dtype; rows: B sequences of positions in [0, T) (possibly empty; a position listed
    twice is offset once); delta: (D,); scale: one number or B numbers. Returns (B, T, D) in the context's dtype and
    device: the offset rows computed in float32 and cast back, every other element (and every row of a batch row
    with scale 0) bit-identical. The input is never written. SDXL contexts (D = 2048 = CLIP-L 768 | bigG 1280) need
    nothing special: Δ is concatenated the same way.
    """
    if context.dim() != 3:
        raise ValueError(f"OneActor offset: context must be (B, T, D), got shape {tuple(context.shape)}")
    batch, tokens, width = context.shape
    if delta.shape != (width,):
        raise ValueError(f"OneActor offset: the context width is {width} but the character's delta has shape "
                         f"{tuple(delta.shape)} (width {delta.shape[-1] if delta.dim() else '?'})")
    if len(rows) != batch:
        raise ValueError(f"OneActor offset: {len(rows)} position lists for a batch of {batch} rows")
    scales = _scales(scale, batch)
    offset = delta.to(device=context.device, dtype=torch.float32)
    result = context.clone()
    for b, (positions, factor) in enumerate(zip(rows, scales)):
        index = sorted({int(p) for p in positions})
        if not index or factor == 0.0:
            continue
        if index[0] < 0 or index[-1] >= tokens:
            raise ValueError(f"OneActor offset: token position out of range [0, {tokens}) in row {b}: {index}")
        where = torch.tensor(index, device=context.device)
        shifted = context[b, where].to(torch.float32) + factor * offset
        result[b, where] = shifted.to(context.dtype)
    return result


def _same_shapes(**tensors: torch.Tensor | None) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"OneActor guidance: predictions differ in shape: {shapes}")


def cluster_guidance(uncond: torch.Tensor, cond_tar: torch.Tensor, cond_avg: torch.Tensor | None, eta1: float,
                     eta2: float) -> torch.Tensor:
    """Cluster guidance (paper Eq. 19): ``ε(∅) + η1[ε_tar − ε(∅)] − η2[ε_avg − ε(∅)]``.

    uncond, cond_tar, cond_avg: predictions of the same shape (any, e.g. (B, C, H, W)) for the empty prompt, the
    prompt with ``v·Δ_tar`` and the prompt with ``Δ_avg``; ``cond_avg`` may be None when η2 = 0, which gives
    ``uncond + η1·(cond_tar − uncond)`` exactly (plain CFG). Computed in the inputs' dtype.
    """
    _same_shapes(uncond=uncond, cond_tar=cond_tar, cond_avg=cond_avg)
    guided = uncond + eta1 * (cond_tar - uncond)
    if eta2 == 0:
        return guided
    if cond_avg is None:
        raise ValueError(f"OneActor guidance: eta2 = {eta2} needs the Δ_avg prediction (cond_avg)")
    return guided - eta2 * (cond_avg - uncond)


def fold_into_cond(cond_out: torch.Tensor, uncond_out: torch.Tensor, avg_out: torch.Tensor | None, eta1: float,
                   eta2: float) -> torch.Tensor:
    """The cond prediction ``c' = c − (η2/η1)(a − u)`` whose plain CFG ``u + η1(c' − u)`` is Eq. 19.

    cond_out, uncond_out, avg_out: same-shape predictions (ε, or the host's "denoised" x0 / v: the identity holds
    in any space affine in ε with the same x and σ for the three rows, see the module docstring). ``avg_out`` may be
    None when η2 = 0 (then c' is a copy of c). η1 is the host's CFG scale and must be > 0.
    """
    if not eta1 > 0:
        raise ValueError(f"OneActor guidance: eta1 (the CFG scale) must be > 0 to fold eta2 into the cond "
                         f"prediction, got {eta1!r}")
    _same_shapes(cond_out=cond_out, uncond_out=uncond_out, avg_out=avg_out)
    if eta2 == 0:
        return cond_out.clone()
    if avg_out is None:
        raise ValueError(f"OneActor guidance: eta2 = {eta2} needs the Δ_avg prediction (avg_out)")
    return cond_out - (eta2 / eta1) * (avg_out - uncond_out)


@dataclass(frozen=True)
class OneActorGuidance:
    """Inference settings (methods.md §6.4, §6.5 presets): v (Eq. 15), η2 (Eq. 19; η1 is the host's CFG scale) and
    the window, the leading fraction of the steps that gets Δ and cluster guidance. Defaults: the released code's
    "fast" preset (v 0.8, η2 0, steps 1-20 of 30); the paper's experiments use η2 = 1 with η1 = 8.5."""

    v: float = 0.8
    eta2: float = 0.0
    window: float = DEFAULT_WINDOW

    def __post_init__(self) -> None:
        for name, high in (("v", 2.0), ("eta2", 10.0), ("window", 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= high:
                raise ValueError(f"OneActorGuidance.{name} must be a number in [0, {high:g}], got {value!r}")
            object.__setattr__(self, name, float(value))

    def steps(self, total_steps: int) -> int:
        """Leading steps of a ``total_steps`` pass inside the window (``window_steps``)."""
        return window_steps(total_steps, self.window)

    def active(self, step: int, total_steps: int) -> bool:
        """Whether 0-based ``step`` gets Δ and cluster guidance (``in_window``)."""
        return in_window(step, total_steps, self.window)
