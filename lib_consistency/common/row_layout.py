"""Row layout of one UNet call: which story frame and which CFG role every batch row holds.

Neither host tells an attention layer what its batch rows are, and the two hosts order them differently
(hosts.md §4, methods.md §9):

- A1111 1.10 (`CFGDenoiser.forward`, hosts.md §4.1): ``x_in`` holds the cond rows image by image (image i
  repeated ``repeats[i]`` times, one row per AND sub-prompt), then B uncond rows, then for an edit model with
  image-CFG B image-uncond rows. OneActor's η2 rows (``c + Δ_avg``, one per image) ride between the cond and the
  uncond rows when it folds them into the host's call (``A1111RowCursor.insert_after_cond``). The host issues these
  rows to the UNet *in that order*: in one call, in calls of B rows, as cond chunks followed by one uncond call
  (different token lengths), or cond rows only (uncond skipped after the ``on_cfg_denoiser`` callback).
  ``a1111_step_plan`` builds the per-step plan in that callback and an ``A1111RowCursor`` hands each UNet call the
  next slice of it (hosts.md §4.3).
- Forge (hosts.md §4.2, §6.2): ``extra_options['cond_or_uncond']`` gives one role per chunk of B rows
  (B = ``len(extra_options['sigmas'])``), usually uncond first; ``forge_row_layout`` reads it. A chunk marked
  ``FORGE_OTHER_CHUNK`` (2; OneActor's η2 rows folded into the call, ``hosts/forge.py``) holds rows of role OTHER.

In BLI lock-step (``hosts/lockstep.py``) the host samples twice the story's images, the second half being the vanilla
trajectory's twins: ``twinned_layout`` lays out such calls on both hosts, ``without_twins`` the rows that still need
the UNet once the window is over.

Anything that does not fit gives ``UNKNOWN_LAYOUT``; every attention hook then passes through unchanged.
"""
from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import NamedTuple, Sequence


class Role(enum.Enum):
    """CFG role of a row. ``OTHER`` (an edit model's image-uncond rows, OneActor's η2 rows) never shares
    attention."""

    COND = "cond"
    UNCOND = "uncond"
    OTHER = "other"


@dataclass(frozen=True)
class RowLayout:
    """Frame index and role of every row of one UNet call; ``known=False`` means "cannot tell".

    ``twins`` (StorySync BLI in lock-step, methods.md §5.1 step 4 way (b)): per row, the row of the same call that
    holds its vanilla twin (same frame, same branch, on the independent vanilla trajectory), or -1. A twin row is
    ``Role.OTHER`` (it shares nothing) and has no twin itself. None: no twins in this call."""

    frames: tuple[int, ...]
    roles: tuple[Role, ...]
    known: bool = True
    twins: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.frames) != len(self.roles):
            raise ValueError(f"RowLayout: {len(self.frames)} frames but {len(self.roles)} roles")
        if self.twins is not None:
            if len(self.twins) != len(self.frames):
                raise ValueError(f"RowLayout: {len(self.twins)} twins for {len(self.frames)} rows")
            for row, twin in enumerate(self.twins):
                if twin == -1:
                    continue
                if not (0 <= twin < len(self.frames) and self.roles[twin] is Role.OTHER
                        and self.twins[twin] == -1 and self.frames[twin] == self.frames[row]):
                    raise ValueError(f"RowLayout: row {row}'s twin {twin} is not an OTHER row of the same frame")

    @property
    def num_rows(self) -> int:
        return len(self.frames)

    def matches(self, num_rows: int) -> bool:
        """True when the layout is known and describes exactly ``num_rows`` rows."""
        return self.known and len(self.frames) == num_rows

    def rows(self, start: int, stop: int) -> RowLayout:
        """Rows ``start:stop``; a twin outside them becomes -1."""
        twins = None if self.twins is None else \
            tuple(t - start if start <= t < stop else -1 for t in self.twins[start:stop])
        return RowLayout(self.frames[start:stop], self.roles[start:stop], twins=twins)


UNKNOWN_LAYOUT = RowLayout((), (), known=False)


def twinned_layout(branch_roles: Sequence[Role], frames: Sequence[int]) -> RowLayout:
    """Rows of a host call in BLI lock-step (methods.md §5.1 step 4 way (b); ``hosts/lockstep.py``): the host samples
    the B story images followed by their B vanilla twins, so each CFG branch (``branch_roles``, in host order) is a
    block of 2B rows, the B story rows then their twins (role OTHER, same frames). ``frames``: the B story frames."""
    count, out_frames, roles, twins = len(frames), [], [], []
    for block, role in enumerate(branch_roles):
        start = 2 * count * block
        out_frames += list(frames) * 2
        roles += [role] * count + [Role.OTHER] * count
        twins += [start + count + i for i in range(count)] + [-1] * count
    return RowLayout(tuple(out_frames), tuple(roles), twins=tuple(twins))


def without_twins(layout: RowLayout) -> tuple[RowLayout, tuple[int, ...], tuple[int, ...]]:
    """Outside BLI's window the twin rows need no UNet: (the layout of the other rows, their indices in ``layout``,
    and for every row of ``layout`` the index among them whose output it takes: a twin its story row's). The host's
    sampler still steps the twins (their latents are dropped at the end)."""
    if layout.twins is None:
        rows = tuple(range(layout.num_rows))
        return layout, rows, rows
    twin_of = {t: r for r, t in enumerate(layout.twins) if t >= 0}
    kept = tuple(r for r in range(layout.num_rows) if r not in twin_of)
    position = {r: i for i, r in enumerate(kept)}
    expand = tuple(position[twin_of.get(r, r)] for r in range(layout.num_rows))
    return RowLayout(tuple(layout.frames[r] for r in kept), tuple(layout.roles[r] for r in kept)), kept, expand


# ---------------------------------------------------------------------------------------------- A1111 1.10


Frames = int | tuple[int, ...]  # the batch's first frame (frames in a row), or the frame of every image


def batch_image_frames(frames: Frames, batch_size: int) -> tuple[int, ...]:
    """The frame of each of the ``batch_size`` images of a batch: ``frames + i`` for a first frame, else
    ``frames`` itself (a story's batches by network set hold frames that are not in a row, story/batches.py)."""
    if isinstance(frames, int):
        return tuple(frames + i for i in range(batch_size))
    if len(frames) != batch_size:
        raise ValueError(f"a batch of {batch_size} images cannot hold the {len(frames)} frames {list(frames)}")
    return tuple(frames)


def a1111_step_plan(repeats: Sequence[int], frame_offset: Frames, edit_model_uncond: bool = False,
                    other_after_cond: bool = False) -> RowLayout:
    """All rows ``CFGDenoiser.forward`` builds for one denoiser call, in host order (hosts.md §4.1).

    ``repeats[i]``: number of AND sub-prompts of image i (B = len(repeats)); ``frame_offset``:
    ``p.iteration * p.batch_size``, or the B frames of the batch; ``edit_model_uncond``: an InstructPix2Pix model
    with image-CFG adds B image-uncond rows (role OTHER); ``other_after_cond``: B rows of role OTHER, one per image,
    between the cond and the uncond rows (OneActor's folded η2 rows).
    """
    if any(n < 1 for n in repeats):
        raise ValueError(f"a1111_step_plan: every image needs at least one cond row, got repeats={list(repeats)}")
    images = batch_image_frames(frame_offset, len(repeats))
    frames = [frame for frame, n in zip(images, repeats) for _ in range(n)]
    roles = [Role.COND] * len(frames)
    if other_after_cond:
        frames += images
        roles += [Role.OTHER] * len(images)
    frames += images
    roles += [Role.UNCOND] * len(images)
    if edit_model_uncond:
        frames += images
        roles += [Role.OTHER] * len(images)
    return RowLayout(tuple(frames), tuple(roles))


class A1111RowCursor:
    """Hands consecutive slices of the step plan to the UNet calls of one denoiser call (hosts.md §4.3).

    Call ``start_step(plan)`` from ``on_cfg_denoiser`` and ``next_call(x.shape[0])`` from a forward pre-hook on
    the UNet. A skipped uncond needs nothing (the cursor never reaches those rows); ``drop_uncond()`` makes it
    explicit so that an extra call of another extension is not mistaken for the uncond rows. A call that runs
    past the plan (PAG/SAG extra calls, a changed batch) gets UNKNOWN_LAYOUT, and so does every later call of
    that step.
    """

    def __init__(self) -> None:
        self._plan = UNKNOWN_LAYOUT
        self._next_row = 0

    def start_step(self, plan: RowLayout) -> None:
        self._plan = plan
        self._next_row = 0

    def drop_uncond(self) -> None:
        """Cut the plan before its uncond rows (the host skipped the uncond for this step: ``x_in`` loses its last
        B rows, which are the uncond rows whenever the uncond can be skipped)."""
        roles = self._plan.roles
        uncond = next((i for i, role in enumerate(roles) if role is Role.UNCOND), len(roles))
        self._plan = self._plan.rows(0, uncond) if self._plan.known else UNKNOWN_LAYOUT

    def insert_after_cond(self, frames: Sequence[int]) -> None:
        """Rows of role OTHER for ``frames`` (one per image) right after the plan's cond rows: another callback of
        this step put them there in the host's rows (OneActor's folded η2 rows). Before any UNet call of the step;
        an unknown plan stays unknown."""
        if not self._plan.known or self._next_row or self._plan.twins is not None:
            self._plan, self._next_row = UNKNOWN_LAYOUT, 0
            return
        roles = self._plan.roles
        at = next((i for i, role in enumerate(roles) if role is not Role.COND), len(roles))
        self._plan = RowLayout(self._plan.frames[:at] + tuple(frames) + self._plan.frames[at:],
                               roles[:at] + (Role.OTHER,) * len(frames) + roles[at:])

    def next_call(self, num_rows: int) -> RowLayout:
        stop = self._next_row + num_rows
        if not self._plan.known or num_rows < 1 or stop > self._plan.num_rows:
            self._next_row = self._plan.num_rows  # derailed: the rest of this step is unknown too
            return UNKNOWN_LAYOUT
        layout = self._plan.rows(self._next_row, stop)
        self._next_row = stop
        return layout


# ----------------------------------------------------------------------------------------------------- Forge


def forge_row_layout(cond_or_uncond: Sequence[int], batch_size: int, num_rows: int,
                     frame_offset: Frames, twinned: bool = False) -> RowLayout:
    """Layout of a Forge UNet call from ``extra_options`` (hosts.md §4.2).

    Row r is chunk ``r // B``, image ``r % B``, role ``cond_or_uncond[r // B]`` (0 = cond, 1 = uncond,
    ``FORGE_OTHER_CHUNK`` = other), with
    ``B = len(extra_options['sigmas'])``; ``frame_offset``: the batch's first frame, or its B frames. ``twinned``
    (BLI lock-step): B is the story's images then as many vanilla twins (``twinned_layout``), so ``frame_offset``
    describes B/2 images. Cached: Forge patches rebuild the layout on every attention call.
    """
    if twinned:
        return _forge_twinned_layout(tuple(cond_or_uncond), batch_size, num_rows, frame_offset)
    return _forge_row_layout(tuple(cond_or_uncond), batch_size, num_rows, frame_offset)


FORGE_OTHER_CHUNK = 2  # not the host's: a chunk of rows that are neither its cond nor its uncond (OneActor's η2)
_FORGE_ROLES = {0: Role.COND, 1: Role.UNCOND, FORGE_OTHER_CHUNK: Role.OTHER}


@functools.lru_cache(maxsize=64)
def _forge_row_layout(cond_or_uncond: tuple[int, ...], batch_size: int, num_rows: int,
                      frame_offset: Frames) -> RowLayout:
    if batch_size < 1 or num_rows != batch_size * len(cond_or_uncond) or num_rows == 0:
        return UNKNOWN_LAYOUT
    if any(value not in _FORGE_ROLES for value in cond_or_uncond):
        return UNKNOWN_LAYOUT
    if not isinstance(frame_offset, int) and len(frame_offset) != batch_size:
        return UNKNOWN_LAYOUT  # rows that are not this batch's images
    images = batch_image_frames(frame_offset, batch_size)
    frames = tuple(images[r % batch_size] for r in range(num_rows))
    roles = tuple(_FORGE_ROLES[cond_or_uncond[r // batch_size]] for r in range(num_rows))
    return RowLayout(frames, roles)


@functools.lru_cache(maxsize=64)
def _forge_twinned_layout(cond_or_uncond: tuple[int, ...], batch_size: int, num_rows: int,
                          frame_offset: Frames) -> RowLayout:
    story = _forge_row_layout(cond_or_uncond, batch_size // 2, num_rows // 2, frame_offset)
    if batch_size % 2 or num_rows != batch_size * len(cond_or_uncond) or not story.known:
        return UNKNOWN_LAYOUT
    images = batch_image_frames(frame_offset, batch_size // 2)
    return twinned_layout([_FORGE_ROLES[c] for c in cond_or_uncond], images)


# ------------------------------------------------------------------------------------------ token grids


class TokenGrid(NamedTuple):
    """Spatial grid of a layer's tokens; ``level`` = number of 2x downsamplings from the latent."""

    height: int
    width: int
    level: int


MAX_DOWNSAMPLING_LEVEL = 6


def token_grid(num_tokens: int, latent_hw: tuple[int, int]) -> TokenGrid | None:
    """Token grid of a layer with ``num_tokens`` tokens when the UNet input latent is ``latent_hw`` = (H, W).

    Every UNet level halves H and W with ceil rounding (a stride-2 conv with padding 1), so SDXL's odd latent
    sizes work: 1216x832 -> latent 152x104 -> 76x52 -> 38x26; 600 px -> latent 75 -> 38 -> 19. ``None`` when no
    level matches (token merging, tiling, a foreign layer).
    """
    height, width = latent_hw
    for level in range(MAX_DOWNSAMPLING_LEVEL + 1):
        if height * width == num_tokens:
            return TokenGrid(height, width, level)
        height, width = -(-height // 2), -(-width // 2)
    return None
