"""StorySync benchmark: cost-model arithmetic against hand-computed values and the real runtime; tiny smoke run."""
from __future__ import annotations

import pytest
import torch

from lib_consistency.bench import cli, csa as bench, storysync as bs
from lib_consistency.common.row_layout import Role, RowLayout
from lib_consistency.story_sync.state import Phase, PrePassDone, StorySyncSettings, StorySyncState
from lib_consistency.surfaces.attention_modules import install_storysync_hooks
from lib_consistency.surfaces.instance_hooks import remove_hooks


@pytest.mark.parametrize("steps, window, inside, prepass", [
    (20, 0.1, 2, 3), (30, 0.1, 3, 4), (50, 0.1, 5, 6),  # 0.1·30 = 3.0000000000000004: still 3 steps
    (20, 0.05, 1, 2), (10, 0.25, 3, 4), (10, 1.0, 10, 10),  # a window of every step needs no stopping call
])
def test_unet_calls_hand_computed(steps, window, inside, prepass):
    assert bs.bli_window_steps(steps, window) == inside
    consistent, pre, ratio = bs.unet_calls(steps, window)
    assert (consistent, pre) == (steps, prepass)
    assert ratio == pytest.approx((steps + prepass) / steps)


def test_fifty_steps_cost_what_methods_md_says():
    assert bs.unet_calls(50, 0.1)[2] == pytest.approx(1.12)  # methods.md §5.3: ≈ 1.12× at 50 steps


def test_layer_inventories_hand_computed():
    assert sum(layer[1] for layer in bs.SD15_512) == 16
    assert sum(layer[1] for layer in bs.SDXL_1024) == 70
    assert bs.cache_elements_per_step(bs.SD15_512) == 5 * 4096 * 320 + 5 * 1024 * 640 + 5 * 256 * 1280 + 64 * 1280
    sdxl = bs.cache_elements_per_step(bs.SDXL_1024)
    assert sdxl == 10 * 4096 * 640 + 60 * 1024 * 1280 == 104_857_600  # methods.md §5.3: 104.9 M elements
    assert round(sdxl * 2 / 1e6) == 210  # ≈ 210 MB fp16


def test_cache_bytes_hand_computed():
    assert bs.bli_cache_bytes(bs.SD15_512, 4, 20, 0.1) == 11_550_720 * 2 * 4 * 2 * 2
    assert bs.bli_cache_bytes(bs.SDXL_1024, 4, 30, 0.1) == 104_857_600 * 2 * 4 * 2 * 3 == 5_033_164_800
    assert bs.bli_cache_bytes(bs.SDXL_1024, 4, 50, 0.1, qkv=True) == 3 * 104_857_600 * 2 * 4 * 2 * 5
    assert bs.bli_cache_bytes(bs.SDXL_1024, 1, 50, 0.1, element_size=4, branches=1) == 104_857_600 * 4 * 5


@pytest.mark.parametrize("qkv", [False, True])
def test_cache_model_equals_the_runtime_prepass(qkv):
    """A real pre-pass of the state (Phase.VANILLA, every layer of a tiny inventory) holds exactly the modelled
    bytes and makes the modelled number of calls."""
    inventory = (("a", 2, 16, 4), ("b", 1, 4, 8))  # 4x4 and 2x2 token grids
    frames, steps, window = 3, 7, 0.4
    state = StorySyncState(StorySyncSettings(bli_strength=0.7, bli_window=window), 0, {}, {})
    state.phase = Phase.VANILLA
    layout = RowLayout(tuple(f for f in range(frames) for _ in range(2)), (Role.COND, Role.UNCOND) * frames)
    calls = 0
    for step in range(steps):
        state.begin_unet_call(layout, (4, 4))
        state.begin_step(0, step, steps, 1.0)
        calls += 1
        try:
            for index, (_, layers, tokens, channels) in enumerate(inventory):
                for block in range(layers):
                    hidden = torch.zeros(2 * frames, tokens, channels * (3 if qkv else 1), dtype=torch.float16)
                    assert state.self_attention(("output", index, block), hidden, lambda q, c: q) is None
        except PrePassDone:
            break
    assert calls == bs.unet_calls(steps, window)[1] == 4
    assert state.bli_cache.bytes_held == bs.bli_cache_bytes(inventory, frames, steps, window, 2, qkv)


def test_subject_mask_is_a_centred_square():
    mask = bs.subject_mask(32).view(32, 32)
    assert int(mask.sum()) == 18 * 18  # round(32·√0.3) = 18
    rows = mask.any(dim=1).nonzero().flatten()
    assert rows.tolist() == list(range(7, 25)) == mask.any(dim=0).nonzero().flatten().tolist()
    assert int(bs.subject_mask(2).sum()) == 1  # never empty


def test_bounds_hand_computed():
    assert bs.sharing_bound(4, 324, 1024) == pytest.approx(1 + 324 * 3 / 1024)
    assert bs.rfh_extra(4, 324, 1024, 640) == pytest.approx(3 * 324 ** 2 * 640 / (4 * 1024 * 640 ** 2
                                                                                  + 2 * 1024 ** 2 * 640))


def test_timed_calls_do_the_work_they_claim():
    """Sharing changes the output, RFH changes it again, and plain attention runs after the hooks are gone."""
    torch.manual_seed(0)
    side, frames, channels = 4, 3, 16
    module = bench.MultiHeadSelfAttention(channels, 2)
    hidden = torch.randn(frames, side * side, channels)
    mask = bs.subject_mask(side)
    plain = module(hidden)

    def hooked(rfh_strength: float) -> torch.Tensor:
        hooks = install_storysync_hooks([(("output", 3, 0), module)], [],
                                        bs.storysync_state(frames, side, 1, mask, rfh_strength))
        try:
            return module(hidden)
        finally:
            remove_hooks(hooks)

    shared, rfh = hooked(0.0), hooked(0.3)
    assert not torch.allclose(shared, plain) and not torch.allclose(rfh, shared)
    assert torch.equal(module(hidden), plain)


def test_tiny_run_prints_both_parts(capsys, monkeypatch):
    for module, name, value in ((bench, "FRAME_COUNTS", (2,)), (bench, "RATES", (0.5,)), (bs, "FRAME_COUNTS", (2, 3))):
        monkeypatch.setattr(module, name, value)
    cli.main(["--device", "cpu", "--side-divisor", "16", "--repeats", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    csa = [i for i, line in enumerate(lines) if line.startswith("worst time ratio / FLOPs bound: ")]
    assert len(csa) == 1 and csa[0] < len(lines) - 1  # the CSA summary, then the StorySync part
    assert lines[-1].startswith("storysync worst time ratio / FLOPs bound: ")
    assert float(lines[-1].rsplit(" ", 1)[1]) > 0
    assert sum(" sharing+RFH " in line for line in lines) == 2 * len(bs.FRAME_COUNTS)  # the two level-1 cases
    cli.main(["--device", "cpu", "--side-divisor", "16", "--repeats", "1", "--only", "csa"])
    assert "storysync" not in capsys.readouterr().out


def test_whole_unet_bench_runs_every_storysync_step_on_a_tiny_real_unet():
    pytest.importorskip("diffusers")
    from lib_consistency.bench import storysync_unet as bu
    tiny = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
                cross_attention_dim=24, norm_num_groups=8, attention_head_dim=8)
    lines = []
    figures = bu.run("sd15", "cpu", torch.float32, frames=3, repeats=1, latent_side=16, unet_config=tiny,
                     print_fn=lines.append)
    assert 0 < figures["subject"] < 1  # masks came from the UNet's own cross-attention
    assert figures["flops_ratio"] > 1.01 and figures["time_ratio"] > 0  # the shared keys and values cost FLOPs
    assert len(lines) == 2 and lines[1].startswith("storysync-unet time ratio ")


def test_diffusers_names_map_to_ldm_addresses():
    from lib_consistency.bench.storysync_unet import ldm_address
    assert ldm_address("down_blocks.1.attentions.1.transformer_blocks.3.attn1", 2) == (("input", 5, 3), "attn1")
    assert ldm_address("up_blocks.0.attentions.2.transformer_blocks.9.attn2", 2) == (("output", 2, 9), "attn2")
    assert ldm_address("up_blocks.2.attentions.0.transformer_blocks.0.attn1", 2) == (("output", 6, 0), "attn1")
    assert ldm_address("mid_block.attentions.0.transformer_blocks.4.attn1", 2) == (("middle", 0, 4), "attn1")
    assert ldm_address("down_blocks.1.resnets.0", 2) == (None, None)


def test_flux_bench_runs_both_methods_on_a_tiny_real_flux_transformer():
    pytest.importorskip("diffusers")
    from lib_consistency.bench import flux as bf
    config = dict(bf.CONFIGS["small"], num_layers=1, num_single_layers=2, attention_head_dim=16,
                  num_attention_heads=2, axes_dims_rope=(4, 6, 6), joint_attention_dim=32, pooled_projection_dim=16)
    lines: list[str] = []
    figures = bf.run("small", "cpu", torch.float32, frames=2, repeats=1, config=config, grid=4,
                     print_fn=lines.append)
    # the last single block (depth 2/3) shares: more keys, so more attention FLOPs; StorySync adds its maps
    assert figures["csa_flops_ratio"] > 1.0 and figures["storysync_flops_ratio"] > 1.0
    assert len(lines) == 3 and "1 double + 2 single blocks" in lines[0] and "StorySync" in lines[2]


TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=16, norm_num_groups=8, attention_head_dim=4)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny UNet on 2 shared cores runs faster on one
    yield
    torch.set_num_threads(threads)


def test_presets_bench_runs_every_row_through_the_same_loop(one_thread):
    """Whole tiny generations of every preset: the ratios' reference is exact, each method reaches the model and
    costs the FLOPs it should (hand-computed where the rows alone decide them)."""
    pytest.importorskip("diffusers")
    from lib_consistency.bench import presets as bp
    from lib_consistency.oneactor.guidance import window_steps
    from lib_consistency.settings import Settings
    frames, steps = 2, 3
    lines: list[str] = []
    figures = bp.run("sd15", "cpu", torch.float32, frames=frames, steps=steps, repeats=1, latent_side=16,
                     unet_config=TINY_UNET, profile=True, print_fn=lines.append)
    story = {name: figures[name, frames] for name in ("vanilla",) + bp.STORY_PRESETS}
    oneactor = {name: figures[name, 1] for name in ("vanilla",) + tuple(row for row, _, _ in bp.ONEACTOR_ROWS)}
    assert set(figures) == {*((n, frames) for n in story), *((n, 1) for n in oneactor), (bp.LOCKSTEP, frames),
                            "lockstep", "profile"}
    rows = [key for key in figures if isinstance(key, tuple)]
    assert list(figures["profile"]) == rows  # every row profiled, in the table's order
    assert figures["profile"][bp.LOCKSTEP, frames]["ranges"]["UNet call"][0] == steps  # no pre-pass calls
    profiled = lines[-len(rows) - 1:]
    lines = lines[:-len(rows) - 1]
    assert profiled[0].startswith("profile (") and all(line.startswith("  ") for line in profiled[1:])
    for vanilla in (story["vanilla"], oneactor["vanilla"]):
        assert vanilla["time_ratio"] == vanilla["memory_ratio"] == vanilla["flops_ratio"] == 1.0
        assert vanilla["change"] == 0.0 and vanilla["prepass"] == 0.0
    for name, row in (*story.items(), *oneactor.items()):
        if name != "vanilla":
            assert row["change"] > 0, name  # the method reached the UNet: other latents than vanilla's
            assert row["seconds"] > 0 and row["peak"] > 0
    # IPCA's identity keys and CSA's peer tokens each add attention FLOPs; Combined is exactly both (SVR is no
    # matrix product the counter sees)
    extra = {name: story[name]["flops"] - story["vanilla"]["flops"] for name in bp.STORY_PRESETS}
    assert extra["1Prompt1Story"] > 0 and extra["StoryDiffusion"] > 0
    assert extra["Combined"] == extra["1Prompt1Story"] + extra["StoryDiffusion"]
    # StorySync: the pre-pass ran its one BLI step (0/3 < 0.1) and stopped in the next call, and is in the totals
    sync, per_call = story["StorySync"], story["vanilla"]["flops"] / steps
    assert sync["prepass"] > 0 and per_call <= sync["prepass_flops"] < 2 * per_call
    assert sync["flops"] >= story["vanilla"]["flops"] + sync["prepass_flops"]
    # OneActor: η2 = 0 adds no matrix product; η2 > 0 adds B rows to the 2B of each window step, in either form
    assert oneactor["OneActor η2 = 0"]["flops"] == oneactor["vanilla"]["flops"]
    two_calls, folded = oneactor["OneActor η2 > 0, two calls"], oneactor["OneActor η2 > 0, folded"]
    inside = window_steps(steps, Settings().with_value("oneactor_preset", "paper").oneactor_window)
    assert two_calls["flops"] == folded["flops"]
    assert two_calls["flops_ratio"] == pytest.approx(1 + inside / (2 * steps))
    lock = figures["lockstep"]
    assert lock[f"peak_{4 * frames}"] > lock[f"peak_{2 * frames}"] and lock[f"seconds_{2 * frames}"] > 0
    # BLI in lock-step: no pre-pass, the same images as with it (float32; exact in float64, test below), the
    # vanilla rows' FLOPs now inside the window's calls
    lockstep = figures[bp.LOCKSTEP, frames]
    assert lockstep["prepass"] == 0.0 and 0 < lock["latents_difference"] < 1e-4
    assert lockstep["flops"] == pytest.approx(sync["flops"] - sync["prepass_flops"] + per_call, rel=0.02)
    assert len(lines) == 3 + len(story) + 1 + len(oneactor) + 3
    assert lines[-3].startswith("StorySync: BLI pre-pass ") and lines[-2].startswith("one plain UNet call: ")
    assert lines[-1].startswith("StorySync, BLI pre-pass x")


TINY_SDXL_UNET = dict(TINY_UNET, addition_embed_type="text_time", addition_time_embed_dim=4,
                      projection_class_embeddings_input_dim=8 + 6 * 4)  # SDXL's added conditioning, tiny


@pytest.mark.parametrize("config", [TINY_UNET, TINY_SDXL_UNET], ids=["sd15-like", "sdxl-like"])
def test_bli_in_lock_step_equals_the_pre_pass_in_float64(config):
    """StorySync with BLI's vanilla trajectory as twin rows of the window's calls (methods.md §5.1 step 4, way (b))
    makes the images of the pre-pass (way (a)) to float64 rounding, over a window of two steps; without BLI's
    strength the twins change nothing either; a twin-less call inside the window is refused."""
    pytest.importorskip("diffusers")
    from lib_consistency.bench import presets as bp
    from lib_consistency.common.row_layout import Role, RowLayout
    steps, frames = 12, 3  # window 0.1 of 12 steps: steps 0 and 1
    inputs = bp.make_inputs("sd15", torch.device("cpu"), torch.float64, steps, 16, config)
    assert (inputs.added is not None) == (config is TINY_SDXL_UNET)
    with torch.no_grad():
        prepass = bp.generate(inputs, "StorySync", frames)[0]
        lockstep = bp.generate(inputs, bp.LOCKSTEP, frames)[0]
        vanilla = bp.generate(inputs, "vanilla", frames)[0]
    scale = prepass.abs().max()
    assert (lockstep - prepass).abs().max() <= 1e-10 * scale
    assert (prepass - vanilla).abs().max() > 1e-3 * scale  # StorySync did change the images
    method = bp.build_method("StorySync", inputs, frames)
    state = method.storysync
    state.begin_step(0, 0, steps, inputs.sigmas[0])
    assert state.in_bli_window()
    every = tuple(range(frames))
    half = RowLayout(every * 3, (Role.COND,) * frames + (Role.UNCOND,) * frames + (Role.OTHER,) * frames,
                     twins=tuple(range(2 * frames, 3 * frames)) + (-1,) * (2 * frames))
    state.begin_unet_call(half, (16, 16))
    layer = next(address for address, _ in inputs.attn1 if state._interpolates_at(address))
    with pytest.raises(RuntimeError, match="no vanilla row in this call"):
        state.self_attention_groups(layer, torch.zeros(3 * frames, 64, 8, dtype=torch.float64))
    state.close()


def test_presets_profile_names_where_the_time_goes_and_leaves_nothing_behind(one_thread):
    """``--profile``: every UNet call, attention module call and StorySync step of work is counted in its range
    (exact counts), the ranges nest, profiling changes no latent, and every hook and wrapper is gone afterwards."""
    pytest.importorskip("diffusers")
    from lib_consistency.bench import presets as bp
    from lib_consistency.bench import profile as bprof
    from lib_consistency.story_sync.state import StorySyncState
    steps, frames = 3, 2
    inputs = bp.make_inputs("sd15", torch.device("cpu"), torch.float32, steps, 16, TINY_UNET)
    originals = {(owner, name): owner.__dict__[name] for owner, name, _ in bprof.INTERNALS}
    layers = len(inputs.attn1)
    assert layers == len(inputs.attn2) > 0
    with torch.no_grad():
        plain = {name: bp.generate(inputs, name, frames)[0] for name in ("vanilla", "StorySync")}
        latents = {}

        def run(name):
            latents[name] = bp.generate(inputs, name, frames)[0]

        vanilla = bprof.profile_generation(inputs, lambda: run("vanilla"))
        sync = bprof.profile_generation(inputs, lambda: run("StorySync"))
    for name in plain:
        assert torch.equal(latents[name], plain[name]), name
    ranges = vanilla["ranges"]
    assert set(ranges) == {"UNet call", "attn1", "attn2"}
    assert ranges["UNet call"][0] == steps and ranges["attn1"][0] == ranges["attn2"][0] == steps * layers
    # StorySync: the pre-pass makes its window's call (0/3 < 0.1) and stops in the first self-attention of the next
    ranges = sync["ranges"]
    assert ranges["BLI pre-pass"][0] == 1 and ranges["UNet call"][0] == steps + 2
    assert ranges["attn1"][0] == (steps + 1) * layers + 1 and ranges["attn2"][0] >= (steps + 1) * layers
    assert ranges["masks"][0] == steps  # once per consistent UNet call, at the first up block
    assert ranges["RFH"][0] == (steps + 1) * layers  # called after every completed self-attention
    assert ranges["subject maps"][0] > 0 and ranges["sharing plan"][0] > 0
    for figures in (vanilla, sync):
        host = {label: seconds for label, (_, seconds, _) in figures["ranges"].items()}
        assert host["attn1"] + host["attn2"] <= host["UNet call"] <= figures["wall"]
        assert figures["other"] == pytest.approx(figures["wall"] - host["UNet call"]) and figures["busy"] is None
    assert host["BLI pre-pass"] < figures["wall"]
    for (owner, name), original in originals.items():
        assert owner.__dict__[name] is original
    assert StorySyncState.__dict__["add_maps"] is originals[StorySyncState, "add_maps"]
    for module in [inputs.unet] + [m for _, m in inputs.attn1 + inputs.attn2]:
        assert not module._forward_hooks and not module._forward_pre_hooks
    lines: list[str] = []
    bprof.print_profiles({("vanilla", frames): vanilla, ("StorySync", frames): sync}, lines.append)
    assert len(lines) == 3 and "BLI pre-pass 1x" in lines[2] and "RFH" in lines[2] and "RFH" not in lines[1]
