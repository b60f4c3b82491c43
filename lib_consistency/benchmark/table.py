"""Scoring every method in an output folder and printing them in the shape of 1Prompt1Story's Table 1."""
from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import Sequence

from ..evaluate.cli import evaluate
from ..evaluate.infotext import StoryImages, read_frames
from ..evaluate.report import fmt, markdown_table
from ..evaluate.scoring import Evaluator, Overall
from .runner import MARKER, VANILLA, Generation, frame_path, is_finished, read_json
from .sets import BenchmarkSet


@dataclass(frozen=True)
class Row:
    label: str
    settings: str
    base: str
    total: Overall
    seconds_per_image: float
    sets: int


def methods_in(out: pathlib.Path) -> list[tuple[str, dict]]:
    """(label, method.json) of every method in ``out``: vanilla first, then in the order they were started."""
    found = []
    for path in sorted(out.glob("*/method.json")):
        info = read_json(path)
        found.append((path.stat().st_mtime, path.parent.name != VANILLA, path.parent.name, info))
    return [(label, info) for _, _, label, info in sorted(found, key=lambda item: (item[1], item[0], item[2]))]


def score_methods(out: pathlib.Path, sets: Sequence[BenchmarkSet], evaluator: Evaluator, sheets: bool = True,
                  report=print) -> list[Row]:
    """One row per method with at least one finished set among ``sets`` (its scores in ``<label>/evaluation``)."""
    rows = []
    for label, info in methods_in(out):
        folder = out / label
        done = [s for s in sets if is_finished(folder / s.name, s)]
        if not done:
            report(f"{label}: no finished set among the {len(sets)} chosen; left out of the table")
            continue
        stories = [StoryImages(s.name, read_frames([frame_path(folder / s.name, i) for i in range(len(s.frames))]))
                   for s in done]
        _, total = evaluate(stories, evaluator, folder / "evaluation", label=f"scoring {label}", sheets=sheets)
        markers = [read_json(folder / s.name / MARKER) for s in done]
        seconds = sum(float(m.get("seconds", 0)) for m in markers) / sum(len(s.frames) for s in done)
        models = sorted({str(m.get("model", "")) for m in markers})
        settings = info.get("settings") or {}
        text = ", ".join(f"{k}={v}" for k, v in settings.items() if k != "preset")
        rows.append(Row(label, text or ("extension off" if label == VANILLA else "preset defaults"),
                        " / ".join(models), total, seconds, len(done)))
    return rows


def table(rows: Sequence[Row], generation: Generation, evaluator: Evaluator, sets: Sequence[BenchmarkSet]) -> str:
    """Markdown: a header naming the protocol and the evaluator, then Table 1's columns."""
    frames = sum(len(s.frames) for s in sets)
    head = (f"ConsiStory+: {len(sets)} sets, {frames} frames; seed {generation.seed}, {generation.width}x"
            f"{generation.height}, {generation.steps} steps, CFG {generation.cfg_scale:g}, {generation.sampler}\n"
            "Evaluator (numbers from another evaluator do not compare):\n"
            + "".join(f"- {line}\n" for line in evaluator.describe()) + "\n")
    body = [("Vanilla" if r.label == VANILLA else r.label, r.settings, r.base, fmt(r.total.clip_t),
             fmt(r.total.clip_i), fmt(r.total.dreamsim), str(generation.steps), f"{r.seconds_per_image:.3f}",
             f"{r.sets}/{len(sets)}") for r in rows]
    return head + markdown_table(("Method", "Settings", "Base", "CLIP-T ↑", "CLIP-I ↑", "DreamSim ↓", "Steps",
                                  "Time (s) ↓", "Sets"), body)
