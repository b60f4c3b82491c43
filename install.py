"""Run by the WebUI at start-up. Consistent Story needs nothing the WebUIs do not already ship
(torch, numpy, einops, transformers, gradio), so this only reports a missing package."""
import importlib.util

REQUIRED = ("torch", "numpy", "einops", "transformers", "gradio")

missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
if missing:
    print(f"[Consistent Story] missing packages: {', '.join(missing)}; "
          "the extension will not load until the WebUI provides them.")
