"""Prompt consolidation: spans recorded while joining, windows past 75 tokens, budget errors."""
from __future__ import annotations

import re

import pytest
import torch

from lib_consistency.one_prompt_one_story.token_plan import (CHUNK_CONTENT_TOKENS, TokenBudgetError, TokenSpanError,
                                                             plan_tokens, verify_token_plan)


def joined_tokens(plan, tokenize):
    return [None] + list(tokenize(plan.text))  # position 0 is SOT


def test_spans_match_joined_tokenization_on_consistory_plus(consistory_plus, tokenize):
    """Every benchmark set: the recorded spans hold exactly the tokens of the joined string at those positions."""
    assert len(consistory_plus) == 192
    for identity, frames in consistory_plus:
        plan = plan_tokens(identity, frames, tokenize)
        assert not plan.windowed, identity  # ConsiStory+ fits in one chunk (methods.md §2.2)
        for fp in plan.frames:
            tokens = joined_tokens(fp, tokenize)
            assert len(tokens) == fp.eot_start, identity
            assert tokens[fp.identity.start:fp.identity.stop] == list(tokenize(identity))
            for frame, span in zip(fp.frames, fp.spans):
                assert tokens[span.start:span.stop] == list(tokenize(frames[frame])), (identity, frame)
            assert fp.text == identity + " " + " ".join(frames)


def test_consistory_plus_content_lengths(consistory_plus, tokenize):
    lengths = [plan_tokens(i, f, tokenize).frames[0].eot_start - 1 for i, f in consistory_plus]
    assert min(lengths) >= 20 and max(lengths) <= CHUNK_CONTENT_TOKENS


def test_window_kicks_in_exactly_past_75_tokens():
    tokenize = str.split  # one token per word: lengths are exact and easy to reason about
    identity = " ".join(["id"] * 15)
    frames = [" ".join([f"f{i}"] * 10) for i in range(6)]  # 15 + 60 = 75: fits
    assert not plan_tokens(identity, frames, tokenize).windowed
    frames[-1] += " extra"                                  # 76: window
    plan = plan_tokens(identity, frames, tokenize)
    assert plan.windowed
    for fp in plan.frames:
        assert fp.frames[0] == fp.frame                     # current frame first
        assert fp.eot_start - 1 <= CHUNK_CONTENT_TOKENS
        # circular order after the current frame
        assert list(fp.frames) == [(fp.frame + k) % 6 for k in range(len(fp.frames))]
        assert fp.text.split()[:15] == ["id"] * 15
    # frame 0 takes frames 0..4 (15+50=65, +11 > 75); frame 5 (11 tokens) takes 5, 0..3 (15+11+40=66)
    assert plan.frames[0].frames == (0, 1, 2, 3, 4)
    assert plan.frames[5].frames == (5, 0, 1, 2, 3)


def test_window_also_applies_when_frames_exceed_window_setting():
    plan = plan_tokens("hero", [f"scene {i}" for i in range(5)], str.split, window=3)
    assert plan.windowed
    assert [fp.frames for fp in plan.frames] == [(0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 0), (4, 0, 1)]
    assert plan.texts[3] == "hero scene 3 scene 4 scene 0"


def test_windowed_spans_match_joined_tokenization(tokenize):
    identity = "A watercolor illustration of a small red fox with a white-tipped tail"
    frames = [f"walking through a snowy birch forest at dawn, scene {i}, looking at the frozen river" for i in range(8)]
    plan = plan_tokens(identity, frames, tokenize)
    assert plan.windowed
    for fp in plan.frames:
        tokens = joined_tokens(fp, tokenize)
        assert len(tokens) == fp.eot_start <= CHUNK_CONTENT_TOKENS + 1
        for frame, span in zip(fp.frames, fp.spans):
            assert tokens[span.start:span.stop] == list(tokenize(frames[frame]))


def test_suppressed_order_and_identity_positions():
    plan = plan_tokens("a b", ["c", "d e", "f"], str.split)
    fp = plan.frames[1]
    assert fp.suppressed == (0, 2)
    assert fp.identity_positions == (0, 1, 2)
    assert [(s.start, s.stop) for s in fp.spans] == [(3, 4), (4, 6), (6, 7)]
    assert fp.eot_start == 7
    assert plan.texts == ("a b c d e f",)
    assert plan.budget_line() == "6/75 tokens (identity 2, frames 1+2+1)"


@pytest.mark.parametrize("identity, frames, message, frame", [
    ("id", [], "no frames", None),
    (" ".join(["x"] * 75), ["a"], "identity prompt is 75 tokens", None),
    ("id " * 10, ["ok", " ".join(["w"] * 70)], "frame 2 is 70 tokens", 1),
    ("id", ["fine", ""], "frame 2 has no tokens", 1),
])
def test_budget_errors_name_the_frame(identity, frames, message, frame):
    with pytest.raises(TokenBudgetError, match=message) as info:
        plan_tokens(identity.strip(), frames, str.split)
    assert info.value.frame == frame


def test_window_must_be_positive():
    with pytest.raises(TokenBudgetError, match="window"):
        plan_tokens("id", ["a"], str.split, window=0)


def test_host_tokenizer_is_used_for_counts():
    """A host tokenizer where a textual-inversion name expands to 4 vectors: spans follow its counts."""
    def host_tokenize(text):
        out = []
        for word in text.split():
            out.extend([word] * (4 if word == "<ti>" else 1))
        return out
    plan = plan_tokens("a <ti> hero", ["runs", "jumps"], host_tokenize)
    fp = plan.frames[0]
    assert fp.identity.stop == 1 + 6 and fp.span_of(1).start == 8 and fp.eot_start == 9


# --- spans verified with the host's tokenizer (methods.md §2.8 step A2) -------------------------------------------


def emphasis_tokenizer(text):
    """A1111-like: words are tokens carrying a weight; '(' multiplies by 1.1 until its ')', an unmatched ')' is a
    word of its own, and the two-word embedding name 'hero style' becomes 3 embedding vectors."""
    items, weight, depth = [], 1.0, 0
    words = text.replace("(", " ( ").replace(")", " ) ").split()
    i = 0
    while i < len(words):
        word = words[i]
        if word == "(":
            depth, weight = depth + 1, weight * 1.1
        elif word == ")" and depth:
            depth, weight = depth - 1, weight / 1.1
        elif word == "hero" and words[i + 1:i + 2] == ["style"]:
            items += [(0, weight, "hero style")] * 3
            i += 1
        else:
            items.append((word, weight, None))
        i += 1
    return items


def test_verified_plan_passes_for_well_formed_pieces(consistory_plus, tokenize):
    for identity, frames in consistory_plus:
        verify_token_plan(plan_tokens(identity, frames, tokenize), tokenize, "CLIP-L")
    story = ("a (red:1.2) fox in hero style", ["(runs) through snow", "sleeps", "hero style dances"])
    verify_token_plan(plan_tokens(*story, emphasis_tokenizer), emphasis_tokenizer)


@pytest.mark.parametrize("identity, frames, where, frame", [
    # an unclosed bracket: alone, 'fox' is emphasised; joined, the frame's ')' closes it and is not a token
    ("a (red fox", ["runs)", "sleeps"], "the identity prompt", None),
    ("a red fox", ["runs (fast", "sleeps)"], "frame 1 ('runs (fast')", 0),
    # an embedding name split across two lines
    ("a fox in hero", ["style runs", "sleeps"], "the identity prompt where it meets frame 1 ('style runs')", None),
    ("a fox", ["runs", "sleeps in hero", "style dances"], "frame 2 ('sleeps in hero') where it meets frame 3", 1),
])
def test_a_shifted_span_is_detected_naming_the_line(identity, frames, where, frame):
    plan = plan_tokens(identity, frames, emphasis_tokenizer)
    with pytest.raises(TokenSpanError, match=re.escape(where)) as caught:
        verify_token_plan(plan, emphasis_tokenizer, "CLIP-L")
    assert caught.value.frame == frame and "(CLIP-L: " in str(caught.value)


def test_windowed_texts_are_each_verified():
    frames = [f"scene {i} " + "w " * 20 for i in range(5)]
    frames[3] = "scene 3 (" + "w " * 20
    plan = plan_tokens("hero", frames, emphasis_tokenizer)
    assert plan.windowed
    with pytest.raises(TokenSpanError, match=r"frame 4 \('scene 3 \("):
        verify_token_plan(plan, emphasis_tokenizer)


def test_spans_line_for_the_infotext():
    plan = plan_tokens("a red fox", ["in the snow", "by a lake"], str.split)
    assert plan.spans_line() == "SOT 0; identity 1-3; frames 4-6 7-9; EOT 10-76"
    windowed = plan_tokens("hero", [f"s{i} " + "w " * 30 for i in range(3)], str.split)
    assert windowed.spans_line() == "SOT 0; identity 1-1; windows 1@2-32+2 2@2-32+3 3@2-32+1; EOT after each window"


def test_a_t5_plan_starts_at_zero_and_counts_against_its_budget():
    from lib_consistency.one_prompt_one_story.svr import svr_frame_context
    from lib_consistency.one_prompt_one_story.token_plan import T5_DEV_CONTEXT, T5_SCHNELL_CONTEXT
    words = str.split
    frames = ["word " * 100, "word " * 100, "word " * 100]
    plan = plan_tokens("a fox", frames, words, context=T5_DEV_CONTEXT)
    assert not plan.windowed  # 302 tokens fit T5 dev's 511
    first = plan.frames[0]
    assert first.identity.start == 0 and first.identity_positions == (0, 1)  # no start token
    assert [s.start for s in first.spans] == [2, 102, 202] and first.eot_start == 302
    assert plan.spans_line() == "T5 identity 0-1; frames 2-101 102-201 202-301; EOT 302 on"
    assert plan.budget_line() == "302/511 T5 tokens (identity 2, frames 100+100+100)"
    schnell = plan_tokens("a fox", frames, words, context=T5_SCHNELL_CONTEXT)
    assert schnell.windowed and all(len(p.frames) == 2 for p in schnell.frames)  # 255: two frames per window
    with pytest.raises(TokenBudgetError, match="255-token budget of the T5 context"):
        plan_tokens("a fox", ["word " * 260], words, context=T5_SCHNELL_CONTEXT)
    # SVR on a T5 context: the EOT block is </s> and every padding row after it; identity rows untouched
    context = torch.randn(320, 16, dtype=torch.float64)
    out = svr_frame_context(context, first)
    assert torch.equal(out[:2], context[:2]) and not torch.equal(out[302:], context[302:])
