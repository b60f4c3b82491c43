"""StorySync masked cross-image attention sharing, host-free.

Paper: StorySync (Gaur et al., arXiv 2508.03735) §3.2.1, Eqs. 5-8, §3.3 last paragraph (dropouts) and §3.4 Eq. 13
(reference subset); methods.md §5.1 steps 2, 5 and 6.

At a self-attention layer row i (one image, one CFG role) computes ``softmax(Q_i K_allᵀ/√d + log Γ_i) V_all`` with
Γ_i = 1 on its own block (δ_ii = 1: the image's own self-attention is kept whole) and Γ_i = the peer's token mask on
every peer block (Eq. 5). A binary Γ only removes keys, so this equals attention over the extended context
``[own tokens ; tokens of each peer where its mask is True]``: the form the project uses for consistent
self-attention (``consistent_self_attention``, hosts.md §15.5 decision 2). The host's own attention module runs on
that context once per distinct context length; no N×N mask and no log(0) are ever built.

Who shares with whom (``sharing_masks``):
- frames share when their character sets intersect (``frames_share``; ``[NC]`` frames share nothing); the peer's
  token mask is the union of its subject masks of the characters both frames contain;
- cond rows with cond rows, uncond with uncond, Role.OTHER never; uncond rows use the cond masks of their frame
  (methods.md §5.2 "Uncond rows");
- with reference frames (Eq. 13) a non-reference frame sees only the references, a reference the other references;
  each frame keeps all its own tokens (inferred, methods.md §5.1 step 6).

Our choices: the share dropout p_share (methods.md §5.1 step 5) is one Bernoulli per peer token, keep with
probability 1 − p, drawn from ``stable_seed(run_seed, step_key, layer_key, "share", viewer_frame, peer_frame)``, so
the draw belongs to the pair of frames, never to row positions or batch composition; cond and uncond rows of a frame
get the same draw. Subject masks come in already binarised and after mask dropout (``subject_masks``).
"""
from __future__ import annotations

from typing import Collection, Mapping, Sequence

import torch

from ..common.addresses import stable_seed
from ..common.async_index import device_index
from ..common.row_layout import Role, RowLayout
from ..story_diffusion.consistent_self_attention import SHARING_ROLES, ContextGroup, FrameGroups, frames_share
from .subject_masks import drop_mask

CharacterMasks = Mapping[int, Mapping[str, torch.Tensor]]  # frame -> {character: bool [N] subject mask}
RowPeers = Sequence[Sequence[tuple[int, torch.Tensor]]]  # per row: (peer row, bool [N] token mask) in order


def masked_peer_contexts(hidden: torch.Tensor, peers: RowPeers) -> list[ContextGroup]:
    """Contexts [own tokens ; tokens of each peer row where its mask is True, peers in the given order].

    hidden: (R, N, C) self-attention input; peers[r]: row r's (peer row, bool (N,) mask) pairs, distinct peer
    rows ≠ r (masks on one device).
    Rows with equal context lengths share one ContextGroup (one host attention call per distinct length, see
    ``attend_in_groups``); rows that receive no peer token get no group and attend plainly.
    Cost: context lengths depend on the masks, so the indices are built on the CPU: masks already there (as
    ``story_sync`` keeps them) cost no device sync, others one transfer. The CPU work is a fixed handful of tensor
    ops whatever the number of rows (one (R, 1 + k, N) visibility table, one ``nonzero``, one split); the GPU gets
    one asynchronous index copy for all groups and one ``index_select`` per group, gathering own and peer tokens
    straight into the context.
    """
    num_rows, num_tokens, channels = hidden.shape
    if len(peers) != num_rows:
        raise ValueError(f"masked_peer_contexts: {len(peers)} peer lists for {num_rows} rows")
    for row, row_peers in enumerate(peers):
        seen = set()
        for peer, mask in row_peers:
            if not 0 <= peer < num_rows or peer == row:
                raise ValueError(f"masked_peer_contexts: row {row} lists peer row {peer} (rows 0..{num_rows - 1})")
            if peer in seen:
                raise ValueError("masked_peer_contexts: a row lists the same peer row twice")
            seen.add(peer)
            if mask.dtype != torch.bool or tuple(mask.shape) != (num_tokens,):
                raise ValueError(f"masked_peer_contexts: row {row}'s mask of peer {peer} is {mask.dtype} "
                                 f"{tuple(mask.shape)}, expected bool ({num_tokens},)")
    sharing = [row for row, row_peers in enumerate(peers) if row_peers]
    if not sharing:
        return []
    masks = [mask for row in sharing for _, mask in peers[row]]
    if masks[0].device.type != "cpu":  # one transfer (a device sync) for all of them
        masks = list(torch.stack([mask.to(masks[0].device) for mask in masks]).cpu())
    slots = 1 + max(len(peers[row]) for row in sharing)
    own, empty = torch.ones(num_tokens, dtype=torch.bool), torch.zeros(num_tokens, dtype=torch.bool)
    planes, source, flat_masks = [], [], iter(masks)
    for row in sharing:  # slot 0: own tokens, then the peers, then empty slots up to ``slots``
        padding = slots - 1 - len(peers[row])
        planes += [own, *(next(flat_masks) for _ in peers[row]), *([empty] * padding)]
        source.append([row, *(peer for peer, _ in peers[row]), *([0] * padding)])
    visible = torch.stack(planes).view(len(sharing), slots, num_tokens)
    source = torch.tensor(source)  # (rows, slots): the row each slot reads
    where = visible.nonzero()  # (K, 3) in (row, slot, token) order: own first, then peers in the given order
    flat = source[where[:, 0], where[:, 1]] * num_tokens + where[:, 2]
    lengths = visible.sum((1, 2)).tolist()  # a CPU tensor: no device sync
    by_length: dict[int, list[int]] = {}
    for i, length in enumerate(lengths):
        if length > num_tokens:  # a row that receives no peer token attends plainly
            by_length.setdefault(length, []).append(i)
    if not by_length:
        return []
    parts = flat.split(lengths)
    ordered = [(length, members) for length, members in by_length.items()]
    packed = device_index(torch.cat([parts[i] for _, members in ordered for i in members]), hidden.device)
    flat_hidden = hidden.reshape(num_rows * num_tokens, channels)
    groups = []
    for (length, members), index in zip(ordered, packed.split([length * len(m) for length, m in ordered])):
        context = flat_hidden.index_select(0, index).view(len(members), length, channels)  # (G, L, C)
        groups.append(ContextGroup(tuple(sharing[i] for i in members), context))
    return groups


def peer_token_mask(viewer: int, peer: int, frame_characters: FrameGroups, masks: CharacterMasks,
                    p_share: float = 0.0, seed_parts: tuple = ()) -> torch.Tensor | None:
    """Γ on peer frame ``peer``'s block as seen from frame ``viewer``: bool (N,), or None when they share nothing.

    The union of ``masks[peer][c]`` over the characters c of both frames (a character missing from
    ``masks[peer]`` contributes no token), then the share dropout: each True kept with probability 1 − p_share,
    seeded with ``stable_seed(*seed_parts, "share", viewer, peer)``; ``seed_parts`` = (run_seed, step_key,
    layer_key). p_share = 0 draws nothing. The same function serves in-batch peers and cached (bank) references.
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


def reference_extras(layout: RowLayout, reference_tokens: Mapping[tuple[Role, int], torch.Tensor],
                     frame_characters: FrameGroups, masks: CharacterMasks, *, p_share: float = 0.0,
                     seed_parts: tuple = ()) -> list[torch.Tensor | None]:
    """Per row, the cached reference tokens it reads (Eq. 13 with a cache), for ``contexts_with_row_extras``.

    reference_tokens: (role, reference frame) -> (N, C) tokens stored while the references were generated (the
    self-attention input of that row); masks must hold the references' masks. A row of a non-reference frame with
    role COND or UNCOND gets, for every reference in the mapping's order that shares a character with it, the
    reference's tokens of its own role where ``peer_token_mask`` is True, concatenated to (L, C); otherwise None.
    With the same tokens and masks this equals ``sharing_masks`` with the references in the batch.
    """
    references = list(dict.fromkeys(frame for _, frame in reference_tokens))
    extras: list[torch.Tensor | None] = []
    for frame, role in zip(layout.frames, layout.roles):
        parts = []
        if role in SHARING_ROLES and frame not in references:
            for reference in references:
                tokens = reference_tokens.get((role, reference))
                mask = peer_token_mask(frame, reference, frame_characters, masks, p_share, seed_parts)
                if tokens is not None and mask is not None:
                    parts.append(tokens.index_select(0, device_index(mask.cpu().nonzero().flatten(),
                                                                     tokens.device)))
        extra = torch.cat(parts) if parts else None
        extras.append(extra if extra is not None and extra.shape[0] > 0 else None)
    return extras
