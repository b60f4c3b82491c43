"""OneActor character file: one character's tuned offsets in a small ``.safetensors`` file (host-free).

Method: OneActor (Wang et al., NeurIPS 2024); methods.md §6.5 ("Create character" step 5) and §6.4. The released
projector ignores the prompt (methods.md §6.1, §6.7 item 1), so Δ_tar and Δ_avg (paper Eqs. 16-17) are fixed per
character: after tuning only they are kept, with what is needed to use them and to redo the tuning.

Layout (our choice): tensors ``delta_tar`` and ``delta_avg`` (F32, (width,)) and the optional ``preview_png``
(U8, 1-D: the PNG bytes of the target image); text in ``__metadata__``: ``format`` = ``consistent-story-oneactor``
and ``oneactor.<field>`` for format_version, base_word, arch, width, checkpoint_hash, checkpoint_name, prompt,
negative_prompt, seed and settings (JSON). The name is the file stem (not stored). Unknown extra tensors and keys are
ignored; another format or version is refused.

The codec is our own (``safetensors_codec.py``); its format errors surface here as ``CharacterFileError``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from ..common.atomic_file import write_atomically
from . import safetensors_codec as codec
from .safetensors_codec import DTYPE_NAMES, DTYPES, MAX_HEADER_BYTES, is_int  # noqa: F401  (part re-exported)

FORMAT = "consistent-story-oneactor"
FORMAT_VERSION = 1
ARCH_WIDTHS = {"sd15": 768, "sdxl": 2048}
ARCH_LABELS = {"sd15": "SD1.5", "sdxl": "SDXL"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PREFIX = "oneactor."
_TEXT_FIELDS = ("base_word", "arch", "checkpoint_hash", "checkpoint_name", "prompt", "negative_prompt")


class CharacterFileError(ValueError):
    """A character file cannot be read, is not valid, or cannot be written; the message names the file."""

    def __init__(self, path: str | os.PathLike, message: str):
        self.path, self.message = Path(path), message
        super().__init__(self._text())

    def _text(self) -> str:
        return f"OneActor character file '{self.path}': {self.message}"


class CharacterMismatchError(CharacterFileError):
    """The character was made for another architecture (text-encoder width) than the loaded checkpoint."""

    def _text(self) -> str:
        return self.message  # names the character and the file itself


class CharacterNameError(ValueError):
    """Not a valid character name (the file stem); the message names it and says why."""


# --- the file format (safetensors_codec), its errors as CharacterFileError ---------------------------------------
def encode_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    return codec.encode_safetensors(tensors, metadata)


def decode_safetensors(blob: bytes, path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of safetensors bytes read from ``path``; ``CharacterFileError`` naming it if malformed."""
    try:
        return codec.decode_safetensors(blob, path)
    except codec.SafetensorsFormatError as error:
        raise CharacterFileError(path, error.message) from None


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the file at ``path``; ``CharacterFileError`` if unreadable or malformed."""
    try:
        return codec.read_safetensors(path)
    except codec.SafetensorsFormatError as error:
        raise CharacterFileError(path, error.message) from None


# --- the character ---------------------------------------------------------------------------------------------
# Device names Windows reserves in every folder, whatever the extension ("CON.safetensors" cannot be created), the
# superscript-digit forms included; compared case-insensitively with the part before the first '.'.
WINDOWS_RESERVED = frozenset({"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
                             | {f"{port}{digit}" for port in ("COM", "LPT") for digit in "0123456789¹²³"})
SUFFIXES = (".safetensors", ".preview.png")  # the files a character name becomes (file, card preview)
MAX_FILE_NAME_BYTES = 255  # ext4, APFS and NTFS (UTF-16 units there; fewer than UTF-8 bytes for any name)


def character_name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a character name portable across Windows, macOS and Linux, or None when it can.

    Letters, digits, space and ``_-.``; 1-64 characters; no leading '.', no leading/trailing space or trailing '.'
    (Windows drops those, so the file would load under another name); not a Windows device name, with or without an
    extension; in Unicode NFC form (macOS file systems normalise names, so another form would be a second name on
    Linux for what macOS shows as one); short enough in UTF-8 for the longest file it becomes."""
    if not isinstance(name, str):
        return f"must be text, got {type(name).__name__}"
    if not 1 <= len(name) <= 64:
        return f"must be 1-64 characters long, got {len(name)}"
    bad = sorted({c for c in name if not (c.isalnum() or c in " _-.")})
    if bad:
        return f"may hold only letters, digits, spaces and _-. (not {', '.join(repr(c) for c in bad)})"
    if name.startswith((".", " ")) or name.endswith((".", " ")):
        return "may not start with '.' or a space, nor end with '.' or a space"
    stem = name.split(".")[0].rstrip(" ").upper()
    if stem in WINDOWS_RESERVED:
        return f"'{name.split('.')[0]}' is a device name Windows reserves (with any extension); choose another name"
    if unicodedata.normalize("NFC", name) != name:
        return f"must be in Unicode NFC form: {unicodedata.normalize('NFC', name)!r} is the same name on macOS"
    longest = max(len(suffix) for suffix in SUFFIXES)
    if len(name.encode("utf-8")) + longest > MAX_FILE_NAME_BYTES:
        return f"is {len(name.encode('utf-8'))} bytes in UTF-8; at most {MAX_FILE_NAME_BYTES - longest} fit a file name"
    return None


def valid_character_name(name: str) -> bool:
    return character_name_problem(name) is None


def check_character_name(name: str) -> str:
    """``name`` if ``valid_character_name``, else ``CharacterNameError`` naming it and the reason."""
    problem = character_name_problem(name)
    if problem is not None:
        raise CharacterNameError(f"invalid OneActor character name {name!r}: {problem}")
    return name


def _json_safe(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _delta(name: str, value: Any, width: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise ValueError(f"field '{name}': must be a float tensor, got {getattr(value, 'dtype', type(value))}")
    if tuple(value.shape) != (width,):
        raise ValueError(f"field '{name}': shape {tuple(value.shape)} does not match width {width}")
    value = value.detach().to("cpu", torch.float32).clone()  # a private copy: nobody can change it later
    if not torch.isfinite(value).all():
        raise ValueError(f"field '{name}': contains NaN or inf")
    return value


@dataclass(frozen=True, eq=False)
class Character:
    """One OneActor character (methods.md §6.5): offsets (width,) float32, tuned on ``arch``/``checkpoint_*`` from
    ``prompt``/``seed`` with ``settings``. Validated on construction (``ValueError`` naming the field); the deltas
    are stored as private float32 CPU copies. ``eq=False``: tensors have no boolean equality."""

    name: str
    delta_tar: torch.Tensor
    delta_avg: torch.Tensor
    base_word: str
    arch: str
    width: int
    checkpoint_hash: str
    checkpoint_name: str
    prompt: str
    negative_prompt: str
    seed: int
    settings: dict = field(default_factory=dict)
    preview_png: bytes | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        for name in ("name",) + _TEXT_FIELDS:
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"field '{name}': must be text, got {type(getattr(self, name)).__name__}")
        if self.arch not in ARCH_WIDTHS:
            raise ValueError(f"field 'arch': {self.arch!r} is not one of {', '.join(ARCH_WIDTHS)}")
        if not is_int(self.width) or self.width != ARCH_WIDTHS[self.arch]:
            raise ValueError(f"field 'width': {self.width!r} does not match arch '{self.arch}' "
                             f"(width {ARCH_WIDTHS[self.arch]})")
        for name in ("delta_tar", "delta_avg"):
            object.__setattr__(self, name, _delta(name, getattr(self, name), self.width))
        if not self.base_word.strip():
            raise ValueError("field 'base_word': must not be empty")
        if not is_int(self.seed):
            raise ValueError(f"field 'seed': must be an integer, got {self.seed!r}")
        if not (isinstance(self.settings, dict) and all(isinstance(k, str) for k in self.settings)
                and _json_safe(self.settings)):
            raise ValueError("field 'settings': must be a JSON object with text keys and finite numbers")
        if isinstance(self.preview_png, (bytearray, memoryview)):
            object.__setattr__(self, "preview_png", bytes(self.preview_png))
        if self.preview_png is not None and not (isinstance(self.preview_png, bytes)
                                                 and self.preview_png.startswith(PNG_SIGNATURE)):
            raise ValueError("field 'preview_png': not a PNG image")
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"field 'format_version': version {self.format_version!r} is not supported (this "
                             f"build reads {FORMAT_VERSION})")


def _encode_character(character: Character) -> bytes:
    _delta("delta_tar", character.delta_tar, character.width)  # tensors are mutable: check again on save
    _delta("delta_avg", character.delta_avg, character.width)
    tensors = {"delta_tar": character.delta_tar, "delta_avg": character.delta_avg}
    if character.preview_png is not None:
        tensors["preview_png"] = torch.frombuffer(bytearray(character.preview_png), dtype=torch.uint8)
    metadata = {"format": FORMAT, _PREFIX + "format_version": str(character.format_version),
                _PREFIX + "width": str(character.width), _PREFIX + "seed": str(character.seed),
                _PREFIX + "settings": json.dumps(character.settings, sort_keys=True, allow_nan=False)}
    metadata.update({_PREFIX + name: getattr(character, name) for name in _TEXT_FIELDS})
    return encode_safetensors(tensors, metadata)


def save_character(path: str | os.PathLike, character: Character) -> None:
    """Write ``character`` to ``path`` (``NAME.safetensors``; NAME is the name it loads under) atomically: a temp
    file in the same folder, fsync, ``os.replace``; on any failure the temp file is removed and ``path`` is left as
    it was. ``CharacterNameError`` for an invalid NAME, ``CharacterFileError`` for invalid data or an OS error."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CharacterFileError(path, "a character file name must end in .safetensors")
    check_character_name(path.stem)
    try:
        blob = _encode_character(character)
    except ValueError as exc:
        raise CharacterFileError(path, f"not saved: {exc}") from None
    try:
        write_atomically(path, blob)
    except OSError as exc:  # e.g. a missing or read-only folder
        raise CharacterFileError(path, f"cannot write: {exc}") from exc


def _text(metadata: Mapping[str, str], name: str) -> str:
    if _PREFIX + name not in metadata:
        raise ValueError(f"missing field '{_PREFIX}{name}'")
    return metadata[_PREFIX + name]


def _integer(metadata: Mapping[str, str], name: str) -> int:
    text = _text(metadata, name)
    if not re.fullmatch(r"-?[0-9]{1,20}", text):
        raise ValueError(f"field '{_PREFIX}{name}': not an integer ({text!r})")
    return int(text)


def _tensor(tensors: Mapping[str, torch.Tensor], name: str, dtype: torch.dtype) -> torch.Tensor:
    if name not in tensors:
        raise ValueError(f"missing tensor '{name}'")
    if tensors[name].dtype != dtype or tensors[name].dim() != 1:
        raise ValueError(f"field '{name}': stored as {DTYPE_NAMES[tensors[name].dtype]} "
                         f"{list(tensors[name].shape)}, expected 1-D {DTYPE_NAMES[dtype]}")
    return tensors[name]


def _describe(arch: str | None, width: int | None) -> str:
    label = ARCH_LABELS.get(arch, arch) if arch else "an unknown architecture"
    return f"{label} (width {width})" if width is not None else label


def load_character(path: str | os.PathLike, *, arch: str | None = None, width: int | None = None) -> Character:
    """The character in ``path`` (named after the file stem), every field validated (``CharacterFileError`` naming
    the file and the field). With ``arch``/``width`` (the loaded checkpoint's), a character made for another one is
    refused with ``CharacterMismatchError``."""
    path = Path(path)
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != FORMAT:
        raise CharacterFileError(path, f"not a OneActor character file (metadata 'format' is "
                                       f"{metadata.get('format')!r}, expected {FORMAT!r})")
    try:
        version = _integer(metadata, "format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"format version {version} is not supported (this build reads {FORMAT_VERSION})")
        settings = _text(metadata, "settings")
        try:
            settings = json.loads(settings)
        except (ValueError, RecursionError):
            raise ValueError(f"field '{_PREFIX}settings': not valid JSON ({settings[:40]!r})") from None
        preview = tensors.get("preview_png")
        character = Character(
            name=path.stem, delta_tar=_tensor(tensors, "delta_tar", torch.float32),
            delta_avg=_tensor(tensors, "delta_avg", torch.float32), width=_integer(metadata, "width"),
            seed=_integer(metadata, "seed"), settings=settings, format_version=version,
            preview_png=None if preview is None else _tensor(tensors, "preview_png", torch.uint8).numpy().tobytes(),
            **{name: _text(metadata, name) for name in _TEXT_FIELDS})
    except ValueError as exc:
        raise CharacterFileError(path, str(exc)) from None
    if (arch is not None and arch != character.arch) or (width is not None and width != character.width):
        arch = arch or next((a for a, w in ARCH_WIDTHS.items() if w == width), None)
        width = width if width is not None else ARCH_WIDTHS.get(arch)
        raise CharacterMismatchError(path, f"character '{character.name}' (file {path}) was made for "
                                           f"{_describe(character.arch, character.width)}; the loaded checkpoint "
                                           f"is {_describe(arch, width)}")
    return character


def checkpoint_warning(character: Character, checkpoint_hash: str | None) -> str | None:
    """A short warning when the character was tuned on another checkpoint (of the architecture ``load_character``
    checked); None when the hashes agree or either is unknown (empty). Hashes are compared case-insensitively, the
    shorter as a prefix of the longer (the WebUI's 10-character short hash against a full sha256)."""
    mine, theirs = character.checkpoint_hash.strip().lower(), (checkpoint_hash or "").strip().lower()
    if not mine or not theirs or mine.startswith(theirs) or theirs.startswith(mine):
        return None
    made_on = f"'{character.checkpoint_name}' [{mine[:10]}]" if character.checkpoint_name else f"[{mine[:10]}]"
    return (f"OneActor character '{character.name}' was tuned on checkpoint {made_on}, not on the loaded one "
            f"[{theirs[:10]}]: it works, but the likeness may be weaker.")


def file_hash(path: str | os.PathLike) -> str:
    """The first 10 hex digits of the sha256 of the whole file: A1111's short checkpoint hash (``shorthash``), not
    the legacy 8-digit "model hash" of a 64 KiB slice."""
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:10]


def list_characters(folder: str | os.PathLike) -> list[tuple[str, Path]]:
    """(name, path) of the ``*.safetensors`` files directly in ``folder`` (not its subfolders), sorted by name
    (case-insensitive); files whose stem is not a valid name (temp files start with '.') are skipped, and a missing
    folder has none. The files are not opened: ``load_character`` validates them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(p.stem, p) for p in folder.glob("*.safetensors") if p.is_file() and valid_character_name(p.stem)]
    return sorted(found, key=lambda item: (item[0].casefold(), item[0]))
