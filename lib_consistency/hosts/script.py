"""The AlwaysOn ``Script`` of both WebUIs: UI, then hands every hook to the host adapter (no method logic here).

The title is the API key: ``alwayson_scripts: {"consistent story": {"args": [...]}}`` (hosts.md §8).
"""
from __future__ import annotations

from modules import scripts

from . import pipeline
from .guard import kept
from .oneactor import generation as oneactor
from .ui import build_ui

TITLE = "Consistent Story"


class ConsistentStoryScript(scripts.Script):
    sorting_priority = 15  # Forge: place among the other accordions

    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return build_ui(self, is_img2img)

    def before_process(self, p, *args):
        try:  # OneActor's options act on <oneactor:...> tags whether the story methods are on or not
            oneactor.remember_settings(p, pipeline.settings_for(p, args), None)
        except Exception as error:
            oneactor.remember_settings(p, None, error)
        pipeline.before_process(p, args)

    # Both Forges only log an exception from here and sample on with the model as it was: kept, raised at the
    # first UNet call (guard.py).
    def process_before_every_sampling(self, p, *args, **kwargs):
        with kept(p, "patching the UNet for the story (process_before_every_sampling)"):
            pipeline.process_before_every_sampling(p, kwargs.get("x"))
        with kept(p, "patching the UNet for OneActor (process_before_every_sampling)"):
            oneactor.process_before_every_sampling(p, kwargs.get("x"))

    def process(self, p, *args):
        with kept(p, "preparing the story's prompts (process)"):
            pipeline.process(p)

    def before_process_batch(self, p, *args, **kwargs):
        with kept(p, "giving the batch its frames' prompts and seeds (before_process_batch)"):
            pipeline.before_process_batch(p)

    def process_batch(self, p, *args, **kwargs):
        with kept(p, "giving the batch its frames' hires prompts (process_batch)"):
            pipeline.process_batch(p)

    def postprocess_batch_list(self, p, pp, *args, **kwargs):
        with kept(p, "giving the batch's images their frames' prompts (postprocess_batch_list)"):
            pipeline.postprocess_batch_list(p)

    def postprocess(self, p, processed, *args):
        pipeline.postprocess(p, processed)
