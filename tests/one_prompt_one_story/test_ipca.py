"""IPCA: the official separate-identity-pass form equals the context-append and logit-bias forms."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lib_consistency.one_prompt_one_story.ipca import append_identity_tokens, attention_with_bias, identity_logit_bias
from lib_consistency.one_prompt_one_story.svr import svr_frame_context
from lib_consistency.one_prompt_one_story.token_plan import plan_tokens
from tests.conftest import tiny_clip_text_model

HEADS, DIM_HEAD, QUERY_DIM, TEXT_DIM, QUERIES = 2, 8, 16, 32, 64


class TinyCrossAttention(torch.nn.Module):
    """Multi-head cross-attention with its own projections (the shape of attn2 in both hosts)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.to_q = torch.nn.Linear(QUERY_DIM, HEADS * DIM_HEAD, bias=False)
        self.to_k = torch.nn.Linear(TEXT_DIM, HEADS * DIM_HEAD, bias=False)
        self.to_v = torch.nn.Linear(TEXT_DIM, HEADS * DIM_HEAD, bias=False)

    def heads(self, t):
        return t.unflatten(-1, (HEADS, DIM_HEAD)).transpose(1, 2)  # [R, H, T, d]

    def qkv(self, x, context):
        return self.heads(self.to_q(x)), self.heads(self.to_k(context)), self.heads(self.to_v(context))


def encode(encoder, tokenizer, text):
    ids = tokenizer(text, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return encoder(ids, output_hidden_states=True).hidden_states[-2]  # [1, 77, D]


@pytest.fixture(scope="module")
def story_conditioning(clip_tokenizer, tokenize):
    identity, frames = "a watercolor painting of a grey cat with green eyes", ["sits on a roof", "chases a moth"]
    encoder = tiny_clip_text_model(TEXT_DIM, seed=3)
    plan = plan_tokens(identity, frames, tokenize)
    consolidated = encode(encoder, clip_tokenizer, plan.texts[0])
    identity_pass = encode(encoder, clip_tokenizer, identity)
    fp = plan.frames[0]
    frame_context = svr_frame_context(consolidated[0], fp)[None]
    return fp, frame_context, identity_pass


def test_causal_encoder_gives_identical_identity_rows(story_conditioning):
    """The derivation's premise: SOT + identity rows do not depend on the frame text that follows."""
    fp, frame_context, identity_pass = story_conditioning
    rows = list(fp.identity_positions)
    torch.testing.assert_close(frame_context[0, rows], identity_pass[0, rows], rtol=1e-5, atol=1e-5)


def official_ipca(attn, x, frame_context, identity_pass, keep_columns, dropout_keep=None):
    """The official form: keys/values of the frame, then of the identity pass masked to SOT + identity
    (EOT and padding masked out; dropout multiplies the kept stored columns by a Bernoulli mask)."""
    q, k, v = attn.qkv(x, frame_context)
    _, k_id, v_id = attn.qkv(x, identity_pass)
    keep = torch.zeros(x.shape[1], 77)
    keep[:, keep_columns] = 1.0 if dropout_keep is None else dropout_keep
    mask = torch.cat([torch.zeros(x.shape[1], 77), torch.log(keep)], dim=1)
    return F.scaled_dot_product_attention(q, torch.cat([k, k_id], 2), torch.cat([v, v_id], 2), attn_mask=mask)


def test_append_and_bias_forms_equal_the_official_identity_pass(story_conditioning):
    fp, frame_context, identity_pass = story_conditioning
    attn, x = TinyCrossAttention(), torch.randn(1, QUERIES, QUERY_DIM)
    official = official_ipca(attn, x, frame_context, identity_pass, list(fp.identity_positions))

    appended = append_identity_tokens(frame_context, fp.identity_positions)
    assert appended.shape == (1, 77 + len(fp.identity_positions), TEXT_DIM)
    append_form = F.scaled_dot_product_attention(*attn.qkv(x, appended))

    bias = identity_logit_bias(77, fp.identity_positions)
    bias_form = attention_with_bias(*attn.qkv(x, frame_context), bias)

    plain = F.scaled_dot_product_attention(*attn.qkv(x, frame_context))
    torch.testing.assert_close(append_form, official, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias_form, official, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, official, atol=1e-4)  # IPCA does change the attention


def test_dropout_bias_equals_official_dropout_mask(story_conditioning):
    fp, frame_context, identity_pass = story_conditioning
    attn, x = TinyCrossAttention(seed=1), torch.randn(1, QUERIES, QUERY_DIM)
    columns = list(fp.identity_positions)
    bias = identity_logit_bias(77, columns, n_queries=QUERIES, dropout=0.5, generator=torch.Generator().manual_seed(7))
    draw = torch.rand(QUERIES, len(columns), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    keep = (draw >= 0.5).float()
    assert 0 < keep.mean() < 1
    official = official_ipca(attn, x, frame_context, identity_pass, columns, dropout_keep=keep)
    ours = attention_with_bias(*attn.qkv(x, frame_context), bias)
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-5)


def test_dropout_edges_and_reproducibility():
    cols = (0, 1, 2, 3)
    plain = identity_logit_bias(77, cols)
    assert plain.shape == (1, 77)
    assert torch.equal(plain[0, list(cols)], torch.full((4,), math.log(2.0)))
    assert torch.count_nonzero(plain) == 4
    no_keep = identity_logit_bias(77, cols, n_queries=5, dropout=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.count_nonzero(no_keep) == 0
    a = identity_logit_bias(77, cols, n_queries=9, dropout=0.5, generator=torch.Generator().manual_seed(1))
    b = identity_logit_bias(77, cols, n_queries=9, dropout=0.5, generator=torch.Generator().manual_seed(1))
    c = identity_logit_bias(77, cols, n_queries=9, dropout=0.5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert all(v == 0.0 or v == pytest.approx(math.log(2.0)) for v in a.unique().tolist())


def test_dropout_arguments_are_checked():
    with pytest.raises(ValueError, match="generator"):
        identity_logit_bias(77, (0,), dropout=0.3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        identity_logit_bias(77, (0,), dropout=1.5)


def test_bias_touches_only_rows_that_carry_it():
    """A mixed cond/uncond call: zero bias rows (uncond) get plain attention."""
    attn = TinyCrossAttention(seed=2)
    x, context = torch.randn(2, QUERIES, QUERY_DIM), torch.randn(2, 77, TEXT_DIM)
    bias = torch.zeros(2, 1, 1, 77)
    bias[0] = identity_logit_bias(77, (0, 1, 2))  # row 0 cond, row 1 uncond
    out = attention_with_bias(*attn.qkv(x, context), bias)
    plain = F.scaled_dot_product_attention(*attn.qkv(x, context))
    torch.testing.assert_close(out[1], plain[1], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out[0], plain[0], atol=1e-4)
