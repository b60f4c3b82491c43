"""OneActor's η2 rows on Forge and Forge Neo (``hosts/forge.py``), against the stand-in of Forge's sampling
(``tests/forge_sampling_standin.py``): folded into the model call that holds the cond chunk (one call of 3B rows per
step), equal to the post-CFG function's second call, which stays where the call cannot take them."""
from __future__ import annotations

import importlib
import types

import pytest
import torch

from lib_consistency.common.row_layout import Role, forge_row_layout
from lib_consistency.settings import Settings
from tests.conftest import tiny_clip_text_model
from tests.fake_webui import install_stub_modules, parse_prompt
from tests.forge_sampling_standin import SPLIT, install_backend, sampling_function, toy_apply_model
from tests.forge_standin import ForgeProcessing, NeoPatcher, forge_model
from tests.hosts.test_oneactor import character

STEPS, CFG = 3, 7.0
PROMPTS = ["<oneactor:hero> a hobbit in a forest", "a hobbit at sea"]
PAPER = Settings(oneactor_eta2=1.0)  # window 2/3: steps 0 and 1 of 3


@pytest.fixture(scope="module")
def encoder():
    return tiny_clip_text_model(768, seed=3)


@pytest.fixture
def forge(monkeypatch, clip_tokenizer, encoder, tmp_path):
    mods = install_stub_modules(monkeypatch)
    mods["modules.shared"].opts.data["consistent_story_oneactor_dir"] = str(tmp_path)
    install_backend(monkeypatch)
    oneactor = importlib.import_module("lib_consistency.hosts.oneactor.generation")
    character(tmp_path)
    return oneactor, clip_tokenizer, encoder


def generate(forge, settings=None, calls=None, options=None, conds=None, image_cond=False, control=None,
             patcher=None, fail_at_rows=None, made=None):
    """One Forge sampling of PROMPTS: ``process_before_every_sampling`` on a fresh ``forge_objects``, then per step
    the denoiser callback and ``sampling_function``. ``settings`` None: no OneActor (the host alone). ``options``:
    model options of the UNet patcher (``SPLIT``, patches); ``conds``: (cond, uncond) instead of the encodings;
    ``fail_at_rows``: the model raises on a call of that many rows; ``made``: gets ``p``. Returns (latent, p)."""
    oneactor, tokenizer, encoder = forge
    model = forge_model(tokenizer, encoder) if patcher is None else forge_model(tokenizer, encoder, patcher)
    base = model.forge_objects_after_applying_lora.unet
    apply = toy_apply_model(base.model.diffusion_model, [] if calls is None else calls)

    def apply_model(x, t, **c):
        if fail_at_rows is not None and x.shape[0] == fail_at_rows:
            raise RuntimeError("out of memory (stand-in)")
        return apply(x, t, **c)
    base.model.apply_model = apply_model
    base.model_options.update(options or {})
    p = ForgeProcessing(model, prompt=list(PROMPTS), steps=STEPS)
    p.all_prompts, p.batch_size, p.cfg_scale = list(PROMPTS), len(PROMPTS), CFG
    if made is not None:
        made.append(p)
    if settings is not None:
        oneactor.remember_settings(p, settings, None)
        oneactor.activate(p)
    texts = [parse_prompt(text)[0] for text in PROMPTS]
    cond, uncond = conds or (model.cond_stage_model.encode(texts), model.cond_stage_model.encode(["", ""]))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    model.forge_objects = types.SimpleNamespace(unet=base)  # the host's reset at every sample()
    if settings is not None:
        oneactor.process_before_every_sampling(p, x)
    patched = model.forge_objects.unet
    denoiser = types.SimpleNamespace(p=p, step=0, total_steps=STEPS)
    concat = torch.linspace(0, 1, 2 * 5).reshape(2, 5, 1, 1) if image_cond else None
    try:
        for step in range(STEPS):
            now = dict(cond) if isinstance(cond, dict) else cond
            params = types.SimpleNamespace(x=x, sigma=torch.full((2,), 10.0 - step), sampling_step=step,
                                           total_sampling_steps=STEPS, text_cond=now, text_uncond=uncond,
                                           denoiser=denoiser)
            if settings is not None:
                oneactor.on_cfg_denoiser(params)
            denoised = sampling_function(patched, x, params.sigma, params.text_cond, uncond, p.cfg_scale,
                                         image_cond=concat, control=control)
            x = x + 0.5 * (denoised - x)
            denoiser.step += 1
    finally:
        if settings is not None:
            oneactor.deactivate(p)
    return x, p


def folded_and_second_call(forge, monkeypatch, **kwargs):
    eta2 = importlib.import_module("lib_consistency.hosts.oneactor.eta2")
    runs = []
    for forced in (False, True):
        with monkeypatch.context() as patch:
            if forced:
                patch.setenv(eta2.SECOND_CALL_ENV, "1")
            calls = []
            out, _ = generate(forge, PAPER, calls, **kwargs)
            runs.append((out, calls))
    return runs


def sdxl(forge):
    _, tokenizer, encoder = forge
    model = forge_model(tokenizer, encoder)
    g = torch.Generator().manual_seed(5)
    texts = [parse_prompt(text)[0] for text in PROMPTS]
    return ({"crossattn": model.cond_stage_model.encode(texts), "vector": torch.randn(2, 8, generator=g)},
            {"crossattn": model.cond_stage_model.encode(["", ""]), "vector": torch.randn(2, 8, generator=g)})


def longer_uncond(forge):
    _, tokenizer, encoder = forge
    model = forge_model(tokenizer, encoder)
    empty = model.cond_stage_model.encode(["", ""])
    return model.cond_stage_model.encode([parse_prompt(text)[0] for text in PROMPTS]), torch.cat([empty, empty], 1)


U, C, O = 1, 0, 2
FOLDED = [(6, [U, C, O])] * 2 + [(4, [U, C])]  # one call of 3B rows inside the window, the host's own after


@pytest.mark.parametrize("case", ["sd15", "sdxl y", "concat image", "token lengths differ", "neo"])
def test_folded_rows_equal_the_second_call_in_one_model_call_per_step(forge, monkeypatch, case):
    kwargs = {"sdxl y": lambda: {"conds": sdxl(forge)}, "concat image": lambda: {"image_cond": True},
              "token lengths differ": lambda: {"conds": longer_uncond(forge)},
              "neo": lambda: {"patcher": NeoPatcher}}.get(case, dict)()
    (folded, calls), (second, second_calls) = folded_and_second_call(forge, monkeypatch, **kwargs)
    assert calls == FOLDED
    assert second_calls == [(4, [U, C]), (2, [C])] * 2 + [(4, [U, C])]  # the post-CFG function's own call
    assert torch.allclose(folded, second, atol=1e-5, rtol=1e-5)
    plain, _ = generate(forge, None, **kwargs)
    assert not torch.allclose(folded, plain, atol=1e-3)  # the η2 term is there


def test_a_call_holding_the_cond_chunk_alone_takes_the_rows(forge, monkeypatch):
    (folded, calls), (second, _) = folded_and_second_call(forge, monkeypatch, options={SPLIT: True})
    assert calls == [(2, [U]), (4, [C, O])] * 2 + [(2, [U]), (2, [C])]
    assert torch.allclose(folded, second, atol=1e-5, rtol=1e-5)


def test_our_patches_see_the_folded_rows_as_other_rows(forge):
    seen = []

    def ours(q, k, v, extra_options):  # stands for a story patch of surfaces/forge_patches.py
        seen.append(forge_row_layout(extra_options["cond_or_uncond"], len(extra_options["sigmas"]), q.shape[0],
                                     (4, 9)))
        return torch.nn.functional.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
    ours.__module__ = "lib_consistency.surfaces.forge_patches"
    options = {"transformer_options": {"patches_replace": {"attn1": {("input", 1, 0): ours}}}}
    calls = []
    generate(forge, PAPER, calls, options=options)
    assert calls == FOLDED
    roles = [layout.roles for layout in seen]
    assert roles == [(Role.UNCOND,) * 2 + (Role.COND,) * 2 + (Role.OTHER,) * 2] * 2 + [(Role.UNCOND,) * 2 +
                                                                                        (Role.COND,) * 2]
    assert all(layout.frames == (4, 9) * (layout.num_rows // 2) for layout in seen)


def test_controlnet_and_foreign_patches_keep_the_second_call(forge, monkeypatch):
    def foreign(q, k, v, extra_options):  # another extension's patch: it reads cond_or_uncond as two roles
        assert set(extra_options["cond_or_uncond"]) <= {0, 1}
        return torch.nn.functional.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
    for kwargs in ({"control": 0.25}, {"options": {"transformer_options": {"patches_replace": {
            "attn2": {("middle", 0, 0): foreign}}}}}):
        (unfolded, calls), (second, _) = folded_and_second_call(forge, monkeypatch, **kwargs)
        assert calls == [(4, [U, C]), (2, [C])] * 2 + [(4, [U, C])]
        assert torch.equal(unfolded, second)


def test_a_foreign_wrapper_is_called_inside_ours(forge):
    seen = []

    def foreign(apply_model, args):
        seen.append(list(args["cond_or_uncond"]))
        return apply_model(args["input"], args["timestep"], **args["c"])
    calls = []
    out, _ = generate(forge, PAPER, calls, options={"model_function_wrapper": foreign})
    assert calls == FOLDED and seen == [[U, C, O]] * 2 + [[U, C]]


def test_eta2_zero_or_outside_the_window_is_the_hosts_plain_result(forge):
    plain_calls = []
    plain, _ = generate(forge, None, plain_calls)
    for settings in (Settings(oneactor_eta2=0.0, oneactor_v=0.0), Settings(oneactor_eta2=1.0, oneactor_window=0.0)):
        calls = []
        out, _ = generate(forge, settings, calls)
        assert calls == plain_calls == [(4, [U, C])] * 3 and torch.equal(out, plain)


def test_after_a_failure_nothing_is_left_installed(forge):
    made = []
    with pytest.raises(RuntimeError, match="out of memory"):
        generate(forge, PAPER, fail_at_rows=6, made=made)
    model = made[0].sd_model
    base = model.forge_objects_after_applying_lora.unet
    assert "model_function_wrapper" not in base.model_options  # only ever on the clone the host drops
    assert "sampler_post_cfg_function" not in base.model_options
    model.forge_objects = types.SimpleNamespace(unet=base)  # the host's reset at the next sample()
    x, sigma = torch.randn(2, 4, 8, 8), torch.full((2,), 5.0)
    cond, uncond = model.cond_stage_model.encode(["a hobbit"] * 2), model.cond_stage_model.encode(["", ""])
    calls = []
    base.model.apply_model = toy_apply_model(base.model.diffusion_model, calls)
    plain = sampling_function(base, x, sigma, cond, uncond, CFG)
    model.forge_objects = types.SimpleNamespace(unet=base.clone())
    assert torch.equal(sampling_function(model.forge_objects.unet, x, sigma, cond, uncond, CFG), plain)
    assert calls == [(4, [U, C])] * 2
