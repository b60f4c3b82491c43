"""Identity-Preserving Cross-Attention (IPCA) in its zero-cost forms.

Paper: One-Prompt-One-Story (ICLR 2025) §3.2 Eq. 4; official code: a separate identity-only pass whose SOT and
identity-token keys/values are appended to the conditional branch's cross-attention (methods.md §2.5).

Two facts make the identity pass unnecessary [derived, methods.md §2.5]:
1. CLIP text encoders are causal, so the SOT and identity rows of the identity-only encoding equal those rows of
   the consolidated encoding, and SVR never edits them: the stored keys duplicate keys the frame already has.
2. Appending a duplicate key/value pair to a softmax equals adding ln 2 to that key's logit.

Hence, for the conditional rows of every cross-attention (attn2) call:
- ``append_identity_tokens``: append the SOT + identity rows of the frame's own conditioning to its context
  (the host's kernel does the rest; only valid for calls or row groups holding cond rows alone);
- ``identity_logit_bias``: or add +ln 2 to those logits; with IPCA dropout p, ln(1 + b) with
  b ~ Bernoulli(1 - p) per (query, key), shared across heads, drawn from a seeded generator.
Unconditional rows and self-attention are never touched.

Contexts longer than one 77-token chunk (methods.md §2.8 step D "Chunks"). Our conditioning is always one chunk,
but a host batching it with a longer negative prompt makes the cond rows longer: Forge (like ComfyUI) repeats the
whole 77-token context to the common length, and A1111's "pad prompt/negative prompt" options append chunks of the
empty prompt (or copies of the last token). ``identity_columns`` tells the two apart: a context that is n identical
copies of its first chunk is plain attention over that chunk (every key n times), so IPCA doubles the identity keys
of every copy; otherwise the first chunk is ours and the rest is the host's padding, and only the first chunk's
identity keys are doubled, exactly as without padding. A length that is not a whole number of chunks is not ours:
IPCA passes through (``None``) and the caller warns.

Per generation, ``IdentityAttentionState`` holds the identity positions, the dropout, the row layout of the current
UNet call and the step; the surfaces (``surfaces/``) read the cond rows and columns from it. Dropout masks are drawn
per (run seed, step, layer, frame) by ``dropout_bias`` -- the frame read from the row layout, as consistent
self-attention draws its tokens -- so a frame's masks do not depend on its row, its batch or its batch mates.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from ..common.addresses import LayerAddress, StepKey, layer_key, stable_seed
from ..common.row_layout import UNKNOWN_LAYOUT, Role, RowLayout

log = logging.getLogger(__name__)
CHUNK = 77  # one CLIP context: SOT + 75 tokens + EOT
_COPY_TOLERANCE = 1e-3  # relative: a repeated chunk after a projection may differ in the last bits only


def identity_columns(context: torch.Tensor, identity_positions: Sequence[int]) -> tuple[int, ...] | None:
    """The key columns IPCA doubles in a cond context (or its projected keys) of any length.

    Args:
        context: [R, T, D] cond rows' context (A1111 hook) or projected keys (Forge patch).
        identity_positions: SOT + identity positions within one chunk.
    Returns:
        ``identity_positions`` for T = 77 or host padding after our chunk; those of every chunk when the context is
        T / 77 copies of its first chunk; None when T is not a multiple of 77 (not a context IPCA can read).
    """
    length = context.shape[1]
    if length == CHUNK:
        return tuple(identity_positions)
    if length < CHUNK or length % CHUNK:
        return None
    chunks = context.reshape(context.shape[0], length // CHUNK, CHUNK, -1)
    first = chunks[:, :1]
    scale = float(first.abs().max()) or 1.0
    if float((chunks - first).abs().max()) <= _COPY_TOLERANCE * scale:
        return tuple(c * CHUNK + p for c in range(length // CHUNK) for p in identity_positions)
    return tuple(identity_positions)


def append_identity_tokens(context: torch.Tensor, identity_positions: Sequence[int]) -> torch.Tensor:
    """Append the SOT + identity rows of each row's own context.

    Args:
        context: [R, T, D] conditional cross-attention contexts (cond rows only), or their projected keys/values.
        identity_positions: token positions {0} + span(identity) (``FramePlan.identity_positions``), or the
            columns ``identity_columns`` gives for a context longer than one chunk.
    Returns:
        [R, T + L, D] with L = len(identity_positions).
    """
    index = torch.as_tensor(list(identity_positions), dtype=torch.long, device=context.device)
    return torch.cat([context, context.index_select(1, index)], dim=1)


def identity_logit_bias(n_keys: int, identity_positions: Sequence[int], *, n_queries: int = 1,
                        dropout: float = 0.0, generator: torch.Generator | None = None,
                        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """Additive pre-softmax bias equal to IPCA for one conditional row.

    Args:
        n_keys: context length T of the cross-attention.
        identity_positions: key columns that get the bias (SOT + identity tokens).
        n_queries: image tokens Q; only used when ``dropout > 0`` (the mask varies per query).
        dropout: IPCA dropout p in [0, 1] (official code 0.0, paper 0.5).
        generator: seeded CPU generator for the dropout draw (required when dropout > 0).
    Returns:
        [1, T] (no dropout) or [Q, T]: ln 2 at kept identity columns, 0 elsewhere; broadcast over heads.
    """
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"IPCA dropout must be in [0, 1], got {dropout}")
    columns = torch.as_tensor(list(identity_positions), dtype=torch.long)
    rows = n_queries if dropout > 0 else 1
    bias = torch.zeros(rows, n_keys, dtype=torch.float64)
    if dropout > 0:
        if generator is None:
            raise ValueError("IPCA dropout needs a seeded generator for a reproducible generation")
        keep = torch.rand(rows, len(columns), generator=generator, dtype=torch.float64) >= dropout
        bias[:, columns] = torch.log1p(keep.to(torch.float64))
    else:
        bias[:, columns] = math.log(2.0)
    return bias.to(dtype=dtype, device=device)


def attention_with_bias(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention with an optional additive logit bias.

    Args:
        q: [R, H, Q, d]; k, v: [R, H, T, d].
        bias: broadcastable to [R, H, Q, T] (e.g. [R, 1, Q or 1, T] with zero rows for unconditional rows).
    Returns:
        [R, H, Q, d].
    """
    mask = None if bias is None else bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def cond_rows(layout: RowLayout) -> list[int]:
    """The rows of the conditional branch: the only rows IPCA touches (paper §3.2)."""
    return [row for row, role in enumerate(layout.roles) if role is Role.COND]


@dataclass(frozen=True)
class IdentityKeys:
    """IPCA for the cond rows of one cross-attention call: the identity key ``columns`` of their context and, with
    dropout, the (rows, queries, keys) logit ``bias``; without dropout (``bias`` None) the SOT + identity rows are
    appended to the context instead (``append_identity_tokens``), which the host's kernel attends as usual."""
    columns: tuple[int, ...]
    bias: torch.Tensor | None


@dataclass
class IdentityAttentionState:
    """Per-generation IPCA state; the adapter updates ``layout`` per UNet call and ``step`` per denoiser call."""
    identity_positions: tuple[int, ...]
    dropout: float = 0.0
    run_seed: int = 0
    layout: RowLayout = UNKNOWN_LAYOUT
    step: StepKey | None = None
    closed: bool = False
    lengths_seen: set = field(default_factory=set)

    def columns(self, context: torch.Tensor) -> tuple[int, ...] | None:
        """The identity key columns of this cond context (``identity_columns``). The first context of each length
        longer than one chunk is reported once per generation: a warning when IPCA cannot read it, else DEBUG."""
        columns = identity_columns(context, self.identity_positions)
        length = context.shape[1]
        if length != CHUNK and length not in self.lengths_seen:
            self.lengths_seen.add(length)
            if columns is None:
                log.warning("Consistent Story: IPCA skipped for a %d-token cond context (not whole 77-token "
                            "chunks of the story's conditioning); the frames are generated without it", length)
            else:
                copies = len(columns) // len(self.identity_positions)
                log.debug("IPCA on a %d-token cond context: identity keys of %s", length,
                          f"all {copies} copies of the story's chunk" if copies > 1 else "the first chunk (padding)")
        return columns


def dropout_bias(state: IdentityAttentionState, layer: LayerAddress, frames: Sequence[int], queries: int, keys: int,
                 columns: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """(len(frames), queries, keys) IPCA-dropout bias of the cond rows holding ``frames``.

    Each row's mask comes from a generator seeded by (run seed, step, layer, frame): the same draw on both hosts and
    for any batch layout.
    """
    generator = torch.Generator()
    rows = []
    for frame in frames:
        generator.manual_seed(stable_seed(state.run_seed, state.step, layer_key(layer), "ipca", int(frame)))
        rows.append(identity_logit_bias(keys, columns, n_queries=queries, dropout=state.dropout,
                                        generator=generator, dtype=like.dtype, device=like.device))
    return torch.stack(rows)


def identity_keys(state: IdentityAttentionState, layer: LayerAddress, layout: RowLayout, rows: Sequence[int],
                  cond_context: torch.Tensor, queries: int, like: torch.Tensor) -> IdentityKeys | None:
    """What IPCA does to the cond ``rows`` of a call whose layout is ``layout``: ``cond_context`` (len(rows), T, D)
    is their text context (module hooks) or projected keys (Forge's patches) -- appending rows commutes with the
    per-token projection. None: IPCA cannot read this context and the rows attend plainly."""
    columns = state.columns(cond_context)
    if columns is None:
        return None
    if state.dropout == 0:
        return IdentityKeys(columns, None)
    frames = [layout.frames[row] for row in rows]
    return IdentityKeys(columns, dropout_bias(state, layer, frames, queries, cond_context.shape[1], columns, like))
