"""A stand-in of A1111 1.10's ``CFGDenoiser.forward`` (``modules/sd_samplers_cfg_denoiser.py``) around a toy inner
model, for the paths an extension's rows go through (hosts.md §4.1): the ``on_cfg_denoiser`` callbacks and what the
host reads back after them, the skipped uncond, ``pad_cond_uncond``, one call of all rows or calls of B rows
(``batch_cond_uncond`` off), the per-chunk loop for different token lengths, ``on_cfg_denoised`` with ``x_out``,
``combine_denoised`` (cond rows 0..B−1, the last B rows as uncond) and ``on_cfg_after_cfg``. No AND, no edit model.
"""
from __future__ import annotations

import types

import torch


class DictWithShape(dict):
    """The host's SDXL cond (``prompt_parser.DictWithShape``): ``shape`` is its ``crossattn``'s."""

    @property
    def shape(self):
        return self["crossattn"].shape


def _cat(conds):
    if isinstance(conds[0], dict):
        return {key: torch.cat([c[key] for c in conds]) for key in conds[0]}
    return torch.cat(conds)


def _rows(cond, start, stop):
    return {key: value[start:stop] for key, value in cond.items()} if isinstance(cond, dict) else cond[start:stop]


def _condition(crossattn, image_cond):
    if isinstance(crossattn, dict):
        return {**crossattn, "c_concat": [image_cond]}
    return {"c_crossattn": [crossattn], "c_concat": [image_cond]}


def toy_inner_model(unet, calls: list):
    """``CFGDenoiser.inner_model``: x0 from x, σ and the condition dict; an SDXL ``vector`` shifts the output. Each
    call's row count is appended to ``calls``."""
    def inner(x, sigma, cond):
        calls.append(x.shape[0])
        context = cond["c_crossattn"][0] if "c_crossattn" in cond else cond["crossattn"]
        with torch.no_grad():
            out = x - 0.05 * sigma[:, None, None, None] * unet(x, None, context=context)
            image_cond = cond["c_concat"][0][:x.shape[0]]  # a skipped uncond leaves the host's image_cond uncut
            out = out + 0.1 * image_cond.mean(dim=(1, 2, 3))[:, None, None, None]
            if "vector" in cond:
                out = out + 0.01 * cond["vector"].mean(dim=1)[:, None, None, None]
        return out
    return inner


class CFGDenoiserStandIn:
    """One ``forward`` per step; ``callbacks`` has ``on_cfg_denoiser``/``on_cfg_denoised``/``on_cfg_after_cfg``
    (or None: the host without extensions); ``opts``: the (stub) ``shared.opts``, read as the host reads
    ``batch_cond_uncond`` (default on), ``pad_cond_uncond``, ``pad_cond_uncond_v0``, ``skip_early_cond`` and
    ``s_min_uncond_all``. ``empty``: ``cond_stage_model_empty_prompt`` [1, 77, D] for padding."""

    def __init__(self, p, inner, opts, callbacks=None, empty: torch.Tensor | None = None,
                 total_steps: int = 3) -> None:
        self.p, self.inner, self.opts, self.callbacks, self.empty = p, inner, opts, callbacks, empty
        self.denoiser = types.SimpleNamespace(p=p, step=0, total_steps=total_steps, mask=None, nmask=None)
        self.total_steps = total_steps

    def _pad(self, tensor, repeats):
        if isinstance(tensor, dict):
            tensor["crossattn"] = self._pad(tensor["crossattn"], repeats)
            return tensor
        return torch.cat([tensor, self.empty.repeat((tensor.shape[0], repeats, 1))], dim=1)

    def forward(self, x, sigma, uncond, cond, cond_scale, image_cond, s_min_uncond: float = 0.0):
        batch = x.shape[0]
        opts = types.SimpleNamespace(**{name: getattr(self.opts, name, default) for name, default in (
            ("batch_cond_uncond", True), ("pad_cond_uncond", False), ("pad_cond_uncond_v0", False),
            ("skip_early_cond", 0.0), ("s_min_uncond_all", False))})
        x_in, sigma_in, image_cond_in = torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([image_cond] * 2)
        params = types.SimpleNamespace(x=x_in, image_cond=image_cond_in, sigma=sigma_in,
                                       sampling_step=self.denoiser.step, total_sampling_steps=self.total_steps,
                                       text_cond=cond, text_uncond=uncond, denoiser=self.denoiser)
        if self.callbacks is not None:
            self.callbacks.on_cfg_denoiser(params)
        x_in, image_cond_in, sigma_in = params.x, params.image_cond, params.sigma
        tensor, uncond = params.text_cond, params.text_uncond
        step = self.denoiser.step
        skip = (opts.skip_early_cond != 0 and step / self.total_steps <= opts.skip_early_cond) or \
            ((step % 2 or opts.s_min_uncond_all) and s_min_uncond > 0 and float(sigma[0]) < s_min_uncond)
        if skip:
            x_in, sigma_in = x_in[:-batch], sigma_in[:-batch]
        if opts.pad_cond_uncond and not opts.pad_cond_uncond_v0 and tensor.shape[1] != uncond.shape[1]:
            repeats = (tensor.shape[1] - uncond.shape[1]) // self.empty.shape[1]
            if repeats < 0:
                tensor = self._pad(tensor, -repeats)
            else:
                uncond = self._pad(uncond, repeats)
        if tensor.shape[1] == uncond.shape[1] or skip:
            cond_in = tensor if skip else _cat([tensor, uncond])
            if opts.batch_cond_uncond:
                x_out = self.inner(x_in, sigma_in, cond=_condition(cond_in, image_cond_in))
            else:
                x_out = torch.zeros_like(x_in)
                for a in range(0, x_out.shape[0], batch):
                    x_out[a:a + batch] = self.inner(x_in[a:a + batch], sigma_in[a:a + batch], cond=_condition(
                        _rows(cond_in, a, a + batch), image_cond_in[a:a + batch]))
        else:
            x_out = torch.zeros_like(x_in)
            chunk = 2 * batch if opts.batch_cond_uncond else batch
            for a in range(0, tensor.shape[0], chunk):
                b = min(a + chunk, tensor.shape[0])
                x_out[a:b] = self.inner(x_in[a:b], sigma_in[a:b], cond=_condition(_rows(tensor, a, b),
                                                                                  image_cond_in[a:b]))
            if not skip:
                x_out[-batch:] = self.inner(x_in[-batch:], sigma_in[-batch:],
                                            cond=_condition(uncond, image_cond_in[-batch:]))
        if skip:
            x_out = torch.cat([x_out, x_out[:batch]])  # the cond rows stand in for the skipped uncond
        if self.callbacks is not None:
            self.callbacks.on_cfg_denoised(types.SimpleNamespace(x=x_out, sampling_step=step,
                                                                 total_sampling_steps=self.total_steps,
                                                                 inner_model=self.inner))
        scale = 1.0 if skip else cond_scale
        denoised_uncond = x_out[-batch:]
        denoised = denoised_uncond + scale * (x_out[:batch] - denoised_uncond)
        after = types.SimpleNamespace(x=denoised, sampling_step=step, total_sampling_steps=self.total_steps)
        if self.callbacks is not None:
            self.callbacks.on_cfg_after_cfg(after)
        self.denoiser.step += 1
        return after.x
