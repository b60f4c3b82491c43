"""Which frames each batch of a story generation draws, host-free (issue 24: batches by network set).

Host contract (A1111 1.10, Forge and Forge Neo, ``extra_networks.parse_prompts``): the extra networks (LoRA,
hypernetworks…) of a batch's *first* prompt are activated for the whole batch; they change the model's weights, so
a frame naming other networks would be drawn with the first frame's. Networks that act per image (OneActor's
``<oneactor:…>``) do not count.

The plan (``plan_batches``):
- every frame names the same networks (a plain story, or tags only in the style): runs of ``limit`` consecutive
  frames in story order, exactly the host's own slices of ``p.all_prompts``;
- otherwise the frames are grouped by their set of networks (sets in the order of their first frame), each set cut
  into runs of at most ``limit`` frames in story order. Batches that hold a reference frame (they write the
  StoryDiffusion/StorySync bank) are drawn before every batch that reads it.

``limit`` stays an upper bound: no batch is padded and none mixes sets. The frames are drawn in ``drawing_order``;
the host adapters put the images back in story order (``story_order``). Reference frames when none are chosen
(*Reference frames* 0 = "the first batch"): the first batch of every network set, so each set's later batches read
frames drawn with their own networks (``default_references``).
"""
from __future__ import annotations

from typing import Collection, Hashable, Sequence

Batches = tuple[tuple[int, ...], ...]


def _runs(frames: Sequence[int], limit: int) -> list[tuple[int, ...]]:
    return [tuple(frames[start:start + limit]) for start in range(0, len(frames), limit)]


def network_sets(networks: Sequence[Hashable]) -> list[list[int]]:
    """Frames grouped by their networks, each group in story order, groups in the order of their first frame."""
    groups: dict[Hashable, list[int]] = {}
    for frame, key in enumerate(networks):
        groups.setdefault(key, []).append(frame)
    return list(groups.values())


def plan_batches(networks: Sequence[Hashable], limit: int, references: Collection[int] = ()) -> Batches:
    """Frames of each batch (story frame indices, ascending in a batch), batches in drawing order.

    ``networks[i]``: frame i's extra networks (any hashable, e.g. a sorted tuple of tags); ``limit``: most frames per
    batch (0 = no limit); ``references``: frames whose batches must be drawn first. Every frame is in exactly one
    batch; a batch never mixes networks; a reference frame goes into the first batches of its set (a set's
    reference frames beyond ``limit`` spill into its next batch, still drawn before every batch without one).
    """
    count = len(networks)
    if count == 0:
        return ()
    limit = min(limit or count, count)
    groups = network_sets(networks)
    if len(groups) == 1:
        return tuple(_runs(range(count), limit))  # today's plan, exactly the host's slices
    batches: list[tuple[int, ...]] = []
    for frames in groups:
        first = [f for f in frames if f in references]
        batches += [tuple(sorted(b)) for b in _runs(first + [f for f in frames if f not in references], limit)]
    batches.sort(key=lambda batch: not any(f in references for f in batch))  # stable: writers first
    return tuple(batches)


def default_references(networks: Sequence[Hashable], limit: int) -> tuple[int, ...]:
    """Reference frames when the user chose none: the first batch of every network set (of one set: the first
    batch, as before issue 24)."""
    count = len(networks)
    limit = min(limit or count, count) if count else 0
    return tuple(sorted(f for frames in network_sets(networks) for f in frames[:limit]))


def drawing_order(batches: Batches) -> tuple[int, ...]:
    """Story frame of each image in the order the host draws them (image k of the job is frame ``order[k]``)."""
    return tuple(f for batch in batches for f in batch)


def story_order(order: Sequence[int]) -> list[int]:
    """Positions of the drawn images sorted by their story frame: ``[images[k] for k in story_order(order)]`` lists
    them in story order. ``order`` may be cut short (an interrupted job draws only its first batches)."""
    return sorted(range(len(order)), key=lambda k: order[k])


def bank_role(batches: Batches, references: Collection[int], batch: int) -> str:
    """``"write"`` (a batch holding reference frames), ``"read"`` (any other) or ``"off"`` (no reference frames, or
    no batch without one: nothing would read the bank)."""
    holds = [any(f in references for f in b) for b in batches]
    if not references or all(holds):
        return "off"
    return "write" if holds[batch] else "read"


def host_slices(batches: Batches) -> bool:
    """Whether the host's own loop draws these batches: frames in story order, every batch but the last
    ``len(batches[0])`` frames (it slices ``p.all_*`` by ``iteration * batch_size``)."""
    size = max((len(b) for b in batches), default=0)
    return drawing_order(batches) == tuple(range(sum(map(len, batches)))) and all(len(b) == size
                                                                                  for b in batches[:-1])
