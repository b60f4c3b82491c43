"""StorySync part of ``python -m lib_consistency.bench``: one self-attention layer's cost, a generation's cost
model.

Method: StorySync (Gaur et al., arXiv 2508.03735) paper §3.2.1 Eqs. 5-8 (masked sharing), §3.2.2 Eqs. 9-11 (RFH),
§3.3 Eq. 12 (BLI); methods.md §5.1, §5.3. Run alone with ``python -m lib_consistency.bench --only storysync``.

Layer timing: the real path (``StorySyncState`` + ``StorySyncSelfAttentionHook`` on ``bench.MultiHeadSelfAttention``,
installed once per case, masks on the CPU: as in a generation) against an identical module attending plainly, with
bench.py's sandwiched timing and peak-memory helpers. On CUDA the ratio is GPU time with the host out of the way
(``bench.sandwiched_on_device``: calls queued behind a GPU sleep); the synchronous wall-clock ratio (host time
included), the hook's extra host time per call and ``ext x``, the module run on the ready extended context (the
ideal), are printed beside it. B frames of one character, cond rows, step 3 of 10, no dropout, no BLI; every
frame's subject mask is the same centred square of ``round(side·√0.3)`` tokens a side (our choice: ≈ 30 %; the
bound uses the exact count m). Shapes are where the real UNets share (SD1.5 512²: 64² @320, 32² @640; SDXL
1024²: 64² @640, 32² @1280); RFH (γ 0.3) is timed only at ``RFH_LEVEL``, the one level where it runs. FLOPs
bounds (per row, N tokens, C channels):
- masked sharing: each frame attends N + m·(B−1) keys, bound ``1 + (m/N)·(B−1)`` (Q and output projections do
  not grow, so the true FLOPs ratio is lower);
- sharing + RFH: that plus RFH's cosine matrices over the plain layer's multiply-adds (our choice),
  ``(B−1)·m²·C / (4·N·C² + 2·N²·C)``.
The last line is the worst masked-sharing time ratio / bound (the target, ≤ 1.10). ``storysync_unet`` times a
whole UNet call.

Cost model (pure arithmetic): UNet calls with the BLI pre-pass (``hosts/prepass.py``: it runs the window's steps,
then stops at the first self-attention of the next call; counted as a whole call, an upper bound; one call per
step, i.e. a first-order sampler, cond and uncond batched) and BLI cache bytes = frames × 2 CFG branches × window
steps × Σ_layers tokens × channels × element size (A1111 caches the self-attention inputs, Forge q | k | v: 3×).
The window is the steps i with i/T < w, exactly ``StorySyncState.in_bli_window`` (w = 0.1: ⌈w·T⌉ steps; 3 at
T = 30 although 0.1·30 = 3.0000000000000004 in floating point); methods.md §5.3's "6 BLI steps" at T = 50
(≈ 10 GB for 4 SDXL frames) counts 0…⌊T/10⌋ inclusively, the runtime has 5 (8.4 GB). Offload budget (our
choice): 16 GB of CPU RAM with 'BLI cache on CPU'.
"""
from __future__ import annotations

import copy
import itertools
import math
import statistics
import time
from typing import Callable

import torch

from ..common.row_layout import Role, RowLayout
from ..story_diffusion.consistent_self_attention import LayerPolicy, Schedule
from ..story_sync.state import RFH_LEVEL, StorySyncSettings, StorySyncState
from ..surfaces.attention_modules import install_storysync_hooks
from ..surfaces.instance_hooks import remove_hooks
from .csa import MultiHeadSelfAttention, _peak_bytes, _sandwiched, sandwiched_on_device

# (model, token-grid side, channels, heads, UNet level at 512² / 1024², a layer at that level)
CASES = (("SD1.5", 64, 320, 8, 0, ("output", 9, 0)), ("SD1.5", 32, 640, 8, 1, ("output", 6, 0)),
         ("SDXL", 64, 640, 10, 1, ("output", 3, 0)), ("SDXL", 32, 1280, 20, 2, ("output", 0, 0)))
FRAME_COUNTS = (2, 4, 8)
SUBJECT_FRACTION = 0.3
RFH_STRENGTH = 0.3

# Self-attention layers: (where, layers, tokens, channels) at SD1.5 512² and SDXL 1024² (methods.md §5.3).
SD15_512 = (("level 0: input 1-2, output 9-11", 5, 64 * 64, 320),
            ("level 1: input 4-5, output 6-8", 5, 32 * 32, 640),
            ("level 2: input 7-8, output 3-5", 5, 16 * 16, 1280),
            ("middle", 1, 8 * 8, 1280))
SDXL_1024 = (("level 1: input 4-5, output 3-5, 2 blocks each", 10, 64 * 64, 640),
             ("level 2: input 7-8, 10 blocks each", 20, 32 * 32, 1280),
             ("middle, 10 blocks", 10, 32 * 32, 1280),
             ("level 2: output 0-2, 10 blocks each", 30, 32 * 32, 1280))
BLI_WINDOW = 0.1
FRAMES = 4
OFFLOAD_BUDGET_BYTES = 16 * 10 ** 9  # CPU RAM for the cache with 'BLI cache on CPU' (a 32 GB machine)
CACHE_CASES = (("SD1.5 512²", SD15_512, 20), ("SDXL 1024²", SDXL_1024, 30), ("SDXL 1024²", SDXL_1024, 50))
HOSTS = (("A1111", False), ("Forge", True))  # (host, caches q | k | v rather than the inputs)


# --- cost model ----------------------------------------------------------------------------------------------
def bli_window_steps(steps: int, window: float) -> int:
    """Steps of a T-step first pass inside the BLI window (``StorySyncState.in_bli_window``, asked directly)."""
    state = StorySyncState(StorySyncSettings(bli_strength=1.0, bli_window=window), 0, {}, {})
    inside = 0
    for step in range(steps):
        state.begin_step(0, step, steps, 0.0)
        inside += state.in_bli_window()
    return inside


def unet_calls(steps: int, window: float) -> tuple[int, int, float]:
    """(consistent-pass calls, pre-pass calls, total / vanilla) per image: the pre-pass runs the window's steps and
    one more call that stops at its first self-attention (counted whole); a window of every step needs no stop."""
    inside = bli_window_steps(steps, window)
    prepass = inside + (0 < inside < steps)
    return steps, prepass, (steps + prepass) / steps


def cache_elements_per_step(inventory) -> int:
    """Σ over self-attention layers of tokens × channels: one image, one CFG branch, one step."""
    return sum(layers * tokens * channels for _, layers, tokens, channels in inventory)


def bli_cache_bytes(inventory, frames: int, steps: int, window: float, element_size: int = 2, qkv: bool = False,
                    branches: int = 2) -> int:
    """Bytes of the BLI cache of one generation: inputs (A1111) or q | k | v (Forge, ``qkv``: 3×) of every layer."""
    per_step = cache_elements_per_step(inventory) * element_size * (3 if qkv else 1)
    return frames * branches * bli_window_steps(steps, window) * per_step


def print_cost_model(print_fn: Callable[[str], None] = print, window: float = BLI_WINDOW, frames: int = FRAMES,
                     budget: int = OFFLOAD_BUDGET_BYTES) -> None:
    print_fn(f"StorySync UNet calls per image, BLI window w = {window} (steps i with i/T < w; first-order sampler)")
    print_fn(f"{'steps':>5} {'window':>6} {'consistent':>10} {'pre-pass':>8} {'total':>5} {'x vanilla':>9}")
    for steps in (20, 30, 50):
        consistent, prepass, ratio = unet_calls(steps, window)
        print_fn(f"{steps:>5} {bli_window_steps(steps, window):>6} {consistent:>10} {prepass:>8} "
                 f"{consistent + prepass:>5} {ratio:>9.3f}")
    for model, inventory in (("SD1.5 512²", SD15_512), ("SDXL 1024²", SDXL_1024)):
        elements = cache_elements_per_step(inventory)
        print_fn(f"{model}: {sum(layer[1] for layer in inventory)} self-attention layers, {elements / 1e6:.2f} M "
                 f"elements = {elements * 2 / 1e6:.1f} MB fp16 per image, CFG branch and step")
    print_fn(f"BLI cache, {frames} frames x 2 CFG branches, fp16; offload budget {budget / 1e9:.0f} GB of CPU RAM "
             "('BLI cache on CPU')")
    print_fn(f"{'model':<11} {'steps':>5} {'window':>6} {'host':<6} {'cached':<7} {'GB':>6} {'fits':>4}")
    for (model, inventory, steps), (host, qkv) in itertools.product(CACHE_CASES, HOSTS):
        size = bli_cache_bytes(inventory, frames, steps, window, qkv=qkv)
        print_fn(f"{model:<11} {steps:>5} {bli_window_steps(steps, window):>6} {host:<6} "
                 f"{'q|k|v' if qkv else 'inputs':<7} {size / 1e9:>6.2f} {'yes' if size <= budget else 'no':>4}")


# --- one layer -----------------------------------------------------------------------------------------------
def subject_mask(side: int, fraction: float = SUBJECT_FRACTION) -> torch.Tensor:
    """bool [side²]: a centred square of max(1, round(side·√fraction)) tokens a side on the side × side grid."""
    square = max(1, round(side * math.sqrt(fraction)))
    start = (side - square) // 2
    grid = torch.zeros(side, side, dtype=torch.bool)
    grid[start:start + square, start:start + square] = True
    return grid.flatten()


def storysync_state(frames: int, side: int, level: int, mask: torch.Tensor, rfh_strength: float) -> StorySyncState:
    """B frames of character "a", cond rows, step 3 of 10, no dropout or BLI, ``mask`` as every frame's mask; the
    latent is side·2^level so the layer's token grid sits at ``level``."""
    settings = StorySyncSettings(mask_dropout=0.0, share_dropout=0.0, rfh_strength=rfh_strength,
                                 rfh_window=(0.0, 1.0), bli_strength=0.0, layer_policy=LayerPolicy.ALL,
                                 schedule=Schedule.ALWAYS)
    state = StorySyncState(settings, run_seed=1, frame_groups={f: frozenset({"a"}) for f in range(frames)},
                           subject_columns={f: {"a": (1, 2)} for f in range(frames)})
    latent = side << level
    state.begin_unet_call(RowLayout(tuple(range(frames)), (Role.COND,) * frames), (latent, latent))
    state.begin_step(0, 3, 10, 2.0)
    state.masks = {f: ((side, side), {"a": mask}) for f in range(frames)}
    return state


def host_seconds(call: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median host time to issue one ``call`` (on CUDA: until it returns, the GPU's work only queued)."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return statistics.median(times)


def sharing_bound(frames: int, subject_tokens: int, tokens: int) -> float:
    return 1 + subject_tokens * (frames - 1) / tokens


def rfh_extra(frames: int, subject_tokens: int, tokens: int, channels: int) -> float:
    """RFH's cosine multiply-adds per row over the plain layer's (q/k/v/out projections + QKᵀ and AV)."""
    return (frames - 1) * subject_tokens ** 2 * channels / (4 * tokens * channels ** 2 + 2 * tokens ** 2 * channels)


def run_attention(device: torch.device, dtype: torch.dtype, repeats: int, side_divisor: int,
                  print_fn: Callable[[str], None] = print) -> tuple[float, float, float]:
    """Time every case; return the worst time ratio / bound of masked sharing, of sharing + RFH (0: none), the
    worst synchronous wall-clock ratio / bound of masked sharing and the worst hooked / extended-context time."""
    worst = {False: 0.0, True: 0.0}
    worst_wall = worst_over_ideal = 0.0
    cuda = device.type == "cuda"

    def timed_pair(first, second):  # (first s, second s, median ratio, queue held), device time on CUDA
        if cuda:
            return sandwiched_on_device(first, second, repeats)
        return (*_sandwiched(first, second, repeats, device), True)

    print_fn(f"{'case':<18} {'lvl':>3} {'variant':<11} {'frames':>6} {'tokens':>6} {'subject':>7} {'plain ms':>9} "
             f"{'hooked ms':>10} {'time x':>7} {'ext x':>6} {'wall x':>7} {'host +us':>8} {'mem x':>6} "
             f"{'bound':>6} {'time/bound':>10}")
    for model, side, channels, heads, level, layer in CASES:
        side = max(1, side // side_divisor)
        tokens, mask = side * side, subject_mask(side)
        subject = int(mask.sum())
        name = f"{model} {side}x{side} @{channels}"
        torch.manual_seed(0)
        plain_module = MultiHeadSelfAttention(channels, heads).to(device, dtype)
        module = copy.deepcopy(plain_module)  # the same weights; this one carries the hook
        for frames in FRAME_COUNTS:
            hidden = torch.randn(frames, tokens, channels, device=device, dtype=dtype)

            def plain() -> torch.Tensor:
                return plain_module(hidden)

            def hooked() -> torch.Tensor:
                return module(hidden)

            # the ideal: the same module with every row's extended context [own ; peers' subject tokens] given
            peers = [torch.cat([hidden[r]] + [hidden[p][mask.to(device)] for p in range(frames) if p != r])
                     for r in range(frames)]
            context = torch.stack(peers)

            def extended() -> torch.Tensor:
                return plain_module(hidden, context=context)

            with torch.inference_mode():
                plain()  # warm-up
                plain_peak = _peak_bytes(plain, device)
                extended()
                ext_ratio = timed_pair(plain, extended)[2]
                for rfh in (False, True) if level == RFH_LEVEL else (False,):
                    # masks on the CPU, hooks installed once: as in a generation (``story_sync``, the adapters)
                    state = storysync_state(frames, side, level, mask, RFH_STRENGTH if rfh else 0.0)
                    hooks = install_storysync_hooks([(layer, module)], [], state)
                    try:
                        peak = _peak_bytes(hooked, device)  # doubles as the warm-up
                        wall_ratio = _sandwiched(plain, hooked, repeats, device)[2]
                        plain_time, hooked_time, ratio, held = timed_pair(plain, hooked)
                        extra_host = host_seconds(hooked, device, repeats) - host_seconds(plain, device, repeats)
                    finally:
                        remove_hooks(hooks)
                    bound = sharing_bound(frames, subject, tokens)
                    bound += rfh_extra(frames, subject, tokens, channels) if rfh else 0.0
                    worst[rfh] = max(worst[rfh], ratio / bound)
                    if not rfh:
                        worst_wall = max(worst_wall, wall_ratio / bound)
                        worst_over_ideal = max(worst_over_ideal, ratio / ext_ratio)
                    print_fn(f"{name:<18} {level:>3} {'sharing+RFH' if rfh else 'sharing':<11} {frames:>6} "
                             f"{tokens:>6} {subject / tokens:>7.3f} {plain_time * 1e3:>9.3f} "
                             f"{hooked_time * 1e3:>10.3f} {ratio:>7.2f} {ext_ratio:>6.2f} {wall_ratio:>7.2f} "
                             f"{extra_host * 1e6:>8.0f} {peak / plain_peak:>6.2f} {bound:>6.2f} {ratio / bound:>10.2f}"
                             f"{'' if held else '  (queue ran dry: host gaps included)'}")
    return worst[False], worst[True], worst_wall, worst_over_ideal


def run(device: torch.device, dtype: torch.dtype, repeats: int, side_divisor: int,
        print_fn: Callable[[str], None] = print) -> float:
    """The StorySync part of the benchmark: cost model, layer table, summary lines; returns the target figure."""
    print_cost_model(print_fn)
    print_fn(f"StorySync self-attention: plain = the module without hook; hooked = StorySyncSelfAttentionHook "
             f"(masked sharing, + RFH gamma {RFH_STRENGTH} at level {RFH_LEVEL}); subject = m/N (centred square); "
             "bound = 1 + (m/N)(B-1) [+ RFH cosine MACs / plain MACs]")
    worst_sharing, worst_rfh, worst_wall, worst_over_ideal = run_attention(device, dtype, repeats, side_divisor,
                                                                           print_fn)
    print_fn(f"storysync worst synchronous wall-clock ratio / FLOPs bound (host time included): {worst_wall:.2f}")
    print_fn(f"storysync worst masked-sharing time / time of the module on the ready extended context: "
             f"{worst_over_ideal:.2f}")
    print_fn(f"storysync sharing + RFH worst time ratio / (sharing + RFH FLOPs bound): {worst_rfh:.2f}")
    print_fn(f"storysync worst time ratio / FLOPs bound: {worst_sharing:.2f}")
    return worst_sharing
