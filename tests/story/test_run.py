"""Story → images plan and per-frame 1P1S conditioning (host-free part of a generation)."""
from __future__ import annotations

import pytest
import torch

from lib_consistency.one_prompt_one_story.svr import svr_frame_context
from lib_consistency.settings import Settings, SettingsError
from lib_consistency.story.format import StoryError
from lib_consistency.story.run import FrameConditioning, consolidation_identity, plan_consolidation, plan_story_run

NAMED = "Bob: a tall man\nAlice: a girl in red\n---\n[Bob] reads # One\n[Alice] runs\n[Bob] [Alice] talk\n[NC] rain"


def settings(**values):
    return Settings.from_dict({"enabled": True, "story": NAMED, **values})


def test_plan_expands_frames_seeds_and_batches():
    plan = plan_story_run(settings(frames_per_batch=3, seed_mode="sequential", preset="Combined"), "ink", 7)
    assert plan.frame_prompts == ("ink, a tall man, reads", "ink, a girl in red, runs",
                                  "ink, a tall man, a girl in red, talk", "ink, rain")
    assert plan.seeds == (7, 8, 9, 10) and (plan.batch_size, plan.batch_count) == (3, 2)
    assert list(plan.batch_frames(1)) == [3]
    assert plan.reference_frames == (0, 1, 2)  # CSA with several batches: the first batch writes the bank
    assert plan.frame_groups()[2] == {"Bob", "Alice"} and plan.frame_groups()[3] == frozenset()


def test_plan_defaults_one_batch_same_seed_no_bank():
    plan = plan_story_run(settings(preset="Combined"), "", 5)
    assert plan.seeds == (5,) * 4 and (plan.batch_size, plan.batch_count) == (4, 1) and plan.reference_frames == ()
    assert plan_story_run(settings(frames_per_batch=2, reference_frames=1, preset="Combined"), "", 5) \
        .reference_frames == (0,)
    assert plan_story_run(settings(frames_per_batch=2), "", 5).reference_frames == ()  # no CSA, no bank


def test_plan_reports_story_errors_with_lines():
    with pytest.raises(StoryError, match="story line 4"):
        plan_story_run(settings(story="Bob: x\n---\n[Bob] a\n[Eve] b"), "", 1)


def test_consolidation_identity_and_token_plan():
    story = plan_story_run(settings(), "", 1).story
    assert consolidation_identity("  ink   wash ", story) == "ink wash, a tall man and a girl in red"
    assert consolidation_identity("", story) == "a tall man and a girl in red"
    token_plan = plan_consolidation(settings(), story, "ink", str.split)
    assert token_plan.texts == ("ink, a tall man and a girl in red reads runs talk rain",)


def test_frame_conditioning_encodes_each_text_once_and_reweights():
    calls = []
    torch.manual_seed(0)
    base = torch.randn(77, 24)

    def encode(texts):
        calls.append(list(texts))
        return [base.clone() for _ in texts]

    s = settings()
    token_plan = plan_consolidation(s, plan_story_run(s, "", 1).story, "", str.split)
    conditioning = FrameConditioning(s, token_plan, encode)
    first = conditioning.contexts([0, 1])
    again = conditioning.contexts([1, 2, 3])
    assert calls == [[token_plan.texts[0]]]
    assert torch.equal(first[1], again[0])
    assert torch.equal(first[0], svr_frame_context(base, token_plan.frames[0]))
    assert conditioning.identity_positions() == tuple(range(0, token_plan.frames[0].identity.stop))
    npr = FrameConditioning(settings(reweighting="npr"), token_plan, encode).contexts([0])[0]
    assert not torch.equal(npr, first[0])
    none = FrameConditioning(settings(reweighting="none"), token_plan, encode).contexts([0])[0]
    assert torch.equal(none, base)


def test_frame_conditioning_refuses_a_split_prompt():
    s = settings()
    token_plan = plan_consolidation(s, plan_story_run(s, "", 1).story, "", str.split)
    conditioning = FrameConditioning(s, token_plan, lambda texts: [torch.zeros(154, 8) for _ in texts])
    with pytest.raises(RuntimeError, match="one 77-token CLIP context"):
        conditioning.contexts([0])


def test_replayed_frame_prompt_gives_back_the_style():
    s = settings()
    plan = plan_story_run(s, "ink wash", 1)
    for prompt in plan.frame_prompts:
        again = plan_story_run(s, prompt, 1)
        assert again.style == "ink wash" and again.frame_prompts == plan.frame_prompts
    assert plan_story_run(s, "a tall man, reads", 1).style == ""
    assert plan_story_run(s, "ink, a tall man, writes", 1).style == "ink, a tall man, writes"  # not a frame prompt


def test_frame_conditioning_names_a_prompt_the_encoder_cannot_encode():
    s = settings()
    token_plan = plan_consolidation(s, plan_story_run(s, "", 1).story, "", str.split)
    broken = FrameConditioning(s, token_plan, lambda texts: [torch.full((77, 8), float("nan")) for _ in texts])
    with pytest.raises(RuntimeError, match="returned NaN/inf for the consolidated prompt 'a tall man"):
        broken.contexts([0])


def test_float64_encoder_frames_do_not_accumulate():
    """One cached float64 encoding serves every frame; frame k is never reweighted on top of frames 1..k-1."""
    torch.manual_seed(3)
    base = torch.randn(77, 24, dtype=torch.float64) * 3
    s = settings()
    token_plan = plan_consolidation(s, plan_story_run(s, "", 1).story, "", str.split)
    conditioning = FrameConditioning(s, token_plan, lambda texts: [base.clone() for _ in texts])
    pristine = conditioning.contexts([0])[0]
    encoded = conditioning._encoded[token_plan.texts[0]].clone()
    together = conditioning.contexts([0, 1, 2, 3])
    assert torch.equal(conditioning._encoded[token_plan.texts[0]], encoded)  # the cache is never written
    assert torch.equal(together[0], pristine)
    for frame, context in enumerate(together):
        assert torch.equal(context, svr_frame_context(base.clone(), token_plan.frames[frame]))


def test_reweighted_context_out_of_range_is_refused_naming_the_frame():
    base = torch.randn(77, 24, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 0.3
    s = settings(story="a fox\nruns\nsleeps")
    token_plan = plan_consolidation(s, plan_story_run(s, "", 1).story, "", str.split)
    span = token_plan.frames[1].span_of(1)
    base[span.start:span.stop] *= 2000  # singular values of several hundred on frame 2's rows
    fp16 = FrameConditioning(s, token_plan, lambda texts: [base.half() for _ in texts])
    assert torch.isfinite(fp16.contexts([0])[0]).all()  # frame 1 suppresses frame 2: fine
    with pytest.raises(RuntimeError, match=r"^story frame 2: SVR turns singular values .* float16's range"):
        fp16.contexts([1])
    fp32 = FrameConditioning(s, token_plan, lambda texts: [base.float() for _ in texts])
    assert torch.isfinite(fp32.contexts([1])[0]).all()
    unet_fp16 = FrameConditioning(s, token_plan, lambda texts: [base.float() for _ in texts], torch.float16)
    with pytest.raises(RuntimeError, match="story frame 2: .*float16"):
        unet_fp16.contexts([1])
    npr = FrameConditioning(settings(story="a fox\nruns\nsleeps", reweighting="npr"), token_plan,
                            lambda texts: [(base * 20).half() for _ in texts])
    with pytest.raises(RuntimeError, match=r"story frame 2: NPR's x2 .*lower 'NPR enhance'"):
        npr.contexts([1])


def test_one_frame_story_is_refused_with_consolidation_only():
    one = "a fox with a white tail\nsleeps in a log"
    with pytest.raises(SettingsError, match=r"'consolidate': .*at least 2 frames \(this one has 1\)"):
        plan_story_run(settings(story=one), "", 1)
    plan = plan_story_run(settings(story=one, preset="StoryDiffusion"), "", 1)
    assert plan.frame_prompts == ("a fox with a white tail, sleeps in a log",)


def test_consolidated_prompt_never_holds_extra_network_tags(tokenize):
    from lib_consistency.story.format import parse_story
    from lib_consistency.story.run import plan_consolidation, without_extra_networks
    assert without_extra_networks("a hobbit <oneactor:hero:0.9>  with <lora:ink:1> a cloak") == \
        "a hobbit with a cloak"
    story = parse_story("a hobbit <oneactor:hero> with a red cloak\nwalks <lora:rain:0.5> in the rain\nsleeps")
    plan = plan_consolidation(Settings(), story, "watercolor", tokenize)
    clean = plan_consolidation(Settings(), parse_story("a hobbit with a red cloak\nwalks in the rain\nsleeps"),
                               "watercolor", tokenize)
    assert [f.text for f in plan.frames] == [f.text for f in clean.frames]
    assert all("<" not in f.text for f in plan.frames)


def test_extra_networks_of_a_prompt_as_the_host_parses_them():
    from lib_consistency.story.run import extra_networks_of
    assert extra_networks_of("ink <lora:b:1> fox <lora:a:0.5:te=1> <oneactor:rex> <lora:b:1>", ("oneactor",)) == \
        ("<lora:a:0.5:te=1>", "<lora:b:1>", "<lora:b:1>")
    assert extra_networks_of("<oneactor:rex>") == ("<oneactor:rex>",) and extra_networks_of("plain, (x:1.2)") == ()


def test_a_batch_whose_frames_name_different_networks_is_refused_with_both_frames():
    from lib_consistency.story.run import check_batch_networks
    story = plan_story_run(settings(), "", 1).story
    same = ["ink <lora:a:1>"] * 4
    check_batch_networks(story, same, [range(4)])
    mixed = ["ink <lora:a:1>", "ink <lora:a:1>", "ink <lora:b:1> <lora:a:1>", "ink"]
    with pytest.raises(ValueError, match=r"frame 1 \(story line 4\) and frame 3 \(story line 6\) are drawn in one "
                                         r"batch.*\(<lora:a:1>; <lora:a:1> <lora:b:1>\)"):
        check_batch_networks(story, mixed, [range(4)])
    check_batch_networks(story, mixed, [range(2), range(2, 3), range(3, 4)])  # each batch agrees
    with pytest.raises(ValueError, match=r"frame 3 \(story line 6\) and frame 4 \(story line 7\).*none"):
        check_batch_networks(story, mixed, [range(2), range(2, 4)])
    check_batch_networks(story, ["<oneactor:x>", "", "<oneactor:y>", ""], [range(4)], per_image=("oneactor",))
    json_text = '{"identity": "a fox", "frames": ["runs", "sits <lora:a:1>"]}'
    json_story = plan_story_run(settings(story=json_text), "", 1).story
    with pytest.raises(ValueError, match=r"frame 1 \(story field frames\[0\]\) and frame 2 \(story field frames\[1\]"):
        check_batch_networks(json_story, [f.prompt for f in json_story.frames], [range(2)])
