"""The DiT surface on the WebUIs' Flux transformers (Forge's and Forge Neo's ``backend/nn/flux.py``), host-free.

Host contract (Forge ``dfdcbab6``, Neo): ``IntegratedFluxTransformer2DModel`` holds ``double_blocks`` and
``single_blocks``; a double block's ``forward(img, txt, vec, pe, ...)`` and a single block's ``forward(x, vec, pe,
...)`` build the joint q, k, v (text first), apply QK-norm and call their module's global ``attention(q, k, v, pe,
**options)``, which applies ``apply_rope(q, k, pe)`` and ``attention_function(q, k, v, heads, skip_reshape=True,
**options)`` -> [B, L, H·D] (Neo passes ``mask`` and ``transformer_options``, Forge nothing). Forge has no patch
point inside the blocks and Neo's ``patches_replace["dit"]`` replaces whole blocks, so the one place both share is
that call.

``FluxSurface`` is installed around one model call (``install`` / ``remove`` in ``finally``): each block instance's
``forward`` is wrapped to say which block runs (and, for a double block, the text length, which single blocks only
see concatenated), and for the duration of the call the blocks' module global ``attention`` is ours: it applies the
host's own ``apply_rope``, hands the rotated q, k, v to ``dit_attention.joint_attention`` (None: the host's own
``attention_function`` with the host's own options, the same operations as the host's ``attention``) and RFH to the
output. The block's own code -- modulation, projections, QK-norm, MLP, gates -- is the host's, unchanged. Calls made
outside a wrapped block (another model, a foreign caller) get the host's function untouched.
"""
from __future__ import annotations

import sys
from typing import Any

from ..common.addresses import DitDepth, LayerAddress
from .dit_attention import DitRunState, harmonize, joint_attention

DOUBLE, SINGLE = "double_blocks", "single_blocks"


def flux_blocks(model: Any) -> list[tuple[LayerAddress, Any]]:
    """(address, block) of every transformer block of a WebUI Flux model (``forge_objects.unet.model.diffusion_model``)."""
    return [(("double", i, 0), b) for i, b in enumerate(getattr(model, DOUBLE, ()))] + \
           [(("single", i, 0), b) for i, b in enumerate(getattr(model, SINGLE, ()))]


def is_flux_model(model: Any) -> bool:
    blocks = getattr(model, DOUBLE, None)
    return blocks is not None and len(blocks) > 0 and hasattr(model, SINGLE) and \
        hasattr(sys.modules.get(type(blocks[0]).__module__), "attention")


def flux_depth(model: Any) -> DitDepth:
    return DitDepth(len(getattr(model, DOUBLE)), len(getattr(model, SINGLE)))


class FluxSurface:
    """The methods in one Flux model's joint attention for one model call; ``install`` then ``remove``."""

    def __init__(self, model: Any, run: DitRunState) -> None:
        self.run = run
        self.blocks = flux_blocks(model)
        self.modules = {type(block).__module__: sys.modules[type(block).__module__] for _, block in self.blocks}
        self.current: tuple[LayerAddress, int] | None = None  # the block running, its text length
        self.text = 0  # the text length of this call (from the double blocks)
        self._saved: dict[str, Any] = {}

    def install(self) -> None:
        for name, module in self.modules.items():
            self._saved[name] = module.attention
            module.attention = self._attention(module, module.attention)
        for layer, block in self.blocks:
            block.forward = self._forward(layer, block, block.forward)

    def remove(self) -> None:
        for _, block in self.blocks:
            block.__dict__.pop("forward", None)  # the class's forward again
        for name, original in self._saved.items():
            self.modules[name].attention = original
        self._saved.clear()
        self.current = None

    def _forward(self, layer: LayerAddress, block: Any, original):
        def forward(*args, **kwargs):
            if layer[0] == "double":
                txt = kwargs["txt"] if "txt" in kwargs else args[1]
                self.text = int(txt.shape[1])
            outer, self.current = self.current, (layer, self.text)
            try:
                return original(*args, **kwargs)
            finally:
                self.current = outer
        forward.consistent_story_flux = True
        return forward

    def _attention(self, module: Any, original):
        def attention(q, k, v, pe, **options):
            current = self.current
            if current is None or options.get("mask") is not None:
                return original(q, k, v, pe=pe, **options)  # not one of our blocks, or a masked (padded) call
            layer, text = current
            if pe is not None:
                q, k = module.apply_rope(q, k, pe)

            def attend(q, k, v):
                return module.attention_function(q, k, v, q.shape[1], skip_reshape=True, **options)

            out = joint_attention(self.run, layer, q, k, v, text, attend)
            if out is None:
                out = attend(q, k, v)
            return harmonize(self.run, layer, out, text)
        attention.consistent_story_flux = True
        attention.consistent_story_original = original
        return attention


def sweep_flux(model: Any) -> None:
    """Undo what a surface left on ``model`` if its call never reached ``remove`` (a killed worker thread): block
    forwards and module ``attention`` functions of ours. A no-op on anything else."""
    for _, block in flux_blocks(model):
        if getattr(block.__dict__.get("forward"), "consistent_story_flux", False):
            del block.forward
        module = sys.modules.get(type(block).__module__)
        while getattr(getattr(module, "attention", None), "consistent_story_flux", False):
            module.attention = module.attention.consistent_story_original
