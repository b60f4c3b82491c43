"""``python -m lib_consistency.bench --only flux [--flux-size real|small]``: the methods on one Flux model call.

One denoising step of a story on a randomly initialised diffusers ``FluxTransformer2DModel``: ``frames`` frames of one
character, CFG 1 (Flux dev's distilled guidance: cond rows only), T5 context of ``TEXT_TOKENS`` (schnell's 256),
plain against the DiT surface (``surfaces/diffusers_flux``) with each preset's attention method:
- StoryDiffusion: consistent self-attention, rate 0.5, the "up_low_res" policy (on a transformer: the second half of
  the depth), sharing at every step (the official schedule skips some steps; a shared step is what is timed);
- StorySync: masked sharing in the same blocks, subject maps from every double-stream block's joint attention,
  Otsu, mask dropout 0.5, RFH γ 0.3 (the step inside the RFH window); no BLI (its pre-pass re-runs the first steps).
"real" is Flux.1's configuration (19 double + 38 single blocks, 3072 wide, 24 heads) at 1024² (a 64x64 token grid),
for a GPU in bf16; "small" (default on the CPU) keeps the head size and token counts of 512² (32x32) with 2 + 4
blocks, 4 heads. Figures: median wall time per call, time ratio, and the FLOPs ratio counted by
``torch.utils.flop_counter.FlopCounterMode`` (matrix products and attention, counted in its math form). diffusers is imported inside ``run``.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..common.row_layout import Role, RowLayout
from ..story_diffusion.consistent_self_attention import CsaSettings, Schedule
from ..story_diffusion.state import ConsistencyState
from ..story_sync.state import StorySyncSettings, StorySyncState
from ..surfaces.diffusers_flux import FluxCall, flux_depth, install_flux_processors, remove_flux_processors
from ..surfaces.dit_attention import DitRunState
from .oneactor import median_seconds
from .storysync_unet import _flops as _counted_flops

TEXT_TOKENS = 256
SUBJECT_COLUMNS = (1, 2)
RFH_STEP, TOTAL_STEPS = 3, 10
CONFIGS = {
    "real": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                 axes_dims_rope=(16, 56, 56)),
    "small": dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128,
                  num_attention_heads=4, joint_attention_dim=256, pooled_projection_dim=64, guidance_embeds=True,
                  axes_dims_rope=(16, 56, 56)),
}
GRID = {"real": 64, "small": 32}


def _flops(call: Callable[[], object]) -> int:
    """FLOPs of ``call`` with attention in its math form, which the counter sees on every device (the fused CPU
    kernel is not counted)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        return _counted_flops(call)


def run(size: str, device: torch.device | str, dtype: torch.dtype, frames: int = 4, repeats: int = 3, *,
        config: dict | None = None, grid: int | None = None,
        print_fn: Callable[[str], None] = print) -> dict[str, float]:
    """Print and return seconds per call and ratios (``config`` / ``grid`` replace the named size, for tests)."""
    from diffusers import FluxTransformer2DModel
    device = torch.device(device)
    config, side = config or CONFIGS[size], grid or GRID[size]
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**config).to(device, dtype).eval()
    generator = torch.Generator().manual_seed(1)
    ids = torch.zeros(side, side, 3)
    ids[..., 1], ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None]
    inputs = dict(hidden_states=torch.randn(frames, side * side, config["in_channels"], generator=generator),
                  encoder_hidden_states=torch.randn(frames, TEXT_TOKENS, config["joint_attention_dim"],
                                                    generator=generator),
                  pooled_projections=torch.randn(frames, config["pooled_projection_dim"], generator=generator),
                  timestep=torch.full((frames,), 0.7), img_ids=ids.reshape(-1, 3),
                  txt_ids=torch.zeros(TEXT_TOKENS, 3), guidance=torch.full((frames,), 3.5))
    inputs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
    inputs["img_ids"], inputs["txt_ids"] = inputs["img_ids"].float(), inputs["txt_ids"].float()
    layout = RowLayout(tuple(range(frames)), (Role.COND,) * frames)
    depth, groups = flux_depth(model), {f: frozenset({"hero"}) for f in range(frames)}

    def plain() -> torch.Tensor:
        return model(**inputs).sample

    def csa_state():
        return ConsistencyState(CsaSettings(0.5, Schedule.ALWAYS, "up_low_res"), 1, groups, depth=depth)

    def storysync_state():
        return StorySyncState(StorySyncSettings(bli_strength=0.0), 1, groups,
                              {f: {"hero": SUBJECT_COLUMNS} for f in range(frames)}, depth=depth)

    call = FluxCall(None, TEXT_TOKENS)

    def with_state(make) -> Callable[[], torch.Tensor]:
        state = make()
        run_state = DitRunState(csa=state) if isinstance(state, ConsistencyState) else DitRunState(storysync=state)
        state.begin_step(0, RFH_STEP, TOTAL_STEPS, 0.7)

        def step() -> torch.Tensor:
            call.run = run_state
            run_state.set_rows(layout, (side, side))
            return plain()
        return step

    figures: dict[str, float] = {}
    with torch.inference_mode():
        plain_flops, plain_time = _flops(plain), median_seconds(plain, device, repeats)
        previous = install_flux_processors(model, call)
        try:
            for name, make in (("csa", csa_state), ("storysync", storysync_state)):
                step = with_state(make)
                flops, seconds = _flops(step), median_seconds(step, device, repeats)
                figures[f"{name}_time_ratio"], figures[f"{name}_flops_ratio"] = seconds / plain_time, flops / plain_flops
                figures[name] = seconds
        finally:
            remove_flux_processors(model, previous)
    figures["plain"] = plain_time
    print_fn(f"Flux model call ({size}: {depth.double} double + {depth.single} single blocks, "
             f"{config['num_attention_heads']} heads, random init, {str(dtype).removeprefix('torch.')}), "
             f"{side}x{side} image tokens + {TEXT_TOKENS} text, {frames} frames, CFG 1, on {device}: "
             f"plain {plain_time * 1e3:.1f} ms")
    for name, label in (("csa", "StoryDiffusion CSA"), ("storysync", "StorySync")):
        print_fn(f"  {label}: {figures[name] * 1e3:.1f} ms, time x{figures[f'{name}_time_ratio']:.3f}, FLOPs "
                 f"x{figures[f'{name}_flops_ratio']:.3f}")
    return figures
