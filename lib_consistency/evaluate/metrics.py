"""The benchmark's metrics on embeddings, and CLIP as the evaluation recipe uses it (methods.md §7.2).

- CLIP-T (PAPER §4.1; CLIPScore, Hessel et al. 2021, Eq. 1): ``2.5 · max(cos(E_image, E_text), 0)`` with OpenAI CLIP
  ViT-B/32 and the text prefixed with "A photo depicts ", against each frame's own prompt; averaged over frames.
- CLIP-I: the cosine of two frames' CLIP image embeddings, averaged over all unordered frame pairs of a story
  (1Prompt1Story issue #4), on background-removed images when a matting package is there.
- DreamSim: ``1 − cos`` of two frames' DreamSim embeddings (the package's own distance), averaged over all pairs.

Embeddings are compared in float64 whatever dtype the model ran in.
"""
from __future__ import annotations

import re
from typing import Sequence

import torch

from ..story.run import without_extra_networks

CLIP_T_PREFIX = "A photo depicts "
CLIP_T_WEIGHT = 2.5
_WEIGHTED = re.compile(r"\(([^()]*?):\s*-?\d+(?:\.\d+)?\)")


def clip_score(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """CLIP-T per frame. (N, D) image and (N, D) text embeddings, row i with row i -> (N,) float64."""
    if image_embeddings.shape != text_embeddings.shape or image_embeddings.dim() != 2:
        raise ValueError(f"expected two (N, D) tensors of one shape, got {tuple(image_embeddings.shape)} and "
                         f"{tuple(text_embeddings.shape)}")
    cos = torch.nn.functional.cosine_similarity(image_embeddings.double(), text_embeddings.double(), dim=-1)
    return CLIP_T_WEIGHT * cos.clamp(min=0)


def pair_cosines(embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine of every unordered pair i < j. (N, D) -> (N·(N−1)/2,) float64, pairs in ``combinations`` order."""
    if embeddings.dim() != 2 or embeddings.shape[0] < 2:
        raise ValueError(f"expected (N, D) embeddings of at least 2 frames, got {tuple(embeddings.shape)}")
    unit = torch.nn.functional.normalize(embeddings.double(), dim=-1)
    rows, cols = torch.triu_indices(unit.shape[0], unit.shape[0], offset=1)
    return (unit[rows] * unit[cols]).sum(-1)


def mean_pair_similarity(embeddings: torch.Tensor) -> float:
    """CLIP-I of one story: the mean cosine over all unordered frame pairs. (N, D) -> float."""
    return float(pair_cosines(embeddings).mean())


def mean_pair_distance(embeddings: torch.Tensor) -> float:
    """DreamSim of one story: the mean of ``1 − cos`` over all unordered frame pairs. (N, D) -> float."""
    return float((1 - pair_cosines(embeddings)).mean())


def clip_t_text(prompt: str) -> str:
    """The text CLIP-T reads: the recipe's prefix, then the prompt without the WebUI's prompt syntax (extra-network
    tags such as ``<lora:x:1>``, ``(words:1.2)`` weights, ``BREAK``), which CLIP never saw as words."""
    text = without_extra_networks(prompt)
    text = _WEIGHTED.sub(r"\1", text).replace("BREAK", " ")
    return CLIP_T_PREFIX + " ".join(text.split())


class ClipEmbedder:
    """A transformers ``CLIPModel`` with its processor: PIL images and texts -> embeddings (projected, float32)."""

    def __init__(self, model, processor, device: str | torch.device = "cpu", batch_size: int = 16):
        self.model = model.eval().to(device)
        self.processor = processor
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_tokens = int(model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def images(self, images: Sequence) -> torch.Tensor:
        """list of N PIL images -> (N, D)."""
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = [image.convert("RGB") for image in images[start:start + self.batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            out.append(_features(self.model.get_image_features(pixel_values=pixels)).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """list of N texts -> (N, D); texts longer than the model's context are truncated, as CLIPScore does."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.processor(text=list(texts[start:start + self.batch_size]), return_tensors="pt",
                                    padding=True, truncation=True, max_length=self.max_tokens)
            tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
            out.append(_features(self.model.get_text_features(**tokens)).float().cpu())
        return torch.cat(out)


def _features(output) -> torch.Tensor:
    """The projected embeddings ``get_image_features`` / ``get_text_features`` return (a tensor)."""
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"CLIP returned {type(output).__name__}, expected the projected embeddings as a tensor; "
                        "this transformers version is not supported")
    return output
