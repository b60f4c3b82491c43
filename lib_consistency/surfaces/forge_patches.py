"""The methods as Forge attention patches: replace patches on the projected q/k/v, an output patch after ``to_out``.

One surface of ``surfaces/`` (see its ``__init__``), host-free: Forge's attention function is passed in, and
``hosts/forge.py`` registers these patches on a cloned UNet patcher (hosts.md §6). Host contract
(``backend/nn/unet.py``): a replace patch gets ``(q, k, v, extra_options)`` for the call's own rows; ``extra_options``
holds ``n_heads``, ``block``, ``block_index``, ``original_shape``, ``sigmas`` and ``cond_or_uncond`` (one entry per
chunk of B rows, B = len(sigmas)), from which the row layout is read (in BLI lock-step, ``TWINS_OPTION``: the last
B/2 rows of every chunk are the vanilla twins of the first B/2, ``hosts/lockstep.py``).
- consistent self-attention (attn1): the peer tokens' keys/values are gathered from the projected k/v (projection is
  per token, so gather-then-project equals project-then-gather); ``ConsistencyState.contexts_for`` runs on
  ``[k | v]`` token rows, so its sampling, character groups, schedule and bank work unchanged (the bank holds
  projected tokens here);
- IPCA (attn2): cond rows get their SOT + identity keys/values appended (``identity_keys``), or the seeded dropout
  bias as an attention mask;
- StorySync: masked sharing and BLI on ``q | k | v`` (attn1), RFH as an attn1 output patch, subject maps from the
  cond rows' q and k (attn2).
The run state travels in ``transformer_options[TRANSFORMER_OPTION]`` (``ForgeRunState``), which the patches read from
``extra_options``; without it (another patcher's clone, a stale patch) they attend plainly. Every patch entered with
the run state tells its ``Reach`` (``reach.py``).

Another extension's replace patch on the same block (SAG, StyleAlign, IP-Adapter, reference-only register them) is
wrapped, not overwritten (``set_replace_all``): on every call our method leaves alone it is called exactly as Forge
would call it; a call our method must change (shared keys, blended queries, identity tokens, a dropout mask) cannot
be handed to a patch that expects the whole batch with its own keys, so it is refused with a message naming that
patch, at the first such call (before any image).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..common.async_index import index_tensor
from ..common.attention import multi_head_attention
from ..common.row_layout import Frames, RowLayout, forge_row_layout
from ..one_prompt_one_story.ipca import append_identity_tokens, cond_rows, identity_keys
from .reach import CSA, HARMONIZATION, IPCA, SHARING, SUBJECT_MAPS, Reach

Attention = Callable[..., torch.Tensor]  # attention_function(q, k, v, heads, mask=None) on [R, T, heads·d]
TRANSFORMER_OPTION = "consistent_story"
TWINS_OPTION = "consistent_story_twins"  # set per call in BLI lock-step: each chunk's second half is the story's twins


@dataclass(frozen=True)
class ForgeRunState:
    """What the patches of one sampling call need: the CSA, IPCA and StorySync states, this batch's first frame (or
    its frames, ``row_layout.Frames``), and the ``Reach`` each patch tells that it ran (the pipeline's guard checks
    it after every UNet call)."""
    csa: Any
    ipca: Any
    frame_offset: Frames
    storysync: Any = None
    reach: Reach | None = None

    def entered(self, surface: str, extra_options: dict) -> None:
        if self.reach is not None:
            self.reach.hit(surface, _layer(extra_options))

    def __deepcopy__(self, memo: dict) -> "ForgeRunState":
        return self  # a handle: every clone() deep-copies model_options, and all clones must share the live state


def _layout(extra_options: dict, rows: int, frame_offset: Frames) -> RowLayout:
    return forge_row_layout(extra_options.get("cond_or_uncond", ()), len(extra_options.get("sigmas", ())), rows,
                            frame_offset, twinned=bool(extra_options.get(TWINS_OPTION, False)))


def _layer(extra_options: dict) -> tuple[str, int, int] | None:
    block = extra_options.get("block")
    return None if block is None else (block[0], int(block[1]), int(extra_options.get("block_index", 0)))


Patch = Callable[..., torch.Tensor]  # a replace patch: (q, k, v, extra_options) -> attention output


def _patch_name(patch: Patch) -> str:
    return f"{getattr(patch, '__module__', '?')}.{getattr(patch, '__qualname__', type(patch).__name__)}"


def plain_call(attention: Attention, foreign: Patch | None) -> Patch:
    """The call as Forge would make it without us: the other extension's patch, or the attention function."""
    return foreign if foreign is not None else lambda q, k, v, extra_options: attention(q, k, v,
                                                                                          extra_options["n_heads"])


def _altered(attention: Attention, foreign: Patch | None, what: str, extra_options: dict) -> Attention:
    """The attention for a call our method changes; refused where another extension's patch owns the block."""
    if foreign is not None:
        raise RuntimeError(f"Consistent Story: {what} cannot share the attention of block {_layer(extra_options)} "
                           f"with another extension's attention patch there ({_patch_name(foreign)}); turn one of "
                           "them off, or choose layers that leave that block")
    return attention


def set_replace_all(unet, target: str, make: Callable[[Patch | None], Patch]) -> list[str]:
    """Our replace patch for ``target`` on every transformer block, as ``set_model_replace_all`` does, but where
    another patch is registered (its 3-tuple key or its block's 2-tuple key, which Forge falls back to) ours is built
    around it: ``make(foreign)``. Returns the wrapped patches' names."""
    existing = unet.model_options.get("transformer_options", {}).get("patches_replace", {}).get(target, {})
    ours, wrapped = make(None), []
    for block_name in ("input", "middle", "output"):
        for number in range(16):
            for index in range(16):
                foreign = existing.get((block_name, number, index), existing.get((block_name, number)))
                if foreign is not None:
                    wrapped.append(_patch_name(foreign))
                unet.set_model_patch_replace(ours if foreign is None else make(foreign), target, block_name,
                                             number, index)
    return sorted(set(wrapped))


def padded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                     visible: torch.Tensor) -> torch.Tensor:
    """Attention of q [R, Q, H·d] over padded k, v [R, L, H·d] with ``visible`` (R, L) bool marking each row's real
    keys (``multi_head_attention``: Forge's own attention functions do not all take such a mask)."""
    return multi_head_attention(q, k, v, heads, visible[:, None, None, :])


def _in_groups(attention: Attention, heads: int, q, k, v, groups: list) -> torch.Tensor:
    """Attention per row group: ``groups`` holds (rows, k_rows, v_rows, mask); rows in no group attend plainly."""
    covered = {r for rows, *_ in groups for r in rows}
    rest = [r for r in range(q.shape[0]) if r not in covered]
    if rest:
        index = index_tensor(rest, q.device)
        groups = groups + [(rest, k.index_select(0, index), v.index_select(0, index), None)]
    if len(groups) == 1 and list(groups[0][0]) == list(range(q.shape[0])):
        rows, k_rows, v_rows, mask = groups[0]
        return attention(q, k_rows, v_rows, heads, mask=mask)
    out = None
    for rows, k_rows, v_rows, mask in groups:
        index = index_tensor(rows, q.device)
        result = attention(q.index_select(0, index), k_rows, v_rows, heads, mask=mask)
        if out is None:
            out = result.new_empty((q.shape[0],) + tuple(result.shape[1:]))
        out.index_copy_(0, index, result)
    return out


def _replace_patch(method: str, surface: str, groups_for: Callable, attention: Attention,
                   foreign: Patch | None = None):
    """A replace patch ``(q, k, v, extra_options) -> out``: reads the run state and the rows of this call, asks
    ``groups_for(state, q, k, v, extra_options, layout, layer)`` for row groups; None means the plain call
    (``foreign``, another extension's patch on this block, if any)."""
    plain = plain_call(attention, foreign)

    def patch(q, k, v, extra_options):
        run = extra_options.get(TRANSFORMER_OPTION)
        state = None if run is None else getattr(run, method)
        if state is None:
            return plain(q, k, v, extra_options)
        run.entered(surface, extra_options)
        layout = _layout(extra_options, q.shape[0], run.frame_offset)
        groups = groups_for(state, q, k, v, extra_options, layout, _layer(extra_options))
        if not groups:
            return plain(q, k, v, extra_options)
        attend = _altered(attention, foreign, method.upper(), extra_options)
        return _in_groups(attend, extra_options["n_heads"], q, k, v, groups)
    return patch


def _csa_groups(state, q, k, v, extra_options, layout, layer):
    shape = extra_options.get("original_shape")
    state.begin_unet_call(layout, tuple(shape[-2:]) if shape is not None else None)
    groups = None if layer is None else state.contexts_for(layer, torch.cat([k, v], dim=-1))
    width = k.shape[-1]
    return [(g.rows, g.context[..., :width], g.context[..., width:], None) for g in groups or ()]


def _ipca_groups(state, q, k, v, extra_options, layout, layer):
    if state.closed or not layout.known:
        return None
    cond = cond_rows(layout)
    if not cond:
        return None
    index = index_tensor(cond, q.device)
    k_cond, v_cond = k.index_select(0, index), v.index_select(0, index)
    # Forge repeats a 77-token cond batched with a longer uncond: ``identity_columns`` finds every copy
    keys = identity_keys(state, layer or ("?", 0, 0), layout, cond, k_cond, q.shape[1], q)
    if keys is None:
        return None
    if keys.bias is None:
        return [(cond, append_identity_tokens(k_cond, keys.columns), append_identity_tokens(v_cond, keys.columns),
                 None)]
    return [(cond, k_cond, v_cond, keys.bias.unsqueeze(1))]


def _storysync_rows(run, extra_options: dict, rows: int, surface: str):
    """The StorySync state with this call's rows set, and the layer; (None, None) when StorySync is not on.
    Tells the run's reach that ``surface`` ran."""
    state = None if run is None else run.storysync
    layer = _layer(extra_options)
    if state is None or layer is None:
        return None, None
    run.entered(surface, extra_options)
    shape = extra_options.get("original_shape")
    state.set_rows(_layout(extra_options, rows, run.frame_offset), tuple(shape[-2:]) if shape is not None else None)
    return state, layer


def storysync_replace(attention: Attention, foreign: Patch | None = None):
    """attn1 replace patch: StorySync's input side (masked sharing, BLI) on the projected q | k | v. Projections
    are per token and linear (no bias in SD attention), so gathering or blending them equals doing it on the
    inputs; the BLI cache holds q | k | v here. ``foreign``: another extension's patch on this block."""
    plain = plain_call(attention, foreign)

    def patch(q, k, v, extra_options):
        heads = extra_options["n_heads"]
        state, layer = _storysync_rows(extra_options.get(TRANSFORMER_OPTION), extra_options, q.shape[0], SHARING)
        if state is None:
            return plain(q, k, v, extra_options)
        width = q.shape[-1]

        def attend(query_qkv, context_qkv, visible=None):
            inner = _altered(attention, foreign, "StorySync", extra_options)
            source = query_qkv if context_qkv is None else context_qkv
            q_, k_, v_ = query_qkv[..., :width], source[..., width:2 * width], source[..., 2 * width:]
            if visible is None:
                return inner(q_, k_, v_, heads)
            return padded_attention(q_, k_, v_, heads, visible)

        out = state.self_attention(layer, torch.cat([q, k, v], dim=-1), attend)
        return plain(q, k, v, extra_options) if out is None else out
    return patch


def storysync_output_patch(out, extra_options):
    """attn1 output patch (after ``to_out``, before the residual): StorySync's RFH."""
    state, layer = _storysync_rows(extra_options.get(TRANSFORMER_OPTION), extra_options, out.shape[0],
                                   HARMONIZATION)
    return out if state is None else state.harmonize_output(layer, out)


def with_subject_maps(patch):
    """attn2 replace patch that first adds the cond rows' subject maps (StorySync masks), then runs ``patch``."""
    def wrapped(q, k, v, extra_options):
        state, layer = _storysync_rows(extra_options.get(TRANSFORMER_OPTION), extra_options, q.shape[0],
                                       SUBJECT_MAPS)
        if state is not None and state.wants_maps(layer, q.shape[0], q.shape[1]):
            rows = state.cond_rows()
            index = index_tensor(rows, q.device)
            state.add_maps(q.index_select(0, index), k.index_select(0, index), extra_options["n_heads"], rows)
        return patch(q, k, v, extra_options)
    return wrapped


def csa_replace(attention: Attention, foreign: Patch | None = None):
    """attn1 replace patch applying consistent self-attention (the run's ``ConsistencyState``)."""
    return _replace_patch("csa", CSA, _csa_groups, attention, foreign)


def ipca_replace(attention: Attention, foreign: Patch | None = None):
    """attn2 replace patch applying IPCA to the cond rows of the call (the run's ``IdentityAttentionState``)."""
    return _replace_patch("ipca", IPCA, _ipca_groups, attention, foreign)
