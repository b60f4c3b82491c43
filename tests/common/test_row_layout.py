"""Row layouts of A1111 1.10 and Forge UNet calls, and token count -> latent grid (hosts.md §4)."""
from __future__ import annotations

import pytest
import torch

from lib_consistency.common.row_layout import (FORGE_OTHER_CHUNK, UNKNOWN_LAYOUT, A1111RowCursor, Role, RowLayout,
                                               a1111_step_plan, forge_row_layout, token_grid)

C, U, O = Role.COND, Role.UNCOND, Role.OTHER


# --------------------------------------------------------------------------------------------- A1111 plan


def test_plan_orders_cond_rows_then_uncond_rows_with_frame_offset():
    plan = a1111_step_plan([1, 1, 1], frame_offset=6)
    assert plan.frames == (6, 7, 8, 6, 7, 8)
    assert plan.roles == (C, C, C, U, U, U)


def test_plan_repeats_cond_rows_per_and_subprompt():
    plan = a1111_step_plan([2, 1, 3], frame_offset=0)
    assert plan.frames == (0, 0, 1, 2, 2, 2, 0, 1, 2)
    assert plan.roles == (C,) * 6 + (U,) * 3


def test_plan_adds_edit_model_image_uncond_rows_as_other():
    plan = a1111_step_plan([1, 1], frame_offset=2, edit_model_uncond=True)
    assert plan.frames == (2, 3, 2, 3, 2, 3)
    assert plan.roles == (C, C, U, U, O, O)


def test_plan_rejects_an_image_without_cond_rows():
    with pytest.raises(ValueError, match="repeats"):
        a1111_step_plan([1, 0], frame_offset=0)


# ------------------------------------------------------------------------------------------- A1111 cursor


def _cursor(repeats, frame_offset=0, edit=False):
    cursor = A1111RowCursor()
    plan = a1111_step_plan(repeats, frame_offset, edit)
    cursor.start_step(plan)
    return cursor, plan


def test_one_call_with_all_rows_gets_the_whole_plan():
    cursor, plan = _cursor([1, 1], frame_offset=4)
    assert cursor.next_call(4) == plan


def test_two_calls_of_b_rows_get_cond_then_uncond():
    cursor, plan = _cursor([1, 1, 1])
    first, second = cursor.next_call(3), cursor.next_call(3)
    assert (first.frames, first.roles) == ((0, 1, 2), (C, C, C))
    assert (second.frames, second.roles) == ((0, 1, 2), (U, U, U))


def test_uncond_skipped_gives_cond_rows_and_the_next_step_starts_over():
    cursor, _ = _cursor([1, 1])
    assert cursor.next_call(2).roles == (C, C)  # the host cut the uncond after the callback
    cursor.start_step(a1111_step_plan([1, 1], 0))
    assert cursor.next_call(4).roles == (C, C, U, U)


def test_drop_uncond_makes_an_extra_call_unknown():
    cursor, _ = _cursor([1, 1])
    cursor.drop_uncond()
    assert cursor.next_call(2).roles == (C, C)
    assert cursor.next_call(2) is UNKNOWN_LAYOUT  # e.g. PAG's extra call, not the uncond rows


@pytest.mark.parametrize("repeats, offset, edit", [
    ([1], 0, False), ([1, 1, 1], 6, False), ([2, 1, 3], 2, False), ([1, 1], 4, True), ([3], 9, True)])
def test_inserting_other_rows_after_cond_equals_the_plan_built_with_them(repeats, offset, edit):
    frames = tuple(offset + i for i in range(len(repeats)))
    cursor, _ = _cursor(repeats, offset, edit)
    cursor.insert_after_cond(frames)
    expected = a1111_step_plan(repeats, offset, edit, other_after_cond=True)
    assert cursor.next_call(expected.num_rows) == expected
    cond = sum(repeats)
    assert expected.roles[cond:cond + len(repeats)] == (O,) * len(repeats)
    assert expected.frames[cond:cond + len(repeats)] == frames


def test_folded_eta2_rows_in_the_hosts_call_shapes():
    """One call of 3B rows; calls of B rows (batch_cond_uncond off); [cond ; η2] then uncond (token lengths)."""
    for calls, roles in (([6], [(C, C, O, O, U, U)]), ([2, 2, 2], [(C, C), (O, O), (U, U)]),
                         ([4, 2], [(C, C, O, O), (U, U)])):
        cursor, _ = _cursor([1, 1], frame_offset=3)
        cursor.insert_after_cond((3, 4))
        layouts = [cursor.next_call(rows) for rows in calls]
        assert [layout.roles for layout in layouts] == roles
        assert all(layout.frames == (3, 4) * (len(layout.roles) // 2) for layout in layouts)


def test_drop_uncond_keeps_the_other_rows_after_cond_and_insert_mid_step_derails():
    cursor, _ = _cursor([1, 1])
    cursor.insert_after_cond((0, 1))
    cursor.drop_uncond()
    assert cursor.next_call(4).roles == (C, C, O, O)
    assert cursor.next_call(2) is UNKNOWN_LAYOUT
    cursor, _ = _cursor([1, 1])
    cursor.next_call(2)
    cursor.insert_after_cond((0, 1))  # after a UNet call of the step: the rows cannot be placed
    assert cursor.next_call(2) is UNKNOWN_LAYOUT
    cursor = A1111RowCursor()
    cursor.insert_after_cond((0, 1))
    assert cursor.next_call(2) is UNKNOWN_LAYOUT


def test_different_token_lengths_cond_chunks_then_uncond_call():
    cursor, _ = _cursor([2, 2])  # 4 cond rows issued in chunks of B=2, then the uncond call
    calls = [cursor.next_call(2) for _ in range(3)]
    assert [c.frames for c in calls] == [(0, 0), (1, 1), (0, 1)]
    assert [c.roles for c in calls] == [(C, C), (C, C), (U, U)]


def test_edit_model_rows_in_separate_calls():
    cursor, _ = _cursor([1, 1], edit=True)
    assert [cursor.next_call(2).roles for _ in range(3)] == [(C, C), (U, U), (O, O)]


def test_calls_past_the_plan_are_unknown_for_the_rest_of_the_step():
    cursor, _ = _cursor([1, 1])
    assert cursor.next_call(3).known  # 3 of 4 rows
    assert cursor.next_call(2) is UNKNOWN_LAYOUT  # only 1 row left
    assert cursor.next_call(1) is UNKNOWN_LAYOUT  # derailed: stays unknown


def test_extra_call_after_the_plan_is_unknown():
    cursor, _ = _cursor([1, 1])
    cursor.next_call(4)
    assert cursor.next_call(4) is UNKNOWN_LAYOUT


def test_cursor_without_a_plan_is_unknown():
    assert A1111RowCursor().next_call(2) is UNKNOWN_LAYOUT


def test_layout_matches_only_its_own_row_count():
    cursor, _ = _cursor([1, 1])
    layout = cursor.next_call(4)
    assert layout.matches(4) and not layout.matches(8)
    assert not UNKNOWN_LAYOUT.matches(0)


# ----------------------------------------------------------------------------------------------------- Forge


def test_forge_uncond_chunk_first():
    layout = forge_row_layout([1, 0], batch_size=3, num_rows=6, frame_offset=3)
    assert layout.frames == (3, 4, 5, 3, 4, 5)
    assert layout.roles == (U, U, U, C, C, C)


def test_forge_cond_first_and_cfg1_cond_only():
    assert forge_row_layout([0, 1], 2, 4, 0).roles == (C, C, U, U)
    layout = forge_row_layout([0], 2, 2, 0)
    assert (layout.frames, layout.roles) == ((0, 1), (C, C))


def test_forge_other_chunk_is_other_rows_of_the_batch_frames():
    layout = forge_row_layout([1, 0, FORGE_OTHER_CHUNK], 2, 6, (4, 7))
    assert layout.roles == (U, U, C, C, O, O) and layout.frames == (4, 7) * 3


def test_forge_and_slots_are_extra_cond_chunks():
    layout = forge_row_layout([1, 0, 0], 2, 6, 0)
    assert layout.frames == (0, 1, 0, 1, 0, 1)
    assert layout.roles == (U, U, C, C, C, C)


@pytest.mark.parametrize("cond_or_uncond, batch_size, num_rows", [
    ([1, 0], 2, 5),  # not a multiple of B
    ([1, 0], 2, 6),  # a multiple of B, but three chunks for two entries
    ([1, 3], 2, 4),  # unexpected value
    ([], 2, 0),
    ([0], 0, 0),
])
def test_forge_unexpected_input_is_unknown(cond_or_uncond, batch_size, num_rows):
    assert forge_row_layout(cond_or_uncond, batch_size, num_rows, 0) is UNKNOWN_LAYOUT


def _twinned(frames: int = 2) -> RowLayout:
    """Story cond, story uncond, then their vanilla twins (BLI in lock-step)."""
    every = tuple(range(frames))
    return RowLayout(every * 4, (Role.COND,) * frames + (Role.UNCOND,) * frames + (Role.OTHER,) * (2 * frames),
                     twins=tuple(range(2 * frames, 4 * frames)) + (-1,) * (2 * frames))


@pytest.mark.parametrize("twins, message", [
    ((4, 5, 6, 7, -1, -1, -1), "7 twins for 8 rows"),
    ((4, 5, 6, 9, -1, -1, -1, -1), "row 3's twin 9"),  # outside the call
    ((5, 4, 6, 7, -1, -1, -1, -1), "row 0's twin 5"),  # another frame's row
    ((2, 5, 6, 7, -1, -1, -1, -1), "row 0's twin 2"),  # not an OTHER row
    ((4, 5, 6, 7, -1, -1, 4, -1), "row 2's twin 6"),  # row 6 is a twin with a twin of its own
])
def test_twins_must_be_other_rows_of_the_same_frame(twins, message):
    good = _twinned()
    with pytest.raises(ValueError, match=message):
        RowLayout(good.frames, good.roles, twins=twins)


def test_a_slice_of_a_twinned_layout_rebases_twins_and_loses_those_outside():
    layout = _twinned()
    assert layout.rows(0, 8) == layout
    assert layout.rows(2, 8).twins == (4, 5, -1, -1, -1, -1)  # the uncond rows keep theirs, re-based
    assert layout.rows(0, 4).twins == (-1,) * 4  # a call of the story's rows alone: no twin in it
    assert RowLayout((0, 1), (Role.COND, Role.COND)).rows(0, 1).twins is None
    cursor = A1111RowCursor()
    cursor.start_step(layout)
    cursor.insert_after_cond((0, 1))  # OneActor's rows would shift the twins: the step is unknown instead
    assert cursor.next_call(10) == UNKNOWN_LAYOUT


def test_row_layout_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        RowLayout((0, 1), (C,))


# ------------------------------------------------------------------------------------------ token grids


def _unet_grids(height: int, width: int, levels: int) -> list[tuple[int, int]]:
    """Grids a real stride-2 / padding-1 conv produces, level by level (the UNet's downsampler)."""
    conv = torch.nn.Conv2d(1, 1, kernel_size=3, stride=2, padding=1)
    x = torch.zeros(1, 1, height, width)
    grids = [(height, width)]
    with torch.no_grad():
        for _ in range(levels):
            x = conv(x)
            grids.append(tuple(x.shape[-2:]))
    return grids


@pytest.mark.parametrize("image_hw", [(512, 512), (1024, 1024), (1216, 832), (832, 1216), (600, 1000), (768, 520)])
def test_token_count_maps_to_the_grid_of_every_level(image_hw):
    latent = (image_hw[0] // 8, image_hw[1] // 8)
    for level, (h, w) in enumerate(_unet_grids(*latent, levels=3)):
        assert token_grid(h * w, latent) == (h, w, level)


def test_token_count_of_no_level_gives_none():
    latent = (64, 64)
    assert token_grid(4095, latent) is None  # e.g. token merging removed tokens
    assert token_grid(4096 * 4, latent) is None  # larger than the latent
    assert token_grid(40 * 40, latent) is None


def test_a_batch_of_frames_not_in_a_row_gives_each_image_its_frame():
    """Batches by network set (story/batches.py) hold frames such as (1, 3): both hosts' layouts name them."""
    plan = a1111_step_plan([1, 1], frame_offset=(1, 3))
    assert plan.frames == (1, 3, 1, 3) and plan.roles == (C, C, U, U)
    assert forge_row_layout([1, 0], 2, 4, (1, 3)).frames == (1, 3, 1, 3)
    assert forge_row_layout([1, 0], 2, 4, (1, 3, 5)) is UNKNOWN_LAYOUT  # rows that are not this batch's images
    with pytest.raises(ValueError, match="cannot hold the 3 frames"):
        a1111_step_plan([1, 1], frame_offset=(1, 3, 5))
