"""Base Layout Interpolation (StorySync paper §3.3, Eq. 12; methods.md §5.1 step 4): each row's vanilla
self-attention input at a layer and step, from one of two places.

- Way (a), the pre-pass (the WebUIs' default, ``hosts/prepass.py``): an independent vanilla trajectory with the same
  seeds stopped after the window; ``record_vanilla_inputs`` writes every row's input to the cache and the
  consistent pass reads it back per (layer, step, role, frame).
- Way (b), lock-step (the WebUIs' ``bli_lockstep``, ``hosts/lockstep.py``; the presets bench): the vanilla
  trajectory's rows ride in the story's own calls during the window, each story row's ``RowLayout.twins`` entry
  naming its vanilla row; no cache.

The blend itself, ``X = (1 − λ)·X_consistent + λ·X_vanilla``, is ``torch.lerp`` in ``StorySyncState``.
"""
from __future__ import annotations

import torch

from ..common.addresses import StepKey
from ..common.async_index import index_tensor
from ..common.row_layout import Role, RowLayout
from ..story_diffusion.reference_bank import BankKey, ReferenceBank


def record_vanilla_inputs(cache: ReferenceBank, layout: RowLayout, key: str, step: StepKey,
                          hidden: torch.Tensor) -> None:
    """Way (a), in the pre-pass: every row's input ``hidden`` [R, N, C] under (layer key, step, role, frame)."""
    for row, (frame, role) in enumerate(zip(layout.frames, layout.roles)):
        cache.write(BankKey(key, step, role, frame), hidden[row])


def vanilla_inputs(cache: ReferenceBank, layout: RowLayout, key: str, step: StepKey,
                   hidden: torch.Tensor) -> torch.Tensor | None:
    """Every row's vanilla input [R, N, C]: with twins in the layout (way (b)) the twin rows of ``hidden`` (a twin
    row and other OTHER rows: themselves, which the blend leaves as they are); else the pre-pass's cache, None (no
    BLI in this call) when it lacks a row. A story row without a twin in a twinned call is an error: never a silently
    unblended frame."""
    if layout.twins is not None:
        missing = [r for r, t in enumerate(layout.twins) if t < 0 and layout.roles[r] is not Role.OTHER]
        if missing:
            raise RuntimeError(f"StorySync BLI in lock-step: rows {missing} have no vanilla row in this call")
        index = [t if t >= 0 else r for r, t in enumerate(layout.twins)]
        return hidden.index_select(0, index_tensor(index, hidden.device))
    rows = []
    for frame, role in zip(layout.frames, layout.roles):
        entry = cache.read(BankKey(key, step, role, frame), hidden.device, hidden.dtype)
        if entry is None or entry.shape != hidden.shape[1:]:
            return None  # no vanilla input for this step (e.g. other steps or size): no BLI
        rows.append(entry)
    return torch.stack(rows)
