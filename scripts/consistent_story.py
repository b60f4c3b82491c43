"""Consistent Story: the WebUI's entry point. All logic lives in lib_consistency (hosts/ talks to the WebUI).

Only this file is reloaded by "Reload UI"; changes in lib_consistency need a restart.
"""
from modules import script_callbacks

from lib_consistency.hosts import callbacks
from lib_consistency.hosts.script import ConsistentStoryScript  # noqa: F401  (the WebUI registers it from here)

# Global callbacks, registered once per import of this file (the host clears them before re-importing scripts).
script_callbacks.on_cfg_denoiser(callbacks.on_cfg_denoiser)
script_callbacks.on_cfg_denoised(callbacks.on_cfg_denoised)
script_callbacks.on_cfg_after_cfg(callbacks.on_cfg_after_cfg)
script_callbacks.on_ui_settings(callbacks.on_ui_settings)
script_callbacks.on_ui_tabs(callbacks.on_ui_tabs)
script_callbacks.on_app_started(callbacks.on_app_started)
script_callbacks.on_before_ui(callbacks.on_before_ui)
script_callbacks.on_infotext_pasted(callbacks.on_infotext_pasted)
script_callbacks.on_script_unloaded(callbacks.on_script_unloaded)
callbacks.on_import()  # the X/Y/Z axes now: an API-only server reads them before any callback runs
