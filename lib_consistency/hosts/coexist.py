"""What a story run meets beside it in the WebUI: prompt styles, extra networks, prompt-rewriting extensions
(issue 11; hosts.md §13). A1111 1.10 and Forge alike.

- Dynamic Prompts (sd-dynamic-prompts) rewrites ``p.all_prompts`` in its ``process`` hook from the *first*
  prompt (every frame would become a variant of frame 1) and ``p.all_seeds`` from ``int(p.seed)``. A story's
  frames are written out one by one, so a story run is not expanded: its ``enabled`` argument is switched off for
  this job only (``before_process`` runs before any script's ``process``, which reads ``p.script_args`` then),
  and a frame that uses its syntax is refused, never drawn with the braces as words.
- Any other extension that changes the frames' prompts, seeds or batches after ``before_process`` is caught at
  the first ``p.sample`` (the host's ``setup_prompts`` and every ``process`` hook have run by then).
- Extra networks (LoRA…) activate per batch from the batch's first prompt; see ``check_batch_networks``.
- Hypertile (A1111's built-in ``extensions-builtin/hypertile``) wraps attn1 ``forward``s once and for good and
  turns each on per job (``process``; again in ``before_hr``) for the layers of depth <= its max depth; a tiled
  layer cannot take a story's extended keys, any other layer composes (our hook calls its wrapper).
"""
from __future__ import annotations

import re
from typing import Sequence

from modules import shared

from ..attention_hooks import ldm_layer_address
from ..consistent_self_attention import LayerPolicy, layer_is_selected
from ..row_layout import TokenGrid
from ..story_run import StoryRunPlan, check_batch_networks, extra_networks_of, frame_label

PER_IMAGE_NETWORKS = ("oneactor",)  # OneActor acts on each image's own cond rows, not on the model's weights
DYNAMIC_PROMPTS_TITLE = "Dynamic Prompts"
HYPERTILE_PARAMS = "__webui_hypertile_params"  # Hypertile's per-layer settings, on each attn1 it wraps


def _dynamic_prompts(p):
    """Dynamic Prompts' script when it is installed and enabled for this job, else None."""
    runner = getattr(p, "scripts", None)
    args = getattr(p, "script_args", None)
    for script in getattr(runner, "alwayson_scripts", []) if args is not None else []:
        try:
            title = script.title()
        except Exception:
            continue
        if isinstance(title, str) and title.startswith(DYNAMIC_PROMPTS_TITLE) and script.args_from < len(args):
            return script if args[script.args_from] else None
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
    changed = [name for name, now, wanted in (
        ("prompts", list(all_prompts), expected),
        ("hires prompts", list(getattr(p, "all_hr_prompts", None) or expected) if getattr(p, "enable_hr", False)
         else expected, expected),
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
