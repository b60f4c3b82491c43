"""A minimal safetensors codec (stdlib + torch), for the OneActor character file (``character_file.py``).

Format: 8-byte little-endian header length N, N bytes of UTF-8 JSON header (padded with spaces to a multiple of 8)
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then the data buffer,
tensors ordered by element size then name. The runtime may lack the ``safetensors`` package, so this is our own; the
tests check it against that package both ways. The reader enforces what the package does (contiguous tensors
covering the buffer exactly, header at most 100 MB) and refuses anything else with ``SafetensorsFormatError``
naming the file. Byte order: little-endian hosts (every platform the WebUI runs on).
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Mapping

import torch

MAX_HEADER_BYTES = 100_000_000  # the safetensors package's own limit
DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
          "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
          "F64": torch.float64}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class SafetensorsFormatError(ValueError):
    """A file that is not a valid safetensors file; ``path`` and ``message`` say which and why."""

    def __init__(self, path: str | os.PathLike, message: str):
        self.path, self.message = Path(path), message
        super().__init__(f"'{self.path}': {message}")


# --- safetensors codec -----------------------------------------------------------------------------------------
def encode_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """The bytes of a safetensors file holding ``tensors`` (dtypes of ``DTYPES``) and ``metadata`` (str -> str)."""
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("safetensors metadata must map text to text")
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    chunks, offset = [], 0
    for name in sorted(tensors, key=lambda n: (-tensors[n].element_size(), n)):  # aligned: widest elements first
        tensor = tensors[name].detach().to("cpu").contiguous()
        if name == "__metadata__" or tensor.dtype not in DTYPE_NAMES:
            raise ValueError(f"safetensors: cannot store tensor {name!r} of dtype {tensor.dtype}")
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(name: str, entry: Any, size: int) -> tuple[torch.dtype, list[int], int, int]:
    """(dtype, shape, begin, end) of one header entry; ValueError naming the tensor when it is malformed."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"tensor '{name}': entry must hold exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"tensor '{name}': unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(is_int(n) and n >= 0 for n in shape):
        raise ValueError(f"tensor '{name}': invalid shape {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_int(n) for n in offsets):
        raise ValueError(f"tensor '{name}': invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= size:
        raise ValueError(f"tensor '{name}': data_offsets {offsets} out of bounds (data buffer {size} bytes)")
    needed = math.prod(shape) * torch.empty((), dtype=DTYPES[dtype]).element_size()
    if end - begin != needed:
        raise ValueError(f"tensor '{name}': shape {shape} of {dtype} needs {needed} bytes, data_offsets span "
                         f"{end - begin}")
    return DTYPES[dtype], shape, begin, end


def decode_safetensors(blob: bytes, path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of safetensors bytes read from ``path``; ``SafetensorsFormatError`` if malformed."""
    if len(blob) < 8:
        raise SafetensorsFormatError(path, f"file too short ({len(blob)} bytes) to be a safetensors file")
    (length,) = struct.unpack_from("<Q", blob)
    if length > MAX_HEADER_BYTES:
        raise SafetensorsFormatError(path, f"header length {length} is absurd (limit {MAX_HEADER_BYTES}); not a "
                                       "safetensors file")
    if 8 + length > len(blob):
        raise SafetensorsFormatError(path, f"header length {length} exceeds the file ({len(blob)} bytes): truncated?")
    try:
        header = json.loads(blob[8:8 + length].decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise SafetensorsFormatError(path, f"header is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsFormatError(path, "__metadata__ must map text to text")
    data = memoryview(blob)[8 + length:]
    try:
        entries = {name: _entry(name, entry, len(data)) for name, entry in header.items()}
    except ValueError as exc:
        raise SafetensorsFormatError(path, str(exc)) from None
    position = 0
    for begin, end, name in sorted((e[2], e[3], n) for n, e in entries.items()):
        if begin != position:
            problem = "overlaps the previous tensor" if begin < position else f"follows {begin - position} unused bytes"
            raise SafetensorsFormatError(path, f"tensor '{name}' {problem}")
        position = end
    if position != len(data):
        raise SafetensorsFormatError(path, f"{len(data) - position} trailing bytes after the last tensor")
    tensors = {name: torch.frombuffer(bytearray(data[begin:end]), dtype=dtype).reshape(shape) if end > begin
               else torch.empty(shape, dtype=dtype) for name, (dtype, shape, begin, end) in entries.items()}
    return tensors, dict(metadata)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the file at ``path``; ``SafetensorsFormatError`` if unreadable or malformed."""
    try:
        blob = Path(path).read_bytes()
    except OSError as exc:
        raise SafetensorsFormatError(path, f"cannot read: {exc.strerror or exc}") from exc
    return decode_safetensors(blob, path)


