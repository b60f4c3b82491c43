"""``python -m lib_consistency.bench --only storysync-unet [--arch sd15|sdxl]``: StorySync on a whole UNet call.

The layer table (``storysync``) times one self-attention module; this times what a user waits for: one CFG
UNet call of 2B rows (B frames of one character, cond then uncond) of a randomly initialised diffusers
``UNet2DConditionModel`` with the real SD1.5 (512²) or SDXL (1024²) configuration (``oneactor.UNET_CONFIGS``),
plain against the StorySync hooks (``install_storysync_hooks`` on every attn1 and attn2, the preset's settings:
every up block shares, mask dropout 0.5, RFH γ 0.3; the step sits inside the RFH window; no BLI, whose pre-pass the
cost model counts). Everything the hooks do per call runs: subject maps at the mask level, Otsu, the masks' one
trip to the CPU, masked sharing, RFH. Masks come from the random UNet's own cross-attention, so their size is
whatever Otsu finds there (printed).

Figures: median wall time per call (synchronised, so host time and the mask sync are included), the time ratio,
and the FLOPs ratio of the same two calls counted by ``torch.utils.flop_counter.FlopCounterMode`` (matrix products
and attention), so ``time ratio / FLOPs ratio`` says how close the whole call runs to its arithmetic.
diffusers is imported inside ``run`` only (``bench/requirements.txt``).
"""
from __future__ import annotations

import re
import statistics
from typing import Callable

import torch

from ..common.addresses import LayerAddress
from ..common.row_layout import Role, RowLayout
from ..story_sync.state import StorySyncSettings, StorySyncState
from ..surfaces.attention_modules import install_storysync_hooks
from ..surfaces.instance_hooks import remove_hooks
from .oneactor import TOKENS, added_conditioning, median_seconds, random_unet

SUBJECT_COLUMNS = (2, 3)  # "<bos> a <subject> <subject> ...": two subject tokens
RFH_STEP, PLAIN_STEP, TOTAL_STEPS = 3, 5, 10  # inside and outside the default RFH window [0.1, 0.33)


def ldm_address(name: str, layers_per_block: int) -> tuple[LayerAddress | None, str | None]:
    """diffusers attention module name -> (ldm-style (block kind, index, transformer), "attn1" | "attn2").

    Down level l, attention a: input block 1 + l·(layers + 1) + a; up level l: output block l·(layers + 1) + a;
    the middle block: ("middle", 0, transformer). Anything else: (None, None).
    """
    match = re.fullmatch(r"(down|up)_blocks\.(\d+)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.(attn[12])", name)
    if match:
        kind, level, attention, transformer = match.group(1), *map(int, match.groups()[1:4])
        per_level = layers_per_block + 1
        if kind == "down":
            return ("input", 1 + level * per_level + attention, transformer), match.group(5)
        return ("output", level * per_level + attention, transformer), match.group(5)
    match = re.fullmatch(r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.(attn[12])", name)
    return (("middle", 0, int(match.group(1))), match.group(2)) if match else (None, None)


def attention_layers(unet: torch.nn.Module, kind: str, layers_per_block: int):
    found = ((ldm_address(name, layers_per_block), module) for name, module in unet.named_modules())
    return [(address, module) for (address, which), module in found if which == kind]


def _flops(call: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


def run(arch: str, device: torch.device | str, dtype: torch.dtype, frames: int = 4, repeats: int = 5,
        latent_side: int | None = None, *, unet_config: dict | None = None,
        print_fn: Callable[[str], None] = print) -> dict[str, float]:
    """Print and return the plain and StorySync seconds per UNet call, their ratio and the FLOPs ratio
    (``unet_config`` replaces the real configuration, for tests)."""
    device = torch.device(device)
    unet, config, side = random_unet(arch, device, dtype, latent_side, unet_config)
    rows = 2 * frames
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(rows, config["in_channels"], side, side, generator=generator).to(device, dtype)
    context = torch.randn(rows, TOKENS, config["cross_attention_dim"], generator=generator).to(device, dtype)
    added = added_conditioning(config, rows, float(side * 8), generator, device, dtype)
    kwargs = {} if added is None else {"added_cond_kwargs": added}
    timestep = torch.full((rows,), 500, device=device)
    layout = RowLayout(tuple(range(frames)) * 2, (Role.COND,) * frames + (Role.UNCOND,) * frames)
    state = StorySyncState(StorySyncSettings(bli_strength=0.0), run_seed=1,
                           frame_groups={f: frozenset({"hero"}) for f in range(frames)},
                           subject_columns={f: {"hero": SUBJECT_COLUMNS} for f in range(frames)})

    def plain() -> torch.Tensor:
        return unet(x, timestep, encoder_hidden_states=context, **kwargs).sample

    def hooked(step: int) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            state.begin_unet_call(layout, (side, side))  # the adapters' per-call host facts
            state.begin_step(0, step, TOTAL_STEPS, 5.0)
            return plain()
        return call

    def timed(call: Callable[[], object]) -> float:
        return median_seconds(call, device, repeats)

    layers = config["layers_per_block"]
    with torch.inference_mode():
        plain_flops, plain_time = _flops(plain), timed(plain)
        hooks = install_storysync_hooks(attention_layers(unet, "attn1", layers),
                                        attention_layers(unet, "attn2", layers), state, "encoder_hidden_states")
        try:
            hooked_flops, hooked_time = _flops(hooked(RFH_STEP)), timed(hooked(RFH_STEP))
            sharing_flops, sharing_time = _flops(hooked(PLAIN_STEP)), timed(hooked(PLAIN_STEP))
        finally:
            remove_hooks(hooks)
    subject = statistics.mean(float(mask.float().mean()) for _, masks in state.masks.values()
                              for mask in masks.values()) if state.masks else 0.0
    figures = {"plain": plain_time, "storysync": hooked_time, "time_ratio": hooked_time / plain_time,
               "flops_ratio": hooked_flops / plain_flops, "sharing_time_ratio": sharing_time / plain_time,
               "sharing_flops_ratio": sharing_flops / plain_flops, "subject": subject}
    print_fn(f"StorySync whole UNet call, {arch} (random init, {str(dtype).removeprefix('torch.')}), latent "
             f"{side}x{side}, {frames} frames x 2 CFG rows, on {device}: plain {plain_time * 1e3:.1f} ms, StorySync "
             f"{hooked_time * 1e3:.1f} ms in the RFH window, {sharing_time * 1e3:.1f} ms outside it (subject masks "
             f"{subject:.2f} of the tokens)")
    print_fn(f"storysync-unet time ratio {figures['time_ratio']:.3f} (outside the RFH window "
             f"{figures['sharing_time_ratio']:.3f}), FLOPs ratio {figures['flops_ratio']:.3f} "
             f"({figures['sharing_flops_ratio']:.3f}), time ratio / FLOPs ratio "
             f"{figures['time_ratio'] / figures['flops_ratio']:.3f} "
             f"({figures['sharing_time_ratio'] / figures['sharing_flops_ratio']:.3f})")
    return figures
