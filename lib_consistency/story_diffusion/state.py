"""StoryDiffusion's per-generation state: which tokens each self-attention call shares, and the reference bank.

``ConsistencyState.contexts_for`` is what every surface calls (``surfaces/``): given one self-attention call's rows
it returns the shared-attention contexts (paper §3.1, methods.md §3), writing or reading the reference bank
(methods.md §3.6) as the batch's ``BankMode`` says. The surface only adapts shapes: module hooks pass the hidden
states, Forge's patches pass the projected ``[k | v]`` rows.
"""
from __future__ import annotations

import enum
from typing import Iterable, Mapping

import torch

from ..common.addresses import DitDepth, LayerAddress, StepKey, layer_key, stable_seed
from ..common.row_layout import UNKNOWN_LAYOUT, RowLayout, token_grid
from .consistent_self_attention import (ContextGroup, CsaSettings, SharingPlan, contexts_with_row_extras,
                                        in_batch_contexts, layer_is_selected, plan_in_batch_sharing,
                                        sample_token_indices, sampled_token_count, share_at_step)
from .reference_bank import ReferenceBank, read_extras, write_reference_rows


class BankMode(enum.Enum):
    OFF = "off"  # in-batch sharing only
    WRITE = "write"  # in-batch sharing; reference frames also store their sampled tokens
    READ = "read"  # frames read the bank of the reference frames instead of sharing with batch mates


class ConsistencyState:
    """Everything one generation's CSA surfaces need (style.md §5.5: explicit state, no module globals).

    The adapter sets ``layout`` / ``latent_hw`` per UNet call (``begin_unet_call``), the step per denoiser call
    (``begin_step``), ``bank_mode`` per batch, and calls ``close()`` when the generation ends.
    """

    def __init__(self, settings: CsaSettings, run_seed: int, frame_groups: Mapping[int, Iterable[str]],
                 bank_mode: BankMode = BankMode.OFF, reference_frames: Iterable[int] = (),
                 bank: ReferenceBank | None = None, depth: DitDepth | None = None) -> None:
        self.settings = settings
        self.depth = depth  # a diffusion transformer's blocks (None: a UNet)
        self.run_seed = int(run_seed)
        if any(isinstance(chars, str) for chars in frame_groups.values()):
            raise ValueError("ConsistencyState.frame_groups: give each frame a set of character names, not a string")
        self.frame_groups = {int(frame): frozenset(chars) for frame, chars in frame_groups.items()}
        self.bank_mode = BankMode(bank_mode)
        self.reference_frames = tuple(sorted(set(reference_frames)))
        self.bank = bank if bank is not None else ReferenceBank()
        self.enabled = True
        self.closed = False
        self.layout: RowLayout = UNKNOWN_LAYOUT
        self.latent_hw: tuple[int, int] | None = None
        self.step: StepKey | None = None
        self.total_steps = 0
        self._plans: dict[RowLayout, SharingPlan] = {}

    def begin_unet_call(self, layout: RowLayout, latent_hw: tuple[int, int] | None) -> None:
        """Rows of the coming UNet call and its latent (H, W) (``x.shape[-2:]`` / ``original_shape[-2:]``)."""
        self.layout = layout
        self.latent_hw = latent_hw

    def begin_step(self, pass_index: int, step_index: int, total_steps: int, sigma: float) -> None:
        """Identity of the coming denoiser call, from the host's step counter and sigma (hosts.md §4.4)."""
        self.step = StepKey(pass_index, step_index, sigma)
        self.total_steps = total_steps

    def close(self) -> None:
        """End of the generation: drop the bank and every cache; hooks still installed become pass-through."""
        self.closed = True
        self.bank.clear()
        self._plans.clear()
        self.layout = UNKNOWN_LAYOUT

    def contexts_for(self, layer: LayerAddress, hidden: torch.Tensor) -> list[ContextGroup] | None:
        """Shared-attention contexts for a self-attention call on ``hidden`` (R, N, C); None = attend plainly.

        In write mode the reference rows' sampled tokens go to the bank as a side effect.
        """
        layout, step = self.layout, self.step
        num_rows, num_tokens, _ = hidden.shape
        if not self.enabled or self.closed or step is None or not layout.matches(num_rows):
            return None
        settings = self.settings
        grid = token_grid(num_tokens, self.latent_hw) if self.latent_hw is not None else None
        count = sampled_token_count(num_tokens, settings.rate)
        if count == 0 or not layer_is_selected(settings.layer_policy, layer, grid, self.depth):
            return None
        key = layer_key(layer)
        if not share_at_step(settings.schedule, step.step_index, self.total_steps,
                             stable_seed(self.run_seed, step, key, "share")):
            return None
        if self.bank_mode is BankMode.READ:
            extras = read_extras(self.bank, layout, self.reference_frames, self.frame_groups, key, step,
                                 hidden.device, hidden.dtype)
            return contexts_with_row_extras(hidden, extras) or None
        plan = self._plans.get(layout)
        if plan is None:
            plan = self._plans[layout] = plan_in_batch_sharing(layout, self.frame_groups)
        writing = self.bank_mode is BankMode.WRITE and any(f in self.reference_frames for f in layout.frames)
        if not (plan.shares or writing):
            return None
        frames = sorted({layout.frames[row] for row in plan.sampled_rows}
                        | ({f for f in layout.frames if f in self.reference_frames} if writing else set()))
        per_frame = sample_token_indices(num_tokens, count, frames, (self.run_seed, step, key))
        slot = {frame: i for i, frame in enumerate(frames)}
        rows_to_slots = torch.tensor([slot.get(frame, 0) for frame in layout.frames])
        token_indices = per_frame[rows_to_slots].to(hidden.device)  # (R, m): each row's frame's sample
        if writing:
            sampled = hidden.gather(1, token_indices.unsqueeze(-1).expand(-1, -1, hidden.shape[2]))
            write_reference_rows(self.bank, layout, self.reference_frames, key, step, sampled)
        return in_batch_contexts(hidden, plan, token_indices) if plan.shares else None

    def __repr__(self) -> str:
        return (f"ConsistencyState(settings={self.settings}, run_seed={self.run_seed}, enabled={self.enabled}, "
                f"closed={self.closed}, bank_mode={self.bank_mode.value}, reference_frames={self.reference_frames}, "
                f"layout_rows={self.layout.num_rows if self.layout.known else 'unknown'}, "
                f"latent_hw={self.latent_hw}, step={self.step}, total_steps={self.total_steps}, bank={self.bank!r})")
