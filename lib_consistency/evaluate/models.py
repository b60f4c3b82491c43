"""Loading the evaluation's models, offline unless the user allows downloads (methods.md §7.2).

- CLIP: OpenAI ViT-B/32 (``openai/clip-vit-base-patch32``) through transformers, from ``--clip PATH`` (a folder
  written by ``save_pretrained``, or another model id) or the local Hugging Face cache (``local_files_only``).
- DreamSim: the ``dreamsim`` package (its default ensemble model) with weights already in ``--dreamsim-cache``.
- Background removal: CarveKit's high-level interface with the recipe's settings (object mode, Tracer-B7 at mask size
  640, FBA matting at 2048, trimap threshold 231, dilation 30, erosion 5, fp32); the removed background is replaced
  by seeded random noise, as the 1Prompt1Story author did (issue #4).

The optional packages are imported here only, lazily; what is missing is named together with the requirements file.
"""
from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .infotext import EvaluationError
from .metrics import ClipEmbedder

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
REQUIREMENTS = "lib_consistency/evaluate/requirements.txt"
DREAMSIM_CACHE = pathlib.Path.home() / ".cache" / "dreamsim"
# What dreamsim 0.2's default ensemble reads from its cache folder; without one of them it downloads: its own
# checkpoint (the first four) and, through torch.hub in the same folder, DINO's code and weights.
DREAMSIM_FILES = ("dino_vitb16_pretrain.pth", "open_clip_vitb16_pretrain.pth.tar", "clip_vitb16_pretrain.pth.tar",
                  "ensemble_lora", "facebookresearch_dino_main", "checkpoints")
NOISE_SEED = 1234


@dataclass(frozen=True)
class Optional:
    """An optional part of the evaluator: the callable (None = off) and a line saying what it is or why it is off."""
    run: Callable | None
    status: str


def load_clip(source: str | None, allow_download: bool, device: str) -> tuple[ClipEmbedder, str]:
    """The CLIP embedder and its description; EvaluationError naming the model id / path and the flag."""
    from transformers import CLIPModel, CLIPProcessor

    name = source or DEFAULT_CLIP
    local = pathlib.Path(name).expanduser()
    if source and local.exists():
        if not (local / "config.json").is_file():
            raise EvaluationError(f"--clip {source}: not a folder with a saved CLIP model (config.json missing)")
        name = str(local)
    try:
        model = CLIPModel.from_pretrained(name, local_files_only=not allow_download)
        processor = CLIPProcessor.from_pretrained(name, local_files_only=not allow_download)
    except (OSError, ValueError) as error:
        where = "downloading it failed" if allow_download else "no such folder, and it is not in the local " \
            "Hugging Face cache; pass --clip PATH to a saved copy, or --allow-download to fetch it"
        raise EvaluationError(f"CLIP model '{name}': {where} ({str(error).splitlines()[0]})") from None
    if getattr(model.config, "model_type", "") != "clip":
        raise EvaluationError(f"CLIP model '{name}': expected a CLIP model, got {model.config.model_type!r}")
    return ClipEmbedder(model, processor, device), f"CLIP {name}"


def load_dreamsim(mode: str, cache: pathlib.Path, allow_download: bool, device: str) -> Optional:
    """DreamSim embeddings (list of N PIL images -> (N, D)) or off; ``mode`` is auto, on or off."""
    if mode == "off":
        return Optional(None, "DreamSim: off (--dreamsim off)")
    try:
        from dreamsim import dreamsim
    except ImportError:
        return _missing(mode, "DreamSim", f"the 'dreamsim' package is not installed; pip install -r {REQUIREMENTS}")
    missing = [name for name in DREAMSIM_FILES if not (cache / name).exists()]
    if missing and not allow_download:
        return _missing(mode, "DreamSim", f"its weights ({', '.join(missing)}) are not in {cache}; --dreamsim-cache "
                                          "DIR, or --allow-download")
    try:
        model, preprocess = dreamsim(pretrained=True, device=device, cache_dir=str(cache))
    except Exception as error:  # the package's own loader: anything it raises means "no DreamSim"
        raise EvaluationError(f"DreamSim could not be loaded from {cache}: {error}") from None

    @torch.no_grad()
    def embed(images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.cat([model.embed(preprocess(image.convert("RGB")).to(device)).float().cpu()
                          for image in images])
    return Optional(embed, f"DreamSim: on (package default model, weights {cache})")


def load_background_removal(mode: str, allow_download: bool, device: str) -> Optional:
    """A callable (list of PIL images -> the same with the background replaced by noise) or off."""
    if mode == "off":
        return Optional(None, "background removal: off (--background off)")
    try:
        from carvekit.api.high import HiInterface
        from carvekit.ml.files import checkpoints_dir
    except ImportError:
        return _missing(mode, "background removal",
                        f"the 'carvekit' package is not installed; pip install -r {REQUIREMENTS}")
    needed = ("tracer_b7.pth", "fba_matting.pth")
    present = {p.name for p in pathlib.Path(checkpoints_dir).rglob("*.pth")}
    if not allow_download and not set(needed) <= present:
        return _missing(mode, "background removal", f"CarveKit weights {', '.join(needed)} are not in "
                                                    f"{checkpoints_dir}; --allow-download fetches them")
    interface = HiInterface(object_type="object", batch_size_seg=5, batch_size_matting=1, device=device,
                            seg_mask_size=640, matting_mask_size=2048, trimap_prob_threshold=231,
                            trimap_dilation=30, trimap_erosion_iters=5, fp16=False)

    def remove(images: Sequence[Image.Image]) -> list[Image.Image]:
        cut = interface([image.convert("RGB") for image in images])
        return [on_noise(image, seed=NOISE_SEED + i) for i, image in enumerate(cut)]
    return Optional(remove, "background removal: on (CarveKit Tracer-B7 + FBA, noise background)")


def on_noise(cut: Image.Image, seed: int) -> Image.Image:
    """A background-removed image (RGBA, or RGB on CarveKit's gray 130) over seeded uniform noise -> RGB."""
    rgb = np.asarray(cut.convert("RGB"))
    if cut.mode == "RGBA":
        alpha = np.asarray(cut.getchannel("A"), dtype=np.float64)[..., None] / 255.0
    else:
        alpha = np.any(rgb != 130, axis=-1, keepdims=True).astype(np.float64)
    noise = np.random.default_rng(seed).integers(0, 256, size=rgb.shape, dtype=np.uint8)
    return Image.fromarray((alpha * rgb + (1 - alpha) * noise).round().astype(np.uint8))


def _missing(mode: str, what: str, reason: str) -> Optional:
    """Off with the reason (``auto``), or EvaluationError when the user asked for it (``on``)."""
    if mode == "on":
        raise EvaluationError(f"{what}: {reason}")
    return Optional(None, f"{what}: off ({reason})")
