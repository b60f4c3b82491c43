"""StorySync's BLI in lock-step through the host's sampler (``hosts/lockstep.py``) against stand-ins of A1111's txt2img
sampling and Forge's model calls: the same images as the pre-pass, the twin rows cut from every UNet call after the
window, the pre-pass wherever lock-step cannot hold, nothing left on the UNet."""
from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch

from lib_consistency.common.row_layout import Role, forge_row_layout, twinned_layout, without_twins
from lib_consistency.settings import Settings
from tests.conftest import tiny_clip_text_model
from tests.fake_webui import ImageRNG, ToyModel, ToyProcessing, install_stub_modules

NAMED = "Bob: a tall man with red hair | man, hair\nAlice: a girl in a blue scarf\n---\n[Bob] reads # One\n" \
        "[Alice] runs\n[Bob] [Alice] talk\n[NC] rain"


class Txt2ImgToy(ToyProcessing):
    """``StableDiffusionProcessingTxt2Img.sample``: noise from ``p.rng``, the conditioning as given (one row per
    image), ``steps`` denoiser calls of one UNet call each, with noise drawn from ``p.rng`` again at every step (an
    ancestral sampler's); with hires fix the first pass's latents and "decoded images" go to ``sample_hr_pass``,
    which makes its own ``p.rng`` from the batch's seeds, samples 2 steps with ``hr_c``/``hr_uc`` and returns a list
    (A1111 decodes the hires latents there: ``DecodedSamples``)."""

    firstpass_image = None
    sampler_name = "Euler"
    hires_inputs = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.previews: list[int | None] = []  # rows of the live preview when each step began

    @torch.no_grad()
    def sample(self, conditioning=None, unconditional_conditioning=None, on_cfg_denoiser=None):
        self.on_cfg_denoiser = on_cfg_denoiser
        x = self._loop(self.rng.next(), conditioning, unconditional_conditioning, self.steps)
        if not self.enable_hr:
            return x
        return self.sample_hr_pass(x, x.mean(dim=1, keepdim=True), self.seed[:self.batch_size], None, 0.0, None)

    @torch.no_grad()
    def sample_hr_pass(self, samples, decoded_samples, seeds, subseeds, subseed_strength, prompts):
        self.hires_inputs = (samples.shape[0], decoded_samples.shape[0])
        self.is_hr_pass, self.rng = True, ImageRNG((4, 8, 8), seeds)
        return list(self._loop(samples + 0.1 * self.rng.next(), self.hr_c, self.hr_uc, 2))  # (DecodedSamples)

    def _loop(self, x, conditioning, unconditional_conditioning, steps):
        from modules.shared import state
        unet, state.current_latent = self.sd_model.model.diffusion_model, None
        denoiser = types.SimpleNamespace(p=self, step=0, total_steps=steps)
        for step in range(steps):
            if step == getattr(self, "fail_at_step", None):
                raise RuntimeError("out of memory (simulated)")
            params = types.SimpleNamespace(x=x, sigma=torch.full((x.shape[0],), 10.0 - step), sampling_step=step,
                                           total_sampling_steps=steps, text_cond=conditioning,
                                           text_uncond=unconditional_conditioning, denoiser=denoiser)
            self.on_cfg_denoiser(params)
            self.previews.append(None if state.current_latent is None else state.current_latent.shape[0])
            out = unet(torch.cat([x, x]), None, context=torch.cat([params.text_cond, params.text_uncond]))
            x = x - 0.1 * (out[:x.shape[0]] - 0.5 * out[x.shape[0]:]) + 0.01 * self.rng.next()
            state.current_latent = x  # sd_samplers_common.store_latent: the preview of every sampled row
            denoiser.step += 1
        return x


@pytest.fixture
def host(monkeypatch, clip_tokenizer):
    install_stub_modules(monkeypatch)
    pipeline = importlib.import_module("lib_consistency.hosts.pipeline")
    model = ToyModel(clip_tokenizer, tiny_clip_text_model(16, seed=5))
    scale_attention(model.model.diffusion_model)
    return pipeline, model


def scale_attention(unet):
    """Attention that matters: random toy weights leave BLI's effect below the rounding."""
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn1"):
                module.to_q.weight.mul_(6)
                module.to_k.weight.mul_(6)
                module.to_out[0].weight.mul_(20)


def generate(pipeline, model, steps=10, change=None, **values):
    """One story job (one batch); returns (latents, p, rows of every UNet call as the UNet's first layer saw them)."""
    unet = model.model.diffusion_model
    rows: list[int] = []
    handle = unet.input_blocks[0].register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    p = Txt2ImgToy(model, steps=steps)
    for name, value in (change or {}).items():
        setattr(p, name, value)
    try:
        pipeline.before_process(p, Settings.from_dict({"enabled": True, "story": NAMED, "preset": "StorySync",
                                                       "rfh_start": 0.0, "bli_steps": 0.3, **values}).to_args())
        p.rng = ImageRNG((4, 8, 8), p.seed[:p.batch_size])
        p.hr_c = cond = model.cond_stage_model.encode(p.prompt)
        p.hr_uc = uncond = model.cond_stage_model.encode([""] * len(p.prompt))
        out = p.sample(conditioning=cond, unconditional_conditioning=uncond, on_cfg_denoiser=pipeline.on_cfg_denoiser)
    finally:
        handle.remove()
    return out, p, rows


def hooks_on(unet):
    return ([name for name, m in unet.named_modules() if "forward" in m.__dict__],
            len(unet._forward_pre_hooks), len(unet._forward_hooks))


@pytest.mark.parametrize("preset", [dict(), dict(preset="Combined", masked_sharing=True, csa_layers="up")],
                         ids=["StorySync", "consolidated contexts and IPCA"])
def test_lockstep_draws_the_prepass_images_with_the_twins_cut_after_the_window(host, capsys, preset):
    pipeline, model = host
    unet = model.model.diffusion_model
    before = hooks_on(unet)
    prepass, _, prepass_rows = generate(pipeline, model, **preset)
    lockstep, p, lockstep_rows = generate(pipeline, model, bli_lockstep=True, **preset)
    no_bli, _, _ = generate(pipeline, model, bli_strength=0.0, **preset)
    assert "pre-pass instead" not in capsys.readouterr().out
    frames = p.batch_size
    assert lockstep.shape == prepass.shape == (frames, 4, 8, 8)
    torch.testing.assert_close(lockstep, prepass, rtol=1e-5, atol=1e-5)  # (bit-identical here)
    assert (lockstep - no_bli).abs().max() > 1e-3  # BLI changes these images: the equality above is not vacuous
    # the window is 3 of 10 steps: 3 calls of the story's and the twins' cond+uncond rows, then the story's alone
    assert lockstep_rows == [4 * frames] * 3 + [2 * frames] * 7
    assert p.previews == [None] + [frames] * 9  # the twins' latents never reach the live preview past a step
    assert prepass_rows == [2 * frames] * (3 + 1) + [2 * frames] * 10  # the pre-pass stops in its 4th call
    assert p.rng.generators[0].initial_seed() == p.seed[0] and len(p.rng.seeds) == frames  # the host's rng back
    assert len(getattr(p, pipeline.RUN_ATTRIBUTE).storysync.bli_cache) == 0  # no pre-pass cache: twins read live
    assert hooks_on(unet) == before
    assert p.extra_generation_params["Story BLI lock-step"] == "True"
    assert "Story BLI note" not in p.extra_generation_params


def test_with_hires_fix_the_hires_pass_gets_the_story_rows_of_a_lockstep_first_pass(host, capsys):
    pipeline, model = host
    prepass, _, prepass_rows = generate(pipeline, model, change=dict(enable_hr=True))
    lockstep, p, rows = generate(pipeline, model, change=dict(enable_hr=True), bli_lockstep=True)
    frames = p.batch_size
    assert "pre-pass instead" not in capsys.readouterr().out and "Story BLI note" not in p.extra_generation_params
    assert p.hires_inputs == (frames, frames) and len(lockstep) == frames
    lockstep, prepass = torch.stack(lockstep), torch.stack(prepass)
    assert rows == [4 * frames] * 3 + [2 * frames] * (7 + 2)  # the hires pass: the story's rows, all its methods
    assert prepass_rows == [2 * frames] * (4 + 10 + 2)
    torch.testing.assert_close(lockstep, prepass, rtol=1e-5, atol=1e-5)
    assert "sample_hr_pass" not in p.__dict__ and p.rng.seeds == p.seed[:frames]  # the hires pass's own rng


@pytest.mark.parametrize("change, reason", [
    (dict(sample_hr_pass=None), "lock-step runs on txt2img"),  # img2img has no hires pass
    (dict(sampler_name="DPM++ 2M SDE"), "Brownian noise"),
    (dict(firstpass_image="image"), None),  # hires from a first-pass image: no BLI at all
])
def test_where_lockstep_cannot_hold_the_prepass_runs_and_says_why(host, capsys, change, reason):
    pipeline, model = host
    out, p, rows = generate(pipeline, model, steps=4, change=change, bli_lockstep=True)
    printed = capsys.readouterr().out
    frames = p.batch_size
    assert out.shape[0] == frames and set(rows) == {2 * frames}
    if reason is None:
        assert rows == [2 * frames] * 4 and "lock-step" not in printed
    else:
        assert rows == [2 * frames] * (3 + 4) and "BLI runs a pre-pass instead of lock-step" in printed
        assert reason in printed and reason in p.extra_generation_params["Story BLI note"]
        assert Settings.from_infotext(p.extra_generation_params).bli_lockstep is True


def test_oneactor_characters_and_controlnet_fall_back_to_the_prepass(host):
    pipeline, _ = host
    lockstep = importlib.import_module("lib_consistency.hosts.lockstep")
    kwargs = dict(conditioning=torch.zeros(1), unconditional_conditioning=[[]])
    p = Txt2ImgToy.__new__(Txt2ImgToy)
    p.sd_model, p.rng, p.scripts = types.SimpleNamespace(), object(), None
    assert lockstep.refusal(p, (), kwargs) is None
    assert "named conditioning" in lockstep.refusal(p, (1, 2), {})
    assert "conditioning of type int" in lockstep.refusal(p, (), dict(conditioning=1, unconditional_conditioning=[]))
    p.consistent_story_oneactor = types.SimpleNamespace(first=object())
    assert "OneActor" in lockstep.refusal(p, (), kwargs)
    del p.consistent_story_oneactor
    unit = types.SimpleNamespace(title=lambda: "ControlNet", latest_network=types.SimpleNamespace(control_params=[1]))
    p.scripts = types.SimpleNamespace(alwayson_scripts=[unit])
    assert "ControlNet" in lockstep.refusal(p, (), kwargs)
    unit.latest_network = None
    assert lockstep.refusal(p, (), kwargs) is None


def test_conditioning_is_doubled_in_the_hosts_own_types(host):
    lockstep = importlib.import_module("lib_consistency.hosts.lockstep")

    class Multicond:  # prompt_parser.MulticondLearnedConditioning
        def __init__(self, shape, batch):
            self.shape, self.batch = shape, batch

    cond = lockstep.doubled(Multicond((2,), [["a"], ["b"]]))
    assert isinstance(cond, Multicond) and cond.shape == (4,) and cond.batch == [["a"], ["b"], ["a"], ["b"]]
    assert lockstep.doubled([["u"], ["v"]]) == [["u"], ["v"], ["u"], ["v"]]
    assert torch.equal(lockstep.doubled(torch.arange(2)), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(TypeError, match="cannot double"):
        lockstep.doubled("text")


def test_a_failed_lockstep_job_leaves_the_unet_and_the_rng_as_they_were(host):
    pipeline, model = host
    unet = model.model.diffusion_model
    before = hooks_on(unet)
    plain = ToyProcessing(model).sample(lambda params: None)
    p = Txt2ImgToy(model, steps=6)
    p.fail_at_step = 4  # after the window: the twin rows are being cut
    pipeline.before_process(p, Settings.from_dict({"enabled": True, "story": NAMED, "preset": "StorySync",
                                                   "bli_lockstep": True}).to_args())
    host_rng = p.rng = ImageRNG((4, 8, 8), p.seed[:p.batch_size])
    cond, uncond = model.cond_stage_model.encode(p.prompt), model.cond_stage_model.encode([""] * len(p.prompt))
    with pytest.raises(RuntimeError, match="out of memory"):
        p.sample(conditioning=cond, unconditional_conditioning=uncond, on_cfg_denoiser=pipeline.on_cfg_denoiser)
    generation = getattr(p, pipeline.RUN_ATTRIBUTE)
    assert p.rng is host_rng and not generation.lockstep and hooks_on(unet) == before
    p.close()
    assert torch.equal(ToyProcessing(model).sample(lambda params: None), plain)


# --- the row layouts and Forge's model calls ---------------------------------------------------------------------


def test_twinned_layout_and_the_rows_left_after_the_window():
    layout = twinned_layout((Role.COND, Role.UNCOND), (3, 5))
    assert layout.frames == (3, 5) * 4
    assert layout.roles == (Role.COND,) * 2 + (Role.OTHER,) * 2 + (Role.UNCOND,) * 2 + (Role.OTHER,) * 2
    assert layout.twins == (2, 3, -1, -1, 6, 7, -1, -1)
    story, kept, expand = without_twins(layout)
    assert kept == (0, 1, 4, 5) and expand == (0, 1, 0, 1, 2, 3, 2, 3) and story.twins is None
    assert story.frames == (3, 5, 3, 5) and story.roles == (Role.COND,) * 2 + (Role.UNCOND,) * 2
    assert layout.rows(0, 4).twins == (2, 3, -1, -1)  # the host's skipped uncond keeps the cond rows' twins
    plain = twinned_layout((Role.COND,), (0,))
    assert without_twins(without_twins(plain)[0])[1:] == ((0,), (0,))
    forge = forge_row_layout((1, 0), 4, 8, (3, 5), twinned=True)
    assert forge.roles[:4] == (Role.UNCOND,) * 2 + (Role.OTHER,) * 2 and forge.twins[:2] == (2, 3)
    assert not forge_row_layout((1, 0), 4, 8, (3, 5, 6), twinned=True).known
    assert not forge_row_layout((1, 0), 3, 6, 0, twinned=True).known


def test_forge_wrapper_marks_the_twins_in_the_window_and_cuts_them_after(host):
    forge = importlib.import_module("lib_consistency.hosts.forge")
    from lib_consistency.surfaces.forge_patches import TWINS_OPTION
    seen = []

    def apply_model(x, t, c_crossattn, y, transformer_options):
        seen.append((x.shape[0], dict(transformer_options)))
        return x * 2 + c_crossattn.mean(dim=(1, 2))[:, None, None, None] + y[:, :1, None, None] + t[:, None, None, None]

    images, chunks = 2, [1, 0]
    rows = images * 2 * len(chunks)
    x, t = torch.randn(rows, 4, 3, 3), torch.linspace(1, 2, rows)
    c = {"c_crossattn": torch.randn(rows, 5, 8), "y": torch.randn(rows, 6),
         "transformer_options": {"sigmas": torch.ones(2 * images), "cond_mark": torch.tensor([1.0] * 4 + [0.0] * 4),
                                 "cond_indices": list(range(4, 8)), "uncond_indices": list(range(4))}}
    args = {"input": x, "timestep": t, "c": c, "cond_or_uncond": chunks}
    window = [True]
    wrapper = forge.lockstep_wrapper(lambda: window[0], None)
    whole = apply_model(x, t, **{**c, "transformer_options": {}})
    assert torch.equal(wrapper(lambda x, t, **c: apply_model(x, t, **c), args), whole)
    assert seen[-1][0] == rows and seen[-1][1][TWINS_OPTION] is True
    window[0] = False
    out = wrapper(lambda x, t, **c: apply_model(x, t, **c), args)
    count, options = seen[-1]
    assert count == rows // 2 and TWINS_OPTION not in options and len(options["sigmas"]) == images
    assert options["cond_indices"] == [2, 3] and options["uncond_indices"] == [0, 1]
    assert options["cond_mark"].tolist() == [1.0, 1.0, 0.0, 0.0]
    story = [0, 1, 4, 5]
    assert torch.equal(out[story], whole[story])  # the story's rows as a whole call gives them
    assert torch.equal(out[[2, 3, 6, 7]], out[story])  # each twin takes its story row's output
    with_control = {**args, "c": {**c, "control": object()}}  # something not cut row-wise: the whole call
    calls = []
    wrapper(lambda x, t, **kw: calls.append((x.shape[0], kw["transformer_options"].get(TWINS_OPTION))) or x,
            with_control)
    assert calls == [(rows, True)]


# --- Forge: the whole story through the stand-in of Forge's sampling ----------------------------------------------


@pytest.fixture
def forge_host(monkeypatch, clip_tokenizer):
    from tests.forge_sampling_standin import install_backend
    from tests.forge_standin import attention_function
    install_stub_modules(monkeypatch)
    install_backend(monkeypatch)
    attention = types.ModuleType("backend.attention")
    attention.attention_function = attention_function
    monkeypatch.setitem(sys.modules, "backend.attention", attention)
    return importlib.import_module("lib_consistency.hosts.pipeline"), clip_tokenizer


def forge_generate(pipeline, tokenizer, **values):
    """One story job on Forge: ``forge_objects`` reset, ``process_before_every_sampling`` with the noise, then per step
    the denoiser callback and ``sampling_function`` (the model function wrapper, cond_or_uncond chunks); ancestral
    noise from ``p.rng``. Returns (latents, p, (rows, cond_or_uncond) of every model call)."""
    from tests.forge_sampling_standin import sampling_function, toy_apply_model
    from tests.forge_standin import ForgeProcessing, forge_model
    model = forge_model(tokenizer, tiny_clip_text_model(16, seed=5))
    scale_attention(model.model.diffusion_model)
    base, calls = model.forge_objects_after_applying_lora.unet, []
    base.model.apply_model = toy_apply_model(base.model.diffusion_model, calls)

    class ForgeTxt2Img(ForgeProcessing):
        firstpass_image = None
        sampler_name = "Euler"

        def sample_hr_pass(self, *args):
            raise AssertionError("no hires fix here")

        def sample(self, conditioning=None, unconditional_conditioning=None, on_cfg_denoiser=None):
            model.forge_objects = types.SimpleNamespace(unet=base)
            x = self.rng.next()
            pipeline.process_before_every_sampling(self, x)
            patched = model.forge_objects.unet
            denoiser = types.SimpleNamespace(p=self, step=0, total_steps=self.steps)
            for step in range(self.steps):
                params = types.SimpleNamespace(x=x, sigma=torch.full((x.shape[0],), 10.0 - step), sampling_step=step,
                                               total_sampling_steps=self.steps, text_cond=conditioning,
                                               text_uncond=unconditional_conditioning, denoiser=denoiser)
                on_cfg_denoiser(params)
                denoised = sampling_function(patched, x, params.sigma, params.text_cond, params.text_uncond, 5.0)
                x = x + 0.3 * (denoised - x) + 0.01 * self.rng.next()
                denoiser.step += 1
            return x

    p = ForgeTxt2Img(model, steps=10)
    pipeline.before_process(p, Settings.from_dict({"enabled": True, "story": NAMED, "preset": "StorySync",
                                                   "rfh_start": 0.0, "bli_steps": 0.3, **values}).to_args())
    p.rng = ImageRNG((4, 8, 8), p.seed[:p.batch_size])
    cond = model.cond_stage_model.encode(p.prompt)
    uncond = model.cond_stage_model.encode([""] * len(p.prompt))
    with torch.no_grad():
        out = p.sample(conditioning=cond, unconditional_conditioning=uncond, on_cfg_denoiser=pipeline.on_cfg_denoiser)
    return out, p, calls


def test_forge_lockstep_draws_the_prepass_images_through_the_model_wrapper(forge_host, capsys):
    pipeline, tokenizer = forge_host
    prepass, _, prepass_calls = forge_generate(pipeline, tokenizer)
    lockstep, p, calls = forge_generate(pipeline, tokenizer, bli_lockstep=True)
    no_bli, _, _ = forge_generate(pipeline, tokenizer, bli_strength=0.0)
    assert "pre-pass instead" not in capsys.readouterr().out
    frames = p.batch_size
    torch.testing.assert_close(lockstep, prepass, rtol=1e-5, atol=1e-5)
    assert (lockstep - no_bli).abs().max() > 1e-3
    # one model call per step, the uncond chunk first: 2·2B rows in the window, the story's 2B rows after it
    assert calls == [(4 * frames, [1, 0])] * 3 + [(2 * frames, [1, 0])] * 7
    assert prepass_calls == [(2 * frames, [1, 0])] * (4 + 10)
    assert "model_function_wrapper" not in p.sd_model.forge_objects_after_applying_lora.unet.model_options
