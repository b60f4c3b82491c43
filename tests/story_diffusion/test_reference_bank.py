"""Reference bank: identity frames write, later batches read (methods.md §3.4)."""
from __future__ import annotations

import pytest
import torch

from lib_consistency.bench.csa import MultiHeadSelfAttention
from lib_consistency.common.addresses import StepKey
from lib_consistency.common.row_layout import Role, RowLayout
from lib_consistency.story_diffusion.consistent_self_attention import CsaSettings
from lib_consistency.story_diffusion.reference_bank import BankKey, ReferenceBank
from lib_consistency.story_diffusion.state import BankMode, ConsistencyState
from tests.story_diffusion.test_consistent_self_attention import run_hooked

C, U = Role.COND, Role.UNCOND
LAYER = ("output", 4, 0)
TOKENS, CHANNELS = 16, 8


@pytest.fixture
def attention():
    torch.manual_seed(0)
    return MultiHeadSelfAttention(CHANNELS, 2).double()


def frames_hidden(frames, tokens=TOKENS) -> dict[int, torch.Tensor]:
    """Fixed (cond, uncond) hidden states per frame, independent of which batch the frame is generated in."""
    return {f: torch.randn(2, tokens, CHANNELS, generator=torch.Generator().manual_seed(100 + f),
                           dtype=torch.float64) for f in frames}


def batch(frames, per_frame) -> tuple[RowLayout, torch.Tensor]:
    """A1111 order: cond rows of every frame, then uncond rows."""
    layout = RowLayout(tuple(frames) * 2, (C,) * len(frames) + (U,) * len(frames))
    hidden = torch.stack([per_frame[f][0] for f in frames] + [per_frame[f][1] for f in frames])
    return layout, hidden


GROUPS = {0: {"anna"}, 1: {"ben"}, 2: {"anna"}, 3: {"anna", "ben"}, 4: set()}


def make_state(mode=BankMode.OFF, reference_frames=(), bank=None, rate=0.5):
    return ConsistencyState(CsaSettings(rate, "always", "all"), run_seed=3, frame_groups=GROUPS, bank_mode=mode,
                            reference_frames=reference_frames, bank=bank)


def call(module, state, layout, hidden, step=StepKey(0, 2, 3.5)):
    state.begin_unet_call(layout, None)
    state.begin_step(step.pass_index, step.step_index, 20, step.sigma)
    return run_hooked(module, hidden, state, LAYER)


def test_write_then_read_reproduces_in_batch_sharing(attention):
    per_frame = frames_hidden([0, 1, 2, 3])
    # In one batch with the reference frames 0 (anna) and 1 (ben): frame 2 (anna) sees 0, frame 3 (both) sees 0, 1.
    with_2 = call(attention, make_state(), *batch([0, 1, 2], per_frame))
    with_3 = call(attention, make_state(), *batch([0, 1, 3], per_frame))

    state = make_state(BankMode.WRITE, reference_frames=(0, 1))
    call(attention, state, *batch([0, 1], per_frame))  # batch 1: the reference frames
    assert len(state.bank) == 4  # 2 frames x 2 roles at this (layer, step)
    state.bank_mode = BankMode.READ
    read_out = call(attention, state, *batch([2, 3], per_frame))  # batch 2 reads the bank, not its batch mate
    expected = torch.stack([with_2[2], with_3[2], with_2[5], with_3[5]])
    torch.testing.assert_close(read_out, expected, rtol=1e-10, atol=1e-10)


def test_read_frame_without_a_shared_character_attends_plainly(attention):
    per_frame = frames_hidden([0, 4])
    state = make_state(BankMode.WRITE, reference_frames=(0,))
    call(attention, state, *batch([0], per_frame))
    state.bank_mode = BankMode.READ
    layout, hidden = batch([4], per_frame)  # an [NC] frame
    with torch.no_grad():
        assert torch.equal(call(attention, state, layout, hidden), attention(hidden))


def test_read_at_a_step_that_was_never_written_attends_plainly(attention):
    per_frame = frames_hidden([0, 2])
    state = make_state(BankMode.WRITE, reference_frames=(0,))
    call(attention, state, *batch([0], per_frame), step=StepKey(0, 2, 3.5))
    state.bank_mode = BankMode.READ
    layout, hidden = batch([2], per_frame)
    with torch.no_grad():
        assert torch.equal(call(attention, state, layout, hidden, step=StepKey(0, 2, 3.0)), attention(hidden))
        assert not torch.allclose(call(attention, state, layout, hidden, step=StepKey(0, 2, 3.5)), attention(hidden))


def test_memory_accounting_matches_the_stored_tensors(attention):
    per_frame = frames_hidden([0, 1])
    state = make_state(BankMode.WRITE, reference_frames=(0, 1), rate=0.25)
    for step in range(3):
        call(attention, state, *batch([0, 1], per_frame), step=StepKey(0, step, 10.0 - step))
    bank = state.bank
    stored = [bank.read(key, torch.device("cpu"), torch.float64) for key in bank.keys()]
    assert len(stored) == 3 * 2 * 2
    assert all(t.shape == (round(0.25 * TOKENS), CHANNELS) for t in stored)
    assert bank.bytes_held == sum(t.numel() * t.element_size() for t in stored)


def test_overwriting_an_entry_does_not_double_count():
    bank = ReferenceBank()
    key = BankKey("output.4.0", StepKey(0, 1, 2.0), C, 0)
    bank.write(key, torch.ones(4, 8))
    bank.write(key, torch.zeros(6, 8, dtype=torch.float16))
    assert len(bank) == 1 and bank.bytes_held == 6 * 8 * 2


def test_bank_keeps_its_own_copy_and_offload_converts_on_read():
    bank = ReferenceBank(offload_to_cpu=True)
    source = torch.randn(10, 8)
    key = BankKey("output.4.0", StepKey(0, 1, 2.0), C, 0)
    bank.write(key, source[::2])  # a view of a larger tensor: only its 5 rows are held
    expected = source[::2].clone()
    source.add_(1.0)
    read = bank.read(key, torch.device("cpu"), torch.float64)
    assert read.dtype == torch.float64 and read.device.type == "cpu"
    torch.testing.assert_close(read, expected.double())
    assert bank.bytes_held == 5 * 8 * 4


def test_clear_and_close_leave_nothing(attention):
    per_frame = frames_hidden([0, 2])
    state = make_state(BankMode.WRITE, reference_frames=(0, 2))
    call(attention, state, *batch([0, 2], per_frame))
    assert len(state.bank) > 0 and state.bank.bytes_held > 0
    keys = list(state.bank.keys())
    state.close()
    assert len(state.bank) == 0 and state.bank.bytes_held == 0
    assert all(state.bank.read(key, torch.device("cpu"), torch.float64) is None for key in keys)
    layout, hidden = batch([0, 2], per_frame)  # frames 0 and 2 share a character: a live state would share
    with torch.no_grad():
        assert torch.equal(call(attention, state, layout, hidden), attention(hidden))  # a closed state is stale
    assert len(state.bank) == 0


def test_sigma_and_pass_keys_do_not_mix(attention):
    state = make_state(BankMode.WRITE, reference_frames=(0,))
    # A second-order sampler: two evaluations in step 2 at different sigmas, with different latents.
    first, second = frames_hidden([0]), {0: frames_hidden([0])[0] * -1.0}
    call(attention, state, *batch([0], first), step=StepKey(0, 2, 3.5))
    call(attention, state, *batch([0], second), step=StepKey(0, 2, 2.8))
    # The hires pass: same step index and sigma, four times the tokens.
    hires = frames_hidden([0], tokens=4 * TOKENS)
    call(attention, state, *batch([0], hires), step=StepKey(1, 2, 3.5))
    entries = {(key.step, key.role): state.bank.read(key, torch.device("cpu"), torch.float64)
               for key in state.bank.keys()}
    assert len(entries) == 6
    low, high, hr = (entries[(StepKey(*s), C)] for s in ((0, 2, 3.5), (0, 2, 2.8), (1, 2, 3.5)))
    assert hr.shape[0] == 4 * low.shape[0]

    def drawn_from(tokens, source):
        return all(any(torch.equal(token, own) for own in source) for token in tokens)

    assert drawn_from(low, first[0][0]) and drawn_from(high, second[0][0]) and drawn_from(hr, hires[0][0])
    assert not drawn_from(low, second[0][0]) and not drawn_from(high, first[0][0])


def test_bank_repr_and_state_repr_show_sizes(attention):
    state = make_state(BankMode.WRITE, reference_frames=(0,))
    call(attention, state, *batch([0], frames_hidden([0])))
    assert "entries=2" in repr(state.bank) and "bank_mode=write" in repr(state)
