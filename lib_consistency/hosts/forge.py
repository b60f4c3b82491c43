"""Forge adapter: the same story generation through Forge's UNet patcher (hosts.md §6), no module hooks.

Host contract: Forge resets ``p.sd_model.forge_objects`` at the start of every ``sample()`` and then calls
``process_before_every_sampling`` (twice more with hires fix, once per reset): each call clones the *current* UNet
patcher, registers our patches and assigns the clone back, so repeated calls never stack and nothing needs removing.
The patches themselves (what each method does to an attention call) are the surface ``surfaces/forge_patches.py``;
attention is Forge's ``backend.attention.attention_function`` (the kernel chosen at start-up), passed in. Forge Neo
takes the same patches; only the memory kept free for the shared attention is asked for another way
(``reserve_shared_attention_memory``, by capability). OneActor's η2 rows ride in the model call that holds the cond
rows (a model function wrapper) and their term is subtracted by a post-CFG function (``patch_oneactor``). In BLI
lock-step (``lockstep.py``) another model function wrapper marks the twin rows and cuts them after the window.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch

from ..common.async_index import index_tensor
from ..common.row_layout import FORGE_OTHER_CHUNK, Role, twinned_layout, without_twins
from ..surfaces.forge_patches import (TRANSFORMER_OPTION, TWINS_OPTION, Attention, ForgeRunState, Patch, csa_replace,
                                      ipca_replace, plain_call, set_replace_all, storysync_output_patch,
                                      storysync_replace, with_subject_maps)
from .oneactor.eta2 import second_call_forced

log = logging.getLogger(__name__)
WRAPPER = "model_function_wrapper"
WRAPPED_OPTION = "consistent_story_wrapped_patches"  # other extensions' patches our story patches call inside ours
_PACKAGE = __name__.split(".hosts.")[0] + "."  # our patches' modules


def is_forge(p) -> bool:
    """Capability check on the object in hand (hosts.md §6.5), not a version string."""
    return hasattr(p.sd_model, "forge_objects")


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
                                                                  generation.plan.batch_frames(p.iteration),
                                                                  storysync, getattr(generation, "reach", None)))
    wrapped: list[str] = []
    if generation.csa is not None or storysync is not None:
        attn1 = storysync_replace if storysync is not None else csa_replace
        for name in set_replace_all(unet, "attn1", lambda foreign: attn1(attention, foreign)):
            log.info("self-attention patch %s kept under ours", name)
            wrapped.append(name)
        rate = 1.0 if storysync is not None else generation.settings.csa_rate
        reserve_shared_attention_memory(unet, 1 + rate * (generation.plan.batch_size - 1), latent_shape)
    if storysync is not None:
        unet.set_model_attn1_output_patch(storysync_output_patch)
    def attn2(foreign: Patch | None) -> Patch:
        patch = ipca_replace(attention, foreign) if generation.ipca is not None else plain_call(attention, foreign)
        return with_subject_maps(patch) if storysync is not None else patch  # the maps only read q and k

    if generation.ipca is not None or storysync is not None:
        for name in set_replace_all(unet, "attn2", attn2):
            log.info("cross-attention patch %s kept under ours", name)
            wrapped.append(name)
    unet.set_transformer_option(WRAPPED_OPTION, tuple(wrapped))  # read by OneActor's fold (foreign_row_readers)
    if getattr(generation, "lockstep", False):
        unet.model_options[WRAPPER] = lockstep_wrapper(storysync.in_bli_window, unet.model_options.get(WRAPPER))
    p.sd_model.forge_objects.unet = unet


def _cut_twins(args: dict) -> tuple[dict, tuple[int, ...]] | None:
    """The args of a lock-step model call without its twin rows, and for every row of the call the row of the cut
    call whose output it takes (``without_twins``); None where a part of the call cannot be cut row-wise."""
    chunks, x, c = list(args.get("cond_or_uncond", ())), args["input"], args["c"]
    rows = x.shape[0]
    if not chunks or rows % (2 * len(chunks)) or set(c) - FOLDABLE_KEYS or args["timestep"].shape[0] != rows:
        return None
    images = rows // len(chunks) // 2
    _, kept, expand = without_twins(twinned_layout([Role.COND] * len(chunks), range(images)))
    index = index_tensor(kept, x.device)
    cut = {}
    for key, value in c.items():
        if key == "transformer_options":
            continue
        if not isinstance(value, torch.Tensor) or value.shape[0] != rows:
            return None
        cut[key] = value.index_select(0, index.to(value.device))
    options = {k: v for k, v in c.get("transformer_options", {}).items() if k != TWINS_OPTION}
    sigmas = options.get("sigmas")
    if isinstance(sigmas, torch.Tensor) and sigmas.shape[0] == 2 * images:
        options["sigmas"] = sigmas[:images]
    if isinstance(options.get("cond_mark"), torch.Tensor) and options["cond_mark"].shape[0] == rows:
        options["cond_mark"] = options["cond_mark"].index_select(0, index.to(options["cond_mark"].device))
    if "cond_indices" in options:  # as the host's compute_cond_indices, for chunks of the story's rows
        options["cond_indices"] = [k * images + i for k, cx in enumerate(chunks) if cx == 0 for i in range(images)]
        options["uncond_indices"] = [k * images + i for k, cx in enumerate(chunks) if cx != 0 for i in range(images)]
    cut["transformer_options"] = options
    return {**args, "input": x.index_select(0, index), "timestep": args["timestep"].index_select(0, index),
            "c": cut}, expand


def lockstep_wrapper(in_window: Callable[[], bool], foreign: Callable | None):
    """``model_function_wrapper`` of a sampling call in BLI lock-step (``lockstep.py``). Host contract
    (``calc_cond_uncond_batch``): every model call is ``wrapper(model.apply_model, {"input": [n·2B, ...],
    "timestep": [n·2B], "c": {...}, "cond_or_uncond": n entries})``, each chunk the story's B rows then their B twins
    (the sampler's batch is 2B), and its output is chunked by ``cond_or_uncond``. Inside BLI's window the call's
    ``transformer_options`` get ``TWINS_OPTION`` (our patches lay the rows out with twins); after it the twin rows are
    cut from the call (``_cut_twins``: the plain layout again) and each gets its story row's output. A call that
    cannot be cut runs whole, twins marked. ``foreign``: the wrapper another extension had set, called inside ours."""
    def call(apply_model, args):
        if foreign is not None:
            return foreign(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    def wrapper(apply_model, args):
        cut = None if in_window() else _cut_twins(args)
        if cut is None:
            c = args["c"]
            options = {**c.get("transformer_options", {}), TWINS_OPTION: True}
            return call(apply_model, {**args, "c": {**c, "transformer_options": options}})
        story_args, expand = cut
        out = call(apply_model, story_args)
        return out.index_select(0, index_tensor(expand, out.device))
    wrapper.consistent_story_lockstep = True
    return wrapper


def oneactor_post_cfg(pending_for: Callable[[], Any], calc_batch: Callable, compile_conditions: Callable):
    """``sampler_post_cfg_function`` adding OneActor's η2 term (Eq. 19) to the combined x0 prediction.

    Host contract (``backend/sampling/sampling_function.py``): called after CFG with ``denoised``, the compiled
    ``cond`` list, ``uncond_denoised`` (None when CFG 1 dropped the uncond), ``input``, ``sigma``, ``model`` and
    ``model_options``. ``pending_for()`` takes this step's η2 rows set by ``on_cfg_denoiser`` (None outside the
    window). Their prediction is the one the fold wrapper took from the model call of the cond rows
    (``pending["prediction"]``); without it (the call could not take them) the η2 rows run through
    ``calc_cond_uncond_batch`` like the host's own cond rows, with the cond's ControlNet and concat image (the
    unfolded form)."""
    def post_cfg(args):
        pending = pending_for()
        denoised, uncond = args["denoised"], args.get("uncond_denoised")
        if pending is None or uncond is None:
            return denoised
        source = args["cond"][0] if args.get("cond") else {}
        predicted = pending.get("prediction")
        if predicted is None or predicted.shape != uncond.shape or _weighted(source):
            context, vector = pending["context"], pending["vector"]
            average = compile_conditions({"crossattn": context, "vector": vector} if vector is not None else context)
            for entry in average:
                if "control" in source:
                    entry["control"] = source["control"]
                if "c_concat" in source.get("model_conds", {}):
                    entry["model_conds"]["c_concat"] = source["model_conds"]["c_concat"]
            predicted, _ = calc_batch(args["model"], average, None, args["input"], args["sigma"],
                                      args["model_options"])
        return denoised - pending["batch"].eta2 * (predicted - uncond)
    return post_cfg


def _weighted(entry: dict) -> bool:
    """A cond entry ``calc_cond_uncond_batch`` weights per pixel (an area, a mask, or an AND weight other than 1:
    ``compile_weighted_conditions`` sets ``strength`` on every entry): its own sum is not the model's output."""
    return "area" in entry or "mask" in entry or float(entry.get("strength", 1.0)) != 1.0


FOLDABLE_KEYS = frozenset({"c_crossattn", "y", "c_concat", "transformer_options"})


def _patch_name(function) -> str:
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', type(function).__name__)}"


def foreign_row_readers(options: dict) -> list[str]:
    """Other extensions' attention and block patches in a call's ``transformer_options`` (those our story patches
    wrap included): they may read ``cond_or_uncond`` / ``cond_indices`` as the host's two roles only."""
    names = list(options.get(WRAPPED_OPTION, ()))
    for patches in options.get("patches_replace", {}).values():
        names += [_patch_name(f) for f in patches.values() if not getattr(f, "__module__", "").startswith(_PACKAGE)]
    for patches in options.get("patches", {}).values():
        names += [_patch_name(f) for f in patches if not getattr(f, "__module__", "").startswith(_PACKAGE)]
    return sorted(set(names))


def fold_eta2_call(args: dict, context: torch.Tensor) -> dict | None:
    """The ``model_function_wrapper`` args of one Forge model call with OneActor's η2 rows appended as one more
    chunk, or None where this call cannot take them (it holds no cond chunk, or something not extendable row-wise).

    args: ``{"input": [n·B, C, H, W], "timestep": [n·B], "c": {...}, "cond_or_uncond": n entries}``; context: the
    η2 rows' text context [B, T, D]. The chunk copies the cond chunk's x, timestep, ``y`` (SDXL: the cond's pooled
    vector, which the η2 rows share) and ``c_concat``; its ``c_crossattn`` is ``context``, repeated to the call's
    token length as the host's ``ConditionCrossAttn.concat`` does. ``cond_or_uncond`` gets ``FORGE_OTHER_CHUNK`` for
    it (our patches see rows of role OTHER), ``cond_mark`` 0 (cond prompts, for row-wise readers of it);
    ``cond_indices``/``uncond_indices`` stay the host's. Refused: a ``control`` (ControlNet's residuals are built for
    the host's rows), any other key, other extensions' patches (``foreign_row_readers``)."""
    chunks, x, timestep, c = list(args.get("cond_or_uncond", ())), args["input"], args["timestep"], args["c"]
    if chunks.count(0) != 1 or x.shape[0] % len(chunks) or set(c) - FOLDABLE_KEYS:
        return None
    rows = x.shape[0] // len(chunks)
    options = c.get("transformer_options", {})
    if context.shape[0] != rows or timestep.shape[0] != x.shape[0] or foreign_row_readers(options):
        return None
    at = slice(chunks.index(0) * rows, (chunks.index(0) + 1) * rows)
    folded = {}
    for key, value in c.items():
        if key == "transformer_options":
            continue
        if not isinstance(value, torch.Tensor) or value.shape[0] != x.shape[0]:
            return None
        if key == "c_crossattn":
            if value.shape[1] % context.shape[1]:
                return None
            extra = context.to(value).repeat(1, value.shape[1] // context.shape[1], 1)
        else:
            extra = value[at]
        folded[key] = torch.cat([value, extra])
    if "c_crossattn" not in folded:
        return None
    options = {**options, "cond_or_uncond": chunks + [FORGE_OTHER_CHUNK]}
    if isinstance(options.get("cond_mark"), torch.Tensor):
        options["cond_mark"] = torch.cat([options["cond_mark"], options["cond_mark"].new_zeros(rows)])
    folded["transformer_options"] = options
    return {**args, "input": torch.cat([x, x[at]]), "timestep": torch.cat([timestep, timestep[at]]), "c": folded,
            "cond_or_uncond": chunks + [FORGE_OTHER_CHUNK]}


def oneactor_fold_wrapper(peek: Callable[[], Any], foreign: Callable | None):
    """``model_function_wrapper`` folding this step's η2 rows (``peek()``: the pending rows, not taken) into the
    model call that holds the cond chunk; their prediction goes to ``pending["prediction"]`` for the post-CFG
    function, the host gets its own rows' output. Host contract (``calc_cond_uncond_batch``): called for every
    model call as ``wrapper(model.apply_model, {"input", "timestep", "c", "cond_or_uncond"})`` and its output
    chunked by ``cond_or_uncond``. ``foreign``: the wrapper another extension had set, called inside ours."""
    def call(apply_model, args):
        if foreign is not None:
            return foreign(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    def wrapper(apply_model, args):
        pending = peek()
        folded = None
        if pending is not None and "prediction" not in pending and not second_call_forced():
            folded = fold_eta2_call(args, pending["context"])
        if folded is None:
            return call(apply_model, args)
        out = call(apply_model, folded)
        rows = args["input"].shape[0]
        pending["prediction"] = out[rows:]
        return out[:rows]
    wrapper.consistent_story_oneactor = True
    return wrapper


def patch_oneactor(p, pending_for: Callable[[], Any], peek: Callable[[], Any] | None = None,
                   latent_shape: Sequence[int] | None = None) -> None:
    """Clone the current UNet patcher, add the η2 post-CFG function and (with ``peek``) the fold wrapper around any
    wrapper already set, assign it back (from ``process_before_every_sampling``). The fold makes the call of the
    cond rows 1.5 times as large: that memory is asked for like the shared attention's."""
    from backend.sampling.condition import compile_conditions
    from backend.sampling.sampling_function import calc_cond_uncond_batch

    unet = p.sd_model.forge_objects.unet.clone()
    unet.set_model_sampler_post_cfg_function(oneactor_post_cfg(pending_for, calc_cond_uncond_batch,
                                                               compile_conditions))
    if peek is not None:
        unet.model_options[WRAPPER] = oneactor_fold_wrapper(peek, unet.model_options.get(WRAPPER))
        reserve_shared_attention_memory(unet, 1.5, latent_shape)
    p.sd_model.forge_objects.unet = unet
