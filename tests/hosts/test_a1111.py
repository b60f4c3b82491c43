"""A1111 adapter against stand-ins of the host (tests/fake_webui.py): story expansion, conditioning swap, hook
install/remove symmetry, errors raised where the host does not swallow them, stale-hook sweep, X/Y/Z overrides."""
from __future__ import annotations

import importlib

import pytest
import torch

from lib_consistency.settings import Settings
from tests.conftest import tiny_clip_text_model
from tests.fake_webui import ToyModel, ToyProcessing, install_stub_modules

STORY = "a small red fox with a white tail\nruns through snow # Morning\nsleeps in a log # Night\n[NC] an empty lake"


@pytest.fixture
def host(monkeypatch, clip_tokenizer):
    install_stub_modules(monkeypatch)
    a1111 = importlib.import_module("lib_consistency.hosts.pipeline")
    model = ToyModel(clip_tokenizer, tiny_clip_text_model(16, seed=5))
    return a1111, model


def args_for(**values):
    return Settings.from_dict({"enabled": True, "story": STORY, **values}).to_args()


def run(a1111, p, args, **sample_kwargs):
    a1111.before_process(p, args)
    out = p.sample(a1111.on_cfg_denoiser, **sample_kwargs)
    return out


def module_state(unet):
    """Everything a hook could leave behind: instance forwards and forward pre-hooks."""
    return ([name for name, m in unet.named_modules() if "forward" in m.__dict__],
            len(unet._forward_pre_hooks))


def test_disabled_is_the_baseline_bit_for_bit(host):
    a1111, model = host
    baseline = ToyProcessing(model).sample(a1111.on_cfg_denoiser)
    p = ToyProcessing(model)
    out = run(a1111, p, Settings(story=STORY).to_args())
    assert torch.equal(out, baseline)
    assert p.prompt == "watercolor" and p.batch_size == 1 and not p.extra_generation_params


def test_story_becomes_the_batch(host):
    a1111, model = host
    p = ToyProcessing(model, prompt="watercolor <lora:ink:0.5>")
    a1111.before_process(p, args_for())
    assert p.prompt == ["watercolor <lora:ink:0.5>, a small red fox with a white tail, runs through snow",
                        "watercolor <lora:ink:0.5>, a small red fox with a white tail, sleeps in a log",
                        "watercolor <lora:ink:0.5>, an empty lake"]
    assert (p.batch_size, p.n_iter) == (3, 1) and p.seed == [1234] * 3
    assert p.extra_generation_params["Story Text"] == STORY
    assert p.extra_generation_params["Story Style"] == "watercolor <lora:ink:0.5>"
    assert Settings.from_infotext(p.extra_generation_params) == Settings.from_args(args_for())
    sequential = ToyProcessing(model)
    a1111.before_process(sequential, args_for(seed_mode="sequential", frames_per_batch=2))
    assert sequential.seed == [1234, 1235, 1236] and (sequential.batch_size, sequential.n_iter) == (2, 2)


def test_conditioning_swap_uses_the_consolidated_svr_contexts(host):
    a1111, model = host
    p = ToyProcessing(model)
    run(a1111, p, args_for(ipca=False))
    generation = getattr(p, a1111.RUN_ATTRIBUTE)
    assert model.encoded_texts == ["watercolor, a small red fox with a white tail runs through snow sleeps in a log "
                                   "an empty lake"]  # <lora> tags stripped, one encoding for all frames
    expected = torch.stack(generation.conditioning.contexts([0, 1, 2]))
    assert all(torch.equal(cond, expected) for cond in p.seen_conds)
    assert not torch.equal(expected[0], expected[1])


@pytest.mark.parametrize("values", [dict(), dict(preset="StoryDiffusion", csa_layers="all"),
                                    dict(preset="Combined", csa_layers="all", ipca_dropout=0.5)])
def test_hooks_change_the_result_and_leave_nothing_behind(host, values):
    a1111, model = host
    unet = model.model.diffusion_model
    before_state = module_state(unet)
    plain_before = ToyProcessing(model).sample(a1111.on_cfg_denoiser)
    p = ToyProcessing(model)
    story_out = run(a1111, p, args_for(**values))
    assert module_state(unet) == before_state  # removed at the end of p.sample
    plain_after = ToyProcessing(model).sample(a1111.on_cfg_denoiser)
    assert torch.equal(plain_before, plain_after)
    # the same prompts and seeds without the extension's effects
    reference = ToyProcessing(model)
    reference.prompt, reference.batch_size = list(p.prompt), p.batch_size
    assert not torch.allclose(story_out, reference.sample(lambda params: None))


def test_failure_during_sampling_removes_every_hook(host):
    a1111, model = host
    unet = model.model.diffusion_model
    before_state = module_state(unet)
    p = ToyProcessing(model)
    with pytest.raises(RuntimeError, match="simulated"):
        run(a1111, p, args_for(preset="Combined", csa_layers="all"), fail_at_step=1)
    assert module_state(unet) == before_state
    p.close()
    assert p.closed


def test_stale_hooks_are_swept_by_the_next_run(host):
    a1111, model = host
    unet = model.model.diffusion_model
    before_state = module_state(unet)
    p = ToyProcessing(model)
    a1111.before_process(p, args_for(preset="Combined", csa_layers="all"))
    a1111.install(p, getattr(p, a1111.RUN_ATTRIBUTE))  # a crash that skipped every cleanup
    assert module_state(unet) != before_state
    a1111.before_process(ToyProcessing(model), Settings().to_args())
    assert module_state(unet) == before_state


@pytest.mark.parametrize("values, message", [
    (dict(story="hero\n[Bob] runs"), "story line 2: unknown character tag"),
    (dict(csa_rate=3), "'csa_rate': 3.0 is out of range"),
])
def test_bad_input_fails_the_generation_with_a_message(host, values, message):
    a1111, model = host
    p = ToyProcessing(model)
    args = Settings(enabled=True, story=STORY).to_args()
    args[0] = {"enabled": True, "story": STORY, **values}  # API dict form
    a1111.before_process(p, args)
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        p.sample(a1111.on_cfg_denoiser)
    assert p.prompt == "watercolor" and p.batch_size == 1  # nothing expanded


def test_unknown_api_key_and_refusals(host):
    a1111, model = host
    p = ToyProcessing(model)
    a1111.before_process(p, [{"enabled": True, "story": STORY, "colour": "red"}])
    with pytest.raises(RuntimeError, match="'colour': unknown key"):
        p.sample(a1111.on_cfg_denoiser)
    q = ToyProcessing(model, prompt="a cat AND a dog")
    a1111.before_process(q, args_for())
    with pytest.raises(RuntimeError, match="'AND' prompts"):
        q.sample(a1111.on_cfg_denoiser)


def test_xyz_overrides_apply_preset_first(host):
    a1111, model = host
    p = ToyProcessing(model)
    p.consistent_story_overrides = {"csa_rate": "0.25", "preset": "StoryDiffusion"}
    settings = a1111.settings_for(p, args_for())
    assert settings.preset == "StoryDiffusion" and settings.csa and settings.csa_rate == 0.25


def test_long_story_writes_then_reads_the_bank(host):
    a1111, model = host
    story = "a fox\n" + "\n".join(f"scene {i}" for i in range(12))
    p = ToyProcessing(model)
    a1111.before_process(p, args_for(story=story, preset="StoryDiffusion", csa_layers="all", frames_per_batch=4))
    assert (p.batch_size, p.n_iter) == (4, 3)
    generation = getattr(p, a1111.RUN_ATTRIBUTE)
    modes = []
    for iteration in range(3):
        p.iteration = iteration
        p.sample(a1111.on_cfg_denoiser)
        modes.append(generation.csa.bank_mode.value)
        if iteration == 0:
            assert generation.csa.bank.bytes_held > 0
    assert modes == ["write", "read", "read"]
    p.close()
    assert generation.csa.bank.bytes_held == 0


@pytest.mark.parametrize("setup, message", [
    (lambda mods, model, p: setattr(model, "is_sd1", False), "only SD1.x, SDXL and"),
    (lambda mods, model, p: setattr(mods["modules.sd_unet"], "current_unet", object()), "replaced UNet"),
    (lambda mods, model, p: setattr(p, "refiner_checkpoint_info", object()), "refiner"),
])
def test_unsupported_setups_are_refused_before_sampling(monkeypatch, clip_tokenizer, setup, message):
    mods = install_stub_modules(monkeypatch)
    a1111 = importlib.import_module("lib_consistency.hosts.pipeline")
    model = ToyModel(clip_tokenizer, tiny_clip_text_model(16, seed=5))
    p = ToyProcessing(model)
    setup(mods, model, p)
    a1111.before_process(p, args_for(preset="Combined"))
    with pytest.raises(RuntimeError, match=message):
        p.sample(a1111.on_cfg_denoiser)
    assert module_state(model.model.diffusion_model) == ([], 0)  # refused before any hook or image
    assert not p.seen_conds


def test_hypertile_is_fine_without_shared_self_attention(monkeypatch, clip_tokenizer):
    mods = install_stub_modules(monkeypatch)
    a1111 = importlib.import_module("lib_consistency.hosts.pipeline")
    mods["modules.shared"].opts.data.update(hypertile_enable_unet=True)
    p = ToyProcessing(ToyModel(clip_tokenizer, tiny_clip_text_model(16, seed=5)))
    run(a1111, p, args_for())  # 1Prompt1Story touches cross-attention only
    assert isinstance(p.prompt, list)


NAMED = "Bob: a tall man with red hair | man, hair\nAlice: a girl in a blue scarf\n---\n[Bob] reads # One\n" \
        "[Alice] runs\n[Bob] [Alice] talk\n[NC] rain"


@pytest.mark.parametrize("values", [dict(preset="StorySync"),
                                    dict(preset="StorySync", story=NAMED, bli_inputs=True, share_dropout=0.3,
                                         rfh_dropout=0.2, rfh_start=0.0, rfh_end=1.0),
                                    dict(preset="Combined", masked_sharing=True, csa_layers="up", rfh_start=0.0)])
def test_storysync_runs_with_its_prepass_and_leaves_nothing_behind(host, values):
    from tests.fake_webui import ImageRNG
    a1111, model = host
    unet = model.model.diffusion_model
    before_state = module_state(unet)
    plain_before = ToyProcessing(model).sample(a1111.on_cfg_denoiser)
    p = ToyProcessing(model, steps=4)
    a1111.before_process(p, args_for(**values))
    p.rng = ImageRNG((4, 8, 8), p.seed[:p.batch_size])
    story_out = p.sample(a1111.on_cfg_denoiser)
    state = getattr(p, a1111.RUN_ATTRIBUTE).storysync
    assert state is not None and state.masks and len(state.bli_cache) > 0  # masks built, BLI window recorded
    twin = ImageRNG((4, 8, 8), p.seed[:p.batch_size])
    twin.next()  # the real sampling drew once from p.rng; the pre-pass drew from its own twin
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(p.rng.generators, twin.generators))
    assert len(p.seen_conds) == 4 + 2  # pre-pass: its window (1 of 4 steps at 0.1), then the call it stops in
    assert module_state(unet) == before_state
    assert torch.equal(ToyProcessing(model).sample(a1111.on_cfg_denoiser), plain_before)
    reference = ToyProcessing(model, steps=4)
    reference.prompt, reference.batch_size = list(p.prompt), p.batch_size
    reference.rng = ImageRNG((4, 8, 8), p.seed[:p.batch_size])
    assert not torch.allclose(story_out, reference.sample(lambda params: None))
    p.close()
    assert state.closed and len(state.bli_cache) == 0 and state.bank.bytes_held == 0


def test_storysync_masks_follow_the_subject_words_and_bad_words_are_refused(host):
    a1111, model = host
    p = ToyProcessing(model)
    a1111.before_process(p, args_for(preset="StorySync", story=NAMED, bli_strength=0.0))
    p.sample(a1111.on_cfg_denoiser)
    state = getattr(p, a1111.RUN_ATTRIBUTE).storysync
    assert set(state.masks) == {0, 1, 2}  # [NC] has no character, so no mask
    assert set(state.masks[2][1]) == {"Alice", "Bob"} and state.masks[2][0] == (2, 2)  # middle block: latent/4
    q = ToyProcessing(model)
    a1111.before_process(q, args_for(preset="StorySync", story=NAMED.replace("| man, hair", "| tail")))
    with pytest.raises(RuntimeError, match=r"story line 1: subject word 'tail' is not in"):
        q.sample(a1111.on_cfg_denoiser)


def test_forge_model_that_is_not_a_unet_is_refused(host):
    """Forge with Flux/SD3 (neither is_sd1 nor is_sdxl): refused with a message, the patcher left alone."""
    a1111, model = host
    patcher = object()
    model.forge_objects = type("ForgeObjects", (), {"unet": patcher})()
    model.is_sd1 = False
    p = ToyProcessing(model)
    a1111.before_process(p, args_for(preset="Combined"))
    with pytest.raises(RuntimeError, match="only SD1.x, SDXL and \\(in Forge\\) Flux checkpoints"):
        p.sample(a1111.on_cfg_denoiser)
    a1111.process_before_every_sampling(p)
    assert model.forge_objects.unet is patcher


def test_token_spans_are_verified_with_the_host_tokenizer_and_recorded(host):
    a1111, model = host
    p = ToyProcessing(model)
    run(a1111, p, args_for())
    spans = p.extra_generation_params["Story Token spans"]
    token_plan = getattr(p, a1111.RUN_ATTRIBUTE).conditioning.token_plan
    assert spans == token_plan.spans_line() and spans.startswith("SOT 0; identity 1-")
    assert Settings.from_infotext(p.extra_generation_params) == Settings.from_args(args_for())  # not a setting

    # a host tokenizer whose joined text differs from its lines (e.g. an embedding name across two lines)
    tokenize_line = model.cond_stage_model.tokenize_line
    seam = token_plan.frames[0].identity.stop  # frame 1's first token

    def shifting(text):
        chunks, count = tokenize_line(text)
        if "tail runs" in text:
            chunks[0].tokens[seam] += 1
        return chunks, count
    model.cond_stage_model.tokenize_line = shifting
    q = ToyProcessing(model)
    a1111.before_process(q, args_for())
    with pytest.raises(RuntimeError, match=r"^Consistent Story: the identity prompt where it meets frame 1 "
                                           r"\('runs through snow'\) tokenises differently .*\(CLIP: "):
        q.sample(a1111.on_cfg_denoiser)
    assert module_state(model.model.diffusion_model) == ([], 0) and not q.seen_conds


def test_one_frame_story_with_consolidation_is_refused(host):
    a1111, model = host
    p = ToyProcessing(model)
    a1111.before_process(p, args_for(story="a small red fox\nsleeps in a log"))
    with pytest.raises(RuntimeError, match="'consolidate': 1Prompt1Story consolidation needs a story of at least 2"):
        p.sample(a1111.on_cfg_denoiser)
    q = ToyProcessing(model)
    run(a1111, q, args_for(story="a small red fox\nsleeps in a log", preset="StoryDiffusion"))
    assert q.prompt == ["watercolor, a small red fox, sleeps in a log"] and len(q.seen_conds) == q.steps


def test_postprocess_appends_the_storyboard_then_one_mask_image_per_frame_with_a_character(host):
    import types as _types
    from PIL import Image
    a1111, model = host
    p = ToyProcessing(model)
    a1111.before_process(p, args_for(preset="StorySync", story=NAMED, bli_strength=0.0, show_masks=True))
    p.sample(a1111.on_cfg_denoiser)
    state = getattr(p, a1111.RUN_ATTRIBUTE).storysync
    frames = [Image.new("RGB", (32, 32), (250, 250, 250)) for _ in range(4)]
    processed = _types.SimpleNamespace(images=list(frames), infotexts=[f"frame {i}" for i in range(4)],
                                       index_of_first_image=0, seed=1)
    masks = {f: state.masks[f] for f in (0, 1, 2)}
    a1111.postprocess(p, processed)
    assert len(processed.images) == 4 + 1 + 3 and processed.infotexts[5:] == ["frame 0", "frame 1", "frame 2"]
    assert state.closed
    for frame, image in zip((0, 1, 2), processed.images[5:]):
        grid, by_character = masks[frame]
        pixels = image.load()
        for name, mask in by_character.items():
            for cell, inside in enumerate(mask.tolist()):
                y, x = divmod(cell, grid[1])
                centre = pixels[x * 32 // grid[1] + 32 // grid[1] // 2, y * 32 // grid[0] + 32 // grid[0] // 2]
                assert (centre != (250, 250, 250)) is inside or len(by_character) > 1  # tinted exactly where True
