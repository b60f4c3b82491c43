"""A story run beside the host's other features (lib_consistency/hosts/coexist.py, issue 11) against the stand-in
host: extra networks per frame, prompt styles, Dynamic Prompts, an extension rewriting the frames."""
from __future__ import annotations

import importlib
import types

import pytest
import torch

from lib_consistency.settings import Settings
from lib_consistency.story.run import extra_networks_of
from tests.conftest import tiny_clip_text_model
from tests.fake_webui import ToyModel, ToyProcessing, install_stub_modules

NAMED = ("Rex: a red fox <lora:fox:0.8>\nMia: a girl in a coat\n---\n[Rex] runs <lora:snow:1>\n[Rex] sleeps\n"
         "[Mia] reads\n[NC] rain")


@pytest.fixture
def host(monkeypatch, clip_tokenizer):
    mods = install_stub_modules(monkeypatch)
    pipeline = importlib.import_module("lib_consistency.hosts.pipeline")
    return pipeline, ToyModel(clip_tokenizer, tiny_clip_text_model(16, seed=5)), mods


def args_for(**values):
    return Settings.from_dict({"enabled": True, "story": NAMED, **values}).to_args()


def module_state(unet):
    return [name for name, m in unet.named_modules() if "forward" in m.__dict__], len(unet._forward_pre_hooks)


def test_each_frame_hands_the_host_its_own_networks_and_the_encoder_never_sees_a_tag(host):
    pipeline, model, _ = host
    p = ToyProcessing(model, prompt="ink <lora:style:1>")
    pipeline.before_process(p, args_for(frames_per_batch=1))
    p.run_batches(pipeline.on_cfg_denoiser)
    assert p.all_prompts == ["ink <lora:style:1>, a red fox <lora:fox:0.8>, runs <lora:snow:1>",
                             "ink <lora:style:1>, a red fox <lora:fox:0.8>, sleeps",
                             "ink <lora:style:1>, a girl in a coat, reads", "ink <lora:style:1>, rain"]
    generation = getattr(p, pipeline.RUN_ATTRIBUTE)
    assert not any("<" in text for text in model.encoded_texts)  # the consolidated prompt has no tag as words
    assert "a red fox" in model.encoded_texts[0] and "runs" in model.encoded_texts[0]
    # one encoding per set of networks, each under that set (a LoRA may change the text encoder)
    assert model.encoded_under == [("<lora:fox:0.8>", "<lora:snow:1>", "<lora:style:1>"),
                                   ("<lora:fox:0.8>", "<lora:style:1>"), ("<lora:style:1>",)]
    assert len(generation.conditionings) == 3 and len(p.seen_conds) == 4 * p.steps
    assert not torch.equal(p.seen_conds[0], p.seen_conds[p.steps])  # frames 1 and 2 got their own contexts


def test_same_networks_in_every_frame_encode_once(host):
    pipeline, model, _ = host
    p = ToyProcessing(model, prompt="ink <lora:style:1>")
    pipeline.before_process(p, args_for(story="a red fox\nruns <lora:a:1>\nsleeps <lora:a:1>", frames_per_batch=1))
    p.run_batches(pipeline.on_cfg_denoiser)
    assert model.encoded_under == [("<lora:a:1>", "<lora:style:1>")]


@pytest.mark.parametrize("values", [dict(), dict(preset="StoryDiffusion", csa_layers="all", frames_per_batch=2)])
def test_frames_naming_different_networks_are_drawn_in_batches_of_one_set(host, values):
    """Issue 24: no refusal; every batch holds frames of one set of networks, the consolidated prompt is encoded
    once per set under it, and the images come back in story order."""
    pipeline, model, _ = host
    p = ToyProcessing(model)
    pipeline.before_process(p, args_for(storyboard=False, **values))
    processed = p.process_images(pipeline)
    assert [active for _, _, active in p.drawn] == [("<lora:fox:0.8>", "<lora:snow:1>"), ("<lora:fox:0.8>",), ()]
    assert [len(prompts) for prompts, _, _ in p.drawn] == [1, 1, 2] and p.batch_size == 2
    for prompts, _, active in p.drawn:
        assert all(extra_networks_of(text, ("oneactor",)) == active for text in prompts)
    if not values:  # 1Prompt1Story: its consolidated prompt encoded once under each set
        assert model.encoded_under == [active for _, _, active in p.drawn]
    assert processed.infotexts == [f"{text}\nSeed: 1234" for text in p.all_prompts]


def test_oneactor_characters_may_differ_within_a_batch(host):
    pipeline, model, _ = host
    p = ToyProcessing(model)
    pipeline.before_process(p, args_for(story="a fox <oneactor:rex>\nruns\n[NC] rain", preset="StoryDiffusion"))
    p.run_batches(pipeline.on_cfg_denoiser)  # OneActor acts per image: no refusal
    assert len(p.seen_conds) == p.steps


def test_prompt_styles_are_refused_with_consolidation_and_pass_through_without(host):
    pipeline, model, mods = host
    mods["modules.shared"].prompt_styles.styles.update(film="film still, {prompt}, grain", empty="{prompt}")
    p = ToyProcessing(model)
    p.styles = ["empty"]  # a style that changes nothing is fine
    pipeline.before_process(p, args_for(story="a fox\nruns\nsleeps"))
    p.run_batches(pipeline.on_cfg_denoiser)
    p = ToyProcessing(model)
    p.styles = ["film"]
    pipeline.before_process(p, args_for(story="a fox\nruns\nsleeps"))
    with pytest.raises(RuntimeError, match="prompt styles film change the frames' prompts"):
        p.run_batches(pipeline.on_cfg_denoiser)
    p = ToyProcessing(model)
    p.styles = ["film"]
    pipeline.before_process(p, args_for(story="a fox\nruns\nsleeps", preset="StoryDiffusion"))
    p.run_batches(pipeline.on_cfg_denoiser)
    assert p.all_prompts[0] == "film still, watercolor, a fox, runs, grain"


def rewrite_like_dynamic_prompts(p):
    """sd-dynamic-prompts' ``process``: every image a variant of the first prompt (here: the first prompt)."""
    p.all_prompts = [p.all_prompts[0]] * len(p.all_prompts)


@pytest.mark.parametrize("rewrite, what", [
    (rewrite_like_dynamic_prompts, "prompts"),
    (lambda p: setattr(p, "all_seeds", [s + 1 for s in p.all_seeds]), "seeds"),
    (lambda p: (setattr(p, "n_iter", 2), setattr(p, "all_prompts", p.all_prompts * 2)), "prompts and batches"),
])
def test_an_extension_rewriting_the_frames_fails_the_run_with_a_message(host, rewrite, what):
    pipeline, model, _ = host
    p = ToyProcessing(model)
    pipeline.before_process(p, args_for(preset="StoryDiffusion", story="a fox\nruns\nsleeps"))
    with pytest.raises(RuntimeError, match=f"another extension changed the story's {what} after the story set them"):
        p.run_batches(pipeline.on_cfg_denoiser, scripts_process=rewrite)
    assert not p.seen_conds and module_state(model.model.diffusion_model) == ([], 0)


class DynamicPrompts:
    """The parts of sd-dynamic-prompts' Script the adapter reads: its title and the slot of its ``is_enabled``."""

    def __init__(self, args_from: int) -> None:
        self.args_from, self.args_to = args_from, args_from + 3

    def title(self):
        return "Dynamic Prompts v2.17.1"


def with_dynamic_prompts(p, enabled=True):
    p.scripts = types.SimpleNamespace(alwayson_scripts=[types.SimpleNamespace(title=lambda: "Other"),
                                                        DynamicPrompts(2)])
    p.script_args = (1, "x", enabled, False, 1, "y")
    return p


def test_dynamic_prompts_is_off_for_a_story_run_only(host, capsys):
    pipeline, model, _ = host
    p = with_dynamic_prompts(ToyProcessing(model))
    pipeline.before_process(p, args_for(story="a fox\nruns\nsleeps"))
    assert p.script_args == (1, "x", False, False, 1, "y") and "not applied to a story run" in capsys.readouterr().out
    p.run_batches(pipeline.on_cfg_denoiser)
    plain = with_dynamic_prompts(ToyProcessing(model))
    pipeline.before_process(plain, Settings(story="a fox\nruns\nsits").to_args())  # story off: untouched
    assert plain.script_args == (1, "x", True, False, 1, "y")
    off = with_dynamic_prompts(ToyProcessing(model), enabled=False)
    pipeline.before_process(off, args_for(story="a {red|blue} fox\nruns\nsits"))  # its syntax is plain text then
    off.run_batches(pipeline.on_cfg_denoiser)


@pytest.mark.parametrize("story, style, found, label", [
    ("a {red|blue} fox\nruns\nsits", "ink", "{red|blue}", r"frame 1 \(story line 2\)"),
    ("a fox\nruns\n[NC] __weather__ sky", "", "__weather__", r"frame 2 \(story line 3\)"),
    ("a fox\nruns\nsits", "{ink|oil} painting", "{ink|oil}", r"frame 1 \(story line 2\)"),
])
def test_dynamic_prompts_syntax_in_a_story_run_is_refused_naming_the_frame(host, story, style, found, label):
    pipeline, model, _ = host
    p = with_dynamic_prompts(ToyProcessing(model, prompt=style))
    pipeline.before_process(p, args_for(story=story))
    with pytest.raises(RuntimeError, match=f"{label} uses Dynamic Prompts syntax '{found}'"):
        p.run_batches(pipeline.on_cfg_denoiser)
    assert p.script_args[2] is True and not p.seen_conds


def test_dynamic_prompts_syntax_follows_its_parser_settings(host):
    pipeline, model, mods = host
    mods["modules.shared"].opts.data.update(dp_parser_variant_start="((", dp_parser_variant_end="))")
    p = with_dynamic_prompts(ToyProcessing(model))
    pipeline.before_process(p, args_for(story="a ((red|blue)) fox\nruns\nsits"))
    assert "uses Dynamic Prompts syntax '((red|blue))'" in str(getattr(p, pipeline.RUN_ATTRIBUTE).error)
    p = with_dynamic_prompts(ToyProcessing(model))
    pipeline.before_process(p, args_for(story="a {red|blue} fox\nruns\nsits"))  # not its syntax with these settings
    p.run_batches(pipeline.on_cfg_denoiser)
    assert p.script_args[2] is False


def wrap_like_hypertile(unet, depth_of: dict[str, int], max_depth: int):
    """Hypertile's ``hypertile_hook_model``: a lasting instance wrapper on each listed attn1, with its params on the
    module, enabled up to ``max_depth``; an enabled one splits the tokens into 2 tiles (rows x 2) around the inner
    forward."""
    calls = []
    for name, depth in depth_of.items():
        module = unet.get_submodule(name)
        params = types.SimpleNamespace(depth=depth, enabled=depth <= max_depth, forward=module.forward)

        def wrapper(x, *args, params=params, name=name, **kwargs):
            calls.append(name)
            if not params.enabled:
                return params.forward(x, *args, **kwargs)
            b, n, c = x.shape
            out = params.forward(x.reshape(b * 2, n // 2, c), *args, **kwargs)
            return out.reshape(b, n, c)
        setattr(module, "__webui_hypertile_params", params)
        module.forward = wrapper
    return calls


HYPERTILED = {"input_blocks.1.1.transformer_blocks.0.attn1": 0, "output_blocks.3.1.transformer_blocks.0.attn1": 1,
              "middle_block.1.transformer_blocks.0.attn1": 2}


@pytest.mark.parametrize("max_depth, layers, refused", [
    (0, "up", None), (0, "up_low_res", None),
    (1, "up", "output_blocks.3.1.transformer_blocks.0.attn1 \\(its depth 1\\)"),
    (0, "all", "input_blocks.1.1.transformer_blocks.0.attn1 \\(its depth 0\\)"),
    (2, "up_low_res", "output_blocks.3.1")])
def test_hypertile_composes_on_layers_the_story_does_not_share(host, max_depth, layers, refused):
    pipeline, model, mods = host
    unet = model.model.diffusion_model
    calls = wrap_like_hypertile(unet, HYPERTILED, max_depth)
    theirs = {name: unet.get_submodule(name).forward for name in HYPERTILED}
    mods["modules.shared"].opts.data.update(hypertile_enable_unet=True, hypertile_max_depth_unet=max_depth)
    p = ToyProcessing(model)
    pipeline.before_process(p, args_for(story="a fox\nruns\nsleeps", preset="StoryDiffusion", csa_layers=layers))
    if refused:
        with pytest.raises(RuntimeError, match=f"Hypertile \\(UNet\\) splits the self-attention of {refused}"):
            p.run_batches(pipeline.on_cfg_denoiser)
        assert not calls
    else:
        story = p.run_batches(pipeline.on_cfg_denoiser)[0]
        assert calls and set(calls) == set(HYPERTILED)  # their wrappers ran under ours, on every layer
        plain = ToyProcessing(model)
        pipeline.before_process(plain, Settings(story="a fox\nruns\nsleeps").to_args())
        plain.prompt, plain.batch_size, plain.seed = p.prompt, p.batch_size, p.seed
        assert not torch.equal(story, plain.run_batches(pipeline.on_cfg_denoiser)[0])  # and CSA took effect
    assert {name: unet.get_submodule(name).forward for name in HYPERTILED} == theirs  # theirs kept, ours gone
    assert module_state(unet)[1] == 0


def test_hypertile_on_the_hires_pass_only_and_never_run_is_refused(host):
    pipeline, model, mods = host
    mods["modules.shared"].opts.data.update(hypertile_enable_unet_secondpass=True)
    p = ToyProcessing(model)
    pipeline.before_process(p, args_for(story="a fox\nruns\nsleeps", preset="StoryDiffusion"))
    p.run_batches(pipeline.on_cfg_denoiser)  # no hires fix: Hypertile stays off
    p = ToyProcessing(model)
    p.enable_hr = True
    pipeline.before_process(p, args_for(story="a fox\nruns\nsleeps", preset="StoryDiffusion"))
    with pytest.raises(RuntimeError, match=r"Hypertile \(UNet, hires pass\)"):
        p.run_batches(pipeline.on_cfg_denoiser)


class ControlParams:
    """sd-webui-controlnet's ``ControlParams``: ``hint_cond`` behind a setter (other extensions may change it)."""

    def __init__(self, hint, hr_hint=None):
        self._hint_cond, self.hr_hint_cond, self.sets = hint, hr_hint, 0

    @property
    def hint_cond(self):
        return self._hint_cond

    @hint_cond.setter
    def hint_cond(self, value):
        self._hint_cond, self.sets = value, self.sets + 1


def with_controlnet(p, *params):
    network = types.SimpleNamespace(control_params=list(params))
    p.scripts = types.SimpleNamespace(alwayson_scripts=[types.SimpleNamespace(title=lambda: "ControlNet",
                                                                              latest_network=network)])
    return p


def watching(pipeline, params, seen):
    def on_cfg_denoiser(step):
        seen.append([param.hint_cond[:, 0, 0, 0].tolist() for param in params])
        pipeline.on_cfg_denoiser(step)
    return on_cfg_denoiser


@pytest.mark.parametrize("batch_cond_uncond", [True, False])
def test_per_frame_control_images_follow_the_story_across_batches(host, batch_cond_uncond):
    pipeline, model, mods = host
    mods["modules.shared"].opts.data.update(batch_cond_uncond=batch_cond_uncond)
    frames = torch.arange(5.0)[:, None, None, None].expand(5, 3, 4, 4)  # control image i is all i
    if batch_cond_uncond:  # stacked for the cond rows, then for the uncond rows
        frames = torch.cat([frames, frames])
    single = torch.full((1, 3, 4, 4), 9.0)
    per_frame, one = ControlParams(frames.clone(), frames.clone() + 10), ControlParams(single)
    p = with_controlnet(ToyProcessing(model), per_frame, one)
    story = "a fox\n" + "\n".join(f"scene {i}" for i in range(5))
    pipeline.before_process(p, args_for(story=story, preset="StoryDiffusion", frames_per_batch=2))
    seen = []
    p.run_batches(watching(pipeline, [per_frame, one], seen))
    steps = p.steps
    copies = 2 if batch_cond_uncond else 1
    assert [seen[b * steps][0] for b in range(3)] == [[0.0, 1.0] * copies, [2.0, 3.0] * copies, [4.0] * copies]
    assert all(s[1] == [9.0] for s in seen) and one.sets == 0  # one image: every frame, untouched
    assert per_frame.hr_hint_cond[:, 0, 0, 0].tolist() == [14.0] * copies  # the hires hints follow the same frames
    p.close()
    assert torch.equal(per_frame.hint_cond, frames) and per_frame.hr_hint_cond.shape[0] == 5 * copies  # theirs


def test_control_images_that_are_not_one_per_frame_are_refused(host):
    pipeline, model, _ = host
    p = with_controlnet(ToyProcessing(model), ControlParams(torch.zeros(4, 3, 4, 4)))  # 2 images, stacked twice
    pipeline.before_process(p, args_for(story="a fox\nruns\nsleeps\nsits", preset="StoryDiffusion"))
    with pytest.raises(RuntimeError, match="ControlNet unit 1 \\(of those enabled\\) has 2 control images for a "
                                           "story of 3 frames"):
        p.run_batches(pipeline.on_cfg_denoiser)
    assert not p.seen_conds and module_state(model.model.diffusion_model) == ([], 0)


def test_controlnets_cond_mark_stays_first_in_the_swapped_conditioning(host):
    """sd-webui-controlnet prepends a ±1024 token to every cond to tell cond rows from uncond rows (hook.py); the
    1Prompt1Story contexts swapped in each step keep it, and the rest is the consolidated contexts."""
    pipeline, model, _ = host
    p = ToyProcessing(model)
    pipeline.before_process(p, args_for(story="a fox\nruns\nsleeps"))

    def marked(step):
        step.text_cond = torch.cat([torch.full_like(step.text_cond[:, :1], 1024.0), step.text_cond], dim=1)
        step.text_uncond = torch.cat([torch.full_like(step.text_uncond[:, :1], -1024.0), step.text_uncond], dim=1)
        pipeline.on_cfg_denoiser(step)
    p.run_batches(marked)
    expected = torch.stack(getattr(p, pipeline.RUN_ATTRIBUTE).conditioning.contexts([0, 1]))
    for cond in p.seen_conds:
        assert torch.equal(cond[:, 0], torch.full_like(cond[:, 0], 1024.0)) and torch.equal(cond[:, 1:], expected)
    unmarked = ToyProcessing(model)
    pipeline.before_process(unmarked, args_for(story="a fox\nruns\nsleeps"))
    unmarked.run_batches(pipeline.on_cfg_denoiser)
    assert all(torch.equal(cond, expected) for cond in unmarked.seen_conds)


@pytest.mark.parametrize("per_image", [True, False])
def test_forge_controlnet_per_image_inputs_in_a_story_of_several_batches_are_refused(host, per_image):
    """Forge's built-in ControlNet aligns a unit's inputs to the rows of a batch (``control_cond`` [B, ...]) and
    starts again in every batch; one image gives identical rows and poses every frame."""
    pipeline, model, _ = host
    # what makes the adapter take the Forge path; its UNet patcher's model is the toy's (no patches: this stand-in
    # calls no process_before_every_sampling, so the story asks for no attention method)
    model.forge_objects = types.SimpleNamespace(unet=types.SimpleNamespace(model=model.model))
    cond = torch.arange(2.0)[:, None, None, None].expand(2, 3, 4, 4) if per_image else torch.ones(2, 3, 4, 4)
    script = types.SimpleNamespace(title=lambda: "ControlNet",
                                   current_params={0: types.SimpleNamespace(control_cond=cond)})
    p = ToyProcessing(model)
    p.scripts = types.SimpleNamespace(alwayson_scripts=[script])
    pipeline.before_process(p, args_for(story="a fox\nruns\nsleeps\nsits", frames_per_batch=2, ipca=False))
    if per_image:
        with pytest.raises(RuntimeError, match="Forge's ControlNet starts again at its first image in every batch"):
            p.run_batches(pipeline.on_cfg_denoiser)
        assert not p.seen_conds
    else:
        p.run_batches(pipeline.on_cfg_denoiser)
        assert len(p.seen_conds) == 2 * p.steps
    one_batch = ToyProcessing(model)
    one_batch.scripts = p.scripts
    pipeline.before_process(one_batch, args_for(story="a fox\nruns\nsleeps", ipca=False))
    one_batch.run_batches(pipeline.on_cfg_denoiser)  # one batch: row i takes input i, as the frames do
