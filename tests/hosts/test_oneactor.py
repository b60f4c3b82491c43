"""OneActor in generation, against stand-ins of A1111 (tests/fake_webui.py): ``<oneactor:NAME[:v]>`` tags, Δ on
the base-word rows only and only in the window, the η2 row and its correction after CFG, errors before sampling."""
from __future__ import annotations

import importlib
import types

import pytest
import torch

from lib_consistency.oneactor.character_file import Character, save_character
from lib_consistency.settings import Settings
from tests.a1111_cfg_standin import CFGDenoiserStandIn, DictWithShape, toy_inner_model
from tests.conftest import tiny_clip_text_model
from tests.fake_webui import ToyModel, ToyProcessing, install_stub_modules, parse_prompt

STEPS, CFG = 3, 7.0


@pytest.fixture(scope="module")
def encoder():
    return tiny_clip_text_model(768, seed=3)  # SD1.5's width: characters are checked against it


@pytest.fixture
def host(monkeypatch, clip_tokenizer, encoder, tmp_path):
    mods = install_stub_modules(monkeypatch)
    mods["modules.shared"].opts.data["consistent_story_oneactor_dir"] = str(tmp_path)
    oneactor = importlib.import_module("lib_consistency.hosts.oneactor.generation")
    return oneactor, ToyModel(clip_tokenizer, encoder), tmp_path


def character(folder, name="hero", base_word="hobbit", seed=1, arch="sd15"):
    width = 768 if arch == "sd15" else 2048
    g = torch.Generator().manual_seed(seed)
    made = Character(name, torch.randn(width, generator=g), torch.randn(width, generator=g), base_word, arch, width,
                     "abcdef1234", "tiny.safetensors", f"a {base_word}", "", 42)
    save_character(folder / f"{name}.safetensors", made)
    return made


def processing(model, prompts, **settings):
    p = ToyProcessing(model, prompt=list(prompts), steps=STEPS)
    p.all_prompts, p.batch_size, p.cfg_scale = list(prompts), len(prompts), CFG
    return p


def inner_model(model, calls=None):
    return toy_inner_model(model.model.diffusion_model, [] if calls is None else calls)


def sample(oneactor, p, settings=None, callbacks=True, calls=None, cond=None, uncond=None, before_denoiser=None,
           after_denoiser=None):
    """Steps of A1111's ``CFGDenoiser.forward`` (``tests/a1111_cfg_standin.py``) with OneActor's callbacks (or
    none), the host options of the stub ``shared.opts``. Returns the final latent and the cond each step's UNet
    calls used (after the callbacks). ``calls``: each inner-model call's row count; ``cond``/``uncond``: instead of
    the prompts' encodings (an SDXL dict is handed over as a fresh ``DictWithShape`` each step, as the host builds
    it); ``before_denoiser``/``after_denoiser``: other ``on_cfg_denoiser`` callbacks (the story pipeline's runs
    before OneActor's)."""
    from modules import shared
    model = p.sd_model
    if callbacks:
        oneactor.remember_settings(p, settings or Settings(), None)
        oneactor.activate(p)
    texts = [parse_prompt(text)[0] for text in p.all_prompts]
    cond = model.cond_stage_model.encode(texts) if cond is None else cond
    uncond = model.cond_stage_model.encode([""] * len(texts)) if uncond is None else uncond
    x = torch.randn(len(texts), 4, 8, 8, generator=torch.Generator().manual_seed(0))
    image_cond, used = torch.zeros(len(texts), 5, 1, 1), []

    def on_cfg_denoiser(params):
        if before_denoiser is not None:
            before_denoiser(params)
        if callbacks:
            oneactor.on_cfg_denoiser(params)
        if after_denoiser is not None:
            after_denoiser(params)
        used.append(params.text_cond)
    hooks = types.SimpleNamespace(on_cfg_denoiser=on_cfg_denoiser,
                                  on_cfg_denoised=lambda params: callbacks and oneactor.on_cfg_denoised(params),
                                  on_cfg_after_cfg=lambda params: callbacks and oneactor.on_cfg_after_cfg(params))
    empty = model.cond_stage_model.encode([""])
    denoiser = CFGDenoiserStandIn(p, inner_model(model, calls), shared.opts, hooks, empty, STEPS)
    for step in range(STEPS):
        sigma = torch.full((len(texts),), 10.0 - step)
        now, negative = (DictWithShape(c) if isinstance(c, dict) else c for c in (cond, uncond))
        x = x + 0.5 * (denoiser.forward(x, sigma, negative, now, p.cfg_scale, image_cond) - x)
    if callbacks:
        oneactor.deactivate(p)
    return x, used


def base_rows(model, text, word):
    chunks = [list(c.tokens) for c in model.cond_stage_model.tokenize_line(text)[0]]
    ids = model.cond_stage_model.tokenizer(word, add_special_tokens=False)["input_ids"]
    return [i for i in range(len(chunks[0]) - len(ids) + 1) if chunks[0][i:i + len(ids)] == ids]


def test_prompts_without_tags_are_the_baseline_bit_for_bit(host):
    oneactor, model, folder = host
    character(folder)
    prompts = ["a hobbit in a forest", "a hobbit at sea"]
    plain, _ = sample(oneactor, processing(model, prompts), callbacks=False)
    out, _ = sample(oneactor, processing(model, prompts), Settings(oneactor_eta2=1.0))
    assert torch.equal(out, plain)


def test_delta_reaches_only_the_tagged_images_base_word_rows_inside_the_window(host):
    oneactor, model, folder = host
    hero = character(folder)
    prompts = ["<oneactor:hero:0.5> a hobbit in a forest", "a hobbit at sea"]
    _, used = sample(oneactor, processing(model, prompts), Settings(oneactor_window=0.67))
    _, plain = sample(oneactor, processing(model, prompts), callbacks=False)
    rows = base_rows(model, "a hobbit in a forest", "hobbit")
    assert rows == [2]
    for step in (0, 1):  # round(3 · 0.67) = 2 steps in the window
        changed = (used[step] != plain[step]).any(dim=-1)
        assert changed.nonzero().tolist() == [[0, 2]]
        expected = plain[step][0, 2].double() + 0.5 * hero.delta_tar.double()
        assert torch.allclose(used[step][0, 2].double(), expected, atol=1e-5)
    assert torch.equal(used[2], plain[2])


def test_cluster_guidance_equals_a_float64_reference(host):
    oneactor, model, folder = host
    hero = character(folder)
    prompts = ["<oneactor:hero> a photo of a hobbit"]
    p = processing(model, prompts)
    settings = Settings(oneactor_eta2=1.5, oneactor_v=0.8, oneactor_window=1.0)
    oneactor.remember_settings(p, settings, None)
    oneactor.activate(p)
    seen = {}
    original = oneactor.on_cfg_after_cfg

    def spy(params):
        seen.setdefault("before", params.x.clone())
        original(params)
        seen.setdefault("after", params.x.clone())
    oneactor.on_cfg_after_cfg = spy
    try:
        sample(oneactor, p, settings)
    finally:
        oneactor.on_cfg_after_cfg = original
    # independent reference for step 0: three predictions, combined in float64
    text = "a photo of a hobbit"
    cond, uncond = model.cond_stage_model.encode([text]), model.cond_stage_model.encode([""])
    row = base_rows(model, text, "hobbit")[0]
    tar, avg = cond.clone(), cond.clone()
    tar[0, row] += 0.8 * hero.delta_tar
    avg[0, row] += hero.delta_avg
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    inner, sigma, ic = inner_model(model), torch.full((1,), 10.0), torch.zeros(1, 5, 1, 1)
    d = {name: inner(x, sigma, {"c_crossattn": [ctx], "c_concat": [ic]}).double()
         for name, ctx in (("tar", tar), ("avg", avg), ("u", uncond))}
    reference = d["u"] + CFG * (d["tar"] - d["u"]) - 1.5 * (d["avg"] - d["u"])
    assert torch.allclose(seen["after"].double(), reference, atol=1e-4)
    assert not torch.allclose(seen["before"], seen["after"])


def test_v_zero_and_eta2_zero_is_plain_generation_bit_for_bit(host):
    oneactor, model, folder = host
    character(folder)
    prompts = ["<oneactor:hero:0> a hobbit in a forest"]
    plain, _ = sample(oneactor, processing(model, prompts), callbacks=False)
    out, _ = sample(oneactor, processing(model, prompts), Settings(oneactor_eta2=0.0))
    assert torch.equal(out, plain)


def refused(oneactor, p, settings=None):
    oneactor.remember_settings(p, settings or Settings(), None)
    oneactor.activate(p)
    with pytest.raises(RuntimeError) as error:
        p.sample(lambda params: None)
    return str(error.value)


@pytest.mark.parametrize("prompt, message", [
    ("<oneactor:hero> a dwarf in a forest", "character 'hero' acts on the word 'hobbit', which the prompt of "
                                            "image 1 does not contain"),
    ("<oneactor:villain> a hobbit", "no character 'villain' in"),
    ("<oneactor:hero:strong> a hobbit", "strength 'strong' of character 'hero' is not a number"),
    ("<oneactor:hero:1:2> a hobbit", "must be <oneactor:NAME> or <oneactor:NAME:v>"),
    ("<oneactor:hero> a [hobbit:dwarf:0.5]", "uses prompt editing"),
])
def test_bad_tags_are_refused_before_sampling_naming_the_problem(host, prompt, message):
    oneactor, model, folder = host
    character(folder)
    assert message in refused(oneactor, processing(model, [prompt]))


def test_a_character_for_another_architecture_is_refused(host):
    oneactor, model, folder = host
    character(folder, name="xl", arch="sdxl")
    message = refused(oneactor, processing(model, ["<oneactor:xl> a hobbit"]))
    assert "xl.safetensors" in message and "SDXL" in message and "SD1.5" in message


def test_infotext_records_name_hash_and_options_and_cfg_follows_eta1(host):
    oneactor, model, folder = host
    character(folder)
    p = processing(model, ["<oneactor:hero> a hobbit"])
    settings = Settings().with_value("oneactor_preset", "paper")
    sample(oneactor, p, settings)
    from lib_consistency.oneactor.character_file import file_hash
    assert p.extra_generation_params["OneActor hashes"] == f"hero: {file_hash(folder / 'hero.safetensors')}"
    assert p.extra_generation_params["Story OneActor eta2"] == "1.0"
    assert p.extra_generation_params["Story OneActor preset"] == "paper"
    assert Settings.from_infotext(p.extra_generation_params).oneactor_eta2 == 1.0
    assert p.cfg_scale == 8.5


def test_two_characters_with_one_base_word_in_a_prompt_are_refused(host):
    oneactor, model, folder = host
    character(folder, name="a")
    character(folder, name="b", seed=2)
    message = refused(oneactor, processing(model, ["<oneactor:a> <oneactor:b> a hobbit"]))
    assert "same base word" in message


def test_another_checkpoint_of_the_same_architecture_warns_in_the_infotext_but_works(host):
    oneactor, model, folder = host
    character(folder)  # made on checkpoint [abcdef1234]
    model.sd_checkpoint_info = types.SimpleNamespace(shorthash="0123456789")
    p = processing(model, ["<oneactor:hero> a hobbit"])
    out, used = sample(oneactor, p)
    assert "was tuned on checkpoint 'tiny.safetensors' [abcdef1234]" in p.extra_generation_params["OneActor warning"]
    model.sd_checkpoint_info = types.SimpleNamespace(shorthash="abcdef1234")
    p = processing(model, ["<oneactor:hero> a hobbit"])
    same, _ = sample(oneactor, p)
    assert "OneActor warning" not in p.extra_generation_params and torch.equal(out, same)


def test_with_consolidation_delta_goes_on_the_base_word_of_each_frames_consolidated_prompt(host, monkeypatch):
    oneactor, model, folder = host
    hero = character(folder)
    pipeline = importlib.import_module("lib_consistency.hosts.pipeline")
    story = "a hobbit <oneactor:hero:0.5> with a red cloak\nwalks in the rain\nsleeps in a log"

    def generate(text):
        p = ToyProcessing(model, prompt="watercolor", steps=STEPS)
        settings = Settings.from_dict({"enabled": True, "story": text, "storyboard": False})
        oneactor.remember_settings(p, settings, None)
        pipeline.before_process(p, settings.to_args())
        p.all_prompts, p.cfg_scale = list(p.prompt), CFG
        oneactor.activate(p)
        p.sample(lambda params: (pipeline.on_cfg_denoiser(params), oneactor.on_cfg_denoiser(params)))
        return p
    tagged, plain = generate(story), generate(story.replace(" <oneactor:hero:0.5>", ""))
    generation = getattr(plain, pipeline.RUN_ATTRIBUTE)
    for frame, text in enumerate(f.text for f in generation.conditioning.token_plan.frames):
        rows = base_rows(model, text, "hobbit")
        assert rows and "<" not in text
        changed = (tagged.seen_conds[0][frame] != plain.seen_conds[0][frame]).any(dim=-1).nonzero().flatten()
        assert changed.tolist() == rows
        expected = plain.seen_conds[0][frame, rows[0]].double() + 0.5 * hero.delta_tar.double()
        assert torch.allclose(tagged.seen_conds[0][frame, rows[0]].double(), expected, atol=1e-5)
    assert torch.equal(tagged.seen_conds[-1], plain.seen_conds[-1])  # step 3 of 3: outside the window


def test_the_tab_shows_the_preview_from_its_file(host, monkeypatch):
    """The Characters tab's preview is a PIL image that names the preview file it was saved as: the hosts' gradio
    output then serves that file instead of writing a temp file (into Forge Neo's 'temp_dir', which a fresh install
    lacks, failing the whole output)."""
    import dataclasses
    import io

    from PIL import Image

    _, _, folder = host
    made = character(folder, name="hero")
    picture = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(picture, format="PNG")
    save_character(folder / "hero.safetensors", dataclasses.replace(made, preview_png=picture.getvalue()))
    create = importlib.import_module("lib_consistency.hosts.oneactor.create")
    tab = importlib.import_module("lib_consistency.hosts.oneactor.tab")
    monkeypatch.setattr(create, "create_character", lambda request: {
        "name": request.name, "file": str(folder / "hero.safetensors"), "seconds": 1.0, "final_loss": 0.25,
        "base_word": request.base_word})
    preview, listing, status = tab.create_from_tab("task(1)", "hero", "a photo of a hobbit", "", "hobbit", 5, False, 1,
                                                   1, 2, 7.0, 256, 256, True)
    saved = folder / "hero.preview.png"
    assert preview.already_saved_as == str(saved) and saved.read_bytes() == picture.getvalue()
    assert "Saved <b>hero</b>" in status and "hero" in listing


# ------------------------------------------------------------------ η2 rows in the host's own UNet call (A1111)

TWO_IMAGES = ["<oneactor:hero> a hobbit in a forest", "a hobbit at sea"]
PAPER = Settings(oneactor_eta2=1.0)  # window 2/3: steps 0 and 1 of 3


def folded_and_second_call(oneactor, model, monkeypatch, **kwargs):
    """The same generation folded and with the second call forced (the testing switch); each with its calls."""
    runs = []
    for forced in (False, True):
        with monkeypatch.context() as patch:
            if forced:
                patch.setenv(eta2_module().SECOND_CALL_ENV, "1")
            calls = []
            out, _ = sample(oneactor, processing(model, TWO_IMAGES), PAPER, calls=calls, **kwargs)
            runs.append((out, calls))
    return runs


def eta2_module():
    return importlib.import_module("lib_consistency.hosts.oneactor.eta2")


def sdxl_conds(model):
    g = torch.Generator().manual_seed(5)
    texts = [parse_prompt(text)[0] for text in TWO_IMAGES]
    cond = {"crossattn": model.cond_stage_model.encode(texts), "vector": torch.randn(2, 8, generator=g)}
    uncond = {"crossattn": model.cond_stage_model.encode(["", ""]), "vector": torch.randn(2, 8, generator=g)}
    return cond, uncond


@pytest.mark.parametrize("path, folded_calls, second_calls", [
    # [cond ; η2 ; uncond] in one call inside the window (steps 0, 1), then the host's own [cond ; uncond]
    ("one call", [6, 6, 4], [4, 2, 4, 2, 4]),
    # batch_cond_uncond off: calls of B rows (cond, η2, uncond): as many calls as the second-call form
    ("calls of B rows", [2, 2, 2] * 2 + [2, 2], [2, 2, 2] * 2 + [2, 2]),
    # the host's per-chunk loop over the cond rows (now cond and η2), then its uncond call
    ("token lengths differ", [4, 2] * 2 + [2, 2], [2, 2, 2] * 2 + [2, 2]),
    ("sdxl dict", [6, 6, 4], [4, 2, 4, 2, 4]),
])
def test_folded_eta2_rows_equal_the_second_call_on_every_host_path(host, monkeypatch, path, folded_calls,
                                                                    second_calls):
    oneactor, model, folder = host
    character(folder)
    from modules import shared
    kwargs = {}
    if path == "calls of B rows":
        monkeypatch.setattr(shared.opts, "batch_cond_uncond", False, raising=False)
    elif path == "token lengths differ":
        empty = model.cond_stage_model.encode(["", ""])
        kwargs["uncond"] = torch.cat([empty, empty], dim=1)  # a negative prompt of two chunks
    elif path == "sdxl dict":
        kwargs["cond"], kwargs["uncond"] = sdxl_conds(model)
    (folded, calls), (second, unfolded_calls) = folded_and_second_call(oneactor, model, monkeypatch, **kwargs)
    assert (calls, unfolded_calls) == (folded_calls, second_calls)
    assert torch.allclose(folded, second, atol=1e-5, rtol=1e-5)
    plain, _ = sample(oneactor, processing(model, TWO_IMAGES), callbacks=False, **kwargs)
    assert not torch.allclose(folded, plain, atol=1e-3)  # the η2 term is there


@pytest.mark.parametrize("path", ["controlnet mark", "padded cond"])
def test_where_folding_is_unsafe_the_second_call_gives_the_result(host, monkeypatch, path):
    oneactor, model, folder = host
    character(folder)
    from modules import shared
    texts = [parse_prompt(text)[0] for text in TWO_IMAGES]
    cond, empty = model.cond_stage_model.encode(texts), model.cond_stage_model.encode(["", ""])
    if path == "controlnet mark":  # sd-webui-controlnet's first context token: +1024 cond, -1024 uncond
        mark = torch.full((2, 1, cond.shape[-1]), 1024.0)
        kwargs = dict(cond=torch.cat([mark, cond], dim=1), uncond=torch.cat([-mark, empty], dim=1))
    else:  # pad_cond_uncond pads a cond shorter than the negative prompt: the η2 rows would be padded too
        monkeypatch.setattr(shared.opts, "pad_cond_uncond", True, raising=False)
        kwargs = dict(uncond=torch.cat([empty, empty], dim=1))
    (unfolded, calls), (second, _) = folded_and_second_call(oneactor, model, monkeypatch, **kwargs)
    assert calls == [4, 2, 4, 2, 4]  # the host's one call, then the η2 rows' own call inside the window
    assert torch.equal(unfolded, second)


def test_refusals_name_edit_models_and_unknown_cond_keys(host):
    eta2 = eta2_module()
    params = types.SimpleNamespace(x=torch.zeros(6, 4, 8, 8), sigma=torch.zeros(6), image_cond=torch.zeros(6, 5, 1, 1),
                                   text_uncond=torch.zeros(2, 77, 8))
    opts = types.SimpleNamespace()
    assert "6 rows for 2 images" in eta2.fold_refusal(params, torch.zeros(2, 77, 8), None, 2, opts)
    params.x, params.sigma, params.image_cond = params.x[:4], params.sigma[:4], params.image_cond[:4]
    assert eta2.fold_refusal(params, torch.zeros(2, 77, 8), None, 2, opts) is None
    cond = {"crossattn": torch.zeros(2, 77, 8), "vector": torch.zeros(2, 4), "guidance": torch.zeros(2)}
    assert "cond keys" in eta2.fold_refusal(params, cond, None, 2, opts)


def test_eta2_zero_outside_the_window_and_skipped_uncond_leave_the_hosts_rows(host, monkeypatch):
    oneactor, model, folder = host
    character(folder)
    plain, _ = sample(oneactor, processing(model, TWO_IMAGES), callbacks=False)
    for settings in (Settings(oneactor_eta2=0.0, oneactor_v=0.0), Settings(oneactor_eta2=1.0, oneactor_window=0.0)):
        calls = []
        out, _ = sample(oneactor, processing(model, TWO_IMAGES), settings, calls=calls)
        assert calls == [4, 4, 4] and torch.equal(out, plain)
    from modules import shared
    monkeypatch.setattr(shared.opts, "skip_early_cond", 0.5)  # steps 0 and 1: cond rows only, no η2 term
    calls = []
    sample(oneactor, processing(model, TWO_IMAGES), PAPER, calls=calls)
    assert calls == [2, 2, 4]


def test_the_story_row_plan_gets_the_folded_rows_as_other_rows(host):
    from lib_consistency.common.row_layout import A1111RowCursor, Role, a1111_step_plan
    from lib_consistency.hosts.pipeline import RUN_ATTRIBUTE
    oneactor, model, folder = host
    character(folder)
    p = processing(model, TWO_IMAGES)
    story = types.SimpleNamespace(sampling=True, cursor=A1111RowCursor(), conditioning=None, batch_contexts=None,
                                  plan=types.SimpleNamespace(batch_frames=lambda i: (0, 1), batch_count=1))
    setattr(p, RUN_ATTRIBUTE, story)
    layouts = []

    class Calls(list):  # the row cursor's UNet pre-hook (hosts/a1111.py): each call takes its rows of the plan
        def append(self, rows):
            layouts.append(story.cursor.next_call(rows))
    sample(oneactor, p, PAPER, calls=Calls(),
           before_denoiser=lambda params: story.cursor.start_step(a1111_step_plan([1, 1], (0, 1))))
    C, U, O = Role.COND, Role.UNCOND, Role.OTHER
    assert [layout.roles for layout in layouts] == [(C, C, O, O, U, U)] * 2 + [(C, C, U, U)]
    assert all(layout.known and layout.frames == (0, 1) * (layout.num_rows // 2) for layout in layouts)


def test_rows_changed_after_ours_stop_the_step_and_leave_nothing_behind(host):
    oneactor, model, folder = host
    character(folder)

    def undo_fold(params):  # another extension after ours drops rows it does not know
        if params.x.shape[0] == 6:
            params.x, params.sigma = torch.cat([params.x[:2], params.x[4:]]), torch.cat([params.sigma[:2],
                                                                                         params.sigma[4:]])
            params.image_cond, params.text_cond = params.image_cond[:4], params.text_cond[:2]
    p = processing(model, TWO_IMAGES)
    with pytest.raises(RuntimeError, match="eta2.*returned 4 rows for 2 images"):
        sample(oneactor, p, PAPER, after_denoiser=undo_fold)
    run = getattr(p, oneactor.ATTRIBUTE)
    assert run.pending is None and run.correction is None
    oneactor.deactivate(p)
    plain, _ = sample(oneactor, processing(model, TWO_IMAGES), callbacks=False)
    again, _ = sample(oneactor, processing(model, ["a hobbit in a forest", "a hobbit at sea"]), PAPER)
    assert torch.equal(again, plain)
