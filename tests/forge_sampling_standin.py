"""A stand-in of Forge's (and Forge Neo's) ``backend/sampling``: ``compile_conditions``, ``calc_cond_uncond_batch``
and the CFG with its post-CFG functions (``sampling_function_inner``), around a toy ``apply_model`` over the Forge-style
toy UNet of ``tests/forge_standin.py`` (hosts.md §4.2, §6).

As in the host: the conds' ``model_conds`` are processed to the batch and concatenated per key (cross-attention
contexts of different token lengths repeated to their least common multiple), the cond and uncond entries run in
one call with the uncond chunk first (or, ``SPLIT`` in the model options, one call each, as the host does when memory
is short), ``transformer_options`` gets ``cond_or_uncond``, ``sigmas``, ``cond_mark`` and the cond/uncond indices,
a ``control`` is computed for the call's rows before the model function wrapper, which is called as
``wrapper(apply_model, {"input", "timestep", "c", "cond_or_uncond"})`` and its output chunked per entry.
"""
from __future__ import annotations

import math
import sys
import types

import torch

SPLIT = "standin_one_entry_per_call"


class Condition:
    """``backend.sampling.condition.Condition`` (and ``ConditionCrossAttn`` with ``crossattn``)."""

    def __init__(self, cond: torch.Tensor, crossattn: bool = False) -> None:
        self.cond, self.crossattn = cond, crossattn

    def process_cond(self, batch_size, device, **kwargs):
        repeated = self.cond.repeat([math.ceil(batch_size / self.cond.shape[0])] + [1] * (self.cond.dim() - 1))
        return Condition(repeated[:batch_size].to(device), self.crossattn)

    def concat(self, others):
        conds = [self.cond] + [other.cond for other in others]
        if self.crossattn:
            length = math.lcm(*[c.shape[1] for c in conds])
            conds = [c.repeat(1, length // c.shape[1], 1) for c in conds]
        return torch.cat(conds)


def compile_conditions(cond):
    if isinstance(cond, torch.Tensor):
        return [dict(cross_attn=cond, model_conds=dict(c_crossattn=Condition(cond, True)))]
    return [dict(cross_attn=cond["crossattn"], pooled_output=cond["vector"],
                 model_conds=dict(c_crossattn=Condition(cond["crossattn"], True), y=Condition(cond["vector"])))]


def toy_apply_model(unet, calls: list):
    """``BaseModel.apply_model``: x0 from x, σ and the call's conditions; ``calls`` gets (rows, cond_or_uncond)."""
    def apply_model(x, t, c_crossattn, transformer_options, y=None, c_concat=None, control=None,
                    control_model=None):
        calls.append((x.shape[0], list(transformer_options["cond_or_uncond"])))
        with torch.no_grad():
            out = x - 0.05 * t[:, None, None, None] * unet(x, t, context=c_crossattn,
                                                            transformer_options=transformer_options)
            if y is not None:
                out = out + 0.01 * y.mean(dim=1)[:, None, None, None]
            if c_concat is not None:
                out = out + 0.1 * c_concat.mean(dim=(1, 2, 3))[:, None, None, None]
            if control is not None:
                out = out + control
        return out
    return apply_model


def calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options):
    out = {0: torch.zeros_like(x_in), 1: torch.zeros_like(x_in)}
    to_run = [(entry, 0) for entry in cond] + [(entry, 1) for entry in (uncond or [])]
    groups = [[item] for item in reversed(to_run)] if model_options.get(SPLIT) else [list(reversed(to_run))]
    for group in groups:
        roles = [role for _, role in group]
        conditions = [{key: value.process_cond(x_in.shape[0], x_in.device)
                       for key, value in entry["model_conds"].items()} for entry, _ in group]
        c = {key: conditions[0][key].concat([other[key] for other in conditions[1:]]) for key in conditions[0]}
        input_x, timestep_ = torch.cat([x_in] * len(group)), torch.cat([timestep] * len(group))
        options = dict(model_options.get("transformer_options", {}))
        options.update(cond_or_uncond=roles[:], sigmas=timestep,
                       cond_mark=torch.tensor([float(r) for r in roles for _ in range(x_in.shape[0])]),
                       cond_indices=[i for n, r in enumerate(roles) if r == 0
                                     for i in range(n * x_in.shape[0], (n + 1) * x_in.shape[0])],
                       uncond_indices=[i for n, r in enumerate(roles) if r == 1
                                       for i in range(n * x_in.shape[0], (n + 1) * x_in.shape[0])])
        c["transformer_options"] = options
        control = group[0][0].get("control")
        if control is not None:
            c["control"] = torch.full_like(input_x, float(control))  # residuals for these rows
            c["control_model"] = control
        wrapper = model_options.get("model_function_wrapper")
        args = {"input": input_x, "timestep": timestep_, "c": c, "cond_or_uncond": roles}
        output = wrapper(model.apply_model, args) if wrapper else model.apply_model(input_x, timestep_, **c)
        for chunk, role in zip(output.chunk(len(group)), roles):
            out[role] += chunk
    return out[0], out[1]


def sampling_function(patcher, x, sigma, text_cond, text_uncond, cond_scale, image_cond=None, control=None):
    """``sampling_function`` + ``sampling_function_inner``: conds compiled (the cond with its weight, as
    ``compile_weighted_conditions`` does), the concat image and ControlNet on
    every entry, CFG (uncond dropped at CFG 1), then each ``sampler_post_cfg_function``."""
    cond, uncond = compile_conditions(text_cond), compile_conditions(text_uncond)
    cond[0]["strength"] = 1.0  # compile_weighted_conditions: the AND weight on every cond entry
    for entry in cond + uncond:
        if image_cond is not None:
            entry["model_conds"]["c_concat"] = Condition(image_cond)
        if control is not None:
            entry["control"] = control
    options, model = patcher.model_options, patcher.model
    uncond_ = None if math.isclose(cond_scale, 1.0) else uncond
    cond_pred, uncond_pred = calc_cond_uncond_batch(model, cond, uncond_, x, sigma, options)
    result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for function in options.get("sampler_post_cfg_function", []):
        result = function({"denoised": result, "cond": cond, "uncond": uncond, "model": model,
                           "uncond_denoised": uncond_pred if uncond_ is not None else None,
                           "cond_denoised": cond_pred, "sigma": sigma, "model_options": options, "input": x})
    return result


def install_backend(monkeypatch) -> None:
    """``backend.sampling.condition`` and ``backend.sampling.sampling_function`` as the adapter imports them."""
    names = ("backend", "backend.sampling", "backend.sampling.condition", "backend.sampling.sampling_function")
    modules = {name: types.ModuleType(name) for name in names}
    modules["backend.sampling.condition"].compile_conditions = compile_conditions
    modules["backend.sampling.sampling_function"].calc_cond_uncond_batch = calc_cond_uncond_batch
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
