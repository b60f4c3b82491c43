"""Scoring every method in an output folder and printing them in the shape of 1Prompt1Story's Table 1."""
from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import Sequence

from ..cli import evaluate
from ..infotext import StoryImages, read_frames
from ..report import fmt, markdown_table
from ..scoring import Evaluator, Overall
from .runner import MARKER, VANILLA, Generation, frame_path, is_finished, read_json
from .sets import BenchmarkError, BenchmarkSet


@dataclass(frozen=True)
class Row:
    label: str
    settings: str
    base: str
    total: Overall
    seconds_per_image: float


def methods_in(out: pathlib.Path) -> list[tuple[str, dict]]:
    """(label, method.json) of every method in ``out``: vanilla first, then in the order they were started."""
    found = []
    for path in sorted(out.glob("*/method.json")):
        info = read_json(path)
        found.append((path.stat().st_mtime, path.parent.name != VANILLA, path.parent.name, info))
    return [(label, info) for _, _, label, info in sorted(found, key=lambda item: (item[1], item[0], item[2]))]


def comparable(out: pathlib.Path, sets: Sequence[BenchmarkSet], report=print) -> tuple[list[tuple[str, dict]],
                                                                                      list[BenchmarkSet]]:
    """The methods in ``out`` with a finished set among ``sets``, and the sets every one of them has finished: rows
    of one table are scored on the same sets, so that they compare."""
    methods, finished = [], {}
    for label, info in methods_in(out):
        done = {s.name for s in sets if is_finished(out / label / s.name, s)}
        if not done:
            report(f"{label}: no finished set among the {len(sets)} chosen; left out of the table")
            continue
        methods.append((label, info))
        finished[label] = done
    common = [s for s in sets if all(s.name in done for done in finished.values())]
    if methods and not common:
        raise BenchmarkError(f"{out}: no set is finished by every run ({', '.join(finished)}); generate the missing "
                             "sets or score the runs with separate --out folders")
    for label, done in finished.items():
        if len(done) > len(common):
            report(f"{label}: {len(done)} sets finished; the table compares the {len(common)} that every run has")
    return methods, common


def score_methods(out: pathlib.Path, methods: Sequence[tuple[str, dict]], sets: Sequence[BenchmarkSet],
                  evaluator: Evaluator, sheets: bool = True) -> list[Row]:
    """One row per method, scored on ``sets`` (all finished); per-set scores in ``<label>/evaluation``."""
    rows = []
    for label, info in methods:
        folder = out / label
        stories = [StoryImages(s.name, read_frames([frame_path(folder / s.name, i) for i in range(len(s.frames))]))
                   for s in sets]
        _, total = evaluate(stories, evaluator, folder / "evaluation", label=f"scoring {label}", sheets=sheets)
        markers = [read_json(folder / s.name / MARKER) for s in sets]
        seconds = sum(float(m.get("seconds", 0)) for m in markers) / sum(len(s.frames) for s in sets)
        models = sorted({str(m.get("model", "")) for m in markers})
        settings = info.get("settings") or {}
        text = ", ".join(f"{k}={v}" for k, v in settings.items() if k != "preset")
        rows.append(Row(label, text or ("extension off" if label == VANILLA else "preset defaults"),
                        " / ".join(models), total, seconds))
    return rows


def table(rows: Sequence[Row], generation: Generation, evaluator: Evaluator, sets: Sequence[BenchmarkSet],
          chosen: int) -> str:
    """Markdown: a header naming the protocol, the sets and the evaluator, then Table 1's columns."""
    frames = sum(len(s.frames) for s in sets)
    head = (f"ConsiStory+: {len(sets)} of {chosen} chosen sets ({frames} frames), finished by every run; seed "
            f"{generation.seed}, {generation.width}x{generation.height}, {generation.steps} steps, CFG "
            f"{generation.cfg_scale:g}, {generation.sampler}\n"
            "Evaluator (numbers from another evaluator do not compare):\n"
            + "".join(f"- {line}\n" for line in evaluator.describe()) + "\n")
    body = [("Vanilla" if r.label == VANILLA else r.label, r.settings, r.base, fmt(r.total.clip_t),
             fmt(r.total.clip_i), fmt(r.total.dreamsim), str(generation.steps), f"{r.seconds_per_image:.3f}")
            for r in rows]
    return head + markdown_table(("Method", "Settings", "Base", "CLIP-T ↑", "CLIP-I ↑", "DreamSim ↓", "Steps",
                                  "Time (s) ↓"), body)
