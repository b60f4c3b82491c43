"""Forge adapter: the same story generation through Forge's UNet patcher (hosts.md §6), no module hooks.

Host contract: Forge resets ``p.sd_model.forge_objects`` at the start of every ``sample()`` and then calls
``process_before_every_sampling`` (twice more with hires fix, once per reset): each call clones the *current* UNet
patcher, registers our patches and assigns the clone back, so repeated calls never stack and nothing needs removing.
Row roles come from ``extra_options['cond_or_uncond']`` (one entry per chunk of B rows, B = len(sigmas)).

Both methods use replace patches, which receive the projected q/k/v of the call's own rows:
- consistent self-attention (attn1): the peer tokens' keys/values are gathered from the projected k/v (projection is
  per token, so gather-then-project equals project-then-gather); the shared core runs on ``[k | v]`` token rows,
  so its sampling, character groups, schedule and bank work unchanged (the bank holds projected tokens here);
- IPCA (attn2): cond rows get their SOT + identity keys/values appended (``append_identity_tokens``), or the seeded
  dropout bias as an attention mask.
Attention itself is Forge's ``backend.attention.attention_function`` (the kernel chosen at start-up). The run state
travels in ``transformer_options[TRANSFORMER_OPTION]`` (``ForgeRunState``), which the patches read from
``extra_options``; without it (another patcher's clone, a stale patch) they attend plainly. Every patch entered with
the run state tells its ``Reach`` (``reach.py``), which the pipeline's guard checks after every UNet call. Forge Neo
takes the same patches; only the memory kept free for the shared attention is asked for another way
(``reserve_shared_attention_memory``, by capability).

Another extension's replace patch on the same block (SAG, StyleAlign, IP-Adapter, reference-only register them) is
wrapped, not overwritten (``set_replace_all``): on every call our method leaves alone it is called exactly as Forge
would call it; a call our method must change (shared keys, blended queries, identity tokens, a dropout mask) cannot
be handed to a patch that expects the whole batch with its own keys, so it is refused with a message naming that
patch, at the first such call (before any image).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..async_index import index_tensor
from ..identity_attention_hook import dropout_bias
from ..identity_cross_attention import append_identity_tokens
from ..reach import CSA, HARMONIZATION, IPCA, SHARING, SUBJECT_MAPS, Reach
from ..row_layout import Role, RowLayout, forge_row_layout

Attention = Callable[..., torch.Tensor]  # attention_function(q, k, v, heads, mask=None) on [R, T, heads·d]
TRANSFORMER_OPTION = "consistent_story"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ForgeRunState:
    """What the patches of one sampling call need: the CSA, IPCA and StorySync states, this batch's first frame, and
    the ``Reach`` each patch tells that it ran (the pipeline's guard checks it after every UNet call)."""
    csa: Any
    ipca: Any
    frame_offset: int
    storysync: Any = None
    reach: Reach | None = None

    def entered(self, surface: str, extra_options: dict) -> None:
        if self.reach is not None:
            self.reach.hit(surface, _layer(extra_options))

    def __deepcopy__(self, memo: dict) -> "ForgeRunState":
        return self  # a handle: every clone() deep-copies model_options, and all clones must share the live state


def is_forge(p) -> bool:
    """Capability check on the object in hand (hosts.md §6.5), not a version string."""
    return hasattr(p.sd_model, "forge_objects")


def _layout(extra_options: dict, rows: int, frame_offset: int) -> RowLayout:
    return forge_row_layout(extra_options.get("cond_or_uncond", ()), len(extra_options.get("sigmas", ())), rows,
                            frame_offset)


def _layer(extra_options: dict) -> tuple[str, int, int] | None:
    block = extra_options.get("block")
    return None if block is None else (block[0], int(block[1]), int(extra_options.get("block_index", 0)))


Patch = Callable[..., torch.Tensor]  # a replace patch: (q, k, v, extra_options) -> attention output


def _patch_name(patch: Patch) -> str:
    return f"{getattr(patch, '__module__', '?')}.{getattr(patch, '__qualname__', type(patch).__name__)}"


def _plain(attention: Attention, foreign: Patch | None) -> Patch:
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
    plain = _plain(attention, foreign)

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
    cond = [r for r, role in enumerate(layout.roles) if role is Role.COND]
    if not cond:
        return None
    index = index_tensor(cond, q.device)
    k_cond, v_cond = k.index_select(0, index), v.index_select(0, index)
    columns = state.columns(k_cond)  # Forge repeats a 77-token cond batched with a longer uncond: every copy
    if columns is None:
        return None
    if state.dropout == 0:
        return [(cond, append_identity_tokens(k_cond, columns), append_identity_tokens(v_cond, columns), None)]
    frames = [layout.frames[r] for r in cond]
    bias = dropout_bias(state, layer or ("?", 0, 0), frames, q.shape[1], k.shape[1], columns, q).unsqueeze(1)
    return [(cond, k_cond, v_cond, bias)]


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
    plain = _plain(attention, foreign)

    def patch(q, k, v, extra_options):
        heads = extra_options["n_heads"]
        state, layer = _storysync_rows(extra_options.get(TRANSFORMER_OPTION), extra_options, q.shape[0], SHARING)
        if state is None:
            return plain(q, k, v, extra_options)
        width = q.shape[-1]

        def attend(query_qkv, context_qkv):
            inner = _altered(attention, foreign, "StorySync", extra_options)
            source = query_qkv if context_qkv is None else context_qkv
            return inner(query_qkv[..., :width], source[..., width:2 * width], source[..., 2 * width:], heads)

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


def reserve_shared_attention_memory(unet, factor: float, latent_shape: Sequence[int] | None) -> str:
    """Ask the host to keep ``factor`` times the UNet's attention memory free while sampling (shared attention holds
    up to 1 + r·(B−1) times the keys/values of plain attention; README: Benchmark). Chosen by capability:
    - Forge: ``set_memory_peak_estimation_modifier`` (``backend/patcher/unet.py``), read by ``sampling_prepare`` in
      place of ``memory_required(shape)``;
    - Forge Neo has no modifier; ``sampling_prepare`` adds ``extra_preserved_memory_during_sampling`` (bytes) to
      ``memory_required([2B, C, H, W])``: the extra bytes for this sampling call's latent ``[B, C, H, W]``.
    Returns which way was taken; with neither (or Neo without the latent) the host's own estimate stands and a
    warning says so: the methods still run, only the memory margin is the host's."""
    if factor <= 1:
        return "none needed"
    if hasattr(unet, "set_memory_peak_estimation_modifier"):
        base = unet.model_options.get("memory_peak_estimation_modifier", unet.memory_required)
        unet.set_memory_peak_estimation_modifier(lambda shape: base(shape) * factor)
        return "modifier"
    if hasattr(unet, "add_extra_preserved_memory_during_sampling") and latent_shape is not None:
        shape = [2 * int(latent_shape[0])] + [int(n) for n in latent_shape[1:]]
        unet.add_extra_preserved_memory_during_sampling(int(unet.memory_required(shape) * (factor - 1)))
        return "preserved"
    log.warning("Consistent Story: this Forge has no way to reserve memory for the shared attention; sampling "
                "goes on with the host's own estimate")
    return "host estimate"


def patch_unet(p, generation, attention: Attention, latent_shape: Sequence[int] | None = None) -> None:
    """Clone the current UNet patcher, register the story's patches, assign it back (idempotent per call).
    ``latent_shape``: the latent this sampling call starts from (``process_before_every_sampling``'s ``x``)."""
    unet = p.sd_model.forge_objects.unet.clone()
    storysync = getattr(generation, "storysync", None)
    unet.set_transformer_option(TRANSFORMER_OPTION, ForgeRunState(generation.csa, generation.ipca,
                                                                  p.iteration * generation.plan.batch_size,
                                                                  storysync, getattr(generation, "reach", None)))
    if generation.csa is not None or storysync is not None:
        attn1 = storysync_replace if storysync is not None else csa_replace
        for name in set_replace_all(unet, "attn1", lambda foreign: attn1(attention, foreign)):
            log.info("self-attention patch %s kept under ours", name)
        rate = 1.0 if storysync is not None else generation.settings.csa_rate
        reserve_shared_attention_memory(unet, 1 + rate * (generation.plan.batch_size - 1), latent_shape)
    if storysync is not None:
        unet.set_model_attn1_output_patch(storysync_output_patch)
    def attn2(foreign: Patch | None) -> Patch:
        patch = ipca_replace(attention, foreign) if generation.ipca is not None else _plain(attention, foreign)
        return with_subject_maps(patch) if storysync is not None else patch  # the maps only read q and k

    if generation.ipca is not None or storysync is not None:
        for name in set_replace_all(unet, "attn2", attn2):
            log.info("cross-attention patch %s kept under ours", name)
    p.sd_model.forge_objects.unet = unet


def oneactor_post_cfg(pending_for: Callable[[], Any], calc_batch: Callable, compile_conditions: Callable):
    """``sampler_post_cfg_function`` adding OneActor's η2 term (Eq. 19) to the combined x0 prediction.

    Host contract (``backend/sampling/sampling_function.py``): called after CFG with ``denoised``, the compiled
    ``cond`` list, ``uncond_denoised`` (None when CFG 1 dropped the uncond), ``input``, ``sigma``, ``model`` and
    ``model_options``. ``pending_for()`` takes this step's η2 inputs set by ``on_cfg_denoiser`` (None outside the
    window); the η2 rows run through ``calc_cond_uncond_batch`` like the host's own cond rows, with the cond's
    ControlNet and concat image."""
    def post_cfg(args):
        pending = pending_for()
        denoised, uncond = args["denoised"], args.get("uncond_denoised")
        if pending is None or uncond is None:
            return denoised
        context, vector = pending["context"], pending["vector"]
        average = compile_conditions({"crossattn": context, "vector": vector} if vector is not None else context)
        source = args["cond"][0] if args.get("cond") else {}
        for entry in average:
            if "control" in source:
                entry["control"] = source["control"]
            if "c_concat" in source.get("model_conds", {}):
                entry["model_conds"]["c_concat"] = source["model_conds"]["c_concat"]
        predicted, _ = calc_batch(args["model"], average, None, args["input"], args["sigma"], args["model_options"])
        return denoised - pending["batch"].eta2 * (predicted - uncond)
    return post_cfg


def patch_oneactor(p, pending_for: Callable[[], Any]) -> None:
    """Clone the current UNet patcher and add the η2 post-CFG function (from ``process_before_every_sampling``)."""
    from backend.sampling.condition import compile_conditions
    from backend.sampling.sampling_function import calc_cond_uncond_batch

    unet = p.sd_model.forge_objects.unet.clone()
    unet.set_model_sampler_post_cfg_function(oneactor_post_cfg(pending_for, calc_cond_uncond_batch,
                                                               compile_conditions))
    p.sd_model.forge_objects.unet = unet
