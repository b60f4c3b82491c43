"""Process-wide WebUI callbacks, registered once by the entry script (hosts.md §5: never per run)."""
from __future__ import annotations

from modules import shared

from . import pipeline


def on_cfg_denoiser(params) -> None:
    pipeline.on_cfg_denoiser(params)


def on_before_ui() -> None:
    from .xyz import register_xyz_axes
    register_xyz_axes()


def on_infotext_pasted(infotext, params) -> None:
    from .ui import on_infotext_pasted as restore_style
    restore_style(infotext, params)


def on_script_unloaded() -> None:
    """Reload UI or shutdown: leave no hook of ours on the loaded model."""
    model = getattr(shared, "sd_model", None)
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    if unet is not None:
        pipeline.sweep_stale(unet)
