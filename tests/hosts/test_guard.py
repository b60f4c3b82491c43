"""Never a silently plain story (guard.py, reach.py): on stand-ins of Forge, Forge Neo and A1111, a story either runs
with every method it claims or the job fails with a message; errors the host would swallow fail the job; a patch or
hook removed by another extension is caught at the next UNet call; nothing is left behind."""
from __future__ import annotations

import importlib
import logging
import sys
import types

import pytest
import torch

from lib_consistency.settings import Settings
from lib_consistency.surfaces.instance_hooks import InstanceForwardHook
from lib_consistency.surfaces.reach import CSA, HARMONIZATION, IPCA, SHARING, SUBJECT_MAPS, Reach
from tests.conftest import tiny_clip_text_model
from tests.fake_webui import ImageRNG, ToyModel, ToyProcessing, install_stub_modules
from tests.forge_standin import (ForgeClassicPatcher, ForgePatcher, ForgeProcessing, NeoPatcher, attention_function,
                                 forge_model)

STORY = "a small red fox with a white tail\nruns through snow # Morning\nsleeps in a log # Night\n[NC] an empty lake"
# each preset, and the same story with that preset's attention methods off (what a silent failure would give)
PRESETS = {
    "StoryDiffusion": (dict(preset="StoryDiffusion", csa_layers="all"), dict(preset="StoryDiffusion", csa=False)),
    "StorySync": (dict(preset="StorySync", csa_layers="all", reference_frames=0, rfh_start=0.0),
                  dict(preset="StorySync", masked_sharing=False, csa=False, reference_frames=0)),
    "Combined": (dict(preset="Combined", csa_layers="all"), dict(preset="Combined", csa=False, ipca=False)),
    "1Prompt1Story": (dict(preset="1Prompt1Story"), dict(preset="1Prompt1Story", ipca=False)),
}
SURFACES = {"StoryDiffusion": [CSA], "StorySync": [SHARING, HARMONIZATION, SUBJECT_MAPS], "Combined": [CSA, IPCA],
            "1Prompt1Story": [IPCA]}


@pytest.fixture
def host(monkeypatch, clip_tokenizer):
    install_stub_modules(monkeypatch)
    backend = types.ModuleType("backend")
    backend.attention = types.ModuleType("backend.attention")
    backend.attention.attention_function = attention_function
    monkeypatch.setitem(sys.modules, "backend", backend)
    monkeypatch.setitem(sys.modules, "backend.attention", backend.attention)
    pipeline = importlib.import_module("lib_consistency.hosts.pipeline")
    script = importlib.import_module("lib_consistency.hosts.script").ConsistentStoryScript()
    callbacks = importlib.import_module("lib_consistency.hosts.callbacks")
    encoder = tiny_clip_text_model(16, seed=5)
    return types.SimpleNamespace(pipeline=pipeline, script=script, callbacks=callbacks, tokenizer=clip_tokenizer,
                                 encoder=encoder)


def args_for(**values):
    return Settings.from_dict({"enabled": True, "story": STORY, **values}).to_args()


def leftovers(unet: torch.nn.Module) -> tuple:
    """Everything of ours a run could leave on the UNet: instance hooks, and hooks on the UNet module."""
    ours = [name for name, m in unet.named_modules() if isinstance(m.__dict__.get("forward"), InstanceForwardHook)]
    return ours, len(unet._forward_pre_hooks), len(unet._forward_hooks)


def forge_job(h, model, values=None, extra_scripts=()):
    """One txt2img job (4 steps, seeded noise: StorySync's BLI pre-pass runs) on the Forge stand-in with our script
    (and others after it): the frames, and ``p``."""
    p = ForgeProcessing(model, scripts=[h.script.process_before_every_sampling, *extra_scripts], steps=4)
    if values is not None:
        h.script.before_process(p, *args_for(**values))
    p.rng = ImageRNG((4, 8, 8), p.seed[:p.batch_size] if isinstance(p.seed, list) else [1])
    return torch.cat(p.run_batches(h.callbacks.on_cfg_denoiser)), p


def sampled_patcher(p):
    return p.sd_model.forge_objects.unet


@pytest.mark.parametrize("preset", list(PRESETS))
def test_forge_and_neo_run_every_preset_with_its_methods(host, preset):
    """Neo's patcher has no memory peak modifier (the cause of plain stories there): the same frames as Forge's,
    different from the same story with the preset's methods off, each UNet call checked, nothing left behind."""
    on, off = PRESETS[preset]
    frames = {}
    for patcher in (ForgeClassicPatcher, NeoPatcher):
        model = forge_model(host.tokenizer, host.encoder, patcher)
        unet = model.forge_objects.unet.model.diffusion_model
        before = leftovers(unet)
        frames[patcher], p = forge_job(host, model, on)
        assert not p.swallowed
        generation = getattr(p, host.pipeline.RUN_ATTRIBUTE)
        assert list(generation.reach.wanted) == SURFACES[preset]
        assert generation.reach.calls >= p.steps  # every complete UNet call checked (and the BLI pre-pass's)
        assert leftovers(unet) == before
        plain_frames, _ = forge_job(host, model, off)
        assert not torch.allclose(frames[patcher], plain_frames)
    torch.testing.assert_close(frames[ForgeClassicPatcher], frames[NeoPatcher], rtol=0, atol=0)


def test_neo_reserves_the_shared_attention_memory_in_bytes(host):
    model = forge_model(host.tokenizer, host.encoder, NeoPatcher)
    _, p = forge_job(host, model, PRESETS["StoryDiffusion"][0])
    # 3 frames at CSA rate 0.5: 1 + 0.5·2 = 2 times plain attention; memory_required([2B, 4, 8, 8]) = 1000·6
    assert sampled_patcher(p).extra_preserved_memory_during_sampling == 6000
    classic = forge_model(host.tokenizer, host.encoder, ForgeClassicPatcher)
    _, p = forge_job(host, classic, PRESETS["StoryDiffusion"][0])
    assert sampled_patcher(p).model_options["memory_peak_estimation_modifier"]([6, 4, 8, 8]) == 12000


def test_a_patcher_without_a_memory_api_still_runs_the_story(host, caplog):
    model = forge_model(host.tokenizer, host.encoder, ForgePatcher)
    with caplog.at_level(logging.WARNING):
        frames, p = forge_job(host, model, PRESETS["StoryDiffusion"][0])
    assert "no way to reserve memory" in caplog.text and not p.swallowed
    reference, _ = forge_job(host, forge_model(host.tokenizer, host.encoder), PRESETS["StoryDiffusion"][0])
    assert torch.equal(frames, reference)


def test_an_error_in_process_before_every_sampling_fails_the_job(host, monkeypatch):
    """What Neo did: the patching raised inside a hook both Forges swallow, and sampling went on plain."""
    model = forge_model(host.tokenizer, host.encoder)
    unet = model.forge_objects.unet.model.diffusion_model
    before = leftovers(unet)
    baseline, _ = forge_job(host, model)

    def broken(*args, **kwargs):
        raise AttributeError("'UnetPatcher' object has no attribute 'set_memory_peak_estimation_modifier'")
    with monkeypatch.context() as patched, \
            pytest.raises(RuntimeError, match=r"patching the UNet for the story \(process_before_every_sampling\) "
                                              r"failed \(AttributeError: .*set_memory_peak_estimation_modifier"):
        patched.setattr(host.pipeline, "patch_unet", broken)
        forge_job(host, model, PRESETS["StoryDiffusion"][0])
    assert leftovers(unet) == before
    after, _ = forge_job(host, model)
    assert torch.equal(after, baseline)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_another_extension_dropping_our_patches_fails_the_job(host, preset):
    """Another extension's process_before_every_sampling (after ours) assigns a patcher without our patches."""
    model = forge_model(host.tokenizer, host.encoder)
    unet = model.forge_objects.unet.model.diffusion_model

    def fresh_patcher(p, x=None):
        p.sd_model.forge_objects.unet = p.sd_model.forge_objects_after_applying_lora.unet.clone()
    with pytest.raises(RuntimeError) as failure:
        forge_job(host, model, PRESETS[preset][0], extra_scripts=[fresh_patcher])
    message = str(failure.value)
    assert message.startswith("Consistent Story: ") and "missing from the model that samples" in message
    assert all(surface in message for surface in SURFACES[preset])
    assert leftovers(unet) == ([], 0, 0)


def test_one_block_taken_over_by_another_extension_is_named(host):
    """Another extension overwrites our attn1 patch on one block (registered after ours, without wrapping it)."""
    model = forge_model(host.tokenizer, host.encoder)

    def take_middle_block(p, x=None):
        unet = p.sd_model.forge_objects.unet.clone()
        unet.set_model_patch_replace(lambda q, k, v, extra: attention_function(q, k, v, extra["n_heads"]),
                                     "attn1", "middle", 0, 0)
        p.sd_model.forge_objects.unet = unet
    with pytest.raises(RuntimeError, match=r"consistent self-attention on 1 of its 3 layers \(first \('middle', 0, "
                                           r"0\)\) did not run"):
        forge_job(host, model, PRESETS["StoryDiffusion"][0], extra_scripts=[take_middle_block])


def a1111_job(h, model, values, on_cfg_denoiser=None, **sample_kwargs):
    p = ToyProcessing(model)
    h.script.before_process(p, *args_for(**values))
    return p.sample(on_cfg_denoiser or h.callbacks.on_cfg_denoiser, **sample_kwargs), p


@pytest.mark.parametrize("preset", list(PRESETS))
def test_a1111_every_unet_call_is_checked(host, preset):
    model = ToyModel(host.tokenizer, host.encoder)
    unet = model.model.diffusion_model
    before = leftovers(unet)
    frames, p = a1111_job(host, model, PRESETS[preset][0])
    generation = getattr(p, host.pipeline.RUN_ATTRIBUTE)
    assert list(generation.reach.wanted) == SURFACES[preset] and generation.reach.calls == p.steps
    assert leftovers(unet) == before
    plain, _ = a1111_job(host, model, PRESETS[preset][1])
    assert not torch.allclose(frames, plain)


def test_a1111_hook_replaced_by_another_extension_fails_the_job(host):
    """Another extension puts its own instance forward on one attention module mid-run, bypassing ours."""
    model = ToyModel(host.tokenizer, host.encoder)
    unet = model.model.diffusion_model
    module = unet.output_blocks[3][1].transformer_blocks[0].attn1

    def on_cfg_denoiser(params):
        host.callbacks.on_cfg_denoiser(params)
        if params.sampling_step == 1:
            module.forward = lambda *args, **kwargs: type(module).forward(module, *args, **kwargs)
    with pytest.raises(RuntimeError, match=r"consistent self-attention on 1 of its 3 layers \(first \('output', 3, "
                                           r"0\)\) did not run in this UNet call"):
        a1111_job(host, model, PRESETS["StoryDiffusion"][0], on_cfg_denoiser)
    del module.forward  # the other extension's, not ours
    assert leftovers(unet) == ([], 0, 0)


@pytest.mark.parametrize("step", [0, 2])
def test_an_error_in_a_swallowed_callback_fails_the_job_at_the_next_unet_call(host, monkeypatch, step):
    model = ToyModel(host.tokenizer, host.encoder)
    unet = model.model.diffusion_model
    baseline, _ = a1111_job(host, model, PRESETS["Combined"][0])
    calls = []
    original = host.pipeline.a1111_step_plan

    def step_plan(*args, **kwargs):
        calls.append(1)
        if len(calls) == step + 1:
            raise ValueError("simulated")
        return original(*args, **kwargs)
    unet_calls = []
    handle = unet.register_forward_pre_hook(lambda module, args: unet_calls.append(1))
    with monkeypatch.context() as patched, \
            pytest.raises(RuntimeError, match=r"the story's conditioning for this step \(on_cfg_denoiser\) failed "
                                              r"\(ValueError: simulated\)"):
        patched.setattr(host.pipeline, "a1111_step_plan", step_plan)
        a1111_job(host, model, PRESETS["Combined"][0])
    handle.remove()
    assert len(unet_calls) == step + 1  # the failing step's UNet call was entered and stopped by the error
    assert leftovers(unet) == ([], 0, 0)
    again, _ = a1111_job(host, model, PRESETS["Combined"][0])
    assert torch.equal(again, baseline)


def test_an_error_kept_after_the_last_unet_call_fails_the_job(host):
    """A callback after the last UNet call (on_cfg_after_cfg of the last step) keeps an error: p.sample raises it
    when sampling returns, and the one-shot hook it armed is not left on the UNet."""
    guard = importlib.import_module("lib_consistency.hosts.guard")
    model = ToyModel(host.tokenizer, host.encoder)
    unet = model.model.diffusion_model
    p = ToyProcessing(model)
    host.script.before_process(p, *args_for(**PRESETS["StoryDiffusion"][0]))
    calls = []

    def after_cfg(module, args, output):
        calls.append(1)
        if len(calls) == p.steps:
            guard.keep(p, "a late callback", KeyError("late"))
    handle = unet.register_forward_hook(after_cfg)
    with pytest.raises(RuntimeError, match="a late callback failed"):
        p.sample(host.callbacks.on_cfg_denoiser)
    handle.remove()
    assert len(calls) == p.steps and leftovers(unet) == ([], 0, 0)


def test_postprocess_error_is_raised_from_close(host, monkeypatch):
    model = ToyModel(host.tokenizer, host.encoder)
    frames, p = a1111_job(host, model, PRESETS["StoryDiffusion"][0])
    storyboard = importlib.import_module("lib_consistency.hosts.storyboard")
    monkeypatch.setattr(storyboard, "compose_storyboard", lambda *args: (_ for _ in ()).throw(OSError("disk")))
    processed = types.SimpleNamespace(images=[object()] * 3, index_of_first_image=0, infotexts=["i"] * 3, seed=1)
    with pytest.raises(OSError):  # the host logs it and goes on
        host.script.postprocess(p, processed)
    with pytest.raises(RuntimeError, match=r"storyboard or mask images failed \(OSError: disk\)"):
        p.close()
    assert p.closed


def test_oneactor_eta2_not_taken_by_the_next_step_is_an_error(host):
    oneactor = importlib.import_module("lib_consistency.hosts.oneactor.generation")
    denoiser = object()
    run = oneactor.OneActorRun(Settings())
    step = lambda n, d=denoiser: types.SimpleNamespace(denoiser=d, sampling_step=n)  # noqa: E731
    run.pending = dict(denoiser=denoiser, step=3)
    oneactor._check_eta2_ran(run, step(0))  # a new pass (hires, or after the BLI pre-pass) starts at 0
    oneactor._check_eta2_ran(run, step(4, object()))  # another sampler's denoiser
    with pytest.raises(RuntimeError, match=r"cluster guidance \(eta2\) of step 4 did not run"):
        oneactor._check_eta2_ran(run, step(4))
    run.pending = None
    oneactor._check_eta2_ran(run, step(5))


def test_reach_names_what_did_not_run():
    reach = Reach()
    reach.want(CSA, [("input", 1, 0), ("middle", 0, 0)])
    reach.want(IPCA)  # no named layers: one entry per call is enough
    reach.begin()
    assert reach.missing() == [CSA, IPCA]
    reach.begin()
    reach.hit(CSA, ("input", 1, 0))
    reach.hit(IPCA, None)
    assert reach.missing() == [f"{CSA} on 1 of its 2 layers (first ('middle', 0, 0))"]
    reach.hit(CSA, ("middle", 0, 0))
    assert reach.missing() == [] and reach.calls == 3
    reach.clear()
    assert reach.missing() == []
