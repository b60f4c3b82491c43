"""Process-wide WebUI callbacks, registered once by the entry script (hosts.md §5: never per run)."""
from __future__ import annotations

from modules import shared

from . import a1111, pipeline
from .guard import kept
from .oneactor import create as oneactor_create, generation as oneactor


def _p(params):
    return getattr(getattr(params, "denoiser", None), "p", None)


# The hosts only log an exception from a callback and sample on: each part's error is kept and raised at the next
# UNet call, or from p.sample after the last one (guard.py).
def on_cfg_denoiser(params) -> None:
    with kept(_p(params), "the story's conditioning for this step (on_cfg_denoiser)"):
        pipeline.on_cfg_denoiser(params)  # first: the story's own conds, which OneActor's offsets then act on
    with kept(_p(params), "OneActor's character offsets for this step (on_cfg_denoiser)"):
        oneactor.on_cfg_denoiser(params)
    oneactor_create.on_cfg_denoiser(params)  # a character's base images: the rows of this step


def on_cfg_denoised(params) -> None:
    with kept(_p(params), "OneActor's cluster guidance (on_cfg_denoised)"):
        oneactor.on_cfg_denoised(params)


def on_cfg_after_cfg(params) -> None:
    with kept(_p(params), "OneActor's cluster guidance (on_cfg_after_cfg)"):
        oneactor.on_cfg_after_cfg(params)


def on_import() -> None:
    """Runs when the host imports the entry file, while it loads scripts. The xyz script (the WebUI's own
    ``scripts/``) is loaded before any extension's, so its axis list gets ours before anything reads it. This is the
    registration that counts with ``--nowebui``: there the API builds every script's UI (``Api.__init__`` calls
    ``ui.create_ui``) before ``on_before_ui`` runs (``webui.api_only``), and the xyz script reads its axes in
    ``ui()``."""
    from .xyz import register_xyz_axes
    register_xyz_axes()


def on_before_ui() -> None:
    """Before the UI is built (and, with ``--nowebui``, after the API built the scripts' UI): the axes again, for a
    host that loads the xyz script after ours (labels already there are skipped), and the OneActor network."""
    from .oneactor.network import register_network
    from .xyz import register_xyz_axes
    register_xyz_axes()
    register_network()


def on_app_started(demo, app) -> None:
    from .oneactor.api import register_api
    register_api(demo, app)


def on_ui_tabs():
    from .oneactor.tab import build_tab
    return build_tab()


def on_ui_settings() -> None:
    from .oneactor.network import register_settings
    register_settings()


def on_infotext_pasted(infotext, params) -> None:
    from .ui import on_infotext_pasted as restore_style
    restore_style(infotext, params)


def on_script_unloaded() -> None:
    """Reload UI or shutdown: leave no hook of ours on the loaded model."""
    model = getattr(shared, "sd_model", None)
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    if unet is not None:
        a1111.sweep_stale(unet)
