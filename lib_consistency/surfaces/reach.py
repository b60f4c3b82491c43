"""Which of a story's attention surfaces ran on which layers in a UNet call: the proof a host adapter needs before it
lets an image claim a method.

Every surface that carries a method into attention (an A1111 module hook, a Forge replace or output patch) calls
``Reach.hit(surface, layer)`` when it is entered with the generation's state, whatever it then decides (share, pass
through outside a window, plain rows). So within one UNet call every surface the settings ask for is entered on every
attention layer of its kind, on every host, unless its hook or patch is missing there on the model that samples (a
host change, another extension replacing the UNet patcher or one block's patch, a swallowed error). ``begin`` and
``missing`` bracket a UNet call (the host adapter's guard on the UNet module); what was not entered is named.
"""
from __future__ import annotations

from typing import Hashable, Iterable

CSA = "StoryDiffusion's consistent self-attention"
IPCA = "1Prompt1Story's identity-preserving cross-attention (IPCA)"
SHARING = "StorySync's masked sharing"
HARMONIZATION = "StorySync's feature harmonization (RFH)"
SUBJECT_MAPS = "StorySync's subject masks"


class Reach:
    """The surfaces a generation wants, each on its layers (``want``), and those entered since the last ``begin``.

    A surface wanted with no layers (a UNet whose attention layers have no ldm names) only needs one entry per call.
    """

    def __init__(self) -> None:
        self.wanted: dict[str, frozenset] = {}
        self._seen: set[tuple[str, Hashable]] = set()
        self._surfaces: set[str] = set()
        self.calls = 0  # UNet calls checked so far

    def want(self, surface: str, layers: Iterable[Hashable] = ()) -> None:
        self.wanted[surface] = self.wanted.get(surface, frozenset()) | frozenset(layers)

    def clear(self) -> None:
        self.wanted = {}
        self.begin()

    def hit(self, surface: str, layer: Hashable) -> None:
        self._seen.add((surface, layer))
        self._surfaces.add(surface)

    def begin(self) -> None:
        self._seen, self._surfaces = set(), set()

    def missing(self) -> list[str]:
        """One line per wanted surface not entered on all its layers since ``begin`` (in the order wanted)."""
        self.calls += 1
        lines = []
        for surface, layers in self.wanted.items():
            if not layers:
                if surface not in self._surfaces:
                    lines.append(surface)
                continue
            absent = sorted((layer for layer in layers if (surface, layer) not in self._seen), key=repr)
            if len(absent) == len(layers):
                lines.append(surface)
            elif absent:
                lines.append(f"{surface} on {len(absent)} of its {len(layers)} layers (first {absent[0]})")
        return lines
