"""Reading the WebUI's PNGs: the ``parameters`` infotext, and grouping frames into stories.

The infotext format is the one both WebUIs write (A1111 ``modules/infotext_utils.py``): the prompt (possibly several
lines), an optional ``Negative prompt: ...`` line, and a last line of ``Key: value`` pairs separated by ", " in which
values holding ``,``, ``:`` or a newline are JSON-quoted. We parse it ourselves; no WebUI code is imported.

Grouping "by run" (``--group run``): every frame of one Consistent Story generation carries the same ``Story ...``
keys (settings, story text, style) and the same generation parameters; only the prompt (and, with seed mode
``sequential``, the seed) differ per frame. Frames are read in file-name order (the WebUI numbers its files), grouped
by everything else in their infotext and the folder they are in, and a group is cut into runs whenever a prompt
repeats or the story's frame count is reached, so two generations of the same story stay two stories.
"""
from __future__ import annotations

import json
import pathlib
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

from PIL import Image

from ..settings import infotext_key
from ..story.format import StoryError, parse_story

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CONTACT_SHEET_KEY = "consistent-story-contact-sheet"  # text chunk marking our own contact sheets (never scored)
STORY_TEXT_KEY = infotext_key("story")
STORY_SEED_MODE_KEY = infotext_key("seed_mode")
OTHER_IMAGES = {".jpg", ".jpeg", ".webp", ".avif", ".gif", ".bmp", ".tif", ".tiff"}
PER_IMAGE_KEYS = {"Seed", "Variation seed", "Hires prompt", "Hires negative prompt"}  # differ between frames
# Same pattern as the WebUIs' parser: a key of word characters, spaces, '-' or '/', then a quoted or plain value.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_NEGATIVE = "Negative prompt:"


class EvaluationError(Exception):
    """A problem with the user's input (a file, a folder, a field) or an optional model; the message names it."""


@dataclass(frozen=True)
class Infotext:
    prompt: str
    negative_prompt: str
    params: dict[str, str]


@dataclass(frozen=True)
class Frame:
    """One image to score: its file, the prompt it was generated from and its whole infotext."""
    path: pathlib.Path
    prompt: str
    params: dict[str, str] = field(compare=False)
    size: tuple[int, int] = (0, 0)


@dataclass
class StoryImages:
    """The frames of one story, in generation order."""
    name: str
    frames: list[Frame]


def parse_infotext(text: str) -> Infotext:
    """Split an infotext into prompt, negative prompt and the ``Key: value`` parameters (values unquoted)."""
    lines = text.strip().split("\n")
    params: dict[str, str] = {}
    if lines and len(_PARAM.findall(lines[-1])) >= 3:  # the WebUIs' own test for a parameters line
        for key, value in _PARAM.findall(lines.pop()):
            params[key.strip()] = _unquote(value.strip())
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith(_NEGATIVE):
            in_negative, line = True, line[len(_NEGATIVE):].strip()
        (negative if in_negative else prompt).append(line)
    return Infotext("\n".join(prompt).strip(), "\n".join(negative).strip(), params)


def _unquote(value: str) -> str:
    if value.startswith('"') and value.endswith('"'):
        try:
            loaded = json.loads(value)
            return loaded if isinstance(loaded, str) else value
        except json.JSONDecodeError:
            return value
    return value


def read_png_text(path: pathlib.Path) -> tuple[dict[str, str], tuple[int, int]]:
    """The PNG's text chunks and pixel size; EvaluationError naming the file when it is not a readable PNG."""
    try:
        with open(path, "rb") as handle:
            if handle.read(8) != PNG_SIGNATURE:
                raise EvaluationError(f"{path}: not a PNG file (only PNGs carry the WebUI's infotext here)")
        with Image.open(path) as image:
            image.load()
            return {k: v for k, v in image.info.items() if isinstance(v, str)}, image.size
    except EvaluationError:
        raise
    except (OSError, ValueError, SyntaxError) as error:
        raise EvaluationError(f"{path}: cannot read the image ({error})") from None


def read_frames(pngs: Iterable[pathlib.Path]) -> list[Frame]:
    """Frames of every PNG but our own contact sheets; EvaluationError naming a file without infotext or prompt."""
    frames = []
    for path in pngs:
        text, size = read_png_text(path)
        if CONTACT_SHEET_KEY in text:
            continue
        if "parameters" not in text:
            raise EvaluationError(f"{path}: the PNG has no 'parameters' infotext (save images from the WebUI with "
                                  "PNG info on, or leave this file out)")
        info = parse_infotext(text["parameters"])
        if not info.prompt:
            raise EvaluationError(f"{path}: the infotext has no prompt to score CLIP-T against")
        frames.append(Frame(path, info.prompt, info.params, size))
    return frames


def find_pngs(paths: Iterable[str | pathlib.Path], skip: Iterable[pathlib.Path] = ()) -> tuple[list[pathlib.Path],
                                                                                             list[pathlib.Path]]:
    """PNG files named or inside the given folders (recursive, name order), and the other images found in folders
    (JPEG, WebP, ...: left out, their infotext is not read). Files that are not images are ignored.

    A named file must be a PNG; a folder must hold at least one; ``skip`` folders (our own output) are left out.
    """
    skipped = {pathlib.Path(p).resolve() for p in skip}
    pngs: list[pathlib.Path] = []
    others: list[pathlib.Path] = []
    for raw in paths:
        path = pathlib.Path(raw)
        if path.is_file():
            if path.suffix.lower() != ".png":
                raise EvaluationError(f"{path}: not a PNG file (only PNGs carry the WebUI's infotext here)")
            pngs.append(path)
        elif path.is_dir():
            found = []
            for item in sorted(path.rglob("*")):
                if not item.is_file() or any(item.resolve().is_relative_to(folder) for folder in skipped):
                    continue
                if item.suffix.lower() == ".png":
                    found.append(item)
                elif item.suffix.lower() in OTHER_IMAGES:
                    others.append(item)
            if not found:
                raise EvaluationError(f"{path}: no PNG images in this folder")
            pngs.extend(found)
        else:
            raise EvaluationError(f"{path}: no such file or folder")
    unique = list({p.resolve(): p for p in pngs}.values())  # a file named and inside a named folder counts once
    return unique, others


def group_by_run(frames: list[Frame]) -> tuple[list[StoryImages], list[Frame], list[Frame]]:
    """Stories of Consistent Story runs; the frames without ``Story`` infotext (not grouped); and the images whose
    size differs from most of their group's (a storyboard saved beside the frames), left out."""
    groups: dict[tuple, list[Frame]] = {}
    loose, odd = [], []
    for frame in frames:
        if STORY_TEXT_KEY not in frame.params:
            loose.append(frame)
            continue
        per_image = PER_IMAGE_KEYS - ({"Seed"} if frame.params.get(STORY_SEED_MODE_KEY) == "same" else set())
        key = (str(frame.path.parent), tuple(sorted((k, v) for k, v in frame.params.items() if k not in per_image)))
        groups.setdefault(key, []).append(frame)
    stories = []
    for members in groups.values():
        size = Counter(f.size for f in members).most_common(1)[0][0]
        odd += [f for f in members if f.size != size]
        limit = _frame_count(members[0].params[STORY_TEXT_KEY])
        for run in _split_runs([f for f in members if f.size == size], limit):
            stories.append(StoryImages(f"{run[0].path.parent.name}/{run[0].path.stem}", run))
    stories.sort(key=lambda s: (str(s.frames[0].path.parent), s.frames[0].path.name))
    return stories, loose, odd


def group_by_folder(frames: list[Frame]) -> list[StoryImages]:
    """One story per folder: every PNG in it, in file-name order."""
    folders: dict[pathlib.Path, list[Frame]] = {}
    for frame in frames:
        folders.setdefault(frame.path.parent, []).append(frame)
    return [StoryImages(folder.name, members) for folder, members in sorted(folders.items())]


def _frame_count(story_text: str) -> int | None:
    try:
        return len(parse_story(story_text).frames)
    except StoryError:
        return None


def _split_runs(frames: list[Frame], limit: int | None) -> list[list[Frame]]:
    runs: list[list[Frame]] = [[]]
    for frame in frames:
        current = runs[-1]
        if current and (any(f.prompt == frame.prompt for f in current) or (limit and len(current) >= limit)):
            runs.append(current := [])
        current.append(frame)
    return [run for run in runs if run]
