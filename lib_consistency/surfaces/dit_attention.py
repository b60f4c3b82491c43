"""The methods on a diffusion transformer's joint text+image attention (Flux's double- and single-stream blocks).

One surface of ``surfaces/`` (see its ``__init__``), host-free. Host contract, the same in Forge, Forge Neo and
diffusers: a block projects its tokens to q, k, v for the joint sequence ``[text tokens ; image tokens]`` (text first),
applies QK-norm and RoPE (image tokens rotated by their (row, column) position, text tokens by position 0), and
attends over the whole sequence. The block adapters (``flux_blocks`` for the WebUIs, ``diffusers_flux`` for tests and
benches) call ``joint_attention`` with that post-RoPE q, k, v ``[R, H, L, D]`` and the text length ``T``;
``None`` back means "attend as the host would", so with every method off the host's own call runs, bit for bit.

What each method sees (our choice where the papers say nothing about Flux):
- the image tokens play the UNet's self-attention: consistent self-attention (``ConsistencyState.contexts_for``) and
  StorySync's masked sharing / BLI (``StorySyncState.self_attention_groups``) run on the image part of ``[k | v]`` /
  ``[q | k | v]`` with heads flattened. A shared key keeps the RoPE of the frame it comes from (it is gathered after
  RoPE), the paper's "each shared key keeps its own frame's position";
- an image query attends over its own text keys, its own image keys and the shared ones; text queries attend over
  their own sequence only, so no frame's text stream takes another frame's image tokens;
- the text tokens play the UNet's cross-attention: StorySync's subject maps are our own softmax of the image queries
  over the text keys (double-stream blocks, cond rows), read at the subject's text token columns;
- RFH (``harmonize``) runs on the image tokens' attention output, before the block's output projection (a linear map
  per token, so the blend commutes with it; the nearest-neighbour match is taken before it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..common.addresses import LayerAddress
from ..common.async_index import index_tensor
from ..common.row_layout import RowLayout
from .reach import CSA, HARMONIZATION, SHARING, SUBJECT_MAPS, Reach

DitAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # q, k, v [r, H, L, D] -> [r, Lq, H·D]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Flux's attention after RoPE: [r, H, Lq, D] queries over [r, H, Lk, D] keys/values -> [r, Lq, H·D]."""
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


@dataclass(frozen=True)
class DitRunState:
    """What the block adapters of one sampling call need: the method states (``csa``: ``ConsistencyState``,
    ``storysync``: ``StorySyncState``; None when off), the ``Reach`` each surface tells, and this call's rows and
    image-token grid, set by the adapter per model call (``rows``)."""
    csa: Any = None
    storysync: Any = None
    reach: Reach | None = None

    def enter(self, surface: str, layer: LayerAddress) -> None:
        if self.reach is not None:
            self.reach.hit(surface, layer)

    def set_rows(self, layout: RowLayout, grid_hw: tuple[int, int]) -> None:
        """Rows (frames, CFG roles) of the coming model call and its image-token grid (H/16, W/16 for Flux)."""
        if self.csa is not None:
            self.csa.begin_unet_call(layout, grid_hw)
        if self.storysync is not None:
            self.storysync.set_rows(layout, grid_hw)

    def __deepcopy__(self, memo: dict) -> "DitRunState":
        return self  # a handle: a patcher's clone() deep-copies its options, every clone must share the live state


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[r, H, L, D] -> [r, L, H·D]."""
    return x.transpose(1, 2).flatten(2)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[r, L, H·D] -> [r, H, L, D]."""
    return x.unflatten(2, (heads, -1)).transpose(1, 2)


def _add_maps(state, layer: LayerAddress, q: torch.Tensor, k: torch.Tensor, text: int) -> None:
    rows = state.cond_rows()
    index = index_tensor(rows, q.device)
    heads = q.shape[1]
    state.add_maps(_flat(q.index_select(0, index)[:, :, text:]), _flat(k.index_select(0, index)[:, :, :text]), heads,
                   rows)


def joint_attention(run: DitRunState | None, layer: LayerAddress, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    text: int, attend: DitAttention = sdpa) -> torch.Tensor | None:
    """The methods' joint attention of one block; None = attend plainly (nothing to change at this call).

    q, k, v: [R, H, T + N, D] after QK-norm and RoPE, text tokens first (``text`` = T). ``attend``: the host's
    attention on already-rotated [r, H, L, D] tensors. Returns [R, T + N, H·D] like the host's attention.
    """
    if run is None or (run.csa is None and run.storysync is None):
        return None
    heads, width = q.shape[1], q.shape[1] * q.shape[3]
    image = slice(text, None)
    if run.storysync is not None:
        state = run.storysync
        if layer[0] == "double":
            run.enter(SUBJECT_MAPS, layer)
            if state.wants_maps(layer, q.shape[0], q.shape[2] - text):
                _add_maps(state, layer, q, k, text)
        run.enter(SHARING, layer)
        planned = state.self_attention_groups(layer, torch.cat([_flat(x[:, :, image]) for x in (q, k, v)], dim=-1))
        if planned is None:
            return None
        query, groups = planned
        image_q = query[..., :width]
        contexts = [(g.rows, g.context[..., width:2 * width], g.context[..., 2 * width:]) for g in groups]
    else:
        run.enter(CSA, layer)
        groups = run.csa.contexts_for(layer, torch.cat([_flat(x[:, :, image]) for x in (k, v)], dim=-1))
        if not groups:
            return None
        image_q = _flat(q[:, :, image])
        contexts = [(g.rows, g.context[..., :width], g.context[..., width:]) for g in groups]
    out = attend(q[:, :, :text], k, v)  # text queries: their own sequence
    image_out = out.new_empty((q.shape[0], q.shape[2] - text, width))
    covered = set()
    for rows, keys, values in contexts:
        index = index_tensor(rows, q.device)
        own_k, own_v = k.index_select(0, index)[:, :, :text], v.index_select(0, index)[:, :, :text]
        result = attend(_heads(image_q.index_select(0, index), heads), torch.cat([own_k, _heads(keys, heads)], 2),
                        torch.cat([own_v, _heads(values, heads)], 2))
        image_out.index_copy_(0, index, result.to(image_out.dtype))
        covered.update(rows)
    rest = [r for r in range(q.shape[0]) if r not in covered]
    if rest:  # rows sharing nothing: their own joint sequence
        index = index_tensor(rest, q.device)
        result = attend(_heads(image_q.index_select(0, index), heads), k.index_select(0, index),
                        v.index_select(0, index))
        image_out.index_copy_(0, index, result.to(image_out.dtype))
    return torch.cat([out, image_out], dim=1)


def harmonize(run: DitRunState | None, layer: LayerAddress, out: torch.Tensor, text: int) -> torch.Tensor:
    """StorySync's RFH on a block's attention output [R, T + N, C] (image tokens only, before the output
    projection); unchanged outside the RFH blocks and window."""
    if run is None or run.storysync is None:
        return out
    run.enter(HARMONIZATION, layer)
    image = out[:, text:]
    harmonized = run.storysync.harmonize_output(layer, image)
    return out if harmonized is image else torch.cat([out[:, :text], harmonized], dim=1)
