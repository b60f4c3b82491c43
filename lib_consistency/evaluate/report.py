"""Outputs: per-story and overall tables (CSV, Markdown), one contact sheet per story, a progress bar.

Every file is written under a temporary name in its folder and renamed into place, so an interrupted run never
leaves a partial table or image behind.
"""
from __future__ import annotations

import csv
import io
import pathlib
import re
import sys
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont, ImageOps
from PIL.PngImagePlugin import PngInfo

from ..common.atomic_file import write_atomically
from .infotext import CONTACT_SHEET_KEY, StoryImages
from .scoring import Overall, StoryScores

THUMB = 192
COLUMNS = 5
HEADER = ("story", "frames", "CLIP-T", "CLIP-I", "DreamSim")


def atomic_write(path: pathlib.Path, data: bytes) -> None:
    """``write_atomically``, creating the output folder when needed."""
    write_atomically(path, data, make_folder=True)


def fmt(value: float | None) -> str:
    return "off" if value is None else f"{value:.4f}"


def rows(scores: Sequence[StoryScores], total: Overall) -> list[tuple[str, ...]]:
    body = [(s.name, str(s.frames), fmt(s.clip_t), fmt(s.clip_i), fmt(s.dreamsim)) for s in scores]
    return body + [(f"overall ({total.stories} stories)", str(total.frames), fmt(total.clip_t), fmt(total.clip_i),
                    fmt(total.dreamsim))]


def csv_table(scores: Sequence[StoryScores], total: Overall) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(HEADER)
    writer.writerows(rows(scores, total))
    return out.getvalue()


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def markdown_report(scores: Sequence[StoryScores], total: Overall, evaluator: Sequence[str]) -> str:
    notes = "".join(f"- {line}\n" for line in evaluator)
    return ("Evaluator (compare only numbers from one evaluator):\n\n" + notes + "\n"
            + markdown_table(("story", "frames", "CLIP-T ↑", "CLIP-I ↑", "DreamSim ↓"), rows(scores, total)))


def safe_name(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "story"


def contact_sheet(story: StoryImages, scores: StoryScores) -> Image.Image:
    """The story's frames as thumbnails (rows of up to 5) under a line with its scores; each frame's CLIP-T."""
    font = ImageFont.load_default()
    count = len(story.frames)
    columns = min(COLUMNS, count)
    rows_ = -(-count // columns)
    header, caption = 28, 16
    sheet = Image.new("RGB", (columns * THUMB, header + rows_ * (THUMB + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 2), story.name, fill="black", font=font)
    draw.text((4, 14), f"CLIP-T {fmt(scores.clip_t)}   CLIP-I {fmt(scores.clip_i)}   DreamSim {fmt(scores.dreamsim)}",
              fill="black", font=font)
    for i, (frame, value) in enumerate(zip(story.frames, scores.frame_clip_t)):
        with Image.open(frame.path) as image:
            thumb = ImageOps.contain(image.convert("RGB"), (THUMB, THUMB))
        x, y = (i % columns) * THUMB, header + (i // columns) * (THUMB + caption)
        sheet.paste(thumb, (x + (THUMB - thumb.width) // 2, y + (THUMB - thumb.height) // 2))
        draw.text((x + 4, y + THUMB + 2), f"{i + 1}: CLIP-T {value:.3f}", fill="black", font=font)
    return sheet


def save_png(path: pathlib.Path, image: Image.Image, mark: bool = True) -> None:
    """PNG through ``atomic_write``; ``mark`` tags it as our output so the evaluator never scores it."""
    info = PngInfo()
    if mark:
        info.add_text(CONTACT_SHEET_KEY, "1")
    data = io.BytesIO()
    image.save(data, format="PNG", pnginfo=info)
    atomic_write(path, data.getvalue())


class Progress:
    """A one-line progress bar on stderr (redrawn on a terminal, one line per step otherwise)."""

    def __init__(self, total: int, label: str, stream=None):
        self.total, self.label, self.done = total, label, 0
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()

    def step(self, note: str = "") -> None:
        self.done += 1
        filled = round(20 * self.done / max(self.total, 1))
        line = f"{self.label} [{'#' * filled}{'.' * (20 - filled)}] {self.done}/{self.total} {note}"
        self.stream.write(("\r" + line.ljust(100)) if self.tty else line + "\n")
        if self.tty and self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()
