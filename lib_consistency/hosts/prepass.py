"""StorySync's vanilla pre-pass for Base Layout Interpolation, run through the host's own sampler (both hosts).

Paper: StorySync §3.3, Eq. 12 (methods.md §5.1 step 4, implementation (a)): an independent vanilla trajectory with
the same seeds, conditioning and sampler, stopped after the BLI window; its self-attention inputs are recorded and
its latents discarded. It is the host's own ``p.sample`` called once more before the real one, with the StorySync
state in ``Phase.VANILLA`` (IPCA and sharing off; the state raises ``PrePassDone`` at the first self-attention
after the window).

Host contract (A1111 1.10 ``modules/processing.py``, ``sd_samplers_common.py``; Forge the same): ``p.rng`` is the
``ImageRNG`` made for this batch just before ``p.sample`` and every noise draw of the sampler comes from it, so the
pre-pass runs on a twin built from the same seeds and the real ``p.rng`` is untouched; ``shared.total_tqdm`` and
``shared.state`` carry the progress, so they are silenced and restored. The torch RNG states are restored as well.
Afterwards the real sampling sees exactly what it would have seen without the pre-pass. Other scripts'
``process_before_every_sampling`` runs once more for the pre-pass (documented in the README).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from modules import rng, shared

from ..story.run import record_bli_window
from ..story_sync.state import StorySyncState

_STATE_FIELDS = ("sampling_step", "sampling_steps", "current_latent", "current_image_sampling_step")


class _SilentProgress:
    """Stands in for ``shared.total_tqdm`` during the pre-pass."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def _host_untouched(p):
    saved_rng, torch_state = p.rng, torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    saved_state = {name: getattr(shared.state, name, None) for name in _STATE_FIELDS}
    saved_tqdm = getattr(shared, "total_tqdm", None)
    p.rng = rng.ImageRNG(saved_rng.shape, saved_rng.seeds, subseeds=saved_rng.subseeds,
                         subseed_strength=saved_rng.subseed_strength,
                         seed_resize_from_h=saved_rng.seed_resize_from_h,
                         seed_resize_from_w=saved_rng.seed_resize_from_w)
    shared.total_tqdm = _SilentProgress()
    try:
        yield
    finally:
        p.rng = saved_rng
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        for name, value in saved_state.items():
            setattr(shared.state, name, value)
        shared.total_tqdm = saved_tqdm


def wants_prepass(p, state: StorySyncState | None) -> bool:
    """BLI needs a pre-pass: StorySync with a BLI window and strength, and a first pass sampled from noise."""
    return (state is not None and state.settings.bli_strength > 0 and state.settings.bli_window > 0
            and getattr(p, "rng", None) is not None and getattr(p, "firstpass_image", None) is None)


def run_vanilla_prepass(p, state: StorySyncState, sample: Callable[[], object], ipca=None) -> None:
    """Record the BLI window's self-attention inputs with one vanilla run of ``sample`` (the host's sampling)."""
    def untouched_sample() -> None:
        with _host_untouched(p):
            sample()

    record_bli_window(state, untouched_sample, ipca)
