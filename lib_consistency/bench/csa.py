"""``python -m lib_consistency.bench --only csa``: one consistent self-attention layer against plain attention.

Times the real path — ``ConsistencyState`` + ``ConsistentSelfAttentionHook`` on an ldm-style multi-head attention
module (q/k/v/out projections around torch SDPA), context extended with the sampled peer tokens — against the
same module attending plainly. B frames of one role all share (one character), schedule "always".

Cost model: each frame attends N·(1 + r·(B−1)) keys instead of N, so attention and K/V projections grow by at most
the FLOPs bound ``1 + r·(B−1)`` (Q and output projections do not grow). Printed per case: time ratio, peak-memory
ratio and the bound. The last line is the largest time ratio divided by its bound over all cases.

Timing (CUDA events on CUDA, ``time.perf_counter`` on CPU; ``sandwiched_on_device`` times GPU work alone, for the
StorySync part): plain and shared runs alternate, p0 s0 p1 s1 ... p_n;
the time ratio is the median over i of s_i / mean(p_i, p_i+1), so drift and contention from other processes on a
shared machine hit both sides of every ratio. The CPU default halves every
token-grid side (a quarter of the tokens) so the run fits in about 2 minutes on 2 cores; ``--side-divisor 1`` runs
the listed sizes (SD1.5 64x64 @320, SDXL 32x32 @1280 and 64x64 @640).
Memory: CUDA ``max_memory_allocated`` above the inputs; CPU: peak bytes of tensor storages created by aten ops
during the call (a TorchDispatchMode ledger; scratch buffers inside fused kernels are not seen). The extra peak
over plain attention is compared with what the context-extension form must hold: the extended context
[own ; sampled] (R·(N + k·m)·C), the extra keys and values (2·R·k·m·C) and the int64 gather index
(R·(N + k·m)), k = B − 1 peers, m = round(r·N). A ratio near or below 1 means no memory beyond those.
"""
from __future__ import annotations

import statistics
import time
import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..common.row_layout import Role, RowLayout
from ..story_diffusion.consistent_self_attention import CsaSettings
from ..story_diffusion.state import ConsistencyState
from ..surfaces.attention_modules import install_csa_hooks
from ..surfaces.instance_hooks import remove_hooks

# (model, token-grid side, channels, heads): SD1.5 has 8 heads, SDXL 64-dim heads.
CASES = (("SD1.5", 64, 320, 8), ("SDXL", 32, 1280, 20), ("SDXL", 64, 640, 10))
FRAME_COUNTS = (2, 4, 8)
RATES = (0.25, 0.5, 1.0)


class MultiHeadSelfAttention(torch.nn.Module):
    """ldm/sgm-style attention: ``forward(x, context=None)``; keys and values come from ``context`` or ``x``."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = torch.nn.Linear(channels, channels, bias=False)
        self.to_k = torch.nn.Linear(channels, channels, bias=False)
        self.to_v = torch.nn.Linear(channels, channels, bias=False)
        self.to_out = torch.nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (R, N, C), context: (R, L, C) or None -> (R, N, C)."""
        context = x if context is None else context
        rows, _, channels = x.shape

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(rows, -1, self.heads, channels // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split_heads(self.to_q(x)), split_heads(self.to_k(context)),
                                             split_heads(self.to_v(context)))
        return self.to_out(out.transpose(1, 2).reshape(rows, -1, channels))


class _StorageLedger(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the mode (CPU peak-memory accounting)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage pointer -> [live tensors, bytes]
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        aliases = any(ret.alias_info is not None for ret in func._schema.returns)
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor, aliases)
        return out

    def _track(self, tensor: torch.Tensor, aliases: bool) -> None:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        entry = self.live.get(pointer)
        if entry is None:
            if aliases or pointer == 0:
                return  # a view or in-place result of a tensor made outside the call
            entry = self.live[pointer] = [0, storage.nbytes()]
            self.current += entry[1]
            self.peak = max(self.peak, self.current)
        entry[0] += 1
        weakref.finalize(tensor, self._release, pointer)

    def _release(self, pointer: int) -> None:
        entry = self.live[pointer]
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.live[pointer]


def _seconds(call: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        stop.record()
        torch.cuda.synchronize()
        return start.elapsed_time(stop) / 1000.0
    began = time.perf_counter()
    call()
    return time.perf_counter() - began


_CYCLES: float | None = None  # GPU sleep cycles per second, calibrated on first use


def _sleep_cycles_per_second() -> float:
    """GPU clock cycles per second of ``torch.cuda._sleep`` (calibrated once with CUDA events)."""
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    torch.cuda._sleep(10_000_000)
    stop.record()
    torch.cuda.synchronize()
    return 10_000_000 / (start.elapsed_time(stop) / 1000.0)


def _queued_seconds(call: Callable[[], object], calls: int, host_seconds: float) -> tuple[float, bool]:
    """GPU time of one ``call`` with the host out of the way: (seconds per call, whether the queue held).

    The GPU first sleeps for 2·calls·host_seconds + 5 ms while the host queues ``calls`` calls behind it; CUDA
    events around the calls then time the GPU's own work (kernels and their gaps on the device), not the host's
    Python between launches. This is how a layer costs inside a UNet whose queue runs ahead of the host, and it
    holds only for a call that never synchronises (an index copied from pageable memory, ``.item()``, a boolean
    mask index would make the host wait for the sleep). ``held`` is False when the host was still queueing after
    the sleep ended (its real length, timed by events around it): then host gaps are in the figure too.
    """
    global _CYCLES
    if _CYCLES is None:
        _CYCLES = _sleep_cycles_per_second()
    sleep = 2 * calls * host_seconds + 0.005
    asleep, start, stop = (torch.cuda.Event(enable_timing=True) for _ in range(3))
    torch.cuda.synchronize()
    asleep.record()
    began = time.perf_counter()
    torch.cuda._sleep(int(sleep * _CYCLES))
    start.record()
    for _ in range(calls):
        call()
    stop.record()
    queued = time.perf_counter() - began
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / 1000.0 / calls, queued < asleep.elapsed_time(start) / 1000.0


def sandwiched_on_device(plain: Callable[[], object], hooked: Callable[[], object], repeats: int,
                         calls: int = 5) -> tuple[float, float, float, bool]:
    """``_sandwiched`` with ``_queued_seconds`` blocks of ``calls`` calls (CUDA only): median plain and hooked GPU
    seconds per call, median ratio, and whether every block's queue held."""
    def wall(call: Callable[[], object]) -> float:  # an upper bound of the host's time per call
        torch.cuda.synchronize()
        began = time.perf_counter()
        call()
        torch.cuda.synchronize()
        return time.perf_counter() - began

    host = {id(plain): wall(plain), id(hooked): wall(hooked)}
    held = True

    def timed(call: Callable[[], object]) -> float:
        nonlocal held
        seconds, ok = _queued_seconds(call, calls, host[id(call)])
        held &= ok
        return seconds

    plain_times = [timed(plain)]
    hooked_times = []
    for _ in range(repeats):
        hooked_times.append(timed(hooked))
        plain_times.append(timed(plain))
    ratios = [s / ((before + after) / 2) for s, before, after in zip(hooked_times, plain_times, plain_times[1:])]
    return statistics.median(plain_times), statistics.median(hooked_times), statistics.median(ratios), held


def _peak_bytes(call: Callable[[], object], device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - base
    with _StorageLedger() as ledger:
        call()
    return ledger.peak


def _shared_call(module: torch.nn.Module, hidden: torch.Tensor, rate: float) -> Callable[[], torch.Tensor]:
    """One hooked forward in which all frames (rows of one role, one character) share."""
    frames = hidden.shape[0]
    state = ConsistencyState(CsaSettings(rate, "always", "all"), run_seed=1,
                             frame_groups={f: {"hero"} for f in range(frames)})
    state.begin_unet_call(RowLayout(tuple(range(frames)), (Role.COND,) * frames), None)
    state.begin_step(pass_index=0, step_index=1, total_steps=30, sigma=1.0)

    def shared() -> torch.Tensor:
        hooks = install_csa_hooks([(("output", 3, 0), module)], state)
        try:
            return module(hidden)
        finally:
            remove_hooks(hooks)

    return shared


def _sandwiched(plain: Callable[[], object], shared: Callable[[], object], repeats: int,
                device: torch.device) -> tuple[float, float, float]:
    """Median plain time, median shared time and median of the ratios shared_i / mean(plain_i, plain_i+1).

    Runs alternate p0 s0 p1 s1 ... p_n: each shared run is compared with the plain runs just before and after it,
    so drift and contention from other processes hit both sides of every ratio.
    """
    plain_times = [_seconds(plain, device)]
    shared_times = []
    for _ in range(repeats):
        shared_times.append(_seconds(shared, device))
        plain_times.append(_seconds(plain, device))
    ratios = [s / ((before + after) / 2) for s, before, after in zip(shared_times, plain_times, plain_times[1:])]
    return statistics.median(plain_times), statistics.median(shared_times), statistics.median(ratios)


def expected_extra_bytes(frames: int, tokens: int, channels: int, rate: float, element_size: int) -> int:
    """Bytes the extended-context form needs beyond plain attention: context, extra K/V, gather index."""
    extra_tokens = (frames - 1) * round(rate * tokens)
    context = frames * (tokens + extra_tokens) * channels * element_size
    extra_kv = 2 * frames * extra_tokens * channels * element_size
    return context + extra_kv + frames * (tokens + extra_tokens) * 8


def run(device: torch.device, dtype: torch.dtype, repeats: int, side_divisor: int,
        print_fn: Callable[[str], None] = print) -> tuple[float, float]:
    """Run every case, print the table; return the worst time ratio / FLOPs bound and the worst extra memory /
    expected extra memory."""
    worst = worst_memory = 0.0
    print_fn(f"{'case':<18} {'frames':>6} {'rate':>5} {'tokens':>6} {'plain ms':>9} {'shared ms':>10} "
             f"{'time x':>7} {'mem x':>6} {'extra/exp':>9} {'bound':>6} {'time/bound':>10}")
    for model, side, channels, heads in CASES:
        side //= side_divisor
        name = f"{model} {side}x{side} @{channels}"
        torch.manual_seed(0)
        module = MultiHeadSelfAttention(channels, heads).to(device, dtype)
        for frames in FRAME_COUNTS:
            hidden = torch.randn(frames, side * side, channels, device=device, dtype=dtype)

            def plain() -> torch.Tensor:
                return module(hidden)

            with torch.inference_mode():
                plain()  # warm-up
                plain_peak = _peak_bytes(plain, device)
                for rate in RATES:
                    shared = _shared_call(module, hidden, rate)
                    shared_peak = _peak_bytes(shared, device)  # doubles as the warm-up
                    plain_time, shared_time, time_ratio = _sandwiched(plain, shared, repeats, device)
                    bound = 1 + rate * (frames - 1)
                    worst = max(worst, time_ratio / bound)
                    expected = expected_extra_bytes(frames, side * side, channels, rate, hidden.element_size())
                    memory_ratio = (shared_peak - plain_peak) / expected
                    worst_memory = max(worst_memory, memory_ratio)
                    print_fn(f"{name:<18} {frames:>6} {rate:>5.2f} {side * side:>6} {plain_time * 1e3:>9.1f} "
                             f"{shared_time * 1e3:>10.1f} {time_ratio:>7.2f} {shared_peak / plain_peak:>6.2f} "
                             f"{memory_ratio:>9.2f} {bound:>6.2f} {time_ratio / bound:>10.2f}")
    return worst, worst_memory
