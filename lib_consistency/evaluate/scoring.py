"""Scoring stories with one evaluator: CLIP-T per frame, CLIP-I and DreamSim over a story's frame pairs.

Averages (methods.md §7.2): a story's CLIP-T is the mean over its frames and the overall CLIP-T the mean over all
frames; CLIP-I and DreamSim are means over a story's unordered frame pairs, and overall the mean over stories.
Identity metrics read the background-removed images when background removal is on; CLIP-T always reads the
generated image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from PIL import Image

from .infotext import EvaluationError, StoryImages
from .metrics import ClipEmbedder, clip_score, clip_t_text, mean_pair_distance, mean_pair_similarity
from .models import Optional


@dataclass(frozen=True)
class StoryScores:
    name: str
    frame_clip_t: tuple[float, ...]
    clip_i: float
    dreamsim: float | None

    @property
    def frames(self) -> int:
        return len(self.frame_clip_t)

    @property
    def clip_t(self) -> float:
        return math.fsum(self.frame_clip_t) / len(self.frame_clip_t)


@dataclass(frozen=True)
class Overall:
    stories: int
    frames: int
    clip_t: float
    clip_i: float
    dreamsim: float | None


@dataclass
class Evaluator:
    clip: ClipEmbedder
    clip_name: str
    dreamsim: Optional
    background: Optional

    def describe(self) -> list[str]:
        """What produced the numbers: numbers from a different evaluator do not compare (methods.md §7.2)."""
        return [f"{self.clip_name}, CLIP-T = 2.5 x max(cos, 0) with the prefix 'A photo depicts '",
                self.dreamsim.status, self.background.status]

    def score(self, story: StoryImages) -> StoryScores:
        """Scores of one story of at least 2 frames; EvaluationError naming a file that cannot be read."""
        if len(story.frames) < 2:
            raise EvaluationError(f"story {story.name}: {len(story.frames)} frame; CLIP-I and DreamSim need 2")
        images = [_load(frame.path) for frame in story.frames]
        texts = [clip_t_text(frame.prompt) for frame in story.frames]
        embeddings = self.clip.images(images)
        per_frame = clip_score(embeddings, self.clip.texts(texts))
        identity = self.background.run(images) if self.background.run else images
        clip_i = mean_pair_similarity(self.clip.images(identity) if self.background.run else embeddings)
        dreamsim = mean_pair_distance(self.dreamsim.run(identity)) if self.dreamsim.run else None
        return StoryScores(story.name, tuple(float(v) for v in per_frame), clip_i, dreamsim)


def overall(scores: Sequence[StoryScores]) -> Overall:
    """Frame-weighted CLIP-T, story-averaged CLIP-I and DreamSim (DreamSim None unless every story has it)."""
    if not scores:
        raise ValueError("no stories to average")
    frame_values = [v for s in scores for v in s.frame_clip_t]
    dreamsim = None if any(s.dreamsim is None for s in scores) else \
        math.fsum(s.dreamsim for s in scores) / len(scores)
    return Overall(len(scores), len(frame_values), math.fsum(frame_values) / len(frame_values),
                   math.fsum(s.clip_i for s in scores) / len(scores), dreamsim)


def _load(path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as error:
        raise EvaluationError(f"{path}: cannot read the image ({error})") from None
