"""The Consistent Story accordion, generated from the Settings metadata (A1111 gradio 3.41 and Forge gradio 4.40).

``build_ui`` returns one component per ``option_keys()`` entry, in that order: the positional API contract. It is
called once per tab and again by the API inside a throwaway ``gr.Blocks`` (hosts.md §1.3), so it registers no host
callbacks, wires events between its own components only, and keeps no state besides ``script.infotext_fields`` /
``script.paste_field_names``. The story editor's browser side is ``javascript/story_editor.js``. Gradio and
``modules`` are imported inside the functions that need them, so this module imports without a WebUI.
"""
from __future__ import annotations

import html
import json
from contextlib import nullcontext
from typing import Any

from ..settings import INFOTEXT_PREFIX, ONEACTOR_PRESETS, PRESETS, Settings, infotext_key, option, option_keys
from ..story.examples import EXAMPLES
from ..story.preview import preview_panel
from ..one_prompt_one_story.token_plan import CLIP_CONTEXT, TextContext
from .flux import flux_model, flux_text_context
from .tokenizers import model_tokenizers, t5_tokenizer

GROUPS = ("general", "1Prompt1Story", "StoryDiffusion", "StorySync", "OneActor")  # the method groups of Option.group
UNAVAILABLE_GROUPS: tuple[str, ...] = ()  # groups shown but not interactive (a method not available yet)
STYLE_INFOTEXT_KEY = INFOTEXT_PREFIX + "Style"  # the user's own prompt (style), written by the pipeline
SPANS_INFOTEXT_KEY = INFOTEXT_PREFIX + "Token spans"  # 1Prompt1Story token positions, written by the pipeline
PRESET_KEYS = tuple(k for k in option_keys() if any(k in values for values in PRESETS.values()))
ONEACTOR_PRESET_KEYS = tuple(k for k in option_keys() if any(k in v for v in ONEACTOR_PRESETS.values()))
STORY_PLACEHOLDER = (
    "// one character: who the story is about, then one frame per line\n"
    "a watercolor fox with a white-tipped tail\n"
    "walking through a snowy forest # Morning   (' # ' starts the caption)\n"
    "[NC] an empty frozen lake at dusk   ([NC]: no character)\n"
    "// or several: 'Name: description' lines, '---', then frames tagged [Name]\n"
    "Bob: a tall man with red hair\n"
    "---\n"
    "[Bob] reads a letter # The letter")
_DEFAULTS = Settings()
HOST_MARKER = '{"consistent_story_host": true}'  # the hidden box story_editor.js fills with the prompt and seed
# Settings that change the preview (frames, seeds, batches, sharing, tokens) without typing: their change refreshes it.
# reweighting / ipca: only to clear the message that they need 'Consolidate'.
PREVIEW_KEYS = ("preset", "frames_per_batch", "seed_mode", "consolidate", "window", "csa", "reference_frames",
                "masked_sharing", "reweighting", "ipca")
_EXTRA_KWARGS = {"story": dict(lines=8, placeholder=STORY_PLACEHOLDER)}


class InfotextBool(str):
    """An infotext key that reads its value as a real bool (the hosts call a callable key with the parsed params).

    Both hosts convert a plain key's text with the component's type, and the API path (``Api.apply_infotext``) turns
    "False" into ``bool("False") == True``. Being a ``str`` equal to the key keeps it matching
    ``paste_field_names`` ("Send to img2img"). ``absent`` is returned when the key is missing (None: leave as is).
    """

    def __new__(cls, key: str, absent: bool | None = None) -> "InfotextBool":
        self = super().__new__(cls, key)
        self.absent = absent
        return self

    def __call__(self, params: dict[str, Any]) -> bool | None:
        value = params.get(str(self))
        return self.absent if value is None else str(value).strip().lower() == "true"


def build_ui(script: Any, is_img2img: bool) -> list:
    """Build the accordion inside the current gradio context; returns the components in ``option_keys()`` order."""
    import gradio as gr
    from modules.ui_components import InputAccordion, ToolButton

    enabled = InputAccordion(_DEFAULTS.enabled, label=option("enabled").label, elem_id=script.elem_id("enabled"))
    controls: dict[str, Any] = {"enabled": enabled}
    with enabled:
        for group in GROUPS:
            unavailable = group in UNAVAILABLE_GROUPS
            label = f"{group} (not available yet)" if unavailable else group
            with nullcontext() if group == "general" else \
                    gr.Accordion(label=label, open=False, elem_id=script.elem_id(f"group_{group}")):
                for key in (k for k in option_keys() if option(k).group == group and k != "enabled"):
                    if key == "story":
                        with gr.Row(elem_id=script.elem_id("story_tools")):
                            example = gr.Dropdown(label="Example stories", choices=list(EXAMPLES), value=None,
                                                  elem_id=script.elem_id("example"), scale=4)
                            # no server event: javascript/story_editor.js reads and writes the file in the browser
                            ToolButton("\U0001F4C2", elem_id=script.elem_id("load"),
                                       tooltip="Load a story from a .txt or .json file")
                            ToolButton("\U0001F4BE", elem_id=script.elem_id("save"),
                                       tooltip="Save the story as a file (.json for a JSON story, else .txt)")
                    controls[key] = _control(gr, script, key, interactive=False if unavailable else None)
                    if key == "story":
                        preview = gr.HTML(value="", elem_id=script.elem_id("preview"))
                        host = gr.Textbox(value=HOST_MARKER, visible=False, elem_id=script.elem_id("host_values"))
                        refresh = gr.Button(visible=False, elem_id=script.elem_id("refresh"))

    controls["preset"].input(fn=preset_updates, inputs=[controls["preset"]],
                             outputs=[controls[k] for k in PRESET_KEYS], show_progress=False)
    controls["oneactor_preset"].input(fn=oneactor_preset_updates, inputs=[controls["oneactor_preset"]],
                                      outputs=[controls[k] for k in ONEACTOR_PRESET_KEYS], show_progress=False)

    # The frames preview: javascript/story_editor.js clicks `refresh` (debounced) when the story, the WebUI's
    # prompt or seed box change, and its consistentStoryHostArgs fills `host` with those two values (they are the
    # host's components, not ours: reading them in the browser needs no reference across gradio Blocks, which the
    # API's throwaway ui() call would not have). Settings with fixed values (checkboxes, sliders, dropdowns) update
    # it on their own change.
    inputs = [controls[k] for k in option_keys()] + [host]
    # gradio hands the js function the inputs' and the outputs' values and sends what it returns to the server as
    # the inputs: only the inputs are returned. (gradio 4.40's client logs "Too many arguments provided for the
    # endpoint" for every event with inputs fired from the page, the WebUI's own token counter included.)
    preview_event = dict(fn=update_preview, inputs=inputs, outputs=[preview], show_progress=False,
                         _js=f"(...a) => consistentStoryHostArgs('{_tab(is_img2img)}', a).slice(0, {len(inputs)})")
    refresh.click(**preview_event)
    for key in PREVIEW_KEYS:
        controls[key].change(**preview_event)
    example.input(fn=example_story, inputs=[example], outputs=[controls["story"]], show_progress=False) \
        .then(**preview_event)

    script.infotext_fields = [(controls[k], _infotext_field(k)) for k in option_keys()]
    script.paste_field_names = [infotext_key(k) for k in option_keys()]
    return [controls[k] for k in option_keys()]


def _tab(is_img2img: bool) -> str:
    return "img2img" if is_img2img else "txt2img"


def _control(gr: Any, script: Any, key: str, interactive: bool | None = None) -> Any:
    """One component for one option: bool -> Checkbox, choices -> Dropdown, number -> Slider, text -> Textbox."""
    opt, default = option(key), getattr(_DEFAULTS, key)
    kwargs = dict(value=default, label=opt.label, elem_id=script.elem_id(key), info=opt.info or None,
                  interactive=interactive, **_EXTRA_KWARGS.get(key, {}))
    if isinstance(default, bool):
        return gr.Checkbox(**kwargs)
    if opt.choices:
        return gr.Dropdown(choices=list(opt.choices), **kwargs)
    if isinstance(default, (int, float)):
        return gr.Slider(minimum=opt.minimum, maximum=opt.maximum, step=opt.step, **kwargs)
    return gr.Textbox(**kwargs)


def _infotext_field(key: str) -> str:
    if not isinstance(getattr(_DEFAULTS, key), bool):
        return infotext_key(key)
    # An infotext without our keys switches the extension off instead of leaving it on.
    return InfotextBool(infotext_key(key), absent=False if key == "enabled" else None)


def preset_updates(name: str) -> list:
    """gradio updates for the ``PRESET_KEYS`` controls: the preset's values; no change for keys it leaves alone."""
    import gradio as gr

    values = PRESETS.get(name, {})
    return [gr.update(value=values[k]) if k in values else gr.update() for k in PRESET_KEYS]


def oneactor_preset_updates(name: str) -> list:
    """gradio updates for the ``ONEACTOR_PRESET_KEYS`` controls (``custom`` changes nothing)."""
    import gradio as gr

    values = ONEACTOR_PRESETS.get(name, {})
    return [gr.update(value=values[k]) if k in values else gr.update() for k in ONEACTOR_PRESET_KEYS]


def update_preview(*values: Any) -> str:
    """The frames preview for the accordion's values (``option_keys()`` order) and the host values JSON that
    javascript/story_editor.js put last (the WebUI's prompt and seed). Never raises: gradio would only show
    "Error"; a failure is shown in the panel instead."""
    *settings_values, host = values
    try:
        try:
            hosted = json.loads(host)
        except (TypeError, ValueError):
            hosted = {}
        hosted = hosted if isinstance(hosted, dict) and hosted.get("consistent_story_host") is True else {}
        prompt = hosted.get("prompt")
        return preview_panel(settings_values, prompt if isinstance(prompt, str) else "", hosted.get("seed", -1),
                             *host_tokenizers())
    except Exception as error:  # a bug of ours or a host change: say so where the preview would be
        return f"<p>&#9888; Consistent Story could not build the frames preview: {html.escape(repr(error))}</p>"


def example_story(name: str) -> Any:
    """gradio update of the story box to the example called ``name`` (unknown names change nothing)."""
    import gradio as gr

    return gr.update(value=EXAMPLES[name]) if name in EXAMPLES else gr.update()


def host_tokenizers() -> tuple[list, TextContext]:
    """(encoder name, tokenizer) of the loaded model's CLIP encoders (``tokenizers.model_tokenizers``), or for a
    Flux checkpoint its T5 tokenizer, which the transformer reads; empty without a WebUI or a model. And the text
    context the counts are against."""
    try:
        from modules import shared
    except ImportError:
        return [], CLIP_CONTEXT
    model = getattr(shared, "sd_model", None)
    flux = flux_model(shared)
    tokenize = t5_tokenizer(model) if flux is not None else None
    if tokenize is not None:
        return [("T5", tokenize)], flux_text_context(flux)
    return model_tokenizers(model), CLIP_CONTEXT


def on_infotext_pasted(infotext: str, params: dict[str, Any]) -> None:
    """Put the user's style prompt back into the prompt box: a frame's infotext carries its expanded prompt."""
    style = params.get(STYLE_INFOTEXT_KEY)
    if style is not None:
        params["Prompt"] = style
