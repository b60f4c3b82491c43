"""Consistent self-attention on real torch attention modules: per-generation state and symmetric hooks.

Host contract. A hooked module's forward takes the hidden states as first positional argument and the context
as a keyword: ``context=`` for the WebUIs' ldm/sgm ``CrossAttention`` (hosts.md §3.1), ``encoder_hidden_states=``
for diffusers' ``Attention``. A self-attention call has that keyword None; the hook then calls the module's own
forward with ``context = [own tokens ; peer or bank tokens]`` (hosts.md §3.2 (c)), once per context length, so the
user's kernel (whatever the class forward is at call time, or a previous instance wrapper) still does the attention.

The hook is an instance-level ``forward`` (hosts.md §3.4: a computation split into several calls cannot be a
pre-hook). ``remove()`` restores exactly what was there before (another extension's instance wrapper, or nothing);
when yet another wrapper was put on top of ours, ours cannot be unwrapped and retires into a pure pass-through.
Callers install inside try/finally (style.md §5.8); ``remove_stale_hooks`` sweeps leftovers of a crashed run.

Every hook carries the generation's ``ConsistencyState`` and passes straight through when the state is disabled or
closed (stale), the row layout is unknown or does not match the call, the layer is not selected, the rate gives no
tokens, no step is set or the schedule skips this (step, layer).
"""
from __future__ import annotations

import enum
import re
from typing import Iterable, Mapping

import torch

from .consistent_self_attention import (ContextGroup, CsaSettings, LayerAddress, SharingPlan, StepKey,
                                        attend_in_groups, contexts_with_row_extras, in_batch_contexts,
                                        layer_is_selected, layer_key, plan_in_batch_sharing, sample_token_indices,
                                        sampled_token_count, share_at_step, stable_seed)
from .reach import CSA, Reach
from .reference_bank import ReferenceBank, read_extras, write_reference_rows
from .row_layout import UNKNOWN_LAYOUT, RowLayout, token_grid


class BankMode(enum.Enum):
    OFF = "off"  # in-batch sharing only
    WRITE = "write"  # in-batch sharing; reference frames also store their sampled tokens
    READ = "read"  # frames read the bank of the reference frames instead of sharing with batch mates


class ConsistencyState:
    """Everything one generation's CSA hooks need (style.md §5.5: explicit state, no module globals).

    The adapter sets ``layout`` / ``latent_hw`` per UNet call (``begin_unet_call``), the step per denoiser call
    (``begin_step``), ``bank_mode`` per batch, and calls ``close()`` when the generation ends.
    """

    def __init__(self, settings: CsaSettings, run_seed: int, frame_groups: Mapping[int, Iterable[str]],
                 bank_mode: BankMode = BankMode.OFF, reference_frames: Iterable[int] = (),
                 bank: ReferenceBank | None = None) -> None:
        self.settings = settings
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
        if count == 0 or not layer_is_selected(settings.layer_policy, layer, grid):
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


class InstanceForwardHook:
    """Base of our instance-level ``forward`` wrappers: symmetric install/remove, pass-through once retired.

    Subclasses implement ``__call__``, start it with ``self._entered()`` and call ``_inner_forward`` for the computation
    they leave to the host. ``reach`` (set by ``install_hooks``) learns that the hook ran (``reach.py``).
    """

    surfaces: tuple[str, ...] = ()  # the reach.py surfaces this hook carries

    def __init__(self, module: torch.nn.Module, layer: LayerAddress, state: object,
                 context_kwarg: str = "context") -> None:
        self.module = module
        self.layer = layer
        self.state = state  # the generation's state object; the hook passes through once it is closed
        self.context_kwarg = context_kwarg  # "context" (ldm/sgm) or "encoder_hidden_states" (diffusers)
        self.retired = False  # True once removed: a retired hook only ever passes through
        self._previous = None  # the instance forward that was there before us, if any
        self.reach = None  # a ``Reach`` told of every call while installed, if the host checks it

    def _entered(self) -> None:
        if self.reach is not None and not self.retired:
            for surface in self.surfaces:
                self.reach.hit(surface, self.layer)

    def install(self) -> None:
        current = self.module.__dict__.get("forward")
        if self.retired or current is self:
            raise RuntimeError(f"hook for {self.layer} was already installed; build a new one")
        if isinstance(current, type(self)) and not current.retired:
            raise RuntimeError(f"layer {self.layer} already carries a consistent-story {type(self).__name__}")
        self._previous = current
        self.module.forward = self

    def remove(self) -> bool:
        """Undo ``install``; False when another wrapper sits on top (this hook then only passes through)."""
        self.retired = True
        if self.module.__dict__.get("forward") is not self:
            return False
        if self._previous is None:
            del self.module.forward
        else:
            self.module.forward = self._previous
        return True

    def _inner_forward(self, *args, **kwargs):
        if self._previous is not None:
            return self._previous(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)  # the class forward at call time


class ConsistentSelfAttentionHook(InstanceForwardHook):
    """Instance-level ``forward`` of one self-attention module that applies CSA through ``state``."""

    state: ConsistencyState
    surfaces = (CSA,)

    def __call__(self, hidden: torch.Tensor, *args, **kwargs):
        self._entered()
        if self.retired or args or kwargs.get(self.context_kwarg) is not None or hidden.dim() != 3 or any(
                isinstance(value, torch.Tensor) for value in kwargs.values()):
            return self._inner_forward(hidden, *args, **kwargs)  # not a plain self-attention call
        groups = self.state.contexts_for(self.layer, hidden)
        if groups is None:
            return self._inner_forward(hidden, **kwargs)

        def attention(queries_hidden: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
            return self._inner_forward(queries_hidden, **{**kwargs, self.context_kwarg: context})

        return attend_in_groups(attention, hidden, groups)


_LDM_ATTENTION = re.compile(
    r"(?:^|\.)(?:(input|output)_blocks\.(\d+)|(middle)_block)\.1\.transformer_blocks\.(\d+)\.(attn[12])$")


def ldm_layer_address(module_name: str, kind: str = "attn1") -> LayerAddress | None:
    """Shared layer address of an ldm/sgm UNet ``kind`` (attn1 or attn2) module name (hosts.md §3.1), else None.

    ``input_blocks.4.1.transformer_blocks.0.attn1`` -> ("input", 4, 0); ``middle_block.1...`` -> ("middle", 0, j).
    """
    match = _LDM_ATTENTION.search(module_name)
    if match is None or match.group(5) != kind:
        return None
    block, index, middle, transformer, _ = match.groups()
    return (block, int(index), int(transformer)) if middle is None else ("middle", 0, int(transformer))


def install_hooks(layers: Iterable[tuple[LayerAddress, torch.nn.Module]], state: object,
                  context_kwarg: str = "context", hook_class: type[InstanceForwardHook] | None = None,
                  reach: Reach | None = None) -> list[InstanceForwardHook]:
    """Hook every given module (CSA on attn1 by default); on an error, the hooks installed so far are removed
    before re-raising. ``reach``: told of every call of the hooks (the host's check that the methods ran)."""
    hook_class = hook_class or ConsistentSelfAttentionHook
    hooks: list[InstanceForwardHook] = []
    try:
        for layer, module in layers:
            hook = hook_class(module, layer, state, context_kwarg)
            hook.reach = reach
            hook.install()
            hooks.append(hook)
    except Exception:
        remove_hooks(hooks)
        raise
    return hooks


def remove_hooks(hooks: Iterable[InstanceForwardHook]) -> None:
    """Remove in reverse install order (restores nested wrappers exactly)."""
    for hook in reversed(list(hooks)):
        hook.remove()


def remove_stale_hooks(root: torch.nn.Module) -> int:
    """Remove every consistent-story hook found on top of a module under ``root``; returns how many."""
    removed = 0
    for module in root.modules():
        hook = module.__dict__.get("forward")
        while isinstance(hook, InstanceForwardHook):  # hooks of several runs may be stacked
            hook.remove()
            removed += 1
            hook = module.__dict__.get("forward")
    return removed
