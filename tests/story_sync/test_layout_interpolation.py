"""BLI's vanilla inputs (StorySync Eq. 12): from the pre-pass's cache (way (a)) or from twin rows of the same call
(way (b), lock-step) -- the same tensors either way."""
from __future__ import annotations

import pytest
import torch

from lib_consistency.common.addresses import StepKey
from lib_consistency.common.row_layout import Role, RowLayout
from lib_consistency.story_diffusion.reference_bank import ReferenceBank
from lib_consistency.story_sync.layout_interpolation import record_vanilla_inputs, vanilla_inputs

STEP, KEY = StepKey(0, 1, 3.5), "output_blocks.4.1.transformer_blocks.0.attn1"
C, U, O = Role.COND, Role.UNCOND, Role.OTHER


def _hidden(rows: int) -> torch.Tensor:
    return torch.randn(rows, 6, 4, generator=torch.Generator().manual_seed(rows), dtype=torch.float64)


def test_twins_are_the_vanilla_inputs_and_other_rows_stay_themselves():
    # story cond 0, 1; story uncond 0, 1; an η2-like OTHER row of frame 0 without a twin; the twins in another order
    layout = RowLayout((0, 1, 0, 1, 0, 1, 0, 0, 1), (C, C, U, U, O, O, O, O, O), twins=(7, 8, 6, 5, -1, -1, -1, -1, -1))
    hidden = _hidden(9)
    out = vanilla_inputs(ReferenceBank(), layout, KEY, STEP, hidden)
    assert torch.equal(out, hidden[[7, 8, 6, 5, 4, 5, 6, 7, 8]])
    assert torch.equal(torch.lerp(hidden, out, 0.7)[4:], hidden[4:])  # the blend leaves OTHER rows as they are


def test_a_story_row_without_its_twin_in_a_twinned_call_is_refused():
    layout = RowLayout((0, 1, 0, 1, 0), (C, C, U, U, O), twins=(4, -1, -1, -1, -1))
    with pytest.raises(RuntimeError, match=r"rows \[1, 2, 3\] have no vanilla row"):
        vanilla_inputs(ReferenceBank(), layout, KEY, STEP, _hidden(5))


def test_the_pre_pass_cache_gives_what_the_twins_give():
    """Way (a): the pre-pass records the vanilla rows under the story rows' (role, frame); reading them back in the
    consistent pass equals way (b)'s twin rows bit for bit."""
    story = RowLayout((0, 1, 0, 1), (C, C, U, U))
    twinned = RowLayout(story.frames * 2, story.roles + (O,) * 4, twins=(4, 5, 6, 7, -1, -1, -1, -1))
    hidden = _hidden(8)
    cache = ReferenceBank()
    record_vanilla_inputs(cache, story, KEY, STEP, hidden[4:])  # the pre-pass's call: the vanilla rows alone
    from_cache = vanilla_inputs(cache, story, KEY, STEP, hidden[:4])
    assert torch.equal(from_cache, vanilla_inputs(ReferenceBank(), twinned, KEY, STEP, hidden)[:4])
    assert vanilla_inputs(cache, story, KEY, StepKey(0, 2, 3.0), hidden[:4]) is None  # another step: no BLI
    assert vanilla_inputs(cache, story, "other layer", STEP, hidden[:4]) is None
    assert vanilla_inputs(cache, story, KEY, STEP, _hidden(4)[:, :5]) is None  # another token count
    wider = RowLayout((0, 1, 2), (C, C, C))
    assert vanilla_inputs(cache, wider, KEY, STEP, _hidden(3)) is None  # a frame the pre-pass never saw
