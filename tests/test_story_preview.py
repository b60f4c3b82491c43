"""The frames preview (lib_consistency/story_preview.py) against what a generation does: the stand-in host's
images, prompts and seeds, and the runtime's own sharing functions (in-batch plans, bank reads, StorySync's
masked peers)."""
from __future__ import annotations

import importlib

import pytest
import torch

from lib_consistency.consistent_self_attention import StepKey, plan_in_batch_sharing
from lib_consistency.masked_sharing import reference_extras, sharing_masks
from lib_consistency.reference_bank import BankKey, ReferenceBank, read_extras
from lib_consistency.row_layout import Role, a1111_step_plan
from lib_consistency.settings import Settings
from lib_consistency.story import StoryError
from lib_consistency.story_preview import preview_story
from lib_consistency.story_run import plan_story_run, storysync_references
from tests.conftest import tiny_clip_text_model
from tests.fake_webui import ToyModel, ToyProcessing, install_stub_modules

NAMED = ("Rex: a red fox <lora:fox:1>\nMia: a girl in a coat\n---\n[Rex] runs # One\n[Mia] reads\n[Rex] [Mia] talk\n"
         "[NC] rain\n[Rex] sleeps\n[Mia] sings\n[Rex] eats")
CASES = [
    dict(story=NAMED),
    dict(story=NAMED, preset="StoryDiffusion", frames_per_batch=3, seed_mode="sequential"),
    dict(story=NAMED, preset="StoryDiffusion", frames_per_batch=3, reference_frames=2, csa_layers="all"),
    dict(story=NAMED, preset="StorySync", frames_per_batch=4),
    dict(story=NAMED, preset="StorySync", reference_frames=0, frames_per_batch=0),
    dict(story=NAMED, preset="Combined", frames_per_batch=2),
    dict(story="a small fox\n" + "\n".join(f"scene {i}" for i in range(12)), frames_per_batch=5),
]


def settings(**values) -> Settings:
    return Settings.from_dict({"enabled": True, **values})


@pytest.mark.parametrize("values", CASES)
def test_preview_rows_are_the_images_the_host_makes(monkeypatch, clip_tokenizer, values):
    install_stub_modules(monkeypatch)
    pipeline = importlib.import_module("lib_consistency.hosts.pipeline")
    p = ToyProcessing(ToyModel(clip_tokenizer, tiny_clip_text_model(16, seed=5)), prompt="ink <lora:style:1>")
    p.seed = 77
    pipeline.before_process(p, Settings.from_dict({"enabled": True, **values}).to_args())
    p.setup_prompts()
    rows = preview_story(settings(**values), "ink <lora:style:1>", 77)
    assert [row.prompt for row in rows] == p.all_prompts  # what each image's infotext carries
    assert [row.seed for row in rows] == p.all_seeds
    assert [row.batch for row in rows] == [i // p.batch_size + 1 for i in range(len(rows))]
    assert max(row.batch for row in rows) == p.n_iter


def frames_of(layout, rows):
    return sorted({layout.frames[r] for r in rows})


@pytest.mark.parametrize("values", [c for c in CASES if c.get("preset") in ("StoryDiffusion", "Combined")])
def test_csa_sources_are_the_runtime_peers_and_bank_reads(values):
    s = settings(**values)
    plan = plan_story_run(s, "", 1)
    rows = preview_story(s, "", 1)
    groups = plan.frame_groups()
    bank, step = ReferenceBank(), StepKey(0, 0, 1.0)
    for ref in plan.reference_frames:
        bank.write(BankKey("L", step, Role.COND, ref), torch.full((1, 1), float(ref)))
    for batch in range(plan.batch_count):
        frames = plan.batch_frames(batch)
        layout = a1111_step_plan([1] * len(frames), frames.start)
        if plan.reference_frames and batch > 0:  # this batch reads the bank
            extras = read_extras(bank, layout, plan.reference_frames, groups, "L", step, torch.device("cpu"),
                                 torch.float32)
            for row, frame in enumerate(frames):
                read = [] if extras[row] is None else [int(v) for v in extras[row].flatten()]
                assert [f + 1 for f in read] == list(rows[frame].shares_with), frame
        else:
            peers = {r: () for r in range(len(frames))}
            for group in plan_in_batch_sharing(layout, groups).groups:
                peers.update(zip(group.rows, group.peers))
            for row, frame in enumerate(frames):
                assert tuple(f + 1 for f in frames_of(layout, peers[row])) == rows[frame].shares_with, frame
        assert [r.reference for r in rows if r.batch == batch + 1] == [f in plan.reference_frames for f in frames]


@pytest.mark.parametrize("values", [c for c in CASES if c.get("preset") == "StorySync"])
def test_storysync_sources_are_its_masked_peers_and_reference_reads(values):
    s = settings(**values)
    plan = plan_story_run(s, "", 1)
    rows = preview_story(s, "", 1)
    groups, references = plan.frame_groups(), storysync_references(s, plan)
    masks = {f: {c: torch.ones(4, dtype=torch.bool) for c in groups[f]} for f in groups}
    for batch in range(plan.batch_count):
        frames = plan.batch_frames(batch)
        layout = a1111_step_plan([1] * len(frames), frames.start)
        if plan.batch_count > 1 and references and batch > 0:
            tokens = {(Role.COND, ref): torch.full((4, 1), float(ref)) for ref in references}
            extras = reference_extras(layout, tokens, groups, masks)
            for row, frame in enumerate(frames):
                read = [] if extras[row] is None else sorted({int(v) for v in extras[row].flatten()})
                assert tuple(f + 1 for f in read) == rows[frame].shares_with, frame
        else:
            peers = sharing_masks(layout, groups, masks, reference_frames=references)
            for row, frame in enumerate(frames):
                assert tuple(f + 1 for f in frames_of(layout, [r for r, _ in peers[row]])) == \
                    rows[frame].shares_with, frame


def test_rows_show_characters_captions_references_and_no_sharing_without_csa():
    rows = preview_story(settings(story=NAMED), "", 3)
    assert [r.characters for r in rows[:4]] == [("Rex",), ("Mia",), ("Rex", "Mia"), ()]
    assert rows[0].caption == "One" and rows[0].line == 4 and rows[3].line == 7
    assert all(r.shares_with == () and not r.reference for r in rows)
    shared = preview_story(settings(story=NAMED, preset="StoryDiffusion"), "", 3)
    assert shared[0].shares_with == (3, 5, 7) and shared[3].shares_with == ()  # [NC] shares with nobody


def test_consolidation_columns_come_from_the_token_plan(tokenize):
    story = "a small red fox\n" + "\n".join(f"scene number {i} in the deep forest" for i in range(12))
    rows = preview_story(settings(story=story), "watercolor <lora:ink:1>", 1, tokenize)
    assert [r.tokens for r in rows] == [len(tokenize(f"scene number {i} in the deep forest")) for i in range(12)]
    assert rows[0].window[0] == 1 and rows[5].window[0] == 6 and len(rows[0].window) > 1  # windowed: own first
    short = preview_story(settings(story="a fox\nruns\nsleeps"), "", 1, tokenize)
    assert short[0].window == short[1].window == (1, 2)  # one consolidated prompt for all frames
    assert preview_story(settings(story="a fox\nruns\nsleeps"), "", 1)[0].tokens is None  # no tokenizer given


def test_errors_are_the_generations_own():
    with pytest.raises(StoryError, match="story line 4"):
        preview_story(settings(story="Bob: x\n---\n[Bob] a\n[Eve] b"), "", 1)
