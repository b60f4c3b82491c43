"""``python -m lib_consistency.bench --only presets --profile``: where each row's time goes (issue 23, part 6).

One more generation of every row of the presets table runs under ``torch.profiler`` with named ranges:

- ``UNet call`` around every UNet call (the UNet module's forward pre/post hooks), ``attn1`` and ``attn2`` around
  every self- and cross-attention module of the UNet (the methods' hooks run inside them);
- ``BLI pre-pass`` around StorySync's pre-pass (``presets.generate``);
- the methods' own work, by wrapping their state's methods for the run: StorySync ``subject maps``
  (``add_maps``), ``masks`` (``_finalize_masks``: averaging, Otsu, the masks' one trip to the CPU), ``sharing plan``
  (``_sharing_plan``), ``RFH`` (``harmonize_output``); StoryDiffusion ``CSA contexts`` (``contexts_for``).

Each range's figures are inclusive: calls, host (CPU) seconds, and on CUDA device seconds (the kernels launched
inside it); ``other`` is the generation's wall time outside the UNet calls (the sampler loop, SVR, OneActor's
guidance). On CUDA ``device busy`` = the kernels' summed time / the wall time: well under 1 means the GPU waits for
the host. Times under the profiler are longer than the table's; compare rows with each other. Every wrapper and hook
is removed afterwards (``labelled``).
"""
from __future__ import annotations

import contextlib
import functools
import time
from typing import Callable, Iterator

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from ..story_diffusion.state import ConsistencyState
from ..story_sync.state import StorySyncState

PREFIX = "consistent-story/"
PREPASS_LABEL = "BLI pre-pass"
PREPASS = PREFIX + PREPASS_LABEL
MODULE_RANGES = ("UNet call", "attn1", "attn2")
INTERNALS = ((StorySyncState, "add_maps", "subject maps"), (StorySyncState, "_finalize_masks", "masks"),
             (StorySyncState, "_sharing_plan", "sharing plan"), (StorySyncState, "harmonize_output", "RFH"),
             (ConsistencyState, "contexts_for", "CSA contexts"))
LABELS = (PREPASS_LABEL,) + MODULE_RANGES + tuple(label for _, _, label in INTERNALS)


def _ranged(function: Callable, label: str) -> Callable:
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with record_function(PREFIX + label):
            return function(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def labelled(unet: torch.nn.Module, attn1: list, attn2: list) -> Iterator[None]:
    """The module ranges (forward pre/post hooks) and the wrapped state methods, removed on leaving."""
    handles, open_ranges, patched = [], [], []

    def enter(label: str):
        def hook(module, args):
            scope = record_function(PREFIX + label)
            scope.__enter__()
            open_ranges.append(scope)
        return hook

    def leave(module, args, output):  # also when the forward raised (the pre-pass stops with PrePassDone)
        open_ranges.pop().__exit__(None, None, None)

    try:
        for label, modules in zip(MODULE_RANGES, ([unet], [m for _, m in attn1], [m for _, m in attn2])):
            for module in modules:
                handles.append(module.register_forward_pre_hook(enter(label)))
                handles.append(module.register_forward_hook(leave, always_call=True))
        for owner, name, label in INTERNALS:
            original = owner.__dict__[name]
            patched.append((owner, name, original))
            setattr(owner, name, _ranged(original, label))
        yield
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)
        for handle in handles:
            handle.remove()
        while open_ranges:  # only if a hook of another kind failed in between
            open_ranges.pop().__exit__(None, None, None)


def profile_generation(inputs, run: Callable[[], object]) -> dict:
    """``run`` (one generation on ``inputs``, a ``presets_inputs.Inputs``) under the profiler: ``{label: (calls, host s,
    device s)}``, ``wall`` seconds, ``other`` (wall − UNet host time) and ``busy`` (CUDA only, else None)."""
    cuda = inputs.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with labelled(inputs.unet, inputs.attn1, inputs.attn2), profile(activities=activities) as prof:
        if cuda:
            torch.cuda.synchronize(inputs.device)
        began = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize(inputs.device)
        wall = time.perf_counter() - began
    ranges = {}
    for average in prof.key_averages():
        if average.key.startswith(PREFIX):
            ranges[average.key.removeprefix(PREFIX)] = (
                average.count, average.cpu_time_total / 1e6, getattr(average, "device_time_total", 0) / 1e6)
    busy = None
    if cuda:
        kernels = sum(event.device_time_total for event in prof.events()
                      if event.device_type != DeviceType.CPU and not event.name.startswith(PREFIX))
        busy = kernels / 1e6 / wall
    unet = ranges.get("UNet call", (0, 0.0, 0.0))[1]
    return {"ranges": ranges, "wall": wall, "other": wall - unet, "busy": busy}


def print_profiles(profiles: dict, print_fn: Callable[[str], None]) -> None:
    """One line per row: wall, then each range that ran (calls, host s, device s where measured)."""
    print_fn("profile (one more generation per row under torch.profiler; inclusive host s, device s on CUDA):")
    for (name, batch), figures in profiles.items():
        parts = [f"wall {figures['wall']:.3f} s"]
        for label in LABELS:
            if label in figures["ranges"]:
                calls, host, device = figures["ranges"][label]
                parts.append(f"{label} {calls}x {host:.3f}" + (f"/{device:.3f}" if figures["busy"] is not None
                                                               else ""))
        parts.append(f"other {figures['other']:.3f}")
        if figures["busy"] is not None:
            parts.append(f"device busy {figures['busy']:.2f}")
        print_fn(f"  {name} (batch {batch}): " + ", ".join(parts))
