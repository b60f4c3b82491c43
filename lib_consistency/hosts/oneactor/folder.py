"""The OneActor character folder: where character files are found and saved (WebUI setting
``consistent_story_oneactor_dir``, default ``models/oneactor`` under the WebUI's models path)."""
from __future__ import annotations

from pathlib import Path

from modules import paths, shared

from ...oneactor.character_file import CharacterFileError, file_hash, list_characters, load_character

FOLDER_OPTION = "consistent_story_oneactor_dir"


class CharacterNotFoundError(FileNotFoundError):
    """No file for a character name; the message names the character and the folder."""


def characters_dir() -> Path:
    """The character folder: the WebUI setting, else ``models/oneactor`` under the WebUI's models path."""
    configured = str(shared.opts.data.get(FOLDER_OPTION) or "").strip()
    return Path(configured) if configured else Path(paths.models_path) / "oneactor"


def character_path_for(name: str) -> Path:
    """Where character ``name`` is saved (the folder is created)."""
    folder = characters_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}.safetensors"


def describe_characters() -> list[dict]:
    """Every character file of the folder as the API lists it; an unreadable one with its error."""
    folder = characters_dir()
    listed = []
    for name, path in list_characters(folder) if folder.is_dir() else []:
        try:
            c = load_character(path)
            listed.append({"name": name, "file": str(path), "hash": file_hash(path), "base_word": c.base_word,
                           "arch": c.arch, "checkpoint_name": c.checkpoint_name,
                           "checkpoint_hash": c.checkpoint_hash, "prompt": c.prompt, "seed": c.seed})
        except CharacterFileError as error:
            listed.append({"name": name, "file": str(path), "error": str(error)})
    return listed


def character_path(name: str) -> Path:
    folder = characters_dir()
    found = list_characters(folder) if folder.is_dir() else []
    for stem, path in found:
        if stem == name:
            return path
    known = ", ".join(stem for stem, _ in found) or "none"
    raise CharacterNotFoundError(f"OneActor: no character '{name}' in {folder} (characters there: {known})")
