"""StorySync hooks on a real (tiny, randomly initialised) diffusers UNet and on a single attention module:
masks built from the UNet's own cross-attention, install -> remove restores the UNet bit for bit, RFH and BLI
strength 0 change nothing, BLI strength 1 gives the vanilla queries exactly, the pre-pass records exactly the inputs
of a plain run, and the Forge patches equal the A1111 hooks."""
from __future__ import annotations

import re

import pytest
import torch

from lib_consistency.common.row_layout import Role, RowLayout
from lib_consistency.story_diffusion.consistent_self_attention import LayerPolicy, Schedule
from lib_consistency.story_diffusion.reference_bank import BankKey
from lib_consistency.story_diffusion.state import BankMode
from lib_consistency.story_sync.state import Phase, PrePassDone, StorySyncSettings, StorySyncState
from lib_consistency.surfaces.attention_modules import install_storysync_hooks
from lib_consistency.surfaces.instance_hooks import remove_hooks, remove_stale_hooks
from tests.fake_webui import ToyAttention

LATENT = (16, 16)
LAYOUT = RowLayout((0, 1, 2, 0, 1, 2), (Role.COND,) * 3 + (Role.UNCOND,) * 3)
GROUPS = {0: frozenset({"a"}), 1: frozenset({"a"}), 2: frozenset({"a"})}
COLUMNS = {f: {"a": (1, 2)} for f in range(3)}


def address(name: str):
    """diffusers attention name -> ldm-style address, one layer per block (conv_in is input 0)."""
    match = re.fullmatch(r"(down|up)_blocks\.(\d+)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.(attn[12])", name)
    if match:
        kind, level, layer, transformer = match.group(1), *map(int, match.groups()[1:4])
        index = 1 + level * 2 + layer if kind == "down" else level * 2 + layer
        return ("input" if kind == "down" else "output", index, transformer), match.group(5)
    match = re.fullmatch(r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.(attn[12])", name)
    return (("middle", 0, int(match.group(1))), match.group(2)) if match else (None, None)


def tiny_unet():
    """A tiny randomly initialised diffusers UNet: 3 cross-attention levels (16², 8², 4² on the 16² latent)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(
        sample_size=LATENT[0], in_channels=4, out_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=24, norm_num_groups=8, attention_head_dim=8)
    return model.eval()


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(6, 4, *LATENT, generator=generator), torch.randn(6, 8, 24, generator=generator)


def layers(unet, kind):
    return [(a, m) for name, m in unet.named_modules() if (found := address(name))[1] == kind and (a := found[0])]


def make_state(step=1, total=10, **values):
    settings = StorySyncSettings(**{"rfh_window": (0.0, 1.0), "bli_window": 0.5, "layer_policy": LayerPolicy.UP,
                                    "schedule": Schedule.ALWAYS, **values})
    state = StorySyncState(settings, 7, GROUPS, COLUMNS)
    state.begin_unet_call(LAYOUT, LATENT)
    state.begin_step(0, step, total, 5.0 - step)
    return state


def run(unet, inputs, state=None):
    hooks = install_storysync_hooks(layers(unet, "attn1"), layers(unet, "attn2"), state,
                                    "encoder_hidden_states") if state is not None else []
    try:
        if state is not None:
            state.begin_unet_call(LAYOUT, LATENT)
        with torch.no_grad():
            return unet(inputs[0], 500, encoder_hidden_states=inputs[1]).sample
    finally:
        remove_hooks(hooks)


def test_masks_come_from_the_unets_cross_attention_and_hooks_leave_nothing(unet, inputs):
    plain = run(unet, inputs)
    state = make_state(mask_dropout=0.0, rfh_strength=0.0, bli_strength=0.0)
    shared = run(unet, inputs, state)
    assert set(state.masks) == {0, 1, 2}
    grid, masks = state.masks[0]
    assert grid == (4, 4) and masks["a"].dtype == torch.bool and 0 < int(masks["a"].sum()) < 16
    assert not torch.allclose(shared, plain, atol=1e-5)  # masked sharing changed the images
    assert all("forward" not in m.__dict__ for m in unet.modules())
    assert torch.equal(run(unet, inputs), plain)
    state.closed = True  # a closed (stale) state passes through even with its hooks installed
    assert torch.equal(run(unet, inputs, state), plain)


def test_rfh_and_bli_at_strength_zero_change_nothing(unet, inputs):
    base = run(unet, inputs, make_state(rfh_window=(0.9, 1.0), bli_window=0.0))  # neither in its window
    assert torch.equal(run(unet, inputs, make_state(rfh_strength=0.0, bli_strength=0.0)), base)
    with_rfh = run(unet, inputs, make_state(rfh_strength=0.7, bli_window=0.0))
    assert not torch.equal(with_rfh, base)


def record_plain_inputs(unet, inputs):
    seen = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, a=a: seen.setdefault(a, args[0].clone()))
               for a, m in layers(unet, "attn1")]
    try:
        with torch.no_grad():
            unet(inputs[0], 500, encoder_hidden_states=inputs[1])
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_prepass_records_exactly_the_inputs_of_a_plain_run_and_stops_after_its_window(unet, inputs):
    plain_inputs = record_plain_inputs(unet, inputs)
    state = make_state(step=1, total=10, bli_window=0.2)
    state.phase = Phase.VANILLA
    out = run(unet, inputs, state)
    assert torch.equal(out, run(unet, inputs))  # the pre-pass attends plainly
    for layer, hidden in plain_inputs.items():
        for row, (frame, role) in enumerate(zip(LAYOUT.frames, LAYOUT.roles)):
            key = BankKey(f"{layer[0]}.{layer[1]}.{layer[2]}", state.step, role, frame)
            assert torch.equal(state.bli_cache.read(key, hidden.device, hidden.dtype), hidden[row])
    state.begin_step(0, 2, 10, 3.0)  # 2/10 is past a 0.2 window
    with pytest.raises(PrePassDone):
        run(unet, inputs, state)


def test_bli_strength_one_gives_the_vanilla_queries_and_zero_the_consistent_ones():
    torch.manual_seed(3)
    hidden, vanilla = torch.randn(6, 16, 8), torch.randn(6, 16, 8)
    seen = []

    def attention(query, context):
        seen.append((query, context))
        return query

    for strength, expected in ((1.0, vanilla), (0.0, hidden)):
        state = make_state(bli_strength=strength, rfh_strength=0.0)
        state.latent_hw = (8, 8)
        for row, (frame, role) in enumerate(zip(LAYOUT.frames, LAYOUT.roles)):
            state.bli_cache.write(BankKey("input.1.0", state.step, role, frame), vanilla[row])
        seen.clear()
        state.self_attention(("input", 1, 0), hidden, attention)  # no masks yet: BLI only
        if strength == 0.0:
            assert not seen  # nothing to do: the caller attends plainly
            continue
        (query, context), = seen
        assert torch.equal(query, expected) and torch.equal(context, hidden)  # queries only: K/V stay own
    state = make_state(bli_strength=0.5, bli_inputs=True)
    state.latent_hw = (8, 8)
    for row, (frame, role) in enumerate(zip(LAYOUT.frames, LAYOUT.roles)):
        state.bli_cache.write(BankKey("input.1.0", state.step, role, frame), vanilla[row])
    seen.clear()
    state.self_attention(("input", 1, 0), hidden, attention)
    (query, context), = seen
    assert torch.equal(query, context)  # inputs: Q, K and V blended alike
    torch.testing.assert_close(query, (hidden + vanilla) / 2)


def masked_state(bank_mode=BankMode.OFF, references=None):
    state = StorySyncState(StorySyncSettings(mask_dropout=0.0, rfh_window=(0.0, 1.0), layer_policy=LayerPolicy.UP,
                                             schedule=Schedule.ALWAYS, bli_strength=0.0), 7, GROUPS, COLUMNS,
                           references)
    state.bank_mode = bank_mode
    state.begin_unet_call(LAYOUT, (8, 8))
    state.begin_step(0, 3, 10, 2.0)
    generator = torch.Generator().manual_seed(4)
    state.masks = {f: ((2, 2), {"a": torch.rand(4, generator=generator) > 0.4}) for f in range(3)}
    return state


def test_forge_patches_equal_the_a1111_hooks_on_one_attention_module():
    from lib_consistency.surfaces.forge_patches import (TRANSFORMER_OPTION, ForgeRunState, storysync_output_patch,
                                                        storysync_replace)
    from tests.forge_standin import attention_function
    torch.manual_seed(5)
    module = ToyAttention(8, 8)
    x = torch.randn(6, 16, 8)
    layer = ("output", 6, 0)  # 16 tokens on an 8x8 latent: level 1, where sharing and RFH both run
    with torch.no_grad():
        hook_state = masked_state()
        install_storysync_hooks([(layer, module)], [], hook_state)
        hook_out = module(x)
        remove_stale_hooks(module)
        plain = module(x)
        forge_state = masked_state()
        options = {TRANSFORMER_OPTION: ForgeRunState(None, None, 0, forge_state), "cond_or_uncond": [0, 1],
                   "sigmas": torch.ones(3), "n_heads": 2, "block": layer[:2], "block_index": layer[2],
                   "original_shape": [6, 4, 8, 8]}
        inner = storysync_replace(attention_function)(module.to_q(x), module.to_k(x), module.to_v(x), options)
        forge_out = storysync_output_patch(module.to_out(inner), options)
    torch.testing.assert_close(forge_out, hook_out, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(hook_out, plain, atol=1e-4)


def test_a_later_batch_reads_the_references_from_the_bank():
    """Frame 2 attends to the same context whether references 0 and 1 are its batch mates (written to the bank) or
    come from the bank in a later batch: its own tokens, then the references' subject tokens."""
    torch.manual_seed(6)
    hidden = torch.randn(6, 16, 8)
    calls = []

    def attention(query, context, visible=None):
        calls.append((query, context, visible))
        return query

    def context_of(row_hidden):
        """The real keys (the padding left out) of the row whose queries are ``row_hidden``."""
        for query, context, visible in calls:
            for i in range(query.shape[0]):
                if torch.equal(query[i], row_hidden):
                    return context[i] if visible is None else context[i][visible[i]]
        return None

    writer = masked_state(BankMode.WRITE, references=(0, 1))
    writer.self_attention(("output", 6, 0), hidden, attention)
    in_batch = context_of(hidden[2])
    assert writer.bank.bytes_held > 0 and in_batch is not None and in_batch.shape[0] > 16
    reader = masked_state(BankMode.READ, references=(0, 1))
    reader.bank, reader.masks = writer.bank, {2: writer.masks[2]}
    reader.bank_masks = {(reader.step, f): writer.masks[f] for f in (0, 1)}
    reader.layout = RowLayout((2, 2), (Role.COND, Role.UNCOND))
    calls.clear()
    reader.self_attention(("output", 6, 0), hidden[[2, 5]], attention)
    assert torch.equal(context_of(hidden[2]), in_batch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run where one is lent)")
def test_storysync_on_cuda_in_half_precision(unet, inputs):
    """Masks, masked sharing, RFH and BLI with every tensor on the GPU in float16 (no CPU-only helper left)."""
    import copy
    gpu = copy.deepcopy(unet).to("cuda", torch.float16)
    gpu_inputs = tuple(t.to("cuda", torch.float16) for t in inputs)

    def forward(state=None):
        return run(gpu, gpu_inputs, state)

    plain = forward()
    state = make_state(step=1, total=10, bli_window=0.5, rfh_strength=0.5, mask_dropout=0.3, share_dropout=0.2,
                       rfh_dropout=0.1)
    state.phase = Phase.VANILLA
    forward(state)  # records the BLI inputs
    state.phase = Phase.CONSISTENT
    out = forward(state)
    assert state.masks and state.masks[0][1]["a"].device.type == "cpu" and len(state.bli_cache) > 0  # masks: CPU
    assert torch.isfinite(out).all() and not torch.allclose(out, plain, atol=1e-3)
    assert torch.equal(forward(), plain)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run where one is lent)")
@pytest.mark.parametrize("forge", [False, True])
def test_self_attention_path_never_waits_for_the_gpu(forge):
    """Masked sharing (two characters, [NC], dropouts), BLI and RFH on one layer issue no host synchronisation:
    CUDA's sync debug mode turns any into an error. (Masks are finalised once per UNet call, outside this.)"""
    from lib_consistency.bench.csa import MultiHeadSelfAttention
    from lib_consistency.surfaces.forge_patches import (TRANSFORMER_OPTION, ForgeRunState, storysync_output_patch,
                                                        storysync_replace)
    side, channels, frames = 8, 64, 4
    groups = {0: frozenset({"a"}), 1: frozenset({"a", "b"}), 2: frozenset({"b"}), 3: frozenset()}
    settings = StorySyncSettings(mask_dropout=0.5, share_dropout=0.2, rfh_strength=0.3, rfh_dropout=0.1,
                                 rfh_window=(0.0, 1.0), bli_strength=0.7, bli_window=0.5,
                                 layer_policy=LayerPolicy.ALL, schedule=Schedule.ALWAYS)
    state = StorySyncState(settings, 7, groups, {f: {c: (1,) for c in groups[f]} for f in range(frames)})
    layout = RowLayout(tuple(range(frames)) * 2, (Role.COND,) * frames + (Role.UNCOND,) * frames)
    generator = torch.Generator().manual_seed(0)
    state.masks = {f: ((side, side), {c: torch.rand(side * side, generator=generator) < 0.4 for c in groups[f]})
                   for f in range(frames) if groups[f]}  # an [NC] frame has no subject tokens, so no mask
    module = MultiHeadSelfAttention(channels, 2).to("cuda", torch.float16)
    hidden = torch.randn(2 * frames, side * side, channels, device="cuda", dtype=torch.float16)
    layer = ("output", 3, 0)

    def call():
        state.begin_unet_call(layout, (2 * side, 2 * side))  # token grid at level 1: RFH's level
        state.begin_step(0, 1, 10, 3.0)
        if not forge:
            hooks = install_storysync_hooks([(layer, module)], [], state)
            try:
                return module(hidden)
            finally:
                remove_hooks(hooks)
        run_state = ForgeRunState(None, None, 0, state)
        options = {TRANSFORMER_OPTION: run_state, "n_heads": 2, "block": ("output", 3), "block_index": 0,
                   "cond_or_uncond": [0, 1], "sigmas": torch.ones(frames),
                   "original_shape": (2 * frames, 4, 2 * side, 2 * side)}
        qkv = [projection(hidden) for projection in (module.to_q, module.to_k, module.to_v)]

        def attention(q, k, v, heads, mask=None):
            split = [t.view(t.shape[0], -1, heads, channels // heads).transpose(1, 2) for t in (q, k, v)]
            out = torch.nn.functional.scaled_dot_product_attention(*split)
            return out.transpose(1, 2).reshape(q.shape[0], -1, channels)

        return storysync_output_patch(module.to_out(storysync_replace(attention)(*qkv, options)), options)

    with torch.inference_mode():
        plain = module(hidden)
        state.phase = Phase.VANILLA
        call()  # records the BLI inputs of step 1
        state.phase = Phase.CONSISTENT
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all() and not torch.allclose(out, plain, atol=1e-3)
