"""Reading real WebUI-style PNGs: infotext parsing, grouping frames into stories by run, bad input, the CLI."""
from __future__ import annotations

import csv

import pytest

from lib_consistency.evaluate.cli import collect_stories, main
from lib_consistency.evaluate.infotext import (CONTACT_SHEET_KEY, EvaluationError, find_pngs, group_by_folder,
                                               group_by_run, parse_infotext, read_frames)
from lib_consistency.settings import Settings
from tests.webui_png import infotext, png_bytes

STORY = "a small red fox with a white tail\nruns through snow\nsleeps in a hollow log\nswims in a lake"
FRAMES = ["watercolor, a small red fox with a white tail, runs through snow",
          "watercolor, a small red fox with a white tail, sleeps in a hollow log",
          "watercolor, a small red fox with a white tail, swims in a lake"]
# An infotext as A1111 v1.10.1 wrote it for a frame of a story run (shortened to a few Story keys).
REAL = ('A fiery illustration of A phoenix, soaring through a glowing sky\nSteps: 3, Sampler: Euler, Schedule type: '
        'Automatic, CFG scale: 5.0, Seed: 42, Size: 64x64, Model hash: 9b965036dd, Model: tiny-sd15, Story Enabled: '
        'True, Story Preset: 1Prompt1Story, Story Text: "A fiery illustration of A phoenix\\nrising from ashes\\n'
        'soaring through a glowing sky", Story Seed mode: same, Story Style: , Story Token spans: SOT 0; identity '
        '1-12; frames 13-17 18-22; EOT 23-76, Version: v1.10.1')


def write(path, text, seed_text=None, size=64):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(text, seed_text or str(path), size))
    return path


def story_run(folder, start, settings, seed=42, style="watercolor"):
    """Files ``start``, ``start+1``, ... for one run of STORY, named like the WebUI numbers them."""
    for i, prompt in enumerate(FRAMES):
        frame_seed = seed if settings.seed_mode == "same" else seed + i
        write(folder / f"{start + i:05d}-{frame_seed}.png", infotext(prompt, frame_seed, story=settings, style=style))


def test_parses_a_real_a1111_infotext():
    info = parse_infotext(REAL)
    assert info.prompt == "A fiery illustration of A phoenix, soaring through a glowing sky"
    assert info.negative_prompt == ""
    assert info.params["Story Text"] == \
        "A fiery illustration of A phoenix\nrising from ashes\nsoaring through a glowing sky"
    assert info.params["Story Token spans"] == "SOT 0; identity 1-12; frames 13-17 18-22; EOT 23-76"
    assert info.params["Story Style"] == "" and info.params["Seed"] == "42" and info.params["Version"] == "v1.10.1"


def test_multiline_prompt_and_negative_prompt():
    info = parse_infotext("a fox,\nin snow\nNegative prompt: blurry,\nugly\nSteps: 3, Seed: 1, Size: 64x64")
    assert (info.prompt, info.negative_prompt) == ("a fox,\nin snow", "blurry,\nugly")
    assert info.params == {"Steps": "3", "Seed": "1", "Size": "64x64"}
    assert parse_infotext("only a prompt: with a colon").params == {}


def test_png_round_trip_of_the_extensions_own_keys(tmp_path):
    settings = Settings.from_dict({"enabled": True, "story": STORY, "preset": "StoryDiffusion"})
    path = write(tmp_path / "a.png", infotext(FRAMES[0], story=settings, style="watercolor", negative="dark"))
    (frame,) = read_frames([path])
    assert frame.prompt == FRAMES[0] and frame.size == (64, 64)
    assert Settings.from_infotext(frame.params) == settings  # every Story key read back as the extension wrote it
    assert frame.params["Story Style"] == "watercolor"


def test_groups_frames_by_run(tmp_path):
    same = Settings.from_dict({"enabled": True, "story": STORY})
    sequential = Settings.from_dict({"enabled": True, "story": STORY, "seed_mode": "sequential"})
    story_run(tmp_path / "out", 0, same)
    write(tmp_path / "out" / "00003-42.png", infotext(FRAMES[0], story=same, style="watercolor"), size=96)  # board
    story_run(tmp_path / "out", 4, same)                 # the same story again: a second run
    story_run(tmp_path / "out", 7, same, seed=7)         # another seed: another group
    story_run(tmp_path / "out", 10, sequential, seed=100)  # seeds 100, 101, 102: still one run
    write(tmp_path / "out" / "00013-5.png", infotext("a plain image", 5))
    write(tmp_path / "out" / "00014-42.png", infotext(FRAMES[1], story=same, style="watercolor"))  # one frame kept
    write(tmp_path / "grids" / "00000-42.png", infotext(FRAMES[0], story=same, style="watercolor"), size=96)
    frames = read_frames(find_pngs([tmp_path, tmp_path / "out" / "00000-42.png"])[0])  # that file counts once
    stories, loose, odd = group_by_run(frames)
    assert [f.path.name for f in loose] == ["00013-5.png"]
    assert [f.path.name for f in odd] == ["00003-42.png"]
    runs = {s.name: [f.path.name for f in s.frames] for s in stories}
    assert runs == {"out/00000-42": ["00000-42.png", "00001-42.png", "00002-42.png"],
                    "out/00004-42": ["00004-42.png", "00005-42.png", "00006-42.png"],
                    "out/00014-42": ["00014-42.png"],
                    "out/00007-7": ["00007-7.png", "00008-7.png", "00009-7.png"],
                    "out/00010-100": ["00010-100.png", "00011-101.png", "00012-102.png"],
                    "grids/00000-42": ["00000-42.png"]}
    assert [s.name for s in group_by_folder(frames)] == ["grids", "out"]
    assert len(collect_stories([str(tmp_path)], "run")) == 4  # the one-image group is left out with a note


@pytest.mark.parametrize("case", ["not_png_name", "fake_png", "no_infotext", "missing", "empty_folder", "truncated",
                                  "no_prompt"])
def test_bad_input_names_the_file(tmp_path, case):
    target = tmp_path / "x.png"
    if case == "not_png_name":
        target = tmp_path / "x.jpg"
        target.write_bytes(b"jpeg")
    elif case == "fake_png":
        target.write_text("not an image")
    elif case == "no_infotext":
        write(target, None)
    elif case == "empty_folder":
        target = tmp_path / "empty"
        target.mkdir()
        (target / "notes.txt").write_text("x")
    elif case == "truncated":
        target.write_bytes(png_bytes(infotext("a fox"), "t")[:60])
    elif case == "no_prompt":
        write(target, infotext(""))
    with pytest.raises(EvaluationError, match=str(target.name)):
        read_frames(find_pngs([target])[0])


def test_cli_scores_stories_and_writes_tables_and_sheets(tmp_path, tiny_clip_path, capsys):
    settings = Settings.from_dict({"enabled": True, "story": STORY})
    story_run(tmp_path / "images", 0, settings)
    story_run(tmp_path / "images", 3, settings, seed=9)
    (tmp_path / "images" / "notes.json").write_text("{}")  # not an image: ignored
    (tmp_path / "images" / "00009-1.jpg").write_bytes(b"jpeg")  # an image without PNG infotext: left out, noted
    out = tmp_path / "images" / "eval"  # inside the scored folder: its own sheets must not be read back
    for attempt in range(2):
        assert main([str(tmp_path / "images"), "--out", str(out), "--clip", str(tiny_clip_path),
                     "--device", "cpu", "--dreamsim", "off", "--background", "off"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "left out 1 image(s) that are not PNG, e.g." in captured.err and "notes.json" not in captured.err
    assert "| overall (2 stories) | 6 |" in printed and "DreamSim: off (--dreamsim off)" in printed
    rows = list(csv.reader((out / "scores.csv").open()))
    assert rows[0] == ["story", "frames", "CLIP-T", "CLIP-I", "DreamSim"]
    assert [r[:2] for r in rows[1:]] == [["images/00000-42", "3"], ["images/00003-9", "3"],
                                        ["overall (2 stories)", "6"]]
    assert all(0 <= float(r[3]) <= 1.0000001 and r[4] == "off" for r in rows[1:])
    sheets = sorted(p.name for p in (out / "sheets").iterdir())
    assert sheets == ["images_00000-42.png", "images_00003-9.png"]
    from PIL import Image
    assert CONTACT_SHEET_KEY in Image.open(out / "sheets" / sheets[0]).info
    assert not list(out.rglob("*.tmp"))


def test_cli_reports_errors_with_the_file(tmp_path, tiny_clip_path, capsys):
    write(tmp_path / "a.png", None)
    assert main([str(tmp_path), "--out", str(tmp_path / "o"), "--clip", str(tiny_clip_path)]) == 2
    assert "a.png: the PNG has no 'parameters' infotext" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
