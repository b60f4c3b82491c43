"""What a user asks for when creating a OneActor character (Characters tab and API), validated (methods.md §6.5).

One frozen ``CreateRequest``: the target's prompt, negative prompt, seed and base word, and how the tuning data is
made (number of auxiliary images, sampler steps, CFG, size) and tuned (steps). ``from_dict`` takes the API's JSON
body; every unknown key, wrong type or out-of-range value raises ``CreateRequestError`` naming the field. Defaults
follow the code (methods.md §6.2, §6.3, §6.6): 10 auxiliaries, 30 steps, CFG 7.5, 200 tuning steps, 1024² for SDXL
and 512² for SD1.5 (the projector's input grid, §6.1). Seeds (our choice): the target uses ``seed``, auxiliary i
uses ``seed + i`` (the code continues the random stream; consecutive seeds make a run repeatable in the WebUI).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from .character_file import check_character_name, CharacterNameError

DEFAULT_SIZE = {"sd15": 512, "sdxl": 1024}
_WORD = re.compile(r"^[^\s<>:()\[\]{}|]+$")


class CreateRequestError(ValueError):
    """Invalid character request; ``field`` is the API key concerned."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"OneActor character request, field '{field_name}': {message}")
        self.field = field_name


@dataclass(frozen=True)
class CreateRequest:
    name: str
    prompt: str
    base_word: str
    negative_prompt: str = ""
    seed: int = -1               # -1: a random seed, recorded in the file
    auxiliaries: int = 10
    tuning_steps: int = 200
    steps: int = 30
    cfg_scale: float = 7.5
    sampler_name: str = ""        # empty: the WebUI's default sampler
    width: int = 0                # 0: 1024 for SDXL, 512 for SD1.5
    height: int = 0
    human: bool = False           # human-subject prompt templates while tuning (methods.md §6.2)
    overwrite: bool = False

    _RANGES = {"seed": (-1, 2 ** 32 - 1), "auxiliaries": (1, 32), "tuning_steps": (1, 5000), "steps": (1, 150),
               "cfg_scale": (1.0, 30.0), "width": (0, 4096), "height": (0, 4096)}
    _DESCRIPTIONS = {
        "name": "the character's name and file name: 1-64 letters, digits, spaces and _-., portable to Windows, "
                "macOS and Linux (no device names such as CON)",
        "prompt": "the prompt of the target image (LoRA tags work as in txt2img)",
        "base_word": "the one word of the prompt that names the character, e.g. 'hobbit'",
        "negative_prompt": "the target's negative prompt",
        "seed": "the target's seed (auxiliary i uses seed + i); -1: random, recorded in the file",
        "auxiliaries": "how many auxiliary images to make",
        "tuning_steps": "projector tuning steps",
        "steps": "sampler steps of each generated image",
        "cfg_scale": "CFG scale of each generated image",
        "sampler_name": "the WebUI's sampler name; empty: its default",
        "width": "width of the images; 0: 1024 for SDXL, 512 for SD1.5; else a multiple of 64 from 256",
        "height": "height of the images; 0: 1024 for SDXL, 512 for SD1.5; else a multiple of 64 from 256",
        "human": "human-subject prompt templates while tuning",
        "overwrite": "replace a character file of the same name",
    }

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = {"str": str, "int": int, "float": (int, float), "bool": bool}[f.type]
            if not isinstance(value, kind) or (f.type in ("int", "float") and isinstance(value, bool)):
                raise CreateRequestError(f.name, f"expected {f.type}, got {type(value).__name__} {value!r}")
            if f.name in self._RANGES:
                low, high = self._RANGES[f.name]
                if not (math.isfinite(value) and low <= value <= high):
                    raise CreateRequestError(f.name, f"{value!r} is out of range [{low}, {high}]")
        try:
            check_character_name(self.name)
        except CharacterNameError as error:
            raise CreateRequestError("name", str(error)) from None
        if not self.prompt.strip():
            raise CreateRequestError("prompt", "must not be empty")
        if not _WORD.match(self.base_word.strip()):
            raise CreateRequestError("base_word", f"{self.base_word!r} must be one word (no spaces or prompt "
                                     "syntax), e.g. 'hobbit'")
        if self.base_word.strip().lower() not in re.findall(r"[^\s,.;:!?()\[\]<>{}|]+", self.prompt.lower()):
            raise CreateRequestError("base_word", f"'{self.base_word.strip()}' does not occur as a word in the "
                                     f"prompt {self.prompt!r}")
        for side in ("width", "height"):
            value = getattr(self, side)
            if value and (value < 256 or value % 64):
                raise CreateRequestError(side, f"{value} must be 0 (automatic) or a multiple of 64 from 256")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "CreateRequest":
        if not isinstance(values, Mapping):
            raise CreateRequestError("body", f"expected a JSON object, got {type(values).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise CreateRequestError(str(unknown[0]), f"unknown key; valid keys: {', '.join(known)}")
        for required in ("name", "prompt", "base_word"):
            if required not in values:
                raise CreateRequestError(required, "is required")
        coerced = {k: float(v) if known[k].type == "float" and isinstance(v, int) and not isinstance(v, bool)
                   else v for k, v in values.items()}
        return cls(**coerced)

    def size(self, arch: str) -> tuple[int, int]:
        """(width, height) of the generations: the request's, or the architecture's default."""
        default = DEFAULT_SIZE[arch]
        return self.width or default, self.height or default

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """The request body as JSON Schema, for the API's ``/openapi.json``: every field with its type, default,
        range and description; the validation itself stays ``from_dict`` (same messages for every client)."""
        kinds = {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}
        properties = {}
        for f in dataclasses.fields(cls):
            entry: dict[str, Any] = {"title": f.name, "type": kinds[f.type], "description": cls._DESCRIPTIONS[f.name]}
            if f.default is not dataclasses.MISSING:
                entry["default"] = f.default
            if f.name in cls._RANGES:
                entry["minimum"], entry["maximum"] = cls._RANGES[f.name]
            properties[f.name] = entry
        return {"title": "OneActorCreateRequest", "type": "object", "properties": properties,
                "required": [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING],
                "additionalProperties": False}
