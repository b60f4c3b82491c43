"""One story generation through the WebUI's script hooks (hosts.md §1-6, §15.4), for A1111 1.10 and Forge.

The two hosts differ only in how attention is reached: on A1111 instance-level hooks on the UNet's attention modules
(``a1111.py``: installed around ``p.sample``, removed in ``finally``); on Forge replace patches on a cloned UNet
patcher (``forge.py``, registered from ``process_before_every_sampling``), and for Flux a model wrapper on that
clone that brings the DiT surface into every model call (``flux.py``). Both are surfaces (``surfaces/``) over
the same method states built here.

Flow for one job (``p`` = the processing object; every per-generation fact lives in a ``StoryGeneration`` stored
on ``p``, never on the Script, which the txt2img tab, the img2img tab and the API share):

- ``before_process``: sweep hooks a crashed run left behind; build Settings (UI args, API dict, X/Y/Z overrides)
  and the story plan; refuse unsupported setups; turn the story into the batch (one image per frame, prompts,
  seeds, batch size/count). Script hooks' exceptions are swallowed by the host (hosts.md §1.3), so any error is
  kept and re-raised from the wrapped ``p.sample``, where it fails the request with its message.
- ``before_process_batch`` / ``process_batch`` / ``postprocess_batch_list``: a story whose frames name different
  extra networks is drawn in batches of one network set each, which are not the host's slices; each batch gets its
  frames' prompts, seeds and noise (``batches.py``).
- ``p.sample`` (wrapped, called once per batch; hires runs inside it): build this batch's 1P1S conditioning, install
  a UNet pre-hook (row cursor) and the attention hooks, sample, remove everything in ``finally``.
- ``on_cfg_denoiser`` (registered once at import): swap in the frames' conditioning, plan the rows of this step.
- ``postprocess``: images back in story order (batches drawn out of it), append the storyboard, close the run;
  ``p.close`` is wrapped too (runs even on errors).
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import torch

from modules import images, processing, sd_unet, shared

from ..common.addresses import StepKey
from ..common.row_layout import UNKNOWN_LAYOUT, A1111RowCursor, Role, a1111_step_plan, twinned_layout
from ..one_prompt_one_story.ipca import IdentityAttentionState
from ..settings import Settings
from ..story.run import FrameConditioning, StoryRunPlan, csa_settings, plan_story_run
from ..story_diffusion.reference_bank import ReferenceBank
from ..story_diffusion.state import BankMode, ConsistencyState
from ..story_sync.state import StorySyncState
from ..surfaces.flux_blocks import sweep_flux
from ..surfaces.reach import Reach
from . import a1111, batches, lockstep
from .coexist import (check_host_prompts, controlnet_batch_inputs, forge_controlnet_inputs, hypertile_refusal,
                      keep_dynamic_prompts_off, restore_controlnet_inputs, split_controlnet_mark, with_controlnet_mark)
from .conditioning import SDXL_POOLED_WIDTH, batch_conditioning
from .flux import depth_of, flux_model, patch_flux
from .forge import is_forge, patch_unet
from .guard import SamplingGuard, checked_sampling, unet_module, want_surfaces
from .prepass import run_vanilla_prepass, wants_prepass
from .storysync import mask_images, storysync_state
from .ui import STYLE_INFOTEXT_KEY
from .xyz import OVERRIDES_ATTR

RUN_ATTRIBUTE = "consistent_story_generation"
BLI_NOTE_INFOTEXT_KEY = "Story BLI note"  # why lock-step was asked for and a pre-pass ran (not a setting)
_AND = re.compile(r"\bAND\b")


class StoryGeneration:
    """Per-generation state of one story job (style.md: one explicit state object)."""

    def __init__(self, settings: Settings, plan: StoryRunPlan, error: Exception | None = None) -> None:
        self.settings, self.plan, self.error = settings, plan, error
        self.cursor = A1111RowCursor()
        self.conditioning: FrameConditioning | None = None  # this batch's (one per set of extra networks)
        self.conditionings: dict[tuple[str, ...], tuple[FrameConditioning, dict[str, torch.Tensor]]] = {}
        self.pooled: dict[str, torch.Tensor] = {}  # SDXL pooled vector per text, of this batch's conditioning
        self.checked = False
        self.controlnet_hints: dict = {}  # A1111 ControlNet units' own hints, while batches get their slices
        self.batch_contexts: torch.Tensor | None = None  # [B, 77, D] of the batch being sampled
        self.batch_pooled: torch.Tensor | None = None
        self.csa: ConsistencyState | None = None
        self.ipca: IdentityAttentionState | None = None
        self.storysync: StorySyncState | None = None
        self.hooks: list = []
        self.unet_hook_handle = None
        self.sampling = False
        self.lockstep = False  # this p.sample carries BLI's vanilla twins beside the story's rows (lockstep.py)
        self.twin_outputs: tuple[int, ...] | None = None  # A1111: this UNet call's rows cut to the story's (a1111.py)
        self.reach = Reach()  # the surfaces the settings ask for; every UNet call must enter them (guard.py)
        self.guard = SamplingGuard(self.reach)
        self.postprocess_error: Exception | None = None  # raised from p.close (the host swallows postprocess's)
        self.deferred: batches.DeferredSaving | None = None  # saving taken over: batches drawn out of story order


def settings_for(p, args: Sequence[Any]) -> Settings:
    settings = Settings.from_args(list(args))
    overrides = dict(getattr(p, OVERRIDES_ATTR, {}))
    if "preset" in overrides:
        settings = settings.with_preset(overrides.pop("preset"))
    for key, value in overrides.items():
        settings = settings.with_value(key, value)
    return settings


def refusal(p, settings: Settings) -> str | None:
    """Why this job cannot run with the story methods, or None (hosts.md §13, §15.4); needs the loaded model."""
    model = p.sd_model
    if flux_model(p) is None and not (getattr(model, "is_sdxl", False) or getattr(model, "is_sd1", False)):
        return "only SD1.x, SDXL and (in Forge) Flux checkpoints are supported"
    if getattr(sd_unet, "current_unet", None) is not None:
        return "a replaced UNet (SD UNet setting, e.g. TensorRT) bypasses the attention hooks"
    if getattr(p, "refiner_checkpoint_info", None) is not None:
        return "a refiner switches models mid-sampling; turn the refiner off"
    prompts = [p.prompt] if isinstance(p.prompt, str) else list(p.prompt)  # the frames' prompts by now
    if any(_AND.search(text) for text in prompts + [settings.story]):
        return "'AND' prompts (composable diffusion) are not supported"
    if settings.csa and not is_forge(p):
        return hypertile_refusal(p, a1111.ldm_unet(p), settings.csa_layers)
    return None


def before_process(p, args: Sequence[Any]) -> None:
    unet = unet_module(p.sd_model)
    if unet is not None:  # before the first load (Forge) there is none
        a1111.sweep_stale(unet)
        sweep_flux(unet)
    if getattr(p, "_ad_inner", False) or getattr(p, "txt2img_upscale", False) or hasattr(p, RUN_ATTRIBUTE):
        return  # nested or repeated run: the outer job owns the story
    try:
        settings = settings_for(p, args)
        if not settings.enabled:
            return
        style = p.prompt if isinstance(p.prompt, str) else p.prompt[0]
        plan = plan_story_run(settings, style, processing.get_fixed_seed(
            p.seed[0] if isinstance(p.seed, list) else p.seed))
        keep_dynamic_prompts_off(p, plan)
    except Exception as error:  # kept and raised from p.sample: the host would swallow it here
        _keep_error(p, error)
        return
    if plan.style != style:
        print(f"Consistent Story: the prompt is one of this story's frame prompts (an infotext replayed through the "
              f"API); using its style {plan.style!r}")
    generation = StoryGeneration(settings, plan)
    setattr(p, RUN_ATTRIBUTE, generation)
    p.prompt = list(plan.frame_prompts)
    if getattr(p, "enable_hr", False):
        p.hr_prompt = list(plan.frame_prompts)
    p.seed = list(plan.seeds)
    p.batch_size, p.n_iter = plan.batch_size, plan.batch_count
    generation.deferred = batches.defer_saving(p, plan)
    p.extra_generation_params.update(settings.to_infotext())
    p.extra_generation_params[STYLE_INFOTEXT_KEY] = plan.style
    _wrap_sampling(p, generation)


def process(p) -> None:
    """After ``setup_prompts``: the per-frame lists are in ``p.all_*``. The host's own prompt-comments script
    (``modules/processing_scripts``, which runs after extension scripts) expects ``p.hr_prompt`` to be text, so
    hand it the first frame's hires prompt; nothing else reads it once ``all_hr_prompts`` exists."""
    if getattr(p, RUN_ATTRIBUTE, None) is not None and isinstance(getattr(p, "hr_prompt", ""), list):
        p.hr_prompt = p.all_hr_prompts[0]


def _story_batches(p) -> StoryGeneration | None:
    generation = getattr(p, RUN_ATTRIBUTE, None)
    return generation if generation is not None and generation.error is None else None


def before_process_batch(p) -> None:
    """Per batch, before the host parses its networks: its frames' prompts, seeds and noise (``batches.py``)."""
    if (generation := _story_batches(p)) is not None:
        batches.before_process_batch(p, generation.plan)


def process_batch(p) -> None:
    """Per batch, before ``setup_conds``: its frames' hires prompts and networks (``batches.py``)."""
    if (generation := _story_batches(p)) is not None:
        batches.process_batch(p, generation.plan)


def postprocess_batch_list(p) -> None:
    """Per batch, before its infotexts and files: its frames' prompts again (``batches.py``)."""
    if (generation := _story_batches(p)) is not None:
        batches.postprocess_batch_list(p, generation.plan, generation.deferred)


def _message(error: Exception) -> str:
    return str(error) if str(error).startswith("Consistent Story") else f"Consistent Story: {error}"


def _keep_error(p, error: Exception) -> None:
    generation = StoryGeneration(None, None, error=RuntimeError(_message(error)))
    setattr(p, RUN_ATTRIBUTE, generation)
    _wrap_sampling(p, generation)


def _wrap_sampling(p, generation: StoryGeneration) -> None:
    original_sample, original_close = p.sample, p.close

    def sample(*args, **kwargs):
        if generation.error is None and (reason := refusal(p, generation.settings)):
            # Checked here, not in before_process: Forge loads the checkpoint only after before_process.
            generation.error = RuntimeError(f"Consistent Story: {reason}")
        if generation.error is not None:
            raise generation.error
        if not generation.checked:  # setup_prompts and every script's process have run by now
            generation.checked = True
            try:
                check_host_prompts(p, generation.plan, generation.settings.consolidate)
                if is_forge(p):
                    forge_controlnet_inputs(p, generation.plan)
            except ValueError as error:
                generation.error = RuntimeError(_message(error))
                raise generation.error from None
        try:
            try:
                if not is_forge(p):
                    controlnet_batch_inputs(p, generation.plan, generation.controlnet_hints)
                install(p, generation)  # inside the outer try: a half-done install is undone too
            except Exception as error:
                raise RuntimeError(_message(error)) from error
            with batches.batch_rows(p, generation.plan):
                if wants_prepass(p, generation.storysync):  # StorySync BLI: the vanilla trajectory...
                    if generation.settings.bli_lockstep:  # ...beside the story's rows (lockstep.py), or first
                        if (reason := lockstep.refusal(p, args, kwargs)) is None:
                            return lockstep.sample(p, generation, original_sample, kwargs)
                        print(f"Consistent Story: BLI runs a pre-pass instead of lock-step ({reason})")
                        p.extra_generation_params[BLI_NOTE_INFOTEXT_KEY] = f"pre-pass instead of lock-step: {reason}"
                    run_vanilla_prepass(p, generation.storysync, lambda: original_sample(*args, **kwargs),
                                        generation.ipca)
                return original_sample(*args, **kwargs)
        finally:
            uninstall(p, generation)

    def close():
        try:
            if generation.deferred is not None:  # a failed job: postprocess never gave p its flags back
                p.do_not_save_samples = generation.deferred.do_not_save_samples
                p.do_not_save_grid = generation.deferred.do_not_save_grid
            uninstall(p, generation)
            restore_controlnet_inputs(generation.controlnet_hints)
            for state in (generation.csa, generation.storysync):
                if state is not None:
                    state.close()
        finally:
            original_close()
        if generation.postprocess_error is not None:  # the frames are made; the storyboard or masks are not
            error, generation.postprocess_error = generation.postprocess_error, None
            raise error

    p.sample, p.close = checked_sampling(p, sample), close  # errors kept from swallowing hooks: raised (guard.py)


def install(p, generation: StoryGeneration) -> None:
    """Build this batch's conditioning and method states, then reach the model: on A1111 the attention hooks and the
    row cursor (``a1111.py``); on Forge the patches come from ``process_before_every_sampling``. Called at the start
    of every ``p.sample``."""
    settings, plan = generation.settings, generation.plan
    frames = list(plan.batch_frames(p.iteration))
    if settings.consolidate:
        generation.conditioning = batch_conditioning(p, generation)
        generation.batch_contexts = torch.stack(generation.conditioning.contexts(frames))
        if generation.pooled:
            token_plan = generation.conditioning.token_plan
            generation.batch_pooled = torch.stack([generation.pooled[token_plan.frames[f].text] for f in frames])
    if settings.ipca and settings.consolidate:
        generation.ipca = IdentityAttentionState(generation.conditioning.identity_positions(),
                                                 settings.ipca_dropout, plan.seeds[0])
    if settings.masked_sharing:
        if generation.storysync is None:
            generation.storysync = storysync_state(p, generation.settings, generation.plan, depth_of(p))
        state = generation.storysync
        state.bank_mode = BankMode(plan.bank_role(p.iteration, state.reference_frames or ()))
    elif settings.csa:
        if generation.csa is None:
            generation.csa = ConsistencyState(csa_settings(settings), plan.seeds[0], plan.frame_groups(),
                                              reference_frames=plan.reference_frames,
                                              bank=ReferenceBank(offload_to_cpu=settings.bank_on_cpu),
                                              depth=depth_of(p))
        if plan.reference_frames:
            generation.csa.bank_mode = BankMode(plan.bank_role(p.iteration))
    if not is_forge(p):
        a1111.install_hooks(p, generation)
    unet = unet_module(p.sd_model)
    want_surfaces(generation.reach, settings, unet)
    generation.guard.install(unet)  # every UNet call of this p.sample (hires and the BLI pre-pass too)
    generation.sampling = True


def process_before_every_sampling(p, latent=None) -> None:
    """Forge only: register the patches on a fresh clone of the UNet patcher (called again with hires fix and for
    the BLI pre-pass). ``latent``: the host's ``x`` for this sampling call (Neo's memory reservation reads its
    shape). The host swallows errors here: the script runs this under ``guard.kept``."""
    generation = getattr(p, RUN_ATTRIBUTE, None)
    if generation is None or not generation.sampling or not is_forge(p):
        return
    if flux_model(p) is not None:
        patch_flux(p, generation)
        return
    from backend.attention import attention_function
    patch_unet(p, generation, attention_function, None if latent is None else tuple(latent.shape))


def uninstall(p, generation: StoryGeneration) -> None:
    """Remove everything ``install`` added (symmetric; safe to call twice)."""
    generation.sampling = False
    generation.guard.remove()
    for hook in reversed(generation.hooks):
        hook.remove()
    generation.hooks = []
    if generation.unet_hook_handle is not None:
        generation.unet_hook_handle.remove()
        generation.unet_hook_handle = None


def on_cfg_denoiser(params) -> None:
    """Per denoiser call: swap in the frames' conditioning and plan the UNet rows (hosts.md §2.2, §4.3)."""
    p = getattr(params.denoiser, "p", None)
    generation = getattr(p, RUN_ATTRIBUTE, None)
    if generation is None or not generation.sampling:
        return
    frames = generation.plan.batch_frames(p.iteration)
    copies = 2 if generation.lockstep else 1  # BLI lock-step: the story's images, then their vanilla twins
    cond = params.text_cond
    rows = (cond["crossattn"] if isinstance(cond, dict) else cond).shape[0]
    if rows != copies * len(frames):
        generation.cursor.start_step(UNKNOWN_LAYOUT)  # unexpected rows (AND, another extension): pass through
        return
    if generation.lockstep:  # the live preview the last step stored: the story's frames, not their twins too
        latent = getattr(shared.state, "current_latent", None)
        if isinstance(latent, torch.Tensor) and latent.shape[0] == rows:
            shared.state.current_latent = latent[:len(frames)]
    if generation.batch_contexts is not None:
        contexts = generation.batch_contexts.repeat(copies, 1, 1)
        if isinstance(cond, dict):  # SDXL DictWithShape: change keys in place, keep the instance
            reference = cond["crossattn"]
            mark, _ = split_controlnet_mark(reference)  # ControlNet's cond/uncond token stays first
            cond["crossattn"] = with_controlnet_mark(mark, contexts.to(reference.device, reference.dtype))
            if generation.batch_pooled is not None:
                vector = cond["vector"]
                pooled = generation.batch_pooled.to(vector.device, vector.dtype).repeat(copies, 1)
                cond["vector"] = torch.cat([pooled, vector[:, SDXL_POOLED_WIDTH:]], dim=1)
        else:
            mark, _ = split_controlnet_mark(cond)
            params.text_cond = with_controlnet_mark(mark, contexts.to(cond.device, cond.dtype))
    generation.cursor.start_step(twinned_layout((Role.COND, Role.UNCOND), frames) if generation.lockstep
                                 else a1111_step_plan([1] * len(frames), frames))
    if _uncond_skipped(params):
        generation.cursor.drop_uncond()
    step = StepKey(1 if getattr(p, "is_hr_pass", False) else 0, params.sampling_step, float(params.sigma[0]))
    if generation.csa is not None:
        generation.csa.begin_step(step.pass_index, step.step_index, params.total_sampling_steps, step.sigma)
    if generation.storysync is not None:
        generation.storysync.begin_step(step.pass_index, step.step_index, params.total_sampling_steps, step.sigma)
    if generation.ipca is not None:
        generation.ipca.step = step


def _uncond_skipped(params) -> bool:
    """The host's own skip rules, evaluated after this callback (sd_samplers_cfg_denoiser.py)."""
    denoiser, opts = params.denoiser, shared.opts
    if opts.skip_early_cond != 0 and denoiser.step / denoiser.total_steps <= opts.skip_early_cond:
        return True
    s_min_uncond = getattr(denoiser.p, "s_min_uncond", 0)
    return bool((denoiser.step % 2 or opts.s_min_uncond_all) and s_min_uncond > 0
                and float(params.sigma[0]) < s_min_uncond)


def postprocess(p, processed) -> None:
    """Append the storyboard (after all frames) and end the run. The host swallows errors here, so one is kept and
    raised from ``p.close`` (the frames exist by now; the job still fails with the message)."""
    generation = getattr(p, RUN_ATTRIBUTE, None)
    if generation is None or generation.error is not None:
        return
    try:
        _postprocess(p, generation, processed)
    except Exception as error:
        generation.postprocess_error = RuntimeError(_message(RuntimeError(
            f"the storyboard or mask images failed ({type(error).__name__}: {error})")))
        raise


def _postprocess(p, generation: StoryGeneration, processed) -> None:
    uninstall(p, generation)
    deferred, generation.deferred = generation.deferred, None
    batches.restore_story_order(p, generation.plan, processed, deferred)
    if generation.csa is not None:
        generation.csa.close()
    masks = mask_images(generation.storysync, generation.plan, processed) if generation.settings.show_masks else []
    if generation.storysync is not None:
        generation.storysync.close()
    if generation.settings.storyboard and processed.images:
        from .storyboard import compose_storyboard
        frames = processed.images[processed.index_of_first_image:][:generation.plan.frame_count]
        captions = [frame.caption for frame in generation.plan.story.frames][:len(frames)]
        board = compose_storyboard(frames, captions)
        info = processed.infotexts[processed.index_of_first_image] if processed.infotexts else ""
        processed.images.append(board)
        processed.infotexts.append(info)
        if shared.opts.grid_save and not p.do_not_save_grid:
            images.save_image(board, p.outpath_grids, "storyboard", processed.seed, p.main_prompt,
                              shared.opts.grid_format, info=info, grid=True, p=p)
    for image, info in masks:  # StorySync "show masks": after the frames (and the storyboard)
        processed.images.append(image)
        processed.infotexts.append(info)
