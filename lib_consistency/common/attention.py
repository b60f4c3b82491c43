"""Multi-head scaled dot-product attention on the WebUIs' [rows, tokens, heads·d] layout, with a mask.

Host contract: the hosts' own attention functions cannot all take the masks the methods need (A1111's optimised
forwards ignore or refuse one; Forge's xformers path pads a mask to the query length), so the calls that need one
(IPCA dropout's logit bias, StorySync's key-padding mask over padded contexts) run here, on
``scaled_dot_product_attention`` itself: the kernel of A1111's "sdp" and Forge's default ``attention_pytorch``.
"""
from __future__ import annotations

import torch


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
    """q [R, Q, H·d] over k, v [R, T, H·d] -> [R, Q, H·d]; ``mask`` broadcastable to [R, H, Q, T]: a float logit
    bias (cast to q's dtype) or a bool "may attend" mask."""
    rows, queries, width = q.shape

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(rows, t.shape[1], heads, width // heads).transpose(1, 2)

    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
    return out.transpose(1, 2).reshape(rows, queries, width)
