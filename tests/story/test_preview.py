"""The frames preview (lib_consistency/story/preview.py) against what a generation does: the stand-in host's
images, prompts and seeds, and the runtime's own sharing functions (in-batch plans, bank reads, StorySync's
masked peers)."""
from __future__ import annotations

import html
import importlib
import re
from html.parser import HTMLParser

import pytest
import torch

from lib_consistency.common.addresses import StepKey
from lib_consistency.common.row_layout import Role, a1111_step_plan
from lib_consistency.settings import Settings
from lib_consistency.story.examples import EXAMPLES
from lib_consistency.story.format import StoryError, parse_story
from lib_consistency.story.preview import preview_panel, preview_story, seed_of, story_hash
from lib_consistency.story.run import plan_consolidation, plan_story_run, storysync_references
from lib_consistency.story_diffusion.consistent_self_attention import plan_in_batch_sharing
from lib_consistency.story_diffusion.reference_bank import BankKey, ReferenceBank, read_extras
from lib_consistency.story_sync.masked_sharing import reference_peers, sharing_masks
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
    pipeline.before_process(p, Settings.from_dict({"enabled": True, **values, "storyboard": False}).to_args())
    processed = p.process_images(pipeline)
    rows = preview_story(settings(**values), "ink <lora:style:1>", 77)
    assert [row.prompt for row in rows] == p.all_prompts  # what each image's infotext carries
    assert [row.seed for row in rows] == p.all_seeds
    assert [f"{row.prompt}\nSeed: {row.seed}" for row in rows] == processed.infotexts  # in story order
    assert max(row.batch for row in rows) == p.n_iter == len(p.drawn)
    for batch, (prompts, seeds, _) in enumerate(p.drawn):  # what the host drew in each batch
        frames = [r for r in rows if r.batch == batch + 1]
        assert [r.prompt for r in frames] == prompts
        assert [r.seed for r in frames] == seeds


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
        layout = a1111_step_plan([1] * len(frames), frames)
        if plan.bank_role(batch) == "read":  # this batch reads the bank
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
        layout = a1111_step_plan([1] * len(frames), frames)
        if plan.bank_role(batch, references or ()) == "read":
            entries = [(Role.COND, ref) for ref in references]
            peers = reference_peers(layout, entries, groups, masks)
            for row, frame in enumerate(frames):
                read = sorted(entries[source - layout.num_rows][1] for source, _ in peers[row])
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


# --- the accordion's panel (story.preview.preview_panel) ----------------------------------------------------------

WORDS = [("CLIP-L", str.split)]  # a stand-in tokenizer: one token per word


def status_of(panel: str) -> str:
    return re.search(r'<p class="cs-status[^>]*>(.*?)</p>', panel).group(1)


def rows_of(panel: str) -> list[dict[str, str]]:
    """data-* attributes and cell texts of each frame row."""
    rows = []
    for attrs, cells in re.findall(r'<tr class="cs-frame"([^>]*)>(.*?)</tr>', panel):
        row = dict(re.findall(r'data-([a-z]+)="([^"]*)"', attrs))
        row["cells"] = [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td>(.*?)</td>", cells)]
        rows.append(row)
    return rows


class TagBalance(HTMLParser):
    def __init__(self):
        super().__init__()
        self.open: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open.pop() == tag


def test_panel_status_shows_counts_budget_and_errors_with_their_line():
    story = "a red fox\nin the snow # Morning\n[NC] an empty lake\n"
    assert status_of(preview_panel({"story": story}, "", 1, WORDS)) == \
        "2 frames; 9/75 tokens (identity 3, frames 3+3)"
    assert "once a model is loaded" in status_of(preview_panel({"story": story}, "", 1, []))
    assert status_of(preview_panel({"story": story, "consolidate": False, "reweighting": "none", "ipca": False},
                                   "", 1, [])) == "2 frames"
    named = "Bob: a man\nAl: a boy\n---\n[Bob] walks\n[Al] runs\n[Bob] [Al] talk"
    assert status_of(preview_panel({"story": named, "preset": "StoryDiffusion", "frames_per_batch": 2}, "", 1, [])) \
        == "3 frames, 2 characters, 2 batches of 2 (frames 1-2 write the reference bank)"
    bad = preview_panel({"story": "Bob: a man\n---\n[Bob] walks\n[Bobb] runs"}, "", 1, WORDS)
    assert 'cs-error" data-line="4"' in bad and "story line 4: unknown character tag [Bobb]" in bad
    long = preview_panel({"story": "a fox\nsits\n" + "word " * 80}, "", 1, WORDS)
    assert 'cs-error" data-line="3"' in long and "exceeds" in long
    assert len(rows_of(long)) == 2 and "count" not in rows_of(long)[0]  # rows stay, without token counts
    one = preview_panel({"story": "a fox\nsits"}, "", 1, WORDS)
    assert "setting &#x27;Consolidate the story into one prompt&#x27;: 1Prompt1Story consolidation needs" in one
    assert preview_panel({"story": "  \n"}, "", 1, WORDS) == ""
    assert "setting &#x27;Most frames per prompt window&#x27;: 0 is out of range" in \
        preview_panel({"story": story, "window": 0}, "", 1, WORDS)
    assert "setting &#x27;colour&#x27;: unknown key" in preview_panel({"story": story, "colour": 1}, "", 1, WORDS)


def test_panel_names_a_span_the_second_encoder_shifts():
    def shifting(text):  # an encoder whose tokenisation of the joined text differs from its pieces
        return text.replace("fox in", "fox-in").split()
    panel = preview_panel({"story": "a red fox\nin the snow\nby a lake"}, "", 1,
                          [("CLIP-L", str.split), ("OpenCLIP bigG", shifting)])
    assert "&#9888;" in panel and "frame 1 (&#x27;in the snow&#x27;)" in panel and "OpenCLIP bigG" in panel


@pytest.mark.parametrize("values", CASES)
def test_panel_rows_are_the_preview_rows(values, tokenize):
    s = settings(**values)
    panel = preview_panel(s.to_args(), "ink <lora:style:1>", 77, [("CLIP-L", tokenize)])
    TagBalance().feed(panel)
    expected = preview_story(s, "ink <lora:style:1>", 77, tokenize)
    rows = rows_of(panel)
    assert [int(r["frame"]) for r in rows] == [e.number for e in expected]
    assert [int(r["line"]) for r in rows] == [e.line for e in expected]
    assert [(int(r["count"]), int(r["limit"])) for r in rows] == [(e.count, e.limit) for e in expected]
    assert [r["cells"][3] for r in rows] == [html.escape(e.prompt) for e in expected]
    assert [r["cells"][4] for r in rows] == [str(e.seed) for e in expected]
    assert 'data-story-hash="%s"' % story_hash(s.story) in panel


def test_token_counts_are_the_host_counter_numbers(tokenize):
    story = "a small red fox\n" + "\n".join(f"scene number {i} in the deep forest" for i in range(12))
    windowed = preview_story(settings(story=story), "ink", 1, tokenize)
    plan = plan_consolidation(settings(story=story), parse_story(story), "ink", tokenize)
    assert [(r.count, r.limit) for r in windowed] == [(p.eot_start - 1, 75) for p in plan.frames]
    plain = settings(story=story + " " + "very " * 70, consolidate=False, reweighting="none", ipca=False)
    rows = preview_story(plain, "ink <lora:x:1>", 1, tokenize)
    assert [r.count for r in rows] == [len(tokenize(f"ink, a small red fox, {f.prompt}"))
                                       for f in parse_story(plain.story).frames]
    assert rows[0].limit == 75 and rows[-1].count > 75 and rows[-1].limit == 150  # two chunks, as the host shows


def test_panel_columns_follow_the_methods_and_seeds_follow_the_seed_box():
    story = "Bob: a man\n---\n[Bob] walks\n[NC] rain\n[Bob] runs"
    plain = preview_panel({"story": story, "seed_mode": "sequential", "consolidate": False, "reweighting": "none",
                           "ipca": False}, "", "-1", [])
    assert "Shares attention" not in plain and "Tokens" not in plain and "Window" not in plain
    assert [r["cells"][4] for r in rows_of(plain)] == ["random", "random + 1", "random + 2"]
    assert [r["cells"][1] for r in rows_of(plain)] == ["Bob", "[NC]", "Bob"]
    shared = preview_panel({"story": story, "preset": "Combined", "seed_mode": "sequential"}, "", 12.0, WORDS)
    assert "Shares attention" in shared and "Tokens" in shared and "Window" in shared
    assert [r["cells"][4] for r in rows_of(shared)] == ["12", "13", "14"]
    assert [r["cells"][6] for r in rows_of(shared)] == ["3", "none", "1"]
    assert [seed_of(v) for v in (5, "7", " 8 ", 9.0, -1, "", None, "x", float("inf"))] == \
        [5, 7, 8, 9, None, None, None, None, None]


def test_panel_escapes_what_the_user_typed():
    panel = preview_panel({"story": "a <b>fox</b>\nsits & waits # <i>cap</i>\nruns"}, "<script>", 1, WORDS)
    assert "<b>" not in panel and "<i>" not in panel and "<script>" not in panel
    assert "&lt;script&gt;, a &lt;b&gt;fox&lt;/b&gt;, sits &amp; waits" in panel
    TagBalance().feed(panel)


def naive_fnv1a_utf16(text: str) -> int:
    units = []
    for ch in text:  # UTF-16 code units, as JavaScript's charCodeAt reads them
        code = ord(ch)
        units += [code] if code < 0x10000 else [0xD800 + ((code - 0x10000) >> 10), 0xDC00 + ((code - 0x10000) & 0x3FF)]
    h = 2166136261
    for unit in units:
        h = ((h ^ unit) * 16777619) % 2 ** 32
    return h


def test_story_hash_is_fnv1a_over_utf16_code_units():
    assert story_hash("") == "811c9dc5" and story_hash("a") == "e40c292c" and story_hash("foobar") == "bf9cf968"
    for text in ("héllo\nwörld", "emoji 😀 and 𝒳", "[Bob] walks # One\r"):
        assert story_hash(text) == f"{naive_fnv1a_utf16(text):08x}"
    assert story_hash("a fox\nsits") != story_hash("a fox\nsits ")


def test_example_stories_parse_and_show_what_they_are_named_for(tokenize):
    one, named, long = (parse_story(EXAMPLES[name]) for name in EXAMPLES)
    assert one.shorthand and any(not f.characters for f in one.frames) and any(f.caption for f in one.frames)
    assert len(named.characters) >= 3 and any(not f.characters for f in named.frames)
    assert any(len(f.characters) > 1 for f in named.frames) and all(c.subject for c in named.characters)
    assert len(long.frames) >= 12
    for name, text in EXAMPLES.items():
        for values in ({}, {"preset": "Combined", "frames_per_batch": 4}):
            panel = preview_panel({"story": text, **values}, "watercolor", 42, [("CLIP-L", tokenize)])
            assert "cs-status cs-error" not in panel and len(rows_of(panel)) == len(parse_story(text).frames), name
    windowed = preview_story(settings(story=EXAMPLES["Long story (16 frames)"]), "watercolor", 42, tokenize)
    assert len(windowed[0].window) < len(windowed)  # too long for one prompt: each frame gets a window
