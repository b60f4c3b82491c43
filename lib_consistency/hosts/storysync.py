"""StorySync's host side (A1111 1.10 and Forge): its per-generation state from the story and the checkpoint's own
tokenizer, and the mask images ("show masks"). The pre-pass for BLI is in ``prepass.py``; the hooks and patches in
``surfaces/attention_modules`` (A1111) and ``surfaces/forge_patches`` (Forge).
"""
from __future__ import annotations

from modules import extra_networks

from ..common.addresses import DitDepth
from ..settings import Settings
from ..story.run import StoryRunPlan, storysync_references, storysync_settings
from ..story_diffusion.reference_bank import ReferenceBank
from ..story_sync.state import StorySyncState
from ..story_sync.subject_tokens import (consolidated_identity_pieces, frame_prompt_pieces, story_subjects,
                                         subject_positions)
from .storyboard import mask_overlay
from .tokenizers import required_t5_tokenizer, required_tokenizers


def storysync_state(p, settings: Settings, plan: StoryRunPlan, depth: DitDepth | None = None) -> StorySyncState:
    """StorySync's state: subject-token columns of every frame from the host's tokenizer (methods.md §5.1 step 1:
    the characters' descriptions, or their chosen words; with 1Prompt1Story consolidation the identity span).
    ``depth``: a Flux transformer's blocks; its text keys are T5's tokens (no start token, no 75-token chunk)."""
    story = plan.story
    place = {}
    if depth is not None:
        tokenize = required_t5_tokenizer(p.sd_model, "StorySync cannot find the subject tokens")
        place = {"first": 0, "limit": None}
    else:
        tokenize = required_tokenizers(p.sd_model, "StorySync cannot find the subject tokens")[0][1]
    subjects = story_subjects(story)
    style_text, _ = extra_networks.parse_prompt(plan.style)
    groups = plan.frame_groups()
    if settings.consolidate:
        identity = subject_positions(consolidated_identity_pieces(story, style_text), tokenize, subjects, **place)
        columns = {f: {c: identity[c] for c in sorted(groups[f]) if c in identity} for f in groups}
    else:
        columns = {}
        for f in groups:
            found = subject_positions(frame_prompt_pieces(story, f, style_text), tokenize, subjects, **place)
            columns[f] = {c: found[c] for c in sorted(groups[f]) if c in found}
    references = storysync_references(settings, plan)
    storysync = storysync_settings(settings)
    return StorySyncState(storysync, plan.seeds[0], groups, columns, references,
                          ReferenceBank(offload_to_cpu=settings.bank_on_cpu),
                          ReferenceBank(offload_to_cpu=settings.bli_cache_on_cpu), depth)


def mask_images(state: StorySyncState | None, plan: StoryRunPlan, processed) -> list:
    """(image, infotext) per frame with a character: its final subject masks tinted over it (the last step's)."""
    if state is None or not processed.images:
        return []
    order = [c.name for c in plan.story.characters]
    first = processed.index_of_first_image
    frames = processed.images[first:][:plan.frame_count]
    out = []
    for frame, image in enumerate(frames):
        grid, by_character = state.masks.get(frame, (None, {}))
        if grid is None:
            continue
        masks = [(order.index(name), mask.cpu().tolist()) for name, mask in by_character.items()]
        info = processed.infotexts[first + frame] if len(processed.infotexts) > first + frame else ""
        out.append((mask_overlay(image, masks, grid), info))
    return out
