"""OneActor guidance math (paper Eqs. 15, 19; methods.md §6.4): the Δ window's rounding, the token-row offset
(only the listed rows move, strength 0 and the input stay bit for bit, float64 reference), cluster guidance against
an independently written float64 reference, and folding η2 into the host's ordinary CFG in ε and x0 space."""
from __future__ import annotations

import math

import pytest
import torch

from lib_consistency.oneactor.guidance import (OneActorGuidance, cluster_guidance, fold_into_cond, in_window,
                                               offset_token_rows, window_steps)


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns (so -0.0 != +0.0 and NaN == NaN)."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    return ((result.double() - reference).abs().max() / reference.abs().max()).item()


# --- the window ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("total, window, expected", [
    (30, 2 / 3, 20), (20, 2 / 3, 13), (50, 2 / 3, 33), (25, 2 / 3, 17), (1, 2 / 3, 1), (0, 2 / 3, 0),
    (3, 0.5, 2), (5, 0.5, 3), (15, 0.7, 11), (10, 1.0, 10), (10, 0.0, 0), (7, 0.01, 0)])
def test_window_steps_table(total, window, expected):
    assert window_steps(total, window) == expected


def test_window_steps_is_round_half_up_of_the_exact_product():
    """Against exact integer arithmetic: floor(T·p/q + 1/2) = (2Tp + q) // 2q, whatever float noise T·(p/q) has."""
    for p, q in ((2, 3), (1, 2), (1, 3), (3, 4), (1, 10), (7, 10), (3, 10), (9, 10), (5, 6)):
        for total in range(201):
            assert window_steps(total, p / q) == (2 * total * p + q) // (2 * q), (total, p, q)


def test_in_window_paper_default_is_steps_0_to_19_of_30():
    assert [s for s in range(-3, 34) if in_window(s, 30)] == list(range(20))
    assert [s for s in range(25) if in_window(s, 20, 2 / 3)] == list(range(13))
    assert not any(in_window(s, 30, 0.0) for s in range(30))
    assert all(in_window(s, 30, 1.0) for s in range(30))


@pytest.mark.parametrize("total, window", [(-1, 0.5), (2.5, 0.5), (True, 0.5), (30, 1.5), (30, -0.1),
                                           (30, float("nan")), (30, "2/3")])
def test_window_steps_refuses_bad_arguments(total, window):
    with pytest.raises(ValueError, match="total_steps|window"):
        window_steps(total, window)


# --- the offset ------------------------------------------------------------------------------------------------
def test_offset_moves_only_the_listed_rows_and_matches_float64():
    context, delta = randn(3, 77, 768, seed=1), randn(768, seed=2)
    before = context.clone()
    rows, scales = [[5, 9], [], [0, 76]], [0.8, 1.0, -0.5]
    out = offset_token_rows(context, rows, delta, scales)
    assert torch.equal(bits(context), bits(before)) and out.data_ptr() != context.data_ptr()
    listed = torch.zeros(3, 77, dtype=torch.bool)
    for b, positions in enumerate(rows):
        listed[b, positions] = True
    assert torch.equal(bits(out[~listed]), bits(context[~listed]))
    reference = context.double() + torch.tensor(scales, dtype=torch.float64)[:, None, None] * delta.double()
    assert relative_error(out[listed], reference[listed]) < 1e-7
    assert out.dtype == torch.float32 and out.shape == context.shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_offset_keeps_dtype_and_untouched_rows_bit_for_bit(dtype):
    context, delta = randn(2, 10, 64, seed=3, dtype=dtype), randn(64, seed=4)
    out = offset_token_rows(context, [[1], [2, 3]], delta, 0.8)
    assert out.dtype == dtype
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[0, 1] = keep[1, 2] = keep[1, 3] = False
    assert torch.equal(bits(out[keep]), bits(context[keep]))
    reference = (context.double() + 0.8 * delta.double())[~keep]
    torch.testing.assert_close(out[~keep], reference.to(dtype))


def test_offset_with_scale_zero_is_bit_identical_even_for_negative_zero_and_nan_delta():
    context = randn(2, 8, 16, seed=5)
    context[0, 3] = -0.0
    delta = torch.full((16,), float("nan"))
    out = offset_token_rows(context, [[3, 4], [0]], delta, 0.0)
    assert torch.equal(bits(out), bits(context))
    out = offset_token_rows(context, [[3], [0]], randn(16, seed=6), [0.0, 1.0])
    assert torch.equal(bits(out[0]), bits(context[0])) and not torch.equal(out[1, 0], context[1, 0])


def test_offset_with_no_rows_is_bit_identical():
    context = randn(2, 8, 16, seed=7)
    assert torch.equal(bits(offset_token_rows(context, [[], []], randn(16, seed=8), 1.0)), bits(context))


def test_offset_counts_a_repeated_position_once():
    context, delta = randn(1, 8, 16, seed=9), randn(16, seed=10)
    once = offset_token_rows(context, [[3]], delta, 1.0)
    assert torch.equal(offset_token_rows(context, [[3, 3, 3]], delta, 1.0), once) and not torch.equal(once, context)


def test_offset_sdxl_width_is_the_two_encoders_offset_separately():
    """2048 = CLIP-L 768 | bigG 1280: the concatenated Δ acts on each slice exactly as that slice's own Δ."""
    context, delta = randn(2, 154, 2048, seed=11), randn(2048, seed=12)
    rows = [[4, 80], [100]]
    out = offset_token_rows(context, rows, delta, [0.8, 1.2])
    for lo, hi in ((0, 768), (768, 2048)):
        part = offset_token_rows(context[..., lo:hi].contiguous(), rows, delta[lo:hi], [0.8, 1.2])
        assert torch.equal(bits(out[..., lo:hi]), bits(part))


def test_offset_refuses_mismatched_widths_naming_both():
    with pytest.raises(ValueError, match=r"768.*2048"):
        offset_token_rows(randn(1, 77, 768), [[1]], randn(2048), 1.0)


@pytest.mark.parametrize("rows, scale", [([[1]], 1.0), ([[1], [77]], 1.0), ([[1], [-1]], 1.0),
                                         ([[1], [2]], [1.0]), ([[1], [2]], float("inf")), ([[1], [2]], [1.0, "x"])])
def test_offset_refuses_bad_rows_and_scales(rows, scale):
    with pytest.raises(ValueError, match="OneActor offset"):
        offset_token_rows(randn(2, 77, 32), rows, randn(32), scale)


# --- cluster guidance ------------------------------------------------------------------------------------------
ETAS = [(7.5, 0.0), (8.5, 1.0), (1.0, 3.0), (12.0, 2.5), (0.0, 1.0)]


def reference_guidance(u, t, a, eta1, eta2):
    """Eq. 19 rearranged into weights on the three predictions, in float64."""
    return (1.0 - eta1 + eta2) * u.double() + eta1 * t.double() - eta2 * a.double()


@pytest.mark.parametrize("eta1, eta2", ETAS)
def test_cluster_guidance_matches_float64_reference(eta1, eta2):
    u, t, a = (randn(2, 4, 16, 16, seed=s) for s in (20, 21, 22))
    reference = reference_guidance(u, t, a, eta1, eta2)
    assert relative_error(cluster_guidance(u, t, a, eta1, eta2), reference) < 1e-6
    u, t, a = (x.double() for x in (u, t, a))
    assert relative_error(cluster_guidance(u, t, a, eta1, eta2), reference) < 1e-14


def test_cluster_guidance_with_eta2_zero_is_ordinary_cfg_exactly():
    u, t, a = (randn(2, 4, 8, 8, seed=s) for s in (23, 24, 25))
    cfg = u + 7.5 * (t - u)
    assert torch.equal(bits(cluster_guidance(u, t, a, 7.5, 0.0)), bits(cfg))
    assert torch.equal(bits(cluster_guidance(u, t, None, 7.5, 0.0)), bits(cfg))


def test_cluster_guidance_refuses_missing_average_and_shape_mismatch():
    u = randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="cond_avg"):
        cluster_guidance(u, u, None, 7.5, 1.0)
    with pytest.raises(ValueError, match="shape"):
        cluster_guidance(u, u, randn(1, 4, 8, 9), 7.5, 1.0)


def host_cfg(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + scale * (cond - uncond)


@pytest.mark.parametrize("eta1, eta2", [e for e in ETAS if e[0] > 0])
def test_fold_into_cond_gives_cluster_guidance_in_eps_space(eta1, eta2):
    u, t, a = (randn(2, 4, 16, 16, seed=s) for s in (30, 31, 32))
    reference = reference_guidance(u, t, a, eta1, eta2)
    folded = host_cfg(u, fold_into_cond(t, u, a, eta1, eta2), eta1)
    assert relative_error(folded, reference) < 1e-6
    u, t, a = (x.double() for x in (u, t, a))
    assert relative_error(host_cfg(u, fold_into_cond(t, u, a, eta1, eta2), eta1), reference) < 1e-14


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.float64, 1e-14)])
@pytest.mark.parametrize("eta1, eta2", [(8.5, 1.0), (7.5, 0.0), (3.0, 2.0)])
def test_fold_into_cond_in_denoised_space_equals_eps_space(dtype, tolerance, eta1, eta2):
    """The WebUI combines x0 = x − σ·ε: folding there, then CFG, equals x − σ·(Eq. 19 in ε space)."""
    x = randn(3, 4, 16, 16, seed=40, dtype=dtype) * 5
    sigma = torch.tensor([14.6, 1.2, 0.03], dtype=dtype)[:, None, None, None]
    eps_u, eps_t, eps_a = (randn(3, 4, 16, 16, seed=s, dtype=dtype) for s in (41, 42, 43))
    d_u, d_t, d_a = (x - sigma * e for e in (eps_u, eps_t, eps_a))
    denoised = host_cfg(d_u, fold_into_cond(d_t, d_u, d_a, eta1, eta2), eta1)
    reference = x.double() - sigma.double() * reference_guidance(eps_u, eps_t, eps_a, eta1, eta2)
    assert relative_error(denoised, reference) < tolerance


def test_fold_into_cond_eta2_zero_is_a_copy_and_eta1_must_be_positive():
    u, t = randn(1, 4, 8, 8, seed=50), randn(1, 4, 8, 8, seed=51)
    folded = fold_into_cond(t, u, None, 7.5, 0.0)
    assert torch.equal(bits(folded), bits(t)) and folded.data_ptr() != t.data_ptr()
    for eta1 in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="eta1"):
            fold_into_cond(t, u, u, eta1, 1.0)
    with pytest.raises(ValueError, match="avg_out"):
        fold_into_cond(t, u, None, 7.5, 1.0)


# --- settings --------------------------------------------------------------------------------------------------
def test_guidance_settings_defaults_and_bounds():
    settings = OneActorGuidance()
    assert (settings.v, settings.eta2, settings.window) == (0.8, 0.0, 2 / 3)
    assert settings.steps(30) == 20 and settings.active(19, 30) and not settings.active(20, 30)
    edge = OneActorGuidance(v=2, eta2=10, window=1)
    assert (edge.v, edge.eta2, edge.window) == (2.0, 10.0, 1.0) and isinstance(edge.v, float)
    assert OneActorGuidance(v=0, eta2=0, window=0).steps(30) == 0


@pytest.mark.parametrize("field, value", [("v", -0.1), ("v", 2.01), ("v", float("nan")), ("v", True), ("v", "1"),
                                          ("eta2", -1.0), ("eta2", 10.5), ("eta2", math.inf),
                                          ("window", 1.1), ("window", -0.5), ("window", None)])
def test_guidance_settings_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"OneActorGuidance\.{field} "):
        OneActorGuidance(**{field: value})
