"""StoryDiffusion consistent self-attention (CSA), host-free.

Method: Zhou et al., "StoryDiffusion: Consistent Self-Attention for Long-Range Image and Video Generation"
(arXiv 2405.01434), §3.1; methods.md §3. Each frame keeps ALL its own tokens and additionally attends to a fixed
number m = round(rate·N) of tokens sampled (without replacement) from every peer frame of the same CFG role:
``O_i = Attn(Q(X_i), K([X_i ; S_i]), V([X_i ; S_i]))``. Cond rows share with cond rows, uncond with uncond, never
across roles; role OTHER never shares.

Form (hosts.md §15.5 decision 2): "extend the context". The host's own self-attention module is called with its
own hidden states as query input and ``context = [own tokens ; sampled peer tokens]``, so the host kernel (SDPA,
xformers, sub-quadratic, ...) does the work and no N×N mask exists. Rows with different peer counts need contexts of
different lengths, so rows are grouped by context length: one attention call per group (one call when all frames
share, the common case).

Character groups: frames share only when their character sets intersect; an empty set (``[NC]`` frames) or a
frame missing from the mapping shares with nobody.

Layers (methods.md §3.2) are addressed as (block, index, transformer) with block "input" | "middle" | "output"
(hosts.md §3.1) and sized by their token grid relative to the image (latent = image/8, level l = image/(8·2^l)):
- "up_low_res" (default): output-block self-attention at image/32 and image/16 (levels 2 and 1). On SDXL that is
  output_blocks 0-5, the official 36 layers (diffusers up_blocks.0/1). On SD1.5 — our choice — output_blocks 3-8;
  output_blocks 9-11 at image/8 are skipped: 4096 tokens per frame at 512², costly and not in the official set.
- "up": every output-block self-attention; "all": every self-attention layer.
On a diffusion transformer (``DitDepth``; one token grid, so no resolutions) — our choice — "up_low_res" and "up"
select the blocks of the second half of the depth (Flux.1: single-stream blocks 10-37, the "decoder" half that the
UNet's up blocks correspond to); "all" every double- and single-stream block.

Schedule (methods.md §3.5, generalised from "step < 20 of 50"): "official" = plain attention at the first step of a
pass, then skip sharing with probability 0.3 while step < 40 % of the pass's steps and 0.1 afterwards; "always" =
share at every step, the first included. Every random choice (the skip coin per (step, layer), the token indices
per (step, layer, frame)) comes from a stable hash of (run seed, step key, layer key[, frame]) — never from counting
calls — so call order, split CFG calls and batch composition do not change a frame's sample.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from ..common.addresses import DIT_BLOCKS, DitDepth, LayerAddress, stable_seed
from ..common.async_index import device_index, index_tensor
from ..common.row_layout import Role, RowLayout, TokenGrid

FrameGroups = Mapping[int, frozenset[str]]  # frame index -> characters in that frame
SHARING_ROLES = frozenset({Role.COND, Role.UNCOND})
LOW_RES_LEVELS = frozenset({1, 2})  # latent/2 = image/16 and latent/4 = image/32


class Schedule(str, enum.Enum):
    OFFICIAL = "official"
    ALWAYS = "always"


class LayerPolicy(str, enum.Enum):
    UP_LOW_RES = "up_low_res"
    UP = "up"
    ALL = "all"


@dataclass(frozen=True)
class CsaSettings:
    """User-facing CSA settings; strings are accepted for the enums (UI, infotext, API)."""

    rate: float = 0.5  # sampling rate r in [0, 1]: m = round(r·N) tokens per peer frame
    schedule: Schedule = Schedule.OFFICIAL
    layer_policy: LayerPolicy = LayerPolicy.UP_LOW_RES

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"CsaSettings.rate must be in [0, 1], got {self.rate}")
        for name, kind in (("schedule", Schedule), ("layer_policy", LayerPolicy)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, kind(value))
            except ValueError:
                allowed = ", ".join(item.value for item in kind)
                raise ValueError(f"CsaSettings.{name} must be one of {allowed}, got {value!r}") from None


DIT_SHARED_FROM = 0.5  # "up" on a transformer: blocks from half the depth on (our choice)


def layer_is_selected(policy: LayerPolicy, layer: LayerAddress, grid: TokenGrid | None,
                      depth: DitDepth | None = None) -> bool:
    """Whether CSA runs on this self-attention layer; ``grid`` None (size unknown) fails "up_low_res".
    Transformer blocks ("double" / "single") need the model's ``depth``."""
    if policy is LayerPolicy.ALL:
        return True
    if layer[0] in DIT_BLOCKS:
        if depth is None:
            raise ValueError(f"layer {layer!r} is a transformer block: its model's depth is needed")
        return depth.position(layer) >= DIT_SHARED_FROM
    if layer[0] != "output":
        return False
    return policy is LayerPolicy.UP or (grid is not None and grid.level in LOW_RES_LEVELS)


def share_at_step(schedule: Schedule, step_index: int, total_steps: int, coin_seed: int) -> bool:
    """The step schedule (methods.md §3.5): False means plain attention for this (step, layer)."""
    if schedule is Schedule.ALWAYS:
        return True
    if step_index == 0:
        return False
    skip_probability = 0.3 if step_index < 0.4 * total_steps else 0.1
    coin = (coin_seed & ((1 << 53) - 1)) / float(1 << 53)  # uniform in [0, 1) from the hash
    return coin >= skip_probability


def sampled_token_count(num_tokens: int, rate: float) -> int:
    return round(rate * num_tokens)


def sample_token_indices(num_tokens: int, count: int, frames: Sequence[int], seed_parts: tuple) -> torch.Tensor:
    """(len(frames), count) int64 CPU tensor: per frame, ``count`` distinct token indices out of ``num_tokens``.

    Frame f's indices come from a generator seeded with ``stable_seed(*seed_parts, f)``, so they do not depend on
    which other frames are in the call. ``count == num_tokens`` gives every token in order (no sampling needed).
    """
    if count == num_tokens:
        return torch.arange(num_tokens).expand(len(frames), num_tokens)
    generator = torch.Generator()
    rows = []
    for frame in frames:
        generator.manual_seed(stable_seed(*seed_parts, frame))
        rows.append(torch.randperm(num_tokens, generator=generator)[:count])
    return torch.stack(rows)


# --------------------------------------------------------------------------------------- who shares with whom


def frames_share(frame_groups: FrameGroups, frame_a: int, frame_b: int) -> bool:
    """Frames share when both are known and have a character in common ([NC] frames share with nobody)."""
    chars_a = frame_groups.get(frame_a)
    chars_b = frame_groups.get(frame_b)
    return bool(chars_a and chars_b and not chars_a.isdisjoint(chars_b))


@dataclass(frozen=True, eq=False)
class RowGroup:
    """Rows of one UNet call that have the same number k of peer rows (so equal context lengths)."""

    rows: tuple[int, ...]
    peers: tuple[tuple[int, ...], ...]  # per row, its k peer rows
    _device_tensors: dict = field(default_factory=dict, init=False, repr=False)

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows (G,), peers (G, k)) as int64 tensors on ``device``, built once per device."""
        cached = self._device_tensors.get(device)
        if cached is None:
            cached = (index_tensor(self.rows, device), device_index(torch.tensor(self.peers, dtype=torch.long), device))
            self._device_tensors[device] = cached
        return cached


@dataclass(frozen=True, eq=False)
class SharingPlan:
    """In-batch sharing of one row layout: row groups by peer count; rows in no group attend plainly."""

    groups: tuple[RowGroup, ...]
    sampled_rows: tuple[int, ...]  # rows whose tokens some other row receives

    @property
    def shares(self) -> bool:
        return bool(self.groups)


def plan_in_batch_sharing(layout: RowLayout, frame_groups: FrameGroups) -> SharingPlan:
    """Peers of every row: rows of the same sharing role whose frame differs and shares a character.

    Generalises the paper's "all other images of the batch" (§3.1) to character groups; the role split follows the
    released code's separate uncond/cond halves (methods.md §3.6).
    """
    frames, roles = layout.frames, layout.roles
    by_peer_count: dict[int, list[tuple[int, tuple[int, ...]]]] = {}
    for row, (frame, role) in enumerate(zip(frames, roles)):
        if role not in SHARING_ROLES:
            continue
        peers = tuple(other for other, (other_frame, other_role) in enumerate(zip(frames, roles))
                      if other_role is role and other_frame != frame
                      and frames_share(frame_groups, frame, other_frame))
        if peers:
            by_peer_count.setdefault(len(peers), []).append((row, peers))
    groups = tuple(RowGroup(tuple(row for row, _ in members), tuple(peers for _, peers in members))
                   for members in by_peer_count.values())
    sampled = sorted({peer for group in groups for peers in group.peers for peer in peers})
    return SharingPlan(groups, tuple(sampled))


# --------------------------------------------------------------------------------------------- contexts


@dataclass(frozen=True)
class ContextGroup:
    """Rows that attend with contexts of one length: ``context`` is (len(rows), N + extra, C); ``visible``
    (len(rows), N + extra) bool on the context's device marks each row's real keys when the rows' contexts were
    padded to one length (StorySync's masked sharing), None when every key is real."""

    rows: tuple[int, ...]
    context: torch.Tensor
    visible: torch.Tensor | None = None


def in_batch_contexts(hidden: torch.Tensor, plan: SharingPlan, token_indices: torch.Tensor) -> list[ContextGroup]:
    """Contexts [own tokens ; sampled tokens of each peer row] for every sharing row, one per row group
    (the K/V source [X_i ; S_i] of arXiv 2405.01434 §3.1).

    hidden: (R, N, C) self-attention input; token_indices: (R, m) int64 on hidden's device, the sampled token
    indices of each row's frame (only rows in ``plan.sampled_rows`` are read). One ``index_select`` per group
    gathers own and peer tokens straight into the context; no intermediate copies, no mask.
    """
    num_rows, num_tokens, channels = hidden.shape
    device = hidden.device
    flat_hidden = hidden.reshape(num_rows * num_tokens, channels)
    row_start = torch.arange(num_rows, device=device).mul_(num_tokens).unsqueeze(1)  # (R, 1)
    own_index = row_start + torch.arange(num_tokens, device=device)  # (R, N) flat index of every own token
    sampled_index = row_start + token_indices  # (R, m) flat index of every sampled token
    contexts = []
    for group in plan.groups:
        rows, peers = group.tensors(device)
        index = torch.cat((own_index[rows], sampled_index[peers].flatten(1)), dim=1)  # (G, N + k·m)
        context = flat_hidden.index_select(0, index.flatten()).view(len(group.rows), -1, channels)
        contexts.append(ContextGroup(group.rows, context))
    return contexts


def contexts_with_row_extras(hidden: torch.Tensor, extras: Sequence[torch.Tensor | None]) -> list[ContextGroup]:
    """Contexts [own tokens ; extras[r]] grouped by extra length; rows with ``None`` get no context.

    hidden: (R, N, C); extras[r]: (L_r, C) on hidden's device and dtype (bank tokens in read mode).
    """
    by_length: dict[int, list[int]] = {}
    for row, extra in enumerate(extras):
        if extra is not None and extra.shape[0] > 0:
            by_length.setdefault(extra.shape[0], []).append(row)
    groups = []
    for rows in by_length.values():
        own = hidden.index_select(0, index_tensor(rows, hidden.device)) if len(rows) < hidden.shape[0] else hidden
        context = torch.cat((own, torch.stack([extras[row] for row in rows])), dim=1)
        groups.append(ContextGroup(tuple(rows), context))
    return groups


# (queries' hidden, context[, visible]) -> out; ``visible`` (rows, L) bool is passed only for padded contexts
Attention = Callable[..., torch.Tensor]


def whole_batch_context(groups: Sequence[ContextGroup], num_rows: int) -> torch.Tensor | None:
    """The single unpadded context when one group covers every row in order (what a Forge ``attn1_patch`` can
    return as its longer context), else None."""
    if len(groups) == 1 and groups[0].rows == tuple(range(num_rows)) and groups[0].visible is None:
        return groups[0].context
    return None


def _call(attention: Attention, hidden: torch.Tensor, group: ContextGroup | None) -> torch.Tensor:
    if group is None:
        return attention(hidden, None)
    if group.visible is None:
        return attention(hidden, group.context)
    return attention(hidden, group.context, group.visible)


def attend_in_groups(attention: Attention, hidden: torch.Tensor, groups: Sequence[ContextGroup]) -> torch.Tensor:
    """Run ``attention(hidden[rows], context)`` once per group (``attention(hidden[rows], context, visible)`` for a
    padded group) and once (context None) for the remaining rows.

    hidden: (R, N, C) -> (R, N, C_out). One group covering every row in order is a single direct call.
    """
    num_rows = hidden.shape[0]
    if len(groups) == 1 and groups[0].rows == tuple(range(num_rows)):
        return _call(attention, hidden, groups[0])
    covered = {row for group in groups for row in group.rows}
    plain_rows = tuple(row for row in range(num_rows) if row not in covered)
    calls = [(group.rows, group) for group in groups]
    if plain_rows:
        calls.append((plain_rows, None))
    # every call's row index in one asynchronous copy
    indices = index_tensor([row for rows, _ in calls for row in rows], hidden.device).split(
        [len(rows) for rows, _ in calls])
    output = None
    for (rows, group), index in zip(calls, indices):
        result = _call(attention, hidden.index_select(0, index), group)
        if output is None:
            output = result.new_empty((num_rows,) + tuple(result.shape[1:]))
        output.index_copy_(0, index, result)
    return output
