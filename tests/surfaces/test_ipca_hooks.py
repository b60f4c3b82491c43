"""IPCA hook on a real attention module: cond rows get the identity tokens, other rows are untouched."""
from __future__ import annotations

import torch

from lib_consistency.common.addresses import StepKey
from lib_consistency.common.row_layout import UNKNOWN_LAYOUT, Role, RowLayout
from lib_consistency.one_prompt_one_story.ipca import (IdentityAttentionState, append_identity_tokens, dropout_bias,
                                                       identity_columns)
from lib_consistency.surfaces.attention_modules import install_identity_hooks
from lib_consistency.surfaces.instance_hooks import remove_stale_hooks
from tests.fake_webui import ToyAttention

IDENTITY = (0, 1, 2, 3)


def setup(dropout=0.0):
    torch.manual_seed(0)
    module = ToyAttention(8, 12)
    hidden, context = torch.randn(3, 16, 8), torch.randn(3, 77, 12)
    state = IdentityAttentionState(IDENTITY, dropout, run_seed=7, step=StepKey(0, 1, 5.0),
                                   layout=RowLayout((0, 1, 0), (Role.COND, Role.COND, Role.UNCOND)))
    return module, hidden, context, state


def test_cond_rows_attend_to_appended_identity_and_uncond_rows_are_untouched():
    module, hidden, context, state = setup()
    plain = [module(hidden[r:r + 1], context=context[r:r + 1]) for r in range(3)]
    hooks = install_identity_hooks([(("output", 3, 0), module)], state)
    out = module(hidden, context=context)
    for hook in hooks:
        hook.remove()
    cond = module(hidden[:2], context=append_identity_tokens(context[:2], IDENTITY))
    torch.testing.assert_close(out[:2], cond, rtol=1e-6, atol=1e-6)
    assert torch.equal(out[2:], plain[2])
    assert not torch.allclose(out[0], plain[0][0], atol=1e-4)


def test_perturbing_uncond_rows_does_not_change_cond_rows():
    module, hidden, context, state = setup()
    install_identity_hooks([(("output", 3, 0), module)], state)
    out = module(hidden, context=context)
    hidden2, context2 = hidden.clone(), context.clone()
    hidden2[2] += 1.0
    context2[2] -= 1.0
    out2 = module(hidden2, context=context2)
    assert torch.equal(out[:2], out2[:2])


def test_unknown_layout_closed_state_and_removal_pass_through():
    module, hidden, context, state = setup()
    plain = module(hidden, context=context)
    hooks = install_identity_hooks([(("output", 3, 0), module)], state)
    state.layout = UNKNOWN_LAYOUT
    assert torch.equal(module(hidden, context=context), plain)
    state.layout = RowLayout((0, 1, 0), (Role.COND, Role.COND, Role.UNCOND))
    state.closed = True
    assert torch.equal(module(hidden, context=context), plain)
    state.closed = False
    assert not torch.equal(module(hidden, context=context), plain)
    assert remove_stale_hooks(module) == 1 and "forward" not in module.__dict__
    assert torch.equal(module(hidden, context=context), plain)
    assert hooks[0].retired


def test_dropout_variant_is_seeded_and_matches_bias_reference():
    module, hidden, context, state = setup(dropout=0.5)
    install_identity_hooks([(("output", 3, 0), module)], state)
    a, b = module(hidden, context=context), module(hidden, context=context)
    assert torch.equal(a, b)  # same (run seed, step, layer): same mask
    state.step = StepKey(0, 2, 4.0)
    c = module(hidden, context=context)
    assert not torch.equal(a[:2], c[:2]) and torch.equal(a[2:], c[2:])
    # p = 1 keeps no identity duplicate: plain attention for the cond rows
    state.dropout = 1.0
    remove_stale_hooks(module)
    plain = module(hidden, context=context)
    install_identity_hooks([(("output", 3, 0), module)], state)
    torch.testing.assert_close(module(hidden, context=context), plain, rtol=1e-5, atol=1e-5)


def test_self_attention_calls_pass_through():
    """attn-style calls without a text context (self-attention) are never touched."""
    _, hidden, _, state = setup()
    module = ToyAttention(8, 8)  # a self-attention module (context width = query width)
    plain = module(hidden)
    install_identity_hooks([(("output", 3, 0), module)], state)
    assert torch.equal(module(hidden), plain)


# --- dropout masks belong to frames, not rows ----------------------------------------------------------------


def test_dropout_mask_of_a_frame_does_not_depend_on_its_row_or_batch():
    _, _, _, state = setup(dropout=0.5)
    layer = ("output", 3, 0)
    alone = dropout_bias(state, layer, [3], 16, 77, IDENTITY, torch.zeros(1))
    in_batch = dropout_bias(state, layer, [0, 5, 3], 16, 77, IDENTITY, torch.zeros(1))
    assert torch.equal(in_batch[2], alone[0])                      # frame 3 in row 2 of a batch of 3, or alone
    assert not torch.equal(in_batch[0], alone[0])                  # frame 0 has its own mask
    assert torch.equal(dropout_bias(state, layer, [0], 16, 77, IDENTITY, torch.zeros(1))[0], in_batch[0])
    other_layer = dropout_bias(state, ("output", 4, 0), [3], 16, 77, IDENTITY, torch.zeros(1))
    assert not torch.equal(other_layer, alone)


def test_hooked_dropout_output_of_a_frame_is_the_same_in_any_batch():
    """Frame 3 as row 0 of one UNet call or row 1 of another (with frame 0 before it): the same output row."""
    torch.manual_seed(4)
    module = ToyAttention(8, 12)
    hidden, context = torch.randn(1, 16, 8), torch.randn(1, 77, 12)
    other_hidden, other_context = torch.randn(1, 16, 8), torch.randn(1, 77, 12)
    state = IdentityAttentionState(IDENTITY, 0.5, run_seed=7, step=StepKey(0, 1, 5.0),
                                   layout=RowLayout((3,), (Role.COND,)))
    install_identity_hooks([(("output", 3, 0), module)], state)
    alone = module(hidden, context=context)
    state.layout = RowLayout((0, 3, 0, 3), (Role.COND, Role.COND, Role.UNCOND, Role.UNCOND))
    batch = module(torch.cat([other_hidden, hidden, other_hidden, hidden]),
                   context=torch.cat([other_context, context, other_context, context]))
    torch.testing.assert_close(batch[1], alone[0], rtol=1e-6, atol=1e-6)
    state.layout = RowLayout((0,), (Role.COND,))  # the same row as frame 0: another mask, another output
    assert not torch.allclose(module(hidden, context=context), alone, atol=1e-4)


# --- contexts longer than one 77-token chunk ------------------------------------------------------------------


def test_tiled_context_gets_ipca_on_every_copy_and_equals_one_chunk():
    """Forge repeats a 77-token cond to a longer uncond's length: attention over n copies is attention over one,
    so IPCA over the copies must equal IPCA over the single chunk."""
    module, hidden, context, state = setup()
    assert identity_columns(context.repeat(1, 2, 1), IDENTITY) == IDENTITY + tuple(77 + p for p in IDENTITY)
    install_identity_hooks([(("output", 3, 0), module)], state)
    single = module(hidden, context=context)
    for copies in (2, 3):
        tiled = module(hidden, context=context.repeat(1, copies, 1))
        torch.testing.assert_close(tiled, single, rtol=1e-5, atol=1e-5)
    state.dropout = 0.5
    torch.testing.assert_close(module(hidden, context=context.repeat(1, 2, 1))[2], single[2], rtol=1e-5, atol=1e-5)


def test_padded_context_gets_ipca_on_our_chunk_only():
    """A1111's pad options append other chunks (the empty prompt) after our context: only ours is doubled."""
    module, hidden, context, state = setup()
    padding = torch.randn(3, 77, 12)
    padded = torch.cat([context, padding], dim=1)
    assert identity_columns(padded, IDENTITY) == IDENTITY
    install_identity_hooks([(("output", 3, 0), module)], state)
    out = module(hidden, context=padded)
    remove_stale_hooks(module)
    expected = module(hidden[:2], context=append_identity_tokens(padded[:2], IDENTITY))
    torch.testing.assert_close(out[:2], expected, rtol=1e-6, atol=1e-6)


def test_unreadable_context_length_passes_through_with_one_warning(caplog):
    import logging
    module, hidden, context, state = setup()
    odd = torch.cat([context, context[:, :23]], dim=1)  # 100 tokens: not whole chunks
    assert identity_columns(odd, IDENTITY) is None and identity_columns(context[:, :40], IDENTITY) is None
    plain = module(hidden, context=odd)
    install_identity_hooks([(("output", 3, 0), module)], state)
    with caplog.at_level(logging.WARNING, logger="lib_consistency.one_prompt_one_story.ipca"):
        assert torch.equal(module(hidden, context=odd), plain)
        assert torch.equal(module(hidden, context=odd), plain)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "IPCA skipped for a 100-token cond context" in warnings[0]
