"""``python -m lib_consistency.evaluate.consistory_plus``: generate ConsiStory+ through a WebUI, score it, print a
Table 1 (``python -m lib_consistency.benchmark``, its first name, still works)."""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
from typing import Sequence

from ...settings import PRESETS
from ..cli import add_evaluator_arguments, build_evaluator
from ..infotext import EvaluationError
from ..report import atomic_write
from .runner import VANILLA, Generation, Method, Runner, read_json
from .sets import DEFAULT_BENCHMARK, REQUIREMENTS, BenchmarkError, load_benchmark, select_sets
from .table import comparable, score_methods, table
from .webui import WebUI


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (an API key of the extension), got {text!r}")
    return key.strip(), value.strip()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lib_consistency.evaluate.consistory_plus", description=(
        "Generate the ConsiStory+ benchmark through a running WebUI (seed 42, one story per set) with a preset and "
        "with the extension off, resume interrupted runs, score every run in the output folder and print a table "
        f"shaped like 1Prompt1Story's Table 1. Extras: {REQUIREMENTS}."))
    p.add_argument("--url", default=os.environ.get("CONSISTENT_STORY_WEBUI_URL"),
                   help="the WebUI started with --api (default $CONSISTENT_STORY_WEBUI_URL)")
    p.add_argument("--preset", help=f"the extension's preset: {', '.join(PRESETS)}")
    p.add_argument("--set", dest="overrides", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting of the preset (API key, e.g. eot_mode=scale, frames_per_batch=4)")
    p.add_argument("--label", default="", help="folder/table name of this run (default: preset and overrides)")
    p.add_argument("--sets", type=positive_int, default=None, metavar="N",
                   help="only N sets, taken round-robin over the superclasses in file order (default: all)")
    p.add_argument("--superclass", action="append", default=[], metavar="NAME",
                   help="only sets of this superclass (repeat or comma-separate)")
    p.add_argument("--benchmark", type=pathlib.Path, default=DEFAULT_BENCHMARK, metavar="PATH",
                   help="the ConsiStory+ YAML (default: the project's shared copy beside the checkout)")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("consistory_plus_runs"),
                   help="output folder; every run in it is compared (default ./consistory_plus_runs)")
    g = p.add_argument_group("generation (defaults: the official benchmark's)")
    g.add_argument("--width", type=positive_int, default=1024)
    g.add_argument("--height", type=positive_int, default=1024)
    g.add_argument("--steps", type=positive_int, default=50)
    g.add_argument("--cfg", type=float, default=5.0)
    g.add_argument("--sampler", default="Euler")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--model", default="", help="checkpoint title to switch to (default: the one loaded)")
    g.add_argument("--timeout", type=float, default=3600.0, help="seconds per request")
    p.add_argument("--no-vanilla", action="store_true", help="do not generate the run with the extension off")
    p.add_argument("--no-eval", action="store_true", help="generate only")
    p.add_argument("--eval-only", action="store_true", help="score what OUT holds; no WebUI needed")
    p.add_argument("--no-sheets", action="store_true", help="do not draw contact sheets")
    add_evaluator_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return run(args)
    except (BenchmarkError, EvaluationError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished sets are kept; run the same command again to resume", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    superclasses = [name.strip() for item in args.superclass for name in item.split(",") if name.strip()]
    all_sets, sha256 = load_benchmark(args.benchmark)
    sets = select_sets(all_sets, args.sets, superclasses)
    generation = Generation(args.width, args.height, args.steps, args.cfg, args.sampler, args.seed, args.model,
                            sha256)
    if not args.eval_only:
        if not args.preset and args.no_vanilla:
            raise BenchmarkError("nothing to generate: give --preset NAME, or drop --no-vanilla")
        method = Method.preset(args.preset, dict(args.overrides), args.label) if args.preset else None
        if not args.url:
            raise BenchmarkError("--url: the WebUI's address is needed to generate (or CONSISTENT_STORY_WEBUI_URL)")
        for bset in sets:
            bset.frame_prompts()  # every story is valid before the first request
        webui = WebUI(args.url, args.timeout)
        webui.check_extension()
        runner = Runner(webui, args.out, generation)
        print(f"{len(sets)} sets, {sum(len(s.frames) for s in sets)} frames -> {args.out}")
        if not args.no_vanilla:
            runner.run(Method(VANILLA), sets)
        if method is not None:
            runner.run(method, sets)
    if args.no_eval:
        return 0
    if not (args.out / "benchmark.json").exists():
        raise BenchmarkError(f"{args.out}: no benchmark run here (benchmark.json missing)")
    methods, common = comparable(args.out, sets)
    if not methods:
        raise BenchmarkError(f"{args.out}: no finished set to score")
    evaluator = build_evaluator(args)
    rows = score_methods(args.out, methods, common, evaluator, sheets=not args.no_sheets)
    text = table(rows, Generation(**_stored(args.out)), evaluator, common, len(sets))
    atomic_write(args.out / "table.md", text.encode())
    print(text)
    print(f"written: {args.out / 'table.md'}; per-set scores and contact sheets in {args.out}/<method>/evaluation/")
    return 0


def _stored(out: pathlib.Path) -> dict:
    return read_json(out / "benchmark.json") or {}
