"""OneActor character files (methods.md §6.5): our safetensors codec against the real ``safetensors`` package both
ways, a bit-exact round trip of every field, every class of corruption refused with ``CharacterFileError`` naming
the file, the architecture mismatch refusal, the other-checkpoint warning, the atomic save, and name validation."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import random
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lib_consistency.oneactor import character_file as cf
from lib_consistency.oneactor.character_file import (Character, CharacterFileError, CharacterMismatchError,
                                                     checkpoint_warning, file_hash, list_characters, load_character,
                                                     save_character)

WIDTHS = {"sd15": 768, "sdxl": 2048}


def png_bytes(seed: int = 0) -> bytes:
    image = pytest.importorskip("PIL.Image")
    pixels = random.Random(seed).randbytes(16 * 16 * 3)
    buffer = io.BytesIO()
    image.frombytes("RGB", (16, 16), pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_character(arch: str = "sdxl", seed: int = 0, **overrides) -> Character:
    g = torch.Generator().manual_seed(seed)
    width = WIDTHS[arch]
    fields = dict(name="Hobbit", delta_tar=torch.randn(width, generator=g), delta_avg=torch.randn(width, generator=g),
                  base_word="hobbit", arch=arch, width=width, checkpoint_hash="0123456789",
                  checkpoint_name="sd_xl_base_1.0", prompt="A hobbit wearing robes, «ünïcode»",
                  negative_prompt="blurry", seed=6543,
                  settings={"steps": 200, "lr": 1e-4, "lambda": [0.5, 0.2], "nested": {"flip": True}},
                  preview_png=png_bytes(seed))
    fields.update(overrides)
    return Character(**fields)


def metadata_of(character: Character) -> dict[str, str]:
    """The documented layout, written out independently of the module."""
    m = {"format": "consistent-story-oneactor", "oneactor.format_version": "1", "oneactor.width": str(character.width),
         "oneactor.seed": str(character.seed), "oneactor.settings": json.dumps(character.settings)}
    for name in ("base_word", "arch", "checkpoint_hash", "checkpoint_name", "prompt", "negative_prompt"):
        m["oneactor." + name] = getattr(character, name)
    return m


def tensors_of(character: Character) -> dict[str, torch.Tensor]:
    tensors = {"delta_tar": character.delta_tar, "delta_avg": character.delta_avg}
    if character.preview_png is not None:
        tensors["preview_png"] = torch.tensor(list(character.preview_png), dtype=torch.uint8)
    return tensors


def assert_same_character(a: Character, b: Character) -> None:
    for name in ("delta_tar", "delta_avg"):
        assert getattr(b, name).dtype == torch.float32
        assert torch.equal(getattr(a, name).view(torch.int32), getattr(b, name).view(torch.int32))
    for name in ("base_word", "arch", "width", "checkpoint_hash", "checkpoint_name", "prompt", "negative_prompt",
                 "seed", "settings", "preview_png", "format_version"):
        assert getattr(a, name) == getattr(b, name), name


def split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def join(header: dict | bytes, data: bytes) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


# --- round trip and interop ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("preview", [True, False])
def test_round_trip_keeps_every_field_bit_for_bit(tmp_path, arch, preview):
    character = make_character(arch, seed=1, **({} if preview else {"preview_png": None}))
    path = tmp_path / "Frodo B.safetensors"
    save_character(path, character)
    loaded = load_character(path, arch=arch, width=WIDTHS[arch])
    assert loaded.name == "Frodo B"
    assert_same_character(character, loaded)
    assert (loaded.preview_png is None) is (not preview)


def test_our_file_reads_with_the_safetensors_package(tmp_path):
    character = make_character()
    path = tmp_path / "c.safetensors"
    save_character(path, character)
    tensors = load_file(path)
    assert set(tensors) == {"delta_tar", "delta_avg", "preview_png"}
    assert torch.equal(tensors["delta_tar"], character.delta_tar) and tensors["delta_avg"].dtype == torch.float32
    assert bytes(tensors["preview_png"].tolist()) == character.preview_png
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    expected = metadata_of(character)
    assert json.loads(metadata.pop("oneactor.settings")) == json.loads(expected.pop("oneactor.settings"))
    assert metadata == expected


def test_package_written_character_loads(tmp_path):
    character = make_character("sd15", seed=2)
    path = tmp_path / "pkg.safetensors"
    save_file(tensors_of(character), path, metadata=metadata_of(character))
    assert_same_character(character, load_character(path))


DTYPE_SAMPLES = {
    "f32": torch.randn(3, 5, generator=torch.Generator().manual_seed(3)),
    "f16": torch.randn(7, generator=torch.Generator().manual_seed(4)).half(),
    "bf16": torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(5)).bfloat16(),
    "u8": torch.arange(0, 250, 3, dtype=torch.uint8),
    "f64": torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(6)),
    "i64": torch.tensor([-(2 ** 62), 0, 5]), "i32": torch.tensor([[1, -2]], dtype=torch.int32),
    "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 4),
}


def test_codec_interop_both_ways(tmp_path):
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    ours.write_bytes(cf.encode_safetensors(DTYPE_SAMPLES, {"k": "v", "ü": "ß"}))
    save_file(DTYPE_SAMPLES, theirs, metadata={"k": "v", "ü": "ß"})
    for tensors in (load_file(ours), cf.read_safetensors(theirs)[0], cf.read_safetensors(ours)[0]):
        assert set(tensors) == set(DTYPE_SAMPLES)
        for name, expected in DTYPE_SAMPLES.items():
            assert tensors[name].dtype == expected.dtype and torch.equal(tensors[name], expected), name
    assert cf.read_safetensors(theirs)[1] == cf.read_safetensors(ours)[1] == {"k": "v", "ü": "ß"}
    assert len(split(ours.read_bytes())[0]) == len(DTYPE_SAMPLES) + 1


def test_unknown_extra_tensors_and_keys_are_ignored(tmp_path):
    character = make_character(seed=7)
    path = tmp_path / "extra.safetensors"
    save_file({**tensors_of(character), "future": torch.ones(3)}, path,
              metadata={**metadata_of(character), "oneactor.future": "x", "modelspec.title": "t"})
    assert_same_character(character, load_character(path))


# --- corruption ------------------------------------------------------------------------------------------------
@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "Sam.safetensors"
    save_character(path, make_character(seed=8))
    return path


def refused(path, pattern: str = "") -> CharacterFileError:
    with pytest.raises(CharacterFileError) as info:
        load_character(path)
    assert path.name in str(info.value) and not isinstance(info.value, CharacterMismatchError)
    assert pattern.lower() in str(info.value).lower(), str(info.value)
    return info.value


@pytest.mark.parametrize("keep", [0, 3, 8, 20, "header/2", "header", "header+1", -1, -100])
def test_truncated_file_is_refused(good_file, keep):
    blob = good_file.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    cut = {"header/2": 8 + n // 2, "header": 8 + n, "header+1": 9 + n}.get(keep, keep)
    good_file.write_bytes(blob[:cut])
    refused(good_file)


@pytest.mark.parametrize("length, pattern", [(2 ** 63, "absurd"), (100_000_001, "absurd"), (10 ** 6, "exceeds"),
                                             ("-8", "json"), ("+8", "json")])
def test_wrong_header_length_is_refused(good_file, length, pattern):
    blob = good_file.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    length = n + int(length) if isinstance(length, str) else length
    good_file.write_bytes(struct.pack("<Q", length) + blob[8:])
    refused(good_file, pattern)


@pytest.mark.parametrize("header, pattern", [(b'{"a": [', "json"), (b"\xff\xfe{}", "utf-8"), (b"[1, 2]", "object"),
                                             (b'"text"', "object"), (b"{" * 100000, "json")])
def test_garbage_header_is_refused(good_file, header, pattern):
    good_file.write_bytes(join(header, split(good_file.read_bytes())[1]))
    refused(good_file, pattern)


def second(header: dict) -> dict:
    """The entry of the second tensor in the data buffer."""
    entries = sorted((e for k, e in header.items() if k != "__metadata__"), key=lambda e: e["data_offsets"])
    return entries[1]


@pytest.mark.parametrize("edit, pattern", [
    (lambda h, n: h["delta_tar"].update(data_offsets=[0, n + 4]), "out of bounds"),
    (lambda h, n: h["delta_tar"].update(data_offsets=[-4, 8188]), "out of bounds"),
    (lambda h, n: second(h).update(data_offsets=[o - 4 for o in second(h)["data_offsets"]]), "overlaps"),
    (lambda h, n: h["delta_tar"].update(dtype="F33"), "unknown dtype"),
    (lambda h, n: h["delta_tar"].update(dtype=["F32"]), "unknown dtype"),
    (lambda h, n: h["delta_tar"].update(dtype="F16"), "needs"),
    (lambda h, n: h["delta_tar"].update(shape=[2049]), "needs"),
    (lambda h, n: h["delta_tar"].update(shape=[-1]), "shape"),
    (lambda h, n: h["delta_tar"].update(data_offsets=[0]), "data_offsets"),
    (lambda h, n: h["delta_tar"].pop("shape"), "entry"),
    (lambda h, n: h.update(extra=7), "entry"),
    (lambda h, n: h["__metadata__"].update({"oneactor.seed": 5}), "__metadata__"),
    (lambda h, n: h.update(__metadata__=["x"]), "__metadata__"),
])
def test_malformed_header_entries_are_refused(good_file, edit, pattern):
    header, data = split(good_file.read_bytes())
    edit(header, len(data))
    good_file.write_bytes(join(header, data))
    refused(good_file, pattern)


def test_gaps_and_trailing_garbage_are_refused(good_file):
    header, data = split(good_file.read_bytes())
    good_file.write_bytes(join(header, data + b"junk"))
    refused(good_file, "4 trailing bytes")
    for entry in header.values():
        if "data_offsets" in entry:
            entry["data_offsets"] = [o + 4 for o in entry["data_offsets"]]
    good_file.write_bytes(join(header, b"\0" * 4 + data))
    refused(good_file, "4 unused bytes")


def test_random_corruption_raises_only_character_file_error(good_file):
    """Flipped bytes anywhere in the header either still load or raise CharacterFileError, nothing else."""
    blob = good_file.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    rng = random.Random(9)
    outcomes = set()
    for _ in range(300):
        corrupt = bytearray(blob)
        for _ in range(rng.randint(1, 3)):
            corrupt[rng.randrange(8 + n)] = rng.randrange(256)
        good_file.write_bytes(bytes(corrupt))
        try:
            load_character(good_file)
            outcomes.add("loaded")
        except CharacterFileError as exc:
            assert good_file.name in str(exc)
            outcomes.add("refused")
    assert "refused" in outcomes


def write_character_file(path, character: Character, drop: str = "", **changes) -> None:
    """Through the safetensors package: the layout with one tensor or key dropped or changed."""
    tensors, metadata = tensors_of(character), metadata_of(character)
    tensors.pop(drop, None)
    metadata.pop(drop, None)
    for key, value in changes.items():
        (tensors if isinstance(value, torch.Tensor) else metadata)[key.replace("__", ".")] = value
    save_file(tensors, path, metadata=metadata)


FIELDS = ["format", "oneactor.format_version", "oneactor.width", "oneactor.seed", "oneactor.settings",
          "oneactor.base_word", "oneactor.arch", "oneactor.checkpoint_hash", "oneactor.checkpoint_name",
          "oneactor.prompt", "oneactor.negative_prompt", "delta_tar", "delta_avg"]


@pytest.mark.parametrize("drop", FIELDS)
def test_missing_field_is_refused_by_name(tmp_path, drop):
    path = tmp_path / "missing.safetensors"
    write_character_file(path, make_character(seed=10), drop=drop)
    refused(path, "format" if drop == "format" else drop)


NAN = torch.full((2048,), 0.5)
NAN[7] = float("nan")
INF = torch.full((2048,), 0.5)
INF[0] = -float("inf")


@pytest.mark.parametrize("changes, pattern", [
    (dict(delta_tar=NAN), "'delta_tar': contains NaN"), (dict(delta_avg=INF), "'delta_avg': contains NaN or inf"),
    (dict(delta_tar=torch.zeros(768)), "'delta_tar': shape"), (dict(delta_avg=torch.zeros(2048).half()), "F16"),
    (dict(delta_tar=torch.zeros(1, 2048)), "1-D"), (dict(preview_png=torch.zeros(3, 3, dtype=torch.uint8)), "1-D"),
    (dict(preview_png=torch.zeros(16, dtype=torch.uint8)), "not a PNG"),
    (dict(oneactor__seed="abc"), "'oneactor.seed': not an integer"), (dict(oneactor__width="wide"), "oneactor.width"),
    (dict(oneactor__width="768"), "'width'"), (dict(oneactor__arch="sd3"), "'arch'"),
    (dict(oneactor__settings="{nope"), "settings"), (dict(oneactor__settings="[1]"), "settings"),
    (dict(oneactor__settings="{\"a\": NaN}"), "settings"), (dict(oneactor__base_word=" "), "base_word"),
    (dict(format="kohya-lora"), "not a oneactor character file"),
    (dict(oneactor__format_version="2"), "version 2 is not supported"),
])
def test_invalid_field_is_refused_by_name(tmp_path, changes, pattern):
    path = tmp_path / "bad field.safetensors"
    write_character_file(path, make_character(seed=11), **changes)
    refused(path, pattern)


def test_unreadable_path_is_a_character_file_error(tmp_path):
    refused(tmp_path / "absent.safetensors", "cannot read")


# --- architecture and checkpoint -------------------------------------------------------------------------------
def test_architecture_mismatch_is_refused_with_both_sides(tmp_path):
    path = tmp_path / "Pippin.safetensors"
    save_character(path, make_character("sdxl"))
    for kwargs in (dict(arch="sd15", width=768), dict(width=768), dict(arch="sd15")):
        with pytest.raises(CharacterMismatchError) as info:
            load_character(path, **kwargs)
        message = str(info.value)
        assert message.startswith("character 'Pippin' (file ") and str(path) in message
        assert "was made for SDXL (width 2048); the loaded checkpoint is SD1.5 (width 768)" in message
        assert isinstance(info.value, CharacterFileError)
    with pytest.raises(CharacterMismatchError, match=r"unknown architecture \(width 1024\)"):
        load_character(path, width=1024)
    assert load_character(path, arch="sdxl", width=2048).arch == "sdxl"
    assert load_character(path).width == 2048


def test_checkpoint_warning_only_for_another_checkpoint(tmp_path):
    character = make_character(checkpoint_hash="31e35c80fc", checkpoint_name="sd_xl_base_1.0")
    full = "31E35C80FC4829D14F90153F4C74CD59C90B779F6AFE05A74CD6FFB2D2E7A0C5"
    assert checkpoint_warning(character, "31e35c80fc") is None
    assert checkpoint_warning(character, full) is None
    assert checkpoint_warning(character, "") is None and checkpoint_warning(character, None) is None
    assert checkpoint_warning(make_character(checkpoint_hash=""), "abcdef0123") is None
    warning = checkpoint_warning(character, "abcdef0123")
    assert "Hobbit" in warning and "sd_xl_base_1.0" in warning and "31e35c80fc" in warning and "abcdef0123" in warning


def test_file_hash_is_the_short_sha256_of_the_whole_file(tmp_path):
    path = tmp_path / "model.bin"
    data = random.Random(12).randbytes(3 * 2 ** 20 + 17)  # several read blocks
    path.write_bytes(data)
    assert file_hash(path) == hashlib.sha256(data).hexdigest()[:10]
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert file_hash(path) != hashlib.sha256(data).hexdigest()[:10]


# --- saving ----------------------------------------------------------------------------------------------------
def folder_listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_save_refuses_non_finite_delta_changed_after_construction(tmp_path):
    character = make_character()
    character.delta_tar[3] = float("nan")  # a tensor field is mutable in place
    with pytest.raises(CharacterFileError, match="delta_tar") as info:
        save_character(tmp_path / "nan.safetensors", character)
    assert "nan.safetensors" in str(info.value) and folder_listing(tmp_path) == []
    with pytest.raises(ValueError, match="'delta_avg': contains NaN"):
        make_character(delta_avg=torch.full((2048,), float("inf")))


class FailingWriter:
    """Wraps the temp file: writes half of what it is given, then fails like a full disk (or ``error``)."""

    def __init__(self, handle, error: BaseException):
        self.handle, self.error = handle, error

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()

    def write(self, data: bytes) -> int:
        self.handle.write(data[:len(data) // 2])
        self.handle.flush()
        raise self.error


@pytest.mark.parametrize("failure", ["write", "interrupt", "fsync", "replace"])
def test_failed_save_leaves_no_partial_file_and_keeps_the_old_one(tmp_path, monkeypatch, failure):
    path = tmp_path / "Merry.safetensors"
    save_character(path, make_character(seed=13))
    old = path.read_bytes()
    real_fdopen = os.fdopen
    if failure in ("write", "interrupt"):
        error = OSError(28, "No space left on device") if failure == "write" else KeyboardInterrupt()
        monkeypatch.setattr(os, "fdopen", lambda fd, mode: FailingWriter(real_fdopen(fd, mode), error))
    else:
        def fail(*args):
            raise OSError(5, "I/O error")
        monkeypatch.setattr(os, failure, fail)
    with pytest.raises(KeyboardInterrupt if failure == "interrupt" else CharacterFileError):
        save_character(path, make_character(seed=14))
    assert folder_listing(tmp_path) == ["Merry.safetensors"] and path.read_bytes() == old
    monkeypatch.undo()
    assert_same_character(make_character(seed=13), load_character(path))


def test_save_into_a_missing_folder_is_a_character_file_error(tmp_path):
    with pytest.raises(CharacterFileError, match="cannot write") as info:
        save_character(tmp_path / "absent" / "Bilbo.safetensors", make_character())
    assert "Bilbo.safetensors" in str(info.value) and folder_listing(tmp_path) == []


def test_character_validates_on_construction():
    good = make_character()
    for changes, field in ((dict(width=768), "width"), (dict(arch="sd3"), "arch"), (dict(seed=1.5), "seed"),
                           (dict(seed=True), "seed"), (dict(settings={"s": {1, 2}}), "settings"),
                           (dict(settings={1: "a"}), "settings"), (dict(settings=[1]), "settings"),
                           (dict(preview_png=b"GIF89a"), "preview_png"), (dict(prompt=None), "prompt"),
                           (dict(base_word=""), "base_word"), (dict(delta_tar=torch.zeros(768)), "delta_tar"),
                           (dict(delta_avg=torch.zeros(2048, dtype=torch.int32)), "delta_avg"),
                           (dict(format_version=2), "format_version")):
        with pytest.raises(ValueError, match=f"field '{field}'"):
            dataclasses.replace(good, **changes)
    half = torch.randn(2048).half()
    character = make_character(delta_tar=half)
    assert character.delta_tar.dtype == torch.float32 and torch.equal(character.delta_tar, half.float())
    half.zero_()
    assert character.delta_tar.abs().sum() > 0  # a private copy


def test_list_characters(tmp_path):
    assert list_characters(tmp_path / "absent") == []
    for name in ("b.safetensors", "A.safetensors", "c d.safetensors", ".Sam.x1y2.tmp", ".hidden.safetensors",
                 "notes.txt", "bad*name.safetensors"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.safetensors").write_bytes(b"")
    (tmp_path / "dir.safetensors").mkdir()
    assert list_characters(tmp_path) == [(n, tmp_path / f"{n}.safetensors") for n in ("A", "b", "c d")]
