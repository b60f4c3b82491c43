"""1Prompt1Story prompt consolidation: one CLIP context per frame, with token spans recorded while joining.

Paper: One-Prompt-One-Story (ICLR 2025) §3.1 "prompt consolidation"; windowing follows the official code
(circular window, current frame first), not the paper's App. D.2 trailing window (methods.md §2.2).

The consolidated prompt is ``identity + " " + frame_1 + " " + ... + frame_N`` (single spaces, nothing added).
Each piece is tokenised on its own and the spans are recorded as the pieces are concatenated, never searched
for. The tokenizer is injected (``text -> sequence of tokens`` without SOT/EOT) so each host can pass its own:
A1111 maps text with its ``tokenize_line``, which handles emphasis and textual-inversion embeddings.

Counting is not proof (methods.md §2.8 step A2): an emphasis bracket or an embedding name that crosses from one
piece into the next tokenises differently inside the joined prompt and would shift every later span silently.
``verify_token_plan`` tokenises every consolidated text once with the host's tokenizer and checks that it is
exactly the pieces' tokens in plan order (ids, emphasis weights and embedding vectors alike), naming the frame
where they part.

One CLIP chunk holds 75 content tokens (77 with SOT and EOT). Flux's T5 context (``TextContext``) has no start
token and room for 511 content tokens before its end token on Flux.1 dev (512 in training), 255 on schnell (256);
the WebUIs pad it to at least 256 rows. When the whole story does not fit, each frame gets a window: the identity prompt, the frame itself, then the following frames circularly, as many as fit
(and at most ``window`` frames). A frame that cannot fit beside the identity prompt is an error; a prompt is
never split into independent chunks or truncated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

CHUNK_CONTENT_TOKENS = 75  # one CLIP context: SOT + 75 content tokens + EOT = 77
CONTEXT_TOKENS = CHUNK_CONTENT_TOKENS + 2

Tokenizer = Callable[[str], Sequence[object]]


@dataclass(frozen=True)
class TextContext:
    """Where a prompt's tokens sit in the text encoder's context: content from ``first`` (after a start token, if
    any), at most ``budget`` content tokens, then the end token and padding (the "EOT block"); ``rows`` the
    context's length when fixed (CLIP 77), None when the host pads to a length of its own (T5 in the WebUIs)."""
    name: str
    first: int
    budget: int
    rows: int | None

    @property
    def start_positions(self) -> tuple[int, ...]:
        """The positions before the content (CLIP's SOT), kept with the identity by SVR and IPCA."""
        return tuple(range(self.first))


CLIP_CONTEXT = TextContext("CLIP", 1, CHUNK_CONTENT_TOKENS, CONTEXT_TOKENS)
T5_DEV_CONTEXT = TextContext("T5", 0, 511, None)  # Flux.1 dev: 512 tokens in training, the last one </s>
T5_SCHNELL_CONTEXT = TextContext("T5", 0, 255, None)  # schnell: 256


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
    context: TextContext = CLIP_CONTEXT

    def span_of(self, frame: int) -> Span:
        return self.spans[self.frames.index(frame)]

    @property
    def suppressed(self) -> tuple[int, ...]:
        """Other frames in this context, in the order SVR- is applied (official order: window order)."""
        return tuple(f for f in self.frames if f != self.frame)

    @property
    def identity_positions(self) -> tuple[int, ...]:
        """SOT (CLIP; T5 has none) plus the identity prompt's tokens: the rows IPCA keeps and SVR never touches."""
        return (*self.context.start_positions, *self.identity.positions)


class TokenSpanError(TokenBudgetError):
    """The host tokenises a consolidated prompt differently from its pieces (``frame`` None: the identity)."""


@dataclass(frozen=True)
class TokenPlan:
    """Per-frame plans for one story. ``windowed`` is False when every frame shares one consolidated prompt.
    ``identity_text`` / ``frame_texts`` are the pieces the texts were joined from."""
    frames: tuple[FramePlan, ...]
    windowed: bool
    identity_tokens: int
    frame_tokens: tuple[int, ...]
    identity_text: str = ""
    frame_texts: tuple[str, ...] = ()
    context: TextContext = CLIP_CONTEXT

    @property
    def texts(self) -> tuple[str, ...]:
        """Distinct prompts to encode, in first-use order (one when not windowed)."""
        return tuple(dict.fromkeys(plan.text for plan in self.frames))

    def budget_line(self) -> str:
        """Human-readable token budget, e.g. for the story editor: '52/75 tokens (identity 12, frames 8+9+...)'."""
        used = self.identity_tokens + sum(self.frame_tokens)
        parts = "+".join(str(n) for n in self.frame_tokens)
        mode = f"; windowed, {max(len(p.frames) for p in self.frames)} frames per context" if self.windowed else ""
        name = "" if self.context is CLIP_CONTEXT else f" {self.context.name}"
        return f"{used}/{self.context.budget}{name} tokens (identity {self.identity_tokens}, frames {parts}){mode}"

    def spans_line(self) -> str:
        """The token positions for the infotext (inclusive ranges, frames 1-based), e.g.
        ``SOT 0; identity 1-12; frames 13-17 18-22 23-30; EOT 31-76``; windowed, each frame's own span and the
        frames after it: ``...; windows 1@13-17+2+3 2@13-16+3+4 ...; EOT after each window``."""
        def r(span: Span) -> str:
            return f"{span.start}-{span.stop - 1}" if len(span) else "none"
        head = ("SOT 0; " if self.context.first else f"{self.context.name} ") + \
            f"identity {r(self.frames[0].identity)}"
        if not self.windowed:
            plan = self.frames[0]
            end = f"-{self.context.rows - 1}" if self.context.rows else " on"
            return f"{head}; frames {' '.join(r(s) for s in plan.spans)}; EOT {plan.eot_start}{end}"
        windows = " ".join(f"{p.frame + 1}@{r(p.spans[0])}" + "".join(f"+{f + 1}" for f in p.frames[1:])
                           for p in self.frames)
        return f"{head}; windows {windows}; EOT after each window"


def _layout(identity_len: int, frame_lens: Sequence[int], order: Sequence[int],
            first: int) -> tuple[Span, tuple[Span, ...], int]:
    """Spans of the identity and of the frames in ``order`` when concatenated from ``first``; returns the EOT
    start."""
    identity = Span(first, first + identity_len)
    cursor, spans = identity.stop, []
    for f in order:
        spans.append(Span(cursor, cursor + frame_lens[f]))
        cursor += frame_lens[f]
    return identity, tuple(spans), cursor


def plan_tokens(identity: str, frames: Sequence[str], tokenize: Tokenizer, window: int = 10,
                context: TextContext = CLIP_CONTEXT) -> TokenPlan:
    """Plan the consolidated prompt(s) of a story.

    Args:
        identity: the identity prompt P0 (may be empty only if frames are given).
        frames: frame prompts P1..PN (N >= 1).
        tokenize: ``text -> tokens`` without SOT/EOT and without truncation (the host's own tokenizer).
        window: the most frames one context may hold (official default 10).
        context: the encoder's context (CLIP's 77 tokens; Flux's T5).

    Without windowing every frame shares ``identity + " " + " ".join(frames)``. With it (content over the
    budget, or more frames than ``window``) frame i gets ``identity + frames[i], frames[i+1], ...`` circularly.
    """
    budget, what = context.budget, ("one CLIP context" if context is CLIP_CONTEXT else
                                     f"the {context.name} context")
    if not frames:
        raise TokenBudgetError("the story has no frames")
    if window < 1:
        raise TokenBudgetError(f"window must be at least 1 frame, got {window}")
    identity_len = len(tokenize(identity)) if identity else 0
    if identity_len > budget - 1:
        raise TokenBudgetError(f"the identity prompt is {identity_len} tokens; it must leave room for a frame "
                               f"within {budget} tokens")
    frame_lens = tuple(len(tokenize(text)) for text in frames)
    for i, n in enumerate(frame_lens):
        if n == 0:
            raise TokenBudgetError(f"frame {i + 1} has no tokens", frame=i)
        if identity_len + n > budget:
            raise TokenBudgetError(
                f"frame {i + 1} is {n} tokens; with the {identity_len}-token identity prompt it exceeds the "
                f"{budget}-token budget of {what}: shorten it", frame=i)

    count = len(frames)
    windowed = identity_len + sum(frame_lens) > budget or count > window
    plans = []
    for current in range(count):
        if windowed:
            order, used = [current], identity_len + frame_lens[current]
            for step in range(1, min(window, count)):
                nxt = (current + step) % count
                if used + frame_lens[nxt] > budget:
                    break
                order.append(nxt)
                used += frame_lens[nxt]
        else:
            order = list(range(count))
        identity_span, spans, eot_start = _layout(identity_len, frame_lens, order, context.first)
        text = " ".join(([identity] if identity else []) + [frames[f] for f in order])
        plans.append(FramePlan(current, text, identity_span, tuple(order), spans, eot_start, context))
    return TokenPlan(tuple(plans), windowed, identity_len, frame_lens, identity, tuple(frames), context)


def verify_token_plan(plan: TokenPlan, tokenize: Tokenizer, encoder: str = "the text encoder") -> None:
    """Check, once per generation, that the host's tokenisation of every consolidated text puts each piece where
    the plan says (methods.md §2.8 step A2).

    ``tokenize`` must return comparable per-token items (the hosts give (id, emphasis weight, embedding) tuples) so
    that a shifted weight or embedding counts as a difference, not only a shifted id. Raises ``TokenSpanError``
    naming the line (identity prompt or frame) where the joined text departs from its pieces.
    """
    if len(plan.frame_texts) != len(plan.frames):
        raise ValueError("verify_token_plan needs the plan's piece texts (plan_tokens records them)")
    pieces: dict[int | None, list] = {None: list(tokenize(plan.identity_text)) if plan.identity_text else []}
    for f, text in enumerate(plan.frame_texts):
        pieces[f] = list(tokenize(text))
    for text, frame_plan in {p.text: p for p in plan.frames}.items():
        joined = list(tokenize(text))
        order = [None, *frame_plan.frames]
        expected = [item for piece in order for item in pieces[piece]]
        if joined == expected:
            continue
        first = next((i for i, (a, b) in enumerate(zip(joined, expected)) if a != b), min(len(joined),
                                                                                          len(expected)))
        owners = [piece for piece in order for _ in pieces[piece]]
        at = min(first, len(owners) - 1)
        owner = owners[at]
        where = _piece_name(plan, owner)
        # A difference at the first or last token of a piece is a seam: a bracket or an embedding name runs from
        # one line into the next (either may be at fault); ``frame`` is the earlier line.
        if at > 0 and owners[at - 1] != owner:
            owner = owners[at - 1]
            where = f"{_piece_name(plan, owner)} where it meets {where}"
        elif at + 1 < len(owners) and owners[at + 1] != owner:
            where += f" where it meets {_piece_name(plan, owners[at + 1])}"
        raise TokenSpanError(
            f"{where} tokenises differently inside the consolidated prompt ({encoder}: {len(joined)} tokens "
            f"joined, {len(expected)} from its lines; first difference at token {first + 1}); an emphasis bracket "
            f"or an embedding name must open and close within one line", frame=owner)


def _piece_name(plan: TokenPlan, piece: int | None) -> str:
    return "the identity prompt" if piece is None else f"frame {piece + 1} ({plan.frame_texts[piece]!r})"
