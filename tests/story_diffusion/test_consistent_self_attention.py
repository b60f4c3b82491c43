"""StoryDiffusion consistent self-attention on an ldm-style attention module (``context=`` keyword)."""
from __future__ import annotations

import math

import pytest
import torch

from lib_consistency.bench.csa import MultiHeadSelfAttention
from lib_consistency.common.addresses import StepKey, stable_seed
from lib_consistency.common.row_layout import UNKNOWN_LAYOUT, Role, RowLayout, TokenGrid, forge_row_layout
from lib_consistency.story_diffusion.consistent_self_attention import (CsaSettings, LayerPolicy, Schedule,
                                                                       layer_is_selected, plan_in_batch_sharing,
                                                                       sample_token_indices, share_at_step,
                                                                       whole_batch_context)
from lib_consistency.story_diffusion.state import ConsistencyState
from lib_consistency.surfaces.attention_modules import install_csa_hooks
from lib_consistency.surfaces.instance_hooks import remove_hooks

C, U, O = Role.COND, Role.UNCOND, Role.OTHER
LAYER = ("output", 3, 0)
TOKENS, CHANNELS, HEADS = 16, 8, 2


@pytest.fixture
def attention():
    torch.manual_seed(0)
    return MultiHeadSelfAttention(CHANNELS, HEADS).double()


def hidden_states(rows: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, TOKENS, CHANNELS, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def make_state(layout: RowLayout, rate=0.5, seed=7, groups=None, schedule="always", policy="all", step=3):
    groups = {f: {"hero"} for f in set(layout.frames)} if groups is None else groups
    state = ConsistencyState(CsaSettings(rate, schedule, policy), seed, groups)
    state.begin_unet_call(layout, None)
    state.begin_step(pass_index=0, step_index=step, total_steps=30, sigma=2.5)
    return state


def run_hooked(module, hidden, state, layer=LAYER):
    """One forward with the CSA hook installed on ``module``, removed afterwards."""
    hooks = install_csa_hooks([(layer, module)], state)
    try:
        with torch.no_grad():
            return module(hidden)
    finally:
        remove_hooks(hooks)


def plain(module, hidden):
    with torch.no_grad():
        return module(hidden)


def naive_attention(module, queries_in: torch.Tensor, keys_in: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head, written out by hand (one frame)."""
    q, k, v = module.to_q(queries_in), module.to_k(keys_in), module.to_v(keys_in)
    d = CHANNELS // HEADS
    heads = []
    for h in range(HEADS):
        sl = slice(h * d, (h + 1) * d)
        weights = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(d), dim=-1)
        heads.append(weights @ v[:, sl])
    return module.to_out(torch.cat(heads, dim=1))


CFG_LAYOUT = RowLayout((0, 1, 2, 0, 1, 2), (C, C, C, U, U, U))


def test_rate_zero_is_bit_identical_to_plain_attention(attention):
    hidden = hidden_states(6)
    assert torch.equal(run_hooked(attention, hidden, make_state(CFG_LAYOUT, rate=0.0)), plain(attention, hidden))


def test_rate_one_with_two_frames_equals_attention_over_concatenated_tokens(attention):
    hidden = hidden_states(2)
    out = run_hooked(attention, hidden, make_state(RowLayout((0, 1), (C, C)), rate=1.0))
    with torch.no_grad():
        for row, peer in ((0, 1), (1, 0)):
            expected = naive_attention(attention, hidden[row], torch.cat((hidden[row], hidden[peer])))
            torch.testing.assert_close(out[row], expected, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(out, plain(attention, hidden))


def test_sharing_changes_every_row_of_a_shared_role(attention):
    hidden = hidden_states(6)
    out, base = run_hooked(attention, hidden, make_state(CFG_LAYOUT)), plain(attention, hidden)
    assert all(not torch.allclose(out[row], base[row]) for row in range(6))


def test_rows_of_the_other_role_never_influence_a_row(attention):
    hidden = hidden_states(6)
    perturbed = hidden.clone()
    perturbed[3:] += 5.0  # every uncond row
    out, out_perturbed = (run_hooked(attention, h, make_state(CFG_LAYOUT)) for h in (hidden, perturbed))
    torch.testing.assert_close(out_perturbed[:3], out[:3], rtol=0, atol=1e-12)
    assert not torch.allclose(out_perturbed[3:], out[3:])


def test_role_other_never_shares_nor_is_shared(attention):
    layout = RowLayout((0, 1, 0, 1), (C, C, O, O))
    hidden = hidden_states(4)
    perturbed = hidden.clone()
    perturbed[2:] += 5.0
    out, out_perturbed = (run_hooked(attention, h, make_state(layout)) for h in (hidden, perturbed))
    torch.testing.assert_close(out_perturbed[:2], out[:2], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[2:], plain(attention, hidden)[2:], rtol=0, atol=1e-12)


def test_character_groups_limit_sharing(attention):
    layout = RowLayout((0, 1, 2, 3, 4), (C,) * 5)
    groups = {0: {"anna"}, 1: {"ben"}, 2: {"anna", "ben"}, 3: set()}  # 3 is an [NC] frame, 4 is not in the map
    plan = plan_in_batch_sharing(layout, {f: frozenset(g) for f, g in groups.items()})
    peers = {row: p for group in plan.groups for row, p in zip(group.rows, group.peers)}
    assert peers == {0: (2,), 1: (2,), 2: (0, 1)}

    hidden = hidden_states(5)
    out = run_hooked(attention, hidden, make_state(layout, groups=groups))
    base = plain(attention, hidden)
    torch.testing.assert_close(out[3:], base[3:], rtol=0, atol=1e-12)  # [NC] and unmapped frames attend plainly
    perturbed = hidden.clone()
    perturbed[1] += 5.0  # ben only: must not reach anna-only frame 0
    out_perturbed = run_hooked(attention, perturbed, make_state(layout, groups=groups))
    torch.testing.assert_close(out_perturbed[0], out[0], rtol=0, atol=1e-12)
    assert not torch.allclose(out_perturbed[2], out[2])


def test_forge_layout_uncond_first_keeps_roles_apart(attention):
    layout = forge_row_layout([1, 0], batch_size=2, num_rows=4, frame_offset=0)  # [u0, u1, c0, c1]
    hidden = hidden_states(4)
    perturbed = hidden.clone()
    perturbed[:2] += 5.0
    out, out_perturbed = (run_hooked(attention, h, make_state(layout)) for h in (hidden, perturbed))
    torch.testing.assert_close(out_perturbed[2:], out[2:], rtol=0, atol=1e-12)


def test_whole_batch_context_only_when_one_group_covers_every_row():
    hidden = hidden_states(6)
    groups = make_state(CFG_LAYOUT).contexts_for(LAYER, hidden)
    assert whole_batch_context(groups, 6) is groups[0].context
    layout = RowLayout((0, 1, 2), (C, C, C))
    groups = make_state(layout, groups={0: {"a"}, 1: {"a"}, 2: set()}).contexts_for(LAYER, hidden[:3])
    assert [g.rows for g in groups] == [(0, 1)] and whole_batch_context(groups, 3) is None


def test_context_holds_own_tokens_plus_round_rate_n_per_peer():
    layout = RowLayout((0, 1, 2, 0, 1, 2), (C, C, C, U, U, U))
    hidden = hidden_states(6)
    state = make_state(layout, rate=0.3)
    (group,) = state.contexts_for(LAYER, hidden)
    assert group.rows == tuple(range(6))
    assert group.context.shape == (6, TOKENS + 2 * round(0.3 * TOKENS), CHANNELS)
    assert torch.equal(group.context[:, :TOKENS], hidden)  # all own tokens, first


def test_sampled_tokens_come_from_peers_without_replacement():
    indices = sample_token_indices(100, 37, [0, 5, 9], (1, "step", "layer"))
    assert indices.shape == (3, 37)
    for row in indices:
        assert len(set(row.tolist())) == 37 and 0 <= int(row.min()) and int(row.max()) < 100


def test_same_seed_same_output_and_different_seed_different_sample(attention):
    hidden = hidden_states(6)
    first, again = (run_hooked(attention, hidden, make_state(CFG_LAYOUT, seed=11)) for _ in range(2))
    other = run_hooked(attention, hidden, make_state(CFG_LAYOUT, seed=12))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    step = StepKey(0, 3, 2.5)
    assert not torch.equal(sample_token_indices(TOKENS, 8, [0], (11, step, "output.3.0")),
                           sample_token_indices(TOKENS, 8, [0], (12, step, "output.3.0")))


def test_sample_depends_on_step_and_layer_not_on_call_order_or_batch():
    step = StepKey(0, 3, 2.5)
    alone = sample_token_indices(64, 16, [4], (1, step, "output.3.0"))
    in_batch = sample_token_indices(64, 16, [9, 4, 2], (1, step, "output.3.0"))
    assert torch.equal(alone[0], in_batch[1])
    assert not torch.equal(alone, sample_token_indices(64, 16, [4], (1, StepKey(0, 4, 2.0), "output.3.0")))
    assert not torch.equal(alone, sample_token_indices(64, 16, [4], (1, step, "output.4.0")))


def test_split_cfg_calls_give_the_same_rows_as_one_call(attention):
    hidden = hidden_states(6)
    together = run_hooked(attention, hidden, make_state(CFG_LAYOUT))
    cond = run_hooked(attention, hidden[:3], make_state(CFG_LAYOUT.rows(0, 3)))
    uncond = run_hooked(attention, hidden[3:], make_state(CFG_LAYOUT.rows(3, 6)))
    torch.testing.assert_close(torch.cat((cond, uncond)), together, rtol=0, atol=1e-12)


def test_unknown_or_mismatched_layout_passes_through(attention):
    hidden = hidden_states(6)
    base = plain(attention, hidden)
    assert torch.equal(run_hooked(attention, hidden, make_state(UNKNOWN_LAYOUT)), base)
    assert torch.equal(run_hooked(attention, hidden, make_state(RowLayout((0, 1), (C, C)))), base)


def test_official_schedule_first_step_is_plain_and_skip_rates_follow_the_paper():
    assert not share_at_step(Schedule.OFFICIAL, 0, 50, stable_seed("any"))
    assert share_at_step(Schedule.ALWAYS, 0, 50, stable_seed("any"))
    layers = [("output", block, t) for block in range(6) for t in range(10)]

    def shares(steps):
        return [share_at_step(Schedule.OFFICIAL, s, 50, stable_seed(5, s, layer)) for s in steps for layer in layers]

    early, late = shares(range(1, 20)), shares(range(20, 50))  # 40 % of 50 steps = 20
    assert abs(early.count(False) / len(early) - 0.3) < 0.05
    assert abs(late.count(False) / len(late) - 0.1) < 0.04


def test_official_schedule_applies_per_step_in_the_hook(attention):
    hidden = hidden_states(6)
    assert torch.equal(run_hooked(attention, hidden, make_state(CFG_LAYOUT, schedule="official", step=0)),
                       plain(attention, hidden))


@pytest.mark.parametrize("policy, layer, grid, selected", [
    ("up_low_res", ("output", 0, 0), TokenGrid(32, 32, 2), True),  # SDXL up_blocks.0 at image/32
    ("up_low_res", ("output", 5, 1), TokenGrid(64, 64, 1), True),  # SDXL up_blocks.1 at image/16
    ("up_low_res", ("output", 4, 0), TokenGrid(16, 16, 2), True),  # SD1.5 output_blocks 3-5 at image/32
    ("up_low_res", ("output", 7, 0), TokenGrid(32, 32, 1), True),  # SD1.5 output_blocks 6-8 at image/16
    ("up_low_res", ("output", 10, 0), TokenGrid(64, 64, 0), False),  # SD1.5 output_blocks 9-11 at image/8
    ("up_low_res", ("input", 4, 0), TokenGrid(32, 32, 1), False),
    ("up_low_res", ("middle", 0, 0), TokenGrid(8, 8, 3), False),
    ("up_low_res", ("output", 3, 0), None, False),  # size unknown
    ("up", ("output", 10, 0), TokenGrid(64, 64, 0), True),
    ("up", ("input", 1, 0), TokenGrid(64, 64, 0), False),
    ("all", ("input", 1, 0), TokenGrid(64, 64, 0), True),
    ("all", ("middle", 0, 0), None, True),
])
def test_layer_policies(policy, layer, grid, selected):
    assert layer_is_selected(LayerPolicy(policy), layer, grid) is selected


def test_layer_policy_uses_the_latent_size_in_the_hook(attention):
    hidden = hidden_states(6)  # 16 tokens: a 4x4 grid
    base = plain(attention, hidden)
    state = make_state(CFG_LAYOUT, policy="up_low_res")
    state.latent_hw = (8, 8)  # 4x4 is latent/2 = image/16 -> shared
    assert not torch.allclose(run_hooked(attention, hidden, state), base)
    state = make_state(CFG_LAYOUT, policy="up_low_res")
    state.latent_hw = (4, 4)  # 4x4 is the latent itself = image/8 -> not shared
    assert torch.equal(run_hooked(attention, hidden, state), base)


def test_settings_validate_and_accept_strings():
    settings = CsaSettings(0.25, "always", "up")
    assert settings.schedule is Schedule.ALWAYS and settings.layer_policy is LayerPolicy.UP
    with pytest.raises(ValueError, match="rate"):
        CsaSettings(1.5)
    with pytest.raises(ValueError, match="schedule"):
        CsaSettings(0.5, "sometimes")
    with pytest.raises(ValueError, match="layer_policy"):
        CsaSettings(0.5, "always", "down")
    with pytest.raises(ValueError, match="frame_groups"):
        ConsistencyState(CsaSettings(), 0, {0: "hero"})


def test_step_key_tells_sigmas_apart_but_ignores_float_noise():
    assert StepKey(0, 3, 1.2345678) == StepKey(0, 3, 1.23456780001)
    assert StepKey(0, 3, 1.2345678) != StepKey(0, 3, 1.25)
    assert StepKey(0, 3, 1.0) != StepKey(1, 3, 1.0)
