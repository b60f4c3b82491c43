"""One generation of a story, host-free: which images, prompts, seeds and batches, and each frame's conditioning.

The story decides the images: one per frame, in batches of at most ``frames_per_batch`` (0 = one batch), each
batch of frames naming the same extra networks (``batches.py``). When every frame names the same networks, frame
``i`` is image ``i`` of the generation, i.e. ``iteration * batch_size + position in batch`` in both hosts; otherwise
the batches are drawn in ``StoryRunPlan.batches`` order and the host adapters put the images back in story order.
With consistent self-attention and more than one batch, the reference frames (the first batch of every network set,
or the first ``reference_frames`` frames) write the bank, in batches drawn first, and the other batches read it
(StoryDiffusion's identity frames, §3.4).

1Prompt1Story conditioning (methods.md §2.8 Steps A-C) is built from the host's own encoder: the identity prompt is
the style text (the WebUI prompt box, extra-network tags removed by the host) followed by the story's identity
prompt; every frame's context is the SVR/NPR-reweighted encoding of its consolidated prompt or window.

Consolidation needs a story of at least two frames (methods.md §2.8 assumes N >= 2: with one frame there is nothing
to consolidate or suppress); a one-frame story with *Consolidate* on is refused with a message, never silently run
as something else.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Sequence

import torch

from ..one_prompt_one_story.svr import SvrRangeError, npr_frame_context, svr_frame_context
from ..one_prompt_one_story.token_plan import CLIP_CONTEXT, TextContext, Tokenizer, TokenPlan, plan_tokens
from ..settings import Settings, SettingsError
from ..story_diffusion.consistent_self_attention import CsaSettings, LayerPolicy, Schedule
from ..story_sync.state import Phase, PrePassDone, StorySyncSettings, StorySyncState
from .batches import Batches, bank_role, default_references, drawing_order, host_slices, plan_batches
from .format import Story, parse_story

PER_IMAGE_NETWORKS = ("oneactor",)  # OneActor acts on each image's own cond rows, not on the model's weights


@dataclass(frozen=True)
class StoryRunPlan:
    """Images of one story generation (host-free facts the adapters apply to the host's processing object)."""
    story: Story
    style: str
    frame_prompts: tuple[str, ...]   # each frame's own prompt: style, characters' descriptions, frame text
    seeds: tuple[int, ...]
    batches: Batches  # story frames of each batch, in drawing order (story/batches.py)
    reference_frames: tuple[int, ...]  # frames that write the bank (empty: no bank, in-batch sharing only)

    @property
    def frame_count(self) -> int:
        return len(self.frame_prompts)

    @property
    def batch_size(self) -> int:
        """The host's ``p.batch_size``: the largest batch."""
        return max(len(batch) for batch in self.batches)

    @property
    def batch_count(self) -> int:
        return len(self.batches)

    @property
    def drawing_order(self) -> tuple[int, ...]:
        return drawing_order(self.batches)

    @property
    def in_story_order(self) -> bool:
        """The host draws the frames in story order (images, infotexts and files need no reordering)."""
        return self.drawing_order == tuple(range(self.frame_count))

    @property
    def host_slices(self) -> bool:
        """The host's own slices of ``p.all_*`` are these batches (nothing to replace per batch)."""
        return host_slices(self.batches)

    def batch_frames(self, iteration: int) -> tuple[int, ...]:
        return self.batches[iteration]

    def batch_of(self, frame: int) -> int:
        return next(i for i, batch in enumerate(self.batches) if frame in batch)

    def bank_role(self, iteration: int, references: Collection[int] | None = None) -> str:
        """"write", "read" or "off" for batch ``iteration`` with ``references`` (default: the plan's)."""
        return bank_role(self.batches, self.reference_frames if references is None else references, iteration)

    def frame_groups(self) -> dict[int, frozenset[str]]:
        return dict(enumerate(self.story.frame_groups()))


def plan_story_run(settings: Settings, style: str, seed: int) -> StoryRunPlan:
    """Expand ``settings.story`` into images. Raises StoryError / SettingsError with the line or field at fault.

    A ``style`` that is itself one of the story's expanded frame prompts is reduced to its style part (see
    ``style_of_expanded_prompt``), so replaying an image's infotext regenerates the same story.
    """
    story = parse_story(settings.story)
    if settings.consolidate and len(story.frames) < 2:
        raise SettingsError("consolidate", f"1Prompt1Story consolidation needs a story of at least 2 frames (this "
                                           f"one has {len(story.frames)}); add a frame or turn 'Consolidate' off")
    recovered = style_of_expanded_prompt(story, style)
    style = style if recovered is None else recovered
    count = len(story.frames)
    seeds = (seed,) * count if settings.seed_mode == "same" else tuple(seed + i for i in range(count))
    prompts = tuple(story.frame_prompt(i, style) for i in range(count))
    networks = [extra_networks_of(prompt, PER_IMAGE_NETWORKS) for prompt in prompts]
    references: tuple[int, ...] = ()
    if settings.csa:
        references = tuple(range(min(settings.reference_frames, count))) if settings.reference_frames else \
            default_references(networks, settings.frames_per_batch)
    batches = plan_batches(networks, settings.frames_per_batch, references)
    if bank_role(batches, references, 0) == "off":
        references = ()  # one batch, or every batch holds a reference frame: nothing reads a bank
    return StoryRunPlan(story, style, prompts, seeds, batches, references)


def storysync_references(settings: Settings, plan: StoryRunPlan) -> tuple[int, ...] | None:
    """StorySync's reference frames: its own *Reference frames* count, else the plan's bank frames; None = every
    frame may be read (methods.md §5, Eq. 13)."""
    if settings.reference_frames:
        return tuple(range(min(settings.reference_frames, plan.frame_count)))
    return plan.reference_frames or None


def csa_settings(settings: Settings) -> CsaSettings:
    """StoryDiffusion's consistent self-attention settings of a generation."""
    return CsaSettings(settings.csa_rate, settings.csa_schedule, settings.csa_layers)


def storysync_settings(settings: Settings) -> StorySyncSettings:
    """StorySync's settings of a generation (its sharing layers and schedule are the CSA ones)."""
    return StorySyncSettings(settings.mask_dropout, settings.share_dropout, settings.rfh_strength,
                             settings.rfh_dropout, (settings.rfh_start, settings.rfh_end), settings.bli_strength,
                             settings.bli_steps, settings.bli_inputs, LayerPolicy(settings.csa_layers),
                             Schedule(settings.csa_schedule))


def record_bli_window(state: StorySyncState, sample: Callable[[], object], ipca: Any = None) -> None:
    """StorySync BLI's vanilla pre-pass (paper Eq. 12; methods.md §5.1 step 4): ``sample`` runs the generation's
    own sampling once with ``state`` in ``Phase.VANILLA`` (IPCA, an ``IdentityAttentionState``, closed), which
    records the window's self-attention inputs in ``state.bli_cache`` and stops it with ``PrePassDone`` after the
    window. The host adapters wrap ``sample`` so that the host's RNG and progress stay untouched (``hosts/prepass``).
    """
    state.bli_cache.clear()
    state.phase = Phase.VANILLA
    if ipca is not None:
        ipca.closed = True
    try:
        try:
            sample()
        except PrePassDone:
            pass
    finally:
        state.phase = Phase.CONSISTENT
        if ipca is not None:
            ipca.closed = False


def style_of_expanded_prompt(story: Story, prompt: str) -> str | None:
    """The style ``prompt`` was built from when it is one of the story's own expanded frame prompts, else None.

    Happens when an image's infotext is replayed through the API: the WebUI API runs no paste callbacks, so the
    prompt field holds that frame's ``style, descriptions, frame text`` instead of the style alone.
    """
    for i in range(len(story.frames)):
        bare = story.frame_prompt(i)
        if prompt == bare:
            return ""
        if prompt.endswith(", " + bare) and story.frame_prompt(i, prompt[:-len(bare) - 2]) == prompt:
            return prompt[:-len(bare) - 2]
    return None


def consolidation_identity(style: str, story: Story) -> str:
    """The 1P1S identity prompt P0: the style text then the story's identity prompt."""
    return ", ".join(part for part in (" ".join(style.split()), story.identity_prompt) if part)


EXTRA_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")  # the hosts' own pattern (modules/extra_networks.py)


def without_extra_networks(text: str) -> str:
    """``text`` without ``<lora:…>``, ``<oneactor:…>`` and other extra-network tags, spaces collapsed: the host
    activates those per image from the frame prompts; they are not words of the consolidated prompt."""
    return " ".join(EXTRA_NETWORK_TAG.sub("", text).split())


def extra_networks_of(prompt: str, per_image: Collection[str] = ()) -> tuple[str, ...]:
    """The extra networks ``prompt`` names, as the host parses them: ``<kind:args>`` tags, sorted, repeats kept;
    kinds in ``per_image`` (networks that act per image, not on the model's weights) left out."""
    return tuple(sorted(f"<{m[1]}:{m[2]}>" for m in EXTRA_NETWORK_TAG.finditer(prompt) if m[1] not in per_image))


def frame_label(story: Story, frame: int) -> str:
    """How messages name a frame: its number, and its story line (text form) or field (JSON form)."""
    line = story.frames[frame].line
    return f"frame {frame + 1} (story {'line ' + str(line) if line is not None else f'field frames[{frame}]'})"


def check_batch_networks(story: Story, prompts: Sequence[str], batches: Sequence[Sequence[int]],
                         per_image: Collection[str] = ()) -> None:
    """Refuse a batch whose frames name different extra networks (LoRA, hypernetworks…).

    Host contract (A1111 1.10 / Forge ``extra_networks.parse_prompts``): the networks of a batch's *first* prompt
    are activated for the whole batch (they change the model's weights), so another frame of that batch would
    silently be drawn with the first frame's networks. ``prompts``: every frame's prompt as the host holds it
    (``p.all_prompts``: styles applied); ``batches``: the frames of each batch.
    """
    for frames in batches:
        first, *rest = frames
        wanted = extra_networks_of(prompts[first], per_image)
        for frame in rest:
            named = extra_networks_of(prompts[frame], per_image)
            if named != wanted:
                raise ValueError(
                    f"{frame_label(story, first)} and {frame_label(story, frame)} are drawn in one batch but name "
                    f"different extra networks ({' '.join(wanted) or 'none'}; {' '.join(named) or 'none'}). The WebUI "
                    f"applies one set of networks to a whole batch, so the second would get the first's. Something "
                    f"changed the frames' prompts after the story planned its batches; turn it off for story runs")


def plan_consolidation(settings: Settings, story: Story, style: str, tokenize: Tokenizer,
                       context: TextContext = CLIP_CONTEXT) -> TokenPlan:
    """Token plan of the consolidated prompt(s), every piece without extra-network tags."""
    identity = without_extra_networks(consolidation_identity(style, story))
    return plan_tokens(identity, [without_extra_networks(f.prompt) for f in story.frames], tokenize,
                       window=settings.window, context=context)


Encode = Callable[[Sequence[str]], Sequence[torch.Tensor]]  # texts -> one [T, D] context per text


@dataclass
class FrameConditioning:
    """Per-frame 1P1S contexts of one generation, built lazily per frame and cached (text encodings too).

    ``encode`` is the host's own text-encoder path (CLIP skip, emphasis, embeddings and LoRA text-encoder weights
    apply); it must return one context per text: CLIP's 77 tokens, or T5's end token and the host's padding
    after the plan's tokens (Flux; the same length for every text). The cached encodings are never modified (every frame
    is reweighted from the pristine encoding). ``unet_dtype``: the dtype the UNet computes in; a reweighted context
    must be finite in it as well as in the encoder's dtype, or the frame is refused with a message.
    """
    settings: Settings
    token_plan: TokenPlan
    encode: Encode
    unet_dtype: torch.dtype | None = None
    _encoded: dict[str, torch.Tensor] = field(default_factory=dict)
    _frames: dict[int, torch.Tensor] = field(default_factory=dict)

    def identity_positions(self) -> tuple[int, ...]:
        """SOT + identity tokens; the same for every frame (the identity prompt always comes first)."""
        return self.token_plan.frames[0].identity_positions

    def contexts(self, frames: Sequence[int]) -> list[torch.Tensor]:
        """[T, D] context of each frame (SVR'd, NPR'd or plain as the settings say)."""
        missing = [self.token_plan.frames[f].text for f in frames if f not in self._frames]
        texts = [t for t in dict.fromkeys(missing) if t not in self._encoded]
        if texts:
            for text, context in zip(texts, self.encode(texts)):
                rows = self.token_plan.context.rows
                if context.ndim != 2 or (context.shape[0] != rows if rows else
                                         context.shape[0] <= max(p.eot_start for p in self.token_plan.frames)):
                    expected = f"one {rows}-token CLIP context" if rows else \
                        f"a {self.token_plan.context.name} context with its end token"
                    raise RuntimeError(f"the host encoded the consolidated prompt into {tuple(context.shape)}; "
                                       f"expected {expected}")
                if not torch.isfinite(context).all():
                    raise RuntimeError(f"the checkpoint's text encoder returned NaN/inf for the consolidated prompt "
                                       f"{text!r}; try another checkpoint or rephrase the story")
                self._encoded[text] = context
        for f in frames:
            if f not in self._frames:
                frame_plan = self.token_plan.frames[f]
                self._frames[f] = self._reweight(self._encoded[frame_plan.text], frame_plan)
        return [self._frames[f] for f in frames]

    def _reweight(self, context: torch.Tensor, frame_plan) -> torch.Tensor:
        s = self.settings
        if s.reweighting == "svr":
            try:
                return svr_frame_context(context, frame_plan, enhance_alpha=s.svr_enhance_alpha,
                                         enhance_beta=s.svr_enhance_beta, suppress_alpha=s.svr_suppress_alpha,
                                         suppress_beta=s.svr_suppress_beta, eot_mode=s.eot_mode,
                                         limit=self.unet_dtype)
            except SvrRangeError as error:
                raise RuntimeError(f"story {error}") from None
        if s.reweighting == "npr":
            out = npr_frame_context(context, frame_plan, enhance=s.npr_enhance, suppress=s.npr_suppress)
            limit = min((torch.finfo(d).max for d in (out.dtype, self.unet_dtype) if d is not None))
            if not out.abs().max() <= limit:
                raise RuntimeError(f"story frame {frame_plan.frame + 1}: NPR's x{s.npr_enhance:g} takes the "
                                   f"conditioning beyond the UNet's range ({limit:.6g}); lower 'NPR enhance'")
            return out
        return context
