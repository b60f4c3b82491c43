"""OneActor's η2 rows (paper Eq. 19: ``c + Δ_avg``, one per image) folded into the host's own UNet call on A1111 1.10
(methods.md §6.4; hosts.md §4.1). Forge's fold is a model function wrapper (``hosts/forge.py``).

Host contract (``modules/sd_samplers_cfg_denoiser.py`` ``CFGDenoiser.forward``): after the ``on_cfg_denoiser``
callbacks the host reads back ``params.x``, ``params.image_cond``, ``params.sigma``, ``params.text_cond`` and
``params.text_uncond`` and evaluates every row of them; ``combine_denoised`` reads only the cond rows ``conds_list``
names (0..B−1 without AND) and the last B rows (uncond). B rows placed between the cond and the uncond rows are
therefore evaluated with the others and ignored by the combination; ``on_cfg_denoised`` finds them in ``x_out`` at
rows B..2B−1. Every path of that forward keeps rows in order, so the fold holds in each:

- equal token lengths (or padded to them), ``batch_cond_uncond`` on: ONE call of 3B rows (the saving: 3 rows in one
  call run on a GPU in about the time of 2);
- ``batch_cond_uncond`` off: calls of B rows: cond, η2, uncond (as many calls as the second-call form);
- different token lengths: the host's per-chunk loop over the cond tensor's rows (now 2B: cond and η2, in calls of
  2B or B rows), then its uncond call.

The η2 rows stay in the second call (``inner_model`` from ``on_cfg_denoised``, the form before the fold) when
folding would change a row or could be misread (``fold_refusal``): an edit model's third block of rows (the host's
``combine_denoised_for_edit_model`` splits ``x_out`` in three; no η2 term there, as before), ControlNet's cond/uncond
mark on the context (its per-image hints are sized for the cond and uncond rows), a cond dict with keys other than
SDXL's ``crossattn``/``vector``, or ``pad_cond_uncond`` padding a cond shorter than the negative prompt (the η2 rows
would be padded with it, which the second call never did). A step whose uncond the host skips has no η2 term.

``CONSISTENT_STORY_ONEACTOR_SECOND_CALL=1`` in the WebUI's environment forces the second call on both hosts; it is
for testing only (an image made with it must equal the folded one within float tolerance).
"""
from __future__ import annotations

import os

import torch

SECOND_CALL_ENV = "CONSISTENT_STORY_ONEACTOR_SECOND_CALL"
SDXL_COND_KEYS = frozenset({"crossattn", "vector"})


def second_call_forced() -> bool:
    """The testing switch of the module docstring (read every step)."""
    return os.environ.get(SECOND_CALL_ENV, "") not in ("", "0")


def fold_refusal(params, cond, mark, rows: int, opts) -> str | None:
    """Why the η2 rows of this step cannot ride in the host's call (A1111), or None.

    params: the ``on_cfg_denoiser`` params (``x`` [2B, C, H, W] = [cond ; uncond] for an ordinary model);
    cond: ``params.text_cond`` (tensor [B, T, D] or SDXL dict); mark: ControlNet's mark split off the context, or
    None; rows: B; opts: the host's ``shared.opts``."""
    if second_call_forced():
        return f"{SECOND_CALL_ENV} is set"
    if mark is not None:
        return "ControlNet marks the cond rows"
    if params.x.shape[0] != 2 * rows or params.sigma.shape[0] != 2 * rows or \
            (params.image_cond is not None and params.image_cond.shape[0] != 2 * rows):
        return f"{params.x.shape[0]} rows for {rows} images (an edit model's image-uncond rows?)"
    if isinstance(cond, dict) and set(cond) - SDXL_COND_KEYS:
        return f"cond keys {sorted(cond)}"
    uncond = params.text_uncond
    cond_tokens = (cond["crossattn"] if isinstance(cond, dict) else cond).shape[1]
    uncond_tokens = (uncond["crossattn"] if isinstance(uncond, dict) else uncond).shape[1]
    if cond_tokens < uncond_tokens and getattr(opts, "pad_cond_uncond", False) and \
            not getattr(opts, "pad_cond_uncond_v0", False):
        return "pad_cond_uncond pads the cond"
    return None


def _after_cond(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """[2B, ...] = [cond ; uncond] -> [cond ; cond ; uncond]: the η2 rows copy the cond rows' input."""
    return torch.cat([tensor[:rows], tensor[:rows], tensor[rows:]])


def fold_rows(params, cond, target: torch.Tensor, average: torch.Tensor, rows: int) -> None:
    """Put the η2 rows after the cond rows of the host's call: x, σ and image_cond rows copied from the cond rows,
    the contexts ``[target ; average]`` ([2B, T, D]), an SDXL ``vector`` repeated. An SDXL dict is changed in place
    (the host's ``DictWithShape`` instance, whose ``shape`` is its ``crossattn``'s, is kept)."""
    params.x = _after_cond(params.x, rows)
    params.sigma = _after_cond(params.sigma, rows)
    if params.image_cond is not None:
        params.image_cond = _after_cond(params.image_cond, rows)
    contexts = torch.cat([target, average.to(target.dtype)])
    if isinstance(cond, dict):
        cond["crossattn"] = contexts
        if "vector" in cond:
            cond["vector"] = torch.cat([cond["vector"], cond["vector"]])
    else:
        params.text_cond = contexts


def folded_prediction(x_out: torch.Tensor, rows: int) -> torch.Tensor:
    """The η2 rows' prediction from the host's ``x_out`` ([cond ; η2 ; uncond], [3B, ...]): rows B..2B−1."""
    if x_out.shape[0] != 3 * rows:
        raise RuntimeError(f"OneActor: the cluster guidance (eta2) rows were folded into the WebUI's UNet call, but "
                           f"it returned {x_out.shape[0]} rows for {rows} images (another extension changed the rows "
                           "after ours); stopped so that no image claims eta2")
    return x_out[rows:2 * rows]
