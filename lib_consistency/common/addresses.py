"""Which layer and which denoiser call: the keys every method's caches and seeded randomness use.

Layers are addressed as (block, index, transformer) with block "input" | "middle" | "output" (hosts.md §3.1) on a
UNet, and as ("double" | "single", block index, 0) on a diffusion transformer (Flux's double-stream and
single-stream blocks, one joint attention each); a denoiser call by its pass, step and sigma, read from the host (hosts.md §4.4), never counted. ``stable_seed`` turns
such keys into seeds that do not depend on the process, the call order or the batch composition.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

LayerAddress = tuple[str, int, int]  # ("input" | "middle" | "output", block index, transformer index)
DIT_BLOCKS = ("double", "single")


@dataclass(frozen=True)
class DitDepth:
    """Block counts of a diffusion transformer: Flux.1 dev/schnell 19 double-stream then 38 single-stream blocks.

    The methods place themselves by relative depth (``position``), the DiT analogue of the UNet's down / middle /
    up blocks, so a shrunken or a larger transformer gets the same layout of methods."""

    double: int
    single: int

    def __post_init__(self) -> None:
        if self.double < 1 or self.single < 0:
            raise ValueError(f"DitDepth needs at least one double block, got {self.double} double, "
                             f"{self.single} single")

    def position(self, layer: LayerAddress) -> float:
        """Depth fraction of ``layer``'s block: blocks before it / all blocks, in [0, 1)."""
        kind, index = layer[0], int(layer[1])
        if kind not in DIT_BLOCKS:
            raise ValueError(f"not a transformer block address: {layer!r}")
        return (index + (self.double if kind == "single" else 0)) / (self.double + self.single)


@dataclass(frozen=True)
class StepKey:
    """Identity of one denoiser call, read from the host (hosts.md §4.4), never counted.

    ``pass_index`` 0 = first pass, 1 = hires pass; ``step_index`` = sampler step within the pass; ``sigma`` tells
    apart the several UNet evaluations of a second-order or SDE step (rounded to 6 significant digits).
    """

    pass_index: int
    step_index: int
    sigma: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigma", float(f"{float(self.sigma):.6g}"))


def layer_key(layer: LayerAddress) -> str:
    return f"{layer[0]}.{layer[1]}.{layer[2]}"


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from a process-independent hash of ``parts`` (ints, floats, strings, tuples, StepKeys)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
