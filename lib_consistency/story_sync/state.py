"""StorySync, one generation: the state its attention hooks and patches share (host-free).

Method: StorySync (Gaur et al., arXiv 2508.03735); methods.md §5. One consistent pass, plus (for Base Layout
Interpolation) a vanilla pre-pass over the BLI window run first (``Phase.VANILLA``), or its rows beside the story's.

Per UNet call (the surfaces, ``surfaces/``, set the row layout and latent size per UNet call and the host adapter the
step per denoiser call, from the host, never by counting):
1. Cross-attention (attn2) of the down and middle blocks at ``MASK_LEVEL`` (latent/4: 32² at SDXL 1024², 16² at
   SD1.5 512²; our choice, methods.md §5.2) adds, for the cond rows, each character's subject map (our own softmax
   over the text keys, mean over heads, sum over the character's subject tokens; ``subject_masks``). Before the
   first self-attention that needs them the maps are averaged over those layers and binarised with Otsu (paper
   Eqs. 2-4): current step only, no history. A call without cond rows (an uncond-only chunk) uses each frame's
   latest masks (uncond rows reuse the cond frame's mask); self-attention before any mask exists attends plainly.
2. Self-attention (attn1), input side, on the layers the CSA layer policy selects (StorySync preset: every up
   block): masked cross-image sharing (paper Eqs. 5-8, ``masked_sharing``) with mask and share dropouts, and BLI
   (paper Eq. 12): inside the window the queries' input becomes ``(1-λ)·X + λ·X_vanilla`` (``bli_inputs``: also
   the keys' and values'), X_vanilla being the same layer's input in the vanilla pre-pass at the same step (or in
   the twin rows of the same call, ``layout_interpolation``). BLI runs on every self-attention layer (Eq. 12: all
   l), both CFG branches.
3. Self-attention, output side, at ``RFH_LEVEL`` up blocks (SDXL output_blocks 3-5, SD1.5 6-8) within the RFH
   window, cond rows: Regional Feature Harmonization (paper Eqs. 9-11, ``harmonization``).

On a diffusion transformer (``depth``: Flux's double- and single-stream blocks, one joint text+image attention
each; ``surfaces/dit_attention``) the same three parts sit by depth -- our choice, where the paper gives no
block-level detail for Flux: maps from the joint attention of every double-stream block (image queries over the subject's text tokens),
binarised at the first single-stream block; sharing where the layer policy says (``layer_is_selected``: "up" = the
second half of the depth); RFH on the image tokens' attention output of the blocks in ``DIT_RFH_RANGE`` of the depth;
BLI on the double-stream blocks.
The token grid is the transformer's own (one level), so there is no ``MASK_LEVEL`` / ``RFH_LEVEL``.

Reference subset (paper Eq. 13): with ``reference_frames`` set, only those frames are sources of sharing and RFH
for the others. When they are generated in an earlier batch, their self-attention inputs, RFH features and masks are
written to the bank (``BankMode.WRITE``) and later batches read them (``BankMode.READ``): memory flat in story
length. Every random draw is seeded by (run seed, step, place, purpose, frame): the place is the token grid for the
mask and share dropouts (one draw per grid and step, so one sharing plan serves every layer of a grid) and the layer
for the rest.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from ..common.addresses import DitDepth, LayerAddress, StepKey, layer_key, stable_seed
from ..common.async_index import index_tensor
from ..common.row_layout import UNKNOWN_LAYOUT, Role, RowLayout, token_grid
from ..story_diffusion.consistent_self_attention import (ContextGroup, LayerPolicy, Schedule, attend_in_groups,
                                                         layer_is_selected, share_at_step)
from ..story_diffusion.reference_bank import BankKey, ReferenceBank
from ..story_diffusion.state import BankMode
from .harmonization import harmonize_rows
from .layout_interpolation import record_vanilla_inputs, vanilla_inputs
from .masked_sharing import PaddedSharing, plan_masked_sharing, reference_peers, sharing_masks
from .subject_masks import MaskAccumulator, binarize, character_maps, drop_mask, resize_mask, subject_probabilities

MASK_LEVEL = 2
RFH_LEVEL = 1
DIT_RFH_RANGE = (0.5, 0.75)  # depth fractions of the transformer blocks where RFH runs (our choice)
# (query input, context[, visible]) -> output; ``visible`` only for padded contexts (``attend_in_groups``)
Attention = Callable[..., torch.Tensor]


class PrePassDone(Exception):
    """Raised inside the vanilla pre-pass once its BLI window is recorded; the adapter catches it."""


class Phase(enum.Enum):
    CONSISTENT = "consistent"
    VANILLA = "vanilla"  # the BLI pre-pass: plain attention, self-attention inputs recorded in the window


@dataclass(frozen=True)
class StorySyncSettings:
    mask_dropout: float = 0.5
    share_dropout: float = 0.0
    rfh_strength: float = 0.3
    rfh_dropout: float = 0.0
    rfh_window: tuple[float, float] = (0.1, 0.33)  # fractions of the pass's steps, [start, end)
    bli_strength: float = 0.7
    bli_window: float = 0.1  # the first fraction of the first pass's steps
    bli_inputs: bool = False
    layer_policy: LayerPolicy = LayerPolicy.UP
    schedule: Schedule = Schedule.ALWAYS


class StorySyncState:
    """Everything one generation's StorySync hooks need (explicit state, no module globals)."""

    def __init__(self, settings: StorySyncSettings, run_seed: int, frame_groups: Mapping[int, frozenset[str]],
                 subject_columns: Mapping[int, Mapping[str, Sequence[int]]],
                 reference_frames: Sequence[int] | None = None, bank: ReferenceBank | None = None,
                 bli_cache: ReferenceBank | None = None, depth: DitDepth | None = None) -> None:
        self.settings = settings
        self.depth = depth  # a diffusion transformer's blocks (None: a UNet)
        self.run_seed = int(run_seed)
        self.frame_groups = {int(f): frozenset(c) for f, c in frame_groups.items()}
        # frame -> (characters in order, token columns, per character its slice of the columns)
        self._columns = {int(f): _column_groups(chars) for f, chars in subject_columns.items()}
        self.reference_frames = None if reference_frames is None else tuple(sorted(set(reference_frames)))
        self.bank = bank if bank is not None else ReferenceBank()
        self.bli_cache = bli_cache if bli_cache is not None else ReferenceBank()
        self.phase = Phase.CONSISTENT
        self.bank_mode = BankMode.OFF
        self.closed = False
        self.layout: RowLayout = UNKNOWN_LAYOUT
        self.latent_hw: tuple[int, int] | None = None
        self.step: StepKey | None = None
        self.total_steps = 0
        self._accumulator = MaskAccumulator()
        self._resized: dict[tuple, torch.Tensor] = {}  # (frame, bank step or None, grid) -> resized masks
        self._dropped: dict[tuple, dict[str, torch.Tensor]] = {}  # the same keys -> this step's dropped masks
        self._plans: dict[tuple, PaddedSharing | None] = {}  # (layout, grid, bank entries) -> this step's sharing
        self.masks: dict[int, tuple[tuple[int, int], dict[str, torch.Tensor]]] = {}  # latest per frame, undropped
        self.bank_masks: dict[tuple[StepKey, int], tuple[tuple[int, int], dict[str, torch.Tensor]]] = {}

    # --- host facts -----------------------------------------------------------------------------------------
    def begin_unet_call(self, layout: RowLayout, latent_hw: tuple[int, int] | None) -> None:
        """A1111: a new UNet call (its row cursor); partial maps of an aborted call are dropped."""
        self.layout, self.latent_hw = layout, latent_hw
        self._accumulator.clear()

    def set_rows(self, layout: RowLayout, latent_hw: tuple[int, int] | None) -> None:
        """Forge: the rows of the current attention call (from ``cond_or_uncond``); the maps are kept."""
        self.layout, self.latent_hw = layout, latent_hw

    def begin_step(self, pass_index: int, step_index: int, total_steps: int, sigma: float) -> None:
        self.step = StepKey(pass_index, step_index, sigma)
        self.total_steps = total_steps
        self._forget_plans()

    def _forget_plans(self) -> None:
        """The dropped masks and sharing plans hold for one step and one set of masks."""
        self._dropped.clear()
        self._plans.clear()

    def close(self) -> None:
        self.closed = True
        self.bank.clear()
        self.bli_cache.clear()
        self.bank_masks.clear()
        self._forget_plans()
        self.layout = UNKNOWN_LAYOUT

    def _active(self, num_rows: int) -> bool:
        return not self.closed and self.step is not None and self.layout.matches(num_rows)

    def _grid(self, num_tokens: int):
        return token_grid(num_tokens, self.latent_hw) if self.latent_hw is not None else None

    def _fraction(self) -> float:
        return self.step.step_index / max(self.total_steps, 1)

    def in_bli_window(self) -> bool:
        s = self.settings
        return self.step.pass_index == 0 and s.bli_strength > 0 and self._fraction() < s.bli_window

    # --- where each part runs: UNet levels or transformer depth ---------------------------------------------
    def _maps_at(self, layer: LayerAddress, grid) -> bool:
        if self.depth is not None:
            return layer[0] == "double"
        return layer[0] != "output" and grid.level == MASK_LEVEL

    def _masks_due(self, layer: LayerAddress) -> bool:
        """The first self-attention after every map layer of the call: the masks of this call are final."""
        return layer[0] == ("single" if self.depth is not None else "output")

    def _interpolates_at(self, layer: LayerAddress) -> bool:
        """BLI's layers: every UNet self-attention (Eq. 12: all l); on a transformer the double-stream blocks only
        (our choice: the layout forms there, and the vanilla q | k | v of all 57 Flux blocks would be ~3x the
        memory of the double-stream ones)."""
        return self.depth is None or layer[0] == "double"

    def _harmonizes_at(self, layer: LayerAddress, grid) -> bool:
        if self.depth is not None:
            start, end = DIT_RFH_RANGE
            return start <= self.depth.position(layer) < end
        return layer[0] == "output" and grid.level == RFH_LEVEL

    # --- cross-attention: subject maps ---------------------------------------------------------------------
    def wants_maps(self, layer: LayerAddress, num_rows: int, num_tokens: int) -> bool:
        """Whether an attn2 call (a double block's joint attention) at ``layer`` with these rows and image tokens
        contributes to the masks."""
        if self.phase is not Phase.CONSISTENT or not self._active(num_rows):
            return False
        grid = self._grid(num_tokens)
        return grid is not None and self._maps_at(layer, grid) and any(r is Role.COND for r in self.layout.roles)

    def cond_rows(self) -> list[int]:
        return [r for r, role in enumerate(self.layout.roles) if role is Role.COND]

    def add_maps(self, q: torch.Tensor, k: torch.Tensor, heads: int, rows: Sequence[int]) -> None:
        """q: [len(rows), Q, H·d] projected image queries and k: [len(rows), T, H·d] projected text keys of the
        call's rows ``rows`` (the cond rows)."""
        grid = self._grid(q.shape[1])
        usable = []  # (i, frame, its columns) of rows whose frame has subject tokens within this context
        for i, row in enumerate(rows):
            frame = self.layout.frames[row]
            columns = self._columns.get(frame)
            if columns is not None and columns[1] and max(columns[1]) < k.shape[1]:
                usable.append((i, frame, columns))
        if not usable:
            return
        # one batched softmax for every usable row over the union of their columns (a column's probability does
        # not depend on which other columns are read)
        union = sorted({c for _, _, columns in usable for c in columns[1]})
        if len(usable) < q.shape[0]:
            index = index_tensor([i for i, _, _ in usable], q.device)
            q, k = q.index_select(0, index), k.index_select(0, index)
        probabilities = subject_probabilities(q, k, heads, union)
        at = {column: j for j, column in enumerate(union)}
        for u, (_, frame, (_, columns, groups)) in enumerate(usable):
            in_union = [[at[columns[g]] for g in group] for group in groups]
            self._accumulator.add([frame], character_maps(probabilities[u:u + 1], in_union),
                                  (grid.height, grid.width))

    def _finalize_masks(self) -> None:
        grid = self._accumulator.grid
        self._resized.clear()  # the masks change
        self._forget_plans()
        maps = self._accumulator.mean_maps()
        self._accumulator.clear()
        if not maps:
            return
        # every frame's maps binarised together, then on the CPU: one device sync per UNet call, after which every
        # layer's sharing and RFH indices are built without one
        binary = binarize(torch.cat(list(maps.values()))).cpu().split([m.shape[0] for m in maps.values()])
        for frame, masks in zip(maps, binary):
            names = self._columns[frame][0]
            self.masks[frame] = (grid, dict(zip(names, masks)))
            if self.bank_mode is BankMode.WRITE and frame in (self.reference_frames or ()):
                self.bank_masks[(self.step, frame)] = self.masks[frame]  # small: bool grids, for later batches

    def _masks_at(self, grid, frames: Sequence[int]) -> dict[int, dict[str, torch.Tensor]]:
        """Each frame's character masks resized to ``grid`` and after mask dropout.

        Mask dropout (methods.md §5.1 step 5, our choice): one draw per frame, step and grid, seeded with
        ``stable_seed(run_seed, step, "grid HxW", "mask", frame)``, used wherever that frame's mask is used at this
        grid in this step (every sharing layer and RFH), as ConsiStory redraws its dropout once per step. So every
        layer of a grid shares one sharing plan (``_sharing_plan``), built once per UNet call.
        """
        out = {}
        for frame in frames:
            stored, cache_key = self.masks.get(frame), (frame, None, (grid.height, grid.width))
            if self.bank_mode is BankMode.READ and frame in (self.reference_frames or ()) \
                    and (self.step, frame) in self.bank_masks:
                stored = self.bank_masks[(self.step, frame)]  # the reference's mask at this step
                cache_key = (frame, self.step, (grid.height, grid.width))
            if stored is None:
                continue
            dropped = self._dropped.get(cache_key)
            if dropped is None:
                source, by_character = stored
                names = list(by_character)
                resized = self._resized.get(cache_key)
                if resized is None:  # once per mask and grid until the masks change (once per UNet call)
                    resized = resize_mask(torch.stack([by_character[n] for n in names]), source, cache_key[2])
                    self._resized[cache_key] = resized
                stacked = drop_mask(resized, self.settings.mask_dropout,
                                    stable_seed(self.run_seed, self.step, _grid_key(grid), "mask", frame))
                dropped = self._dropped[cache_key] = dict(zip(names, stacked))
            out[frame] = dropped
        return out

    # --- self-attention --------------------------------------------------------------------------------------
    def self_attention(self, layer: LayerAddress, hidden: torch.Tensor, attention: Attention) -> torch.Tensor | None:
        """StorySync's self-attention (input side) for ``hidden`` [R, N, C]; None = attend plainly.

        ``attention(query_input, context)`` is the host's attention with the queries from ``query_input`` and the
        keys/values from ``context`` (None: from ``query_input``). In the vanilla pre-pass the inputs of the BLI
        window are recorded and ``PrePassDone`` is raised at the first self-attention after it.
        """
        planned = self.self_attention_groups(layer, hidden)
        return None if planned is None else attend_in_groups(attention, *planned)

    def self_attention_groups(self, layer: LayerAddress, hidden: torch.Tensor
                              ) -> tuple[torch.Tensor, list[ContextGroup]] | None:
        """``self_attention``'s plan without the attention: (query input [R, N, C], context groups), rows in no
        group attending to their own tokens; None = attend plainly. For surfaces whose attention needs more than
        ``(query_input, context)`` per group (a transformer's own text tokens beside the shared image tokens)."""
        num_rows, num_tokens, _ = hidden.shape
        if not self._active(num_rows):
            return None
        key = layer_key(layer)
        if self.phase is Phase.VANILLA:
            if not self.in_bli_window():
                raise PrePassDone()
            if self._interpolates_at(layer):
                record_vanilla_inputs(self.bli_cache, self.layout, key, self.step, hidden)
            return None
        if self._masks_due(layer) and self._accumulator.grid is not None:  # the first up block: this call's masks
            self._finalize_masks()
        grid = self._grid(num_tokens)
        query, own = hidden, hidden
        if self.in_bli_window() and self._interpolates_at(layer):
            cached = vanilla_inputs(self.bli_cache, self.layout, key, self.step, hidden)
            if cached is not None:
                query = torch.lerp(hidden, cached, self.settings.bli_strength)
                own = query if self.settings.bli_inputs else hidden
        groups = self._sharing_groups(layer, key, grid, own) if grid is not None else []
        if query is not hidden:  # blended queries: rows without sharing attend to their own (unblended) tokens
            covered = {r for g in groups for r in g.rows}
            rest = tuple(r for r in range(num_rows) if r not in covered)
            if rest:
                groups = [*groups, ContextGroup(rest, own.index_select(0, index_tensor(rest, own.device)))]
        return (query, groups) if groups else None

    def _sharing_groups(self, layer, key: str, grid, own: torch.Tensor) -> list[ContextGroup]:
        """Masked sharing of one layer call (paper Eqs. 5-8, 13): one padded context group for every row, or []."""
        s = self.settings
        if not layer_is_selected(s.layer_policy, layer, grid, self.depth) or not share_at_step(
                s.schedule, self.step.step_index, self.total_steps, stable_seed(self.run_seed, self.step, key,
                                                                                 "share")):
            return []
        layout = self.layout
        if self.bank_mode is BankMode.WRITE:
            for row, (frame, role) in enumerate(zip(layout.frames, layout.roles)):
                if frame in (self.reference_frames or ()) and role is not Role.OTHER:
                    self.bank.write(BankKey(key, self.step, role, frame), own[row])
        entries, extras = (), None
        if self.bank_mode is BankMode.READ:  # the references' tokens of this layer, cached by an earlier batch
            read = [((role, f), t) for role in (Role.COND, Role.UNCOND) for f in self.reference_frames or ()
                    if (t := self.bank.read(BankKey(key, self.step, role, f), own.device, own.dtype)) is not None
                    and t.shape == own.shape[1:]]
            entries = tuple(entry for entry, _ in read)
            extras = torch.cat([tokens for _, tokens in read]) if read else None
        plan = self._sharing_plan(grid, own, entries)
        return [] if plan is None else [plan.group(own, extras)]

    def _sharing_plan(self, grid, own: torch.Tensor, entries: tuple) -> PaddedSharing | None:
        """Who reads which tokens at this grid: built once per step, layout, grid and set of bank entries (the
        masks and their dropout draws are per grid, ``_masks_at``), then every layer at the grid reuses it."""
        cache_key = (self.layout, grid.height, grid.width, entries)
        if cache_key in self._plans:
            return self._plans[cache_key]
        s, layout = self.settings, self.layout
        seed_parts = (self.run_seed, self.step, _grid_key(grid))
        if self.bank_mode is BankMode.READ:
            masks = self._masks_at(grid, set(layout.frames) | {f for _, f in entries})
            peers = reference_peers(layout, entries, self.frame_groups, masks, p_share=s.share_dropout,
                                    seed_parts=seed_parts)
        else:
            masks = self._masks_at(grid, set(layout.frames))
            peers = sharing_masks(layout, self.frame_groups, masks, reference_frames=self.reference_frames,
                                  p_share=s.share_dropout, seed_parts=seed_parts) if masks else []
        plan = plan_masked_sharing(own.shape[0], own.shape[1], peers, own.device,
                                   own.shape[0] + len(entries)) if peers else None
        self._plans[cache_key] = plan
        return plan

    def harmonize_output(self, layer: LayerAddress, out: torch.Tensor) -> torch.Tensor:
        """Self-attention output side [R, N, C] (after the output projection, before the residual): RFH."""
        s, layout = self.settings, self.layout
        if self.phase is not Phase.CONSISTENT or not self._active(out.shape[0]):
            return out
        grid = self._grid(out.shape[1])
        start, end = s.rfh_window
        if grid is None or not self._harmonizes_at(layer, grid) or s.rfh_strength == 0 \
                or not start <= self._fraction() < end:
            return out
        key = layer_key(layer)
        cond = [r for r, role in enumerate(layout.roles) if role is Role.COND]
        masks = self._masks_at(grid, {layout.frames[r] for r in cond} | set(self.reference_frames or ()))
        sources = {layout.frames[r]: out[r] for r in cond}
        if self.bank_mode is BankMode.WRITE:
            for frame in set(sources) & set(self.reference_frames or ()):
                self.bank.write(BankKey(key + "/rfh", self.step, Role.COND, frame), sources[frame])
        if self.bank_mode is BankMode.READ:
            for frame in self.reference_frames or ():
                entry = self.bank.read(BankKey(key + "/rfh", self.step, Role.COND, frame), out.device, out.dtype)
                if entry is not None:
                    sources[frame] = entry
        allowed = set(self.reference_frames) if self.reference_frames is not None else set(sources)
        readers = sorted(allowed & set(sources))  # the frames RFH may read, in tie order
        targets, readable, generators = [], [], []
        for row in cond:
            frame = layout.frames[row]
            if frame in masks:
                targets.append((row, masks[frame]))
                readable.append([i for i, f in enumerate(readers) if f != frame])
                generators.append(torch.Generator().manual_seed(
                    stable_seed(self.run_seed, self.step, key, "rfh", frame)) if s.rfh_dropout > 0 else None)
        # every cond row in one batched call (a few dozen kernels per layer, whatever the number of frames)
        return harmonize_rows(out, targets, [(sources[f], masks.get(f, {})) for f in readers], readable,
                              s.rfh_strength, s.rfh_dropout, generators)


def _grid_key(grid) -> str:
    """The seed part of a token grid: the draws made once per grid and step (mask and share dropout)."""
    return f"grid {grid.height}x{grid.width}"


def _column_groups(characters: Mapping[str, Sequence[int]]):
    names = [n for n, cols in characters.items() if len(cols)]
    columns, groups = [], []
    for name in names:
        groups.append(list(range(len(columns), len(columns) + len(characters[name]))))
        columns += list(characters[name])
    return names, columns, groups
