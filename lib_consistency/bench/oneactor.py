"""``python -m lib_consistency.bench --only oneactor``: time and peak memory of OneActor tuning (methods.md §6.5).

Builds a randomly initialised diffusers ``UNet2DConditionModel`` with the real SD1.5 or SDXL configuration (written
out below from the public ``unet/config.json`` of runwayml/stable-diffusion-v1-5 and
stabilityai/stable-diffusion-xl-base-1.0), frozen, weights in ``dtype``, gradient checkpointing on, and runs
``tuning.tune`` on 1 target + 10 auxiliaries with random latents and features: each step is 5 denoiser rows
(target, K = 3 auxiliaries, average) in micro-batches, the full projector of ``PROJECTOR_SPECS`` (fp32, AdamW).
Timing: the first ``warmup`` steps are run but not timed; a step's time is the gap between consecutive ``progress``
calls (CUDA synchronised there); the figure is the median, and 200 steps (the code's length, §6.3) are extrapolated.
Memory: CUDA ``max_memory_allocated`` over the tuning run (it includes the resident UNet weights, also printed);
CPU: the process's peak resident set size (``resource.getrusage``, Linux KiB) after the run, and how much that peak
grew during the run — a lower bound on the run's own need, since an earlier, higher peak hides it.

With a half ``dtype`` the denoiser also runs under autocast in it; the CLI uses bf16 on CUDA (fp16 gradients through
a frozen fp16 UNet overflow more easily) and fp32 on CPU. Measured on 2 shared CPU cores, fp32, real SD1.5 (64×64),
one step without warm-up: 142 s, peak RSS 8.9 GiB (grew 5.1 GiB), so 200 steps ≈ 7.9 h: CPU tuning is impractical.

Inference (``run_inference_bench``): one CFG step is one UNet call of 2B rows; with η2 > 0 B more cond rows (the
``c + Δ_avg`` row, Eq. 19) run inside the window: folded into the CFG call (3B rows, what the WebUIs do,
``hosts/oneactor/eta2.py``, ``hosts/forge.py``) or, where folding is refused, in a second call of B rows. Measured:
the median time of a 2B-, a 3B- and a B-row call, the offset of Δ on the base-word rows, and the whole-generation
ratios ``1 + w·(t(3B) − t(2B))/t(2B)`` (folded) and ``1 + w·t(B)/t(2B)`` (second call) for the window fraction w
(2/3 by default).

diffusers is a bench-only dependency (``lib_consistency/bench/requirements.txt``): it is imported inside the bench
functions, never at module level, so the host-free core keeps importing torch only.
"""
from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..oneactor.projector import PROJECTOR_SPECS, ProjectorSpec, build_projector
from ..oneactor.tuning import TuningConfig, TuningSample, tune

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0)
UNET_CONFIGS = {"sd15": SD15_UNET, "sdxl": SDXL_UNET}
LATENT_SIDES = {"sd15": 64, "sdxl": 128}  # 512² and 1024²
AUXILIARIES = 10  # methods.md §6.2
TOKENS, BASE_TOKEN = 77, 2  # CLIP context length; "<bos> a <word> ...": the base word's position
TIME_IDS = 6  # SDXL micro-conditioning: original size, crop top-left, target size
FULL_STEPS = TuningConfig().steps  # the code's 200 steps, extrapolated to


@dataclass
class TuningBench:
    """seconds_per_step: median over the timed steps. peak_bytes: see the module docstring; resident_bytes: CUDA
    memory allocated before the run (UNet, projector, samples), on CPU the process's peak RSS before the run."""

    arch: str
    device: str
    dtype: torch.dtype
    latent_side: int
    micro_batch: int
    timed_steps: int
    seconds_per_step: float
    peak_bytes: int
    resident_bytes: int
    memory_note: str

    def estimate_seconds(self, steps: int = FULL_STEPS) -> float:
        return self.seconds_per_step * steps


def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise SystemExit("the OneActor bench needs diffusers: python3 -m pip install -r "
                         "lib_consistency/bench/requirements.txt") from None
    return diffusers


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def random_unet(arch: str, device: torch.device, dtype: torch.dtype, latent_side: int | None = None,
                unet_config: dict | None = None) -> tuple[torch.nn.Module, dict, int]:
    """A randomly initialised diffusers UNet of ``arch`` (or ``unet_config``), frozen in ``dtype`` on ``device``,
    with its configuration and the latent side to bench at."""
    config = dict(UNET_CONFIGS[arch] if unet_config is None else unet_config)
    torch.manual_seed(0)
    with torch.device(device):
        unet = _diffusers().UNet2DConditionModel(**config)
    return unet.to(dtype).eval().requires_grad_(False), config, latent_side or LATENT_SIDES[arch]


def added_conditioning(config: dict, rows: int, size: float, generator: torch.Generator, device: torch.device,
                       dtype: torch.dtype) -> dict | None:
    """SDXL's ``added_cond_kwargs`` for ``rows`` rows (random pooled text embeddings, a ``size``² image without
    crop); None for a UNet without them (SD1.5)."""
    if config.get("addition_embed_type") != "text_time":
        return None
    pooled = config["projection_class_embeddings_input_dim"] - TIME_IDS * config["addition_time_embed_dim"]
    return {"text_embeds": torch.randn(rows, pooled, generator=generator).to(device, dtype),
            "time_ids": torch.tensor([[size, size, 0.0, 0.0, size, size]] * rows, device=device, dtype=dtype)}


def median_seconds(call: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of ``repeats`` calls after one warm-up call, synchronised on CUDA (host time included)."""
    samples = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - began)
    return statistics.median(samples[1:])


def _frozen_denoiser(unet: torch.nn.Module, config: dict, dtype: torch.dtype,
                     device: torch.device) -> Callable[..., torch.Tensor]:
    """denoise(x_t, t, prompts, deltas) with a fixed random context (77 tokens) and Δ added at BASE_TOKEN.
    The prompts are ignored: they do not change the cost."""
    generator = torch.Generator().manual_seed(1)
    context = torch.randn(1, TOKENS, config["cross_attention_dim"], generator=generator).to(device, dtype)
    base = torch.zeros(1, TOKENS, 1, device=device, dtype=dtype)
    base[0, BASE_TOKEN] = 1
    added = added_conditioning(config, 1, 1024.0, generator, device, dtype)

    def denoise(x_t: torch.Tensor, timesteps: torch.Tensor, prompts: list, deltas: torch.Tensor) -> torch.Tensor:
        rows = len(x_t)
        kwargs = {} if added is None else {"added_cond_kwargs": {k: v.expand(rows, -1) for k, v in added.items()}}
        hidden = context + base * deltas.to(dtype)[:, None, :]
        return unet(x_t.to(dtype), timesteps, encoder_hidden_states=hidden, **kwargs).sample.float()

    return denoise


def run_tuning_bench(arch: str, device: torch.device | str, dtype: torch.dtype, steps_to_time: int = 1,
                     latent_side: int | None = None, *, unet_config: dict | None = None,
                     projector_spec: ProjectorSpec | None = None, micro_batch: int = 5, warmup: int = 1,
                     print_fn: Callable[[str], None] = print) -> TuningBench:
    """Time ``warmup + steps_to_time`` tuning steps; ``unet_config`` / ``projector_spec`` replace the real ones
    (tests use tiny ones). Returns the figures and prints two lines."""
    if arch not in UNET_CONFIGS:
        raise ValueError(f"run_tuning_bench arch: expected one of {sorted(UNET_CONFIGS)}, got {arch!r}")
    if steps_to_time < 1 or warmup < 0:
        raise ValueError(f"run_tuning_bench: need steps_to_time >= 1 and warmup >= 0, got {steps_to_time}, {warmup}")
    device = torch.device(device)
    config = dict(UNET_CONFIGS[arch] if unet_config is None else unet_config)
    spec = projector_spec or PROJECTOR_SPECS[arch]
    if spec.width != config["cross_attention_dim"]:
        raise ValueError(f"run_tuning_bench projector_spec.width: must equal the UNet's cross_attention_dim "
                         f"{config['cross_attention_dim']}, got {spec.width}")
    unet, config, side = random_unet(arch, device, dtype, latent_side, unet_config)
    unet.enable_gradient_checkpointing()
    projector = build_projector(spec, seed=0).to(device)
    generator = torch.Generator().manual_seed(2)
    samples = [TuningSample(torch.randn(config["in_channels"], side, side, generator=generator),
                            torch.randn(spec.channels, spec.grid, spec.grid, generator=generator))
               for _ in range(1 + AUXILIARIES)]
    alphas = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2, 0)
    tuning = TuningConfig(steps=warmup + steps_to_time, micro_batch=micro_batch,
                          autocast_dtype=dtype if dtype in (torch.float16, torch.bfloat16) else None)
    on_cuda = device.type == "cuda"
    stamps = [time.perf_counter()]

    def progress(step: int, total: int, loss: float) -> None:
        if on_cuda:
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    if on_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
    else:
        resident = _peak_rss()
    stamps[0] = time.perf_counter()
    tune(projector, samples[0], samples[1:], _frozen_denoiser(unet, config, dtype, device), alphas.float(), "subject",
         tuning, progress=progress)
    if on_cuda:
        peak, note = torch.cuda.max_memory_allocated(device), "CUDA max_memory_allocated (incl. UNet weights)"
    else:
        peak = _peak_rss()
        note = f"peak RSS of the process; the peak grew {(peak - resident) / 2 ** 30:.2f} GiB during the run"
    durations = [after - before for before, after in zip(stamps, stamps[1:])][warmup:]
    result = TuningBench(arch, str(device), dtype, side, micro_batch, len(durations), statistics.median(durations),
                         peak, resident, note)
    print_fn(f"OneActor tuning step, {arch} UNet (random init, frozen, gradient checkpointing, "
             f"{str(dtype).removeprefix('torch.')}), latent {side}x{side}, 5 rows in micro-batches of {micro_batch}, "
             f"projector {sum(p.numel() for p in projector.parameters()) / 1e6:.1f} M params fp32, on {device}")
    print_fn(f"step {result.seconds_per_step:.2f} s (median of {len(durations)}, after {warmup} warm-up); "
             f"{FULL_STEPS} steps ≈ {result.estimate_seconds() / 60:.1f} min; "
             f"peak memory {peak / 2 ** 30:.2f} GiB ({note}); resident before the run {resident / 2 ** 30:.2f} GiB")
    return result


def run_inference_bench(arch: str, device: torch.device | str, dtype: torch.dtype, batch: int = 1,
                        latent_side: int | None = None, repeats: int = 3, window: float = 2 / 3, *,
                        unet_config: dict | None = None, print_fn: Callable[[str], None] = print) -> dict[str, float]:
    """Cost of OneActor at inference: returns and prints seconds of a 2B-row and a B-row UNet call, of the Δ
    offset, and the generation-time ratios for η2 = 0 and η2 > 0 over a ``window`` fraction of the steps."""
    from ..oneactor.inference import CharacterUse, OneActorBatch

    device = torch.device(device)
    unet, config, side = random_unet(arch, device, dtype, latent_side, unet_config)
    width = config["cross_attention_dim"]
    denoise = _frozen_denoiser(unet, config, dtype, device)
    use = CharacterUse("bench", torch.randn(width), torch.randn(width), 0.8, (BASE_TOKEN,))
    characters = OneActorBatch(tuple((use,) for _ in range(batch)), eta2=1.0, window=window)
    context = torch.randn(batch, TOKENS, width, device=device, dtype=dtype)

    def timed(call: Callable[[], object]) -> float:
        return median_seconds(call, device, repeats)

    def rows(n: int) -> Callable[[], object]:
        x = torch.randn(n, config["in_channels"], side, side, device=device)
        t = torch.full((n,), 500, device=device)
        zeros = torch.zeros(n, width, device=device)
        return lambda: denoise(x, t, [], zeros)

    with torch.no_grad():
        cfg_call, extra_call, folded_call = timed(rows(2 * batch)), timed(rows(batch)), timed(rows(3 * batch))
        offset = timed(lambda: characters.target_context(context))
    figures = {"cfg_call": cfg_call, "extra_call": extra_call, "folded_call": folded_call, "offset": offset,
               "eta2_zero": 1 + offset / cfg_call, "eta2_positive": 1 + window * (extra_call + offset) / cfg_call,
               "eta2_folded": 1 + window * (folded_call - cfg_call + offset) / cfg_call}
    print_fn(f"OneActor inference, {arch} UNet (random init, {str(dtype).removeprefix('torch.')}), latent "
             f"{side}x{side}, batch {batch}, on {device}: CFG call (2B rows) {cfg_call * 1e3:.1f} ms, "
             f"folded CFG call (3B rows) {folded_call * 1e3:.1f} ms, second η2 call (B rows) {extra_call * 1e3:.1f} ms, "
             f"Δ offset {offset * 1e3:.3f} ms")
    print_fn(f"generation time vs. no character: η2 = 0 ×{figures['eta2_zero']:.3f}; η2 > 0 over "
             f"{window:.2f} of the steps ×{figures['eta2_folded']:.3f} folded, ×{figures['eta2_positive']:.3f} with "
             "a second call (paper, A100 SDXL: ×1.33)")
    return figures
