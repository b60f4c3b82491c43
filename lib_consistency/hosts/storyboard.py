"""The storyboard: a story's frames in reading order, each with its caption underneath, on a white page.

Layout: up to 4 frames make a single row (a strip); more frames make a grid of ``max(4, ceil(sqrt(n)))`` columns,
so 5-16 frames read in rows of 4 like a comic page (a 4-frame strip is exactly its first row) and long stories
stay roughly square (100 frames: 10 x 10). Every panel has the first frame's size (other sizes are resized to it);
captions are word-wrapped to the panel width, at most ``MAX_CAPTION_LINES`` lines, in a font about 1/22 of the panel
width. Only PIL and arithmetic, so it runs without the WebUI; ``modules.images.get_font`` is used only where the
installed Pillow cannot size its default font (Pillow < 10.1, which A1111 1.10 ships).
"""
from __future__ import annotations

import math
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

STRIP_MAX_FRAMES = 4
MAX_CAPTION_LINES = 3
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)


def storyboard_columns(count: int) -> int:
    """Panels per row: all of them up to 4, else ``max(4, ceil(sqrt(count)))``."""
    return min(count, max(STRIP_MAX_FRAMES, math.ceil(math.sqrt(count))))


def compose_storyboard(images: Sequence[Image.Image], captions: Sequence[str]) -> Image.Image:
    """One RGB image with the frames in reading order and each caption centred under its panel."""
    if not images:
        raise ValueError("a storyboard needs at least one frame")
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} frames but {len(captions)} captions")
    size = images[0].size
    panel_w, panel_h = size
    panels = [im.convert("RGB") if im.size == size else im.convert("RGB").resize(size, Image.LANCZOS)
              for im in images]
    columns = storyboard_columns(len(panels))
    rows = math.ceil(len(panels) / columns)
    margin = max(8, round(min(size) / 32))
    font = _font(max(12, round(panel_w / 22)))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(measure, caption, font, panel_w) for caption in captions]
    line_h = round(font.getbbox("Ag")[3] * 1.25)
    most_lines = max(len(lines) for lines in wrapped)
    caption_h = most_lines * line_h + margin // 2 if most_lines else 0
    cell_w, cell_h = panel_w + margin, panel_h + caption_h + margin

    board = Image.new("RGB", (columns * cell_w + margin, rows * cell_h + margin), BACKGROUND)
    draw = ImageDraw.Draw(board)
    for i, (panel, lines) in enumerate(zip(panels, wrapped)):
        x, y = margin + (i % columns) * cell_w, margin + (i // columns) * cell_h
        board.paste(panel, (x, y))
        for k, line in enumerate(lines):
            text_w = draw.textlength(line, font=font)
            draw.text((x + (panel_w - text_w) / 2, y + panel_h + margin // 2 + k * line_h), line,
                      fill=TEXT_COLOUR, font=font)
    return board


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; more than MAX_CAPTION_LINES lines end with '...'."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    if len(lines) > MAX_CAPTION_LINES:
        last = lines[MAX_CAPTION_LINES - 1]
        while " " in last and draw.textlength(f"{last} ...", font=font) > width:
            last = last.rsplit(" ", 1)[0]
        lines = [*lines[:MAX_CAPTION_LINES - 1], f"{last} ..."]
    return lines


def _font(size: int) -> ImageFont.ImageFont:
    """Pillow's default font at ``size`` (Pillow >= 10.1), else the WebUI's caption font, else the bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no size argument
        pass
    try:
        from modules.images import get_font
    except ImportError:
        return ImageFont.load_default()
    return get_font(size)


MASK_COLOURS = ((255, 64, 64), (64, 160, 255), (64, 220, 96), (255, 200, 0), (200, 80, 255), (0, 220, 220),
                (255, 128, 0), (160, 160, 160))  # one per character, in story order
MASK_OPACITY = 0.5


def mask_overlay(image: Image.Image, masks: Sequence[tuple[int, Sequence[bool]]], grid: tuple[int, int]) -> Image.Image:
    """``image`` with each character's subject mask tinted over it (StorySync "show masks").

    masks: (colour index, row-major booleans on ``grid`` = (h, w)) per character; each mask is scaled to the image
    with nearest-neighbour sampling, the mask grid's cells staying visible as blocks.
    """
    base = image.convert("RGB")
    height, width = grid
    for colour_index, mask in masks:
        if len(mask) != height * width:
            raise ValueError(f"a {height}x{width} mask needs {height * width} values, got {len(mask)}")
        cells = Image.new("L", (width, height))
        cells.putdata([255 if value else 0 for value in mask])
        alpha = cells.resize(base.size, Image.NEAREST).point(lambda v: round(v * MASK_OPACITY))
        tint = Image.new("RGB", base.size, MASK_COLOURS[colour_index % len(MASK_COLOURS)])
        base = Image.composite(tint, base, alpha)
    return base
