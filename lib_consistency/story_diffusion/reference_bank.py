"""Reference bank: StoryDiffusion's identity frames -> read mode, for stories longer than one batch.

Method (methods.md §3.4, arXiv 2405.01434 §3.1): the reference (identity) frames are generated first with in-batch
consistent self-attention and, at every shared (layer, step), WRITE the tokens they offer their peers (the sampled
pre-projection hidden states). Frames of later batches READ them: a read frame's context is its own tokens plus the
bank tokens of every reference frame it shares a character with, instead of tokens of its batch mates.

Keys (hosts.md §4.4, methods.md §9): (layer key, StepKey, role, frame). StepKey carries the pass index (the hires
pass has other token counts), the sampler step and the sigma (second-order/SDE samplers evaluate the UNet more than
once per step), never a call count. The read batch therefore finds entries only when it runs the same steps,
sampler schedule and size; otherwise it falls back to plain attention for the missing (layer, step).

Memory (methods.md §3.6): ≈ 2 roles × reference frames × shared steps × Σ_layers m·C elements; GBs on SDXL.
``offload_to_cpu`` keeps entries in CPU memory and moves them to the compute device on read. ``clear()`` at the end of
every generation leaves nothing held.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence

import torch

from ..common.addresses import StepKey
from ..common.row_layout import Role, RowLayout
from .consistent_self_attention import SHARING_ROLES, FrameGroups, frames_share


class BankKey(NamedTuple):
    layer: str  # layer_key(address)
    step: StepKey
    role: Role
    frame: int


class ReferenceBank:
    """Sampled tokens of reference frames, (m, C) per BankKey, with exact byte accounting."""

    def __init__(self, offload_to_cpu: bool = False) -> None:
        self.offload_to_cpu = offload_to_cpu
        self._entries: dict[BankKey, torch.Tensor] = {}
        self._bytes_held = 0

    @property
    def bytes_held(self) -> int:
        """Bytes of all stored tensors (each entry owns its storage)."""
        return self._bytes_held

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: BankKey) -> bool:
        return key in self._entries

    def keys(self) -> Iterator[BankKey]:
        return iter(self._entries)

    def write(self, key: BankKey, tokens: torch.Tensor) -> None:
        """Store ``tokens`` (m, C) under ``key``, replacing an older entry; the bank keeps its own copy."""
        tokens = tokens.detach()
        stored = tokens.to("cpu", copy=True) if self.offload_to_cpu else tokens.clone(
            memory_format=torch.contiguous_format)
        self._discard(key)
        self._entries[key] = stored
        self._bytes_held += stored.numel() * stored.element_size()

    def read(self, key: BankKey, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """The entry on ``device`` in ``dtype`` (a copy only when it has to move), or None."""
        stored = self._entries.get(key)
        return None if stored is None else stored.to(device=device, dtype=dtype)

    def clear(self) -> None:
        self._entries.clear()
        self._bytes_held = 0

    def _discard(self, key: BankKey) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes_held -= old.numel() * old.element_size()

    def __repr__(self) -> str:
        shapes = sorted({tuple(t.shape) for t in self._entries.values()})
        return (f"ReferenceBank(entries={len(self._entries)}, bytes_held={self._bytes_held}, "
                f"offload_to_cpu={self.offload_to_cpu}, shapes={shapes})")


def write_reference_rows(bank: ReferenceBank, layout: RowLayout, reference_frames: Sequence[int],
                         layer: str, step: StepKey, sampled_tokens: torch.Tensor) -> None:
    """Write the sampled tokens of every cond/uncond row of a reference frame.

    sampled_tokens: (R, m, C), row r = the tokens row r offers its peers (hidden[r, indices of its frame]).
    """
    for row, (frame, role) in enumerate(zip(layout.frames, layout.roles)):
        if frame in reference_frames and role in SHARING_ROLES:
            bank.write(BankKey(layer, step, role, frame), sampled_tokens[row])


def read_extras(bank: ReferenceBank, layout: RowLayout, reference_frames: Sequence[int], frame_groups: FrameGroups,
                layer: str, step: StepKey, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor | None]:
    """Per row, the bank tokens it reads: entries of the reference frames sharing a character with its frame
    (same role, in the order of ``reference_frames``) concatenated to (L, C); None when there are none.

    Rows of reference frames themselves, role OTHER and [NC] frames read nothing.
    """
    extras: list[torch.Tensor | None] = []
    cache: dict[tuple[Role, tuple[int, ...]], torch.Tensor | None] = {}
    for frame, role in zip(layout.frames, layout.roles):
        if role not in SHARING_ROLES or frame in reference_frames:
            extras.append(None)
            continue
        sources = tuple(ref for ref in reference_frames if frames_share(frame_groups, frame, ref))
        if (role, sources) not in cache:
            parts = [bank.read(BankKey(layer, step, role, ref), device, dtype) for ref in sources]
            parts = [part for part in parts if part is not None]
            cache[(role, sources)] = torch.cat(parts) if parts else None
        extras.append(cache[(role, sources)])
    return extras
