"""A1111 adapter: the story's methods reach the UNet through instance hooks on its attention modules (hosts.md §3).

Host contract (A1111 1.10 ``modules/sd_samplers_cfg_denoiser.py``): the UNet is ``p.sd_model.model.diffusion_model``
with ldm/sgm module names; one denoiser step may call it several times (split CFG batches, a skipped uncond), so the
row layout of each call comes from the row cursor (``A1111RowCursor``, planned per step by ``on_cfg_denoiser``) read
by a forward pre-hook on the UNet. The hooks are installed at the start of every ``p.sample`` and removed in its
``finally`` (``pipeline.uninstall``); ``sweep_stale`` removes what a crashed run left (next run's first action, and on
script unload). Forge's counterpart is ``forge.py``.
"""
from __future__ import annotations

import torch

from ..common.async_index import index_tensor
from ..common.row_layout import without_twins
from ..surfaces.attention_modules import install_csa_hooks, install_identity_hooks, install_storysync_hooks
from ..surfaces.instance_hooks import ldm_layer_address, remove_stale_hooks
from .guard import sweep


def ldm_unet(p) -> torch.nn.Module:
    return p.sd_model.model.diffusion_model


def attention_layers(unet: torch.nn.Module, kind: str) -> list:
    """(layer address, module) of every ``kind`` (attn1 / attn2) attention module of an ldm-named UNet."""
    return [(a, m) for n, m in unet.named_modules() if (a := ldm_layer_address(n, kind))]


def row_cursor_hook(generation):
    """UNet forward pre-hook: the rows of this call from the generation's cursor, told to every method state. In BLI
    lock-step after the window (``lockstep.py``) the call's twin rows are cut from every row tensor of its arguments
    (``x``, timesteps, ``context``, SDXL's ``y``), and ``twin_output_hook`` gives the host its rows back."""
    def hook(module, args, kwargs):
        x = args[0] if args else kwargs.get("x")
        if not (generation.sampling and isinstance(x, torch.Tensor)):
            return None
        rows, layout, cut = x.shape[0], generation.cursor.next_call(x.shape[0]), None
        generation.twin_outputs = None  # (an aborted call's)
        state = generation.storysync
        if layout.twins is not None and state is not None and not state.in_bli_window():
            layout, kept, generation.twin_outputs = without_twins(layout)
            index = index_tensor(kept, x.device)

            def take(value):
                return value.index_select(0, index.to(value.device)) \
                    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == rows else value
            cut = tuple(take(a) for a in args), {k: take(v) for k, v in kwargs.items()}
        if generation.csa is not None:
            generation.csa.begin_unet_call(layout, tuple(x.shape[-2:]))
        if generation.storysync is not None:
            generation.storysync.begin_unet_call(layout, tuple(x.shape[-2:]))
        if generation.ipca is not None:
            generation.ipca.layout = layout
        return cut
    hook.consistent_story_row_cursor = True  # lets a later run's sweep recognise a leftover
    return hook


def twin_output_hook(generation):
    """UNet forward hook: a call whose twin rows were cut returns every row, each twin its story row's output."""
    def hook(module, args, kwargs, output):
        expand, generation.twin_outputs = generation.twin_outputs, None
        if expand is None or not isinstance(output, torch.Tensor):
            return None
        return output.index_select(0, index_tensor(expand, output.device))
    hook.consistent_story_row_cursor = True
    return hook


def install_hooks(p, generation) -> None:
    """Hook the attention modules for the generation's method states and the row cursor on the UNet; every handle
    goes to ``generation.hooks`` / ``generation.unet_hook_handle`` as soon as it is installed, so ``uninstall`` in
    ``finally`` removes exactly what an error let through. IPCA's attn2 hooks go first: StorySync's subject-map
    hooks sit on top of them and still hand the call down."""
    unet, reach = ldm_unet(p), generation.reach
    attn1, attn2 = attention_layers(unet, "attn1"), attention_layers(unet, "attn2")
    if generation.ipca is not None:
        generation.hooks += install_identity_hooks(attn2, generation.ipca, reach=reach)
    if generation.storysync is not None:
        generation.hooks += install_storysync_hooks(attn1, attn2, generation.storysync, reach=reach)
    elif generation.csa is not None:
        generation.hooks += install_csa_hooks(attn1, generation.csa, reach=reach)
    generation.unet_hook_handle = unet.register_forward_pre_hook(row_cursor_hook(generation), with_kwargs=True)
    generation.hooks.append(unet.register_forward_hook(twin_output_hook(generation), with_kwargs=True))


def sweep_stale(unet: torch.nn.Module) -> None:
    """Remove hooks a failed or interrupted run left on the UNet (next run's first action, and on unload)."""
    remove_stale_hooks(unet)
    sweep(unet)
    for hooks, kwargs_flags in ((unet._forward_pre_hooks, unet._forward_pre_hooks_with_kwargs),
                                (unet._forward_hooks, unet._forward_hooks_with_kwargs)):
        for key, hook in list(hooks.items()):
            if getattr(hook, "consistent_story_row_cursor", False):
                del hooks[key]
                kwargs_flags.pop(key, None)
