"""StorySync masked cross-image sharing (paper §3.2.1, Eqs. 5-8) through a real multi-head attention module."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from lib_consistency.common.addresses import StepKey
from lib_consistency.common.row_layout import Role, RowLayout
from lib_consistency.story_diffusion.consistent_self_attention import attend_in_groups
from lib_consistency.story_sync.masked_sharing import (PAD_MULTIPLE, masked_peer_contexts, peer_token_mask,
                                                       plan_masked_sharing, reference_peers, sharing_masks)
from lib_consistency.surfaces.attention_modules import padded_attention_forward
from tests.fake_webui import ToyAttention

C, U, O = Role.COND, Role.UNCOND, Role.OTHER
TOKENS, CHANNELS, HEADS = 12, 8, 2
SEED_PARTS = (7, StepKey(0, 3, 2.5), "output.3.0")


def make_module(dtype=torch.float64) -> ToyAttention:
    torch.manual_seed(0)
    return ToyAttention(CHANNELS, CHANNELS, HEADS).to(dtype)


def hidden_states(rows: int, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(rows, TOKENS, CHANNELS, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def random_mask(seed: int, p: float = 0.5) -> torch.Tensor:
    return torch.rand(TOKENS, generator=torch.Generator().manual_seed(seed)) < p


def character_masks(frame_characters, seed: int = 10):
    return {frame: {name: random_mask(seed + 10 * frame + i) for i, name in enumerate(sorted(chars))}
            for frame, chars in frame_characters.items()}


def groups_of(frame_characters):
    return {frame: frozenset(chars) for frame, chars in frame_characters.items()}


def module_attention(module):
    """What a hook's attention does: the module's forward, or over padded contexts the key-padding form."""
    def attention(rows, context, visible=None):
        if visible is None:
            return module(rows, context=context)
        return padded_attention_forward(module, rows, context, visible)
    return attention


def masked_attention(module, hidden, peers):
    """What a hook does: one attention call on [own ; masked peer tokens], padded to one length."""
    groups = masked_peer_contexts(hidden, peers)
    with torch.no_grad():
        return attend_in_groups(module_attention(module), hidden, groups)


def plain(module, hidden):
    with torch.no_grad():
        return module(hidden)


def naive_log_mask(module, hidden, peers):
    """Eqs. 5-8 written out in float64: softmax(Q_i K_allᵀ/√d + log Γ_i) V_all over every row's keys."""
    module = copy.deepcopy(module).double()
    hidden = hidden.double()
    rows = hidden.shape[0]
    d = CHANNELS // HEADS
    with torch.no_grad():
        everything = hidden.reshape(rows * TOKENS, CHANNELS)
        k_all, v_all = module.to_k(everything), module.to_v(everything)
        outputs = []
        for row in range(rows):
            gamma = torch.zeros(rows, TOKENS, dtype=torch.float64)
            gamma[row] = 1.0  # δ_ii = 1: every own token
            for peer, mask in peers[row]:
                gamma[peer] = mask.double()
            log_gamma = gamma.flatten().log()  # log 0 = -inf removes the key
            q = module.to_q(hidden[row])
            heads = []
            for h in range(HEADS):
                part = slice(h * d, (h + 1) * d)
                weights = torch.softmax(q[:, part] @ k_all[:, part].T / math.sqrt(d) + log_gamma, dim=-1)
                heads.append(weights @ v_all[:, part])
            outputs.append(module.to_out(torch.cat(heads, dim=1)))
        return torch.stack(outputs)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_equals_naive_log_mask_attention_over_all_rows(dtype, tolerance):
    hidden = hidden_states(5, dtype=dtype)
    full = torch.ones(TOKENS, dtype=torch.bool)
    peers = [[(1, random_mask(1)), (2, random_mask(2))],
             [(0, random_mask(3)), (3, full)],
             [(4, random_mask(4, 0.8)), (0, random_mask(5, 0.3)), (1, random_mask(6))],
             [],  # no peer: plain attention
             [(2, torch.zeros(TOKENS, dtype=torch.bool))]]  # only an empty mask: plain attention
    counts = {row: TOKENS + sum(int(m.sum()) for _, m in p) for row, p in enumerate(peers)}
    groups = masked_peer_contexts(hidden, peers)
    assert len(groups) == 1 and groups[0].rows == (0, 1, 2, 3, 4)  # one attention call for every row
    length = groups[0].context.shape[1]
    assert length % PAD_MULTIPLE == 0 and max(counts.values()) <= length < max(counts.values()) + PAD_MULTIPLE
    assert groups[0].visible.sum(1).tolist() == [counts[row] for row in range(5)]  # each row's real keys first
    assert all(groups[0].visible[row, :counts[row]].all() for row in range(5))
    module = make_module(dtype)
    out = masked_attention(module, hidden, peers)
    torch.testing.assert_close(out.double(), naive_log_mask(module, hidden, peers), rtol=0, atol=tolerance)
    assert not torch.allclose(out[0], plain(module, hidden)[0])


def test_rows_with_equal_lengths_share_one_group_and_context_is_own_then_peers_in_order():
    hidden = hidden_states(3)
    mask_a, mask_b = random_mask(1), random_mask(2)
    extra = torch.zeros(TOKENS, dtype=torch.bool)
    extra[: int(mask_b.sum())] = True  # as many tokens as mask_b
    groups = masked_peer_contexts(hidden, [[(2, mask_a), (1, mask_b)], [(0, extra)], [(0, mask_b)]])
    (group,) = groups
    real = {row: group.context[row][group.visible[row]] for row in range(3)}
    assert torch.equal(real[0], torch.cat((hidden[0], hidden[2][mask_a], hidden[1][mask_b])))
    assert torch.equal(real[1], torch.cat((hidden[1], hidden[0][extra])))
    assert torch.equal(real[2], torch.cat((hidden[2], hidden[0][mask_b])))
    assert not group.visible[:, -1].all()  # padded to one length


def test_peer_tokens_outside_the_shared_characters_masks_change_nothing():
    chars = {0: {"anna"}, 1: {"anna", "ben"}, 2: {"ben"}}
    masks = character_masks(chars)
    layout = RowLayout((0, 1, 2), (C, C, C))
    peers = sharing_masks(layout, groups_of(chars), masks)
    assert [[p for p, _ in row] for row in peers] == [[1], [0, 2], [1]]
    module = make_module(torch.float32)
    hidden = hidden_states(3, dtype=torch.float32)
    base = masked_attention(module, hidden, peers)

    outside_anna = hidden.clone()
    outside_anna[1, ~masks[1]["anna"]] += 3.0  # background and ben-only tokens of frame 1
    assert torch.equal(masked_attention(module, outside_anna, peers)[0], base[0])
    outside_ben = hidden.clone()
    outside_ben[1, ~masks[1]["ben"]] += 3.0
    assert torch.equal(masked_attention(module, outside_ben, peers)[2], base[2])
    unshared = hidden.clone()
    unshared[2] += 3.0  # frames 0 and 2 have no character in common
    assert torch.equal(masked_attention(module, unshared, peers)[0], base[0])

    inside_anna = hidden.clone()
    inside_anna[1, masks[1]["anna"] & ~masks[1]["ben"]] += 3.0
    assert not torch.allclose(masked_attention(module, inside_anna, peers)[0], base[0])


def test_nc_frames_and_roles_never_mix():
    chars = {0: {"anna"}, 1: {"anna"}, 2: set()}
    masks = character_masks(chars)
    layout = RowLayout((0, 1, 2, 0, 1, 2, 0, 1), (C, C, C, U, U, U, O, O))
    peers = sharing_masks(layout, groups_of(chars), masks)
    assert [[p for p, _ in row] for row in peers] == [[1], [0], [], [4], [3], [], [], []]
    assert torch.equal(peers[3][0][1], peers[0][0][1])  # uncond rows use the cond masks of the frame
    assert torch.equal(peers[0][0][1], masks[1]["anna"])

    module = make_module()
    hidden = hidden_states(8)
    base = masked_attention(module, hidden, peers)
    for rows in ((2,), (5,), (6, 7)):  # [NC] cond, [NC] uncond, role OTHER: plain attention
        assert torch.equal(base[list(rows)], plain(module, hidden[list(rows)]))
    uncond_moved = hidden.clone()
    uncond_moved[3:6] += 3.0
    assert torch.equal(masked_attention(module, uncond_moved, peers)[:3], base[:3])
    other_moved = hidden.clone()
    other_moved[6:] += 3.0
    assert torch.equal(masked_attention(module, other_moved, peers)[:6], base[:6])


def test_reference_subset_non_references_read_only_references():
    chars = {frame: {"anna"} for frame in range(4)}
    masks = character_masks(chars)
    layout = RowLayout((0, 1, 2, 3), (C,) * 4)
    peers = sharing_masks(layout, groups_of(chars), masks, reference_frames={0, 1})
    assert [[p for p, _ in row] for row in peers] == [[1], [0], [0, 1], [0, 1]]
    module = make_module()
    hidden = hidden_states(4)
    base = masked_attention(module, hidden, peers)
    moved = hidden.clone()
    moved[3] += 3.0
    assert torch.equal(masked_attention(module, moved, peers)[:3], base[:3])
    torch.testing.assert_close(base, naive_log_mask(module, hidden, peers), rtol=0, atol=1e-12)


def test_cached_references_equal_references_in_the_batch():
    chars = {0: {"anna"}, 1: {"anna", "ben"}, 2: {"anna"}, 3: {"ben"}, 4: set()}
    masks = character_masks(chars)
    frames = (0, 1, 2, 3, 4)
    together = RowLayout(frames + frames, (C,) * 5 + (U,) * 5)
    hidden = hidden_states(10)
    module = make_module()
    kwargs = dict(p_share=0.4, seed_parts=SEED_PARTS)
    in_batch = masked_attention(module, hidden, sharing_masks(together, groups_of(chars), masks,
                                                              reference_frames=(0, 1), **kwargs))
    later = RowLayout((3, 2, 4, 3, 2, 4), (C, C, C, U, U, U))
    entries = [(role, frame) for role in (C, U) for frame in (0, 1)]  # the bank: sources 6.. of the call
    bank = torch.cat([hidden[5 * (role is U) + frame] for role, frame in entries])
    peers = reference_peers(later, entries, groups_of(chars), masks, **kwargs)
    assert [[source for source, _ in row] for row in peers] == [[7], [6, 7], [], [9], [8, 9], []]  # [NC]: none
    later_hidden = hidden[[3, 2, 4, 8, 7, 9]]
    plan = plan_masked_sharing(6, TOKENS, peers, "cpu", num_sources=6 + len(entries))
    with torch.no_grad():
        out = attend_in_groups(module_attention(module), later_hidden, [plan.group(later_hidden, bank)])
    torch.testing.assert_close(out, in_batch[[3, 2, 4, 8, 7, 9]], rtol=0, atol=1e-12)


def test_empty_masks_are_plain_attention_bit_for_bit():
    chars = {0: {"anna"}, 1: {"anna"}, 2: {"anna"}}
    empty = {frame: {"anna": torch.zeros(TOKENS, dtype=torch.bool)} for frame in chars}
    layout = RowLayout((0, 1, 2, 0, 1, 2), (C, C, C, U, U, U))
    module = make_module(torch.float32)
    hidden = hidden_states(6, dtype=torch.float32)
    dropped = sharing_masks(layout, groups_of(chars), character_masks(chars), p_share=1.0, seed_parts=SEED_PARTS)
    for peers in (sharing_masks(layout, groups_of(chars), empty), dropped):
        assert masked_peer_contexts(hidden, peers) == []
        assert torch.equal(masked_attention(module, hidden, peers), plain(module, hidden))


def test_share_dropout_belongs_to_the_frame_pair_not_to_rows_or_batches():
    chars = {frame: {"anna"} for frame in range(6)}
    masks = {frame: {"anna": torch.ones(64, dtype=torch.bool)} for frame in chars}
    first = sharing_masks(RowLayout((0, 1, 2), (C, C, C)), groups_of(chars), masks, p_share=0.5,
                          seed_parts=SEED_PARTS)
    moved = sharing_masks(RowLayout((5, 2, 0, 5, 2, 0), (C, C, C, U, U, U)), groups_of(chars), masks,
                          p_share=0.5, seed_parts=SEED_PARTS)
    zero_to_two = first[0][1][1]
    assert [p for p, _ in moved[2]] == [0, 1] and [p for p, _ in moved[5]] == [3, 4]
    assert torch.equal(moved[2][1][1], zero_to_two) and torch.equal(moved[5][1][1], zero_to_two)
    assert 10 < int(zero_to_two.sum()) < 54  # about half kept
    assert not torch.equal(first[0][0][1], zero_to_two)  # another peer frame, another draw
    other_step = peer_token_mask(0, 2, groups_of(chars), masks, 0.5, (7, StepKey(0, 4, 2.0), "output.3.0"))
    other_layer = peer_token_mask(0, 2, groups_of(chars), masks, 0.5, (7, StepKey(0, 3, 2.5), "output.4.0"))
    assert not torch.equal(other_step, zero_to_two) and not torch.equal(other_layer, zero_to_two)
    some = character_masks(chars)
    dropped = peer_token_mask(0, 2, groups_of(chars), some, 0.5, SEED_PARTS)
    assert not (dropped & ~some[2]["anna"]).any()  # dropout only removes tokens
    assert peer_token_mask(0, 2, groups_of(chars), some, 0.0, SEED_PARTS) is some[2]["anna"]


def test_bad_peer_lists_are_refused():
    hidden = hidden_states(2)
    with pytest.raises(ValueError, match="peer row 0"):
        masked_peer_contexts(hidden, [[(0, random_mask(1))], []])
    with pytest.raises(ValueError, match="expected bool"):
        masked_peer_contexts(hidden, [[(1, random_mask(1).float())], []])
    with pytest.raises(ValueError, match="twice"):
        masked_peer_contexts(hidden, [[(1, random_mask(1)), (1, random_mask(2))], []])
    with pytest.raises(ValueError, match="2 rows"):
        masked_peer_contexts(hidden, [[]])


def test_equal_context_lengths_need_no_padding_and_go_to_the_hosts_attention():
    hidden = hidden_states(3)
    first, second, third = (torch.zeros(TOKENS, dtype=torch.bool) for _ in range(3))
    first[:3], second[4:7], third[1:4] = True, True, True  # three peer tokens for every row
    (group,) = masked_peer_contexts(hidden, [[(1, first)], [(2, second)], [(0, third)]])
    assert group.visible is None and group.context.shape[1] == TOKENS + 3
    calls = []
    attend_in_groups(lambda rows, context, *rest: calls.append(rest) or rows, hidden, [group])
    assert calls == [()]  # the two-argument form: the host's own attention module
