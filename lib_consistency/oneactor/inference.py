"""OneActor at inference: where a character's offsets go and when (paper §3.3, Eqs. 15 and 19; methods.md §6.4).

A prompt names a character with ``<oneactor:NAME>`` or ``<oneactor:NAME:v>``. Its stored offsets act on that
prompt's **base-word token rows** of the text encoder's output (paper Eq. 8, ``c_b' = c_b + c_Δ``):

- semantic interpolation (Eq. 15): the cond context gets ``v·Δ_tar`` on the base-word rows;
- cluster guidance (Eq. 19): with η2 > 0 one more cond row per image, ``c + Δ_avg`` on the same rows, whose
  prediction is subtracted with weight η2 (``guidance.cluster_guidance``);
- both only in the first ``window`` of the steps (default 2/3: steps 1-20 of 30, App. H.1); afterwards the plain
  prompt with ordinary guidance.

Our choices (the paper and code leave them open or work on one word only):
- **Which rows.** The base word's tokens are matched in the host's own tokenization of the prompt (75-token
  chunks, emphasis and embeddings as the host counts them); the offset goes on the **last token of every
  occurrence** (a word split into several BPE pieces ends in the piece that carries ``</w>``; CLIP's causal mask
  makes the last piece the one that has seen the whole word). Tuning uses the same rule (``base_word_positions``).
- **With 1Prompt1Story consolidation** an image's cond rows hold its frame's consolidated prompt (identity, then
  the frames of its window); the offsets go on every occurrence of the base word there (``rows_in``).
- **Several characters in one prompt** each act on their own base word; two characters with the same base word in
  one prompt are refused (their offsets would add up on the same rows). One extra η2 row per image carries every
  character's ``Δ_avg``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch

from .guidance import in_window, offset_token_rows


class OneActorPromptError(ValueError):
    """A prompt's character tag cannot be applied; the message names the character, the word and the image."""


def base_word_positions(chunks: Sequence[Sequence[int]], word: Sequence[int]) -> tuple[int, ...]:
    """Context rows of the base word in a tokenized prompt.

    chunks: the host's chunks, each the full token list the encoder sees (SOT, content, EOT, padding: 77 ids for
    CLIP); the encoder output concatenates them, so row = chunk index · chunk length + position in the chunk.
    word: the base word's content token ids. Returns the row of the last token of every occurrence, in order.
    """
    if not word:
        raise ValueError("base word has no tokens")
    rows: list[int] = []
    offset = 0
    for chunk in chunks:
        ids = list(chunk)
        for start in range(len(ids) - len(word) + 1):
            if ids[start:start + len(word)] == list(word):
                rows.append(offset + start + len(word) - 1)
        offset += len(ids)
    return tuple(rows)


@dataclass(frozen=True)
class CharacterUse:
    """One character tag of one image's prompt: its offsets (width,), strength v, base-word rows and the base
    word's token ids (to find its rows again in another text of the same image, e.g. a consolidated prompt)."""

    name: str
    delta_tar: torch.Tensor
    delta_avg: torch.Tensor
    v: float
    rows: tuple[int, ...]
    word: tuple[int, ...] = ()


@dataclass(frozen=True)
class OneActorBatch:
    """The characters of every image of one batch (one sampling pass), in batch order.

    images[b] lists the characters of image b (empty: the image has none and is left alone).
    """

    images: tuple[tuple[CharacterUse, ...], ...]
    eta2: float
    window: float

    def __post_init__(self) -> None:
        for b, uses in enumerate(self.images):
            rows = [r for use in uses for r in use.rows]
            if len(rows) != len(set(rows)):
                names = ", ".join(use.name for use in uses)
                raise OneActorPromptError(f"OneActor: image {b + 1} names characters with the same base word "
                                          f"({names}); use one character per base word in a prompt")

    @property
    def any(self) -> bool:
        return any(self.images)

    @property
    def needs_average(self) -> bool:
        """η2 > 0 with a character somewhere: one extra cond row per image inside the window."""
        return self.eta2 > 0 and self.any

    def rows_in(self, chunks_per_image: Sequence[Sequence[Sequence[int]]]) -> "OneActorBatch":
        """The same characters with their rows found again in other token chunks per image (the consolidated
        prompt each image's cond rows hold with 1Prompt1Story); an image whose chunks lack the word keeps none."""
        images = tuple(tuple(dataclasses.replace(use, rows=base_word_positions(chunks, use.word)) for use in uses)
                       for uses, chunks in zip(self.images, chunks_per_image))
        return OneActorBatch(images, self.eta2, self.window)

    def active(self, step: int, total_steps: int) -> bool:
        """True on the steps (0-based) of the Δ window."""
        return self.any and in_window(step, total_steps, self.window)

    def _offset(self, context: torch.Tensor, average: bool) -> torch.Tensor:
        if context.shape[0] != len(self.images):
            raise ValueError(f"OneActor: {context.shape[0]} cond rows for a batch of {len(self.images)} images")
        empty: list[list[int]] = [[] for _ in self.images]
        for b, uses in enumerate(self.images):
            for use in uses:  # one call per tag: a new tensor each time, never an in-place change
                rows = empty[:b] + [list(use.rows)] + empty[b + 1:]
                delta = use.delta_avg if average else use.delta_tar
                context = offset_token_rows(context, rows, delta.to(context.device), 1.0 if average else use.v)
        return context

    def target_context(self, context: torch.Tensor) -> torch.Tensor:
        """(B, T, D) cond context -> a new one with ``v·Δ_tar`` on each image's base-word rows (Eq. 15)."""
        return self._offset(context, average=False)

    def average_context(self, context: torch.Tensor) -> torch.Tensor:
        """(B, T, D) plain cond context -> ``c + Δ_avg`` on the base-word rows: the η2 row of Eq. 19."""
        return self._offset(context, average=True)
