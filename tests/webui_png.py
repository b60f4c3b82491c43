"""Writing PNGs the way the WebUIs do: an RGB image with the generation's infotext in a ``parameters`` text chunk
(A1111 ``modules/images.py``), the infotext built like ``processing.create_infotext`` (values holding ``,``, ``:``
or a newline JSON-quoted) with the extension's own ``Story ...`` keys."""
from __future__ import annotations

import hashlib
import io
import json

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from lib_consistency.settings import Settings


def quote(value) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",\n:") else text


def infotext(prompt: str, seed: int = 42, negative: str = "", story: Settings | None = None, style: str = "",
             size: int = 64, model: str = "tiny-sd15", steps: int = 3, sampler: str = "Euler",
             cfg_scale: float = 5.0) -> str:
    params = {"Steps": steps, "Sampler": sampler, "Schedule type": "Automatic", "CFG scale": cfg_scale, "Seed": seed,
              "Size": f"{size}x{size}", "Model hash": "9b965036dd", "Model": model}
    if story is not None:
        params.update(story.to_infotext())
        params["Story Style"] = style
    params["Version"] = "v1.10.1"
    line = ", ".join(f"{k}: {quote(v)}" for k, v in params.items())
    return prompt + (f"\nNegative prompt: {negative}" if negative else "") + "\n" + line


def png_bytes(text: str | None, seed_text: str, size: int = 64) -> bytes:
    """A PNG whose pixels are a deterministic function of ``seed_text``, with ``text`` as its infotext."""
    seed = int.from_bytes(hashlib.sha256(seed_text.encode()).digest()[:8], "little")
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    info = PngInfo()
    if text is not None:
        info.add_text("parameters", text)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", pnginfo=info)
    return out.getvalue()
