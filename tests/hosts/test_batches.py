"""A story drawn in batches by network set (lib_consistency/hosts/batches.py, issue 24) through the stand-in host's
``process_images`` loop: what each batch draws, the results and files in story order, and plain stories untouched."""
from __future__ import annotations

import importlib
import types

import pytest
import torch

from lib_consistency.settings import Settings
from lib_consistency.story.run import extra_networks_of
from tests.conftest import tiny_clip_text_model
from tests.fake_webui import ImageRNG, ToyModel, ToyProcessing, install_stub_modules

LILY_TOM = ("Lily: a girl <lora:lily:1>\nTom: an old man <lora:tom:1>\n---\n[Lily] reads\n[Tom] walks\n[Lily] sleeps\n"
            "[Tom] sits\n[NC] rain")
UNTAGGED = LILY_TOM.replace(" <lora:lily:1>", "").replace(" <lora:tom:1>", "")
OFF = dict(preset="Custom", consolidate=False, reweighting="none", ipca=False, csa=False, storyboard=False,
           seed_mode="sequential")


@pytest.fixture
def host(monkeypatch, clip_tokenizer):
    mods = install_stub_modules(monkeypatch)
    pipeline = importlib.import_module("lib_consistency.hosts.pipeline")
    return pipeline, ToyModel(clip_tokenizer, tiny_clip_text_model(16, seed=5)), mods


def job(pipeline, model, story=LILY_TOM, prompt="ink", **values):
    p = ToyProcessing(model, prompt=prompt)
    p.seed = 10
    pipeline.before_process(p, Settings.from_dict({"enabled": True, "story": story, **values}).to_args())
    return p, p.process_images(pipeline)


@pytest.mark.parametrize("values", [OFF, dict(storyboard=False), dict(preset="StoryDiffusion", csa_layers="all",
                                                                    frames_per_batch=1, storyboard=False)])
def test_each_batch_draws_one_network_set_and_the_results_come_back_in_story_order(host, values):
    pipeline, model, mods = host
    p, processed = job(pipeline, model, **values)
    for prompts, _, active in p.drawn:  # the host activated exactly the networks every frame of the batch names
        assert {extra_networks_of(text, ("oneactor",)) for text in prompts} == {active}
    drawn_prompts = [prompt for prompts, _, _ in p.drawn for prompt in prompts]
    assert len(drawn_prompts) == 5 and p.batch_size == max(len(prompts) for prompts, _, _ in p.drawn)
    assert processed.infotexts == [f"{prompt}\nSeed: {seed}" for prompt, seed in zip(p.all_prompts, p.all_seeds)]
    assert processed.index_of_first_image == 0 and processed.info == processed.infotexts[0]
    # the files: saved in story order, each with its own seed, prompt and number; p's flags given back
    assert [(seed, prompt, number) for _, _, seed, prompt, _, number in mods["modules.images"].saved_files] == \
        [(p.all_seeds[f], p.all_prompts[f], f + 1) for f in range(5)]
    assert not p.do_not_save_samples and p.do_not_save_grid  # ToyProcessing's own values


def test_a_batch_gets_its_frames_prompts_seeds_and_noise(host):
    pipeline, model, _ = host
    p, processed = job(pipeline, model, **OFF)
    assert [(prompts, seeds, active) for prompts, seeds, active in p.drawn] == [
        (["ink, a girl <lora:lily:1>, reads", "ink, a girl <lora:lily:1>, sleeps"], [10, 12], ("<lora:lily:1>",)),
        (["ink, an old man <lora:tom:1>, walks", "ink, an old man <lora:tom:1>, sits"], [11, 13], ("<lora:tom:1>",)),
        (["ink, rain"], [14], ())]
    # each frame's image is the one its own seed gives, wherever it was drawn: the same frame alone
    for frame in range(5):
        alone = ToyProcessing(model)
        alone.prompts = [p.all_prompts[frame].replace(" <lora:lily:1>", "").replace(" <lora:tom:1>", "")]
        alone.rng = ImageRNG((4, 8, 8), [p.all_seeds[frame]])
        assert torch.allclose(processed.images[frame], alone.sample(pipeline.on_cfg_denoiser)[0], atol=1e-6)


def test_a_frame_without_networks_is_the_same_as_in_the_story_without_tags(host):
    """Methods off: frames do not depend on each other, so the untagged frame (drawn in another batch, at another
    position) is bit-identical to the same frame of the story without any tag."""
    pipeline, model, _ = host
    _, tagged = job(pipeline, model, **OFF)
    _, untagged = job(pipeline, model, story=UNTAGGED, **OFF)
    assert torch.equal(tagged.images[4], untagged.images[4])


def test_plain_story_is_left_to_the_host(host):
    pipeline, model, mods = host
    p, processed = job(pipeline, model, story=UNTAGGED, frames_per_batch=2, preset="StoryDiffusion",
                       csa_layers="all", storyboard=False)
    assert [seeds for _, seeds, _ in p.drawn] == [[10, 10], [10, 10], [10]]
    assert [[" ".join(t.split()) for t in prompts] for prompts, _, _ in p.drawn] == \
        [[" ".join(t.split()) for t in p.all_prompts[s:s + 2]] for s in (0, 2, 4)]
    assert getattr(p, pipeline.RUN_ATTRIBUTE).deferred is None and not p.do_not_save_samples
    assert [number for *_, number in mods["modules.images"].saved_files] == [1, 2, 3, 4, 5]


def test_the_grid_is_made_from_the_frames_in_story_order(host):
    pipeline, model, mods = host
    p = ToyProcessing(model, prompt="ink")
    p.do_not_save_grid = False
    mods["modules.shared"].opts.grid_save = True
    pipeline.before_process(p, Settings.from_dict({"enabled": True, "story": LILY_TOM, **OFF}).to_args())
    assert p.do_not_save_grid and p.do_not_save_samples  # the host saves nothing while drawing
    processed = p.process_images(pipeline)
    assert not p.do_not_save_grid and not p.do_not_save_samples
    kind, columns, frames = processed.images[0]
    assert kind == "grid" and columns == 2 and all(a is b for a, b in zip(frames, processed.images[1:]))
    assert processed.index_of_first_image == 1 and processed.infotexts[0] == "ink\nSeed: 1234"
    assert [f[1] for f in mods["modules.images"].saved_files] == [""] * 5 + ["grid"]


def test_bank_writers_are_drawn_first_and_readers_read(host):
    pipeline, model, _ = host
    p = ToyProcessing(model, prompt="ink")
    values = dict(preset="StoryDiffusion", csa_layers="all", frames_per_batch=1, storyboard=False)
    pipeline.before_process(p, Settings.from_dict({"enabled": True, "story": LILY_TOM, **values}).to_args())
    generation = getattr(p, pipeline.RUN_ATTRIBUTE)
    modes = []
    original = pipeline.install

    def install(p, generation):
        original(p, generation)
        modes.append((generation.plan.batch_frames(p.iteration), generation.csa.bank_mode.value))
    pipeline.install = install
    try:
        p.process_images(pipeline)
    finally:
        pipeline.install = original
    assert generation.plan.reference_frames == (0, 1, 4)
    assert modes == [((0,), "write"), ((1,), "write"), ((4,), "write"), ((2,), "read"), ((3,), "read")]


def test_hires_prompts_and_img2img_rows_follow_the_batch(host):
    pipeline, model, _ = host
    p = ToyProcessing(model, prompt="ink")
    pipeline.before_process(p, Settings.from_dict({"enabled": True, "story": LILY_TOM, **OFF}).to_args())
    p.setup_prompts()
    p.enable_hr, p.iteration = True, 1
    p.all_hr_prompts = [f"hr {text}" for text in p.all_prompts]
    p.all_hr_negative_prompts = [f"neg {i}" for i in range(5)]
    pipeline.process_batch(p)
    assert p.hr_prompts == ["hr ink, an old man , walks", "hr ink, an old man , sits"]  # parsed: tags out
    assert p.hr_negative_prompts == ["neg 1", "neg 3"] and set(p.hr_extra_network_data) == {"lora"}
    batches = importlib.import_module("lib_consistency.hosts.batches")
    generation = getattr(p, pipeline.RUN_ATTRIBUTE)
    p.iteration, p.init_latent = 2, torch.randn(2, 4, 8, 8)
    p.image_conditioning, full = torch.zeros(2, 5, 1, 1), p.init_latent
    with batches.batch_rows(p, generation.plan):  # the [NC] frame's batch has one row
        assert p.init_latent.shape[0] == 1 and p.image_conditioning.shape[0] == 1
    assert p.init_latent is full and p.image_conditioning.shape[0] == 2


def test_a_failed_job_gives_p_its_saving_flags_back(host):
    pipeline, model, _ = host
    p = ToyProcessing(model, prompt="ink")
    pipeline.before_process(p, Settings.from_dict({"enabled": True, "story": LILY_TOM, **OFF}).to_args())
    assert p.do_not_save_samples
    p.close()
    assert not p.do_not_save_samples and p.do_not_save_grid and p.closed


def test_oneactor_reads_the_prompts_of_the_batch_being_drawn(host):
    pipeline, model, _ = host
    generation = importlib.import_module("lib_consistency.hosts.oneactor.generation")
    p = ToyProcessing(model, prompt="ink")
    pipeline.before_process(p, Settings.from_dict({"enabled": True, "story": LILY_TOM, **OFF}).to_args())
    p.setup_prompts()
    p.iteration = 1
    assert list(generation._batch_frames(p)) == [1, 3]
    plain = types.SimpleNamespace(all_prompts=["a", "b", "c"], iteration=1, batch_size=2)
    assert list(generation._batch_frames(plain)) == [2]
