"""IPCA on real cross-attention (attn2) modules: conditional rows get the identity tokens appended.

Paper: One-Prompt-One-Story §3.2 (methods.md §2.5, §2.8 Step D). Conditional rows only; unconditional and other
rows keep their own call untouched. With dropout 0 (the official default) the hook calls the module's own forward
with ``context = [own context ; SOT + identity rows]`` for the cond rows (``append_identity_tokens``), so the host's
kernel does the work. With dropout p > 0 the bias differs per query, which no context can express: the cond rows are
then computed here with the module's own projections and SDPA plus the seeded ``identity_logit_bias``.

Host contract as ``attention_hooks``: the forward takes hidden states first and the text context as a keyword
(``context=`` in ldm/sgm, ``encoder_hidden_states=`` in diffusers); the state carries the row layout of the current
UNet call and the step, and the hook passes through when the layout is unknown or the state is closed. A cond
context longer than one chunk is handled by ``identity_columns`` (host tiling or padding); one it cannot read passes
through with a warning, logged once per generation.

Dropout masks are drawn per (run seed, step, layer, frame) -- the frame read from the row layout, as consistent
self-attention draws its tokens -- so a frame's masks do not depend on its row, its batch or its batch mates.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from .attention_hooks import InstanceForwardHook, install_hooks
from .consistent_self_attention import LayerAddress, StepKey, layer_key, stable_seed
from .identity_cross_attention import (CHUNK, append_identity_tokens, attention_with_bias, identity_columns,
                                      identity_logit_bias)
from .reach import IPCA, Reach
from .row_layout import UNKNOWN_LAYOUT, Role, RowLayout

log = logging.getLogger(__name__)


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


def biased_attention_forward(module: torch.nn.Module, hidden: torch.Tensor, context: torch.Tensor,
                             bias: torch.Tensor) -> torch.Tensor:
    """The attention of an ldm/diffusers attention module with an additive logit bias.

    hidden: (R, Q, C); context: (R, T, D); bias: (R, Q, T), shared across heads. Uses ``to_q/to_k/to_v``,
    ``heads`` and every layer of ``to_out`` (Linear then Dropout in both libraries).
    """
    rows, heads = hidden.shape[0], module.heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(rows, t.shape[1], heads, -1).transpose(1, 2)

    q, k, v = split(module.to_q(hidden)), split(module.to_k(context)), split(module.to_v(context))
    out = attention_with_bias(q, k, v, bias.unsqueeze(1)).transpose(1, 2).reshape(rows, hidden.shape[1], -1)
    for layer in module.to_out:
        out = layer(out)
    return out


class IdentityCrossAttentionHook(InstanceForwardHook):
    """Instance-level ``forward`` of one cross-attention module applying IPCA to the cond rows."""

    state: IdentityAttentionState
    surfaces = (IPCA,)

    def __call__(self, hidden: torch.Tensor, *args, **kwargs):
        self._entered()
        state, context = self.state, kwargs.get(self.context_kwarg)
        if (self.retired or state.closed or args or context is None or hidden.dim() != 3
                or not state.layout.matches(hidden.shape[0]) or context.shape[0] != hidden.shape[0]
                or any(isinstance(v, torch.Tensor) for k, v in kwargs.items() if k != self.context_kwarg)):
            return self._inner_forward(hidden, *args, **kwargs)
        cond = [r for r, role in enumerate(state.layout.roles) if role is Role.COND]
        if not cond:
            return self._inner_forward(hidden, **kwargs)
        cond_set = set(cond)
        rest = [r for r in range(hidden.shape[0]) if r not in cond_set]
        cond_index = torch.tensor(cond, device=hidden.device)
        cond_context = context.index_select(0, cond_index)
        columns = state.columns(cond_context)
        if columns is None:
            return self._inner_forward(hidden, **kwargs)
        frames = [state.layout.frames[r] for r in cond]
        cond_out = self._cond_rows(hidden.index_select(0, cond_index), cond_context, columns, frames, kwargs)
        if not rest:
            return cond_out
        rest_index = torch.tensor(rest, device=hidden.device)
        rest_out = self._inner_forward(hidden.index_select(0, rest_index),
                                       **{**kwargs, self.context_kwarg: context.index_select(0, rest_index)})
        out = cond_out.new_empty((hidden.shape[0],) + tuple(cond_out.shape[1:]))
        out.index_copy_(0, cond_index, cond_out)
        out.index_copy_(0, rest_index, rest_out)
        return out

    def _cond_rows(self, hidden: torch.Tensor, context: torch.Tensor, columns: Sequence[int], frames: Sequence[int],
                   kwargs: dict) -> torch.Tensor:
        state = self.state
        if state.dropout == 0:
            extended = append_identity_tokens(context, columns)
            return self._inner_forward(hidden, **{**kwargs, self.context_kwarg: extended})
        bias = dropout_bias(state, self.layer, frames, hidden.shape[1], context.shape[1], columns, hidden)
        return biased_attention_forward(self.module, hidden, context, bias)


def install_identity_hooks(layers: Iterable[tuple[LayerAddress, torch.nn.Module]], state: IdentityAttentionState,
                           context_kwarg: str = "context", reach: Reach | None = None) -> list[InstanceForwardHook]:
    """Hook every given attn2 module; on an error the hooks installed so far are removed before re-raising."""
    return install_hooks(layers, state, context_kwarg, IdentityCrossAttentionHook, reach)
