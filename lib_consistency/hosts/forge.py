"""Forge adapter: the same story generation through Forge's UNet patcher (hosts.md §6), no module hooks.

Host contract: Forge resets ``p.sd_model.forge_objects`` at the start of every ``sample()`` and then calls
``process_before_every_sampling`` (twice more with hires fix, once per reset): each call clones the *current* UNet
patcher, registers our patches and assigns the clone back, so repeated calls never stack and nothing needs removing.
The patches themselves (what each method does to an attention call) are the surface ``surfaces/forge_patches.py``;
attention is Forge's ``backend.attention.attention_function`` (the kernel chosen at start-up), passed in. Forge Neo
takes the same patches; only the memory kept free for the shared attention is asked for another way
(``reserve_shared_attention_memory``, by capability). OneActor's η2 term is a post-CFG function
(``patch_oneactor``).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

from ..surfaces.forge_patches import (TRANSFORMER_OPTION, Attention, ForgeRunState, Patch, csa_replace, ipca_replace,
                                      plain_call, set_replace_all, storysync_output_patch, storysync_replace,
                                      with_subject_maps)

log = logging.getLogger(__name__)


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
    if generation.csa is not None or storysync is not None:
        attn1 = storysync_replace if storysync is not None else csa_replace
        for name in set_replace_all(unet, "attn1", lambda foreign: attn1(attention, foreign)):
            log.info("self-attention patch %s kept under ours", name)
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
