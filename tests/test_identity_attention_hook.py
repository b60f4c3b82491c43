"""IPCA hook on a real attention module: cond rows get the identity tokens, other rows are untouched."""
from __future__ import annotations

import torch

from lib_consistency.attention_hooks import remove_stale_hooks
from lib_consistency.identity_attention_hook import IdentityAttentionState, install_identity_hooks
from lib_consistency.identity_cross_attention import append_identity_tokens
from lib_consistency.row_layout import UNKNOWN_LAYOUT, Role, RowLayout
from lib_consistency.consistent_self_attention import StepKey
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
