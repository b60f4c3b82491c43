"""SVR+/SVR- and NPR on per-frame conditioning (methods.md §2.3, §2.4, §2.8 Step C)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lib_consistency.one_prompt_one_story.svr import (SDXL_ENCODER_SLICES, SvrRangeError, encoder_slices,
                                                      npr_frame_context, reweight_singular_values, svr_frame_context)
from lib_consistency.one_prompt_one_story.token_plan import plan_tokens
from tests.conftest import tiny_clip_text_model

STORY = ("a knight in silver armor", ["rides a horse", "reads a long letter", "sleeps by the fire"])


def plan_for(tokenize=str.split, story=STORY, **kwargs):
    return plan_tokens(story[0], story[1], tokenize, **kwargs)


def random_context(width=24, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(77, width, generator=g, dtype=torch.float64) * 3).to(dtype)


def reference_svr(context, fp, enh, sup, eot_mode, slices):
    """Independent numpy implementation of methods.md §2.8 Step C."""
    x_all = context.double().numpy().copy()
    eot = list(range(fp.eot_start, context.shape[0]))
    calls = [(fp.span_of(k), *sup, -1) for k in fp.suppressed] + [(fp.span_of(fp.frame), *enh, +1)]
    for lo, hi in slices:
        x = x_all[:, lo:hi]
        for span, alpha, beta, sign in calls:
            rows = list(range(span.start, span.stop)) + (eot if eot_mode == "svd" else [])
            u, s, vt = np.linalg.svd(x[rows], full_matrices=False)
            x[rows] = (u * (beta * s * np.exp(sign * alpha * s))) @ vt
            if eot_mode == "scale":
                x[eot] *= 0.9
    return torch.from_numpy(x_all)


def test_singular_values_transform_exactly():
    rows = random_context()[5:12]
    sigma = torch.linalg.svdvals(rows.double())
    for alpha, beta, sign in [(0.01, 1.0, +1), (0.01, 0.05, -1), (0.3, 0.7, -1)]:
        out = reweight_singular_values(rows, alpha, beta, sign)
        expected = beta * sigma * torch.exp(sign * alpha * sigma)
        got = torch.linalg.svdvals(out)
        torch.testing.assert_close(got.sort().values, expected.sort().values, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("eot_mode", ["svd"])
def test_identity_map_at_alpha_zero_beta_one(eot_mode):
    context = random_context()
    fp = plan_for().frames[1]
    out = svr_frame_context(context, fp, enhance_alpha=0, enhance_beta=1, suppress_alpha=0, suppress_beta=1,
                            eot_mode=eot_mode)
    torch.testing.assert_close(out, context, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("eot_mode", ["svd", "scale"])
@pytest.mark.parametrize("frame", [0, 1, 2])
def test_matches_independent_reference(eot_mode, frame):
    context = random_context(width=2048, seed=frame)
    fp = plan_for().frames[frame]
    out = svr_frame_context(context, fp, eot_mode=eot_mode)
    ref = reference_svr(context, fp, (0.01, 1.0), (0.01, 0.05), eot_mode, SDXL_ENCODER_SLICES)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_untouched_rows_bit_identical(dtype):
    context = random_context(dtype=dtype)
    fp = plan_for().frames[0]
    out = svr_frame_context(context, fp)
    assert out.dtype == dtype and out.shape == context.shape
    keep = list(fp.identity_positions)  # SOT + identity: never modified
    assert torch.equal(out[keep], context[keep])
    touched = list(range(fp.identity.stop, 77))
    assert not torch.equal(out[touched], context[touched])


def test_windowed_frame_leaves_rows_outside_its_context_alone():
    story = ("hero", [f"scene {i} " + "word " * 20 for i in range(5)])
    fp = plan_for(story=story).frames[2]
    assert fp.frames == (2, 3, 4)
    context = random_context()
    out = svr_frame_context(context, fp)
    assert torch.equal(out[:fp.identity.stop], context[:fp.identity.stop])


def test_sdxl_encoder_slices_are_independent():
    assert encoder_slices(2048) == ((0, 768), (768, 2048)) and encoder_slices(768) == ((0, 768),)
    context = random_context(width=2048)
    fp = plan_for().frames[0]
    out = svr_frame_context(context, fp)
    perturbed = context.clone()
    perturbed[:, 768:] += torch.randn(77, 1280)
    out_perturbed = svr_frame_context(perturbed, fp)
    assert torch.equal(out[:, :768], out_perturbed[:, :768])          # CLIP-L slice ignores bigG
    assert not torch.equal(out[:, 768:], out_perturbed[:, 768:])
    joint = svr_frame_context(context, fp, slices=((0, 2048),))         # the wrong, concatenated SVD
    assert not torch.allclose(joint, out, atol=1e-3)


def test_eot_scale_mode_multiplies_eot_block_per_call():
    context = random_context()
    fp = plan_for().frames[0]
    out = svr_frame_context(context, fp, eot_mode="scale")
    calls = len(fp.frames)  # N-1 suppressions + 1 enhancement
    eot = slice(fp.eot_start, 77)
    torch.testing.assert_close(out[eot].double(), context[eot].double() * 0.9 ** calls, rtol=1e-6, atol=1e-6)
    svd_mode = svr_frame_context(context, fp, eot_mode="svd")
    assert not torch.allclose(svd_mode[eot], out[eot])


def test_invalid_inputs_are_refused():
    fp = plan_for().frames[0]
    with pytest.raises(ValueError, match="eot_mode"):
        svr_frame_context(random_context(), fp, eot_mode="bogus")
    with pytest.raises(ValueError, match="one CLIP chunk"):
        svr_frame_context(random_context()[:5], fp)
    with pytest.raises(ValueError, match="one frame's context"):
        svr_frame_context(random_context()[None], fp)


def test_npr_scales_frames_only():
    context = random_context()
    fp = plan_for().frames[1]
    out = npr_frame_context(context, fp)
    for frame, span in zip(fp.frames, fp.spans):
        factor = 2.0 if frame == 1 else 0.5
        torch.testing.assert_close(out[span.start:span.stop], context[span.start:span.stop] * factor)
    untouched = list(fp.identity_positions) + list(range(fp.eot_start, 77))
    assert torch.equal(out[untouched], context[untouched])


def test_real_two_encoder_conditioning(tokenize, clip_tokenizer):
    """SDXL-like conditioning from two tiny real CLIP encoders (widths 16 | 32) side by side."""
    enc_l, enc_g = tiny_clip_text_model(16, seed=1), tiny_clip_text_model(32, seed=2)
    plan = plan_tokens(STORY[0], STORY[1], tokenize)
    ids = clip_tokenizer(plan.texts[0], padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = [enc(ids, output_hidden_states=True).hidden_states[-2][0] for enc in (enc_l, enc_g)]
    context = torch.cat(hidden, dim=1)
    slices = ((0, 16), (16, 48))
    outs = [svr_frame_context(context, fp, slices=slices) for fp in plan.frames]
    for fp, out in zip(plan.frames, outs):
        ref = reference_svr(context, fp, (0.01, 1.0), (0.01, 0.05), "svd", slices)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(out[list(fp.identity_positions)], context[list(fp.identity_positions)])
    assert not torch.allclose(outs[0], outs[1])  # each frame gets its own conditioning


# --- purity, range (issue: SVR wrote into a float64 input; fp16 overflow was returned silently) ---------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("eot_mode", ["svd", "scale"])
def test_input_is_never_modified(dtype, eot_mode):
    context = random_context(dtype=dtype)
    before = context.clone()
    for fp in plan_for().frames:
        svr_frame_context(context, fp, eot_mode=eot_mode)
        npr_frame_context(context, fp)
        assert torch.equal(context, before)


def test_float64_frames_are_independent_of_each_other():
    """Each frame is reweighted from the pristine encoding: the order of frames changes nothing."""
    context = random_context(dtype=torch.float64)
    plan = plan_for()
    fresh = [svr_frame_context(context.clone(), fp) for fp in plan.frames]
    in_order = [svr_frame_context(context, fp) for fp in plan.frames]
    reverse = [svr_frame_context(context, fp) for fp in reversed(plan.frames)][::-1]
    for a, b, c, fp in zip(fresh, in_order, reverse, plan.frames):
        assert torch.equal(a, b) and torch.equal(a, c)
        ref = reference_svr(context, fp, (0.01, 1.0), (0.01, 0.05), "svd", ((0, 24),))
        torch.testing.assert_close(a, ref, rtol=1e-12, atol=1e-12)


def large_sigma_context(dtype):
    """Frame 2's rows carry singular values of 560-920 (entries below 400): SVR+ gives values of about 3.7e6."""
    context = random_context(dtype=torch.float64) * 0.1
    context[9:13] *= 500  # plan_for().frames[1]'s span
    return context.to(dtype)


def test_fp16_overflow_is_refused_naming_the_frame():
    context = large_sigma_context(torch.float16)
    assert torch.isfinite(context).all()
    fp = plan_for().frames[1]
    with pytest.raises(SvrRangeError, match=r"frame 2: SVR turns singular values up to [\d.e+]+ .* beyond "
                                            r"float16's range \(65504\); lower 'SVR\+ alpha'") as caught:
        svr_frame_context(context, fp)
    assert caught.value.frame == 1
    # the same values fit float32, unless the UNet computing in float16 is named as the limit
    wide = large_sigma_context(torch.float32)
    assert torch.isfinite(svr_frame_context(wide, fp)).all()
    with pytest.raises(SvrRangeError, match="float16"):
        svr_frame_context(wide, fp, limit=torch.float16)
    assert torch.isfinite(svr_frame_context(wide, fp, limit=torch.float32)).all()


def test_singular_values_are_logged_per_frame_at_debug(caplog):
    import logging
    context = random_context(width=2048)
    fp = plan_for().frames[2]
    with caplog.at_level(logging.DEBUG, logger="lib_consistency.one_prompt_one_story.svr"):
        svr_frame_context(context, fp)
    lines = [r.getMessage() for r in caplog.records if r.name == "lib_consistency.one_prompt_one_story.svr"]
    assert len(lines) == 2  # one per encoder slice
    assert lines[0].startswith("SVR frame 3, features 0:768, 3 SVDs: singular values min ")
    assert "features 768:2048" in lines[1] and "/ median " in lines[1] and "/ max " in lines[1]
    with caplog.at_level(logging.INFO, logger="lib_consistency.one_prompt_one_story.svr"):
        caplog.clear()
        svr_frame_context(context, fp)
    assert not caplog.records
