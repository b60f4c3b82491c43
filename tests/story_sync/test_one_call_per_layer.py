"""StorySync's cost structure (issue: speed on a GPU): masked sharing is ONE attention call per shared layer whatever
the number of frames and however the dropouts make the rows' contexts differ in length, and the plan behind it
(peer index, dropout draws) is built once per UNet call and grid, not per layer. Counted on a real (tiny, randomly
initialised) diffusers UNet through the A1111-style module hooks, and on the Forge patch."""
from __future__ import annotations

import collections

import pytest
import torch

import lib_consistency.story_sync.state as state_module
from lib_consistency.common.row_layout import Role, RowLayout
from lib_consistency.story_diffusion.consistent_self_attention import LayerPolicy, Schedule
from lib_consistency.story_sync.state import StorySyncSettings, StorySyncState
from lib_consistency.surfaces.attention_modules import install_storysync_hooks
from lib_consistency.surfaces.instance_hooks import remove_hooks
from tests.fake_webui import ToyAttention
from tests.story_sync.test_story_sync import LATENT, address, tiny_unet

DROPOUTS = dict(mask_dropout=0.5, share_dropout=0.3)


@pytest.fixture(scope="module")
def unet():
    model = tiny_unet()
    for name, parameter in model.named_parameters():  # sharper attention: masks with contrast on random weights
        if name.endswith(("to_q.weight", "to_k.weight")):
            parameter.data.mul_(4.0)
    return model


def story_state(frames: int, **values) -> tuple[StorySyncState, RowLayout]:
    settings = StorySyncSettings(**{"rfh_window": (0.0, 1.0), "bli_strength": 0.0, "layer_policy": LayerPolicy.UP,
                                    "schedule": Schedule.ALWAYS, **DROPOUTS, **values})
    state = StorySyncState(settings, 11, {f: frozenset({"a"}) for f in range(frames)},
                           {f: {"a": (1, 2)} for f in range(frames)})
    layout = RowLayout(tuple(range(frames)) * 2, (Role.COND,) * frames + (Role.UNCOND,) * frames)
    state.begin_step(0, 3, 10, 2.0)
    return state, layout


class KernelCounter:
    """Counts ``scaled_dot_product_attention`` calls per attention module (the module whose forward is running)."""

    def __init__(self, unet, monkeypatch) -> None:
        self.per_module: collections.Counter = collections.Counter()
        self.current: list[str] = []
        self.handles = []
        def leave(module, args, kwargs, output) -> None:
            self.current.pop()

        for name, module in unet.named_modules():
            if name.endswith(("attn1", "attn2")):
                self.handles.append(module.register_forward_pre_hook(lambda m, a, k, n=name: self.current.append(n),
                                                                     with_kwargs=True))
                self.handles.append(module.register_forward_hook(leave, with_kwargs=True))
        original = torch.nn.functional.scaled_dot_product_attention

        def counted(*args, **kwargs):
            self.per_module[self.current[-1] if self.current else None] += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def unet_call(unet, frames: int, state: StorySyncState | None = None, layout: RowLayout | None = None):
    generator = torch.Generator().manual_seed(frames)
    x = torch.randn(2 * frames, 4, *LATENT, generator=generator)
    context = torch.randn(2 * frames, 8, 24, generator=generator)
    hooks = []
    if state is not None:
        found = [(address(name), m) for name, m in unet.named_modules()]
        hooks = install_storysync_hooks([(a, m) for (a, kind), m in found if kind == "attn1"],
                                        [(a, m) for (a, kind), m in found if kind == "attn2"], state,
                                        "encoder_hidden_states")
        state.begin_unet_call(layout, LATENT)
    try:
        with torch.no_grad():
            return unet(x, 500, encoder_hidden_states=context).sample
    finally:
        remove_hooks(hooks)


@pytest.mark.parametrize("frames", [2, 4, 8])
def test_one_attention_call_per_layer_whatever_the_frames_with_dropout_on(unet, frames, monkeypatch):
    counter = KernelCounter(unet, monkeypatch)
    try:
        plain = unet_call(unet, frames)
        plain_counts = dict(counter.per_module)
        counter.per_module.clear()
        state, layout = story_state(frames)
        shared = unet_call(unet, frames, state, layout)
    finally:
        counter.close()
    assert set(plain_counts.values()) == {1} and None not in plain_counts
    assert dict(counter.per_module) == plain_counts  # every attn1 and attn2: one call, sharing or not
    plans = [plan for plan in state._plans.values() if plan is not None]
    assert plans, "nothing was shared"
    lengths = {length for plan in plans for length in plan.visible.sum(1).tolist()}
    assert len(lengths) > 2  # the rows' contexts differ in length: per-length calls would have been several
    assert not torch.allclose(shared, plain, atol=1e-5)


def test_the_sharing_plan_is_built_once_per_grid_not_per_layer(unet, monkeypatch):
    built = []
    original = state_module.plan_masked_sharing

    def recording(num_rows, num_tokens, *args, **kwargs):
        built.append(num_tokens)
        return original(num_rows, num_tokens, *args, **kwargs)
    monkeypatch.setattr(state_module, "plan_masked_sharing", recording)
    state, layout = story_state(4)
    shared_layers = [name for name, _ in unet.named_modules() if name.startswith("up_blocks")
                     and name.endswith("attn1")]
    unet_call(unet, 4, state, layout)
    assert len(shared_layers) > len(set(built)) and sorted(built) == sorted(set(built))  # one per grid
    first = len(built)
    unet_call(unet, 4, state, layout)  # another UNet call: its own cross-attention, new masks, new plans
    assert len(built) == 2 * first
    state.begin_step(0, 4, 10, 1.5)  # a new step: new dropout draws, new plans
    unet_call(unet, 4, state, layout)
    assert len(built) == 3 * first


def test_dropout_draws_are_the_same_for_every_layer_of_a_grid_and_new_each_step(unet):
    state, layout = story_state(4)
    unet_call(unet, 4, state, layout)
    grid = state._grid(LATENT[0] * LATENT[1] // 4)
    first = state._masks_at(grid, range(4))
    assert state._masks_at(grid, range(4)) is not first and all(
        torch.equal(state._masks_at(grid, range(4))[f]["a"], first[f]["a"]) for f in first)
    undropped = state_module.resize_mask(state.masks[0][1]["a"].unsqueeze(0), state.masks[0][0],
                                         (grid.height, grid.width))[0]
    assert not (first[0]["a"] & ~undropped).any() and int(first[0]["a"].sum()) < int(undropped.sum())
    state.begin_step(0, 4, 10, 1.5)
    assert any(not torch.equal(state._masks_at(grid, range(4))[f]["a"], first[f]["a"]) for f in first)


@pytest.mark.parametrize("frames", [2, 4, 8])
def test_forge_patch_makes_one_attention_call_for_every_row(frames, monkeypatch):
    from lib_consistency.surfaces.forge_patches import TRANSFORMER_OPTION, ForgeRunState, storysync_replace
    from tests.forge_standin import attention_function
    torch.manual_seed(frames)
    module = ToyAttention(8, 8)
    hidden = torch.randn(2 * frames, 16, 8)
    state, layout = story_state(frames)
    generator = torch.Generator().manual_seed(3)
    state.masks = {f: ((4, 4), {"a": torch.rand(16, generator=generator) > 0.3}) for f in range(frames)}
    options = {TRANSFORMER_OPTION: ForgeRunState(None, None, 0, state), "cond_or_uncond": [0, 1],
               "sigmas": torch.ones(frames), "n_heads": 2, "block": ("output", 3), "block_index": 0,
               "original_shape": [2 * frames, 4, 4, 4]}
    with torch.no_grad():
        q, k, v = (projection(hidden) for projection in (module.to_q, module.to_k, module.to_v))
        plain = attention_function(q, k, v, 2)
        calls = []
        original = torch.nn.functional.scaled_dot_product_attention
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                            lambda *a, **k: calls.append(a[1].shape[2]) or original(*a, **k))
        out = storysync_replace(attention_function)(q, k, v, options)
    assert len(calls) == 1 and calls[0] > 16  # one call, over padded contexts longer than the own tokens
    assert out.shape == plain.shape and not torch.allclose(out, plain, atol=1e-5)
