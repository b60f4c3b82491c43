"""The DiT surface (``surfaces/dit_attention``) on joint text+image attention, and on a real (tiny, randomly
initialised) diffusers ``FluxTransformer2DModel``: methods off = diffusers bit for bit, install -> remove identical,
sharing equal to a naive float64 reference (each shared key with its own frame's RoPE), masks recover a planted
subject from the joint attention, a peer's non-subject tokens do not matter."""
from __future__ import annotations

import math

import pytest
import torch

from lib_consistency.common.addresses import DitDepth
from lib_consistency.common.row_layout import Role, RowLayout
from lib_consistency.story_diffusion.consistent_self_attention import CsaSettings, LayerPolicy, Schedule
from lib_consistency.story_diffusion.state import ConsistencyState
from lib_consistency.story_sync.state import StorySyncSettings, StorySyncState
from lib_consistency.surfaces.dit_attention import DitRunState, harmonize, joint_attention
from lib_consistency.surfaces.reach import CSA, HARMONIZATION, SHARING, SUBJECT_MAPS, Reach
from tests.flux_standin import rope_from_diffusers

DEPTH = DitDepth(1, 1)
GRID = (4, 4)
TEXT, HEADS, DIM = 3, 2, 4
SHARED_BLOCK = ("single", 0, 0)  # depth 1/2: shared under the "up" policy; RFH range too


def rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A rotary embedding as Flux's: channel pair 0 turned by the token's row, pair 1 by its column.
    x: [r, H, L, 4]; positions: [L, 2]."""
    angle = positions.double() * torch.tensor([1.0, 0.7], dtype=torch.float64)  # [L, 2]: one angle per pair
    cos, sin = torch.cos(angle).to(x.dtype), torch.sin(angle).to(x.dtype)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def positions() -> torch.Tensor:
    """Text tokens at position 0 (as Flux's txt_ids), image tokens at their (row, column)."""
    rows, cols = torch.meshgrid(torch.arange(GRID[0]), torch.arange(GRID[1]), indexing="ij")
    image = torch.stack([rows.flatten(), cols.flatten()], dim=1)
    return torch.cat([torch.zeros(TEXT, 2, dtype=torch.long), image])


def qkv(rows: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    length = TEXT + GRID[0] * GRID[1]
    raw = [torch.randn(rows, HEADS, length, DIM, generator=generator) for _ in range(3)]
    where = positions()
    return rope(raw[0], where), rope(raw[1], where), raw[2], raw


def naive(q, keys, values):
    """float64 softmax attention of one row: q [H, Lq, D], keys/values [H, Lk, D] -> [Lq, H·D]."""
    q, keys, values = q.double(), keys.double(), values.double()
    weights = torch.softmax(q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (weights @ values).transpose(0, 1).flatten(1)


def layout(frames, roles=None):
    return RowLayout(tuple(frames), tuple(roles or (Role.COND,) * len(frames)))


def csa_run(rows_layout, frames=3, rate=1.0):
    state = ConsistencyState(CsaSettings(rate, Schedule.ALWAYS, LayerPolicy.ALL), 7,
                             {f: {"a"} for f in range(frames)}, depth=DEPTH)
    state.begin_step(0, 3, 10, 2.0)
    run = DitRunState(csa=state, reach=Reach())
    run.set_rows(rows_layout, GRID)
    return run


def storysync_run(rows_layout, masks, **values):
    settings = StorySyncSettings(**{"mask_dropout": 0.0, "rfh_strength": 0.0, "bli_strength": 0.0,
                                    "schedule": Schedule.ALWAYS, **values})
    frames = sorted(set(rows_layout.frames))
    state = StorySyncState(settings, 7, {f: frozenset({"a"}) for f in frames}, {f: {"a": (1,)} for f in frames},
                           depth=DEPTH)
    state.begin_step(0, 3, 10, 2.0)
    for frame, mask in masks.items():
        state.masks[frame] = (GRID, {"a": mask.flatten()})  # row-major, as the state keeps them
    run = DitRunState(storysync=state, reach=Reach())
    run.set_rows(rows_layout, GRID)
    return run


def test_csa_joint_attention_equals_a_naive_float64_reference_with_each_frames_rope():
    rows = layout((0, 1, 2, 0, 1, 2), (Role.COND,) * 3 + (Role.UNCOND,) * 3)
    q, k, v, _ = qkv(6)
    out = joint_attention(csa_run(rows), ("double", 0, 0), q, k, v, TEXT)
    assert out.shape == (6, TEXT + 16, HEADS * DIM)
    for row in range(6):
        peers = [p for p in range(6) if p != row and rows.roles[p] is rows.roles[row]]  # cond with cond only
        keys = torch.cat([k[row]] + [k[p, :, TEXT:] for p in peers], dim=1)  # peers' keys rotated at their own place
        values = torch.cat([v[row]] + [v[p, :, TEXT:] for p in peers], dim=1)
        assert torch.allclose(out[row, TEXT:].double(), naive(q[row, :, TEXT:], keys, values), atol=1e-5)
        # text queries attend over their own frame's sequence only
        assert torch.allclose(out[row, :TEXT].double(), naive(q[row, :, :TEXT], k[row], v[row]), atol=1e-5)


def test_masked_sharing_equals_the_reference_and_ignores_peers_non_subject_tokens(monkeypatch):
    rows = layout((0, 1, 2))
    masks = {f: torch.zeros(GRID, dtype=torch.bool) for f in range(3)}
    masks[0][1:3, 1:3] = True
    masks[1][0, :] = True
    masks[2][2:, 3] = True
    q, k, v, _ = qkv(3, seed=1)
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(a[0].shape[2]) or original(*a, **kw))
    out = joint_attention(storysync_run(rows, masks), SHARED_BLOCK, q, k, v, TEXT)
    # rows of three context lengths: text queries in one call, every row's image queries in one padded call
    assert calls == [TEXT, q.shape[2] - TEXT]
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", original)
    for row in range(3):
        keys, values = [k[row]], [v[row]]
        for peer in (p for p in range(3) if p != row):
            subject = TEXT + masks[peer].flatten().nonzero().flatten()
            keys.append(k[peer][:, subject])
            values.append(v[peer][:, subject])
        expected = naive(q[row, :, TEXT:], torch.cat(keys, 1), torch.cat(values, 1))
        assert torch.allclose(out[row, TEXT:].double(), expected, atol=1e-5)
    # a peer's tokens outside its subject mask never reach another frame
    outside = TEXT + (~masks[1].flatten()).nonzero().flatten()
    k2, v2 = k.clone(), v.clone()
    k2[1][:, outside] += 5.0
    v2[1][:, outside] -= 3.0
    again = joint_attention(storysync_run(rows, masks), SHARED_BLOCK, q, k2, v2, TEXT)
    assert torch.equal(again[0], out[0]) and torch.equal(again[2], out[2])
    assert not torch.equal(again[1], out[1])


def test_masks_recover_a_subject_planted_in_the_joint_attention():
    rows = layout((0, 1, 0, 1), (Role.COND, Role.COND, Role.UNCOND, Role.UNCOND))
    run = storysync_run(rows, {})
    planted = torch.zeros(GRID, dtype=torch.bool)
    planted[1:3, 0:3] = True
    k = torch.zeros(4, HEADS, TEXT + 16, DIM)
    k[:, :, 0, 0] = 1.0  # text token 0: everything else
    k[:, :, 1, 1] = 1.0  # text token 1: the subject (the state's column for "a")
    q = torch.zeros(4, HEADS, TEXT + 16, DIM)
    image_q = torch.where(planted.flatten()[:, None], torch.tensor([0.0, 6.0, 0, 0]), torch.tensor([6.0, 0, 0, 0]))
    q[:, :, TEXT:] = image_q
    v = torch.randn(4, HEADS, TEXT + 16, DIM)
    assert joint_attention(run, ("double", 0, 0), q, k, v, TEXT) is None  # maps only: the block attends plainly
    assert run.storysync.masks == {}  # not final before the first single-stream block
    joint_attention(run, SHARED_BLOCK, q, k, v, TEXT)
    for frame in (0, 1):
        grid, masks = run.storysync.masks[frame]
        assert grid == GRID and torch.equal(masks["a"], planted.flatten())
    assert {s for s, _ in run.reach._seen} == {SUBJECT_MAPS, SHARING}


def test_rfh_runs_on_image_tokens_of_its_blocks_only():
    rows = layout((0, 1))
    masks = {f: torch.zeros(GRID, dtype=torch.bool) for f in range(2)}
    masks[0][:2], masks[1][1:3] = True, True
    out = torch.randn(2, TEXT + 16, HEADS * DIM)
    run = storysync_run(rows, masks, rfh_strength=0.8, rfh_window=(0.0, 1.0))
    harmonized = harmonize(run, SHARED_BLOCK, out, TEXT)
    assert torch.equal(harmonized[:, :TEXT], out[:, :TEXT]) and not torch.equal(harmonized, out)
    assert harmonize(run, ("double", 0, 0), out, TEXT) is out  # depth 0: outside the RFH range
    assert harmonize(storysync_run(rows, masks, rfh_strength=0.0), SHARED_BLOCK, out, TEXT) is out
    assert (HARMONIZATION, SHARED_BLOCK) in run.reach._seen


def test_nothing_to_share_means_the_plain_call():
    q, k, v, _ = qkv(2)
    assert joint_attention(None, SHARED_BLOCK, q, k, v, TEXT) is None
    assert joint_attention(DitRunState(), SHARED_BLOCK, q, k, v, TEXT) is None
    one_frame = csa_run(layout((0, 0), (Role.COND, Role.UNCOND)), frames=1)
    assert joint_attention(one_frame, SHARED_BLOCK, q, k, v, TEXT) is None
    assert (CSA, SHARED_BLOCK) in one_frame.reach._seen
    up = ConsistencyState(CsaSettings(1.0, Schedule.ALWAYS, LayerPolicy.UP), 7, {0: {"a"}, 1: {"a"}}, depth=DEPTH)
    up.begin_step(0, 3, 10, 2.0)
    run = DitRunState(csa=up)
    run.set_rows(layout((0, 1)), GRID)
    assert joint_attention(run, ("double", 0, 0), q, k, v, TEXT) is None  # "up": the second half of the depth
    assert joint_attention(run, SHARED_BLOCK, q, k, v, TEXT) is not None


# --- a real diffusers FluxTransformer2DModel --------------------------------------------------------------------

@pytest.fixture(scope="module")
def flux():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=False,
        axes_dims_rope=(4, 6, 6)).eval()


def flux_inputs(rows=2, seed=3):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(GRID[0], GRID[1], 3)
    ids[..., 1] = torch.arange(GRID[0])[:, None]
    ids[..., 2] = torch.arange(GRID[1])[None]
    return dict(hidden_states=torch.randn(rows, 16, 4, generator=generator),
                encoder_hidden_states=torch.randn(rows, 5, 32, generator=generator),
                pooled_projections=torch.randn(rows, 16, generator=generator), timestep=torch.full((rows,), 0.5),
                img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(5, 3))


def sample(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def test_flux_processors_off_are_diffusers_bit_for_bit_and_removal_restores(flux):
    from lib_consistency.surfaces.diffusers_flux import (FluxCall, flux_depth, install_flux_processors,
                                                         remove_flux_processors)
    inputs = flux_inputs()
    plain = sample(flux, inputs)
    originals = {name: type(p) for name, p in flux.attn_processors.items()}
    call = FluxCall(None, 5)
    previous = install_flux_processors(flux, call)
    try:
        assert torch.equal(sample(flux, inputs), plain)  # no run
        call.run = csa_run(layout((0, 0), (Role.COND, Role.UNCOND)), frames=1)
        call.run.csa.depth = flux_depth(flux)
        assert torch.equal(sample(flux, inputs), plain)  # a run with nothing to share
        call.run = csa_run(layout((0, 1)), frames=2)
        shared = sample(flux, inputs)
        assert not torch.allclose(shared, plain, atol=1e-6)  # sharing reached the transformer
        assert {layer for _, layer in call.run.reach._seen} == {("double", 0, 0), ("single", 0, 0)}
    finally:
        remove_flux_processors(flux, previous)
    assert {name: type(p) for name, p in flux.attn_processors.items()} == originals
    assert torch.equal(sample(flux, inputs), plain)


def test_flux_storysync_builds_masks_from_the_transformers_own_joint_attention(flux):
    from lib_consistency.surfaces.diffusers_flux import FluxCall, install_flux_processors, remove_flux_processors
    inputs = flux_inputs()
    plain = sample(flux, inputs)
    run = storysync_run(layout((0, 1)), {}, rfh_strength=0.5, rfh_window=(0.0, 1.0))
    previous = install_flux_processors(flux, FluxCall(run, 5))
    try:
        shared = sample(flux, inputs)
    finally:
        remove_flux_processors(flux, previous)
    assert set(run.storysync.masks) == {0, 1}
    grid, masks = run.storysync.masks[0]
    assert grid == GRID and masks["a"].dtype == torch.bool and 0 < int(masks["a"].sum()) < 16
    assert not torch.allclose(shared, plain, atol=1e-6)
    assert {s for s, _ in run.reach._seen} == {SUBJECT_MAPS, SHARING, HARMONIZATION}


# --- the WebUIs' block form (Forge / Neo ``backend/nn/flux.py``) against diffusers -------------------------------

def diffusers_blocks(model, inputs, call=None):
    """Run the diffusers model's blocks on its own embeddings: (image tokens out, the host-form block inputs)."""
    with torch.no_grad():
        img = model.x_embedder(inputs["hidden_states"])
        txt = model.context_embedder(inputs["encoder_hidden_states"])
        temb = model.time_text_embed(inputs["timestep"] * 1000, inputs["pooled_projections"])
        cos, sin = model.pos_embed(torch.cat([inputs["txt_ids"], inputs["img_ids"]]))
        host_inputs = (img.clone(), txt.clone(), temb, rope_from_diffusers(cos, sin))
        for block in model.transformer_blocks:
            txt, img = block(img, txt, temb, (cos, sin))
        for block in model.single_transformer_blocks:
            txt, img = block(img, txt, temb, (cos, sin))
    return img, host_inputs


def host_blocks(blocks, host_inputs, run=None):
    from lib_consistency.surfaces.flux_blocks import FluxSurface
    surface = FluxSurface(blocks, run) if run is not None else None
    if surface is not None:
        surface.install()
    try:
        with torch.no_grad():
            return blocks(*host_inputs)
    finally:
        if surface is not None:
            surface.remove()


def test_webui_flux_surface_is_the_host_bit_for_bit_when_off_and_leaves_nothing(flux):
    from tests import flux_standin
    blocks = flux_standin.FluxBlocks.from_diffusers(flux)
    diffusers_out, host_inputs = diffusers_blocks(flux, flux_inputs())
    plain = host_blocks(blocks, host_inputs)
    assert torch.allclose(plain, diffusers_out, atol=1e-5)  # the stand-in is Flux (diffusers' implementation)
    original = flux_standin.attention
    assert torch.equal(host_blocks(blocks, host_inputs, DitRunState()), plain)
    one_frame = csa_run(layout((0, 0), (Role.COND, Role.UNCOND)), frames=1)
    assert torch.equal(host_blocks(blocks, host_inputs, one_frame), plain)  # nothing to share: the host's calls
    assert {layer for _, layer in one_frame.reach._seen} == {("double", 0, 0), ("single", 0, 0)}
    assert flux_standin.attention is original
    assert all("forward" not in b.__dict__ for b in blocks.modules())


def test_webui_flux_surface_equals_the_diffusers_surface_with_the_methods_on(flux):
    from lib_consistency.surfaces.diffusers_flux import FluxCall, install_flux_processors, remove_flux_processors
    from tests import flux_standin
    blocks = flux_standin.FluxBlocks.from_diffusers(flux)
    inputs = flux_inputs()
    plain, host_inputs = diffusers_blocks(flux, inputs)
    for make in (lambda: csa_run(layout((0, 1)), frames=2),
                 lambda: storysync_run(layout((0, 1)), {}, rfh_strength=0.5, rfh_window=(0.0, 1.0))):
        call = FluxCall(make(), 5)
        previous = install_flux_processors(flux, call)
        try:
            expected, _ = diffusers_blocks(flux, inputs)
        finally:
            remove_flux_processors(flux, previous)
        run = make()
        got = host_blocks(blocks, host_inputs, run)
        assert not torch.allclose(expected, plain, atol=1e-5)
        assert torch.allclose(got, expected, atol=1e-5)


def test_a_surface_left_installed_is_swept(flux):
    from lib_consistency.surfaces.flux_blocks import FluxSurface, sweep_flux
    from tests import flux_standin
    blocks = flux_standin.FluxBlocks.from_diffusers(flux)
    original = flux_standin.attention
    FluxSurface(blocks, DitRunState()).install()  # a call that never reached remove()
    assert flux_standin.attention is not original and "forward" in blocks.double_blocks[0].__dict__
    sweep_flux(blocks)
    assert flux_standin.attention is original
    assert all("forward" not in b.__dict__ for b in blocks.modules())
    sweep_flux(torch.nn.Linear(2, 2))  # not a Flux model: nothing to do


def test_bli_on_a_transformer_records_and_blends_the_double_stream_blocks():
    from lib_consistency.story_sync.state import Phase, PrePassDone
    rows = layout((0, 1))
    q, k, v, _ = qkv(2, seed=4)
    vanilla = storysync_run(rows, {}, bli_strength=1.0, bli_window=0.5)
    vanilla.storysync.phase = Phase.VANILLA
    assert joint_attention(vanilla, ("double", 0, 0), q, k, v, TEXT) is None
    assert joint_attention(vanilla, SHARED_BLOCK, q, k, v, TEXT) is None
    assert {key.layer for key in vanilla.storysync.bli_cache.keys()} == {"double.0.0"}
    vanilla.storysync.begin_step(0, 6, 10, 1.0)  # past the window: the pre-pass stops
    with pytest.raises(PrePassDone):
        joint_attention(vanilla, ("double", 0, 0), q, k, v, TEXT)
    consistent = storysync_run(rows, {}, bli_strength=1.0, bli_window=0.5)
    consistent.storysync.bli_cache = vanilla.storysync.bli_cache
    q2 = q + torch.randn(q.shape, generator=torch.Generator().manual_seed(9))
    out = joint_attention(consistent, ("double", 0, 0), q2, k, v, TEXT)
    plain = joint_attention(storysync_run(rows, {}, bli_strength=1.0, bli_window=0.0), ("double", 0, 0), q, k, v,
                            TEXT)
    assert plain is None  # outside the window nothing changes
    for row in range(2):  # strength 1: the image queries are the vanilla ones exactly
        assert torch.allclose(out[row, TEXT:].double(), naive(q[row, :, TEXT:], k[row], v[row]), atol=1e-5)


def ipca_run(rows_layout, identity=(0, 1), dropout=0.0, csa=None):
    from lib_consistency.common.addresses import StepKey
    from lib_consistency.one_prompt_one_story.ipca import IdentityAttentionState
    state = IdentityAttentionState(tuple(identity), dropout, 7)
    state.step = StepKey(0, 3, 2.0)
    run = DitRunState(csa=csa, ipca=state, reach=Reach())
    run.set_rows(rows_layout, GRID)
    return run


def test_ipca_doubles_the_identity_text_keys_for_cond_image_queries_only():
    rows = layout((0, 1, 0, 1), (Role.COND, Role.COND, Role.UNCOND, Role.UNCOND))
    q, k, v, _ = qkv(4, seed=5)
    out = joint_attention(ipca_run(rows), ("double", 0, 0), q, k, v, TEXT)
    for row in range(4):
        keys, values = k[row], v[row]
        if rows.roles[row] is Role.COND:  # identity columns 0, 1 once more: +ln 2 on their logits
            keys, values = torch.cat([keys, keys[:, :2]], 1), torch.cat([values, values[:, :2]], 1)
        assert torch.allclose(out[row, TEXT:].double(), naive(q[row, :, TEXT:], keys, values), atol=1e-5)
        assert torch.allclose(out[row, :TEXT].double(), naive(q[row, :, :TEXT], k[row], v[row]), atol=1e-5)
    # IPCA dropout -> 0 keeps every identity column: the bias form equals the appended keys
    nearly = joint_attention(ipca_run(rows, dropout=1e-12), ("double", 0, 0), q, k, v, TEXT)
    assert torch.allclose(nearly, out, atol=1e-5)
    dropped = joint_attention(ipca_run(rows, dropout=0.5), ("double", 0, 0), q, k, v, TEXT)
    assert not torch.allclose(dropped[:2], out[:2], atol=1e-5) and torch.allclose(dropped[2:], out[2:], atol=1e-6)
    again = joint_attention(ipca_run(rows, dropout=0.5), ("double", 0, 0), q, k, v, TEXT)
    assert torch.equal(again, dropped)  # seeded by (run, step, layer, frame)


def test_ipca_with_shared_image_tokens_equals_the_reference():
    rows = layout((0, 1))
    q, k, v, _ = qkv(2, seed=6)
    csa = csa_run(rows, frames=2).csa
    out = joint_attention(ipca_run(rows, identity=(2,), csa=csa), ("single", 0, 0), q, k, v, TEXT)
    for row in range(2):
        peer = 1 - row
        keys = torch.cat([k[row], k[row][:, 2:3], k[peer, :, TEXT:]], 1)
        values = torch.cat([v[row], v[row][:, 2:3], v[peer, :, TEXT:]], 1)
        assert torch.allclose(out[row, TEXT:].double(), naive(q[row, :, TEXT:], keys, values), atol=1e-5)
