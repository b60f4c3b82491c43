"""What each frame of a story will be, before generating (issue 12's frames preview), host-free.

One row per frame, computed by the same functions a generation uses (``plan_story_run``, ``plan_consolidation``,
``frames_share`` and the bank rules of ``attention_hooks`` / ``story_sync``): its prompt exactly as the image's
infotext will carry it (before the WebUI's own prompt styles), its seed, its batch, whether it writes the reference
bank, which frames it takes attention from, and with 1Prompt1Story consolidation its token count and window.
Errors are the generation's own (``StoryError`` with the line, ``SettingsError`` with the field, the token budget).
"""
from __future__ import annotations

from dataclasses import dataclass

from .consistent_self_attention import frames_share
from .settings import Settings
from .story_run import (StoryRunPlan, plan_consolidation, plan_story_run, storysync_references,
                        without_extra_networks)
from .token_plan import Tokenizer


@dataclass(frozen=True)
class FramePreview:
    """One frame; frame numbers are 1-based, as in messages and captions."""
    number: int
    line: int | None                 # its story line (text form)
    characters: tuple[str, ...]      # () for [NC]
    caption: str
    prompt: str                      # the image's prompt (infotext), extra-network tags included
    seed: int
    batch: int                       # 1-based batch of the WebUI job
    reference: bool                  # writes the reference bank that later batches read
    shares_with: tuple[int, ...]     # frames whose self-attention tokens it receives
    tokens: int | None = None        # consolidation: tokens of its frame text
    window: tuple[int, ...] | None = None  # consolidation: frames in its consolidated prompt (its own first)


def sources(settings: Settings, plan: StoryRunPlan, frame: int) -> tuple[int, ...]:
    """0-based frames whose tokens ``frame`` receives under the settings' sharing method (every step that shares).

    CSA: its batch mates with a character in common; in a batch that reads the bank (not the first batch, when
    there are reference frames) the reference frames instead. StorySync: the same, restricted to its reference
    frames when it has any (Eq. 13), the frame itself never."""
    if not settings.csa:
        return ()
    groups = plan.frame_groups()
    batch = frame // plan.batch_size
    if settings.masked_sharing:
        references = storysync_references(settings, plan)
        reads_bank = plan.batch_count > 1 and bool(references) and batch > 0
    else:
        references = plan.reference_frames or None
        reads_bank = bool(plan.reference_frames) and batch > 0
    if reads_bank:
        candidates = references
    else:
        candidates = [f for f in plan.batch_frames(batch)
                      if not settings.masked_sharing or references is None or f in references]
    return tuple(f for f in candidates if f != frame and frames_share(groups, frame, f))


def preview_story(settings: Settings, style: str, seed: int, tokenize: Tokenizer | None = None) -> list[FramePreview]:
    """The frames of ``settings.story`` with ``style`` (the prompt box) and ``seed`` (already fixed, not -1).
    ``tokenize``: the checkpoint's CLIP-L tokenizer, for the consolidation columns (None leaves them empty)."""
    plan = plan_story_run(settings, style, seed)
    token_plan = None
    if settings.consolidate and tokenize is not None:
        token_plan = plan_consolidation(settings, plan.story, without_extra_networks(plan.style), tokenize)
    if settings.masked_sharing:
        references = storysync_references(settings, plan) or ()
    else:
        references = plan.reference_frames
    rows = []
    for i, frame in enumerate(plan.story.frames):
        rows.append(FramePreview(
            number=i + 1, line=frame.line, characters=frame.characters, caption=frame.caption,
            prompt=plan.frame_prompts[i], seed=plan.seeds[i], batch=i // plan.batch_size + 1,
            reference=settings.csa and i in references,
            shares_with=tuple(f + 1 for f in sources(settings, plan, i)),
            tokens=token_plan.frame_tokens[i] if token_plan else None,
            window=tuple(f + 1 for f in token_plan.frames[i].frames) if token_plan else None))
    return rows
