"""Never a silently plain story: errors the host would swallow fail the sampling, and every UNet call proves that
each method the settings ask for reached the model that samples (both WebUIs; Forge and Forge Neo alike).

Host contract (hosts.md §1.3, §17): A1111 and both Forges catch and only log exceptions raised in a script's
``process*`` hooks (``process_before_every_sampling`` included) and in every ``script_callbacks`` callback
(``on_cfg_denoiser`` ...). Sampling then goes on with whatever was in place: a story drawn plain whose infotext claims
the methods. Exceptions raised inside the UNet's forward (module hooks, Forge's attention patches) and from
``p.sample`` are not caught: the job fails with the message (API: HTTP 500; UI: the error box).

- ``kept(p, where)`` wraps our code in a swallowing hook: the error is recorded on ``p``; ``checked_sampling``
  (our wrapper of ``p.sample``, for a story or a job with OneActor characters) raises it before sampling, and during
  sampling a one-shot forward pre-hook on the UNet module raises it at the next UNet call; an error kept after the
  last UNet call is raised when sampling returns. The wrapper removes any one-shot left in ``finally``.
- ``SamplingGuard`` brackets every UNet call of a story's sampling (forward pre-hook and hook on the UNet module,
  which every Forge patcher clone shares): after the call, each surface in ``Reach.wanted`` must have been entered
  (``reach.py``), or the job fails naming the method.
"""
from __future__ import annotations

import contextlib
import logging
import traceback
from typing import Iterator

import torch

from ..surfaces.flux_blocks import flux_blocks, is_flux_model
from ..surfaces.instance_hooks import ldm_layer_address
from ..surfaces.reach import CSA, HARMONIZATION, IPCA, SHARING, SUBJECT_MAPS, Reach

log = logging.getLogger(__name__)
ERRORS_ATTRIBUTE = "consistent_story_errors"
CHECKED_ATTRIBUTE = "consistent_story_checked_sampling"  # p.sample is wrapped by checked_sampling
MARK = "consistent_story_guard"  # on every hook function of ours on the UNet module: the stale-hook sweep finds them


def unet_module(model) -> torch.nn.Module | None:
    """The module the sampler calls: A1111 ``model.diffusion_model``; Forge and Neo the UNet patcher's
    ``model.diffusion_model`` (one module shared by every clone of the patcher). None before a model is loaded."""
    forge = getattr(model, "forge_objects", None)
    if forge is not None:
        inner = getattr(getattr(forge, "unet", None), "model", None)
    else:
        inner = getattr(model, "model", None)
    return getattr(inner, "diffusion_model", None)


def _message(where: str, error: BaseException) -> str:
    text = str(error) or type(error).__name__
    if text.startswith(("Consistent Story", "OneActor")):
        return text
    return f"Consistent Story: {where} failed ({type(error).__name__}: {text}); stopped so that no image is made " \
           f"without the story's methods"


def keep(p, where: str, error: BaseException) -> RuntimeError:
    """Record an error raised where the host swallows it; the next UNet call (or ``raise_kept``) raises it."""
    kept_error = RuntimeError(_message(where, error))
    kept_error.__cause__ = error
    log.error("%s\n%s", kept_error, "".join(traceback.format_exception(error)))
    errors = getattr(p, ERRORS_ATTRIBUTE, None)
    if errors is None:
        errors = []
        setattr(p, ERRORS_ATTRIBUTE, errors)
    errors.append(kept_error)
    unet = unet_module(getattr(p, "sd_model", None))
    if unet is not None and getattr(p, CHECKED_ATTRIBUTE, False):  # its wrapper removes the one-shot afterwards
        _fail_next_call(unet, kept_error)
    return kept_error


@contextlib.contextmanager
def kept(p, where: str) -> Iterator[None]:
    """Run our part of a hook the host swallows errors of; an error is kept (``keep``), not raised here."""
    try:
        yield
    except Exception as error:  # noqa: BLE001  (the host would only log it; see the module docstring)
        if p is None:
            raise
        keep(p, where, error)


def raise_kept(p) -> None:
    """The first error a swallowing hook kept for this job, if any."""
    errors = getattr(p, ERRORS_ATTRIBUTE, None)
    if errors:
        raise errors[0]


def checked_sampling(p, sample):
    """``sample`` (a ``p.sample``) raising the errors kept for ``p`` before and after it, and leaving no one-shot
    hook behind (install it as ``p.sample``)."""
    setattr(p, CHECKED_ATTRIBUTE, True)

    def checked(*args, **kwargs):
        raise_kept(p)
        try:
            samples = sample(*args, **kwargs)
            raise_kept(p)
            return samples
        finally:
            sweep(unet_module(p.sd_model))
    return checked


def _fail_next_call(unet: torch.nn.Module, error: RuntimeError) -> None:
    handle = None

    def fail(module, args, kwargs):
        handle.remove()
        raise error
    fail.consistent_story_guard = True
    handle = unet.register_forward_pre_hook(fail, with_kwargs=True)


def sweep(unet: torch.nn.Module | None) -> None:
    """Remove every guard hook a failed or interrupted run left on the UNet module."""
    if unet is None:
        return
    for hooks, kwargs_flags in ((unet._forward_pre_hooks, unet._forward_pre_hooks_with_kwargs),
                                (unet._forward_hooks, unet._forward_hooks_with_kwargs)):
        for key, hook in list(hooks.items()):
            if getattr(hook, MARK, False):
                del hooks[key]
                kwargs_flags.pop(key, None)


def want_surfaces(reach: Reach, settings, unet: torch.nn.Module) -> None:
    """The surfaces ``settings`` ask for, each on every attention layer of its kind of the ldm-named ``unet`` (what
    the pipeline's ``install`` hooks on A1111 and Forge's ``patch_unet`` patches; the same conditions)."""
    reach.clear()
    if is_flux_model(unet):  # the DiT surface enters every block; the subject maps only the double-stream ones
        blocks = [layer for layer, _ in flux_blocks(unet)]
        layers = {"attn1": blocks, "attn2": [layer for layer in blocks if layer[0] == "double"]}
    else:
        layers = {kind: [a for n, _ in unet.named_modules() if (a := ldm_layer_address(n, kind))]
                  for kind in ("attn1", "attn2")}
    if settings.masked_sharing:
        reach.want(SHARING, layers["attn1"])
        reach.want(HARMONIZATION, layers["attn1"])
        reach.want(SUBJECT_MAPS, layers["attn2"])
    elif settings.csa:
        reach.want(CSA, layers["attn1"])
    if settings.ipca and settings.consolidate:  # on Flux every block's joint attention holds the text keys
        reach.want(IPCA, layers["attn1"] if is_flux_model(unet) else layers["attn2"])


class SamplingGuard:
    """Checks every UNet call of one ``p.sample``: each wanted surface of ``reach`` entered (``install``/``remove``
    symmetric, from the pipeline's ``install``/``uninstall``)."""

    def __init__(self, reach: Reach) -> None:
        self.reach = reach
        self._handles: list = []

    def install(self, unet: torch.nn.Module) -> None:
        def before(module, args, kwargs):
            self.reach.begin()

        def after(module, args, kwargs, output):
            missing = self.reach.missing()
            if missing:
                raise RuntimeError(
                    f"Consistent Story: {' and '.join(missing)} did not run in this UNet call: "
                    f"{'its' if len(missing) == 1 else 'their'} hooks or patches are missing from the model that "
                    "samples (another extension replaced them, or this WebUI version calls attention differently). "
                    "Stopped so that no image claims a method it was drawn without")
        before.consistent_story_guard = after.consistent_story_guard = True
        self._handles = [unet.register_forward_pre_hook(before, with_kwargs=True),
                         unet.register_forward_hook(after, with_kwargs=True)]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
