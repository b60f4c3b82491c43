"""OneActor character names (the file name a character becomes): the old character rules and portability to
Windows, macOS and Linux (device names, Unicode NFC, UTF-8 length), refused with the rule they break."""
from __future__ import annotations

import re

import pytest

from lib_consistency.oneactor.character_file import (CharacterFileError, CharacterNameError, check_character_name,
                                                     save_character, valid_character_name)
from tests.oneactor.test_character_file import folder_listing, make_character


def test_save_refuses_bad_names_and_suffixes(tmp_path):
    for name in (".hidden", "a*b", "x" * 65, "trailing."):
        with pytest.raises(CharacterNameError, match="character name"):
            save_character(tmp_path / f"{name}.safetensors", make_character())
    with pytest.raises(CharacterFileError, match="must end in .safetensors"):
        save_character(tmp_path / "Hobbit.pt", make_character())
    assert folder_listing(tmp_path) == []


@pytest.mark.parametrize("name", ["Hobbit", "a", "Frodo Baggins", "v1.2_final-3", "Éowyn", "x" * 64, "3"])
def test_valid_character_names(name):
    assert valid_character_name(name)


@pytest.mark.parametrize("name", ["", "x" * 65, "a/b", "a\\b", ".hidden", "..", "a:b", "a*b", "a\nb", " lead",
                                  "trail ", "end.", "tab\t", "q?", None, 5])
def test_invalid_character_names(name):
    assert not valid_character_name(name)


@pytest.mark.parametrize("name, reason", [
    ("CON", "device name Windows reserves"), ("con", "device name"), ("Nul", "device name"), ("aux.v2", "device name"),
    ("PRN.old.final", "device name"), ("COM1", "device name"), ("lpt9", "device name"), ("COM0", "device name"),
    ("COM\u00b9", "device name"), ("LPT\u00b3.x", "device name"), ("CON .x", "device name"),
    ("E\u0301owyn", "only letters, digits"), ("\u212bngstr\u00f6m", "NFC"), ("\U00020000" * 61, "bytes in UTF-8"), ("a" * 65, "1-64 characters"), ("", "1-64"),
    ("a/b", "'/'"), ("q?", "'?'"), (".hidden", "may not start"), ("end.", "nor end"), (5, "must be text"),
])
def test_names_that_are_not_portable_are_refused_with_the_reason(tmp_path, name, reason):
    """Windows device names (any case, any extension, superscript digits), decomposed Unicode and names too long in
    UTF-8 for the file system: refused before any tuning, the reason in the message; nothing is written."""
    assert not valid_character_name(name)
    with pytest.raises(CharacterNameError, match=re.escape(reason) if "(" in reason else reason):
        check_character_name(name)
    if isinstance(name, str) and name and "/" not in name:
        with pytest.raises(CharacterNameError):
            save_character(tmp_path / f"{name}.safetensors", make_character())
    assert folder_listing(tmp_path) == []


@pytest.mark.parametrize("name", ["CONSOLE", "Conan", "COM10", "LPT", "NULL", "auxiliary", "my CON", "x.CON",
                                  "\u00c9owyn", "\U00020000" * 60, "\u00e9" * 64])
def test_names_near_the_reserved_ones_are_kept(name):
    assert valid_character_name(name) and check_character_name(name) == name
