"""What a story run meets beside it in the WebUI: prompt styles, extra networks, prompt-rewriting extensions
(issue 11; hosts.md §13). A1111 1.10 and Forge alike.

- Dynamic Prompts (sd-dynamic-prompts) rewrites ``p.all_prompts`` in its ``process`` hook from the *first*
  prompt (every frame would become a variant of frame 1) and ``p.all_seeds`` from ``int(p.seed)``. A story's
  frames are written out one by one, so a story run is not expanded: its ``enabled`` argument is switched off for
  this job only (``before_process`` runs before any script's ``process``, which reads ``p.script_args`` then),
  and a frame that uses its syntax is refused, never drawn with the braces as words.
- Any other extension that changes the frames' prompts, seeds or batches after ``before_process`` is caught at
  the first ``p.sample`` (the host's ``setup_prompts`` and every ``process`` hook have run by then).
- Extra networks (LoRA…) activate per batch from the batch's first prompt: the story plans batches of one set of
  networks each (``story/batches.py``, ``batches.py``); ``check_batch_networks`` checks the prompts the host holds.
- sd-webui-controlnet (A1111) marks every cond with a first context token of ±1024 (``hook.py``
  ``mark_prompt_context``, in its ``p.sample`` wrapper) and strips it in its UNet forward to tell cond rows from
  uncond rows; a context swapped in per step keeps that token (``split_controlnet_mark``). Per-image control inputs
  cover one batch in that extension: a story's per-frame inputs are handed to each batch in turn
  (``controlnet_batch_inputs``).
- Hypertile (A1111's built-in ``extensions-builtin/hypertile``) wraps attn1 ``forward``s once and for good and
  turns each on per job (``process``; again in ``before_hr``) for the layers of depth <= its max depth; a tiled
  layer cannot take a story's extended keys, any other layer composes (our hook calls its wrapper).
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

import torch

from modules import shared

from ..common.row_layout import TokenGrid
from ..one_prompt_one_story.token_plan import CONTEXT_TOKENS
from ..story.run import PER_IMAGE_NETWORKS, StoryRunPlan, check_batch_networks, extra_networks_of, frame_label
from ..story_diffusion.consistent_self_attention import LayerPolicy, layer_is_selected
from ..surfaces.instance_hooks import ldm_layer_address

DYNAMIC_PROMPTS_TITLE = "Dynamic Prompts"
CONTROLNET_TITLE = "ControlNet"  # sd-webui-controlnet's and Forge's built-in script
CONTROLNET_MARK = 1024.0  # sd-webui-controlnet hook.py POSITIVE_MARK_TOKEN (negative rows: -1024)
HYPERTILE_PARAMS = "__webui_hypertile_params"  # Hypertile's per-layer settings, on each attn1 it wraps


def _dynamic_prompts(p):
    """Dynamic Prompts' script when it is installed and enabled for this job (its title carries its version), else
    None."""
    script = _alwayson(p, lambda title: title.startswith(DYNAMIC_PROMPTS_TITLE))
    args = getattr(p, "script_args", None)
    if script is None or args is None or script.args_from >= len(args):
        return None
    return script if args[script.args_from] else None


def _alwayson(p, matches: Callable[[str], bool]):
    """The first always-on script of this job whose title ``matches``, or None."""
    for script in getattr(getattr(p, "scripts", None), "alwayson_scripts", None) or []:
        try:
            title = script.title()
        except Exception:
            continue
        if isinstance(title, str) and matches(title):
            return script
    return None


def _syntax(opts) -> re.Pattern:
    """Dynamic Prompts' variant ``{a|b}`` and wildcard ``__name__`` syntax, with its own parser settings."""
    start = opts.data.get("dp_parser_variant_start", "{") or "{"
    end = opts.data.get("dp_parser_variant_end", "}") or "}"
    wrap = opts.data.get("dp_parser_wildcard_wrap", "__") or "__"
    return re.compile(f"{re.escape(start)}.*?{re.escape(end)}|{re.escape(wrap)}\\S+?{re.escape(wrap)}")


def keep_dynamic_prompts_off(p, plan: StoryRunPlan) -> None:
    """From ``before_process``: a story run is not expanded by Dynamic Prompts (module docstring). Raises with
    the frame when a frame uses its syntax."""
    script = _dynamic_prompts(p)
    if script is None:
        return
    syntax = _syntax(shared.opts)
    for frame, prompt in enumerate(plan.frame_prompts):
        if found := syntax.search(prompt):
            raise ValueError(f"{frame_label(plan.story, frame)} uses Dynamic Prompts syntax {found[0]!r}; a story "
                             f"is not expanded by Dynamic Prompts (every frame is written out), so write its words "
                             f"out, or turn the story off to use wildcards")
    args = list(p.script_args)
    args[script.args_from] = False
    p.script_args = tuple(args) if isinstance(p.script_args, tuple) else args
    print("Consistent Story: Dynamic Prompts is not applied to a story run (each frame's prompt is written out)")


def _styled(p, prompts: Sequence[str]) -> list[str]:
    """``prompts`` as the host's ``setup_prompts`` leaves them: the selected prompt styles applied."""
    styles = getattr(p, "styles", None) or []
    return [shared.prompt_styles.apply_styles_to_prompt(text, styles) for text in prompts]


def check_host_prompts(p, plan: StoryRunPlan, consolidate: bool) -> None:
    """From the first ``p.sample``: the images are still the story's, and each batch can get its networks."""
    all_prompts = getattr(p, "all_prompts", None)
    if all_prompts is None:
        return
    expected = _styled(p, plan.frame_prompts)
    hires = getattr(p, "all_hr_prompts", None) if getattr(p, "enable_hr", False) else None
    changed = [name for name, now, wanted in (
        ("prompts", list(all_prompts), expected),
        ("hires prompts", list(hires or expected), expected),
        ("seeds", [int(s) for s in getattr(p, "all_seeds", plan.seeds)], list(plan.seeds)),
        ("batches", [p.batch_size, p.n_iter], [plan.batch_size, plan.batch_count])) if now != wanted]
    if changed:
        raise ValueError(f"another extension changed the story's {' and '.join(changed)} after the story set them "
                         f"({len(all_prompts)} prompts for {plan.frame_count} frames); turn it off for story runs")
    if consolidate and expected != list(plan.frame_prompts):
        raise ValueError(f"the prompt styles {', '.join(p.styles)} change the frames' prompts, which 1Prompt1Story's "
                         f"consolidated prompt would not contain; copy their text into the prompt box, or deselect "
                         f"them")
    batches = [plan.batch_frames(i) for i in range(plan.batch_count)]
    check_batch_networks(plan.story, expected, batches, PER_IMAGE_NETWORKS)


def batch_networks(p, plan: StoryRunPlan) -> tuple[str, ...]:
    """The extra networks active for the batch being sampled (those of its first frame), OneActor's left out:
    1Prompt1Story encodes its consolidated prompt again under each set (a LoRA may change the text encoder)."""
    prompts = getattr(p, "all_prompts", None) or plan.frame_prompts
    return extra_networks_of(prompts[plan.batch_frames(p.iteration)[0]], PER_IMAGE_NETWORKS)


def _levels(unet) -> dict[str, int]:
    """Downsampling level of each block of an ldm/sgm UNet, by name prefix (``input_blocks.4.`` -> 1): one more
    after each ``Downsample`` input block, one less after each output block that ends in ``Upsample``."""
    levels, level = {}, 0
    for i, block in enumerate(unet.input_blocks):
        level += any(type(m).__name__ == "Downsample" for m in block.children())
        levels[f"input_blocks.{i}."] = level
    levels["middle_block."] = level
    for j, block in enumerate(unet.output_blocks):
        levels[f"output_blocks.{j}."] = level
        level -= any(type(m).__name__ == "Upsample" for m in block.children())
    return levels


def hypertile_refusal(p, unet, layers: str) -> str | None:
    """Why Hypertile cannot run beside the story's shared self-attention (policy ``layers``) in this job, or None:
    it tiles (first pass, or hires pass) a layer the story shares. Called at ``p.sample``, after its ``process``."""
    opts = shared.opts.data
    if not (opts.get("hypertile_enable_unet") or
            (getattr(p, "enable_hr", False) and opts.get("hypertile_enable_unet_secondpass"))):
        return None
    max_depth = opts.get("hypertile_max_depth_unet", 3)
    tiled = [(name, params.depth) for name, module in unet.named_modules()
             if (params := getattr(module, HYPERTILE_PARAMS, None)) is not None and params.depth <= max_depth]
    if not tiled:  # only the hires pass is tiled and Hypertile has not wrapped this model yet
        return "Hypertile (UNet, hires pass) would split self-attention the story shares; turn it off in Settings"
    levels = _levels(unet)
    for name, depth in tiled:
        layer = ldm_layer_address(name, "attn1")
        level = next((lv for prefix, lv in levels.items() if name.startswith(prefix)), None)
        if layer is not None and level is not None and \
                layer_is_selected(LayerPolicy(layers), layer, TokenGrid(0, 0, level)):
            return (f"Hypertile (UNet) splits the self-attention of {name} (its depth {depth}), which the story "
                    f"shares (layers '{layers}'); set Hypertile's max depth below {depth}, share other layers, or "
                    f"turn Hypertile off")
    return None


def split_controlnet_mark(context: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(mark, context)``: the cond/uncond marker token sd-webui-controlnet put first in ``context`` ([B, T, D];
    mark [B, 1, D]) and the context without it; ``(None, context)`` when it carries none."""
    if context.ndim == 3 and context.shape[1] % CONTEXT_TOKENS == 1 and \
            float((context[:, 0].abs() - CONTROLNET_MARK).abs().float().mean()) < 1e-3:  # read on the host: once a step
        return context[:, :1], context[:, 1:]
    return None, context


def with_controlnet_mark(mark: torch.Tensor | None, context: torch.Tensor) -> torch.Tensor:
    return context if mark is None else torch.cat([mark.to(context.device, context.dtype), context], dim=1)


def controlnet_batch_inputs(p, plan: StoryRunPlan, saved: dict) -> None:
    """sd-webui-controlnet (A1111), from each ``p.sample``: hand this batch its frames' control inputs.

    Its ``process`` builds each unit's ``ControlParams.hint_cond`` once per job: [1, C, H, W] for one image; for
    per-image inputs (``batch_images``) [N, ...], stacked twice ([inputs ; inputs], the cond then the uncond rows)
    with ``batch_cond_uncond``; row i of every batch takes input i. The ``hint_cond`` setter is its way for other
    extensions to change a hint. A unit with per-image inputs needs one per frame (story order); each batch gets its
    frames' rows (``hr_hint_cond`` too). ``saved``: id -> (param, hint, hires hint) as its ``process`` built them.
    """
    network = getattr(_alwayson(p, CONTROLNET_TITLE.__eq__), "latest_network", None)
    stacked = 2 if shared.opts.data.get("batch_cond_uncond", True) else 1
    for index, param in enumerate(getattr(network, "control_params", None) or []):
        if id(param) not in saved:
            saved[id(param)] = (param, param.hint_cond, getattr(param, "hr_hint_cond", None))
        _, hint, hr_hint = saved[id(param)]
        rows = hint.shape[0] if isinstance(hint, torch.Tensor) and hint.ndim == 4 else 1
        if rows == 1:
            continue
        if rows != stacked * plan.frame_count:
            raise ValueError(f"ControlNet unit {index + 1} (of those enabled) has {rows // stacked} control images for "
                             f"a story of {plan.frame_count} frames; give it one per frame, in story order, or one "
                             f"image for every frame")
        frames = plan.batch_frames(p.iteration)
        take = torch.tensor([copy * plan.frame_count + f for copy in range(stacked) for f in frames])
        param.hint_cond = hint[take.to(hint.device)]
        if isinstance(hr_hint, torch.Tensor) and hr_hint.ndim == 4 and hr_hint.shape[0] == rows:
            param.hr_hint_cond = hr_hint[take.to(hr_hint.device)]


def controlnet_in_use(p) -> bool:
    """A ControlNet unit is enabled for this job: sd-webui-controlnet's network of the job (its ``process`` sets
    ``latest_network``, None without units) has control params, or Forge's built-in script has units' params."""
    script = _alwayson(p, CONTROLNET_TITLE.__eq__)
    network = getattr(script, "latest_network", None)
    return bool(getattr(network, "control_params", None) or getattr(script, "current_params", None))


def forge_controlnet_inputs(p, plan: StoryRunPlan) -> None:
    """Forge's built-in ControlNet, from the first ``p.sample``: its ``process`` lays a unit's inputs on the rows of a
    batch (row i takes input i mod N) and every batch starts again at input 0, so per-image inputs cannot follow a
    story of several batches: refused. One image (every row the same) poses every frame."""
    if plan.batch_count == 1:
        return
    for index, params in sorted((getattr(_alwayson(p, CONTROLNET_TITLE.__eq__), "current_params", None) or {}).items()):
        cond = getattr(params, "control_cond", None)
        if isinstance(cond, torch.Tensor) and cond.ndim == 4 and not bool((cond == cond[:1]).all()):
            raise ValueError(f"ControlNet unit {index + 1} (of those enabled) has one control image per image of a "
                             f"batch, and Forge's ControlNet starts again at its first image in every batch; put the "
                             f"story in one batch ('Frames per batch' 0) or give the unit one image")


def restore_controlnet_inputs(saved: dict) -> None:
    """Give ControlNet's units back the hints its ``process`` built (end of the job)."""
    for param, hint, hr_hint in saved.values():
        param.hint_cond = hint
        if hr_hint is not None:
            param.hr_hint_cond = hr_hint
    saved.clear()
