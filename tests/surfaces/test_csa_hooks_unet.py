"""Hooks on the attn1 modules of a real (tiny, randomly initialised) diffusers UNet2DConditionModel.

diffusers is a test-only dependency: its ``Attention`` takes the context as ``encoder_hidden_states=``, and its
module names are mapped here onto the shared layer addresses that the WebUIs' ldm/sgm UNets produce.
"""
from __future__ import annotations

import re

import pytest
import torch

from lib_consistency.common.row_layout import UNKNOWN_LAYOUT, Role, RowLayout
from lib_consistency.story_diffusion.consistent_self_attention import CsaSettings
from lib_consistency.story_diffusion.state import ConsistencyState
from lib_consistency.surfaces.attention_modules import ConsistentSelfAttentionHook, install_csa_hooks
from lib_consistency.surfaces.instance_hooks import ldm_layer_address, remove_hooks, remove_stale_hooks

LAYERS_PER_BLOCK = 1
LATENT = (16, 16)
LAYOUT = RowLayout((0, 1, 0, 1), (Role.COND, Role.COND, Role.UNCOND, Role.UNCOND))


def diffusers_layer_address(name: str) -> tuple[str, int, int] | None:
    """diffusers attn1 name -> ldm-style address (input index 0 is conv_in; one downsampler per level)."""
    match = re.fullmatch(r"(down|up)_blocks\.(\d+)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn1", name)
    if match:
        kind, level, layer, transformer = match.group(1), *map(int, match.groups()[1:])
        if kind == "down":
            return "input", 1 + level * (LAYERS_PER_BLOCK + 1) + layer, transformer
        return "output", level * (LAYERS_PER_BLOCK + 1) + layer, transformer
    match = re.fullmatch(r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.attn1", name)
    return ("middle", 0, int(match.group(1))) if match else None


@pytest.fixture(scope="module")
def unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(
        sample_size=LATENT[0], in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=LAYERS_PER_BLOCK, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, norm_num_groups=8,
        attention_head_dim=8)
    return model.eval()


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(4, 4, *LATENT, generator=generator), torch.randn(4, 8, 32, generator=generator)


def self_attention_layers(unet):
    return [(address, module) for name, module in unet.named_modules()
            if (address := diffusers_layer_address(name)) is not None]


def forward(unet, latents, text):
    with torch.no_grad():
        return unet(latents, 500, encoder_hidden_states=text).sample


def make_state(layout=LAYOUT, policy="up_low_res"):
    state = ConsistencyState(CsaSettings(0.5, "always", policy), run_seed=5, frame_groups={0: {"a"}, 1: {"a"}})
    state.begin_unet_call(layout, LATENT)
    state.begin_step(pass_index=0, step_index=4, total_steps=20, sigma=3.0)
    return state


def run_with_hooks(unet, inputs, state):
    hooks = install_csa_hooks(self_attention_layers(unet), state, context_kwarg="encoder_hidden_states")
    try:
        return forward(unet, *inputs)
    finally:
        remove_hooks(hooks)


def test_all_seven_attn1_modules_get_an_address(unet):
    addresses = [address for address, _ in self_attention_layers(unet)]
    assert sorted(addresses) == sorted([("input", 1, 0), ("input", 3, 0), ("middle", 0, 0), ("output", 0, 0),
                                        ("output", 1, 0), ("output", 2, 0), ("output", 3, 0)])


def test_enabled_hooks_change_the_output_only_on_selected_layers(unet, inputs, monkeypatch):
    state = make_state()
    shared_layers = []
    original = state.contexts_for

    def spy(layer, hidden):
        groups = original(layer, hidden)
        if groups is not None:
            shared_layers.append(layer)
        return groups

    monkeypatch.setattr(state, "contexts_for", spy)
    out = run_with_hooks(unet, inputs, state)
    assert not torch.allclose(out, forward(unet, *inputs))
    # up_blocks.0 runs at 8x8 = latent/2 = image/16; up_blocks.1 at latent size is not a low-res layer.
    assert sorted(shared_layers) == [("output", 0, 0), ("output", 1, 0)]


def test_disabled_hooks_are_bit_identical(unet, inputs):
    state = make_state(policy="all")
    state.enabled = False
    assert torch.equal(run_with_hooks(unet, inputs, state), forward(unet, *inputs))


def test_unknown_layout_is_bit_identical(unet, inputs):
    assert torch.equal(run_with_hooks(unet, inputs, make_state(UNKNOWN_LAYOUT, "all")), forward(unet, *inputs))


def test_install_then_remove_restores_the_module_exactly(unet, inputs):
    baseline = forward(unet, *inputs)
    hooks = install_csa_hooks(self_attention_layers(unet), make_state(policy="all"), "encoder_hidden_states")
    assert all(isinstance(module.__dict__.get("forward"), ConsistentSelfAttentionHook)
               for _, module in self_attention_layers(unet))
    remove_hooks(hooks)
    assert all("forward" not in module.__dict__ for _, module in self_attention_layers(unet))
    assert torch.equal(forward(unet, *inputs), baseline)


def test_cond_rows_never_see_uncond_rows_through_the_whole_unet(unet, inputs):
    latents, text = inputs
    perturbed = latents.clone()
    perturbed[2:] = torch.randn(2, 4, *LATENT, generator=torch.Generator().manual_seed(9))
    out = run_with_hooks(unet, (latents, text), make_state(policy="all"))
    out_perturbed = run_with_hooks(unet, (perturbed, text), make_state(policy="all"))
    torch.testing.assert_close(out_perturbed[:2], out[:2], rtol=0, atol=1e-6)
    assert not torch.allclose(out_perturbed[2:], out[2:])


def test_a_previous_instance_wrapper_is_kept_and_restored(unet, inputs):
    (address, module), = [(a, m) for a, m in self_attention_layers(unet) if a == ("output", 0, 0)]
    calls = []

    def foreign_wrapper(*args, **kwargs):  # another extension's instance forward
        calls.append(kwargs.get("encoder_hidden_states") is not None)
        return type(module).forward(module, *args, **kwargs)

    module.forward = foreign_wrapper
    try:
        hooks = install_csa_hooks([(address, module)], make_state(), "encoder_hidden_states")
        forward(unet, *inputs)
        assert calls == [True]  # ours ran inside, handing the extended context to the foreign wrapper
        remove_hooks(hooks)
        assert module.__dict__["forward"] is foreign_wrapper
    finally:
        del module.forward


def test_a_wrapper_on_top_of_ours_retires_our_hook(unet, inputs):
    baseline = forward(unet, *inputs)
    (address, module), = [(a, m) for a, m in self_attention_layers(unet) if a == ("output", 0, 0)]
    (hook,) = install_csa_hooks([(address, module)], make_state(), "encoder_hidden_states")
    ours = module.forward
    module.forward = lambda *args, **kwargs: ours(*args, **kwargs)  # installed after ours
    try:
        assert hook.remove() is False and hook.retired
        assert torch.equal(forward(unet, *inputs), baseline)  # still in the chain, but only passes through
    finally:
        del module.forward
    assert remove_stale_hooks(unet) == 0  # nothing of ours left on top


def test_double_install_is_refused_and_stale_hooks_are_swept(unet, inputs):
    baseline = forward(unet, *inputs)
    layers = self_attention_layers(unet)
    install_csa_hooks(layers, make_state(), "encoder_hidden_states")  # a crashed run that never removed its hooks
    with pytest.raises(RuntimeError, match="already"):
        install_csa_hooks(layers, make_state(), "encoder_hidden_states")
    assert all(isinstance(module.__dict__.get("forward"), ConsistentSelfAttentionHook) for _, module in layers)
    assert remove_stale_hooks(unet) == len(layers)
    assert all("forward" not in module.__dict__ for _, module in layers)
    assert torch.equal(forward(unet, *inputs), baseline)


@pytest.mark.parametrize("name, address", [
    ("input_blocks.4.1.transformer_blocks.0.attn1", ("input", 4, 0)),
    ("model.diffusion_model.middle_block.1.transformer_blocks.3.attn1", ("middle", 0, 3)),
    ("output_blocks.11.1.transformer_blocks.9.attn1", ("output", 11, 9)),
    ("output_blocks.11.1.transformer_blocks.9.attn2", None),
    ("output_blocks.2.0.in_layers", None),
])
def test_ldm_module_names_map_to_shared_addresses(name, address):
    assert ldm_layer_address(name) == address
