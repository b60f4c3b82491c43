"""``python -m lib_consistency.evaluate PATH...``: score stories in folders of images the WebUI wrote."""
from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Sequence

import torch

from .infotext import EvaluationError, StoryImages, find_pngs, group_by_folder, group_by_run, read_frames
from .models import DREAMSIM_CACHE, REQUIREMENTS, load_background_removal, load_clip, load_dreamsim
from .report import Progress, atomic_write, contact_sheet, csv_table, markdown_report, safe_name, save_png
from .scoring import Evaluator, Overall, StoryScores, overall


def add_evaluator_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose the evaluator (shared with ``lib_consistency.evaluate.consistory_plus``)."""
    group = parser.add_argument_group("evaluator (nothing is downloaded without --allow-download)")
    group.add_argument("--clip", metavar="PATH_OR_ID", default=None,
                       help="CLIP model: a folder saved with save_pretrained, or a model id looked up in the local "
                            "Hugging Face cache (default openai/clip-vit-base-patch32, the recipe's ViT-B/32)")
    group.add_argument("--allow-download", action="store_true",
                       help="let transformers, dreamsim and carvekit download missing weights")
    group.add_argument("--dreamsim", choices=("auto", "on", "off"), default="auto",
                       help="auto: used when the dreamsim package and its weights are present")
    group.add_argument("--dreamsim-cache", type=pathlib.Path, default=DREAMSIM_CACHE, metavar="DIR",
                       help=f"DreamSim's weight folder (default {DREAMSIM_CACHE})")
    group.add_argument("--background", choices=("auto", "on", "off"), default="auto",
                       help="remove backgrounds before CLIP-I/DreamSim (CarveKit); auto: when installed")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def build_evaluator(args: argparse.Namespace) -> Evaluator:
    clip, name = load_clip(args.clip, args.allow_download, args.device)
    dreamsim = load_dreamsim(args.dreamsim, args.dreamsim_cache, args.allow_download, args.device)
    background = load_background_removal(args.background, args.allow_download, args.device)
    return Evaluator(clip, name, dreamsim, background)


def collect_stories(paths: Sequence[str], mode: str, skip: Sequence[pathlib.Path] = ()) -> list[StoryImages]:
    """The stories to score, with notes on stderr for everything left out; EvaluationError when none is left."""
    pngs, others = find_pngs(paths, skip)
    if others:
        note(f"left out {len(others)} image(s) that are not PNG, e.g. {others[0]} (only PNG infotext is read)")
    frames = read_frames(pngs)
    if mode == "folder":
        stories = group_by_folder(frames)
    else:
        stories, loose, odd = group_by_run(frames)
        if loose:
            note(f"left out {len(loose)} image(s) without Consistent Story infotext, e.g. {loose[0].path} "
                 "(--group folder scores each folder as one story)")
        if odd:
            note(f"left out {len(odd)} image(s) of another size than the frames of their run, e.g. {odd[0].path} "
                 "(a storyboard?)")
    short = [s for s in stories if len(s.frames) < 2]
    if short:
        note(f"left out {len(short)} story/stories of one frame, e.g. {short[0].frames[0].path} (CLIP-I and "
             "DreamSim need 2 frames)")
    stories = [s for s in stories if len(s.frames) >= 2]
    if not stories:
        raise EvaluationError(f"no story of at least 2 frames in {', '.join(map(str, paths))}")
    return stories


def evaluate(stories: Sequence[StoryImages], evaluator: Evaluator, out: pathlib.Path | None,
             label: str = "scoring", sheets: bool = True) -> tuple[list[StoryScores], Overall]:
    """Score ``stories``; with ``out``, write scores.csv, scores.md and one contact sheet per story there."""
    progress = Progress(len(stories), label)
    scores = []
    for story in stories:
        scores.append(evaluator.score(story))
        if out is not None and sheets:
            save_png(out / "sheets" / f"{safe_name(story.name)}.png", contact_sheet(story, scores[-1]))
        progress.step(story.name)
    total = overall(scores)
    if out is not None:
        atomic_write(out / "scores.csv", csv_table(scores, total).encode())
        atomic_write(out / "scores.md", markdown_report(scores, total, evaluator.describe()).encode())
    return scores, total


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib_consistency.evaluate", description=(
        "Score stories in folders of WebUI images: CLIP-T, CLIP-I and DreamSim as 1Prompt1Story's benchmark "
        f"computes them. Optional extras: {REQUIREMENTS}."))
    parser.add_argument("paths", nargs="+", metavar="PATH", help="PNG files or folders (searched recursively)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("consistency-eval"),
                        help="folder for scores.csv, scores.md and sheets/ (default ./consistency-eval)")
    parser.add_argument("--group", choices=("run", "folder"), default="run",
                        help="run: one story per Consistent Story generation (from the infotext); "
                             "folder: every folder is one story")
    parser.add_argument("--no-sheets", action="store_true", help="do not draw contact sheets")
    add_evaluator_arguments(parser)
    args = parser.parse_args(argv)
    try:
        stories = collect_stories(args.paths, args.group, skip=[args.out])
        evaluator = build_evaluator(args)
        scores, total = evaluate(stories, evaluator, args.out, sheets=not args.no_sheets)
    except EvaluationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown_report(scores, total, evaluator.describe()))
    print(f"written: {args.out / 'scores.csv'}, {args.out / 'scores.md'}"
          + ("" if args.no_sheets else f", {args.out / 'sheets'}/"))
    return 0
