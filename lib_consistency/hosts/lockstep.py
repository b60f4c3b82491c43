"""StorySync's BLI in lock-step through the WebUI's own sampler (A1111 1.10, Forge, Forge Neo): the vanilla trajectory
sampled beside the story instead of before it (methods.md §5.1 step 4, way (b); setting ``bli_lockstep``).

Host contract (``StableDiffusionProcessingTxt2Img.sample`` of the three hosts): ``x = p.rng.next()``,
then ``p.sampler.sample(p, x, conditioning, unconditional_conditioning, ...)`` returns the latents; every noise draw
of a sampler without Brownian noise comes from ``p.rng``; the CFG denoiser builds its rows from the conditioning
objects (``MulticondLearnedConditioning.batch``: one entry per image; the uncond: a list per image). So the story's
``p.sample`` runs with:
- ``p.rng`` rebuilt from the batch's seeds given twice: rows B..2B-1 start from the same noise as rows 0..B-1 and draw
  the same noise (one generator per seed), as the pre-pass's twin ``p.rng`` does;
- the conditioning given twice (the twins have the same prompts; with 1Prompt1Story the pipeline's swap in
  ``on_cfg_denoiser`` doubles the consolidated contexts);
- every UNet call laid out by ``twinned_layout``: inside the window BLI reads the twins' self-attention inputs in
  the same call; after it the twin rows are cut from the UNet calls (A1111: the UNet hooks in ``a1111.py``; Forge:
  the model function wrapper in ``forge.py``) and the sampler steps them with their story rows' output;
- the samples cut to the story's B rows before they go back to the host, or, with hires fix, before the hires
  pass (which samples the story's rows only; the host has decoded all 2B first-pass images by then when its
  upscaler is not a latent one).
Where any of this cannot hold, the pre-pass runs instead and the console says why (``refusal``). Memory: inside the
window every call holds twice the rows (README: Benchmark, "BLI lock-step").
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from modules import rng, sd_samplers

from .coexist import controlnet_in_use
from .flux import flux_model
from .oneactor import RUN_ATTRIBUTE as ONEACTOR_ATTRIBUTE

CONDITIONING_KEYS = ("conditioning", "unconditional_conditioning")


def refusal(p, args: tuple, kwargs: dict) -> str | None:
    """Why this batch's BLI cannot run in lock-step (the pre-pass runs instead), or None."""
    if not hasattr(p, "firstpass_image") or not callable(getattr(p, "sample_hr_pass", None)):
        return "lock-step runs on txt2img"
    if flux_model(p) is not None:
        return "lock-step is for SD1.x and SDXL"
    config = sd_samplers.find_sampler_config(getattr(p, "sampler_name", None))
    if config is not None and config.options.get("brownian_noise", False):
        return f"the {p.sampler_name} sampler draws Brownian noise from the batch's own seeds"
    if controlnet_in_use(p):
        return "ControlNet units build their inputs for the batch's own rows"
    if getattr(getattr(p, ONEACTOR_ATTRIBUTE, None), "first", None) is not None:
        return "OneActor characters add rows of their own"
    if args or not set(CONDITIONING_KEYS) <= set(kwargs):
        return "this WebUI calls p.sample without named conditioning"
    kinds = [type(kwargs[key]).__name__ for key in CONDITIONING_KEYS if not _doubles(kwargs[key])]
    if kinds:
        return f"lock-step cannot double conditioning of type {kinds[0]}"
    if getattr(p, "rng", None) is None:
        return "the batch has no noise generator"
    return None


def _multicond(conditioning: Any) -> bool:
    return isinstance(getattr(conditioning, "batch", None), list) and hasattr(conditioning, "shape")


def _doubles(conditioning: Any) -> bool:
    return _multicond(conditioning) or isinstance(conditioning, (list, torch.Tensor))


def doubled(conditioning: Any) -> Any:
    """The host's conditioning object for the story's images followed by the same again (their twins)."""
    if _multicond(conditioning):  # prompt_parser.MulticondLearnedConditioning
        return type(conditioning)(shape=(2 * len(conditioning.batch),), batch=conditioning.batch * 2)
    if isinstance(conditioning, list):  # the uncond: one schedule per image
        return conditioning * 2
    if isinstance(conditioning, torch.Tensor):
        return torch.cat([conditioning, conditioning])
    raise TypeError(f"Consistent Story: BLI lock-step cannot double conditioning of type {type(conditioning).__name__}")


def sample(p, generation, original_sample: Callable[..., torch.Tensor], kwargs: dict) -> torch.Tensor:
    """The host's ``p.sample`` for the story's B images and their B vanilla twins; returns the story's B samples
    (with hires fix: what the hires pass returns, which got the story's B first-pass samples,
    ``_story_rows_to_hires``)."""
    rows = len(generation.plan.batch_frames(p.iteration))
    host_rng = p.rng
    subseeds = None if host_rng.subseeds is None else list(host_rng.subseeds) * 2
    p.rng = twice = rng.ImageRNG(host_rng.shape, list(host_rng.seeds) * 2, subseeds=subseeds,
                                 subseed_strength=host_rng.subseed_strength,
                                 seed_resize_from_h=host_rng.seed_resize_from_h,
                                 seed_resize_from_w=host_rng.seed_resize_from_w)
    hires = bool(getattr(p, "enable_hr", False))
    own_hires_pass = p.__dict__.get("sample_hr_pass")  # another script's instance wrapper, if any
    if hires:
        p.sample_hr_pass = _story_rows_to_hires(generation, rows, p.sample_hr_pass)
    generation.lockstep = True
    try:
        samples = original_sample(**{**kwargs, **{key: doubled(kwargs[key]) for key in CONDITIONING_KEYS}})
    finally:
        generation.lockstep = False
        if p.rng is twice:  # (the hires pass made its own)
            p.rng = host_rng
        if hires:
            if own_hires_pass is None:
                del p.sample_hr_pass
            else:
                p.sample_hr_pass = own_hires_pass
    if hires:
        return samples  # what the hires pass made of the story's rows (A1111: their decoded images)
    if not isinstance(samples, torch.Tensor) or samples.shape[0] != 2 * rows:
        raise RuntimeError(f"Consistent Story: BLI lock-step expected {2 * rows} latents from the sampler, got "
                           f"{getattr(samples, 'shape', type(samples).__name__)}")
    return samples[:rows]


def _story_rows_to_hires(generation, rows: int, hires_pass: Callable[..., torch.Tensor]) -> Callable:
    """``p.sample_hr_pass`` taking the story's rows of the first pass's latents (and of their decoded images, which
    the host made for all 2B rows when its upscaler is not a latent one). Host contract (all three hosts):
    ``sample`` returns ``self.sample_hr_pass(samples, decoded_samples, seeds, subseeds, subseed_strength, prompts)``
    after the first pass, and the hires pass builds its own noise from the B seeds. From here on the sampling
    has the story's rows only."""
    def story_rows(value):
        return value[:rows] if isinstance(value, torch.Tensor) and value.shape[0] == 2 * rows else value

    def hires(samples, decoded_samples, *args, **kwargs):
        generation.lockstep = False
        return hires_pass(story_rows(samples), story_rows(decoded_samples), *args, **kwargs)
    return hires
