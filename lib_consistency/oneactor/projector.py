"""OneActor projector φ: cached UNet mid-block input h -> offset Δ on the base-word token embedding.

methods.md §6.1; paper Eq. 7 (h = E_u(z_1, c) ≈ E_u(z_0)), Eq. 8 (c_b′ = c_b + c_Δ). Like the released code, and
unlike the paper (Eqs. 9, 16–17: φ(h, c), AdaIN head), φ reads h only and ends in a LayerNorm, so Δ does not depend
on the prompt and a character file of two Δ vectors suffices (methods.md §6.5, §6.7 items 1–2).

Architecture (SDXL, as the code describes; ≈ 66 M parameters): 7×7 stride-2 conv C→640 + BN + ReLU; two basic
residual blocks at 640; two 640→320 blocks, the first stride 2 with a 1×1 shortcut; two 320→160 blocks, the first
stride 2; flatten 160·4·4; Linear → width; LayerNorm.

Our choices:
- Geometry follows ``grid``: the stem always halves the side, each of the two later stages halves it again while
  it is above 4, so every supported grid (8, 16, 32) flattens to 160·4·4. SD1.5 (h = 1280×8×8 at 512²): stem 8→4,
  later stages stride 1 (their first block keeps its 1×1 shortcut for the channel change). SDXL (32×32 at 1024²):
  32→16→8→4, exactly the code's layout. Other grids raise ``ProjectorSpecError``.
- ``stage_channels`` (default (640, 320, 160)) is a spec field so tests can build a tiny projector.
- ``fit_to_grid`` brings h from another generation size to the projector's grid: exact (same tensor) when equal,
  bilinear upsampling along an axis that is smaller, adaptive average pooling along one that is larger.
- ``build_projector`` initialises from a seed without touching the global RNG, so a character is reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FLAT_SIDE = 4  # every grid is reduced to 4×4 before the flatten
SUPPORTED_GRIDS = (8, 16, 32)


class ProjectorSpecError(ValueError):
    """A ``ProjectorSpec`` field that no projector can be built for."""


class ProjectorInputError(ValueError):
    """A feature tensor whose rank or shape does not match what the projector expects."""


@dataclass(frozen=True)
class ProjectorSpec:
    """arch: label ("sdxl", "sd15"); channels, grid: h is (channels, grid, grid); width: Δ size (token width)."""

    arch: str
    channels: int
    grid: int
    width: int
    stage_channels: tuple[int, int, int] = (640, 320, 160)

    def __post_init__(self) -> None:
        if not self.arch:
            raise ProjectorSpecError("ProjectorSpec.arch: must be a non-empty label")
        for name in ("channels", "width"):
            if getattr(self, name) < 1:
                raise ProjectorSpecError(f"ProjectorSpec.{name}: must be >= 1, got {getattr(self, name)}")
        if self.grid not in SUPPORTED_GRIDS:
            raise ProjectorSpecError(f"ProjectorSpec.grid: must be one of {SUPPORTED_GRIDS}, got {self.grid}")
        if len(self.stage_channels) != 3 or min(self.stage_channels) < 1:
            raise ProjectorSpecError(f"ProjectorSpec.stage_channels: need three positive widths, "
                                     f"got {self.stage_channels}")


# h = the cond mid-block input at the last step: 1280×32×32 for SDXL at 1024², 1280×8×8 for SD1.5 at 512².
PROJECTOR_SPECS = {"sdxl": ProjectorSpec("sdxl", 1280, 32, 2048), "sd15": ProjectorSpec("sd15", 1280, 8, 768)}


class ResidualBlock(torch.nn.Module):
    """Basic block: conv3×3(stride) + BN + ReLU, conv3×3 + BN, plus the input (1×1 conv + BN when shapes change)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(out_channels)
        self.conv2 = torch.nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(out_channels)
        self.shortcut = torch.nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = torch.nn.Sequential(torch.nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                                torch.nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, in, H, W) -> (N, out, H / stride, W / stride)."""
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Projector(torch.nn.Module):
    """φ: h (N, channels, grid, grid) -> Δ (N, width). methods.md §6.1."""

    def __init__(self, spec: ProjectorSpec) -> None:
        super().__init__()
        self.spec = spec
        wide, middle, narrow = spec.stage_channels
        side = spec.grid // 2  # after the stem
        strides = []
        for _ in range(2):
            strides.append(2 if side > FLAT_SIDE else 1)
            side //= strides[-1]
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(spec.channels, wide, 7, 2, 3, bias=False),
                                        torch.nn.BatchNorm2d(wide), torch.nn.ReLU())
        self.blocks = torch.nn.Sequential(
            ResidualBlock(wide, wide, 1), ResidualBlock(wide, wide, 1),
            ResidualBlock(wide, middle, strides[0]), ResidualBlock(middle, middle, 1),
            ResidualBlock(middle, narrow, strides[1]), ResidualBlock(narrow, narrow, 1))
        self.linear = torch.nn.Linear(narrow * FLAT_SIDE * FLAT_SIDE, spec.width)
        self.norm = torch.nn.LayerNorm(spec.width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: (N, channels, grid, grid) -> Δ: (N, width)."""
        spec = self.spec
        expected = (spec.channels, spec.grid, spec.grid)
        if h.dim() != 4 or tuple(h.shape[1:]) != expected:
            raise ProjectorInputError(f"Projector({spec.arch}) input: expected (N, {', '.join(map(str, expected))}),"
                                      f" got {tuple(h.shape)}")
        return self.norm(self.linear(self.blocks(self.stem(h)).flatten(1)))


def build_projector(spec: ProjectorSpec, seed: int) -> Projector:
    """A freshly initialised projector whose weights depend only on ``seed`` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Projector(spec)


def fit_to_grid(h: torch.Tensor, grid: int) -> torch.Tensor:
    """h: (N, C, H, W) -> (N, C, grid, grid).

    Equal size returns ``h`` itself (bit-identical). An axis smaller than ``grid`` is first upsampled bilinearly
    (align_corners=False); then an axis larger than ``grid`` is reduced by adaptive average pooling. Our choice: it
    lets h captured at another generation size (e.g. SDXL at 768×1344) reach the projector; methods.md §6.1 notes
    the released code instead requires the data generation at 1024².
    """
    if h.dim() != 4:
        raise ProjectorInputError(f"fit_to_grid input: expected (N, C, H, W), got {tuple(h.shape)}")
    if grid < 1:
        raise ProjectorInputError(f"fit_to_grid grid: must be >= 1, got {grid}")
    height, width = h.shape[-2:]
    if (height, width) == (grid, grid):
        return h
    if height < grid or width < grid:
        h = F.interpolate(h, size=(max(height, grid), max(width, grid)), mode="bilinear", align_corners=False)
    if h.shape[-2] > grid or h.shape[-1] > grid:
        h = F.adaptive_avg_pool2d(h, grid)
    return h
