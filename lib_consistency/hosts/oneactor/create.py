"""Create a OneActor character inside the WebUI (methods.md §6.2-6.5): base images with the host's own sampler,
their cond mid-block inputs at the last step, tuning against the loaded UNet, one small character file.

Host contract: the caller holds the WebUI's queue lock and has begun ``shared.state`` (the Characters tab through
``call_queue.wrap_gradio_gpu_call``, the API under ``call_queue.queue_lock``). Generation is an ordinary txt2img job
(``processing.process_images``, batch 1 × (N + 1), LoRA tags in the prompt active as usual) with, for its duration,
two forward pre-hooks: on the UNet (A1111: the row cursor of hosts.md §4.3) and on its ``middle_block``, whose
input of the cond rows at the last step is kept (Forge: rows from ``transformer_options['cond_or_uncond']``). The
sampled latents are kept from ``p.sample``. Tuning calls the UNet module directly in ldm's ε form
(``diffusion_model(x_t, t, context, y)``), the text encoder through ``get_learned_conditioning``; for its duration
every UNet parameter is frozen and every UNet block runs under gradient checkpointing. ``finally`` removes every
hook and wrapper and restores ``requires_grad``; the torch RNG is forked, so the WebUI computes as it did before. An
interrupt (``shared.state.interrupted``) or an error writes no file.
"""
from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ...common.row_layout import UNKNOWN_LAYOUT, A1111RowCursor, Role, a1111_step_plan, forge_row_layout
from ...oneactor.character_file import Character, save_character
from ...oneactor.inference import base_word_positions
from ...oneactor.projector import PROJECTOR_SPECS, build_projector, fit_to_grid
from ...oneactor.request import CreateRequest
from ...oneactor.tuning import TuningConfig, TuningInterrupted, TuningSample, tune
from ..tokenizers import clip_engine, token_items
from .generation import ARCH_WIDTH, architecture, checkpoint_identity, context_width, unet_module
from .folder import character_path_for

CAPTURE_ATTRIBUTE = "consistent_story_oneactor_capture"
DEFAULT_SAMPLER = "DPM++ 2M"  # the code samples with DPM-Solver++ multistep (methods.md §6.4)


class CreateError(RuntimeError):
    """The character cannot be made; the message says why (field, file or state)."""


@dataclass
class Capture:
    """Per creation job: the rows of the current UNet call, what was kept."""

    forge: bool
    batch: int = 1
    cursor: A1111RowCursor = field(default_factory=A1111RowCursor)
    layout: Any = UNKNOWN_LAYOUT
    features: dict[int, torch.Tensor] = field(default_factory=dict)
    latents: list[torch.Tensor] = field(default_factory=list)


def on_cfg_denoiser(params) -> None:
    """Per denoiser call of a creation job, A1111: plan the rows of this step (cond first, hosts.md §4.1)."""
    p = getattr(params.denoiser, "p", None)
    capture = getattr(p, CAPTURE_ATTRIBUTE, None)
    if capture is not None and not capture.forge:
        from ..pipeline import _uncond_skipped
        capture.cursor.start_step(a1111_step_plan([1] * capture.batch, p.iteration * capture.batch))
        if _uncond_skipped(params):
            capture.cursor.drop_uncond()


def _capture_hooks(p, unet: torch.nn.Module, capture: Capture) -> list:
    def call_rows(module, args, kwargs):
        x = args[0] if args else kwargs.get("x")
        capture.layout = capture.cursor.next_call(x.shape[0])

    def middle_input(module, args, kwargs):
        h = args[0]
        if capture.forge:
            options = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})
            layout = forge_row_layout(options.get("cond_or_uncond", ()), len(options.get("sigmas", ())),
                                      h.shape[0], p.iteration * capture.batch)
        else:
            layout = capture.layout
        if layout.matches(h.shape[0]):  # every call overwrites: what stays is the last call's, at the last step
            for row, (frame, role) in enumerate(zip(layout.frames, layout.roles)):
                if role is Role.COND:
                    capture.features[frame] = h[row].detach()  # a fresh activation: kept, not copied

    handles = [unet.middle_block.register_forward_pre_hook(middle_input, with_kwargs=True)]
    if not capture.forge:
        handles.append(unet.register_forward_pre_hook(call_rows, with_kwargs=True))
    return handles


def _generate(request: CreateRequest, model, arch: str, seed: int, capture: Capture):
    """Target + N auxiliaries as one txt2img job; returns the target image. Fills capture.features/latents."""
    from modules import processing

    width, height = request.size(arch)
    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=model, prompt=request.prompt, negative_prompt=request.negative_prompt, seed=seed,
        subseed=-1, subseed_strength=0.0, steps=request.steps, cfg_scale=request.cfg_scale, width=width,
        height=height, batch_size=1, n_iter=request.auxiliaries + 1,
        sampler_name=request.sampler_name or DEFAULT_SAMPLER, do_not_save_samples=True, do_not_save_grid=True)
    setattr(p, CAPTURE_ATTRIBUTE, capture)
    original_sample = p.sample

    def sample(*args, **kwargs):
        latents = original_sample(*args, **kwargs)
        capture.latents.append(latents.detach().float().cpu())
        return latents
    p.sample = sample
    handles = _capture_hooks(p, unet_module(model), capture)
    try:
        with contextlib.closing(p):
            processed = processing.process_images(p)
    finally:
        for handle in handles:
            handle.remove()
        delattr(p, CAPTURE_ATTRIBUTE)
    return processed.images[0] if processed.images else None


@contextlib.contextmanager
def _trainable_through(unet: torch.nn.Module):
    """Gradients reach the prompt embedding through the frozen UNet: every parameter frozen, every block of the
    UNet run under gradient checkpointing; both undone on exit (instance ``forward`` wrappers removed).

    Forge loads weights as inference tensors, which autograd may not save for backward. Each is replaced, one at a
    time, by a normal tensor with the same values (``requires_grad`` off) and stays replaced: the UNet computes
    exactly as before, and the weights are never held twice (an SDXL UNet would not fit twice on a 12-16 GB card)."""
    for module in unet.modules():
        for kind in ("_parameters", "_buffers"):
            table = getattr(module, kind)
            for name in [n for n, t in table.items() if t is not None and t.is_inference()]:
                copy = table[name].detach().clone()
                table[name] = torch.nn.Parameter(copy, requires_grad=False) if kind == "_parameters" else copy
    frozen = [(parameter, parameter.requires_grad) for parameter in unet.parameters()]
    blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
    previous = [block.__dict__.get("forward") for block in blocks]
    try:
        for parameter, _ in frozen:
            parameter.requires_grad_(False)
        for block in blocks:
            block.forward = _checkpointed(block.forward)
        yield
    finally:
        for block, before in zip(blocks, previous):
            if before is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = before
        for parameter, requires_grad in frozen:
            parameter.requires_grad_(requires_grad)


def _checkpointed(forward: Callable) -> Callable:
    def run(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def _encoder(model, request: CreateRequest, arch: str, engine) -> Callable[[str], tuple]:
    """prompt -> (context (T, D), pooled vector or None, base-word rows), encoded once per template."""
    from modules import devices, prompt_parser

    width, height = request.size(arch)
    word = [item[0] for item in token_items(engine)(request.base_word.strip())]
    cache: dict[str, tuple] = {}

    def encode(prompt: str) -> tuple:
        if prompt not in cache:
            with devices.autocast(), torch.no_grad():
                encoded = model.get_learned_conditioning(
                    prompt_parser.SdConditioning([prompt], width=width, height=height))
            context = (encoded["crossattn"] if isinstance(encoded, dict) else encoded)[0].clone()
            vector = encoded["vector"][0].clone() if isinstance(encoded, dict) else None
            rows = base_word_positions([list(c.tokens) for c in engine.tokenize_line(prompt)[0]], word)
            if not rows:
                raise CreateError(f"OneActor: the tuning prompt {prompt!r} has no token of the base word")
            cache[prompt] = (context, vector, rows)
        return cache[prompt]
    return encode


def _denoiser(unet: torch.nn.Module, encode: Callable) -> Callable:
    """The frozen UNet in the form ``tuning.tune`` takes: ε for (x_t, t, prompts, per-row Δ on the base word)."""
    parameter = next(unet.parameters())

    def denoise(x_t, timesteps, prompts, deltas):
        encoded = [encode(prompt) for prompt in prompts]
        context = torch.stack([c for c, _, _ in encoded]).to(parameter.device, parameter.dtype)
        image = torch.tensor([b for b, (_, _, rows) in enumerate(encoded) for _ in rows], device=context.device)
        token = torch.tensor([r for _, _, rows in encoded for r in rows], device=context.device)
        context = context.index_put((image, token), deltas[image].to(context.dtype), accumulate=True)
        kwargs = {}
        if encoded[0][1] is not None:  # SDXL: pooled text + size embeddings
            kwargs["y"] = torch.stack([v for _, v, _ in encoded]).to(parameter.device, parameter.dtype)
        return unet(x_t.to(parameter.device, parameter.dtype), timesteps=timesteps.to(parameter.device),
                    context=context, **kwargs)
    return denoise


def _alphas_cumprod(model) -> torch.Tensor:
    forge = getattr(model, "forge_objects", None)
    values = forge.unet.model.predictor.alphas_cumprod if forge is not None else model.alphas_cumprod
    return values.detach().float()


def _state(job: str, **values) -> None:
    from modules import shared
    shared.state.job = job
    for key, value in values.items():
        setattr(shared.state, key, value)


def create_character(request: CreateRequest, model=None) -> dict[str, Any]:
    """Make and save one character with the loaded checkpoint; returns a summary. CreateError on any refusal."""
    from modules import extra_networks, processing, sd_models, shared

    if model is None:
        if hasattr(sd_models, "forge_model_reload"):  # Forge loads the selected checkpoint on demand
            sd_models.forge_model_reload()
        model = shared.sd_model
    arch = architecture(model)
    if arch is None:
        raise CreateError("OneActor: characters can be made with SD1.x and SDXL checkpoints only")
    if context_width(model) != ARCH_WIDTH[arch]:
        raise CreateError(f"OneActor: this checkpoint's text width is {context_width(model)}, not the standard "
                          f"{arch.upper()} {ARCH_WIDTH[arch]}; characters need a standard-size checkpoint")
    path = character_path_for(request.name)
    if path.exists() and not request.overwrite:
        raise CreateError(f"OneActor: character '{request.name}' exists ({path}); choose another name or set "
                          "'overwrite'")
    engine = clip_engine(model)
    prompt_text, _ = extra_networks.parse_prompt(request.prompt)
    word = [item[0] for item in token_items(engine)(request.base_word.strip())]
    if not base_word_positions([list(c.tokens) for c in engine.tokenize_line(prompt_text)[0]], word):
        raise CreateError(f"OneActor character request, field 'base_word': '{request.base_word}' is not a word of "
                          f"the prompt as the checkpoint's tokenizer reads it")
    seed = int(processing.get_fixed_seed(request.seed))
    started = time.perf_counter()
    shared.state.job_count = request.auxiliaries + 2  # N + 1 images, then the tuning
    capture = Capture(forge=hasattr(model, "forge_objects"))
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        target_image = _generate(request, model, arch, seed, capture)
        if shared.state.interrupted:
            raise CreateError("OneActor: interrupted while generating the base images; no character was saved")
        count = request.auxiliaries + 1
        if len(capture.latents) != count or sorted(capture.features) != list(range(count)):
            raise CreateError(f"OneActor: captured {len(capture.features)} of {count} mid-block inputs and "
                              f"{len(capture.latents)} latents; another extension changed the sampling?")
        result, config = _tune(request, model, arch, capture, seed)
    character = Character(request.name, result.delta_tar.cpu(), result.delta_avg.cpu(), request.base_word.strip(),
                          arch, ARCH_WIDTH[arch], *checkpoint_identity(model), request.prompt,
                          request.negative_prompt, seed, _recorded(request, config, result),
                          _png(target_image))
    save_character(path, character)
    return {"name": request.name, "file": str(path), "base_word": character.base_word, "arch": arch,
            "seed": seed, "final_loss": result.losses[-1], "seconds": round(time.perf_counter() - started, 1)}


def _tune(request: CreateRequest, model, arch: str, capture: Capture, seed: int):
    from modules import shared

    unet = unet_module(model)
    forge = getattr(model, "forge_objects", None)
    if forge is not None:
        from backend import memory_management
        memory_management.load_model_gpu(forge.unet)
    spec = PROJECTOR_SPECS[arch]
    channels = capture.features[0].shape[0]
    if channels != spec.channels:
        raise CreateError(f"OneActor: this checkpoint's UNet is not the standard {arch.upper()} size (mid-block "
                          f"{channels} channels; the projector takes {spec.channels})")
    device = next(unet.parameters()).device
    samples = [TuningSample(capture.latents[i][0],
                            fit_to_grid(capture.features[i][None].float().cpu(), spec.grid)[0])
               for i in range(len(capture.latents))]
    config = TuningConfig(steps=request.tuning_steps, micro_batch=1)
    projector = build_projector(spec, config.seed).to(device)
    encode = _encoder(model, request, arch, clip_engine(model))
    _state("OneActor tuning", job_no=request.auxiliaries + 1, sampling_step=0, sampling_steps=config.steps)

    def progress(step: int, total: int, loss: float) -> None:
        _state("OneActor tuning", sampling_step=step, textinfo=f"OneActor tuning {step}/{total}, loss {loss:.4f}")

    try:
        with _trainable_through(unet), torch.enable_grad():
            result = tune(projector, samples[0], samples[1:], _denoiser(unet, encode), _alphas_cumprod(model),
                          request.base_word.strip(), config, human=request.human, progress=progress,
                          should_stop=lambda: bool(shared.state.interrupted))
    except TuningInterrupted:
        raise CreateError("OneActor: tuning interrupted; no character was saved") from None
    finally:
        del projector
    return result, config


def _recorded(request: CreateRequest, config: TuningConfig, result) -> dict[str, Any]:
    values = {k: v for k, v in request.to_dict().items() if k not in ("name", "prompt", "negative_prompt", "seed",
                                                                      "base_word", "overwrite")}
    values.update(lr=config.lr, weight_decay=config.weight_decay, aux_per_step=config.aux_per_step,
                  lambda_aux=config.lambda_aux, lambda_avg=config.lambda_avg, hflip_p=config.hflip_p,
                  tuning_seed=config.seed, final_loss=float(result.losses[-1]),
                  sampler_name=request.sampler_name or DEFAULT_SAMPLER)
    return values


def _png(image) -> bytes | None:
    if image is None:
        return None
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
