"""OneActor characters as an extra network of both WebUIs: the folder, ``<oneactor:...>`` and its card page.

Host contract (A1111 1.10 / Forge ``modules/extra_networks.py``, ``modules/ui_extra_networks.py``): an
``ExtraNetwork`` named ``oneactor`` is registered from ``on_before_ui`` (which also runs for ``--nowebui``), after
the host's ``extra_networks.initialize()``; its ``activate(p, params_list)`` runs once per batch. The card page
lists the ``*.safetensors`` character files of the folder (WebUI setting ``consistent_story_oneactor_dir``, default
``models/oneactor``); a card's preview is ``NAME.preview.png`` beside the file, written from the preview the
file holds when it is missing.
"""
from __future__ import annotations

import logging

from modules import extra_networks, shared, ui_extra_networks

from ...oneactor.character_file import CharacterFileError, file_hash, list_characters, load_character
from . import generation as oneactor
from .folder import FOLDER_OPTION, CharacterNotFoundError, character_path, characters_dir

log = logging.getLogger(__name__)
PAGE_TITLE = "OneActor"


class OneActorNetwork(extra_networks.ExtraNetwork):
    """``<oneactor:NAME>`` / ``<oneactor:NAME:v>``; the work is in ``generation.py``."""

    def __init__(self):
        super().__init__(oneactor.NETWORK)

    def activate(self, p, params_list):
        oneactor.activate(p)

    def deactivate(self, p):
        oneactor.deactivate(p)


class OneActorPage(ui_extra_networks.ExtraNetworksPage):
    """The Extra Networks tab of the characters: preview, base word and checkpoint on every card."""

    def __init__(self):
        super().__init__(PAGE_TITLE)

    def refresh(self):
        pass  # the folder is listed afresh on every call

    def create_item(self, name, index=None, enable_filter=True):
        try:
            path = character_path(name)
            character = load_character(path)
        except (CharacterNotFoundError, CharacterFileError) as error:
            log.warning("%s", error)
            return None
        preview = path.with_suffix(".preview.png")
        if not preview.exists() and character.preview_png:
            try:
                preview.write_bytes(character.preview_png)
            except OSError:
                pass
        base = str(path.with_suffix(""))
        return {
            "name": name,
            "filename": str(path),
            "shorthash": file_hash(path),
            "preview": self.find_preview(base),
            "description": f"base word '{character.base_word}', {character.arch.upper()}, made with "
                           f"{character.checkpoint_name or 'an unknown checkpoint'}",
            "search_terms": [self.search_terms_from_path(str(path)), character.base_word],
            "prompt": ui_extra_networks.quote_js(f"<{oneactor.NETWORK}:{name}>"),
            "local_preview": f"{base}.preview.png",
            "sort_keys": {"default": index, **self.get_sort_keys(str(path))},
        }

    def list_items(self):
        folder = characters_dir()
        for index, (name, _) in enumerate(list_characters(folder) if folder.is_dir() else []):
            item = self.create_item(name, index)
            if item is not None:
                yield item

    def allowed_directories_for_previews(self):
        return [str(characters_dir())]


def register_network() -> None:
    """``on_before_ui``: the extra network and its card page (idempotent across UI reloads)."""
    extra_networks.register_extra_network(OneActorNetwork())
    if not any(isinstance(page, OneActorPage) or type(page).__name__ == "OneActorPage"
               for page in ui_extra_networks.extra_pages):
        ui_extra_networks.register_page(OneActorPage())


def register_settings() -> None:
    """``on_ui_settings``: the folder option in the WebUI's Settings page."""
    shared.opts.add_option(FOLDER_OPTION, shared.OptionInfo(
        "", "OneActor character folder (empty: models/oneactor)", section=("consistent_story", "Consistent Story")))
