"""Host UI pieces without a WebUI: the accordion against gradio stand-ins, the X/Y/Z axes, the storyboard."""
from __future__ import annotations

import copy
import json
import types
from unittest.mock import patch

import pytest
from PIL import Image

from lib_consistency.one_prompt_one_story.token_plan import CLIP_CONTEXT, T5_DEV_CONTEXT, T5_SCHNELL_CONTEXT
from lib_consistency.hosts import storyboard, ui, xyz
from lib_consistency.settings import PRESETS, Settings, axis_keys, axis_label, infotext_key, option, option_keys
from lib_consistency.story.examples import EXAMPLES

# --- gradio / InputAccordion stand-ins ------------------------------------------------------------------------------


CREATED: list = []  # every stand-in component, in creation order


class FakeEvent:
    """What an event registration returns: ``.then`` chains a follow-up on the same component."""

    def __init__(self, block):
        self.block = block

    def then(self, fn, inputs, outputs, **kwargs):
        self.block.events.append(("then", fn, inputs, outputs, kwargs))
        return self


class FakeBlock:
    """Records constructor arguments and event registrations; usable as a layout context."""

    def __init__(self, value=None, **kwargs):
        self.value, self.kwargs, self.events = value, kwargs, []
        CREATED.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def _event(self, name, fn, inputs, outputs, kwargs):
        self.events.append((name, fn, inputs, outputs, kwargs))
        return FakeEvent(self)

    def change(self, fn, inputs, outputs, **kwargs):
        return self._event("change", fn, inputs, outputs, kwargs)

    def input(self, fn, inputs, outputs, **kwargs):
        return self._event("input", fn, inputs, outputs, kwargs)

    def click(self, fn, inputs, outputs, **kwargs):
        return self._event("click", fn, inputs, outputs, kwargs)


def fake_modules():
    names = ("Checkbox", "Dropdown", "Slider", "Textbox", "HTML", "Accordion", "Row", "Button")
    kinds = {name: type(name, (FakeBlock,), {}) for name in names + ("InputAccordion", "ToolButton")}
    gradio = types.ModuleType("gradio")
    for name in names:
        setattr(gradio, name, kinds[name])
    gradio.update = lambda **kwargs: {"__type__": "update", **kwargs}
    ui_components = types.ModuleType("modules.ui_components")
    ui_components.InputAccordion = kinds["InputAccordion"]
    ui_components.ToolButton = kinds["ToolButton"]
    return {"gradio": gradio, "modules": types.ModuleType("modules"), "modules.ui_components": ui_components}


PREFIX = "script_txt2img_consistent_story_"


class FakeScript:
    def elem_id(self, item):
        return f"script_txt2img_consistent_story_{item}"


@pytest.fixture(scope="module")
def built():
    script = FakeScript()
    CREATED.clear()
    with patch.dict("sys.modules", fake_modules()):
        components = ui.build_ui(script, is_img2img=False)
    return script, components, {b.kwargs.get("elem_id"): b for b in CREATED}


def test_components_follow_option_keys(built):
    script, components, _ = built
    assert len(components) == len(option_keys())
    defaults = Settings()
    for key, component in zip(option_keys(), components):
        opt = option(key)
        assert component.kwargs["label"] == opt.label
        assert component.kwargs["elem_id"] == script.elem_id(key)
        assert component.value == getattr(defaults, key)
        kind = type(component).__name__
        if key == "enabled":
            assert kind == "InputAccordion"
        elif isinstance(getattr(defaults, key), bool):
            assert kind == "Checkbox"
        elif opt.choices:
            assert kind == "Dropdown" and component.kwargs["choices"] == list(opt.choices)
        elif isinstance(getattr(defaults, key), (int, float)):
            assert kind == "Slider"
            assert (component.kwargs["minimum"], component.kwargs["maximum"], component.kwargs["step"]) == \
                (opt.minimum, opt.maximum, opt.step)
        else:
            assert kind == "Textbox"
        assert component.kwargs.get("interactive") is None  # every method is available
    assert components[option_keys().index("story")].kwargs["lines"] == 8


def test_infotext_fields_cover_every_option(built):
    script, components, _ = built
    assert [field for field, _ in script.infotext_fields] == components
    assert [key for _, key in script.infotext_fields] == [infotext_key(k) for k in option_keys()]
    assert script.paste_field_names == [infotext_key(k) for k in option_keys()]
    fields = dict(zip(option_keys(), (key for _, key in script.infotext_fields)))
    # On/off keys read real bools (the API would turn "False" into True); enabled is off when absent.
    assert fields["csa"]({"Story CSA": "False"}) is False and fields["csa"]({"Story CSA": "True"}) is True
    assert fields["csa"]({}) is None and fields["enabled"]({}) is False
    assert not callable(fields["window"])


def test_preset_input_sets_method_controls(built):
    _, components, _ = built
    by_key = dict(zip(option_keys(), components))
    (event, fn, inputs, outputs, _), = by_key["preset"].events[:1]
    assert event == "input" and inputs == [by_key["preset"]]
    assert outputs == [by_key[k] for k in ui.PRESET_KEYS]
    with patch.dict("sys.modules", fake_modules()):
        for name, values in PRESETS.items():
            updates = dict(zip(ui.PRESET_KEYS, fn(name)))
            assert {k: u["value"] for k, u in updates.items() if "value" in u} == values


def test_frames_preview_is_refreshed_by_the_editor_and_by_every_setting_it_shows(built):
    _, components, by_id = built
    by_key = dict(zip(option_keys(), components))
    preview, host = by_id[f"{PREFIX}preview"], by_id[f"{PREFIX}host_values"]
    assert type(preview).__name__ == "HTML" and host.kwargs["visible"] is False and host.value == ui.HOST_MARKER
    refresh = by_id[f"{PREFIX}refresh"]
    assert refresh.kwargs["visible"] is False
    (event, fn, inputs, outputs, kwargs), = refresh.events
    assert (event, fn, inputs, outputs) == ("click", ui.update_preview, components + [host], [preview])
    # story_editor.js fills `host`; only the inputs go back (gradio also passes the outputs' values)
    assert kwargs["_js"] == f"(...a) => consistentStoryHostArgs('txt2img', a).slice(0, {len(components) + 1})"
    assert set(ui.PREVIEW_KEYS) <= set(option_keys()) and "story" not in ui.PREVIEW_KEYS
    for key in option_keys():
        changes = [e for e in by_key[key].events if e[0] == "change"]
        if key in ui.PREVIEW_KEYS:
            assert [e[1:4] + (e[4]["_js"],) for e in changes] == [(fn, inputs, outputs, kwargs["_js"])], key
            assert type(by_key[key]).__name__ in ("Checkbox", "Dropdown", "Slider"), key
        else:
            assert changes == [], key  # typing is debounced in the browser, never a request per keystroke
    example = by_id[f"{PREFIX}example"]
    (event, pick, inputs, outputs, _), then = example.events
    assert (event, inputs, outputs) == ("input", [example], [by_key["story"]])
    assert then[:4] == ("then", fn, components + [host], [preview])
    with patch.dict("sys.modules", fake_modules()):
        assert pick("Long story (16 frames)")["value"] == EXAMPLES["Long story (16 frames)"]
        assert "value" not in pick("no such example")
    assert type(by_id[f"{PREFIX}load"]).__name__ == type(by_id[f"{PREFIX}save"]).__name__ == "ToolButton"
    assert by_id[f"{PREFIX}load"].events == by_id[f"{PREFIX}save"].events == []  # the browser does it all


def host_values(prompt, seed):
    return json.dumps({"consistent_story_host": True, "prompt": prompt, "seed": seed})


def test_update_preview_reads_the_prompt_and_seed_the_editor_sends():
    values = Settings(story="Bob: a man\n---\n[Bob] walks # One\n[Bob] runs", consolidate=False,
                      reweighting="none", ipca=False, seed_mode="sequential").to_args()
    with patch.object(ui, "host_tokenizers", lambda: ([("CLIP-L", str.split)], CLIP_CONTEXT)):
        panel = ui.update_preview(*values, host_values("ink", 41))
        assert "ink, a man, walks" in panel and "<td>41</td>" in panel and "<td>42</td>" in panel
        assert 'data-line="4"' in panel and 'data-count="4" data-limit="75"' in panel
        for host in (ui.HOST_MARKER, "", None, "[1]", "{bad json", json.dumps({"prompt": "x"})):
            panel = ui.update_preview(*values, host)  # no host values (yet): empty style, random seed
            assert "a man, walks" in panel and "x, a man" not in panel and "<td>random</td>" in panel, host
    with patch.object(ui, "preview_panel", side_effect=RuntimeError("boom")):
        assert "could not build the frames preview: RuntimeError(&#x27;boom&#x27;)" in \
            ui.update_preview(*values, host_values("ink", 1))


class Chunk:
    def __init__(self, content, multipliers=None, fixes=()):
        self.tokens = [49406] + list(content) + [49407] * (76 - len(content))
        self.multipliers = [1.0] + list(multipliers or [1.0] * len(content)) + [1.0] * (76 - len(content))
        self.fixes = list(fixes)


def test_host_tokenizers_read_tokenize_line_of_every_clip_encoder():

    def engine(scale):
        def tokenize_line(text):
            ids = [len(w) * scale for w in text.split()]
            return [Chunk(ids[i:i + 75]) for i in range(0, max(len(ids), 1), 75)], len(ids)
        return types.SimpleNamespace(tokenize_line=tokenize_line)
    clip, big_g = engine(1), engine(2)
    shared = types.SimpleNamespace(sd_model=types.SimpleNamespace(cond_stage_model=clip))
    modules = {**fake_modules(), "modules.shared": shared}
    modules["modules"].shared = shared
    with patch.dict("sys.modules", modules):
        ((name, tokenize),), context = ui.host_tokenizers()
        assert context is CLIP_CONTEXT
        assert name == "CLIP" and tokenize("a red fox") == [(1, 1.0, None), (3, 1.0, None), (3, 1.0, None)]
        assert len(tokenize("word " * 80)) == 80  # two chunks, padding of the last one not counted
        shared.sd_model = types.SimpleNamespace(conditioner=types.SimpleNamespace(embedders=[clip, big_g]))  # SDXL
        assert [(n, t("a fox")) for n, t in ui.host_tokenizers()[0]] == [
            ("CLIP-L", [(1, 1.0, None), (3, 1.0, None)]), ("OpenCLIP bigG", [(2, 1.0, None), (6, 1.0, None)])]
        shared.sd_model = types.SimpleNamespace(text_processing_engine_l=clip, text_processing_engine_g=big_g)  # Forge
        assert [n for n, _ in ui.host_tokenizers()[0]] == ["CLIP-L", "OpenCLIP bigG"]
        shared.sd_model = None
        assert ui.host_tokenizers() == ([], CLIP_CONTEXT)


def test_host_tokenizers_of_a_flux_checkpoint_are_t5s_against_its_budget():
    from tests.flux_standin import FluxBlocks

    class T5Chunk:
        def __init__(self, ids):  # content, </s> (1), padding (0) to 256 rows
            self.tokens = list(ids) + [1] + [0] * (255 - len(ids))
            self.multipliers = [1.0] * 256

    engine = types.SimpleNamespace(id_end=1, tokenize_line=lambda text: (
        [T5Chunk([len(w) + 5 for w in text.split()])], len(text.split()) + 1))
    transformer = FluxBlocks(8, 2, 8, 1, 1)
    unet = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=transformer))
    shared = types.SimpleNamespace(sd_model=types.SimpleNamespace(
        text_processing_engine_t5=engine, text_processing_engine_l=types.SimpleNamespace(tokenize_line=None),
        forge_objects=types.SimpleNamespace(unet=unet)))
    modules = {**fake_modules(), "modules.shared": shared}
    modules["modules"].shared = shared
    with patch.dict("sys.modules", modules):
        ((name, tokenize),), context = ui.host_tokenizers()
        assert name == "T5" and context is T5_DEV_CONTEXT
        assert tokenize("a red fox") == [(6, 1.0, None), (8, 1.0, None), (8, 1.0, None)]  # up to </s>
        transformer.guidance_embed = False  # schnell
        assert ui.host_tokenizers()[1] is T5_SCHNELL_CONTEXT


def test_host_tokenizer_items_carry_emphasis_and_embeddings():
    from lib_consistency.hosts.tokenizers import token_items
    embedding = types.SimpleNamespace(name="hero-style", vectors=2)
    chunk = Chunk([5, 0, 0, 7], multipliers=[1.0, 1.1, 1.1, 1.0], fixes=[types.SimpleNamespace(offset=1,
                                                                                                embedding=embedding)])
    tokenize = token_items(types.SimpleNamespace(tokenize_line=lambda text: ([chunk], 4)))
    assert tokenize("x") == [(5, 1.0, None), (0, 1.1, "hero-style"), (0, 1.1, "hero-style"), (7, 1.0, None)]


def test_infotext_paste_restores_the_style_prompt():
    params = {"Prompt": "watercolor, a fox, in the snow", "Story Style": "watercolor"}
    ui.on_infotext_pasted("", params)
    assert params["Prompt"] == "watercolor"
    params = {"Prompt": "a cat"}
    ui.on_infotext_pasted("", params)
    assert params == {"Prompt": "a cat"}


# --- X/Y/Z -----------------------------------------------------------------------------------------------------------


class FakeAxisOption:
    def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
        self.label, self.type, self.apply, self.confirm, self.choices = label, type, apply, confirm, choices


def fake_xyz():
    return types.SimpleNamespace(AxisOption=FakeAxisOption, axis_options=[FakeAxisOption("Nothing", str, None)])


def test_xyz_axes_labels_types_and_choices():
    module = fake_xyz()
    assert xyz.register_xyz_axes(module) == len(axis_keys())
    axes = {opt.label: opt for opt in module.axis_options[1:]}
    assert list(axes) == [axis_label(k) for k in axis_keys()]
    defaults = Settings()
    for key in axis_keys():
        axis, default = axes[axis_label(key)], getattr(defaults, key)
        if isinstance(default, bool):
            assert axis.type is str and axis.choices() == ["True", "False"]
        elif option(key).choices:
            assert axis.type is str and axis.choices() == list(option(key).choices)
        else:
            assert axis.type is type(default) and axis.choices is None
    assert xyz.register_xyz_axes(module) == 0 and len(module.axis_options) == 1 + len(axis_keys())


def test_xyz_apply_does_not_leak_between_cells():
    module = fake_xyz()
    xyz.register_xyz_axes(module)
    axes = {opt.label: opt for opt in module.axis_options}
    p = types.SimpleNamespace(consistent_story_overrides={"window": 4})
    cell = copy.copy(p)
    axes["[Story] CSA rate"].apply(cell, 0.7999999999999999, [0.8])
    axes["[Story] Preset"].apply(cell, "Combined", ["Combined"])
    assert cell.consistent_story_overrides == {"window": 4, "csa_rate": 0.8, "preset": "Combined"}
    assert p.consistent_story_overrides == {"window": 4}
    bare = types.SimpleNamespace()
    axes["[Story] CSA"].apply(copy.copy(bare), "True", ["True"])
    assert not hasattr(bare, "consistent_story_overrides")
    settings = Settings().with_preset(cell.consistent_story_overrides["preset"])
    assert settings.with_value("csa_rate", cell.consistent_story_overrides["csa_rate"]).csa_rate == 0.8


def test_xyz_confirm_refuses_bad_values():
    module = fake_xyz()
    xyz.register_xyz_axes(module)
    axes = {opt.label: opt for opt in module.axis_options}
    axes["[Story] CSA rate"].confirm(None, [0.0, 0.9999999999999999])
    axes["[Story] CSA"].confirm(None, ["True", "False"])
    with pytest.raises(ValueError, match=r"\[Story\] CSA rate: 1.5 is out of range"):
        axes["[Story] CSA rate"].confirm(None, [0.5, 1.5])
    with pytest.raises(ValueError, match="not one of svr, npr, none"):
        axes["[Story] Reweighting"].confirm(None, ["svd"])


# --- storyboard -------------------------------------------------------------------------------------------------------

COLOURS = [(255, 0, 0), (0, 160, 0), (0, 0, 255), (200, 200, 0), (0, 200, 200), (200, 0, 200), (90, 90, 90)]


def solid(colour, size=(96, 64)):
    return Image.new("RGB", size, colour)


def panel_centres(board, count, panel_size):
    """Panel centres derived from the board size: equal margins around panels of equal cells."""
    columns = storyboard.storyboard_columns(count)
    rows = -(-count // columns)
    margin = (board.width - columns * panel_size[0]) // (columns + 1)
    cell_h = (board.height - margin) // rows
    return [(margin + (i % columns) * (panel_size[0] + margin) + panel_size[0] // 2,
             margin + (i // columns) * cell_h + panel_size[1] // 2) for i in range(count)], cell_h


@pytest.mark.parametrize("count, columns, rows", [(1, 1, 1), (3, 3, 1), (4, 4, 1), (5, 4, 2), (7, 4, 2),
                                                   (16, 4, 4), (17, 5, 4)])
def test_storyboard_strip_and_grid_shapes(count, columns, rows):
    board = storyboard.compose_storyboard([solid(COLOURS[i % 7]) for i in range(count)], [""] * count)
    margin = (board.width - columns * 96) // (columns + 1)
    assert board.width == columns * 96 + (columns + 1) * margin
    assert board.height == rows * 64 + (rows + 1) * margin  # no captions: no caption band
    assert storyboard.storyboard_columns(count) == columns


@pytest.mark.parametrize("count", [3, 7])
def test_storyboard_panels_in_reading_order(count):
    board = storyboard.compose_storyboard([solid(c) for c in COLOURS[:count]], [f"frame {i}" for i in range(count)])
    centres, _ = panel_centres(board, count, (96, 64))
    assert [board.getpixel(c) for c in centres] == COLOURS[:count]
    assert board.getpixel((1, 1)) == (255, 255, 255)


def test_storyboard_captions_are_drawn_under_their_panel():
    frames = [solid(c) for c in COLOURS[:2]]
    bare = storyboard.compose_storyboard(frames, ["", ""])
    board = storyboard.compose_storyboard(frames, ["", "the fox wakes up in a snowy hollow and stretches"])
    assert board.height > bare.height
    centres, cell_h = panel_centres(board, 2, (96, 64))
    (x0, y0), (x1, _) = centres

    def ink(x):  # non-white pixels in the caption band under the panel centred at x
        band = board.crop((x - 48, y0 + 32, x + 48, cell_h))
        return sum(n for n, colour in band.getcolors(band.width * band.height) if colour != (255, 255, 255))

    assert ink(x1) > 0 and ink(x0) == 0


def test_storyboard_resizes_frames_to_the_first_size():
    frames = [solid(COLOURS[0]), solid(COLOURS[1], (48, 128)), Image.new("RGBA", (200, 100), (*COLOURS[2], 255))]
    board = storyboard.compose_storyboard(frames, ["a", "b", "c"])
    centres, _ = panel_centres(board, 3, (96, 64))
    assert [board.getpixel(c) for c in centres] == COLOURS[:3]
    assert board.mode == "RGB"
    with pytest.raises(ValueError):
        storyboard.compose_storyboard(frames, ["a"])
    with pytest.raises(ValueError):
        storyboard.compose_storyboard([], [])


def test_importing_the_entry_file_registers_the_axes_without_any_ui_callback(monkeypatch):
    """With --nowebui the API reads the xyz axes before ``on_before_ui`` runs: importing our entry file (which the
    host does right after loading the xyz script) must already have added them."""
    import pathlib
    import runpy

    from tests.fake_webui import install_stub_modules
    mods = install_stub_modules(monkeypatch)
    registered = []
    for name in ("on_cfg_denoiser", "on_cfg_denoised", "on_cfg_after_cfg", "on_ui_settings", "on_ui_tabs",
                 "on_app_started", "on_before_ui", "on_infotext_pasted", "on_script_unloaded"):
        setattr(mods["modules.script_callbacks"], name, lambda callback, name=name: registered.append(name))
    module = fake_xyz()
    xyz_class = type("Script", (), {"__module__": "xyz_grid.py"})
    mods["modules.scripts"].scripts_data = [types.SimpleNamespace(script_class=xyz_class, module=module)]
    entry = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "consistent_story.py"
    runpy.run_path(str(entry))
    assert [opt.label for opt in module.axis_options[1:]] == [axis_label(k) for k in axis_keys()]
    assert "on_before_ui" in registered  # still registered, and a second registration adds nothing
    from lib_consistency.hosts import xyz as host_xyz
    assert host_xyz.register_xyz_axes(module) == 0
