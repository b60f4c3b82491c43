"""OneActor projector φ (methods.md §6.1): shapes, size, LayerNorm head, stride layout, fit_to_grid, input errors."""
from __future__ import annotations

import math

import pytest
import torch

from lib_consistency.oneactor.projector import (PROJECTOR_SPECS, Projector, ProjectorInputError, ProjectorSpec,
                                                ProjectorSpecError, build_projector, fit_to_grid)

TINY = (16, 8, 8)  # stage channels for fast projectors


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def expected_sdxl_params() -> int:
    """Hand count of the code's SDXL layout: convs without bias, BN (2 per channel), Linear, LayerNorm."""
    def block(cin, cout, shortcut):
        return 9 * cin * cout + 9 * cout * cout + 4 * cout + (cin * cout + 2 * cout if shortcut else 0)
    stem = 49 * 1280 * 640 + 2 * 640
    blocks = 2 * block(640, 640, False) + block(640, 320, True) + block(320, 320, False) \
        + block(320, 160, True) + block(160, 160, False)
    return stem + blocks + (160 * 16 * 2048 + 2048) + 2 * 2048


def test_sdxl_projector_is_the_codes_66m_layout():
    projector = Projector(PROJECTOR_SPECS["sdxl"]).eval()
    count = n_params(projector)
    assert 60e6 <= count <= 72e6
    assert count == expected_sdxl_params()
    with torch.no_grad():
        assert projector(torch.randn(1, 1280, 32, 32)).shape == (1, 2048)


def test_sd15_projector_shape():
    projector = Projector(PROJECTOR_SPECS["sd15"])
    assert projector(torch.randn(2, 1280, 8, 8)).shape == (2, 768)
    assert projector.linear.in_features == 160 * 4 * 4


@pytest.mark.parametrize("grid, strides", [(8, (1, 1)), (16, (2, 1)), (32, (2, 2))])
def test_every_grid_flattens_to_4x4(grid, strides):
    projector = Projector(ProjectorSpec("t", 3, grid, 5, TINY))
    assert (projector.blocks[2].conv1.stride[0], projector.blocks[4].conv1.stride[0]) == strides
    assert projector.stem[0].stride == (2, 2)
    assert projector(torch.randn(2, 3, grid, grid)).shape == (2, 5)


@pytest.mark.parametrize("field, kwargs", [
    ("grid", dict(grid=12)), ("grid", dict(grid=4)), ("channels", dict(channels=0)), ("width", dict(width=0)),
    ("arch", dict(arch="")), ("stage_channels", dict(stage_channels=(8, 8)))])
def test_bad_spec_names_the_field(field, kwargs):
    base = dict(arch="t", channels=3, grid=8, width=5, stage_channels=TINY)
    with pytest.raises(ProjectorSpecError, match=f"ProjectorSpec.{field}"):
        ProjectorSpec(**{**base, **kwargs})


@pytest.mark.parametrize("train", [True, False])
def test_layernorm_head_normalises_each_row(train):
    projector = Projector(ProjectorSpec("t", 4, 8, 64, TINY)).train(train)
    with torch.no_grad():
        delta = projector(3 * torch.randn(6, 4, 8, 8) + 2).double()
    assert torch.allclose(delta.mean(1), torch.zeros(6, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(delta.var(1, unbiased=False), torch.ones(6, dtype=torch.float64), atol=1e-3)
    with torch.no_grad():  # the head's affine parameters act after normalisation
        projector.norm.bias.fill_(0.5)
        assert projector(torch.randn(2, 4, 8, 8)).mean().item() == pytest.approx(0.5, abs=1e-5)


def test_build_projector_is_seeded_and_leaves_the_global_rng_alone():
    spec = ProjectorSpec("t", 3, 8, 5, TINY)
    state = torch.random.get_rng_state()
    first, second, other = build_projector(spec, 7), build_projector(spec, 7), build_projector(spec, 8)
    assert torch.equal(torch.random.get_rng_state(), state)
    first_weights, second_weights = first.state_dict(), second.state_dict()
    assert all(torch.equal(first_weights[k], second_weights[k]) for k in first_weights)
    assert not torch.equal(first.stem[0].weight, other.stem[0].weight)


@pytest.mark.parametrize("shape, message", [
    ((2, 1280, 32), "got \\(2, 1280, 32\\)"), ((2, 640, 32, 32), "expected \\(N, 1280, 32, 32\\)"),
    ((2, 1280, 16, 16), "got \\(2, 1280, 16, 16\\)")])
def test_wrong_input_names_expected_and_got(shape, message):
    projector = Projector(ProjectorSpec("sdxl", 1280, 32, 8, TINY))
    with pytest.raises(ProjectorInputError, match=message):
        projector(torch.zeros(shape))


def test_fit_to_grid_equal_size_is_bit_identical():
    h = torch.randn(2, 5, 8, 8)
    assert fit_to_grid(h, 8) is h


def test_fit_to_grid_larger_is_block_mean():
    h = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    reference = h.reshape(2, 3, 32, 2, 32, 2).mean(dim=(3, 5))
    assert torch.allclose(fit_to_grid(h, 32), reference, atol=1e-12)


def bilinear_reference(h: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Naive float64 bilinear resize with half-pixel centres (align_corners=False), source index clamped at 0."""
    def taps(size_in, size_out):
        result = []
        for o in range(size_out):
            src = max((o + 0.5) * size_in / size_out - 0.5, 0.0)
            i0 = min(int(math.floor(src)), size_in - 1)
            result.append((i0, min(i0 + 1, size_in - 1), src - i0))
        return result
    out = torch.zeros(*h.shape[:2], out_h, out_w, dtype=torch.float64)
    for y, (y0, y1, wy) in enumerate(taps(h.shape[2], out_h)):
        for x, (x0, x1, wx) in enumerate(taps(h.shape[3], out_w)):
            out[..., y, x] = ((1 - wy) * (1 - wx) * h[..., y0, x0] + (1 - wy) * wx * h[..., y0, x1]
                              + wy * (1 - wx) * h[..., y1, x0] + wy * wx * h[..., y1, x1])
    return out


def test_fit_to_grid_smaller_is_bilinear():
    h = torch.randn(1, 2, 5, 6, dtype=torch.float64)
    assert torch.allclose(fit_to_grid(h, 8), bilinear_reference(h, 8, 8), atol=1e-12)


@pytest.mark.parametrize("size", [(48, 40), (24, 40), (40, 24), (7, 9)])
def test_fit_to_grid_any_size_keeps_constants(size):
    """Both resamplers are averages: a constant map stays constant, whatever the aspect ratio."""
    h = torch.full((1, 3, *size), 2.5)
    out = fit_to_grid(h, 32)
    assert out.shape == (1, 3, 32, 32)
    assert torch.allclose(out, torch.full_like(out, 2.5))


def test_fit_to_grid_rejects_wrong_rank():
    with pytest.raises(ProjectorInputError, match="fit_to_grid input: expected \\(N, C, H, W\\), got \\(3, 8, 8\\)"):
        fit_to_grid(torch.zeros(3, 8, 8), 8)
