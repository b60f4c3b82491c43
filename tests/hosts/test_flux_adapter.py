"""The Flux adapter (``hosts/flux.py``) on a stand-in of Forge's patcher and sampling call: the model wrapper on a
clone (clone-patch-assign), the row layout and token grid read from the call, the surface installed for exactly that
call, another extension's wrapper kept inside ours, and what Flux refuses."""
from __future__ import annotations

import copy
import types

import pytest
import torch

from lib_consistency.common.row_layout import Role
from lib_consistency.hosts import flux
from lib_consistency.story_diffusion.consistent_self_attention import CsaSettings
from lib_consistency.story_diffusion.state import ConsistencyState
from lib_consistency.surfaces.flux_blocks import flux_depth
from lib_consistency.surfaces.reach import CSA, Reach
from tests import flux_standin

DIM, TEXT = 16, 3


class Patcher:
    """Forge's ``UnetPatcher`` as far as the adapter uses it: ``model.diffusion_model``, ``model_options``, and a
    ``clone`` that deep-copies the options (as the host's does)."""

    def __init__(self, model, options=None):
        self.model, self.model_options = types.SimpleNamespace(diffusion_model=model), options or {}

    def clone(self):
        return Patcher(self.model.diffusion_model, copy.deepcopy(self.model_options))


@pytest.fixture()
def setup():
    torch.manual_seed(0)
    transformer = flux_standin.FluxBlocks(DIM, 2, 32, 1, 1).eval()
    p = types.SimpleNamespace(iteration=1, sd_model=types.SimpleNamespace(
        forge_objects=types.SimpleNamespace(unet=Patcher(transformer))))
    csa = ConsistencyState(CsaSettings(1.0, "always", "all"), 7, {f: {"a"} for f in range(4)},
                           depth=flux_depth(transformer))
    csa.begin_step(0, 2, 10, 1.0)
    generation = types.SimpleNamespace(csa=csa, storysync=None, ipca=None, reach=Reach(),
                                       plan=types.SimpleNamespace(batch_frames=lambda iteration: (2, 3)))
    generator = torch.Generator().manual_seed(1)
    img, txt = torch.randn(2, 16, DIM, generator=generator), torch.randn(2, TEXT, DIM, generator=generator)
    vec = torch.randn(2, DIM, generator=generator)

    def apply_model(x, timestep, transformer_options=None, **_):
        """The host's ``apply_model``: the transformer on its tokens (a 8x8 latent = a 4x4 grid of 2x2 patches)."""
        with torch.no_grad():
            return transformer(img, txt, vec, None)
    return p, generation, transformer, apply_model


def call(wrapper, apply_model, rows=2):
    x = torch.zeros(rows, 16, 8, 8)
    sigmas = torch.ones(rows)
    return wrapper(apply_model, {"input": x, "timestep": sigmas, "cond_or_uncond": [0],
                                 "c": {"transformer_options": {"cond_or_uncond": [0], "sigmas": sigmas}}})


def test_the_wrapper_goes_on_a_clone_and_brings_the_surface_into_that_call_only(setup):
    p, generation, transformer, apply_model = setup
    original = p.sd_model.forge_objects.unet
    flux.patch_flux(p, generation)
    patched = p.sd_model.forge_objects.unet
    assert patched is not original and flux.WRAPPER not in original.model_options  # clone-patch-assign
    plain = apply_model(None, None)
    shared = call(patched.model_options[flux.WRAPPER], apply_model)
    assert not torch.allclose(shared, plain, atol=1e-6)
    layout = generation.csa.layout  # read from cond_or_uncond / sigmas; the frames of batch 1
    assert layout.frames == (2, 3) and layout.roles == (Role.COND, Role.COND)
    assert generation.csa.latent_hw == (4, 4)
    assert {surface for surface, _ in generation.reach._seen} == {CSA}
    assert flux_standin.attention.__name__ == "attention" and not hasattr(flux_standin.attention,
                                                                         "consistent_story_flux")
    assert all("forward" not in block.__dict__ for block in transformer.modules())
    assert torch.equal(apply_model(None, None), plain)


def test_another_extensions_wrapper_runs_inside_ours(setup):
    p, generation, _, apply_model = setup
    seen = []

    def foreign(apply, args):
        seen.append(args["input"].shape)
        return apply(args["input"], args["timestep"], **args["c"])
    p.sd_model.forge_objects.unet.model_options[flux.WRAPPER] = foreign
    flux.patch_flux(p, generation)
    call(p.sd_model.forge_objects.unet.model_options[flux.WRAPPER], apply_model)
    assert seen == [(2, 16, 8, 8)] and generation.reach._seen


def test_a_failing_call_leaves_nothing_installed(setup):
    p, generation, transformer, _ = setup
    flux.patch_flux(p, generation)

    def broken(*args, **kwargs):
        raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError, match="interrupted"):
        call(p.sd_model.forge_objects.unet.model_options[flux.WRAPPER], broken)
    assert all("forward" not in block.__dict__ for block in transformer.modules())
    assert not hasattr(flux_standin.attention, "consistent_story_flux")


def test_flux_is_detected_and_oneactor_refused_with_its_reason(setup):
    p, _, transformer, _ = setup
    assert flux.flux_model(p) is transformer and flux.depth_of(p) == flux_depth(transformer)
    assert flux.flux_model(types.SimpleNamespace(sd_model=types.SimpleNamespace())) is None
    assert "middle block" in flux.ONEACTOR_ON_FLUX
