"""A stand-in for the WebUIs' Flux transformer blocks (Forge / Forge Neo ``backend/nn/flux.py``), written for the tests
from the Flux architecture: the module globals ``attention(q, k, v, pe, **options)``, ``apply_rope`` and
``attention_function`` that the blocks call, the double- and single-stream blocks with the host's attribute names
(``img_mod.lin``, ``img_attn.qkv`` / ``.norm`` / ``.proj``, ``linear1``, ``linear2`` ...), and ``from_diffusers``,
which loads a diffusers ``FluxTransformer2DModel``'s blocks into it, so the two implementations can be compared.

RoPE in the host's form: ``pe`` [1, 1, L, D/2, 2, 2] rotation matrices; ``rope_from_diffusers`` turns diffusers'
(cos, sin) into it.
"""
from __future__ import annotations

import torch
from torch import nn


def attention_function(q, k, v, heads, skip_reshape=False, mask=None, transformer_options=None):
    """[B, H, L, D] (skip_reshape) -> [B, L, H·D], as the hosts' pytorch attention."""
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(q.shape[0], -1, heads * q.shape[-1])


def apply_rope(xq, xk, freqs_cis):
    xq_ = xq.float().reshape(*xq.shape[:-1], -1, 1, 2)
    xk_ = xk.float().reshape(*xk.shape[:-1], -1, 1, 2)
    xq_out = freqs_cis[..., 0] * xq_[..., 0] + freqs_cis[..., 1] * xq_[..., 1]
    xk_out = freqs_cis[..., 0] * xk_[..., 0] + freqs_cis[..., 1] * xk_[..., 1]
    return xq_out.reshape(*xq.shape).type_as(xq), xk_out.reshape(*xk.shape).type_as(xk)


def attention(q, k, v, pe, mask=None, transformer_options=None):  # Neo's signature; Forge's has no options
    if pe is not None:
        q, k = apply_rope(q, k, pe)
    return attention_function(q, k, v, q.shape[1], skip_reshape=True, mask=mask,
                              transformer_options=transformer_options)


def rope_from_diffusers(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' interleaved (cos, sin) [L, D] -> the host's [1, 1, L, D/2, 2, 2] rotation matrices."""
    c, s = cos[:, 0::2], sin[:, 0::2]
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)[None, None]


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        rrms = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        return (x.float() * rrms).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.query_norm, self.key_norm = RMSNorm(dim), RMSNorm(dim)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.qkv, self.norm, self.proj = nn.Linear(dim, dim * 3), QKNorm(dim // heads), nn.Linear(dim, dim)


class Modulation(nn.Module):
    def __init__(self, dim, parts):
        super().__init__()
        self.lin, self.parts = nn.Linear(dim, parts * dim), parts

    def forward(self, vec):
        return self.lin(nn.functional.silu(vec))[:, None, :].chunk(self.parts, dim=-1)


def _mlp(dim, hidden):
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class DoubleStreamBlock(nn.Module):
    def __init__(self, dim, heads, mlp):
        super().__init__()
        self.num_heads = heads
        for side in ("img", "txt"):
            setattr(self, f"{side}_mod", Modulation(dim, 6))
            setattr(self, f"{side}_norm1", nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{side}_attn", SelfAttention(dim, heads))
            setattr(self, f"{side}_norm2", nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{side}_mlp", _mlp(dim, mlp))

    def _qkv(self, side, x, shift, scale):
        qkv = getattr(self, f"{side}_attn").qkv((1 + scale) * getattr(self, f"{side}_norm1")(x) + shift)
        q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = getattr(self, f"{side}_attn").norm(q, k, v)
        return q, k, v

    def forward(self, img, txt, vec, pe, attn_mask=None, transformer_options=None):
        i1s, i1c, i1g, i2s, i2c, i2g = self.img_mod(vec)
        t1s, t1c, t1g, t2s, t2c, t2g = self.txt_mod(vec)
        iq, ik, iv = self._qkv("img", img, i1s, i1c)
        tq, tk, tv = self._qkv("txt", txt, t1s, t1c)
        q, k, v = torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((tv, iv), 2)
        attn = attention(q, k, v, pe=pe, mask=attn_mask, transformer_options=transformer_options)
        txt_attn, img_attn = attn[:, :txt.shape[1]], attn[:, txt.shape[1]:]
        img = img + i1g * self.img_attn.proj(img_attn)
        img = img + i2g * self.img_mlp((1 + i2c) * self.img_norm2(img) + i2s)
        txt = txt + t1g * self.txt_attn.proj(txt_attn)
        txt = txt + t2g * self.txt_mlp((1 + t2c) * self.txt_norm2(txt) + t2s)
        return img, txt


class SingleStreamBlock(nn.Module):
    def __init__(self, dim, heads, mlp):
        super().__init__()
        self.num_heads, self.hidden_size, self.mlp_hidden_dim = heads, dim, mlp
        self.linear1, self.linear2 = nn.Linear(dim, dim * 3 + mlp), nn.Linear(dim + mlp, dim)
        self.norm = QKNorm(dim // heads)
        self.pre_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(dim, 3)

    def forward(self, x, vec, pe, attn_mask=None, transformer_options=None):
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = torch.split(self.linear1((1 + scale) * self.pre_norm(x) + shift),
                               [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v, pe=pe, mask=attn_mask, transformer_options=transformer_options)
        return x + gate * self.linear2(torch.cat((attn, self.mlp_act(mlp)), 2))


class FluxBlocks(nn.Module):
    """The blocks of ``IntegratedFluxTransformer2DModel`` and its loop over them."""

    def __init__(self, dim, heads, mlp, double, single):
        super().__init__()
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(dim, heads, mlp) for _ in range(double))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(dim, heads, mlp) for _ in range(single))

    def forward(self, img, txt, vec, pe):
        for block in self.double_blocks:
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe)
        x = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            x = block(x, vec=vec, pe=pe)
        return x[:, txt.shape[1]:]

    @classmethod
    def from_diffusers(cls, model) -> "FluxBlocks":
        """The blocks of a diffusers ``FluxTransformer2DModel``, weights copied into the host's layout."""
        first = model.transformer_blocks[0]
        dim, heads = first.attn.to_q.in_features, first.attn.heads
        mlp = first.ff.net[0].proj.out_features
        blocks = cls(dim, heads, mlp, len(model.transformer_blocks), len(model.single_transformer_blocks))
        with torch.no_grad():
            for ours, theirs in zip(blocks.double_blocks, model.transformer_blocks):
                a = theirs.attn
                _linear(ours.img_mod.lin, theirs.norm1.linear)
                _linear(ours.txt_mod.lin, theirs.norm1_context.linear)
                _linear(ours.img_attn.qkv, a.to_q, a.to_k, a.to_v)
                _linear(ours.txt_attn.qkv, a.add_q_proj, a.add_k_proj, a.add_v_proj)
                _linear(ours.img_attn.proj, a.to_out[0])
                _linear(ours.txt_attn.proj, a.to_add_out)
                _norms(ours.img_attn.norm, a.norm_q, a.norm_k)
                _norms(ours.txt_attn.norm, a.norm_added_q, a.norm_added_k)
                for mine, ff in ((ours.img_mlp, theirs.ff), (ours.txt_mlp, theirs.ff_context)):
                    _linear(mine[0], ff.net[0].proj)
                    _linear(mine[2], ff.net[2])
            for ours, theirs in zip(blocks.single_blocks, model.single_transformer_blocks):
                a = theirs.attn
                _linear(ours.modulation.lin, theirs.norm.linear)
                _linear(ours.linear1, a.to_q, a.to_k, a.to_v, theirs.proj_mlp)
                _linear(ours.linear2, theirs.proj_out)
                _norms(ours.norm, a.norm_q, a.norm_k)
        return blocks.eval()


def _linear(target: nn.Linear, *sources: nn.Linear) -> None:
    target.weight.copy_(torch.cat([s.weight for s in sources]))
    target.bias.copy_(torch.cat([s.bias for s in sources]))


def _norms(target: QKNorm, q_norm, k_norm) -> None:
    target.query_norm.scale.copy_(q_norm.weight)
    target.key_norm.scale.copy_(k_norm.weight)
