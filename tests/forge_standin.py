"""A stand-in of Forge's (and Forge Neo's) sampling around the toy UNet: the UNet patcher with its replace and output
patches, ``process_before_every_sampling`` called with the host's swallowing of errors, the denoiser callback, and
the UNet called through the patcher's ``transformer_options`` (hosts.md §4.2, §6, §17).

Forge and Neo differ here as they do for this extension: Forge's ``UnetPatcher`` has
``set_memory_peak_estimation_modifier``; Neo's has ``add_extra_preserved_memory_during_sampling`` instead.
"""
from __future__ import annotations

import copy
import types

import torch

from lib_consistency.surfaces.instance_hooks import ldm_layer_address
from tests.fake_webui import ToyAttention, ToyModel, ToyProcessing


def attention_function(q, k, v, heads, mask=None):
    """Forge's ``backend.attention.attention_function``: [R, T, heads·d] in and out."""
    rows, _, width = q.shape

    def split(t):
        return t.view(rows, -1, heads, width // heads).transpose(1, 2)

    out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
    return out.transpose(1, 2).reshape(rows, -1, width)


class ForgeAttention(ToyAttention):
    """Forge's ``CrossAttention`` with its ``BasicTransformerBlock`` around it: a replace patch for this block's
    (block, number, index) key (or the 2-tuple fallback) gets the projected q/k/v; attn1's output patches follow
    ``to_out``."""

    kind: str = "attn1"
    address: tuple = ("input", 1, 0)
    options: dict | None = None  # the transformer_options of the current UNet call (set by ForgeUNet)
    original_shape: list | None = None  # the UNet input's [R, C, H, W] (set by ForgeUNet)

    def forward(self, x, context=None, mask=None):
        options = self.options or {}
        context = x if context is None else context
        block, index = self.address[:2], self.address[2]
        extra = {**options, "n_heads": self.heads, "block": block, "block_index": index,
                 "original_shape": list(self.original_shape)}
        patches = options.get("patches_replace", {}).get(self.kind, {})
        patch = patches.get(self.address, patches.get(block))
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        out = self.to_out(patch(q, k, v, extra) if patch is not None else attention_function(q, k, v, self.heads))
        if self.kind == "attn1":
            for output_patch in options.get("patches", {}).get("attn1_output_patch", []):
                out = output_patch(out, extra)
        return out


class ForgeUNet(torch.nn.Module):
    """``forward(x, timesteps, context, transformer_options)`` over the toy UNet's modules (ldm names kept)."""

    def __init__(self, toy: torch.nn.Module) -> None:
        super().__init__()
        self.toy = toy
        self.attention = []
        for name, module in toy.named_modules():
            for kind in ("attn1", "attn2"):
                address = ldm_layer_address(name, kind)
                if address is not None:
                    module.__class__ = ForgeAttention
                    module.kind, module.address = kind, address
                    self.attention.append(module)

    def forward(self, x, timesteps=None, context=None, transformer_options=None):
        for module in self.attention:  # Forge's UNet sets original_shape = the UNet input's shape
            module.options, module.original_shape = transformer_options or {}, list(x.shape)
        try:
            return self.toy(x, timesteps, context)
        finally:
            for module in self.attention:
                module.options = None


class ForgePatcher:
    """Forge's ``UnetPatcher`` as this extension uses it; ``clone`` deep-copies the options, the model is shared."""

    def __init__(self, model) -> None:
        self.model = model
        self.model_options = {"transformer_options": {}}

    def clone(self):
        twin = type(self)(self.model)
        twin.model_options = copy.deepcopy(self.model_options)
        return twin

    def memory_required(self, shape):
        return 1000.0 * shape[0]

    def set_model_patch_replace(self, patch, name, block_name, number, transformer_index=None):
        options = dict(self.model_options["transformer_options"])
        options["patches_replace"] = dict(options.get("patches_replace", {}))
        options["patches_replace"][name] = dict(options["patches_replace"].get(name, {}))
        key = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
        options["patches_replace"][name][key] = patch
        self.model_options["transformer_options"] = options

    def set_transformer_option(self, key, value):
        self.model_options["transformer_options"][key] = value

    def set_model_attn1_output_patch(self, patch):
        patches = self.model_options["transformer_options"].setdefault("patches", {})
        patches["attn1_output_patch"] = patches.get("attn1_output_patch", []) + [patch]

    def set_model_sampler_post_cfg_function(self, function):
        self.model_options["sampler_post_cfg_function"] = self.model_options.get(
            "sampler_post_cfg_function", []) + [function]


class ForgeClassicPatcher(ForgePatcher):
    """Forge (``2.0.1v1.10.1``): the memory peak modifier."""

    def set_memory_peak_estimation_modifier(self, modifier):
        self.model_options["memory_peak_estimation_modifier"] = modifier


class NeoPatcher(ForgePatcher):
    """Forge Neo: no modifier; extra bytes kept free while sampling (``backend/patcher/unet.py``)."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.extra_preserved_memory_during_sampling = 0

    def clone(self):
        twin = super().clone()
        twin.extra_preserved_memory_during_sampling = self.extra_preserved_memory_during_sampling
        return twin

    def add_extra_preserved_memory_during_sampling(self, memory_in_bytes: int):
        self.extra_preserved_memory_during_sampling += memory_in_bytes


def forge_model(tokenizer, encoder, patcher_class=ForgeClassicPatcher) -> ToyModel:
    """A toy model the adapter takes for Forge's: ``forge_objects`` with a UNet patcher over a Forge-style UNet."""
    model = ToyModel(tokenizer, encoder)
    unet = ForgeUNet(model.model.diffusion_model)
    model.model = types.SimpleNamespace(diffusion_model=unet)  # what the A1111 path would hook: nothing of ours
    patcher = patcher_class(types.SimpleNamespace(diffusion_model=unet))
    model.forge_objects_after_applying_lora = types.SimpleNamespace(unet=patcher)
    model.forge_objects = types.SimpleNamespace(unet=patcher)
    return model


class ForgeProcessing(ToyProcessing):
    """``StableDiffusionProcessingTxt2Img.sample`` of Forge: reset ``forge_objects``, every script's
    ``process_before_every_sampling`` (errors logged, not raised: ``modules/scripts.py``), then the sampler with the
    patcher assigned by then; each step one UNet call of [cond ; uncond] (``cond_or_uncond`` [0, 1])."""

    def __init__(self, model, scripts=(), **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.scripts_before_sampling = list(scripts)
        self.swallowed: list[Exception] = []

    def sample(self, on_cfg_denoiser, fail_at_step: int | None = None):
        model = self.sd_model
        model.forge_objects = types.SimpleNamespace(unet=model.forge_objects_after_applying_lora.unet)
        prompts = self.prompt[self.iteration * self.batch_size:][:self.batch_size] \
            if isinstance(self.prompt, list) else [self.prompt] * self.batch_size
        x = self.rng.next() if self.rng is not None else \
            torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(0))
        for script in self.scripts_before_sampling:
            try:
                script(self, x=x)
            except Exception as error:  # noqa: BLE001  (the host's behaviour)
                self.swallowed.append(error)
        unet = model.forge_objects.unet
        cond, uncond = model.cond_stage_model.encode(prompts), model.cond_stage_model.encode([""] * len(prompts))
        denoiser = types.SimpleNamespace(p=self, step=0, total_steps=self.steps)
        for step in range(self.steps):
            params = types.SimpleNamespace(x=x, sigma=torch.full((len(prompts),), 10.0 - step), sampling_step=step,
                                           total_sampling_steps=self.steps, text_cond=cond, text_uncond=uncond,
                                           denoiser=denoiser)
            try:
                on_cfg_denoiser(params)
            except Exception as error:  # noqa: BLE001  (script_callbacks report, not raise)
                self.swallowed.append(error)
            self.seen_conds.append(params.text_cond)
            options = {**unet.model_options["transformer_options"], "cond_or_uncond": [0, 1],
                       "sigmas": params.sigma}
            out = unet.model.diffusion_model(torch.cat([x, x]), None,
                                             context=torch.cat([params.text_cond, params.text_uncond]),
                                             transformer_options=options)
            x = x - 0.1 * out[:len(prompts)]
            denoiser.step += 1
        return x
