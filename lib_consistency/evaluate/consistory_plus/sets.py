"""The ConsiStory+ prompt sets (methods.md §7.1) as stories in the extension's one-character form.

The benchmark file is YAML: superclass -> list of sets, each with ``style``, ``subject``, ``settings`` (the frame
prompts) and ``concept_token`` (unused). The official generation script builds the identity prompt as
``style + " " + subject`` and draws one frame per ``settings`` entry, seed 42; its output folders are named
``<superclass>_<index>``. Here a set becomes the story "identity line, then one frame per line", so every frame's
prompt is ``identity, frame`` (``Story.frame_prompt``), the same text the vanilla run is given.
"""
from __future__ import annotations

import hashlib
import pathlib
from dataclasses import dataclass
from typing import Sequence

from ...story.format import StoryError, parse_story

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_BENCHMARK = ROOT.parent / "shared" / "1prompt1story" / "consistory_plus.yaml"
REQUIREMENTS = "lib_consistency/evaluate/requirements.txt"


class BenchmarkError(Exception):
    """A problem with the benchmark file, the options, the output folder or the WebUI; the message names it."""


@dataclass(frozen=True)
class BenchmarkSet:
    superclass: str
    index: int           # position within its superclass, from 0 (the official folder name's number)
    style: str
    subject: str
    frames: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.superclass}_{self.index}"

    @property
    def identity(self) -> str:
        return f"{self.style} {self.subject}".strip()

    def story_text(self) -> str:
        return "\n".join((self.identity,) + self.frames)

    def frame_prompts(self) -> tuple[str, ...]:
        """Each frame's own prompt as the extension writes it (empty style); BenchmarkError if a line would be
        read as story syntax (a tag, a caption) instead of prompt text."""
        try:
            story = parse_story(self.story_text())
        except StoryError as error:
            raise BenchmarkError(f"set {self.name}: not a valid story ({error})") from None
        if [f.prompt for f in story.frames] != [" ".join(f.split()) for f in self.frames]:
            raise BenchmarkError(f"set {self.name}: a frame prompt holds story syntax ('[...]', ' # ')")
        return tuple(story.frame_prompt(i) for i in range(len(story.frames)))


def load_benchmark(path: pathlib.Path) -> tuple[list[BenchmarkSet], str]:
    """Every set of the file in file order, and the file's sha256; BenchmarkError naming the file and field."""
    try:
        import yaml
    except ImportError:
        raise BenchmarkError(f"reading the benchmark needs PyYAML (pip install -r {REQUIREMENTS})") from None
    if not path.is_file():
        raise BenchmarkError(f"benchmark file {path} not found (--benchmark PATH; the ConsiStory+ prompts are "
                             "1Prompt1Story's resource/consistory+.yaml)")
    data = path.read_bytes()
    try:
        content = yaml.safe_load(data)
    except yaml.YAMLError as error:
        raise BenchmarkError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(content, dict) or not content:
        raise BenchmarkError(f"{path}: expected a mapping of superclass -> list of sets")
    sets = []
    for superclass, items in content.items():
        if not isinstance(items, list):
            raise BenchmarkError(f"{path}: '{superclass}' should be a list of sets")
        for index, item in enumerate(items):
            where = f"{path}: {superclass}[{index}]"
            if not isinstance(item, dict):
                raise BenchmarkError(f"{where}: expected a mapping with style, subject and settings")
            if not isinstance(item.get("style"), str):  # may be empty (3 sets of ConsiStory+)
                raise BenchmarkError(f"{where}.style: expected text")
            if not isinstance(item.get("subject"), str) or not item["subject"].strip():
                raise BenchmarkError(f"{where}.subject: expected text")
            frames = item.get("settings")
            if not isinstance(frames, list) or len(frames) < 2 or not all(isinstance(f, str) and f.strip()
                                                                           for f in frames):
                raise BenchmarkError(f"{where}.settings: expected a list of at least 2 frame prompts")
            sets.append(BenchmarkSet(str(superclass), index, item["style"].strip(), item["subject"].strip(),
                                     tuple(f.strip() for f in frames)))
    return sets, hashlib.sha256(data).hexdigest()


def select_sets(sets: Sequence[BenchmarkSet], count: int | None = None,
                superclasses: Sequence[str] = ()) -> list[BenchmarkSet]:
    """A deterministic subset: the sets of ``superclasses`` (all when empty), taken round-robin over superclasses
    in file order (each superclass's first set, then each one's second, ...), the first ``count`` of them."""
    known = list(dict.fromkeys(s.superclass for s in sets))
    unknown = [name for name in superclasses if name not in known]
    if unknown:
        raise BenchmarkError(f"--superclass {unknown[0]!r} is not in the benchmark ({', '.join(known)})")
    chosen = [s for s in sets if not superclasses or s.superclass in superclasses]
    ordered = sorted(chosen, key=lambda s: (s.index, known.index(s.superclass)))
    if count is not None:
        if count < 1:
            raise BenchmarkError(f"--sets {count}: expected a positive number of sets")
        if count > len(ordered):
            raise BenchmarkError(f"--sets {count}: only {len(ordered)} sets to choose from")
        ordered = ordered[:count]
    return ordered
