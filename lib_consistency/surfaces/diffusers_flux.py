"""The DiT surface on a diffusers ``FluxTransformer2DModel`` (tests and benches; the WebUIs use ``flux_blocks``).

An attention processor doing what diffusers' ``FluxAttnProcessor`` does (projections, QK-norm, text first, RoPE,
attention, output projections) with ``dit_attention.joint_attention`` / ``harmonize`` in the middle; where those
change nothing the processor makes diffusers' own calls, so installing it with the methods off is bit-identical.
diffusers is imported lazily: it is a test and bench requirement, not a runtime one.

Host contract (diffusers 0.35): a double-stream block (``transformer_blocks.i``) calls its attention with
``hidden_states`` (image) and ``encoder_hidden_states`` (text); a single-stream block (``single_transformer_blocks.i``)
with the concatenated ``[text ; image]`` only, so the text length comes from the model call (``FluxCall.text``,
set with the rows by whoever drives the model).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..common.addresses import DitDepth, LayerAddress
from .dit_attention import DitRunState, harmonize, joint_attention


@dataclass
class FluxCall:
    """The run state and the text length of the model call being made (set by the caller before each call)."""
    run: DitRunState | None = None
    text: int = 0


class FluxJointProcessor:
    def __init__(self, call: FluxCall, layer: LayerAddress) -> None:
        self.call, self.layer = call, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.transformers.transformer_flux import (_get_qkv_projections, apply_rotary_emb,
                                                                    dispatch_attention_fn)
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query, key, value = (x.unflatten(-1, (attn.heads, -1)) for x in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        text = self.call.text
        if encoder_hidden_states is not None:
            encoder_query, encoder_key, encoder_value = (x.unflatten(-1, (attn.heads, -1))
                                                         for x in (encoder_query, encoder_key, encoder_value))
            query = torch.cat([attn.norm_added_q(encoder_query), query], dim=1)
            key = torch.cat([attn.norm_added_k(encoder_key), key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
            text = encoder_hidden_states.shape[1]
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = None
        if attention_mask is None:  # [B, L, H, D] here, [B, H, L, D] in the surface
            out = joint_attention(self.call.run, self.layer, *(x.transpose(1, 2) for x in (query, key, value)), text)
        if out is None:
            out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask).flatten(2, 3)
        out = harmonize(self.call.run, self.layer, out.to(query.dtype), text)
        if encoder_hidden_states is None:
            return out
        encoder_out, out = out.split_with_sizes([text, out.shape[1] - text], dim=1)
        return attn.to_out[1](attn.to_out[0](out)), attn.to_add_out(encoder_out)


def flux_depth(transformer) -> DitDepth:
    return DitDepth(len(transformer.transformer_blocks), len(transformer.single_transformer_blocks))


def install_flux_processors(transformer, call: FluxCall) -> dict:
    """Our processor on every block's attention; returns the previous processors for ``remove_flux_processors``."""
    previous = dict(transformer.attn_processors)
    ours = {}
    for name in previous:
        kind, index = name.split(".")[:2]
        ours[name] = FluxJointProcessor(call, ("double" if kind == "transformer_blocks" else "single", int(index), 0))
    transformer.set_attn_processor(ours)
    return previous


def remove_flux_processors(transformer, previous: dict) -> None:
    transformer.set_attn_processor(previous)
