"""What every row of the presets bench shares (``presets.py``): the random UNet and its attention layers, the
schedule, the noise and the text stand-ins (``Inputs``, ``make_inputs``), and how a generation is measured
(``measure``: peak memory and FLOPs; ``device_line``: the device in words).
"""
from __future__ import annotations

import platform
import zlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .csa import _StorageLedger
from .oneactor import TOKENS, added_conditioning, random_unet
from .storysync_unet import attention_layers


@dataclass
class Inputs:
    """What every row of one batch size shares: the UNet, its layers, the schedule, the noise and the text."""
    unet: torch.nn.Module
    config: dict
    side: int
    device: torch.device
    dtype: torch.dtype
    steps: int
    attn1: list
    attn2: list
    timesteps: list[int]
    sigmas: list[float]
    noise: torch.Tensor  # (1, C, side, side): every frame starts from it
    uncond: torch.Tensor  # (TOKENS, D)
    added: dict | None  # SDXL micro-conditioning of one row

    def encode(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """The host text encoder's stand-in: a seeded random (TOKENS, D) embedding per text."""
        out = []
        for text in texts:
            generator = torch.Generator().manual_seed(zlib.crc32(text.encode()))
            out.append(torch.randn(TOKENS, self.config["cross_attention_dim"], generator=generator)
                       .to(self.device, self.dtype))
        return out

    def unet_call(self, x: torch.Tensor, step: int, context: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        t = torch.full((rows,), self.timesteps[step], device=self.device)
        kwargs = {} if self.added is None else \
            {"added_cond_kwargs": {k: v.expand(rows, *v.shape[1:]) for k, v in self.added.items()}}
        return self.unet(x, t, encoder_hidden_states=context, **kwargs).sample


def schedule(steps: int) -> tuple[list[int], list[float]]:
    """Timesteps evenly spaced 999 -> 0 and their σ of SD's scaled-linear schedule, σ = 0 appended."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0)
    timesteps = [round(float(t)) for t in torch.linspace(999, 0, steps, dtype=torch.float64)]
    return timesteps, [float(((1 - alphas[t]) / alphas[t]) ** 0.5) for t in timesteps] + [0.0]


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def weights_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def measure(call: Callable[[object], object], inputs: Inputs) -> tuple[int, int]:
    """(peak bytes, FLOPs) of ``call(counter)`` (``counter``: the ``FlopCounterMode`` counting it, or None): CUDA
    ``max_memory_allocated`` of an uncounted run, then FLOPs in another; CPU the weights plus the dispatch ledger's
    peak, in the counted run."""
    from torch.utils.flop_counter import FlopCounterMode

    device = inputs.device
    if device.type == "cuda":
        synchronise(device)
        torch.cuda.reset_peak_memory_stats(device)
        call(None)
        synchronise(device)
        peak = torch.cuda.max_memory_allocated(device)
        with FlopCounterMode(display=False) as counter:
            call(counter)
        return peak, counter.get_total_flops()
    with FlopCounterMode(display=False) as counter, _StorageLedger() as ledger:
        call(counter)
    return weights_bytes(inputs.unet) + ledger.peak, counter.get_total_flops()


def make_inputs(arch: str, device: torch.device, dtype: torch.dtype, steps: int, latent_side: int | None,
                unet_config: dict | None) -> Inputs:
    unet, config, side = random_unet(arch, device, dtype, latent_side, unet_config)
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(1, config["in_channels"], side, side, generator=generator).to(device, dtype)
    uncond = torch.randn(TOKENS, config["cross_attention_dim"], generator=generator).to(device, dtype)
    added = added_conditioning(config, 1, float(side * 8), generator, device, dtype)
    timesteps, sigmas = schedule(steps)
    layers = config["layers_per_block"]
    return Inputs(unet, config, side, device, dtype, steps, attention_layers(unet, "attn1", layers),
                  attention_layers(unet, "attn2", layers), timesteps, sigmas, noise, uncond, added)


def device_line(device: torch.device, dtype: torch.dtype) -> str:
    """The device in words: the GPU's name, or the CPU's model and torch's threads; then the dtype."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        model = platform.processor() or "CPU"
        if platform.system() == "Linux":
            with open("/proc/cpuinfo") as cpuinfo:
                model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                             model)
        where = f"{model}, {torch.get_num_threads()} threads"
    return f"{device} ({where}), {str(dtype).removeprefix('torch.')}"
