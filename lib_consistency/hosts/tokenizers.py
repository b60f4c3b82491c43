"""The loaded model's own prompt tokenizers, as the core's ``text -> tokens`` callables (A1111 1.10 and Forge).

Host contract (hosts.md §2.1, §2.4): every CLIP text encoder wrapper has ``tokenize_line(text) -> (chunks,
token_count)``, each chunk a ``PromptChunk`` of 77 ``tokens`` (SOT, 75 content tokens or padding, EOT), their
emphasis ``multipliers`` and ``fixes`` (textual-inversion embeddings: ``offset`` into the content, ``embedding``
with ``name`` and ``vectors``). A1111: SD1 ``cond_stage_model``, SDXL ``conditioner.embedders[0]`` (CLIP-L) and
``[1]`` (OpenCLIP bigG). Forge: ``text_processing_engine`` (SD1.5) or ``text_processing_engine_l`` / ``_g`` (SDXL).
Emphasis, embeddings, BREAK and comma back-tracking are therefore counted exactly as generation counts them.

Each token becomes a comparable item ``(id, emphasis weight, embedding name or None)``, so that
``verify_token_plan`` sees a shifted weight or embedding as well as a shifted id.
"""
from __future__ import annotations

from typing import Any

from ..one_prompt_one_story.token_plan import Tokenizer

TokenItem = tuple[int, float, "str | None"]


def _engines(model: Any) -> list[tuple[str, Any]]:
    conditioner = getattr(model, "conditioner", None)
    embedders = list(getattr(conditioner, "embedders", ()) or ())
    candidates = [("CLIP-L", getattr(model, "text_processing_engine_l", None)),
                  ("OpenCLIP bigG", getattr(model, "text_processing_engine_g", None)),
                  ("CLIP", getattr(model, "text_processing_engine", None)),
                  ("CLIP-L", embedders[0] if embedders else None),
                  ("OpenCLIP bigG", embedders[1] if len(embedders) > 1 else None),
                  ("CLIP", getattr(model, "cond_stage_model", None))]
    found, seen = [], set()
    for name, engine in candidates:
        if hasattr(engine, "tokenize_line") and id(engine) not in seen:
            seen.add(id(engine))
            found.append((name, engine))
    return found


def clip_engine(model: Any) -> Any:
    """The CLIP-L (SD1: the only CLIP) ``tokenize_line`` engine of ``model``; chunks line up across SDXL's two
    encoders, so its positions are the context rows of both halves. RuntimeError without one."""
    found = _engines(model) if model is not None else []
    if not found:
        raise RuntimeError("the checkpoint has no CLIP tokenizer with tokenize_line")
    return found[0][1]


def token_items(engine: Any) -> Tokenizer:
    """``text -> [(id, weight, embedding)]``: the content tokens ``engine.tokenize_line`` counts, in order."""
    def tokenize(text: str) -> list[TokenItem]:
        chunks, count = engine.tokenize_line(text)
        items: list[TokenItem] = []
        for chunk in chunks:
            embedding_at = {}
            for fix in chunk.fixes:
                vectors = int(getattr(fix.embedding, "vectors", 1))
                for j in range(vectors):
                    embedding_at[fix.offset + j] = str(getattr(fix.embedding, "name", fix.embedding))
            content = len(chunk.tokens) - 2  # without SOT and EOT
            items += [(int(chunk.tokens[j + 1]), float(chunk.multipliers[j + 1]), embedding_at.get(j))
                      for j in range(content)]
        return items[:count]  # the last chunk's padding is not counted
    return tokenize


def model_tokenizers(model: Any) -> list[tuple[str, Tokenizer]]:
    """(encoder name, tokenizer) of every CLIP text encoder of ``model``, CLIP-L first; empty without a model."""
    return [(name, token_items(engine)) for name, engine in _engines(model)] if model is not None else []


def required_tokenizers(model: Any, purpose: str) -> list[tuple[str, Tokenizer]]:
    """``model_tokenizers`` of a loaded model that must have one; RuntimeError saying what needs it otherwise."""
    found = model_tokenizers(model)
    if not found:
        raise RuntimeError(f"the checkpoint has no CLIP tokenizer with tokenize_line; {purpose}")
    return found


def t5_tokenizer(model: Any) -> Tokenizer | None:
    """Forge's and Neo's Flux T5 engine (``text_processing_engine_t5``) as ``text -> [(id, weight, None)]``: the
    content tokens of its first chunk, before the end token. Host contract (``backend/text_processing/t5_engine.py``):
    ``tokenize_line(text) -> (chunks, count)``, a chunk's ``tokens`` being the content, the end token and padding to
    the engine's minimum length; the T5 context has no start token (the first content token is position 0)."""
    engine = getattr(model, "text_processing_engine_t5", None)
    if not hasattr(engine, "tokenize_line"):
        return None

    def tokenize(text: str) -> list[TokenItem]:
        chunks, _ = engine.tokenize_line(text)
        items: list[TokenItem] = []
        for chunk in chunks:
            end = chunk.tokens.index(engine.id_end) if engine.id_end in chunk.tokens else len(chunk.tokens)
            items += [(int(chunk.tokens[j]), float(chunk.multipliers[j]), None) for j in range(end)]
        return items
    return tokenize


def required_t5_tokenizer(model: Any, purpose: str) -> Tokenizer:
    """``t5_tokenizer`` of a Flux model that must have one; RuntimeError saying what needs it otherwise."""
    tokenize = t5_tokenizer(model)
    if tokenize is None:
        raise RuntimeError(f"the Flux checkpoint has no T5 tokenizer with tokenize_line; {purpose}")
    return tokenize
