"""OneActor characters in generation, A1111 1.10 and Forge (methods.md §6.4-6.5; hosts.md §2.2, §4).

A character is an extra network: ``<oneactor:NAME>`` or ``<oneactor:NAME:v>`` in any prompt. Host contract:
``extra_networks.activate`` calls ``OneActorNetwork.activate`` once per batch, before the conds are built (and again
for the hires networks inside ``sample_hr_pass``), even when no prompt names a character (``params_list`` empty);
exceptions there are swallowed by the host, so an error is kept and raised from ``p.sample``, before any image.
Each image's characters are read from its own prompt (``p.all_prompts`` / ``p.all_hr_prompts``: the host's parsed
``extra_network_data`` merges the whole batch).

Per denoiser call (``on_cfg_denoiser``, after the story pipeline's own swap): inside the window the cond rows get
``v·Δ_tar`` on their base-word rows (with 1Prompt1Story consolidation, the rows of the base word in each frame's
consolidated prompt). With η2 > 0 one η2 row ``c + Δ_avg`` per image is evaluated in the host's own UNet call,
beside the cond and uncond rows (3 rows per image in one call, as the paper counts it), and its prediction is
subtracted after CFG (``guidance.cluster_guidance``; in the x0 space the samplers combine in, an equivalent affine
form):
- A1111: the rows are inserted between the cond and the uncond rows here (``eta2.py``, which lists the host paths),
  read back from ``x_out`` in ``on_cfg_denoised`` and added in ``on_cfg_after_cfg``; a story's row plan gets them as
  OTHER rows. Where folding could change or misread a row (edit models, ControlNet's marks, padding of a short cond)
  they run in a second ``inner_model`` call from ``on_cfg_denoised`` instead, the form before the fold.
- Forge and Forge Neo: a model function wrapper on a clone of the UNet patcher appends them to the call that holds
  the cond chunk and a ``sampler_post_cfg_function`` subtracts them (``hosts/forge.py``); where that call carries
  what cannot be extended row-wise (ControlNet, another extension's attention patches) the post-CFG function runs
  them through the model once more instead.
A step whose uncond is skipped (CFG 1, NGMS, skip-early-CFG) has no η2 term.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from modules import shared

from ...oneactor.character_file import (ARCH_WIDTHS as ARCH_WIDTH, CharacterFileError, checkpoint_warning, file_hash,
                                        load_character)
from ...oneactor.inference import CharacterUse, OneActorBatch, OneActorPromptError, base_word_positions
from ...settings import Settings, SettingsError, infotext_key
from ..coexist import split_controlnet_mark, with_controlnet_mark
from ..flux import ONEACTOR_ON_FLUX, flux_model
from ..guard import CHECKED_ATTRIBUTE, checked_sampling, unet_module
from ..tokenizers import clip_engine, token_items
from . import RUN_ATTRIBUTE, eta2

log = logging.getLogger(__name__)
ATTRIBUTE = RUN_ATTRIBUTE
NETWORK = "oneactor"
HASHES_INFOTEXT_KEY = "OneActor hashes"
WARNING_INFOTEXT_KEY = "OneActor warning"
ONEACTOR_KEYS = ("oneactor_preset", "oneactor_v", "oneactor_eta2", "oneactor_window", "oneactor_cfg")
_current: "OneActorRun | None" = None  # the run whose step is being denoised (the hosts serialise generations)


@dataclass
class OneActorRun:
    """Per-generation OneActor state, stored on ``p``: the settings and each pass's batch plan."""

    settings: Settings | None
    settings_error: Exception | None = None
    iteration: int | None = None
    first: OneActorBatch | None = None
    hires: OneActorBatch | None = None
    error: Exception | None = None
    pending: dict[str, Any] | None = None      # this step's η2 rows (on_cfg_denoiser -> denoised / post-cfg)
    correction: torch.Tensor | None = None     # A1111: added to the combined result in on_cfg_after_cfg
    hashes: dict[str, str] = field(default_factory=dict)
    warnings: dict[str, str] = field(default_factory=dict)
    rowed: dict[tuple, OneActorBatch] = field(default_factory=dict)  # consolidated rows per (batch, iteration)


def remember_settings(p, settings: Settings | None, error: Exception | None) -> None:
    """From the script's ``before_process`` (every job, story on or off): the OneActor options in force."""
    setattr(p, ATTRIBUTE, OneActorRun(settings, error))


def _run(p) -> OneActorRun:
    run = getattr(p, ATTRIBUTE, None)
    if run is None:  # a job without our script (another script's inner run): the options' defaults
        run = OneActorRun(Settings())
        setattr(p, ATTRIBUTE, run)
    return run


def architecture(model) -> str | None:
    """"sd15" or "sdxl" (the model flags both hosts set), None for anything else."""
    return "sdxl" if getattr(model, "is_sdxl", False) else "sd15" if getattr(model, "is_sd1", False) else None


def context_width(model) -> int:
    """The width of the UNet's text context (cross-attention key input): what a character's Δ must match. Shrunken
    test checkpoints differ from their architecture's 768 / 2048."""
    for name, module in unet_module(model).named_modules():
        if name.endswith("attn2.to_k"):
            return int(module.in_features)
    return ARCH_WIDTH[architecture(model)]


def checkpoint_identity(model) -> tuple[str, str]:
    """(short sha256 hash, name) of the loaded checkpoint, as the WebUI shows them; empty when unknown."""
    info = getattr(model, "sd_checkpoint_info", None)
    shorthash = getattr(info, "shorthash", None)
    if not shorthash and hasattr(info, "calculate_shorthash"):
        shorthash = info.calculate_shorthash()
    return str(shorthash or getattr(model, "sd_model_hash", "") or ""), str(getattr(info, "name", "") or "")


def _image_uses(p, prompt: str, image: int, settings: Settings, cache: dict) -> tuple[CharacterUse, ...]:
    from modules import extra_networks, prompt_parser

    text, networks = extra_networks.parse_prompt(prompt)
    tags = networks.get(NETWORK, [])
    if not tags:
        return ()
    where = f"image {image + 1}"
    if len(prompt_parser.get_learned_conditioning_prompt_schedules([text], max(int(p.steps), 1))[0]) > 1:
        raise OneActorPromptError(f"OneActor: the prompt of {where} uses prompt editing ([a:b:when]); a character "
                                  "needs one prompt for all steps")
    arch = architecture(p.sd_model)
    if arch is None:
        if flux_model(p) is not None:
            raise OneActorPromptError(ONEACTOR_ON_FLUX)
        raise OneActorPromptError("OneActor: characters work with SD1.x and SDXL checkpoints only")
    engine = clip_engine(p.sd_model)
    chunks = [list(chunk.tokens) for chunk in engine.tokenize_line(text)[0]]
    uses = []
    for tag in tags:
        items = list(tag.items)
        if not 1 <= len(items) <= 2 or not items[0].strip():
            raise OneActorPromptError(f"OneActor: {where}: '<oneactor:{':'.join(items)}>' must be "
                                      "<oneactor:NAME> or <oneactor:NAME:v>")
        name = items[0].strip()
        v = settings.oneactor_v
        if len(items) == 2:
            try:
                v = float(items[1])
            except ValueError:
                raise OneActorPromptError(f"OneActor: {where}: strength {items[1]!r} of character '{name}' is not "
                                          "a number") from None
        if name not in cache:
            from .folder import character_path
            path = character_path(name)  # raises naming the character and the folder
            cache[name] = load_character(path, arch=arch, width=context_width(p.sd_model))
            _run(p).hashes[name] = file_hash(path)
            warning = checkpoint_warning(cache[name], checkpoint_identity(p.sd_model)[0])
            if warning:  # another checkpoint of the same architecture: works, said in the infotext
                _run(p).warnings[name] = warning
        character = cache[name]
        word = [item[0] for item in token_items(engine)(character.base_word)]
        rows = base_word_positions(chunks, word)
        if not rows:
            raise OneActorPromptError(f"OneActor: character '{name}' acts on the word '{character.base_word}', "
                                      f"which the prompt of {where} does not contain; add it to the prompt")
        uses.append(CharacterUse(name, character.delta_tar, character.delta_avg, v, rows, tuple(word)))
    return tuple(uses)


def _batch(p, prompts: list[str], settings: Settings, cache: dict) -> OneActorBatch | None:
    images = tuple(_image_uses(p, prompt, i, settings, cache) for i, prompt in enumerate(prompts))
    batch = OneActorBatch(images, settings.oneactor_eta2, settings.oneactor_window)
    return batch if batch.any else None


def _batch_frames(p) -> Sequence[int]:
    """Indices in ``p.all_prompts`` of the batch being drawn: a story's planned batch (not always the host's slice
    when its frames name different extra networks, ``hosts/batches.py``), else the host's slice."""
    from ..pipeline import RUN_ATTRIBUTE
    story = getattr(p, RUN_ATTRIBUTE, None)
    plan = getattr(story, "plan", None)
    if plan is not None and p.iteration < plan.batch_count:
        return plan.batch_frames(p.iteration)
    size = p.batch_size
    return range(p.iteration * size, min((p.iteration + 1) * size, len(p.all_prompts)))


def activate(p) -> None:
    """``ExtraNetwork.activate``: plan this batch's characters for the first pass and hires (once per batch)."""
    if not getattr(p, "all_prompts", None) or getattr(p, "iteration", None) is None:
        return  # not a generation (the hosts also activate networks on a bare processing object)
    run = _run(p)
    if run.iteration == p.iteration or run.error is not None:
        return  # the hires call of the same batch, or an error already kept
    run.iteration, run.first, run.hires = p.iteration, None, None
    frames = _batch_frames(p)
    first = [p.all_prompts[f] for f in frames]
    all_hires = list(getattr(p, "all_hr_prompts", None) or [])
    hires = [all_hires[f] for f in frames if f < len(all_hires)]
    if not any(f"<{NETWORK}:" in text for text in first + hires):
        return
    if not getattr(p, CHECKED_ATTRIBUTE, False):  # errors our swallowed callbacks keep fail the job (guard.py)
        p.sample = checked_sampling(p, p.sample)
    try:
        if run.settings is None:
            raise run.settings_error or SettingsError("oneactor", "settings unavailable")
        cache: dict = {}
        run.first = _batch(p, first, run.settings, cache)
        run.hires = _batch(p, hires, run.settings, cache) if getattr(p, "enable_hr", False) and hires else None
        if run.settings.oneactor_cfg > 0:
            p.cfg_scale = run.settings.oneactor_cfg  # eta1 acts as the CFG scale (Eq. 19)
        _record_infotext(p, run)
    except (OneActorPromptError, CharacterFileError, SettingsError, ValueError, OSError, RuntimeError) as error:
        run.error = RuntimeError(str(error) if str(error).startswith(("OneActor", "Consistent Story"))
                                 else f"OneActor: {error}")
        _refuse_sampling(p, run.error)


def _record_infotext(p, run: OneActorRun) -> None:
    p.extra_generation_params[HASHES_INFOTEXT_KEY] = ", ".join(f"{n}: {h}" for n, h in run.hashes.items())
    if run.warnings:
        p.extra_generation_params[WARNING_INFOTEXT_KEY] = " ".join(run.warnings.values())
    values = run.settings.to_infotext()
    for key in ONEACTOR_KEYS:
        p.extra_generation_params[infotext_key(key)] = values[infotext_key(key)]


def _refuse_sampling(p, error: Exception) -> None:
    def sample(*args, **kwargs):
        raise error
    p.sample = sample


def deactivate(p) -> None:
    global _current
    run = getattr(p, ATTRIBUTE, None)
    if run is not None:
        run.pending = run.correction = None
    if _current is run:
        _current = None


def on_cfg_denoiser(params) -> None:
    """Inside the window: ``v·Δ_tar`` on the cond rows; with η2 > 0 the η2 rows for this step: on A1111 folded into
    the host's own call (``eta2.py``) or kept for the second call, on Forge kept for the model function wrapper."""
    p = getattr(params.denoiser, "p", None)
    run = getattr(p, ATTRIBUTE, None)
    if run is None:
        return
    global _current
    _check_eta2_ran(run, params)
    run.pending = run.correction = None
    _current = run
    batch = _consolidated(p, run, run.hires if getattr(p, "is_hr_pass", False) else run.first)
    if batch is None or not batch.active(int(params.sampling_step), int(params.total_sampling_steps)):
        return
    cond = params.text_cond
    mark, context = split_controlnet_mark(cond["crossattn"] if isinstance(cond, dict) else cond)
    if context.shape[0] != len(batch.images):
        log.warning("OneActor: %d cond rows for %d images ('AND' prompt?); characters not applied this step",
                    context.shape[0], len(batch.images))
        return
    with torch.no_grad():
        target = with_controlnet_mark(mark, batch.target_context(context))
        if batch.needs_average and params.text_uncond is not None and not _uncond_skipped(params):
            rows = len(batch.images)
            average = batch.average_context(context)
            run.pending = dict(batch=batch, rows=rows, denoiser=params.denoiser, step=int(params.sampling_step),
                               context=average, vector=cond.get("vector") if isinstance(cond, dict) else None)
            if not hasattr(p.sd_model, "forge_objects"):  # A1111 (Forge: the wrapper of hosts/forge.py)
                refusal = eta2.fold_refusal(params, cond, mark, rows, shared.opts)
                run.pending["folded"] = refusal is None
                if refusal is None:
                    eta2.fold_rows(params, cond, target, average, rows)
                    _story_rows_after_cond(p)
                    return
                log.debug("OneActor: eta2 rows in a second UNet call this step: %s", refusal)
                run.pending.update(x=params.x[:rows], sigma=params.sigma[:rows],
                                   image_cond=params.image_cond[:rows] if params.image_cond is not None else None)
    if isinstance(cond, dict):  # SDXL DictWithShape: change the key in place, keep the instance
        cond["crossattn"] = target
    else:
        params.text_cond = target


def _story_rows_after_cond(p) -> None:
    """A story's row plan of this step gets the folded η2 rows as OTHER rows of their frames (its callback ran
    first), so that its attention hooks still know every row of the call."""
    from ..pipeline import RUN_ATTRIBUTE
    story = getattr(p, RUN_ATTRIBUTE, None)
    if story is not None and getattr(story, "sampling", False):
        story.cursor.insert_after_cond(tuple(story.plan.batch_frames(p.iteration)))


def _check_eta2_ran(run: OneActorRun, params) -> None:
    """The previous step's η2 inputs must have been taken (A1111 ``on_cfg_denoised``, Forge the post-CFG function)
    by the next step of the same sampling; otherwise the η2 term is missing from the model that samples. (A pre-pass
    stopped mid-step, or a new pass starting at step 0, leaves them untaken without a gap.)"""
    pending = run.pending
    if pending is not None and pending.get("denoiser") is params.denoiser \
            and int(params.sampling_step) == pending.get("step", -2) + 1:
        run.pending = None
        raise RuntimeError(f"OneActor: the cluster guidance (eta2) of step {pending['step'] + 1} did not run: its "
                           "post-CFG function is missing from the model that samples (another extension replaced "
                           "it, or this WebUI version calls it differently). Stopped so that no image claims it")


def _consolidated(p, run: OneActorRun, batch: OneActorBatch | None) -> OneActorBatch | None:
    """With 1Prompt1Story consolidation the story pipeline has just put each frame's consolidated context into the
    cond rows: the characters' rows are found again in those prompts (once per batch and pass; the token plan
    exists from the first ``p.sample`` of the job, after this batch's ``activate``)."""
    from ..pipeline import RUN_ATTRIBUTE
    story = getattr(p, RUN_ATTRIBUTE, None)
    conditioning = getattr(story, "conditioning", None)
    if batch is None or conditioning is None or getattr(story, "batch_contexts", None) is None:
        return batch
    key = (id(batch), p.iteration)
    if key not in run.rowed:
        engine = clip_engine(p.sd_model)
        texts = [conditioning.token_plan.frames[f].text for f in story.plan.batch_frames(p.iteration)]
        run.rowed[key] = batch.rows_in([[list(c.tokens) for c in engine.tokenize_line(t)[0]] for t in texts])
    return run.rowed[key]


def _uncond_skipped(params) -> bool:
    from ..pipeline import _uncond_skipped as skipped
    return skipped(params)


def on_cfg_denoised(params) -> None:
    """A1111: the η2 rows' prediction (from the host's ``x_out`` when folded, else one more ``inner_model`` call)
    turned into ``−η2·(ε_avg − ε(∅))`` (x0 space), added after CFG."""
    run = _current
    if run is None or run.pending is None or "folded" not in run.pending:
        return
    pending, run.pending = run.pending, None
    rows = pending["rows"]
    if pending["folded"]:
        average = eta2.folded_prediction(params.x, rows)
    elif params.x.shape[0] != 2 * rows:
        return  # an edit model's third block or AND rows: no η2 term
    else:
        average = _second_call(params, pending)
    uncond = params.x[-rows:]
    correction = -pending["batch"].eta2 * (average - uncond)
    denoiser = pending["denoiser"]
    if getattr(denoiser, "mask", None) is not None and getattr(denoiser, "nmask", None) is not None:
        correction = correction * denoiser.nmask  # inpainting: the kept area stays the original's
    run.correction = correction


def _second_call(params, pending: dict) -> torch.Tensor:
    """The η2 rows through ``inner_model`` once more, after the host's own calls (the unfolded form)."""
    context = pending["context"]
    cond = {"crossattn": context, "vector": pending["vector"]} if pending["vector"] is not None else context
    image_cond = pending["image_cond"]
    if isinstance(cond, dict):
        condition = {**cond, "c_concat": [image_cond]}
    else:
        condition = {"c_crossattn": [cond], "c_concat": [image_cond]}
    with torch.no_grad():
        return params.inner_model(pending["x"], pending["sigma"], cond=condition)


def on_cfg_after_cfg(params) -> None:
    """A1111: add the η2 correction to the combined prediction of this step."""
    run = _current
    if run is not None and run.correction is not None:
        params.x = params.x + run.correction.to(params.x.dtype)
        run.correction = None


def process_before_every_sampling(p, latent=None) -> None:
    """Forge: the η2 fold wrapper and post-CFG function on a fresh clone of the UNet patcher (again for each hires
    reset). ``latent``: the host's ``x`` for this sampling call (the fold's memory reservation reads its shape)."""
    run = getattr(p, ATTRIBUTE, None)
    if run is None or run.error is not None:
        return
    batches = [b for b in (run.first, run.hires) if b is not None]
    if any(b.needs_average for b in batches) and hasattr(p.sd_model, "forge_objects"):
        from ..forge import patch_oneactor

        def take():  # the η2 rows of this step, taken once (_check_eta2_ran knows they were used)
            pending, run.pending = run.pending, None
            return pending
        patch_oneactor(p, take, lambda: run.pending, None if latent is None else tuple(latent.shape))
