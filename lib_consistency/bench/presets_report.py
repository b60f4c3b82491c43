"""The presets bench's printed table and its part-4 call figures (``presets.py`` runs the generations).

BLI in lock-step (methods.md §5.1 step 4, way (b)): the row ``StorySync, BLI lock-step`` runs the vanilla
trajectory's 2B rows as twins in the story's UNet calls for the window's steps instead of a separate pre-pass
(way (a), what the WebUIs run), and its latents are compared with the pre-pass row's. Beside it one plain UNet call
of 2B and of 4B rows: lock-step pays where 4B rows cost well under twice 2B (a device with headroom at this batch)
and the extra activations fit.
"""
from __future__ import annotations

from typing import Callable

import torch

from .oneactor import median_seconds
from .presets_inputs import Inputs, measure

GIB = 2 ** 30


def lockstep_calls(inputs: Inputs, frames: int, repeats: int) -> dict[str, float]:
    """One plain UNet call of 2B rows and of 4B rows: seconds (median) and peak."""
    out = {}
    for rows in (2 * frames, 4 * frames):
        x = inputs.noise.expand(rows, -1, -1, -1)
        context = inputs.uncond.expand(rows, -1, -1)

        def call() -> torch.Tensor:
            return inputs.unet_call(x, inputs.steps // 2, context)

        out[f"seconds_{rows}"] = median_seconds(call, inputs.device, repeats)
        out[f"peak_{rows}"] = measure(lambda counter: call(), inputs)[0]
    return out


def print_table(figures: dict, rows: list, inputs: Inputs, arch: str, frames: int, repeats: int, device: str,
                lockstep_name: str, print_fn: Callable[[str], None]) -> None:
    print_fn(f"presets: whole generations, {arch} UNet (random init), latent {inputs.side}x{inputs.side}, "
             f"{inputs.steps} Euler steps, CFG, on {device}; median of {repeats} generations per row")
    memory = "CUDA max_memory_allocated" if inputs.device.type == "cuda" else \
        "weights + peak of tensors allocated by aten ops (dispatch ledger)"
    print_fn(f"memory: {memory}; FLOPs: FlopCounterMode over one whole generation")
    print_fn(f"{'row':<28} {'batch':>5} {'s/image':>9} {'time x':>7} {'peak GiB':>9} {'mem x':>6} {'FLOPs x':>8}")
    for name, batch in rows:
        row = figures[name, batch]
        print_fn(f"{name:<28} {batch:>5} {row['seconds'] / batch:>9.3f} {row['time_ratio']:>7.3f} "
                 f"{row['peak'] / GIB:>9.3f} {row['memory_ratio']:>6.3f} {row['flops_ratio']:>8.3f}")
    story = figures["StorySync", frames]
    vanilla = figures["vanilla", frames]
    consistent = story["seconds"] - story["prepass"]
    print_fn(f"StorySync: BLI pre-pass {story['prepass']:.2f} s ({story['prepass'] / vanilla['seconds']:.3f} of "
             f"vanilla, {story['prepass_flops'] / vanilla['flops']:.3f} of its FLOPs), consistent pass "
             f"{consistent:.2f} s (x{consistent / vanilla['seconds']:.3f}); "
             f"vanilla {vanilla['seconds']:.2f} s per generation, {vanilla['flops'] / 1e12:.2f} TFLOP, "
             f"peak {vanilla['peak'] / GIB:.3f} GiB")
    lock = figures["lockstep"]
    two, four = 2 * frames, 4 * frames
    print_fn(f"one plain UNet call: {two} rows {lock[f'seconds_{two}'] * 1e3:.1f} ms, peak "
             f"{lock[f'peak_{two}'] / GIB:.3f} GiB; {four} rows (BLI's vanilla rows in lock-step) "
             f"{lock[f'seconds_{four}'] * 1e3:.1f} ms (x{lock[f'seconds_{four}'] / lock[f'seconds_{two}']:.2f}), "
             f"peak {lock[f'peak_{four}'] / GIB:.3f} GiB (x{lock[f'peak_{four}'] / lock[f'peak_{two}']:.2f})")
    lockstep_row = figures[lockstep_name, frames]
    print_fn(f"StorySync, BLI pre-pass x{story['time_ratio']:.3f} time, x{story['memory_ratio']:.3f} "
             f"peak; BLI lock-step x{lockstep_row['time_ratio']:.3f} time, x{lockstep_row['memory_ratio']:.3f} peak; "
             f"lock-step latents against the pre-pass's: max difference {lock['latents_difference']:.2e} (relative)")
