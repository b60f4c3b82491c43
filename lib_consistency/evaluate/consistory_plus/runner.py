"""Generating the benchmark through the WebUI's API, resumable (methods.md §7.1: seed 42, one folder per set).

Output folder layout::

    OUT/benchmark.json                     generation parameters shared by every method in OUT (size, steps, ...)
    OUT/<label>/method.json                the method: vanilla, or the extension's settings (preset + overrides)
    OUT/<label>/<superclass>_<i>/frame_00.png ...   the frames as the WebUI returned them (PNG with infotext)
    OUT/<label>/<superclass>_<i>/done.json          completion marker, written last

A set is finished when its marker and all its frames exist; a re-run skips it. A set without its marker (an
interrupted run) is emptied and generated again. Every file is written under a temporary name and renamed.
Vanilla is the same WebUI with the extension off: one request per frame with that frame's prompt and the same seed
(every frame starts from the same noise, as the official script does); a method is one request per set with the
story in ``alwayson_scripts``.
"""
from __future__ import annotations

import io
import json
import pathlib
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

from PIL import Image

from ...settings import Settings, SettingsError
from ..infotext import Infotext, parse_infotext
from ..report import atomic_write
from .sets import BenchmarkError, BenchmarkSet
from .webui import SCRIPT_NAME, WebUI

MARKER = "done.json"
VANILLA = "vanilla"
FIXED_KEYS = ("enabled", "story", "storyboard", "seed_mode", "show_masks")  # set by the runner, never overridden


@dataclass(frozen=True)
class Generation:
    """The txt2img parameters shared by every method of one output folder (the paper's defaults)."""
    width: int = 1024
    height: int = 1024
    steps: int = 50
    cfg_scale: float = 5.0
    sampler: str = "Euler"
    seed: int = 42
    model: str = ""  # checkpoint title; empty = whatever the WebUI has loaded
    benchmark_sha256: str = ""

    def payload(self, prompt: str) -> dict[str, Any]:
        payload = {"prompt": prompt, "negative_prompt": "", "seed": self.seed, "steps": self.steps,
                   "cfg_scale": self.cfg_scale, "width": self.width, "height": self.height,
                   "sampler_name": self.sampler, "batch_size": 1, "n_iter": 1}
        if self.model:
            payload["override_settings"] = {"sd_model_checkpoint": self.model}
            payload["override_settings_restore_afterwards"] = False
        return payload


@dataclass(frozen=True)
class Method:
    """What to generate with: ``settings`` None is vanilla; otherwise the extension's API settings (preset and the
    keys the user overrode), validated here with the extension's own Settings."""
    label: str
    settings: dict[str, Any] | None = None

    @classmethod
    def preset(cls, preset: str, overrides: dict[str, str], label: str = "") -> "Method":
        fixed = sorted(set(overrides) & set(FIXED_KEYS))
        if fixed:
            raise BenchmarkError(f"--set {fixed[0]}: set by the benchmark itself, cannot be changed")
        try:
            settings = Settings.from_dict({"enabled": True, "preset": preset, **overrides})
        except SettingsError as error:
            raise BenchmarkError(str(error)) from None
        values = {"preset": preset, **{key: getattr(settings, key) for key in sorted(overrides)}}
        name = label or "_".join([preset] + [f"{k}-{v}" for k, v in values.items() if k != "preset"])
        if name == VANILLA:
            raise BenchmarkError(f"--label {VANILLA!r} is reserved for the run with the extension off")
        return cls(name, values)

    def payload(self, generation: Generation, bset: BenchmarkSet) -> dict[str, Any]:
        args = {"enabled": True, **self.settings, "story": bset.story_text(), "storyboard": False,
                "seed_mode": "same", "show_masks": False}
        return {**generation.payload(""), "alwayson_scripts": {SCRIPT_NAME: {"args": [args]}}}


def read_json(path: pathlib.Path) -> dict | None:
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise BenchmarkError(f"{path}: unreadable ({error}); remove it to start that part again") from None
    if not isinstance(value, dict):
        raise BenchmarkError(f"{path}: expected a JSON object; remove it to start that part again")
    return value


def write_json(path: pathlib.Path, value: dict) -> None:
    atomic_write(path, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode())


def claim(path: pathlib.Path, value: dict, what: str) -> None:
    """Write ``value`` to ``path``, or check that the one there is the same (BenchmarkError naming the field)."""
    old = read_json(path)
    if old is None:
        write_json(path, value)
        return
    for key in sorted(set(old) | set(value)):
        if old.get(key) != value.get(key):
            raise BenchmarkError(f"{path.parent} holds {what} made with {key} = {old.get(key)!r}, not "
                                 f"{value.get(key)!r}; use another --out (or --label) or the same options")


def frame_path(folder: pathlib.Path, i: int) -> pathlib.Path:
    return folder / f"frame_{i:02d}.png"


def is_finished(folder: pathlib.Path, bset: BenchmarkSet) -> bool:
    marker = read_json(folder / MARKER) if (folder / MARKER).exists() else None
    return marker is not None and marker.get("frames") == len(bset.frames) and \
        all(frame_path(folder, i).is_file() for i in range(len(bset.frames)))


class Runner:
    """Generates the sets of one method into ``OUT/<label>``, skipping finished ones."""

    def __init__(self, webui: WebUI, out: pathlib.Path, generation: Generation,
                 report: Callable[[str], None] = print):
        self.webui, self.out, self.generation, self.report = webui, out, generation, report
        self.warm = False
        self.model_name = webui.model_name(generation.model) if generation.model else None
        claim(out / "benchmark.json", asdict(generation), "a benchmark run")

    def warm_up(self) -> None:
        """One small untimed request, so that loading the checkpoint (``--model``, or Forge's first request) is not
        counted in the first set's time per image."""
        payload = {**self.generation.payload("warm-up"), "steps": 1, "width": 64, "height": 64}
        self.webui.txt2img(payload)
        self.warm = True

    def run(self, method: Method, sets: Sequence[BenchmarkSet]) -> None:
        folder = self.out / method.label
        claim(folder / "method.json", {"label": method.label, "settings": method.settings}, "a method")
        todo = [s for s in sets if not is_finished(folder / s.name, s)]
        self.report(f"{method.label}: {len(sets) - len(todo)} of {len(sets)} sets already finished, "
                    f"{len(todo)} to generate")
        if todo and not self.warm:
            self.warm_up()
        for number, bset in enumerate(todo, 1):
            seconds = self.generate(method, bset, folder / bset.name)
            self.report(f"{method.label}: {bset.name} done ({len(bset.frames)} frames, "
                        f"{seconds / len(bset.frames):.2f} s/image) [{number}/{len(todo)}]")

    def generate(self, method: Method, bset: BenchmarkSet, folder: pathlib.Path) -> float:
        """Generate one set into ``folder`` (emptied first); the marker is written last. Returns the seconds."""
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.iterdir():
            if stale.is_file():
                stale.unlink()
        prompts = bset.frame_prompts()
        seconds = 0.0  # time spent in the WebUI's requests only (not our checks and writes)
        if method.settings is None:
            images = []
            for i, prompt in enumerate(prompts):
                start = time.perf_counter()
                answer = self.webui.txt2img(self.generation.payload(prompt))
                seconds += time.perf_counter() - start
                if not answer:
                    raise BenchmarkError(f"{bset.name} frame {i}: the WebUI returned no image")
                images.append(self._checked(answer[0], prompt, bset, i))
                atomic_write(frame_path(folder, i), images[-1])
        else:
            start = time.perf_counter()
            images = self.webui.txt2img(method.payload(self.generation, bset))
            seconds = time.perf_counter() - start
            if len(images) < len(prompts):
                raise BenchmarkError(f"{bset.name}: the WebUI returned {len(images)} images for {len(prompts)} "
                                     "frames")
            images = [self._checked(image, prompt, bset, i) for i, (image, prompt) in enumerate(zip(images, prompts))]
            for i, image in enumerate(images):
                atomic_write(frame_path(folder, i), image)
        model = infotext_of(images[0], bset.name, 0).params.get("Model", "")
        write_json(folder / MARKER, {"frames": len(prompts), "seconds": round(seconds, 3),
                                     "seconds_per_image": round(seconds / len(prompts), 3), "model": model,
                                     "prompts": list(prompts)})
        return seconds

    def _checked(self, image: bytes, prompt: str, bset: BenchmarkSet, i: int) -> bytes:
        """``image`` if its infotext holds the frame's own prompt and the requested parameters, else BenchmarkError:
        a WebUI that silently falls back (an unknown sampler name) must not give a table that names the request."""
        info = infotext_of(image, bset.name, i)
        if info.prompt != prompt:
            raise BenchmarkError(f"{bset.name} frame {i}: the WebUI drew the prompt {info.prompt!r}, expected "
                                 f"{prompt!r} (does another extension change prompts?)")
        g = self.generation
        expected = {"Steps": (str(g.steps), str), "Size": (f"{g.width}x{g.height}", str), "Seed": (str(g.seed), str),
                    "CFG scale": (g.cfg_scale, float), "Sampler": (g.sampler, str)}
        if self.model_name and "Model" in info.params:
            expected["Model"] = (self.model_name, str)
        for key, (want, kind) in expected.items():
            got = info.params.get(key)
            try:
                same = got is not None and kind(got) == want
            except ValueError:
                same = False
            if not same:
                used = f"{got!r}" + (f" (schedule type {info.params['Schedule type']})"
                                     if key == "Sampler" and "Schedule type" in info.params else "")
                raise BenchmarkError(f"{bset.name} frame {i}: the WebUI used {key} {used}, not {want!r}; pass "
                                     "the value as the WebUI names it")
        return image


def infotext_of(image: bytes, set_name: str, i: int) -> Infotext:
    try:
        with Image.open(io.BytesIO(image)) as png:
            text = png.info.get("parameters")
    except (OSError, ValueError, SyntaxError) as error:
        raise BenchmarkError(f"{set_name} frame {i}: the WebUI returned an unreadable image ({error})") from None
    if not isinstance(text, str):
        raise BenchmarkError(f"{set_name} frame {i}: the WebUI returned a PNG without infotext (turn on 'Save text "
                             "information about generation parameters as chunks to png files')")
    return parse_infotext(text)
