"""1Prompt1Story prompt consolidation: one CLIP context per frame, with token spans recorded while joining.

Paper: One-Prompt-One-Story (ICLR 2025) §3.1 "prompt consolidation"; windowing follows the official code
(circular window, current frame first), not the paper's App. D.2 trailing window (methods.md §2.2).

The consolidated prompt is ``identity + " " + frame_1 + " " + ... + frame_N`` (single spaces, nothing added).
Each piece is tokenised on its own and the spans are recorded as the pieces are concatenated, never searched
for. The tokenizer is injected (``text -> sequence of tokens`` without SOT/EOT) so each host can pass its own:
A1111 maps text with its ``tokenize_line``, which handles emphasis and textual-inversion embeddings.

One CLIP chunk holds 75 content tokens (77 with SOT and EOT). When the whole story does not fit, each frame
gets a window: the identity prompt, the frame itself, then the following frames circularly, as many as fit
(and at most ``window`` frames). A frame that cannot fit beside the identity prompt is an error; a prompt is
never split into independent chunks or truncated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

CHUNK_CONTENT_TOKENS = 75  # one CLIP context: SOT + 75 content tokens + EOT = 77
CONTEXT_TOKENS = CHUNK_CONTENT_TOKENS + 2

Tokenizer = Callable[[str], Sequence[object]]


class TokenBudgetError(ValueError):
    """A story piece does not fit into one CLIP context. ``frame`` is the 0-based frame index or None."""

    def __init__(self, message: str, frame: int | None = None):
        super().__init__(message)
        self.frame = frame


@dataclass(frozen=True)
class Span:
    """Half-open token positions [start, stop) in a 77-token context (SOT is position 0)."""
    start: int
    stop: int

    @property
    def positions(self) -> range:
        return range(self.start, self.stop)

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class FramePlan:
    """What one frame's conditioning is built from.

    ``text`` is the prompt to encode (the whole consolidated prompt, or the frame's window); ``frames`` lists the
    story frame indices it contains, the current frame first in window mode and in story order otherwise;
    ``spans[k]`` is the span of ``frames[k]``; ``eot_start`` is the first position of the EOT block (real EOT
    plus all padding up to position 76).
    """
    frame: int
    text: str
    identity: Span
    frames: tuple[int, ...]
    spans: tuple[Span, ...]
    eot_start: int

    def span_of(self, frame: int) -> Span:
        return self.spans[self.frames.index(frame)]

    @property
    def suppressed(self) -> tuple[int, ...]:
        """Other frames in this context, in the order SVR- is applied (official order: window order)."""
        return tuple(f for f in self.frames if f != self.frame)

    @property
    def identity_positions(self) -> tuple[int, ...]:
        """SOT plus the identity prompt's tokens: the rows IPCA keeps and SVR never touches."""
        return (0, *self.identity.positions)


@dataclass(frozen=True)
class TokenPlan:
    """Per-frame plans for one story. ``windowed`` is False when every frame shares one consolidated prompt."""
    frames: tuple[FramePlan, ...]
    windowed: bool
    identity_tokens: int
    frame_tokens: tuple[int, ...]

    @property
    def texts(self) -> tuple[str, ...]:
        """Distinct prompts to encode, in first-use order (one when not windowed)."""
        return tuple(dict.fromkeys(plan.text for plan in self.frames))

    def budget_line(self) -> str:
        """Human-readable token budget, e.g. for the story editor: '52/75 tokens (identity 12, frames 8+9+...)'."""
        used = self.identity_tokens + sum(self.frame_tokens)
        parts = "+".join(str(n) for n in self.frame_tokens)
        mode = f"; windowed, {max(len(p.frames) for p in self.frames)} frames per context" if self.windowed else ""
        return f"{used}/{CHUNK_CONTENT_TOKENS} tokens (identity {self.identity_tokens}, frames {parts}){mode}"


def _layout(identity_len: int, frame_lens: Sequence[int], order: Sequence[int]) -> tuple[Span, tuple[Span, ...], int]:
    """Spans of the identity and of the frames in ``order`` when concatenated after SOT; returns the EOT start."""
    identity = Span(1, 1 + identity_len)
    cursor, spans = identity.stop, []
    for f in order:
        spans.append(Span(cursor, cursor + frame_lens[f]))
        cursor += frame_lens[f]
    return identity, tuple(spans), cursor


def plan_tokens(identity: str, frames: Sequence[str], tokenize: Tokenizer, window: int = 10) -> TokenPlan:
    """Plan the consolidated prompt(s) of a story.

    Args:
        identity: the identity prompt P0 (may be empty only if frames are given).
        frames: frame prompts P1..PN (N >= 1).
        tokenize: ``text -> tokens`` without SOT/EOT and without truncation (the host's own tokenizer).
        window: the most frames one context may hold (official default 10).

    Without windowing every frame shares ``identity + " " + " ".join(frames)``. With it (content over 75
    tokens, or more frames than ``window``) frame i gets ``identity + frames[i], frames[i+1], ...`` circularly.
    """
    if not frames:
        raise TokenBudgetError("the story has no frames")
    if window < 1:
        raise TokenBudgetError(f"window must be at least 1 frame, got {window}")
    identity_len = len(tokenize(identity)) if identity else 0
    if identity_len > CHUNK_CONTENT_TOKENS - 1:
        raise TokenBudgetError(f"the identity prompt is {identity_len} tokens; it must leave room for a frame "
                               f"within {CHUNK_CONTENT_TOKENS} tokens")
    frame_lens = tuple(len(tokenize(text)) for text in frames)
    for i, n in enumerate(frame_lens):
        if n == 0:
            raise TokenBudgetError(f"frame {i + 1} has no tokens", frame=i)
        if identity_len + n > CHUNK_CONTENT_TOKENS:
            raise TokenBudgetError(
                f"frame {i + 1} is {n} tokens; with the {identity_len}-token identity prompt it exceeds the "
                f"{CHUNK_CONTENT_TOKENS}-token budget of one CLIP context: shorten it", frame=i)

    count = len(frames)
    windowed = identity_len + sum(frame_lens) > CHUNK_CONTENT_TOKENS or count > window
    plans = []
    for current in range(count):
        if windowed:
            order, used = [current], identity_len + frame_lens[current]
            for step in range(1, min(window, count)):
                nxt = (current + step) % count
                if used + frame_lens[nxt] > CHUNK_CONTENT_TOKENS:
                    break
                order.append(nxt)
                used += frame_lens[nxt]
        else:
            order = list(range(count))
        identity_span, spans, eot_start = _layout(identity_len, frame_lens, order)
        text = " ".join(([identity] if identity else []) + [frames[f] for f in order])
        plans.append(FramePlan(current, text, identity_span, tuple(order), spans, eot_start))
    return TokenPlan(tuple(plans), windowed, identity_len, frame_lens)
