"""Singular-Value Reweighting (SVR+/SVR-) and Naive Prompt Reweighting (NPR) of a consolidated prompt.

Paper: One-Prompt-One-Story (ICLR 2025) §3.1.2 (NPR), §3.2 Eq. 2-3 (SVR); defaults from the official code,
whose beta values are swapped relative to App. B.1 (methods.md §2.4, §2.7):

    SVR+ (express the current frame):  sigma' = 1.00 * sigma * exp(+0.01 * sigma)
    SVR- (suppress every other frame): sigma' = 0.05 * sigma * exp(-0.01 * sigma)

For frame j: SVR- for each other frame k of its context in order (rows span(P_k) + EOT block), then SVR+ for
frame j (rows span(P_j) + EOT block). Each call sees the previous result. In EOT mode ``scale`` (the official
benchmark's "svr-eot") the EOT block is left out of every SVD and multiplied by 0.9 at every call instead.
The SVD runs in float64 on the context's device; SOT and identity rows are never touched; nothing is
renormalised. SDXL contexts hold two encoders side by side (CLIP-L 768 | OpenCLIP bigG 1280): each slice is
reweighted on its own, never the concatenated 2048-d rows. Pooled vectors are not this module's business.

Every function here is pure: the input context is never written, whatever its dtype, so one cached encoding
serves every frame and reweightings never accumulate across frames (methods.md §2.4 "When").

Range: SVR+ multiplies sigma by e^(alpha*sigma), so large singular values can leave the range of the dtype the
UNet reads (float16 overflows to inf from about sigma = 490 at alpha = 0.01). The result is computed in float64
and refused with ``SvrRangeError`` (naming the frame and the largest singular value) when it does not fit ``limit``
-- never clamped, which would be a silently different conditioning. The singular values of every call are logged
per frame and encoder slice (min / median / max) at DEBUG level on this module's logger (methods.md §2.9).
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from .token_plan import FramePlan

EOT_MODES = ("svd", "scale")
EOT_SCALE_PER_CALL = 0.9

log = logging.getLogger(__name__)

# Encoder widths side by side in a WebUI cross-attention context (A1111 and Forge build SDXL's as L | G).
SDXL_ENCODER_SLICES = ((0, 768), (768, 2048))


def encoder_slices(width: int) -> tuple[tuple[int, int], ...]:
    """Feature-axis slices of the separate text encoders in a context of this width (SDXL 2048 = 768 | 1280)."""
    return SDXL_ENCODER_SLICES if width == 2048 else ((0, width),)


class SvrRangeError(ValueError):
    """The reweighted conditioning of ``frame`` (0-based) does not fit the dtype the UNet reads."""

    def __init__(self, message: str, frame: int):
        super().__init__(message)
        self.frame = frame


def _svd_reweight(rows: torch.Tensor, alpha: float, beta: float, sign: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(reweighted rows [n, D] float64, the input's singular values) -- the one SVD of an SVR call."""
    x = rows.to(torch.float64)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return (u * (beta * s * torch.exp(sign * alpha * s))) @ vh, s


def reweight_singular_values(rows: torch.Tensor, alpha: float, beta: float, sign: int) -> torch.Tensor:
    """sigma' = beta * sigma * exp(sign * alpha * sigma) on the thin SVD of ``rows``.

    Args:
        rows: [n, D] token embeddings (any float dtype, not modified); the SVD runs in float64.
        sign: +1 for SVR+ (enhance), -1 for SVR- (suppress).
    Returns:
        [n, D] float64, rows reconstructed with the rescaled singular values.
    """
    return _svd_reweight(rows, alpha, beta, sign)[0]


def _check_context(context: torch.Tensor, plan: FramePlan) -> None:
    if context.ndim != 2:
        raise ValueError(f"expected one frame's context [tokens, width], got shape {tuple(context.shape)}")
    if plan.eot_start >= context.shape[0]:
        raise ValueError(f"context has {context.shape[0]} tokens but the plan's EOT block starts at "
                         f"{plan.eot_start}: encode the plan's text as one CLIP chunk")


def svr_frame_context(context: torch.Tensor, plan: FramePlan, *, enhance_alpha: float = 0.01,
                      enhance_beta: float = 1.0, suppress_alpha: float = 0.01, suppress_beta: float = 0.05,
                      eot_mode: str = "svd", slices: Sequence[tuple[int, int]] | None = None,
                      limit: torch.dtype | None = None) -> torch.Tensor:
    """Frame ``plan.frame``'s SVR'd conditioning from the unmodified encoding of ``plan.text``.

    Args:
        context: [T, D] cross-attention context of ``plan.text`` (T = 77); never modified, for every dtype.
        plan: the frame's token plan (spans, EOT start, suppression order).
        slices: feature slices reweighted independently; default per ``encoder_slices(D)``.
        limit: a dtype the result must also fit (the UNet's, when narrower than the context's); the context's
            own dtype always applies.
    Returns:
        [T, D] new tensor, same dtype/device; rows outside the touched spans and the EOT block are bit-identical.
    Raises:
        SvrRangeError: the reweighted values are not finite in the context's dtype or in ``limit``.
    """
    if eot_mode not in EOT_MODES:
        raise ValueError(f"eot_mode must be one of {EOT_MODES}, got {eot_mode!r}")
    _check_context(context, plan)
    eot = list(range(plan.eot_start, context.shape[0]))
    calls = [(plan.span_of(k), suppress_alpha, suppress_beta, -1) for k in plan.suppressed]
    calls.append((plan.span_of(plan.frame), enhance_alpha, enhance_beta, +1))
    touched = sorted({r for span, *_ in calls for r in span.positions} | set(eot))
    out = context.clone()
    for lo, hi in slices or encoder_slices(context.shape[1]):
        x = context[:, lo:hi].to(torch.float64, copy=True)  # a copy even when the context is float64 already
        sigmas = []
        for span, alpha, beta, sign in calls:
            rows = list(span.positions) + (eot if eot_mode == "svd" else [])
            x[rows], sigma = _svd_reweight(x[rows], alpha, beta, sign)
            sigmas.append(sigma)
            if eot_mode == "scale":
                x[eot] *= EOT_SCALE_PER_CALL
        sigma = torch.cat(sigmas)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("SVR frame %d, features %d:%d, %d SVDs: singular values min %.4g / median %.4g / max %.4g",
                      plan.frame + 1, lo, hi, len(calls), sigma.min(), sigma.median(), sigma.max())
        _check_range(x[touched], (context.dtype, limit), plan.frame, (lo, hi), float(sigma.max()), enhance_alpha)
        out[touched, lo:hi] = x[touched].to(context.dtype)
    return out


def _check_range(x: torch.Tensor, dtypes: Sequence[torch.dtype | None], frame: int, features: tuple[int, int],
                 sigma_max: float, enhance_alpha: float) -> None:
    """Refuse a float64 result that some of ``dtypes`` cannot hold (inf after the cast), naming the frame."""
    largest = float(x.abs().max()) if x.numel() else 0.0
    for dtype in dtypes:
        if dtype is None or not dtype.is_floating_point:
            continue
        bound = torch.finfo(dtype).max
        if not largest <= bound:  # also catches NaN
            raise SvrRangeError(
                f"frame {frame + 1}: SVR turns singular values up to {sigma_max:.4g} (features {features[0]}:"
                f"{features[1]}) into values up to {largest:.4g}, beyond {str(dtype).replace('torch.', '')}'s range "
                f"({bound:.6g}); lower 'SVR+ alpha' (now {enhance_alpha:g}), use NPR reweighting, or run the UNet "
                f"in float32", frame)


def npr_frame_context(context: torch.Tensor, plan: FramePlan, *, enhance: float = 2.0,
                      suppress: float = 0.5) -> torch.Tensor:
    """Naive Prompt Reweighting (paper §3.1.2, App. B.1): current frame's rows x2, other frames' x0.5.

    Args/returns as ``svr_frame_context``; SOT, identity and the EOT block are left untouched.
    """
    _check_context(context, plan)
    out = context.clone()
    for frame, span in zip(plan.frames, plan.spans):
        out[span.start:span.stop] = context[span.start:span.stop] * (enhance if frame == plan.frame else suppress)
    return out
