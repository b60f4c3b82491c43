"""Flux in Forge and Forge Neo: the DiT surface (``surfaces/flux_blocks``) around every model call, and OneActor's
refusal (the one method Flux does not support).

Host contract (``backend/sampling/sampling_function.py``, Forge ``dfdcbab6`` and Neo alike): every model call of
sampling goes through ``model_options["model_function_wrapper"](apply_model, {"input", "timestep", "c",
"cond_or_uncond"})`` when set; ``c["transformer_options"]`` holds ``cond_or_uncond`` (one entry per chunk of B rows)
and ``sigmas`` (B entries), ``input`` is the latent [rows, 16, H, W]; Flux packs it into 2x2 patches, so the image
tokens lie on a ceil(H/2) x ceil(W/2) grid. CFG 1 (Flux dev's usual setting) sends cond rows only. The wrapper is
registered on a clone of the UNet patcher (clone-patch-assign, hosts.md §6), keeps any wrapper another extension set
(called inside ours), and installs the surface for that one call, removing it in ``finally``.
"""
from __future__ import annotations

from typing import Any

from ..common.row_layout import forge_row_layout
from ..one_prompt_one_story.token_plan import T5_DEV_CONTEXT, T5_SCHNELL_CONTEXT, TextContext
from ..surfaces.dit_attention import DitRunState
from ..surfaces.flux_blocks import FluxSurface, flux_depth, is_flux_model
from .guard import unet_module

WRAPPER = "model_function_wrapper"

ONEACTOR_ON_FLUX = ("OneActor: characters need a UNet: a character's projector reads the UNet's middle block "
                    "(OneActor §3.2), which Flux, a diffusion transformer, does not have; use an SD1.x or SDXL "
                    "checkpoint for OneActor characters")


def flux_model(p) -> Any | None:
    """The loaded Flux transformer (``forge_objects.unet.model.diffusion_model``), or None for anything else."""
    if getattr(getattr(p, "sd_model", None), "forge_objects", None) is None:
        return None  # A1111 runs no Flux
    model = unet_module(p.sd_model)
    return model if model is not None and is_flux_model(model) else None


def flux_text_context(model) -> TextContext:
    """T5's budget for ``model``: dev has a guidance embedding (512 tokens in training), schnell has none (256)."""
    return T5_DEV_CONTEXT if getattr(model, "guidance_embed", True) else T5_SCHNELL_CONTEXT


def patch_flux(p, generation) -> None:
    """Clone the UNet patcher, set the wrapper that brings the story's methods into every model call, assign it
    back (from ``process_before_every_sampling``: again for hires fix and the BLI pre-pass)."""
    unet = p.sd_model.forge_objects.unet.clone()
    model = unet.model.diffusion_model
    run = DitRunState(generation.csa, generation.storysync, generation.reach, generation.ipca)
    frames = generation.plan.batch_frames(p.iteration)  # this batch's frames (by network set: not always in a row)
    foreign = unet.model_options.get(WRAPPER)

    def wrapper(apply_model, args):
        x, c = args["input"], args["c"]
        options = c.get("transformer_options", {})
        layout = forge_row_layout(args.get("cond_or_uncond", ()), len(options.get("sigmas", ())), x.shape[0],
                                  frames)
        run.set_rows(layout, (-(-x.shape[-2] // 2), -(-x.shape[-1] // 2)))
        surface = FluxSurface(model, run)
        surface.install()
        try:
            if foreign is not None:
                return foreign(apply_model, args)
            return apply_model(x, args["timestep"], **c)
        finally:
            surface.remove()
    wrapper.consistent_story_flux = True
    unet.model_options[WRAPPER] = wrapper
    p.sd_model.forge_objects.unet = unet


def depth_of(p):
    model = flux_model(p)
    return None if model is None else flux_depth(model)
