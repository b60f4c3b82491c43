"""The Consistent Story accordion, generated from the Settings metadata (A1111 gradio 3.41 and Forge gradio 4.40).

``build_ui`` returns one component per ``option_keys()`` entry, in that order: the positional API contract. It is
called once per tab and again by the API inside a throwaway ``gr.Blocks`` (hosts.md §1.3), so it registers no host
callbacks and keeps no state besides ``script.infotext_fields`` / ``script.paste_field_names``. Gradio and
``modules`` are imported inside the functions that need them, so this module imports without a WebUI.
"""
from __future__ import annotations

import html
from contextlib import nullcontext
from typing import Any, Sequence

from ..settings import INFOTEXT_PREFIX, ONEACTOR_PRESETS, PRESETS, Settings, infotext_key, option, option_keys
from ..story import StoryError, parse_story
from ..token_plan import TokenBudgetError, Tokenizer, plan_tokens, verify_token_plan
from .tokenizers import model_tokenizers

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
    from modules.ui_components import InputAccordion

    enabled = InputAccordion(_DEFAULTS.enabled, label=option("enabled").label, elem_id=script.elem_id("enabled"))
    controls: dict[str, Any] = {"enabled": enabled}
    with enabled:
        for group in GROUPS:
            unavailable = group in UNAVAILABLE_GROUPS
            label = f"{group} (not available yet)" if unavailable else group
            with nullcontext() if group == "general" else \
                    gr.Accordion(label=label, open=False, elem_id=script.elem_id(f"group_{group}")):
                for key in (k for k in option_keys() if option(k).group == group and k != "enabled"):
                    controls[key] = _control(gr, script, key, interactive=False if unavailable else None)
                    if key == "story":
                        status = gr.HTML(value="", elem_id=script.elem_id("story_status"))

    controls["preset"].input(fn=preset_updates, inputs=[controls["preset"]],
                             outputs=[controls[k] for k in PRESET_KEYS], show_progress=False)
    controls["oneactor_preset"].input(fn=oneactor_preset_updates, inputs=[controls["oneactor_preset"]],
                                      outputs=[controls[k] for k in ONEACTOR_PRESET_KEYS], show_progress=False)

    def update_status(text: str, consolidate: bool, window: float) -> str:
        return story_status(text, consolidate, window, host_tokenizers())

    status_inputs = [controls["story"], controls["consolidate"], controls["window"]]
    for component in status_inputs:
        component.change(fn=update_status, inputs=status_inputs, outputs=[status], show_progress=False)

    script.infotext_fields = [(controls[k], _infotext_field(k)) for k in option_keys()]
    script.paste_field_names = [infotext_key(k) for k in option_keys()]
    return [controls[k] for k in option_keys()]


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


def story_status(text: str, consolidate: bool, window: float, tokenizers: Sequence[tuple[str, Tokenizer]]) -> str:
    """The HTML line under the story box: parse errors with their line, else frame count and token budget.

    ``tokenizers``: the model's (encoder name, tokenizer) pairs, CLIP-L first; the budget is counted with the
    first and the spans verified with each, as generation does (the style text is added when generating)."""
    if not text or not text.strip():
        return ""
    try:
        story = parse_story(text)
    except StoryError as e:
        return f"<p>&#9888; {html.escape(str(e))}</p>"
    frames = len(story.frames)
    line = f"{frames} frame{'s' * (frames != 1)}"
    if not story.shorthand:
        line += f", {len(story.characters)} character{'s' * (len(story.characters) != 1)}"
    if consolidate:
        if frames < 2:
            return f"<p>&#9888; {html.escape(line)}; consolidation needs at least 2 frames: add a frame or turn " \
                   f"'Consolidate' off</p>"
        if not tokenizers:
            line += "; the token budget appears once a model is loaded"
        else:
            try:
                plan = plan_tokens(story.identity_prompt, [f.prompt for f in story.frames], tokenizers[0][1],
                                   window=int(window))
                for name, tokenize in tokenizers:
                    verify_token_plan(plan, tokenize, name)
                line += "; " + plan.budget_line()
            except TokenBudgetError as e:
                return f"<p>&#9888; {html.escape(line)}; {html.escape(str(e))}</p>"
    return f"<p>{html.escape(line)}</p>"


def host_tokenizers() -> list:
    """(encoder name, tokenizer) of the loaded model's CLIP encoders (``tokenizers.model_tokenizers``); empty
    without a WebUI or a model."""
    try:
        from modules import shared
    except ImportError:
        return []
    return model_tokenizers(getattr(shared, "sd_model", None))


def on_infotext_pasted(infotext: str, params: dict[str, Any]) -> None:
    """Put the user's style prompt back into the prompt box: a frame's infotext carries its expanded prompt."""
    style = params.get(STYLE_INFOTEXT_KEY)
    if style is not None:
        params["Prompt"] = style
