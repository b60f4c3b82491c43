"""StorySync masked cross-image attention sharing, host-free.

Paper: StorySync (Gaur et al., arXiv 2508.03735) §3.2.1, Eqs. 5-8, §3.3 last paragraph (dropouts) and §3.4 Eq. 13
(reference subset); methods.md §5.1 steps 2, 5 and 6.

At a self-attention layer row i (one image, one CFG role) computes ``softmax(Q_i K_allᵀ/√d + log Γ_i) V_all`` with
Γ_i = 1 on its own block (δ_ii = 1: the image's own self-attention is kept whole) and Γ_i = the peer's token mask on
every peer block (Eq. 5). A binary Γ only removes keys, so this equals attention over the extended context
``[own tokens ; tokens of each peer where its mask is True]``: the form the project uses for consistent
self-attention (``consistent_self_attention``, hosts.md §15.5 decision 2). The rows' contexts differ in length (each
peer mask has its own size), so they are padded to one length and attended in ONE call with a key-padding mask
(``PaddedSharing``): no per-row or per-length calls, no N×N mask and no log(0).

Who shares with whom (``sharing_masks``):
- frames share when their character sets intersect (``frames_share``; ``[NC]`` frames share nothing); the peer's
  token mask is the union of its subject masks of the characters both frames contain;
- cond rows with cond rows, uncond with uncond, Role.OTHER never; uncond rows use the cond masks of their frame
  (methods.md §5.2 "Uncond rows");
- with reference frames (Eq. 13) a non-reference frame sees only the references, a reference the other references;
  each frame keeps all its own tokens (inferred, methods.md §5.1 step 6).

Our choices: the share dropout p_share (methods.md §5.1 step 5) is one Bernoulli per peer token, keep with
probability 1 − p, drawn from ``stable_seed(run_seed, step_key, grid_key, "share", viewer_frame, peer_frame)``, so
the draw belongs to the pair of frames, never to row positions or batch composition; cond and uncond rows of a frame
get the same draw. Subject masks come in already binarised and after mask dropout (``subject_masks``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Mapping, Sequence

import torch

from ..common.addresses import stable_seed
from ..common.async_index import device_index
from ..common.row_layout import Role, RowLayout
from ..story_diffusion.consistent_self_attention import SHARING_ROLES, ContextGroup, FrameGroups, frames_share
from .subject_masks import drop_mask

CharacterMasks = Mapping[int, Mapping[str, torch.Tensor]]  # frame -> {character: bool [N] subject mask}
RowPeers = Sequence[Sequence[tuple[int, torch.Tensor]]]  # per row: (peer row, bool [N] token mask) in order


PAD_MULTIPLE = 8  # padded context lengths are a multiple of this (aligned keys for the fused GPU kernels)


@dataclass(frozen=True, eq=False)
class PaddedSharing:
    """Masked sharing of one layer call as one padded gather and one attention call (paper Eqs. 5-8).

    Every row's context is [own tokens ; each peer's tokens where its mask is True], padded to one length L (a
    multiple of ``PAD_MULTIPLE``; no padding when every row's context has the same length); ``visible`` (R, L) bool is False on the padding, so a key-padding mask makes the
    one call equal the per-row attention (a padded key gets weight exactly 0). ``index`` (R·L,) int64 on the device
    reads the contexts out of the sources ``[rows (R·N, C) ; extra sources (E·N, C)]``. Built on the CPU from CPU
    masks, once per UNet call, grid and layout (``StorySyncState``), then reused by every layer at that grid: a
    layer costs one ``index_select`` and one attention call, whatever the number of frames.
    """

    rows: tuple[int, ...]
    length: int
    index: torch.Tensor
    visible: torch.Tensor | None  # None: every row fills L (no padding)

    def context(self, sources: torch.Tensor) -> torch.Tensor:
        """sources (R·N + E·N, C) -> contexts (R, L, C)."""
        return sources.index_select(0, self.index).view(len(self.rows), self.length, sources.shape[-1])

    def group(self, hidden: torch.Tensor, extras: torch.Tensor | None = None) -> ContextGroup:
        """The one ``ContextGroup`` of a layer call: hidden (R, N, C), extras (E·N, C) or None."""
        sources = hidden.reshape(-1, hidden.shape[-1])
        if extras is not None:
            sources = torch.cat((sources, extras))
        return ContextGroup(self.rows, self.context(sources), self.visible)


def _check_peers(num_rows: int, num_sources: int, num_tokens: int, peers: RowPeers) -> None:
    if len(peers) != num_rows:
        raise ValueError(f"masked_peer_contexts: {len(peers)} peer lists for {num_rows} rows")
    for row, row_peers in enumerate(peers):
        seen = set()
        for peer, mask in row_peers:
            if not 0 <= peer < num_sources or peer == row:
                raise ValueError(f"masked_peer_contexts: row {row} lists peer row {peer} "
                                 f"(sources 0..{num_sources - 1}, not itself)")
            if peer in seen:
                raise ValueError("masked_peer_contexts: a row lists the same peer row twice")
            seen.add(peer)
            if mask.dtype != torch.bool or tuple(mask.shape) != (num_tokens,):
                raise ValueError(f"masked_peer_contexts: row {row}'s mask of peer {peer} is {mask.dtype} "
                                 f"{tuple(mask.shape)}, expected bool ({num_tokens},)")


def plan_masked_sharing(num_rows: int, num_tokens: int, peers: RowPeers, device: torch.device | str,
                        num_sources: int | None = None) -> PaddedSharing | None:
    """The padded gather of every row's masked context; None when no row receives a peer token.

    peers[r]: row r's (source, bool (N,) mask) pairs in order, distinct sources ≠ r; a source < R is a row of the
    call, R + e the e-th extra source (a cached reference, ``StorySyncState`` in bank-read mode); ``num_sources``
    defaults to R. Rows that receive no peer token are in the call too, with their own tokens only.
    Cost: the CPU builds one (R, 1 + k, N) visibility table, one ``nonzero`` and the padded index (masks not on
    the CPU cost one transfer, a device sync); the device gets the index and the padding mask in one
    asynchronous copy.
    """
    num_sources = num_rows if num_sources is None else num_sources
    _check_peers(num_rows, num_sources, num_tokens, peers)
    masks = [mask for row_peers in peers for _, mask in row_peers]
    if not masks:
        return None
    if masks[0].device.type != "cpu":  # one transfer (a device sync) for all of them
        masks = list(torch.stack([mask.to(masks[0].device) for mask in masks]).cpu())
    slots = 1 + max(len(row_peers) for row_peers in peers)
    own, empty = torch.ones(num_tokens, dtype=torch.bool), torch.zeros(num_tokens, dtype=torch.bool)
    planes, source, flat_masks = [], [], iter(masks)
    for row, row_peers in enumerate(peers):  # slot 0: own tokens, then the peers, then empty slots
        padding = slots - 1 - len(row_peers)
        planes += [own, *(next(flat_masks) for _ in row_peers), *([empty] * padding)]
        source.append([row, *(peer for peer, _ in row_peers), *([0] * padding)])
    visible = torch.stack(planes).view(num_rows, slots, num_tokens)
    lengths = visible.sum((1, 2))  # a CPU tensor: no device sync
    longest = int(lengths.max())
    if longest == num_tokens:  # every peer mask empty
        return None
    equal = int(lengths.min()) == longest  # no padding: the host's own attention can run the call
    length = longest if equal else -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    where = visible.nonzero()  # (K, 3) in (row, slot, token) order: own first, then peers in the given order
    flat = torch.tensor(source)[where[:, 0], where[:, 1]] * num_tokens + where[:, 2]
    position = torch.arange(length)
    keys = position < lengths.unsqueeze(1)  # (R, L): True on each row's real keys, rows in order
    index = torch.zeros(num_rows, length, dtype=torch.long)
    index[keys] = flat  # padding reads row 0's first token, masked out
    padded = not bool(keys.all())
    moved = device_index(torch.cat((index.flatten(), keys.flatten().long())) if padded else index.flatten(), device)
    index_on_device = moved[:num_rows * length]
    mask = moved[num_rows * length:].view(num_rows, length).bool() if padded else None
    return PaddedSharing(tuple(range(num_rows)), length, index_on_device, mask)


def masked_peer_contexts(hidden: torch.Tensor, peers: RowPeers) -> list[ContextGroup]:
    """Contexts [own tokens ; tokens of each peer row where its mask is True, peers in the given order], as one
    padded ``ContextGroup`` covering every row (``plan_masked_sharing``), or [] when no row receives a peer token.

    hidden: (R, N, C) self-attention input; peers[r]: row r's (peer row, bool (N,) mask) pairs, distinct peer
    rows ≠ r (masks on one device).
    """
    plan = plan_masked_sharing(hidden.shape[0], hidden.shape[1], peers, hidden.device)
    return [] if plan is None else [plan.group(hidden)]


def peer_token_mask(viewer: int, peer: int, frame_characters: FrameGroups, masks: CharacterMasks,
                    p_share: float = 0.0, seed_parts: tuple = ()) -> torch.Tensor | None:
    """Γ on peer frame ``peer``'s block as seen from frame ``viewer``: bool (N,), or None when they share nothing.

    The union of ``masks[peer][c]`` over the characters c of both frames (a character missing from
    ``masks[peer]`` contributes no token), then the share dropout: each True kept with probability 1 − p_share,
    seeded with ``stable_seed(*seed_parts, "share", viewer, peer)``; ``seed_parts`` = (run_seed, step_key, grid key)
    in ``StorySyncState``. p_share = 0 draws nothing. The same function serves in-batch peers and cached (bank)
    references.
    """
    if viewer == peer or not frames_share(frame_characters, viewer, peer):
        return None
    peer_masks = masks.get(peer, {})
    parts = [peer_masks[c] for c in sorted(frame_characters[viewer] & frame_characters[peer]) if c in peer_masks]
    if not parts:
        return None
    union = parts[0]
    for part in parts[1:]:
        union = union | part
    return drop_mask(union, p_share, stable_seed(*seed_parts, "share", viewer, peer)) if p_share > 0 else union


def _visible_frames(viewer: int, reference_frames: Collection[int] | None) -> Collection[int] | None:
    """Frames ``viewer`` may read (Eq. 13): None = every frame; otherwise references other than itself."""
    if reference_frames is None:
        return None
    return [frame for frame in reference_frames if frame != viewer]


def sharing_masks(layout: RowLayout, frame_characters: FrameGroups, masks: CharacterMasks, *,
                  reference_frames: Collection[int] | None = None, p_share: float = 0.0,
                  seed_parts: tuple = ()) -> list[list[tuple[int, torch.Tensor]]]:
    """Every row's in-batch peers and their token masks, ready for ``masked_peer_contexts``.

    layout: frames and roles of the R rows; frame_characters: frame -> characters (``frozenset``; empty = [NC]);
    masks: frame -> {character: bool (N,)} cond-row subject masks; reference_frames: None = every frame may be read,
    otherwise only these (Eq. 13); p_share / seed_parts: see ``peer_token_mask``.
    Returns per row a list of (peer row, bool (N,) mask) in row order: rows of the same sharing role whose frame
    differs, shares a character and is visible. A pair whose mask is all False still appears (testing it would
    cost a host sync; ``masked_peer_contexts`` drops it). Pure: one mask per (viewer frame, peer frame) pair.
    """
    if not 0.0 <= p_share <= 1.0:
        raise ValueError(f"sharing_masks: p_share = {p_share} is not a probability")
    frames, roles = layout.frames, layout.roles
    pair_masks: dict[tuple[int, int], torch.Tensor | None] = {}
    result: list[list[tuple[int, torch.Tensor]]] = []
    for frame, role in zip(frames, roles):
        row_peers: list[tuple[int, torch.Tensor]] = []
        result.append(row_peers)
        if role not in SHARING_ROLES:
            continue
        visible = _visible_frames(frame, reference_frames)
        for peer_row, (peer, peer_role) in enumerate(zip(frames, roles)):
            if peer_role is not role or (visible is not None and peer not in visible):
                continue
            if (frame, peer) not in pair_masks:
                pair_masks[(frame, peer)] = peer_token_mask(frame, peer, frame_characters, masks, p_share,
                                                            seed_parts)
            mask = pair_masks[(frame, peer)]
            if mask is not None:
                row_peers.append((peer_row, mask))
    return result


def reference_peers(layout: RowLayout, references: Sequence[tuple[Role, int]], frame_characters: FrameGroups,
                    masks: CharacterMasks, *, p_share: float = 0.0,
                    seed_parts: tuple = ()) -> list[list[tuple[int, torch.Tensor]]]:
    """Eq. 13 with a cache, as peers for ``plan_masked_sharing``: per row, the cached references it reads.

    references: the (role, reference frame) entries available, in order; entry e is source ``R + e``. A row of a
    non-reference frame with role COND or UNCOND reads, for every reference of its own role that shares a character
    with it, the tokens where ``peer_token_mask`` is True (references in the order they first appear). With the same
    tokens and masks this equals ``sharing_masks`` with the references in the batch.
    """
    num_rows = layout.num_rows
    reference_frames = {frame for _, frame in references}
    result: list[list[tuple[int, torch.Tensor]]] = []
    for frame, role in zip(layout.frames, layout.roles):
        row_peers: list[tuple[int, torch.Tensor]] = []
        result.append(row_peers)
        if role not in SHARING_ROLES or frame in reference_frames:
            continue
        for e, (entry_role, reference) in enumerate(references):
            if entry_role is role:
                mask = peer_token_mask(frame, reference, frame_characters, masks, p_share, seed_parts)
                if mask is not None:
                    row_peers.append((num_rows + e, mask))
    return result
