"""``python -m lib_consistency.bench --only presets [--arch sd15|sdxl]``: every preset over one whole generation.

What is timed: a whole story generation on a randomly initialised diffusers ``UNet2DConditionModel`` with the real
SD1.5 (512²) or SDXL (1024²) configuration (``oneactor.UNET_CONFIGS``): ``frames`` frames in one batch, CFG (one
UNet call of 2B rows per step: the B cond rows, then the B uncond rows, as A1111 batches them), ``steps`` Euler
steps (ε-prediction, k-diffusion form ``x += (σ_next − σ)·ε̂``) over a fixed schedule (SD's scaled-linear betas,
timesteps evenly spaced from 999 to 0, σ = 0 at the end), every frame from the same noise (seed mode "same").
The same loop runs every row; only the method differs, each built from ``Settings().with_preset(name)`` with the
functions the hosts use (``story/run.py``: the run plan, 1P1S conditioning, CSA and StorySync settings, the BLI
pre-pass; ``story_sync/subject_tokens.py``: subject columns) and brought to the UNet through the module hooks of
``surfaces/attention_modules.py`` (context keyword ``encoder_hidden_states``; ldm addresses from the diffusers
names, ``storysync_unet.ldm_address``). The loop tells every state its rows and latent per UNet call and its step
per denoiser call, as the A1111 adapter does (``hosts/a1111.py``, ``hosts/pipeline.py``):

- vanilla: no hook; each frame's own (random) context.
- 1Prompt1Story: consolidation + SVR on the text embeddings before sampling (``FrameConditioning``: the
  consolidated prompt's embedding, reweighted per frame; included in the time), IPCA hooks on every attn2.
- StoryDiffusion: CSA hooks on attn1 (preset: rate 0.5, the official schedule, layers ``up_low_res``).
- StorySync: subject-map hooks on attn2 and masked sharing + RFH hooks on attn1 (preset: mask dropout 0.5, every
  up block, RFH γ 0.3 in [0.1, 0.33) of the steps, reference frames 0 and 1 read by the others in the same batch),
  after BLI's vanilla pre-pass over the first ``bli_steps`` of the steps (``record_bli_window``: the same loop in
  ``Phase.VANILLA`` until ``PrePassDone``), included in the time and FLOPs and also printed on its own.
- StorySync, BLI lock-step (issue 23 part 4; methods.md §5.1 step 4 way (b)): the same, with no pre-pass: inside
  the window each call also holds the vanilla trajectory's 2B rows (plain CFG from the same noise, stepped by the
  same loop) as twins of the story's rows (``RowLayout.twins``), whose self-attention inputs BLI reads live.
- Combined: IPCA then CSA (rate 0.5, official schedule).
- OneActor (at batch 1, its own vanilla; also at ``frames`` images where asked): η2 = 0 ("fast" preset) puts
  ``v·Δ_tar`` on the cond context's base-word row inside the window, plain CFG; η2 > 0 ("paper": η2 1, η1 8.5)
  adds the ``c + Δ_avg`` rows inside the window and combines with ``guidance.cluster_guidance``, in two forms:
  "folded" (one call of 3B rows, what the WebUIs do) and "two calls" (a second UNet call of B rows after the
  2B-row CFG call: the WebUIs' fallback where folding is refused).

Text encoding is left out (every text's embedding is a seeded random (77, D) tensor); the token plans come from a
word-level stand-in tokenizer. Figures per row: seconds per image (median over ``repeats`` whole generations, the
rows timed round-robin so drift hits all of them; synchronised on CUDA), peak memory (CUDA
``max_memory_allocated`` over one generation, weights included, reset per row; CPU: the UNet's weights plus the
peak bytes of tensors allocated by aten ops during the generation, the dispatch ledger of ``csa.py``, not RSS), and
FLOPs (``torch.utils.flop_counter.FlopCounterMode`` over one whole generation: matrix products, convolutions,
attention), each as a ratio to the vanilla row of the same batch measured in the same run. For the issue's part 4
it also times one plain UNet call of 2B and of 4B rows with its peak memory (``presets_report.py``);
``--profile`` adds where each row's time goes (``profile.py``). diffusers is imported when run only.
"""
from __future__ import annotations

import math
import re
import statistics
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..common.addresses import StepKey
from ..common.row_layout import Role, RowLayout, twinned_layout
from ..one_prompt_one_story.ipca import IdentityAttentionState
from ..oneactor.guidance import cluster_guidance
from ..oneactor.inference import CharacterUse, OneActorBatch
from ..settings import Settings
from ..story.run import (FrameConditioning, csa_settings, plan_consolidation, plan_story_run, record_bli_window,
                         storysync_references, storysync_settings)
from ..story_diffusion.reference_bank import ReferenceBank
from ..story_diffusion.state import BankMode, ConsistencyState
from ..story_sync.state import StorySyncState
from ..story_sync.subject_tokens import frame_prompt_pieces, story_subjects, subject_positions
from ..surfaces.attention_modules import install_csa_hooks, install_identity_hooks, install_storysync_hooks
from ..surfaces.instance_hooks import remove_hooks
from ..surfaces.reach import Reach
from .oneactor import BASE_TOKEN
from .presets_inputs import Inputs, device_line, make_inputs, measure, synchronise
from .presets_report import lockstep_calls, print_table
from .profile import PREPASS, print_profiles, profile_generation

IDENTITY = "a photo of a small red fox with a blue scarf | fox"
FRAME_LINES = ("sitting in the snow", "running through a forest", "sleeping under an old tree",
               "watching the stars at night", "drinking from a river", "standing on a hill")
STORY_PRESETS = ("1Prompt1Story", "StoryDiffusion", "StorySync", "Combined")
LOCKSTEP = "StorySync, BLI lock-step"  # the StorySync preset, BLI's vanilla rows in its batch (no pre-pass)
ONEACTOR_ROWS = (("OneActor η2 = 0", "fast", False), ("OneActor η2 > 0, two calls", "paper", False),
                 ("OneActor η2 > 0, folded", "paper", True))
CFG_SCALE = 7.0  # the host's CFG scale (η1 unless the OneActor preset sets its own)
KEYWORD = "encoder_hidden_states"


def word_tokens(text: str) -> list[int]:
    """A word-level stand-in for the host tokenizer: one id per word or punctuation mark (no SOT/EOT)."""
    return [zlib.crc32(word.encode()) % 49406 for word in re.findall(r"[^\W_]+|[^\w\s]", text.lower())]


def story_text(frames: int) -> str:
    if not 2 <= frames <= len(FRAME_LINES):
        raise ValueError(f"presets bench frames: expected 2 to {len(FRAME_LINES)}, got {frames}")
    return "\n".join((IDENTITY,) + FRAME_LINES[:frames])


@dataclass
class Method:
    """One row's method, built fresh per generation (its states hold caches)."""
    frames: int
    conditioning: Callable[[], torch.Tensor]  # -> (B, TOKENS, D) cond contexts, before sampling
    states: list = field(default_factory=list)  # ConsistencyState / StorySyncState: told rows and steps
    ipca: IdentityAttentionState | None = None
    storysync: StorySyncState | None = None  # runs BLI's pre-pass first
    oneactor: OneActorBatch | None = None
    eta1: float = CFG_SCALE
    folded: bool = False
    lockstep: bool = False  # BLI's vanilla trajectory as twin rows of the story's calls in the window

    def install(self, inputs: Inputs, reach: Reach) -> list:
        """Hooks in the A1111 adapter's order (IPCA first); ``reach`` wants each hook's surfaces on its layer."""
        hooks = []
        try:
            if self.ipca is not None:
                hooks += install_identity_hooks(inputs.attn2, self.ipca, KEYWORD, reach)
            for state in self.states:
                if isinstance(state, StorySyncState):
                    hooks += install_storysync_hooks(inputs.attn1, inputs.attn2, state, KEYWORD, reach)
                else:
                    hooks += install_csa_hooks(inputs.attn1, state, KEYWORD, reach)
        except Exception:
            remove_hooks(hooks)
            raise
        for hook in hooks:
            for surface in hook.surfaces:
                reach.want(surface, [hook.layer])
        return hooks


def build_method(name: str, inputs: Inputs, frames: int) -> Method:
    """The row ``name`` as the hosts build it from the preset's settings (``hosts/pipeline.install``,
    ``hosts/storysync.storysync_state``, ``hosts/oneactor/generation``)."""
    story_settings = Settings(story=story_text(max(frames, 2)))  # batch 1 (OneActor): the story's first frame
    plan = plan_story_run(story_settings, "", 1)
    batch = plan.batch_frames(0)[:frames]

    def plain() -> torch.Tensor:
        return torch.stack(inputs.encode([plan.frame_prompts[f] for f in batch]))

    if name == "vanilla":
        return Method(frames, plain)
    if name == LOCKSTEP:
        method = build_method("StorySync", inputs, frames)
        method.lockstep = method.storysync is not None
        return method
    oneactor = {row: (preset, folded) for row, preset, folded in ONEACTOR_ROWS}
    if name in oneactor:
        preset, folded = oneactor[name]
        s = Settings().with_value("oneactor_preset", preset)
        generator = torch.Generator().manual_seed(3)
        width = inputs.config["cross_attention_dim"]
        use = CharacterUse("fox", torch.randn(width, generator=generator), torch.randn(width, generator=generator),
                           s.oneactor_v, (BASE_TOKEN,))
        return Method(frames, plain, oneactor=OneActorBatch(((use,),) * frames, s.oneactor_eta2, s.oneactor_window),
                      eta1=s.oneactor_cfg or CFG_SCALE, folded=folded)
    s = story_settings.with_preset(name)
    plan = plan_story_run(s, "", 1)
    method = Method(frames, plain)
    if s.consolidate:
        conditioning = FrameConditioning(s, plan_consolidation(s, plan.story, plan.style, word_tokens),
                                         inputs.encode, inputs.dtype)
        method.conditioning = lambda: torch.stack(conditioning.contexts(batch))
        if s.ipca:
            method.ipca = IdentityAttentionState(conditioning.identity_positions(), s.ipca_dropout, plan.seeds[0])
    if s.masked_sharing:
        subjects, groups = story_subjects(plan.story), plan.frame_groups()
        columns = {}
        for f in groups:
            found = subject_positions(frame_prompt_pieces(plan.story, f, plan.style), word_tokens, subjects)
            columns[f] = {c: found[c] for c in sorted(groups[f]) if c in found}
        state = StorySyncState(storysync_settings(s), plan.seeds[0], groups, columns, storysync_references(s, plan),
                               ReferenceBank(offload_to_cpu=s.bank_on_cpu),
                               ReferenceBank(offload_to_cpu=s.bli_cache_on_cpu))
        state.bank_mode = BankMode(plan.bank_role(0, state.reference_frames or ()))
        method.states.append(state)
        method.storysync = state if state.settings.bli_strength > 0 and state.settings.bli_window > 0 else None
    elif s.csa:
        csa = ConsistencyState(csa_settings(s), plan.seeds[0], plan.frame_groups(),
                               reference_frames=plan.reference_frames, bank=ReferenceBank(offload_to_cpu=s.bank_on_cpu))
        if plan.reference_frames:
            csa.bank_mode = BankMode(plan.bank_role(0))
        method.states.append(csa)
    return method


def sample(inputs: Inputs, method: Method, cond: torch.Tensor, reach: Reach) -> torch.Tensor:
    """The Euler loop over every step; returns the final latents (B, C, side, side). With ``method.lockstep`` the
    vanilla trajectory (the pre-pass's loop: plain CFG from the same noise) rides as twin rows in the window."""
    frames, steps, sigmas = method.frames, inputs.steps, inputs.sigmas
    uncond = inputs.uncond.expand(frames, -1, -1)
    x = inputs.noise.expand(frames, -1, -1, -1) * sigmas[0]
    cfg_layout = RowLayout(tuple(range(frames)) * 2, (Role.COND,) * frames + (Role.UNCOND,) * frames)
    oneactor = method.oneactor
    if method.lockstep and oneactor is not None:
        raise ValueError("presets bench: BLI lock-step is for the StorySync row only")
    twin = x if method.lockstep else None  # the vanilla trajectory's latents while in the BLI window
    for step in range(steps):
        sigma = sigmas[step]
        for state in method.states:  # the denoiser call's step (on_cfg_denoiser)
            state.begin_step(0, step, steps, sigma)
        if method.ipca is not None:
            method.ipca.step = StepKey(0, step, sigma)
        target, average = cond, None
        if oneactor is not None and oneactor.active(step, steps):
            target = oneactor.target_context(cond)
            average = oneactor.average_context(cond) if oneactor.needs_average else None
        x_in = x / math.sqrt(sigma ** 2 + 1)
        rows = [x_in, x_in] + ([x_in] if average is not None and method.folded else [])
        contexts = [target, uncond] + ([average] if average is not None and method.folded else [])
        layout = cfg_layout if len(rows) == 2 else RowLayout(tuple(range(frames)) * 3, (Role.COND,) * frames
                                                              + (Role.UNCOND,) * frames + (Role.COND,) * frames)
        if twin is not None and not method.storysync.in_bli_window():
            twin = None  # past the window: the story's rows alone, as after a pre-pass
        if twin is not None:  # the WebUIs' order (``twinned_layout``): each branch's story rows, then their twins
            twin_in = twin / math.sqrt(sigma ** 2 + 1)
            rows, contexts = [x_in, twin_in, x_in, twin_in], [target, cond, uncond, uncond]
            layout = twinned_layout((Role.COND, Role.UNCOND), range(frames))
        for state in method.states:  # the UNet call's rows (the row cursor's forward pre-hook)
            state.begin_unet_call(layout, (inputs.side, inputs.side))
        if method.ipca is not None:
            method.ipca.layout = layout
        reach.begin()
        out = inputs.unet_call(torch.cat(rows), step, torch.cat(contexts)).float()
        missing = reach.missing()
        if missing:
            raise RuntimeError(f"presets bench step {step}: the hooks missed {missing}")
        if twin is not None:
            vanilla = cluster_guidance(out[3 * frames:], out[frames:2 * frames], None, method.eta1, 0.0)
            twin = (twin.float() + (sigmas[step + 1] - sigma) * vanilla).to(inputs.dtype)
            out = torch.cat([out[:frames], out[2 * frames:3 * frames]])
        eps_cond, eps_uncond = out[:frames], out[frames:2 * frames]
        eps_average = out[2 * frames:] if len(rows) == 3 else None
        if average is not None and not method.folded:  # the hosts' fallback second call: B more cond rows
            eps_average = inputs.unet_call(x_in, step, average).float()
        guided = cluster_guidance(eps_uncond, eps_cond, eps_average, method.eta1,
                                  oneactor.eta2 if eps_average is not None else 0.0)
        x = (x.float() + (sigmas[step + 1] - sigma) * guided).to(inputs.dtype)
    return x


def generate(inputs: Inputs, name: str, frames: int, prepass_done: Callable[[], None] = lambda: None
             ) -> tuple[torch.Tensor, float, float]:
    """One whole generation of row ``name``: (latents, seconds, seconds of BLI's pre-pass)."""
    synchronise(inputs.device)
    began = time.perf_counter()
    method = build_method(name, inputs, frames)
    reach = Reach()
    hooks = method.install(inputs, reach)
    try:
        cond = method.conditioning()
        prepass = 0.0
        if method.storysync is not None and not method.lockstep:
            with torch.profiler.record_function(PREPASS):  # a label for ``--profile`` (profile.py)
                record_bli_window(method.storysync, lambda: sample(inputs, method, cond, reach), method.ipca)
            synchronise(inputs.device)
            prepass = time.perf_counter() - began
            prepass_done()
        x = sample(inputs, method, cond, reach)
    finally:
        remove_hooks(hooks)
        for state in method.states:
            state.close()
    synchronise(inputs.device)
    return x, time.perf_counter() - began, prepass


def run(arch: str, device: torch.device | str, dtype: torch.dtype, frames: int = 4, steps: int = 30,
        repeats: int = 3, latent_side: int | None = None, oneactor_batches: Sequence[int] = (1,), *,
        unet_config: dict | None = None, profile: bool = False, print_fn: Callable[[str], None] = print) -> dict:
    """Print and return the presets table: ``{(row, batch): {...}}`` figures (seconds, peak, flops, their ratios
    to the batch's vanilla, ``change``: max |latents − vanilla's| / max |vanilla's|), StorySync's pre-pass split under
    ``("StorySync", frames)``, the part-4 call figures under ``"lockstep"`` with ``latents_difference`` (the
    lock-step row's latents against the pre-pass row's, relative); with ``profile`` one more generation per row
    under the profiler (``profile.py``), printed after the table and returned under ``"profile"``."""
    device = torch.device(device)
    inputs = make_inputs(arch, device, dtype, steps, latent_side, unet_config)
    story = [(name, frames) for name in STORY_PRESETS]
    rows = [("vanilla", frames)] + story[:3] + [(LOCKSTEP, frames)] + story[3:]
    for batch in oneactor_batches:
        rows += ([("vanilla", batch)] if batch != frames else []) + [(name, batch) for name, _, _ in ONEACTOR_ROWS]
    figures: dict = {}
    with torch.no_grad():
        for name, batch in rows:
            marks: list[int] = []
            latents = None

            def counted(counter) -> None:
                nonlocal latents
                done = (lambda: marks.append(counter.get_total_flops())) if counter is not None else lambda: None
                latents = generate(inputs, name, batch, done)[0]

            peak, flops = measure(counted, inputs)
            figures[name, batch] = {"peak": peak, "flops": flops, "latents": latents,
                                    "prepass_flops": marks[-1] if marks else 0, "seconds": [], "prepass": []}
        for _ in range(repeats):  # round-robin: drift and other load hit every row alike
            for name, batch in rows:
                _, seconds, prepass = generate(inputs, name, batch)
                figures[name, batch]["seconds"].append(seconds)
                figures[name, batch]["prepass"].append(prepass)
        lockstep = lockstep_calls(inputs, frames, repeats)
    for row in figures.values():
        row["seconds"], row["prepass"] = statistics.median(row["seconds"]), statistics.median(row["prepass"])
    for (name, batch), row in figures.items():
        base = figures["vanilla", batch]
        row["time_ratio"] = row["seconds"] / base["seconds"]
        row["memory_ratio"] = row["peak"] / base["peak"]
        row["flops_ratio"] = row["flops"] / base["flops"]
    references = {batch: figures["vanilla", batch]["latents"].float() for name, batch in rows}
    prepass = figures["StorySync", frames]["latents"].float()
    lockstep["latents_difference"] = float((figures[LOCKSTEP, frames]["latents"].float() - prepass).abs().max()
                                           / prepass.abs().max())
    for (name, batch), row in figures.items():
        reference = references[batch]
        row["change"] = float((row.pop("latents").float() - reference).abs().max() / reference.abs().max())
    figures["lockstep"] = lockstep
    print_table(figures, rows, inputs, arch, frames, repeats, device_line(device, dtype), LOCKSTEP,
                print_fn)
    if profile:
        with torch.no_grad():
            first, batch = rows[0]  # a discarded warm-up: the profiler's first run is slower
            profile_generation(inputs, lambda: generate(inputs, first, batch))
            figures["profile"] = {(name, batch): profile_generation(inputs, lambda: generate(inputs, name, batch))
                                  for name, batch in rows}
        print_profiles(figures["profile"], print_fn)
    return figures
