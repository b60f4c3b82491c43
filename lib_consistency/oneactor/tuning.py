"""OneActor tuning: train φ through a frozen denoiser (methods.md §6.2–6.3; paper Eqs. 10–14, App. H.1).

Each step builds K + 2 rows: the target, K = min(aux_per_step, #aux) auxiliaries drawn without replacement, and the
"average" row conditioned on Δ_avg = the mean of the K auxiliary Δ's (Eq. 12). Every row is a clean latent noised at
a uniform random timestep; the frozen denoiser predicts ε with its prompt's base-word token shifted by the row's Δ
(Eq. 8), and the loss is ``L = mse_tar + λ1·mean_i mse_aux_i + λ2·mse_avg`` (Eq. 14). Only φ trains (AdamW).
After training, in eval mode: Δ_tar = φ(h_tar) and Δ_avg = the mean of φ over ALL auxiliaries (§6.4, Eqs. 16–17).

Following the code (§6.3, §6.7 item 3): the average row is a copy of the target row — same latent, flip, noise and
prompt — at its own timestep. Our choices:
- Latents, not images, are flipped (the code flips the image before VAE-encoding it each step; with a cached z0 we
  mirror the latent, which is close for the VAE's local 8×8 patches and needs no VAE). h is never flipped (as in the
  code, where h is the pickled last-step feature).
- Prompts come from ``prompt_templates``: ten generic and ten human-subject templates in our own wording (the code
  uses ImageNet templates and 25 "character" ones), one drawn per sample per step.
- Micro-batches: the denoiser runs on ``micro_batch`` rows at a time against a detached leaf copy of Δ; each chunk
  is backpropagated to the leaf alone, then the summed leaf gradient goes through φ once. Memory is that of one
  chunk; the gradient equals the unchunked one.
- All randomness comes from one CPU ``torch.Generator`` seeded with ``config.seed``; the draws move to the device.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

# denoise(x_t (n,C,H,W), timesteps (n,) long, prompts [n], deltas (n, width)) -> eps (n,C,H,W)
Denoise = Callable[[torch.Tensor, torch.Tensor, list, torch.Tensor], torch.Tensor]

GENERIC_TEMPLATES = (
    "a photo of a {}", "a close-up photo of a {}", "a picture of the {}", "a photo of the {} outdoors",
    "a bright photo of a {}", "a photo of a {} in a room", "a cropped photo of the {}", "a good photo of a {}",
    "a rendering of a {}", "a photo of one {}")
HUMAN_TEMPLATES = (
    "a portrait of a {}", "a photo of a {} smiling", "a close-up portrait of the {}",
    "a photo of a {} walking down the street", "a photo of a {} sitting on a bench", "a full-body photo of a {}",
    "a photo of the {} looking at the camera", "a headshot of a {}", "a photo of a {} in the park",
    "a candid photo of a {}")


class TuningError(ValueError):
    """A configuration field, sample or denoiser output that tuning cannot use."""


class TuningInterrupted(RuntimeError):
    """``should_stop()`` returned True before ``step`` (0-based); the projector may be partly trained."""

    def __init__(self, step: int) -> None:
        super().__init__(f"OneActor tuning stopped before step {step}")
        self.step = step


@dataclass(frozen=True)
class TuningConfig:
    """methods.md §6.3 defaults (code: 200 steps, AdamW lr 1e-4, wd 0.01, β 0.9/0.999, seed 999; K = 3, λ1 0.5,
    λ2 0.2, flip 0.5). micro_batch: rows per denoiser call; autocast_dtype: run the denoiser under autocast."""

    steps: int = 200
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    aux_per_step: int = 3
    lambda_aux: float = 0.5
    lambda_avg: float = 0.2
    hflip_p: float = 0.5
    seed: int = 999
    micro_batch: int = 5
    autocast_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        checks = (
            ("steps", isinstance(self.steps, int) and self.steps >= 1, "an int >= 1"),
            ("lr", self.lr > 0, "> 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "two values in [0, 1)"),
            ("aux_per_step", isinstance(self.aux_per_step, int) and self.aux_per_step >= 1, "an int >= 1"),
            ("lambda_aux", self.lambda_aux >= 0, ">= 0"),
            ("lambda_avg", self.lambda_avg >= 0, ">= 0"),
            ("hflip_p", 0 <= self.hflip_p <= 1, "in [0, 1]"),
            ("seed", isinstance(self.seed, int), "an int"),
            ("micro_batch", isinstance(self.micro_batch, int) and self.micro_batch >= 1, "an int >= 1"),
            ("autocast_dtype", self.autocast_dtype in (None, torch.float16, torch.bfloat16),
             "None, torch.float16 or torch.bfloat16"))
        for name, ok, requirement in checks:
            if not ok:
                raise TuningError(f"TuningConfig.{name}: must be {requirement}, got {getattr(self, name)!r}")


@dataclass
class TuningSample:
    """latent: (C, H, W) clean z0, scaled as the denoiser expects; features: (channels, grid, grid) h of this image
    (cond mid-block input at the last step, methods.md §6.1)."""

    latent: torch.Tensor
    features: torch.Tensor


@dataclass
class TuningResult:
    """delta_tar, delta_avg: (width,) from the trained φ in eval mode; losses: L per step."""

    delta_tar: torch.Tensor
    delta_avg: torch.Tensor
    losses: list[float]
    steps: int


def prompt_templates(base_word: str, human: bool) -> list[str]:
    """The ten human-subject (or generic) templates filled with ``base_word``."""
    if not base_word.strip() or "{" in base_word or "}" in base_word:
        raise TuningError(f"base_word: need a non-empty word without braces, got {base_word!r}")
    return [template.format(base_word.strip()) for template in (HUMAN_TEMPLATES if human else GENERIC_TEMPLATES)]


def add_noise(z0: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """DDPM forward process: z0, noise (n, C, H, W), alphas_cumprod (T,), t (n,) long ->
    x_t = sqrt(ā_t)·z0 + sqrt(1 − ā_t)·noise (n, C, H, W), computed in ā's dtype, returned in z0's."""
    alpha = alphas_cumprod[t.to(alphas_cumprod.device)].to(z0.device).view(-1, *([1] * (z0.dim() - 1)))
    return (alpha.sqrt() * z0 + (1 - alpha).sqrt() * noise).to(z0.dtype)


def row_weights(aux_rows: int, config: TuningConfig) -> torch.Tensor:
    """(aux_rows + 2,) loss weights: target 1, each auxiliary λ1 / K, average λ2 (Eq. 14)."""
    return torch.tensor([1.0] + [config.lambda_aux / aux_rows] * aux_rows + [config.lambda_avg])


def backward_rows(deltas: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor, prompts: Sequence[str],
                  noise: torch.Tensor, weights: torch.Tensor, denoise: Denoise, micro_batch: int,
                  autocast_dtype: torch.dtype | None = None) -> float:
    """Backpropagate L = Σ_r weights[r]·mse(denoise(row r), noise[r]) through ``deltas``' graph; return L.

    deltas: (n, width) with graph; x_t, noise: (n, C, H, W); timesteps: (n,); prompts: n strings; weights: (n,).
    The denoiser sees rows [i, i + micro_batch) at a time and a detached leaf copy of deltas.
    """
    leaf = deltas.detach().requires_grad_(True)
    weights = weights.to(x_t.device)
    autocast = (torch.autocast(x_t.device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    total = torch.zeros((), device=x_t.device)
    for start in range(0, len(x_t), micro_batch):
        rows = slice(start, start + micro_batch)
        with autocast:
            eps = denoise(x_t[rows], timesteps[rows], list(prompts[rows]), leaf[rows])
        if not eps.requires_grad:
            raise TuningError("denoise output: does not depend on deltas (no gradient path to the projector)")
        if eps.shape != x_t[rows].shape:
            raise TuningError(f"denoise output: expected {tuple(x_t[rows].shape)}, got {tuple(eps.shape)}")
        per_row = F.mse_loss(eps.float(), noise[rows].float(), reduction="none").flatten(1).mean(1)
        loss = (per_row * weights[rows]).sum()
        loss.backward()  # frees this chunk's denoiser graph; the gradient accumulates on the leaf
        total += loss.detach()
    deltas.backward(leaf.grad)
    return float(total)


def _stack(samples: Sequence[TuningSample], field: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(len(samples), *shape) of one field; every sample must match the target's (samples[0]) 3-D shape."""
    expected = tuple(getattr(samples[0], field).shape)
    for index, sample in enumerate(samples):
        shape = tuple(getattr(sample, field).shape)
        if len(shape) != 3 or shape != expected:
            where = "target" if index == 0 else f"auxiliaries[{index - 1}]"
            raise TuningError(f"{where}.{field}: expected a 3-D tensor of the target's shape {expected}, got {shape}")
    return torch.stack([getattr(sample, field) for sample in samples]).to(device, dtype)


def _draw_rows(generator: torch.Generator, latents: torch.Tensor, k: int, templates: Sequence[str],
               timesteps: int, hflip_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list, torch.Tensor]:
    """One step's rows from latents (1 + #aux, C, H, W), row 0 the target: picks (k + 1,) sample indices (target,
    then k auxiliaries without replacement); z0, noise (k + 2, C, H, W); k + 2 prompts; timesteps (k + 2,). The
    last row repeats the target's latent, flip, noise and prompt (the average row). Draws, in this order: samples,
    flips, templates, noise, timesteps, all from the CPU ``generator``, then moved to the latents' device."""
    device = latents.device
    drawn = torch.randperm(len(latents) - 1, generator=generator)[:k]
    picks = torch.cat([torch.zeros(1, dtype=torch.long), 1 + drawn]).to(device)
    flips = (torch.rand(k + 1, generator=generator) < hflip_p).view(-1, 1, 1, 1).to(device)
    prompts = [templates[i] for i in torch.randint(len(templates), (k + 1,), generator=generator).tolist()]
    noise = torch.randn((k + 1, *latents.shape[1:]), generator=generator).to(device)
    steps = torch.randint(timesteps, (k + 2,), generator=generator).to(device)
    z0 = torch.where(flips, latents[picks].flip(-1), latents[picks])
    return picks, torch.cat([z0, z0[:1]]), torch.cat([noise, noise[:1]]), prompts + prompts[:1], steps


def tune(projector: torch.nn.Module, target: TuningSample, auxiliaries: Sequence[TuningSample], denoise: Denoise,
         alphas_cumprod: torch.Tensor, base_word: str, config: TuningConfig = TuningConfig(), *, human: bool = False,
         progress: Callable[[int, int, float], None] | None = None,
         should_stop: Callable[[], bool] | None = None) -> TuningResult:
    """Train ``projector`` in place for ``config.steps`` steps (methods.md §6.3); return Δ_tar, Δ_avg and the losses.

    denoise: the host's frozen UNet (see ``Denoise``); alphas_cumprod: (T,) its noise schedule ā. progress(step,
    total, loss) runs after each step (step counts from 1); should_stop() before each, raising TuningInterrupted.
    The projector trains in train mode (BatchNorm on the step's k + 1 rows) and is left in eval mode (running
    statistics), in which Δ_tar and Δ_avg are computed.
    """
    if not auxiliaries:
        raise TuningError("auxiliaries: need at least one auxiliary sample (Δ_avg is their mean)")
    if alphas_cumprod.dim() != 1 or len(alphas_cumprod) == 0:
        raise TuningError(f"alphas_cumprod: expected a non-empty (T,) tensor, got {tuple(alphas_cumprod.shape)}")
    parameter = next(projector.parameters())
    device = parameter.device
    samples = [target, *auxiliaries]
    latents = _stack(samples, "latent", device, torch.float32)
    features = _stack(samples, "features", device, parameter.dtype)
    alphas = alphas_cumprod.to(device)
    templates = prompt_templates(base_word, human)
    generator = torch.Generator().manual_seed(config.seed)
    k = min(config.aux_per_step, len(auxiliaries))
    weights = row_weights(k, config)
    optimizer = torch.optim.AdamW(projector.parameters(), lr=config.lr, betas=config.betas,
                                  weight_decay=config.weight_decay)
    projector.train()
    losses: list[float] = []
    for step in range(config.steps):
        if should_stop is not None and should_stop():
            raise TuningInterrupted(step)
        picks, z0, noise, prompts, timesteps = _draw_rows(generator, latents, k, templates, len(alphas),
                                                          config.hflip_p)
        optimizer.zero_grad(set_to_none=True)
        phi = projector(features[picks])  # (k + 1, width)
        deltas = torch.cat([phi, phi[1:].mean(0, keepdim=True)])  # + the average row's Δ_avg (Eq. 12)
        loss = backward_rows(deltas, add_noise(z0, noise, alphas, timesteps), timesteps, prompts, noise, weights,
                             denoise, config.micro_batch, config.autocast_dtype)
        optimizer.step()
        losses.append(loss)
        if progress is not None:
            progress(step + 1, config.steps, loss)
    projector.eval()
    with torch.no_grad():
        phi = projector(features)
    return TuningResult(delta_tar=phi[0].clone(), delta_avg=phi[1:].mean(0), losses=losses, steps=config.steps)
