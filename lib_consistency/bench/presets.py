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
it also times one plain UNet call of 2B and of 4B rows with its peak memory: what running BLI's vanilla rows in the
same batch as the story rows (lock-step) would cost instead of the pre-pass. diffusers is imported when run only.
"""
from __future__ import annotations

import math
import platform
import re
import statistics
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..common.addresses import StepKey
from ..common.row_layout import Role, RowLayout
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
from .csa import _StorageLedger
from .oneactor import BASE_TOKEN, TOKENS, added_conditioning, random_unet
from .storysync_unet import attention_layers

IDENTITY = "a photo of a small red fox with a blue scarf | fox"
FRAME_LINES = ("sitting in the snow", "running through a forest", "sleeping under an old tree",
               "watching the stars at night", "drinking from a river", "standing on a hill")
STORY_PRESETS = ("1Prompt1Story", "StoryDiffusion", "StorySync", "Combined")
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
class Inputs:
    """What every row of one batch size shares: the UNet, its layers, the schedule, the noise and the text."""
    unet: torch.nn.Module
    config: dict
    side: int
    device: torch.device
    dtype: torch.dtype
    steps: int
    attn1: list
    attn2: list
    timesteps: list[int]
    sigmas: list[float]
    noise: torch.Tensor  # (1, C, side, side): every frame starts from it
    uncond: torch.Tensor  # (TOKENS, D)
    added: dict | None  # SDXL micro-conditioning of one row

    def encode(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """The host text encoder's stand-in: a seeded random (TOKENS, D) embedding per text."""
        out = []
        for text in texts:
            generator = torch.Generator().manual_seed(zlib.crc32(text.encode()))
            out.append(torch.randn(TOKENS, self.config["cross_attention_dim"], generator=generator)
                       .to(self.device, self.dtype))
        return out

    def unet_call(self, x: torch.Tensor, step: int, context: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        t = torch.full((rows,), self.timesteps[step], device=self.device)
        kwargs = {} if self.added is None else \
            {"added_cond_kwargs": {k: v.expand(rows, *v.shape[1:]) for k, v in self.added.items()}}
        return self.unet(x, t, encoder_hidden_states=context, **kwargs).sample


def schedule(steps: int) -> tuple[list[int], list[float]]:
    """Timesteps evenly spaced 999 -> 0 and their σ of SD's scaled-linear schedule, σ = 0 appended."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0)
    timesteps = [round(float(t)) for t in torch.linspace(999, 0, steps, dtype=torch.float64)]
    return timesteps, [float(((1 - alphas[t]) / alphas[t]) ** 0.5) for t in timesteps] + [0.0]


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
    """The Euler loop over every step; returns the final latents (B, C, side, side)."""
    frames, steps, sigmas = method.frames, inputs.steps, inputs.sigmas
    uncond = inputs.uncond.expand(frames, -1, -1)
    x = inputs.noise.expand(frames, -1, -1, -1) * sigmas[0]
    cfg_layout = RowLayout(tuple(range(frames)) * 2, (Role.COND,) * frames + (Role.UNCOND,) * frames)
    oneactor = method.oneactor
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
        for state in method.states:  # the UNet call's rows (the row cursor's forward pre-hook)
            state.begin_unet_call(layout, (inputs.side, inputs.side))
        if method.ipca is not None:
            method.ipca.layout = layout
        reach.begin()
        out = inputs.unet_call(torch.cat(rows), step, torch.cat(contexts)).float()
        missing = reach.missing()
        if missing:
            raise RuntimeError(f"presets bench step {step}: the hooks missed {missing}")
        eps_cond, eps_uncond = out[:frames], out[frames:2 * frames]
        eps_average = out[2 * frames:] if len(rows) == 3 else None
        if average is not None and not method.folded:  # the hosts' fallback second call: B more cond rows
            eps_average = inputs.unet_call(x_in, step, average).float()
        guided = cluster_guidance(eps_uncond, eps_cond, eps_average, method.eta1,
                                  oneactor.eta2 if eps_average is not None else 0.0)
        x = (x.float() + (sigmas[step + 1] - sigma) * guided).to(inputs.dtype)
    return x


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(inputs: Inputs, name: str, frames: int, prepass_done: Callable[[], None] = lambda: None
             ) -> tuple[torch.Tensor, float, float]:
    """One whole generation of row ``name``: (latents, seconds, seconds of BLI's pre-pass)."""
    _synchronise(inputs.device)
    began = time.perf_counter()
    method = build_method(name, inputs, frames)
    reach = Reach()
    hooks = method.install(inputs, reach)
    try:
        cond = method.conditioning()
        prepass = 0.0
        if method.storysync is not None:
            record_bli_window(method.storysync, lambda: sample(inputs, method, cond, reach), method.ipca)
            _synchronise(inputs.device)
            prepass = time.perf_counter() - began
            prepass_done()
        x = sample(inputs, method, cond, reach)
    finally:
        remove_hooks(hooks)
        for state in method.states:
            state.close()
    _synchronise(inputs.device)
    return x, time.perf_counter() - began, prepass


def weights_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def measure(call: Callable[[object], object], inputs: Inputs) -> tuple[int, int]:
    """(peak bytes, FLOPs) of ``call(counter)`` (``counter``: the ``FlopCounterMode`` counting it, or None): CUDA
    ``max_memory_allocated`` of an uncounted run, then FLOPs in another; CPU the weights plus the dispatch ledger's
    peak, in the counted run."""
    from torch.utils.flop_counter import FlopCounterMode

    device = inputs.device
    if device.type == "cuda":
        _synchronise(device)
        torch.cuda.reset_peak_memory_stats(device)
        call(None)
        _synchronise(device)
        peak = torch.cuda.max_memory_allocated(device)
        with FlopCounterMode(display=False) as counter:
            call(counter)
        return peak, counter.get_total_flops()
    with FlopCounterMode(display=False) as counter, _StorageLedger() as ledger:
        call(counter)
    return weights_bytes(inputs.unet) + ledger.peak, counter.get_total_flops()


def make_inputs(arch: str, device: torch.device, dtype: torch.dtype, steps: int, latent_side: int | None,
                unet_config: dict | None) -> Inputs:
    unet, config, side = random_unet(arch, device, dtype, latent_side, unet_config)
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(1, config["in_channels"], side, side, generator=generator).to(device, dtype)
    uncond = torch.randn(TOKENS, config["cross_attention_dim"], generator=generator).to(device, dtype)
    added = added_conditioning(config, 1, float(side * 8), generator, device, dtype)
    timesteps, sigmas = schedule(steps)
    layers = config["layers_per_block"]
    return Inputs(unet, config, side, device, dtype, steps, attention_layers(unet, "attn1", layers),
                  attention_layers(unet, "attn2", layers), timesteps, sigmas, noise, uncond, added)


def device_line(device: torch.device, dtype: torch.dtype) -> str:
    """The device in words: the GPU's name, or the CPU's model and torch's threads; then the dtype."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        model = platform.processor() or "CPU"
        if platform.system() == "Linux":
            with open("/proc/cpuinfo") as cpuinfo:
                model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                             model)
        where = f"{model}, {torch.get_num_threads()} threads"
    return f"{device} ({where}), {str(dtype).removeprefix('torch.')}"


def run(arch: str, device: torch.device | str, dtype: torch.dtype, frames: int = 4, steps: int = 30,
        repeats: int = 3, latent_side: int | None = None, oneactor_batches: Sequence[int] = (1,), *,
        unet_config: dict | None = None, print_fn: Callable[[str], None] = print) -> dict:
    """Print and return the presets table: ``{(row, batch): {...}}`` figures (seconds, peak, flops, their ratios
    to the batch's vanilla, ``change``: max |latents − vanilla's| / max |vanilla's|), StorySync's pre-pass split under
    ``("StorySync", frames)`` and the part-4 call figures under ``"lockstep"``."""
    device = torch.device(device)
    inputs = make_inputs(arch, device, dtype, steps, latent_side, unet_config)
    rows = [("vanilla", frames)] + [(name, frames) for name in STORY_PRESETS]
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
        lockstep = _lockstep(inputs, frames, repeats)
    for row in figures.values():
        row["seconds"], row["prepass"] = statistics.median(row["seconds"]), statistics.median(row["prepass"])
    for (name, batch), row in figures.items():
        base = figures["vanilla", batch]
        row["time_ratio"] = row["seconds"] / base["seconds"]
        row["memory_ratio"] = row["peak"] / base["peak"]
        row["flops_ratio"] = row["flops"] / base["flops"]
    references = {batch: figures["vanilla", batch]["latents"].float() for name, batch in rows}
    for (name, batch), row in figures.items():
        reference = references[batch]
        row["change"] = float((row.pop("latents").float() - reference).abs().max() / reference.abs().max())
    figures["lockstep"] = lockstep
    _print(figures, rows, inputs, arch, frames, repeats, print_fn)
    return figures


def _lockstep(inputs: Inputs, frames: int, repeats: int) -> dict[str, float]:
    """One plain UNet call of 2B rows and of 4B rows: seconds (median) and peak memory."""
    from .oneactor import median_seconds

    out = {}
    for rows in (2 * frames, 4 * frames):
        x = inputs.noise.expand(rows, -1, -1, -1)
        context = inputs.uncond.expand(rows, -1, -1)

        def call() -> torch.Tensor:
            return inputs.unet_call(x, inputs.steps // 2, context)

        out[f"seconds_{rows}"] = median_seconds(call, inputs.device, repeats)
        out[f"peak_{rows}"] = measure(lambda counter: call(), inputs)[0]
    return out


def _print(figures: dict, rows: list, inputs: Inputs, arch: str, frames: int, repeats: int,
           print_fn: Callable[[str], None]) -> None:
    gib = 2 ** 30
    print_fn(f"presets: whole generations, {arch} UNet (random init), latent {inputs.side}x{inputs.side}, "
             f"{inputs.steps} Euler steps, CFG, on {device_line(inputs.device, inputs.dtype)}; median of {repeats} "
             f"generations per row")
    memory = "CUDA max_memory_allocated" if inputs.device.type == "cuda" else \
        "weights + peak of tensors allocated by aten ops (dispatch ledger)"
    print_fn(f"memory: {memory}; FLOPs: FlopCounterMode over one whole generation")
    print_fn(f"{'row':<28} {'batch':>5} {'s/image':>9} {'time x':>7} {'peak GiB':>9} {'mem x':>6} {'FLOPs x':>8}")
    for name, batch in rows:
        row = figures[name, batch]
        print_fn(f"{name:<28} {batch:>5} {row['seconds'] / batch:>9.3f} {row['time_ratio']:>7.3f} "
                 f"{row['peak'] / gib:>9.3f} {row['memory_ratio']:>6.3f} {row['flops_ratio']:>8.3f}")
    story = figures["StorySync", frames]
    vanilla = figures["vanilla", frames]
    consistent = story["seconds"] - story["prepass"]
    print_fn(f"StorySync: BLI pre-pass {story['prepass']:.2f} s ({story['prepass'] / vanilla['seconds']:.3f} of "
             f"vanilla, {story['prepass_flops'] / vanilla['flops']:.3f} of its FLOPs), consistent pass "
             f"{consistent:.2f} s (x{consistent / vanilla['seconds']:.3f}); "
             f"vanilla {vanilla['seconds']:.2f} s per generation, {vanilla['flops'] / 1e12:.2f} TFLOP, "
             f"peak {vanilla['peak'] / gib:.3f} GiB")
    lock = figures["lockstep"]
    two, four = 2 * frames, 4 * frames
    print_fn(f"one plain UNet call: {two} rows {lock[f'seconds_{two}'] * 1e3:.1f} ms, peak "
             f"{lock[f'peak_{two}'] / gib:.3f} GiB; {four} rows (BLI's vanilla rows in lock-step) "
             f"{lock[f'seconds_{four}'] * 1e3:.1f} ms (x{lock[f'seconds_{four}'] / lock[f'seconds_{two}']:.2f}), "
             f"peak {lock[f'peak_{four}'] / gib:.3f} GiB (x{lock[f'peak_{four}'] / lock[f'peak_{two}']:.2f})")
