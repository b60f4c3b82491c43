"""The methods on torch attention modules: instance-level ``forward`` hooks (A1111's ldm/sgm UNet, diffusers).

One surface of ``surfaces/`` (see its ``__init__``): each hook adapts one module call to its method's functions and
leaves the attention itself to the module's own forward, so the host's kernel still runs.
- ``ConsistentSelfAttentionHook`` (attn1): StoryDiffusion CSA (paper §3.1), ``ConsistencyState.contexts_for``; the
  module is called with ``context = [own tokens ; peer or bank tokens]`` (hosts.md §3.2 (c)), once per context
  length.
- ``IdentityCrossAttentionHook`` (attn2): 1Prompt1Story IPCA (paper §3.2), cond rows only. With dropout 0 the cond
  rows call the module with ``[own context ; SOT + identity rows]``; with dropout p > 0 the bias differs per query,
  which no context can express, so the cond rows are computed here (``biased_attention_forward``) with the module's
  own projections plus the seeded bias of ``IdentityAttentionState``.
- ``SubjectMapHook`` (attn2) then ``StorySyncSelfAttentionHook`` (attn1): StorySync (paper §3.1-3.3) -- the cond
  rows' subject maps for the masks, masked sharing and BLI on the input side, RFH on the output.

Host contract: a hooked forward takes the hidden states first and the text context as a keyword (``context=`` for
ldm/sgm ``CrossAttention``, hosts.md §3.1; ``encoder_hidden_states=`` for diffusers' ``Attention``); ``to_q``,
``to_k``, ``to_v``, ``to_out`` and ``heads`` exist on the module. A call that is not the plain form a hook expects
(positional extras, tensor keywords, a row count that does not match the state's layout) passes through untouched.
Install around each sampling call and remove in ``finally`` (``instance_hooks``); a hook whose state is closed
passes through.
"""
from __future__ import annotations

from typing import Iterable

import torch

from ..common.addresses import LayerAddress
from ..common.attention import multi_head_attention
from ..common.async_index import index_tensor
from ..one_prompt_one_story.ipca import IdentityAttentionState, append_identity_tokens, cond_rows, identity_keys
from ..story_diffusion.consistent_self_attention import attend_in_groups
from ..story_diffusion.state import ConsistencyState
from ..story_sync.state import StorySyncState
from .instance_hooks import InstanceForwardHook, install_hooks, remove_hooks
from .reach import CSA, HARMONIZATION, IPCA, SHARING, SUBJECT_MAPS, Reach


def _has_tensor_kwargs(kwargs: dict, allowed: str) -> bool:
    return any(isinstance(value, torch.Tensor) for key, value in kwargs.items() if key != allowed)


class _SelfAttentionHook(InstanceForwardHook):
    def _attention(self, kwargs: dict):
        """The self-attention of ``attend_in_groups``: the module's own forward with ``context``, or with padded
        contexts (a ``visible`` mask, which the host's forward cannot take) ``padded_attention_forward``."""
        def attention(query_input: torch.Tensor, context: torch.Tensor | None,
                      visible: torch.Tensor | None = None) -> torch.Tensor:
            if visible is not None:
                return padded_attention_forward(self.module, query_input, context, visible)
            return self._inner_forward(query_input, **{**kwargs, self.context_kwarg: context})
        return attention


# ------------------------------------------------------------------------------ StoryDiffusion: CSA (attn1)


class ConsistentSelfAttentionHook(_SelfAttentionHook):
    """Instance-level ``forward`` of one self-attention module that applies CSA through ``state``."""

    state: ConsistencyState
    surfaces = (CSA,)

    def __call__(self, hidden: torch.Tensor, *args, **kwargs):
        self._entered()
        if self.retired or args or kwargs.get(self.context_kwarg) is not None or hidden.dim() != 3 or any(
                isinstance(value, torch.Tensor) for value in kwargs.values()):
            return self._inner_forward(hidden, *args, **kwargs)  # not a plain self-attention call
        groups = self.state.contexts_for(self.layer, hidden)
        if groups is None:
            return self._inner_forward(hidden, **kwargs)

        return attend_in_groups(self._attention(kwargs), hidden, groups)


def install_csa_hooks(layers: Iterable[tuple[LayerAddress, torch.nn.Module]], state: ConsistencyState,
                      context_kwarg: str = "context", reach: Reach | None = None) -> list[InstanceForwardHook]:
    """Hook every given attn1 module; on an error the hooks installed so far are removed before re-raising."""
    return install_hooks(layers, state, ConsistentSelfAttentionHook, context_kwarg, reach)


# ------------------------------------------------------------------------------ 1Prompt1Story: IPCA (attn2)


def module_attention(module: torch.nn.Module, hidden: torch.Tensor, context: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """The attention of an ldm/diffusers attention module with a mask the host's forward cannot take (A1111's
    optimised forwards ignore or refuse one, hosts.md §3.1): the module's own ``to_q/to_k/to_v``, ``heads`` and
    every layer of ``to_out`` (Linear then Dropout in both libraries) around ``multi_head_attention``.

    hidden: (R, Q, C); context: (R, T, D); mask: broadcastable to (R, heads, Q, T), a float logit bias or a bool
    "may attend" mask. Returns (R, Q, C_out).
    """
    out = multi_head_attention(module.to_q(hidden), module.to_k(context), module.to_v(context), module.heads, mask)
    for layer in module.to_out:
        out = layer(out)
    return out


def biased_attention_forward(module: torch.nn.Module, hidden: torch.Tensor, context: torch.Tensor,
                             bias: torch.Tensor) -> torch.Tensor:
    """``module_attention`` with an additive logit bias (R, Q, T), shared across heads."""
    return module_attention(module, hidden, context, bias.unsqueeze(1))


def padded_attention_forward(module: torch.nn.Module, hidden: torch.Tensor, context: torch.Tensor,
                             visible: torch.Tensor) -> torch.Tensor:
    """``module_attention`` over padded contexts (R, L, D): ``visible`` (R, L) bool marks each row's real keys
    (a key-padding mask: one call for rows whose contexts differ in length)."""
    return module_attention(module, hidden, context, visible[:, None, None, :])


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
        cond = cond_rows(state.layout)
        if not cond:
            return self._inner_forward(hidden, **kwargs)
        cond_set = set(cond)
        rest = [r for r in range(hidden.shape[0]) if r not in cond_set]
        cond_index = torch.tensor(cond, device=hidden.device)
        cond_context = context.index_select(0, cond_index)
        keys = identity_keys(state, self.layer, state.layout, cond, cond_context, hidden.shape[1], hidden)
        if keys is None:
            return self._inner_forward(hidden, **kwargs)
        cond_hidden = hidden.index_select(0, cond_index)
        if keys.bias is None:
            extended = append_identity_tokens(cond_context, keys.columns)
            cond_out = self._inner_forward(cond_hidden, **{**kwargs, self.context_kwarg: extended})
        else:
            cond_out = biased_attention_forward(self.module, cond_hidden, cond_context, keys.bias)
        if not rest:
            return cond_out
        rest_index = torch.tensor(rest, device=hidden.device)
        rest_out = self._inner_forward(hidden.index_select(0, rest_index),
                                       **{**kwargs, self.context_kwarg: context.index_select(0, rest_index)})
        out = cond_out.new_empty((hidden.shape[0],) + tuple(cond_out.shape[1:]))
        out.index_copy_(0, cond_index, cond_out)
        out.index_copy_(0, rest_index, rest_out)
        return out


def install_identity_hooks(layers: Iterable[tuple[LayerAddress, torch.nn.Module]], state: IdentityAttentionState,
                           context_kwarg: str = "context", reach: Reach | None = None) -> list[InstanceForwardHook]:
    """Hook every given attn2 module; on an error the hooks installed so far are removed before re-raising."""
    return install_hooks(layers, state, IdentityCrossAttentionHook, context_kwarg, reach)


# ------------------------------------------------------------------------------ StorySync (attn2, attn1)


class SubjectMapHook(InstanceForwardHook):
    """attn2: adds the cond rows' subject maps of the mask layers to the state, then attends as before."""

    state: StorySyncState
    surfaces = (SUBJECT_MAPS,)

    def __call__(self, hidden: torch.Tensor, *args, **kwargs):
        self._entered()
        context = kwargs.get(self.context_kwarg)
        state = self.state
        if not (self.retired or args or context is None or hidden.dim() != 3 or context.shape[0] != hidden.shape[0]
                or _has_tensor_kwargs(kwargs, self.context_kwarg)) \
                and state.wants_maps(self.layer, hidden.shape[0], hidden.shape[1]):
            rows = state.cond_rows()
            index = index_tensor(rows, hidden.device)
            with torch.no_grad():
                q = self.module.to_q(hidden.index_select(0, index))
                k = self.module.to_k(context.index_select(0, index))
            state.add_maps(q, k, self.module.heads, rows)
        return self._inner_forward(hidden, *args, **kwargs)


class StorySyncSelfAttentionHook(_SelfAttentionHook):
    """attn1: ``StorySyncState.self_attention`` (input side) then ``harmonize_output`` (RFH)."""

    state: StorySyncState
    surfaces = (SHARING, HARMONIZATION)

    def __call__(self, hidden: torch.Tensor, *args, **kwargs):
        self._entered()
        if self.retired or args or kwargs.get(self.context_kwarg) is not None or hidden.dim() != 3 \
                or _has_tensor_kwargs(kwargs, self.context_kwarg):
            return self._inner_forward(hidden, *args, **kwargs)  # not a plain self-attention call

        out = self.state.self_attention(self.layer, hidden, self._attention(kwargs))
        if out is None:
            out = self._inner_forward(hidden, **kwargs)
        return self.state.harmonize_output(self.layer, out)


def install_storysync_hooks(attn1: Iterable[tuple[LayerAddress, torch.nn.Module]],
                            attn2: Iterable[tuple[LayerAddress, torch.nn.Module]], state: StorySyncState,
                            context_kwarg: str = "context", reach: Reach | None = None) -> list[InstanceForwardHook]:
    """Hook the self- and cross-attention modules; on an error the hooks installed so far are removed."""
    hooks = install_hooks(attn2, state, SubjectMapHook, context_kwarg, reach)
    try:
        hooks += install_hooks(attn1, state, StorySyncSelfAttentionHook, context_kwarg, reach)
    except Exception:
        remove_hooks(hooks)
        raise
    return hooks
