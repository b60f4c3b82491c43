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
- IPCA: the cond rows' image queries see the identity prompt's text keys twice (T5 is bidirectional, so these are
  the consolidated prompt's identity rows, not those of a separate identity-only encoding as in the official code;
  on CLIP the two are equal, methods.md §2.5);
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
from ..one_prompt_one_story.ipca import attention_with_bias, cond_rows, dropout_bias
from .reach import CSA, HARMONIZATION, IPCA, SHARING, SUBJECT_MAPS, Reach

DitAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # q, k, v [r, H, L, D] -> [r, Lq, H·D]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Flux's attention after RoPE: [r, H, Lq, D] queries over [r, H, Lk, D] keys/values -> [r, Lq, H·D]."""
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


@dataclass(frozen=True)
class DitRunState:
    """What the block adapters of one sampling call need: the method states (``csa``: ``ConsistencyState``,
    ``storysync``: ``StorySyncState``, ``ipca``: ``IdentityAttentionState``; None when off) and the ``Reach`` each
    surface tells. The adapter gives the states each model call's rows and image-token grid (``set_rows``)."""
    csa: Any = None
    storysync: Any = None
    reach: Reach | None = None
    ipca: Any = None  # IdentityAttentionState: its identity positions are T5 columns here

    def enter(self, surface: str, layer: LayerAddress) -> None:
        if self.reach is not None:
            self.reach.hit(surface, layer)

    def set_rows(self, layout: RowLayout, grid_hw: tuple[int, int]) -> None:
        """Rows (frames, CFG roles) of the coming model call and its image-token grid (H/16, W/16 for Flux)."""
        if self.csa is not None:
            self.csa.begin_unet_call(layout, grid_hw)
        if self.storysync is not None:  # a new model call: maps of an aborted one are dropped
            self.storysync.begin_unet_call(layout, grid_hw)
        if self.ipca is not None:
            self.ipca.layout = layout

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


def _ipca(run: DitRunState, layer: LayerAddress, rows: int, text: int) -> tuple[set[int], tuple[int, ...]] | None:
    """IPCA's cond rows and identity text columns in this call; None when IPCA is off or cannot read it."""
    state = run.ipca
    if state is None:
        return None
    run.enter(IPCA, layer)
    if state.closed or not state.layout.matches(rows):
        return None
    columns = tuple(c for c in state.identity_positions if c < text)
    cond = cond_rows(state.layout)
    return (set(cond), columns) if cond and columns else None


def joint_attention(run: DitRunState | None, layer: LayerAddress, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    text: int, attend: DitAttention = sdpa) -> torch.Tensor | None:
    """The methods' joint attention of one block; None = attend plainly (nothing to change at this call).

    q, k, v: [R, H, T + N, D] after QK-norm and RoPE, text tokens first (``text`` = T). ``attend``: the host's
    attention on already-rotated [r, H, L, D] tensors. Returns [R, T + N, H·D] like the host's attention.
    IPCA (1Prompt1Story §3.2, the ln 2 form): the cond rows' image queries see their identity text keys twice
    (appended), or with IPCA dropout a seeded ln(1 + b) logit bias on them (our own attention with that mask).
    """
    if run is None:
        return None
    rows, heads, width = q.shape[0], q.shape[1], q.shape[1] * q.shape[3]
    image = slice(text, None)
    image_q, contexts = _flat(q[:, :, image]), []
    if run.storysync is not None:
        state = run.storysync
        if layer[0] == "double":
            run.enter(SUBJECT_MAPS, layer)
            if state.wants_maps(layer, rows, q.shape[2] - text):
                _add_maps(state, layer, q, k, text)
        run.enter(SHARING, layer)
        planned = state.self_attention_groups(layer, torch.cat([_flat(x[:, :, image]) for x in (q, k, v)], dim=-1))
        if planned is not None:
            query, groups = planned
            image_q = query[..., :width]
            contexts = [(g.rows, g.context[..., width:2 * width], g.context[..., 2 * width:], g.visible)
                        for g in groups]
    elif run.csa is not None:
        run.enter(CSA, layer)
        groups = run.csa.contexts_for(layer, torch.cat([_flat(x[:, :, image]) for x in (k, v)], dim=-1))
        contexts = [(g.rows, g.context[..., :width], g.context[..., width:], g.visible) for g in groups or ()]
    ipca = _ipca(run, layer, rows, text)
    if not contexts and ipca is None:
        return None
    covered = {r for group_rows, *_ in contexts for r in group_rows}
    rest = tuple(r for r in range(rows) if r not in covered)
    if rest:  # rows sharing nothing: their own image keys
        index = index_tensor(rest, q.device)
        contexts.append((rest, _flat(k.index_select(0, index)[:, :, image]),
                         _flat(v.index_select(0, index)[:, :, image]), None))
    out = attend(q[:, :, :text], k, v)  # text queries: their own sequence
    image_out = out.new_empty((rows, q.shape[2] - text, width))
    for group_rows, keys, values, visible in contexts:
        for part, with_ipca in _split(group_rows, ipca):
            index = index_tensor(part, q.device)
            part_keys, part_values, part_visible = keys, values, visible
            if tuple(part) != tuple(group_rows):  # a subset (IPCA's cond rows): its rows of the context
                local = index_tensor([group_rows.index(r) for r in part], q.device)
                part_keys, part_values = keys.index_select(0, local), values.index_select(0, local)
                part_visible = None if visible is None else visible.index_select(0, local)
            if tuple(part) == tuple(range(rows)):
                own_k, own_v, queries = k[:, :, :text], v[:, :, :text], image_q
            else:
                own_k, own_v = k.index_select(0, index)[:, :, :text], v.index_select(0, index)[:, :, :text]
                queries = image_q.index_select(0, index)
            keys_part = torch.cat([own_k, _heads(part_keys, heads)], 2)
            values_part = torch.cat([own_v, _heads(part_values, heads)], 2)
            mask = None if part_visible is None else torch.cat([part_visible.new_ones(len(part), text),
                                                                part_visible], 1)
            if with_ipca:
                result = _identity_attention(run, layer, part, ipca[1], _heads(queries, heads), keys_part,
                                             values_part, attend, mask)
            else:
                result = _attend(attend, _heads(queries, heads), keys_part, values_part, mask)
            image_out.index_copy_(0, index, result.to(image_out.dtype))
    return torch.cat([out, image_out], dim=1)


def _attend(attend: DitAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            visible: torch.Tensor | None) -> torch.Tensor:
    """The host's attention, or for padded keys (``visible`` (r, L) bool: each row's real keys, StorySync's masked
    sharing) ``scaled_dot_product_attention`` with that key-padding mask: one call for rows of different context
    lengths. The hosts' attention functions cannot all take such a mask (Forge's xformers path pads it to the
    query length)."""
    if visible is None:
        return attend(q, k, v)
    return _flat(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None, None, :]))


def _split(rows: tuple[int, ...], ipca) -> list[tuple[list[int], bool]]:
    """``rows`` as (IPCA's cond rows, True) and (the others, False), empty parts left out."""
    if ipca is None:
        return [(list(rows), False)]
    parts = [([r for r in rows if r in ipca[0]], True), ([r for r in rows if r not in ipca[0]], False)]
    return [part for part in parts if part[0]]


def _identity_attention(run, layer, rows, columns, q, k, v, attend, visible=None) -> torch.Tensor:
    """Image queries [r, H, Q, D] of cond rows over keys whose first columns are their text: the identity columns
    appended once more (= +ln 2 on their logits), or IPCA dropout's seeded bias. ``visible`` (r, L) bool: the
    real keys of padded contexts (``_attend``)."""
    state = run.ipca
    if state.dropout == 0:
        index = index_tensor(columns, q.device)
        if visible is not None:
            visible = torch.cat([visible, visible.new_ones(visible.shape[0], len(columns))], 1)
        return _attend(attend, q, torch.cat([k, k.index_select(2, index)], 2),
                       torch.cat([v, v.index_select(2, index)], 2), visible)
    frames = [state.layout.frames[r] for r in rows]
    bias = dropout_bias(state, layer, frames, q.shape[2], k.shape[2], columns, q).unsqueeze(1)
    if visible is not None:
        bias = bias.to(q.dtype).masked_fill(~visible[:, None, None, :], float("-inf"))
    return _flat(attention_with_bias(q, k, v, bias))


def harmonize(run: DitRunState | None, layer: LayerAddress, out: torch.Tensor, text: int) -> torch.Tensor:
    """StorySync's RFH on a block's attention output [R, T + N, C] (image tokens only, before the output
    projection); unchanged outside the RFH blocks and window."""
    if run is None or run.storysync is None:
        return out
    run.enter(HARMONIZATION, layer)
    image = out[:, text:]
    harmonized = run.storysync.harmonize_output(layer, image)
    return out if harmonized is image else torch.cat([out[:, :text], harmonized], dim=1)
