"""Forge adapter against a stand-in UNet patcher: registrations, idempotency, rows from cond_or_uncond, and the
replace patches giving exactly what the A1111 module hooks give on the same attention module."""
from __future__ import annotations

import types

import pytest
import torch

from lib_consistency.common.addresses import StepKey
from lib_consistency.common.row_layout import Role, RowLayout
from lib_consistency.hosts.forge import is_forge, patch_unet
from lib_consistency.one_prompt_one_story.ipca import IdentityAttentionState
from lib_consistency.story_diffusion.consistent_self_attention import CsaSettings
from lib_consistency.story_diffusion.state import ConsistencyState
from lib_consistency.surfaces.attention_modules import install_csa_hooks, install_identity_hooks
from lib_consistency.surfaces.forge_patches import TRANSFORMER_OPTION, ForgeRunState, csa_replace, ipca_replace
from lib_consistency.surfaces.instance_hooks import remove_stale_hooks
from tests.fake_webui import ToyAttention
from tests.forge_standin import ForgeClassicPatcher, attention_function

LAYER = ("output", 3, 0)


class FakeUnetPatcher(ForgeClassicPatcher):
    """Records what ``backend.patcher.unet.UnetPatcher`` would store (the stand-in's patcher, no model); also
    ``set_model_replace_all``, as another extension registers its patch on every block."""

    def __init__(self, model=None):
        super().__init__(model)

    def memory_required(self, shape):
        return 1000

    def set_model_replace_all(self, patch, target="attn1"):
        for block in ("input", "middle", "output"):
            for number in range(16):
                for index in range(16):
                    self.set_model_patch_replace(patch, target, block, number, index)


def generation(csa=True, ipca=True, batch_size=3):
    settings = types.SimpleNamespace(csa_rate=0.5)
    plan = types.SimpleNamespace(batch_size=batch_size, batch_frames=lambda iteration: tuple(
        range(iteration * batch_size, (iteration + 1) * batch_size)))
    return types.SimpleNamespace(
        settings=settings, plan=plan,
        csa=ConsistencyState(CsaSettings(0.5, "always", "all"), 1, {0: {"a"}, 1: {"a"}, 2: set()}) if csa else None,
        ipca=IdentityAttentionState((0, 1, 2), 0.0, 1, step=StepKey(0, 1, 3.0)) if ipca else None)


def forge_p(unet):
    return types.SimpleNamespace(sd_model=types.SimpleNamespace(forge_objects=types.SimpleNamespace(unet=unet)),
                                 iteration=0)


def test_patches_are_registered_on_a_clone_and_repeat_idempotently():
    original = FakeUnetPatcher()
    p = forge_p(original)
    assert is_forge(p)
    gen = generation()
    registrations = []
    for _ in range(3):  # txt2img with hires: three calls, the host resetting the patcher before each
        p.sd_model.forge_objects.unet = original
        patch_unet(p, gen, attention_function)
        patched = p.sd_model.forge_objects.unet
        assert patched is not original and original.model_options == {"transformer_options": {}}
        replace = patched.model_options["transformer_options"]["patches_replace"]
        registrations.append({target: len(patches) for target, patches in replace.items()})
        assert patched.model_options["memory_peak_estimation_modifier"]([2, 4, 8, 8]) == 1000 * (1 + 0.5 * 2)
        run = patched.model_options["transformer_options"][TRANSFORMER_OPTION]
        assert run.csa is gen.csa and run.ipca is gen.ipca and run.frame_offset == (0, 1, 2)
        # another extension cloning after us (a deep copy of model_options) still shares the live state
        assert patched.clone().model_options["transformer_options"][TRANSFORMER_OPTION] is run
    assert registrations == [{"attn1": 768, "attn2": 768}] * 3
    only_ipca = forge_p(FakeUnetPatcher())
    patch_unet(only_ipca, generation(csa=False), attention_function)
    assert set(only_ipca.sd_model.forge_objects.unet.model_options["transformer_options"]["patches_replace"]) == {
        "attn2"}


def extra_options(cond_or_uncond, batch, heads=2, shape=(6, 4, 4, 4), csa=None, ipca=None):
    return {TRANSFORMER_OPTION: ForgeRunState(csa, ipca, 0), "cond_or_uncond": cond_or_uncond,
            "sigmas": torch.ones(batch), "n_heads": heads, "block": LAYER[:2], "block_index": LAYER[2],
            "original_shape": list(shape)}


@pytest.mark.parametrize("cond_or_uncond", [[1, 0], [0, 1], [0]])
def test_csa_replace_equals_the_module_hook(cond_or_uncond):
    torch.manual_seed(0)
    module = ToyAttention(8, 8)
    rows = 3 * len(cond_or_uncond)
    x = torch.randn(rows, 16, 8)
    roles = [Role.COND if c == 0 else Role.UNCOND for c in cond_or_uncond for _ in range(3)]
    layout = RowLayout(tuple(r % 3 for r in range(rows)), tuple(roles))
    groups = {0: {"a"}, 1: {"a"}, 2: set()}

    state = ConsistencyState(CsaSettings(0.5, "always", "all"), 1, groups)
    state.begin_step(0, 1, 10, 3.0)
    with torch.no_grad():
        patch = csa_replace(attention_function)
        forge_out = module.to_out(patch(module.to_q(x), module.to_k(x), module.to_v(x),
                                        extra_options(cond_or_uncond, 3, csa=state)))
        hook_state = ConsistencyState(CsaSettings(0.5, "always", "all"), 1, groups)
        hook_state.begin_step(0, 1, 10, 3.0)
        hook_state.begin_unet_call(layout, (4, 4))
        install_csa_hooks([(LAYER, module)], hook_state)
        hook_out = module(x)
        remove_stale_hooks(module)
        plain = module(x)
    torch.testing.assert_close(forge_out, hook_out, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(forge_out[:2], plain[:2], atol=1e-4)       # frames 0 and 1 share
    torch.testing.assert_close(forge_out[2], plain[2], rtol=1e-5, atol=1e-5)  # the [NC] frame does not


def test_unknown_layout_passes_through():
    torch.manual_seed(1)
    module = ToyAttention(8, 8)
    x = torch.randn(5, 16, 8)  # 5 rows do not fit chunks of 3
    state = ConsistencyState(CsaSettings(1.0, "always", "all"), 1, {0: {"a"}, 1: {"a"}, 2: {"a"}})
    state.begin_step(0, 1, 10, 3.0)
    q, k, v = module.to_q(x), module.to_k(x), module.to_v(x)
    out = csa_replace(attention_function)(q, k, v, extra_options([1, 0], 3, csa=state))
    assert torch.equal(out, attention_function(q, k, v, 2))
    x = x[:3]  # a layout that fits, but no run state in the options (another patcher's clone): plain
    q, k, v = module.to_q(x), module.to_k(x), module.to_v(x)
    out = csa_replace(attention_function)(q, k, v, {**extra_options([0], 3), TRANSFORMER_OPTION: None})
    assert torch.equal(out, attention_function(q, k, v, 2))


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_ipca_replace_equals_the_module_hook(dropout):
    torch.manual_seed(2)
    module = ToyAttention(8, 12)
    x, context = torch.randn(6, 16, 8), torch.randn(6, 77, 12)
    state = IdentityAttentionState((0, 1, 2, 3), dropout, 9, step=StepKey(0, 2, 4.0),
                                   layout=RowLayout((0, 1, 2, 0, 1, 2), (Role.UNCOND,) * 3 + (Role.COND,) * 3))
    with torch.no_grad():
        patch = ipca_replace(attention_function)
        forge_out = module.to_out(patch(module.to_q(x), module.to_k(context), module.to_v(context),
                                        extra_options([1, 0], 3, ipca=state)))
        plain = module(x, context=context)
        install_identity_hooks([(LAYER, module)], state)
        hook_out = module(x, context=context)
    torch.testing.assert_close(forge_out, hook_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(forge_out[:3], plain[:3], rtol=1e-5, atol=1e-5)  # uncond rows (chunk 1 first)
    assert not torch.allclose(forge_out[3:], plain[3:], atol=1e-4)


def test_ipca_replace_dropout_follows_the_frame_and_handles_a_tiled_cond():
    """Frame 4 in a Forge call of frames 3-4 gets the same output as alone in an A1111 hook call; a cond context
    Forge repeated to a longer uncond's length (154 tokens) gives the single-chunk result."""
    torch.manual_seed(3)
    module = ToyAttention(8, 12)
    x, context = torch.randn(2, 16, 8), torch.randn(2, 77, 12)
    state = IdentityAttentionState((0, 1, 2, 3), 0.5, 9, step=StepKey(0, 2, 4.0))
    options = {**extra_options([0], 2, ipca=state), TRANSFORMER_OPTION: ForgeRunState(None, state, 3)}
    patch = ipca_replace(attention_function)
    with torch.no_grad():
        forge_out = module.to_out(patch(module.to_q(x), module.to_k(context), module.to_v(context), options))
        install_identity_hooks([(LAYER, module)], state)
        state.layout = RowLayout((4,), (Role.COND,))
        alone = module(x[1:], context=context[1:])
        remove_stale_hooks(module)
        torch.testing.assert_close(forge_out[1:], alone, rtol=1e-5, atol=1e-5)
        state.dropout = 0.0
        single = patch(module.to_q(x), module.to_k(context), module.to_v(context), options)
        tiled = context.repeat(1, 2, 1)
        repeated = patch(module.to_q(x), module.to_k(tiled), module.to_v(tiled), options)
    torch.testing.assert_close(repeated, single, rtol=1e-5, atol=1e-5)


def test_storysync_patches_are_registered_and_subject_maps_equal_the_module_hook():
    """With StorySync: attn1 replace + output patch + an attn2 patch that adds the subject maps; the maps the Forge
    patch adds equal those of the A1111 hook on the same cross-attention module."""
    from lib_consistency.story_sync.state import StorySyncSettings, StorySyncState
    from lib_consistency.surfaces.attention_modules import install_storysync_hooks
    from lib_consistency.surfaces.forge_patches import storysync_output_patch

    def storysync_state():
        state = StorySyncState(StorySyncSettings(), 3, {0: frozenset({"a"}), 1: frozenset({"a"})},
                               {0: {"a": (1, 2)}, 1: {"a": (2, 3)}})
        state.begin_step(0, 1, 10, 3.0)
        return state

    original = FakeUnetPatcher()
    p = forge_p(original)
    gen = generation(csa=False, batch_size=2)
    gen.storysync = storysync_state()
    for _ in range(2):
        p.sd_model.forge_objects.unet = original
        patch_unet(p, gen, attention_function)
    options = p.sd_model.forge_objects.unet.model_options
    assert {k: len(v) for k, v in options["transformer_options"]["patches_replace"].items()} == {"attn1": 768,
                                                                                                "attn2": 768}
    assert options["transformer_options"]["patches"]["attn1_output_patch"] == [storysync_output_patch]
    assert options["transformer_options"][TRANSFORMER_OPTION].storysync is gen.storysync

    torch.manual_seed(7)
    module = ToyAttention(8, 12)
    x, context = torch.randn(4, 16, 8), torch.randn(4, 77, 12)
    layer = ("middle", 0, 0)  # 16 tokens on a 16x16 latent: latent/4, the mask level
    hook_state = storysync_state()
    hook_state.begin_unet_call(RowLayout((0, 1, 0, 1), (Role.COND,) * 2 + (Role.UNCOND,) * 2), (16, 16))
    install_storysync_hooks([], [(layer, module)], hook_state)
    with torch.no_grad():
        hooked = module(x, context=context)
        remove_stale_hooks(module)
        forge_state = storysync_state()
        forge_options = {**extra_options([0, 1], 2), TRANSFORMER_OPTION: ForgeRunState(None, gen.ipca, 0, forge_state),
                         "block": layer[:2], "block_index": layer[2], "original_shape": [4, 4, 16, 16]}
        patch = options["transformer_options"]["patches_replace"]["attn2"][("middle", 0, 0)]
        forge_out = module.to_out(patch(module.to_q(x), module.to_k(context), module.to_v(context), forge_options))
    hook_maps, forge_maps = hook_state._accumulator.mean_maps(), forge_state._accumulator.mean_maps()
    assert set(hook_maps) == set(forge_maps) == {0, 1}
    for frame in (0, 1):
        torch.testing.assert_close(forge_maps[frame], hook_maps[frame], rtol=1e-5, atol=1e-6)
    assert forge_out.shape == hooked.shape


def foreign_patch(calls):
    """Another extension's replace patch (as SAG registers one): records its calls, scales the attention."""
    def other_extension_patch(q, k, v, extra_options):
        calls.append(q.shape[0])
        return 0.5 * attention_function(q, k, v, extra_options["n_heads"])
    return other_extension_patch


def test_another_extensions_replace_patch_is_wrapped_not_discarded():
    """A patch registered before ours (one transformer block; a whole block by its 2-tuple key) is still called,
    exactly as Forge would call it, wherever our method leaves the call alone; where ours must change the call it
    is refused with the other patch's name. Blocks without one get our plain patch."""
    calls = []
    other = foreign_patch(calls)
    original = FakeUnetPatcher()
    original.set_model_patch_replace(other, "attn1", "middle", 0, 0)
    original.set_model_patch_replace(other, "attn1", "output", 3)  # every transformer of output block 3
    original.set_model_patch_replace(other, "attn2", "input", 4, 0)
    p = forge_p(original)
    gen = generation(csa=True, ipca=False)
    patch_unet(p, gen, attention_function)
    replace = p.sd_model.forge_objects.unet.model_options["transformer_options"]["patches_replace"]
    assert replace["attn1"][("middle", 0, 0)] is not other and replace["attn1"][("output", 3, 1)] is not other
    assert replace["attn1"][("output", 2, 0)] is replace["attn1"][("input", 1, 0)]  # one shared plain patch
    assert replace["attn2"] == {("input", 4, 0): other}  # no attn2 method: untouched

    torch.manual_seed(4)
    module = ToyAttention(8, 8)
    x = torch.randn(6, 16, 8)
    q, k, v = module.to_q(x), module.to_k(x), module.to_v(x)
    off = {**extra_options([1, 0], 3, csa=None), "block": ("output", 3), "block_index": 1}
    wrapped = replace["attn1"][("output", 3, 1)]
    assert torch.equal(wrapped(q, k, v, off), other(q, k, v, off)) and calls == [6, 6]
    state = ConsistencyState(CsaSettings(0.5, "always", "all"), 1, {0: {"a"}, 1: {"a"}, 2: set()})
    state.begin_step(0, 1, 10, 3.0)
    on = {**extra_options([1, 0], 3, csa=state), "block": ("output", 3), "block_index": 1}
    with pytest.raises(RuntimeError, match=r"CSA cannot share .*\('output', 3, 1\).*other_extension_patch"):
        wrapped(q, k, v, on)
    plain_block = {**on, "block": ("output", 2), "block_index": 0}  # our patch alone: shares as usual
    assert not torch.allclose(replace["attn1"][("output", 2, 0)](q, k, v, plain_block), attention_function(q, k, v, 2))


def test_subject_maps_compose_with_another_attn2_patch_and_ipca_is_refused_there():
    """StorySync only reads q and k on attn2, so another extension's attn2 patch (IP-Adapter registers one) still
    makes the output; IPCA would change its keys, which that patch cannot take: refused, naming it."""
    from lib_consistency.story_sync.state import StorySyncSettings, StorySyncState
    calls = []
    other = foreign_patch(calls)
    original = FakeUnetPatcher()
    original.set_model_replace_all(other, "attn2")
    gen = generation(csa=False, ipca=False, batch_size=2)
    gen.storysync = StorySyncState(StorySyncSettings(), 3, {0: frozenset({"a"}), 1: frozenset({"a"})},
                                   {0: {"a": (1, 2)}, 1: {"a": (2, 3)}})
    gen.storysync.begin_step(0, 1, 10, 3.0)
    p = forge_p(original)
    patch_unet(p, gen, attention_function)
    patch = p.sd_model.forge_objects.unet.model_options["transformer_options"]["patches_replace"]["attn2"][
        ("middle", 0, 0)]
    torch.manual_seed(8)
    module = ToyAttention(8, 12)
    x, context = torch.randn(4, 16, 8), torch.randn(4, 77, 12)
    q, k, v = module.to_q(x), module.to_k(context), module.to_v(context)
    options = {**extra_options([0, 1], 2), TRANSFORMER_OPTION: ForgeRunState(None, None, 0, gen.storysync),
               "block": ("middle", 0), "block_index": 0, "original_shape": [4, 4, 16, 16]}
    assert torch.equal(patch(q, k, v, options), other(q, k, v, options))
    assert set(gen.storysync._accumulator.mean_maps()) == {0, 1}  # the maps were read on the way
    ipca = IdentityAttentionState((0, 1, 2), 0.0, 1, step=StepKey(0, 1, 3.0))
    with pytest.raises(RuntimeError, match="IPCA cannot share .*other_extension_patch"):
        ipca_replace(attention_function, other)(q, k, v, {**options, TRANSFORMER_OPTION: ForgeRunState(None, ipca,
                                                                                                        0)})
