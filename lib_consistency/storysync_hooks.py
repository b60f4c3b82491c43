"""StorySync on real attention modules (A1111's ldm/sgm UNet, diffusers): instance-level hooks over ``StorySyncState``.

Host contract as ``attention_hooks``: a hooked forward takes the hidden states first and the text context as a
keyword (``context=`` ldm/sgm, ``encoder_hidden_states=`` diffusers); ``to_q``/``to_k`` and ``heads`` exist on the
module. Install around each sampling call, remove in ``finally``; a hook whose state is closed passes through.
- ``SubjectMapHook`` (attn2): the cond rows' subject maps for the masks, then the module's own forward (IPCA's hook,
  if any, sits below it and still runs);
- ``StorySyncSelfAttentionHook`` (attn1): masked sharing and BLI on the input side, RFH on the output.
"""
from __future__ import annotations

from typing import Iterable

import torch

from .async_index import index_tensor
from .attention_hooks import InstanceForwardHook, install_hooks, remove_hooks
from .consistent_self_attention import LayerAddress
from .reach import HARMONIZATION, SHARING, SUBJECT_MAPS, Reach
from .story_sync import StorySyncState


def _has_tensor_kwargs(kwargs: dict, allowed: str) -> bool:
    return any(isinstance(value, torch.Tensor) for key, value in kwargs.items() if key != allowed)


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


class StorySyncSelfAttentionHook(InstanceForwardHook):
    """attn1: ``StorySyncState.self_attention`` (input side) then ``harmonize_output`` (RFH)."""

    state: StorySyncState
    surfaces = (SHARING, HARMONIZATION)

    def __call__(self, hidden: torch.Tensor, *args, **kwargs):
        self._entered()
        if self.retired or args or kwargs.get(self.context_kwarg) is not None or hidden.dim() != 3 \
                or _has_tensor_kwargs(kwargs, self.context_kwarg):
            return self._inner_forward(hidden, *args, **kwargs)  # not a plain self-attention call

        def attention(query_input: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
            return self._inner_forward(query_input, **{**kwargs, self.context_kwarg: context})

        out = self.state.self_attention(self.layer, hidden, attention)
        if out is None:
            out = self._inner_forward(hidden, **kwargs)
        return self.state.harmonize_output(self.layer, out)


def install_storysync_hooks(attn1: Iterable[tuple[LayerAddress, torch.nn.Module]],
                            attn2: Iterable[tuple[LayerAddress, torch.nn.Module]], state: StorySyncState,
                            context_kwarg: str = "context", reach: Reach | None = None) -> list[InstanceForwardHook]:
    """Hook the self- and cross-attention modules; on an error the hooks installed so far are removed."""
    hooks = install_hooks(attn2, state, context_kwarg, SubjectMapHook, reach)
    try:
        hooks += install_hooks(attn1, state, context_kwarg, StorySyncSelfAttentionHook, reach)
    except Exception:
        remove_hooks(hooks)
        raise
    return hooks
