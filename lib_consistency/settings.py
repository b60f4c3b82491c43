"""One frozen, validated Settings object: the single source of every user-facing name.

Each field of ``Settings`` carries an ``Option`` (its metadata) that gives its UI label, its short name (infotext
key ``Story <name>``, X/Y/Z axis ``[Story] <name>``), its range or choices and its method group. The field name is
the API key (snake_case) and the field order is the UI order of the positional script arguments: append new
options at the end only, so saved API calls and infotexts keep working.

Settings are built once per generation from the positional argument list (UI order), from a dict keyed by API
keys, or from a parsed infotext. A preset is a starting point: a dict that omits a per-method key gets the
preset's value; explicit keys override it. Every invalid value raises ``SettingsError`` naming the field, the
value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

INFOTEXT_PREFIX = "Story "
AXIS_PREFIX = "[Story] "
DEFAULT_PRESET = "1Prompt1Story"
MAX_FRAMES_PER_BATCH = 64


class SettingsError(ValueError):
    """Invalid setting; ``field`` is the API key (or infotext key) it concerns."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"Consistent Story setting '{field_name}': {message}")
        self.field = field_name


@dataclass(frozen=True)
class Option:
    name: str                      # short name: infotext key "Story <name>", axis "[Story] <name>"
    label: str                     # UI label
    group: str                     # "general", "1Prompt1Story", "StoryDiffusion", "StorySync", "OneActor"
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()
    axis: bool = True              # offered as an X/Y/Z plot axis
    info: str = ""


def _option(default: Any, name: str, label: str, group: str, **kwargs: Any) -> Any:
    return field(default=default, metadata={"option": Option(name, label, group, **kwargs)})


PRESETS: dict[str, dict[str, Any]] = {
    "1Prompt1Story": dict(consolidate=True, reweighting="svr", ipca=True, csa=False, masked_sharing=False),
    "StoryDiffusion": dict(consolidate=False, reweighting="none", ipca=False, csa=True, csa_rate=0.5,
                           csa_schedule="official", masked_sharing=False),
    "StorySync": dict(consolidate=False, reweighting="none", ipca=False, csa=True, csa_rate=1.0,
                      csa_schedule="always", csa_layers="up", reference_frames=2, masked_sharing=True),
    "Combined": dict(consolidate=True, reweighting="svr", ipca=True, csa=True, csa_rate=0.5,
                     csa_schedule="official", masked_sharing=False),
    "Custom": {},
}

# OneActor's own presets (methods.md §6.4, §6.6): they fill the OneActor keys only, whatever the story preset is.
ONEACTOR_PRESETS: dict[str, dict[str, Any]] = {
    "fast": dict(oneactor_eta2=0.0, oneactor_cfg=0.0, oneactor_v=0.8, oneactor_window=0.67),
    "paper": dict(oneactor_eta2=1.0, oneactor_cfg=8.5, oneactor_v=0.8, oneactor_window=0.67),
    "custom": {},
}


@dataclass(frozen=True)
class Settings:
    # --- general ---
    enabled: bool = _option(False, "Enabled", "Consistent Story", "general")
    preset: str = _option(DEFAULT_PRESET, "Preset", "Preset", "general", choices=tuple(PRESETS),
                          info="sets the method values below; Custom keeps them as they are")
    story: str = _option("", "Text", "Story", "general", axis=False,
                         info="identity line then one frame per line, or 'Name: description' lines, '---', frames")
    frames_per_batch: int = _option(0, "Frames per batch", "Frames per batch (0 = all in one batch)", "general",
                                    minimum=0, maximum=MAX_FRAMES_PER_BATCH, step=1)
    seed_mode: str = _option("same", "Seed mode", "Seed mode", "general", choices=("same", "sequential"),
                             info="same: every frame starts from the same noise (the methods' default)")
    storyboard: bool = _option(True, "Storyboard", "Add a storyboard image", "general")
    # --- One-Prompt-One-Story ---
    consolidate: bool = _option(True, "Consolidate", "Consolidate the story into one prompt", "1Prompt1Story")
    reweighting: str = _option("svr", "Reweighting", "Frame reweighting", "1Prompt1Story",
                               choices=("svr", "npr", "none"))
    window: int = _option(10, "Window", "Most frames per prompt window", "1Prompt1Story",
                          minimum=1, maximum=100, step=1)
    svr_enhance_alpha: float = _option(0.01, "SVR enhance alpha", "SVR+ alpha", "1Prompt1Story",
                                       minimum=0.0, maximum=0.1, step=0.001)
    svr_enhance_beta: float = _option(1.0, "SVR enhance beta", "SVR+ beta", "1Prompt1Story",
                                      minimum=0.0, maximum=3.0, step=0.01)
    svr_suppress_alpha: float = _option(0.01, "SVR suppress alpha", "SVR- alpha", "1Prompt1Story",
                                        minimum=0.0, maximum=0.5, step=0.001)
    svr_suppress_beta: float = _option(0.05, "SVR suppress beta", "SVR- beta", "1Prompt1Story",
                                       minimum=0.0, maximum=1.0, step=0.01)
    eot_mode: str = _option("svd", "EOT mode", "EOT tokens", "1Prompt1Story", choices=("svd", "scale"),
                            info="svd: EOT block reweighted with each frame; scale: x0.9 per call (benchmark)")
    npr_enhance: float = _option(2.0, "NPR enhance", "NPR current-frame scale", "1Prompt1Story",
                                 minimum=0.0, maximum=4.0, step=0.05)
    npr_suppress: float = _option(0.5, "NPR suppress", "NPR other-frame scale", "1Prompt1Story",
                                  minimum=0.0, maximum=2.0, step=0.05)
    ipca: bool = _option(True, "IPCA", "Identity-preserving cross-attention", "1Prompt1Story")
    ipca_dropout: float = _option(0.0, "IPCA dropout", "IPCA dropout", "1Prompt1Story",
                                  minimum=0.0, maximum=1.0, step=0.05)
    # --- StoryDiffusion consistent self-attention ---
    csa: bool = _option(False, "CSA", "Consistent self-attention", "StoryDiffusion")
    csa_rate: float = _option(0.5, "CSA rate", "Sampling rate", "StoryDiffusion", minimum=0.0, maximum=1.0, step=0.05)
    csa_layers: str = _option("up_low_res", "CSA layers", "Layers", "StoryDiffusion",
                              choices=("up_low_res", "up", "all"))
    csa_schedule: str = _option("official", "CSA schedule", "Schedule", "StoryDiffusion",
                                choices=("official", "always"),
                                info="official: plain first step, then skip sharing with p 0.3 / 0.1")
    reference_frames: int = _option(0, "Reference frames", "Reference frames (0 = the first batch)", "StoryDiffusion",
                                    minimum=0, maximum=16, step=1)
    bank_on_cpu: bool = _option(False, "Bank on CPU", "Keep the reference bank on the CPU", "StoryDiffusion")
    # --- StorySync ---
    masked_sharing: bool = _option(False, "Masked sharing", "Share only subject tokens", "StorySync")
    mask_dropout: float = _option(0.5, "Mask dropout", "Mask dropout", "StorySync", minimum=0.0, maximum=1.0, step=0.05)
    rfh_strength: float = _option(0.3, "RFH strength", "Regional feature harmonization", "StorySync",
                                  minimum=0.0, maximum=1.0, step=0.05)
    bli_strength: float = _option(0.7, "BLI strength", "Base layout interpolation", "StorySync",
                                  minimum=0.0, maximum=1.0, step=0.05)
    # --- appended later (positional API order is a contract: new options go at the end) ---
    share_dropout: float = _option(0.0, "Sharing dropout", "Sharing dropout (peer subject tokens)", "StorySync",
                                   minimum=0.0, maximum=1.0, step=0.05)
    rfh_dropout: float = _option(0.0, "RFH dropout", "RFH dropout (subject positions)", "StorySync",
                                 minimum=0.0, maximum=1.0, step=0.05)
    rfh_start: float = _option(0.1, "RFH start", "RFH from (fraction of the steps)", "StorySync",
                               minimum=0.0, maximum=1.0, step=0.01)
    rfh_end: float = _option(0.33, "RFH end", "RFH until (fraction of the steps)", "StorySync",
                             minimum=0.0, maximum=1.0, step=0.01)
    bli_steps: float = _option(0.1, "BLI steps", "BLI window (fraction of the steps)", "StorySync",
                               minimum=0.0, maximum=1.0, step=0.01,
                               info="a vanilla pre-pass with the same seeds over these first steps")
    bli_inputs: bool = _option(False, "BLI inputs", "BLI blends Q, K and V inputs (off: queries only)", "StorySync")
    bli_cache_on_cpu: bool = _option(False, "BLI cache on CPU", "Keep the BLI cache on the CPU", "StorySync")
    show_masks: bool = _option(False, "Show masks", "Add one subject-mask image per frame", "StorySync")
    # --- OneActor (acts on prompts with <oneactor:NAME> tags, with or without the story methods) ---
    oneactor_preset: str = _option("fast", "OneActor preset", "OneActor preset", "OneActor",
                                   choices=tuple(ONEACTOR_PRESETS),
                                   info="fast: no extra rows; paper: CFG 8.5 and cluster guidance 1.0")
    oneactor_v: float = _option(0.8, "OneActor v", "Character strength v (tags without ':v')", "OneActor",
                                minimum=0.0, maximum=2.0, step=0.05)
    oneactor_eta2: float = _option(0.0, "OneActor eta2", "Cluster guidance eta2 (> 0: one more row per image)",
                                   "OneActor", minimum=0.0, maximum=10.0, step=0.1)
    oneactor_window: float = _option(0.67, "OneActor window", "Character steps (fraction, from the start)",
                                     "OneActor", minimum=0.0, maximum=1.0, step=0.01)
    oneactor_cfg: float = _option(0.0, "OneActor CFG", "CFG scale eta1 with a character (0 = the WebUI's)",
                                  "OneActor", minimum=0.0, maximum=30.0, step=0.5)
    # --- appended later ---
    bli_lockstep: bool = _option(False, "BLI lock-step", "BLI's vanilla rows in the story's batch (faster, more memory)",
                                 "StorySync", info="instead of a pre-pass, the vanilla trajectory is sampled beside "
                                 "the story (txt2img); falls back to the pre-pass where it cannot")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_value(f, getattr(self, f.name))
        if not self.consolidate and self.reweighting != "none":
            raise SettingsError("reweighting", f"'{self.reweighting}' reweights frames of the consolidated prompt; "
                                "turn 'consolidate' on or set reweighting to 'none'")
        if not self.consolidate and self.ipca:
            raise SettingsError("ipca", "needs the consolidated prompt's identity tokens; turn 'consolidate' on "
                                "or 'ipca' off")
        if self.masked_sharing and not self.csa:
            raise SettingsError("masked_sharing", "masks the consistent self-attention; turn 'csa' on")
        if self.rfh_end < self.rfh_start:
            raise SettingsError("rfh_end", f"{self.rfh_end} ends the RFH window before it starts ({self.rfh_start})")
        if 0 < self.frames_per_batch < self.reference_frames:
            raise SettingsError("reference_frames", f"{self.reference_frames} reference frames do not fit in a "
                                f"first batch of {self.frames_per_batch} frames")

    # --- construction ---
    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Settings":
        """From API-style named values; omitted method keys take the preset's values."""
        if not isinstance(values, Mapping):
            raise SettingsError("args", f"expected a dict of settings, got {type(values).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise SettingsError(str(unknown[0]), f"unknown key; valid keys: {', '.join(known)}")
        coerced = {k: _coerce(known[k], v) for k, v in values.items()}
        story = _preset_values(PRESETS, "preset", coerced.get("preset", DEFAULT_PRESET))
        oneactor = _preset_values(ONEACTOR_PRESETS, "oneactor_preset", coerced.get("oneactor_preset", "fast"))
        return cls(**{**story, **oneactor, **coerced})

    @classmethod
    def from_args(cls, args: Sequence[Any]) -> "Settings":
        """From the positional script arguments in UI order, or a dict as the first element (API users).

        Positions missing at the end take the field defaults (the UI's initial values). With a dict first, the
        host has filled the remaining positions with the UI defaults; they are ignored.
        """
        if args and isinstance(args[0], Mapping):
            return cls.from_dict(args[0])
        fields = dataclasses.fields(cls)
        if len(args) > len(fields):
            raise SettingsError("args", f"expected at most {len(fields)} positional values, got {len(args)}")
        return cls(**{f.name: _coerce(f, v) for f, v in zip(fields, args)})

    @classmethod
    def from_infotext(cls, params: Mapping[str, Any]) -> "Settings":
        """From a parsed infotext (key -> value strings); other keys are ignored, missing ones as in ``from_dict``."""
        by_key = {infotext_key(f.name): f for f in dataclasses.fields(cls)}
        return cls.from_dict({f.name: _coerce(f, params[key], key) for key, f in by_key.items() if key in params})

    # --- views ---
    def to_args(self) -> list[Any]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_infotext(self) -> dict[str, str]:
        """Every value under its ``Story ...`` key, as the text the host writes into the PNG info."""
        return {infotext_key(f.name): _format(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def with_preset(self, preset: str) -> "Settings":
        """A copy with ``preset`` selected and its method values applied (X/Y/Z preset axis, UI preset change)."""
        preset = _coerce(_field("preset"), preset)
        return dataclasses.replace(self, preset=preset, **_preset_values(PRESETS, "preset", preset))

    def with_value(self, key: str, value: Any) -> "Settings":
        """A copy with one value replaced after the same coercion and checks as the API (X/Y/Z axes)."""
        if key == "preset":
            return self.with_preset(value)
        if key == "oneactor_preset":
            value = _coerce(_field(key), value)
            return dataclasses.replace(self, oneactor_preset=value, **_preset_values(ONEACTOR_PRESETS, key, value))
        return dataclasses.replace(self, **{key: _coerce(_field(key), value)})


# --- per-field metadata helpers ---

def _preset_values(table: Mapping[str, dict[str, Any]], key: str, name: Any) -> dict[str, Any]:
    """The values preset ``name`` of ``table`` sets; SettingsError naming ``key`` for an unknown preset."""
    if name not in table:
        raise SettingsError(key, f"{name!r} is not one of {', '.join(table)}")
    return table[name]


def _field(key: str) -> dataclasses.Field:
    for f in dataclasses.fields(Settings):
        if f.name == key:
            return f
    raise SettingsError(key, "unknown key")


def option(key: str) -> Option:
    return _field(key).metadata["option"]


def option_keys() -> tuple[str, ...]:
    """API keys in UI (positional) order."""
    return tuple(f.name for f in dataclasses.fields(Settings))


def infotext_key(key: str) -> str:
    return INFOTEXT_PREFIX + option(key).name


def axis_label(key: str) -> str:
    return AXIS_PREFIX + option(key).name


def axis_keys() -> tuple[str, ...]:
    """Keys offered as X/Y/Z axes: the preset and every numeric, on/off or choice setting."""
    return tuple(k for k in option_keys() if option(k).axis)


def _format(value: Any) -> str:
    return str(value)  # bools as True/False: the WebUIs' infotext paste reads exactly those


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _coerce(f: dataclasses.Field, value: Any, where: str | None = None) -> Any:
    """Convert API/infotext/UI input to the field's type, or raise naming the field."""
    name, kind = where or f.name, f.type
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise SettingsError(name, f"expected true or false, got {value!r}")
    if kind in ("int", "float"):
        number = value
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise SettingsError(name, f"expected a number, got {value!r}") from None
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise SettingsError(name, f"expected a number, got {value!r}")
        if kind == "int":
            if number != int(number):
                raise SettingsError(name, f"expected a whole number, got {value!r}")
            return int(number)
        return float(number)
    if f.name == "story" and isinstance(value, (Mapping, list)):
        # API clients may send the story in its JSON form or as a list of lines.
        if isinstance(value, Mapping):
            return json.dumps(value)
        for i, line in enumerate(value):
            if not isinstance(line, str):
                raise SettingsError(f"{name}[{i}]", f"expected a line of text, got {type(line).__name__}")
        return "\n".join(value)
    if not isinstance(value, str):
        raise SettingsError(name, f"expected text, got {type(value).__name__} {value!r}")
    return value


def _check_value(f: dataclasses.Field, value: Any) -> None:
    opt: Option = f.metadata["option"]
    expected = {"bool": bool, "int": int, "float": (int, float), "str": str}[f.type]
    if not isinstance(value, expected) or (f.type in ("int", "float") and isinstance(value, bool)):
        raise SettingsError(f.name, f"expected {f.type}, got {type(value).__name__} {value!r}")
    if opt.choices and value not in opt.choices:
        raise SettingsError(f.name, f"{value!r} is not one of {', '.join(opt.choices)}")
    if opt.minimum is not None and not opt.minimum <= value <= opt.maximum:
        raise SettingsError(f.name, f"{value!r} is out of range [{opt.minimum}, {opt.maximum}]")
