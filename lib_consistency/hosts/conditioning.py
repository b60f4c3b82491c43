"""1Prompt1Story conditioning of a story generation from the host's own text encoder (methods.md §2.8 Steps A-C),
A1111 1.10 and Forge: called from ``pipeline.install`` at every ``p.sample``, after the host activated the batch's
extra networks. ``generation`` is the pipeline's ``StoryGeneration``."""
from __future__ import annotations

from typing import Sequence

import torch

from modules import devices, extra_networks, prompt_parser

from ..one_prompt_one_story.token_plan import CLIP_CONTEXT, verify_token_plan
from ..story.run import FrameConditioning, plan_consolidation
from .coexist import batch_networks
from .flux import flux_model, flux_text_context
from .tokenizers import required_t5_tokenizer, required_tokenizers
from .ui import SPANS_INFOTEXT_KEY

SDXL_POOLED_WIDTH = 1280  # 'vector' = bigG pooled (1280) + six 256-d size embeddings


def _unet_dtype() -> torch.dtype:
    """The dtype the UNet computes in (``devices.dtype_unet`` on both hosts); fp8 weights compute in float16."""
    dtype = getattr(devices, "dtype_unet", torch.float32)
    return dtype if dtype.is_floating_point and dtype.itemsize >= 2 else torch.float16


def batch_conditioning(p, generation) -> FrameConditioning:
    """This batch's 1P1S conditioning. Once per generation: token plan counted with the host's CLIP-L tokenizer,
    spans verified with every CLIP tokenizer of the model (methods.md §2.8 step A2) and recorded in the infotext.
    Once per set of extra networks (activated by the host before this ``p.sample``; a LoRA may change the text
    encoder): every frame encoded."""
    settings, plan = generation.settings, generation.plan
    networks = batch_networks(p, plan)
    if networks not in generation.conditionings:
        flux = flux_model(p)
        if generation.conditioning is None:
            style_text, _ = extra_networks.parse_prompt(plan.style)  # <lora:...> tags are not prompt text
            if flux is not None:  # the transformer reads T5's tokens; CLIP-L gives each frame's pooled vector
                tokenizers = [("T5", required_t5_tokenizer(p.sd_model, "1Prompt1Story cannot count its tokens"))]
                context = flux_text_context(flux)
            else:
                tokenizers = required_tokenizers(p.sd_model, "1Prompt1Story cannot count its tokens")
                context = CLIP_CONTEXT
            token_plan = plan_consolidation(settings, plan.story, style_text, tokenizers[0][1], context)
            for name, tokenize in tokenizers:
                verify_token_plan(token_plan, tokenize, name)
            p.extra_generation_params[SPANS_INFOTEXT_KEY] = token_plan.spans_line()
        else:
            token_plan = generation.conditioning.token_plan
        pooled: dict[str, torch.Tensor] = {}
        encode = _encoder(p, pooled) if flux is None else _t5_encoder(p)
        conditioning = FrameConditioning(settings, token_plan, encode, _unet_dtype())
        conditioning.contexts(range(plan.frame_count))  # one encoder call per set of networks
        generation.conditionings[networks] = conditioning, pooled
    conditioning, generation.pooled = generation.conditionings[networks]
    return conditioning


def _encoder(p, pooled: dict[str, torch.Tensor]):
    def encode(texts: Sequence[str]) -> list[torch.Tensor]:
        conditioning = prompt_parser.SdConditioning(list(texts), width=p.width, height=p.height)
        with devices.autocast(), torch.no_grad():
            encoded = p.sd_model.get_learned_conditioning(conditioning)
        if isinstance(encoded, dict):
            for text, vector in zip(texts, encoded["vector"]):
                pooled[text] = vector[:SDXL_POOLED_WIDTH]
            encoded = encoded["crossattn"]
        return list(encoded)
    return encode


def _t5_encoder(p):
    """Flux: each text through the host's own conditioning, one at a time (the T5 engine stacks one context per
    line, so texts of different lengths cannot share a call); its ``crossattn`` [T, 4096] is the frame's context.
    Host contract (``diffusion_engine/flux.py``): ``get_learned_conditioning`` gives ``crossattn`` (T5, padded to
    at least 256 rows), ``vector`` (CLIP-L pooled) and for dev ``guidance``; the frames keep their own pooled vector
    (CLIP-L reads 77 tokens, the consolidated prompt would be cut) and guidance."""
    def encode(texts: Sequence[str]) -> list[torch.Tensor]:
        contexts = []
        for text in texts:
            conditioning = prompt_parser.SdConditioning([text], width=p.width, height=p.height)
            with devices.autocast(), torch.no_grad():
                contexts.append(p.sd_model.get_learned_conditioning(conditioning)["crossattn"][0])
        return contexts
    return encode
