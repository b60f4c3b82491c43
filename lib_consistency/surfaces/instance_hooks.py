"""Instance-level ``forward`` hooks on torch modules: the mechanism of the module-hook surface (A1111, diffusers).

The hook is an instance-level ``forward`` (hosts.md §3.4: a computation split into several calls cannot be a
pre-hook). ``remove()`` restores exactly what was there before (another extension's instance wrapper, or nothing);
when yet another wrapper was put on top of ours, ours cannot be unwrapped and retires into a pure pass-through.
Callers install inside try/finally (style.md §5.8); ``remove_stale_hooks`` sweeps leftovers of a crashed run.
``ldm_layer_address`` names an ldm/sgm attention module by the shared layer address (hosts.md §3.1). What each hook
does to its module's calls is in ``attention_modules``.
"""
from __future__ import annotations

import re
from typing import Iterable

import torch

from ..common.addresses import LayerAddress
from .reach import Reach


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
                  hook_class: type[InstanceForwardHook], context_kwarg: str = "context",
                  reach: Reach | None = None) -> list[InstanceForwardHook]:
    """Put a ``hook_class`` over every given module; on an error, the hooks installed so far are removed before
    re-raising. ``reach``: told of every call of the hooks (the host's check that the methods ran)."""
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
