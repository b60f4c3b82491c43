"""``python -m lib_consistency.bench``: what the methods cost in speed and memory against plain generation.

Default: consistent self-attention (``csa.py``), then StorySync (``storysync.py``); ``--only oneactor`` (tuning and
inference, ``oneactor.py``), ``--only storysync-unet`` (a whole random UNet, ``storysync_unet.py``) and
``--only flux`` (one call of a random Flux transformer, ``flux.py``) and ``--only presets`` (whole generations of
every preset and OneActor on a random UNet, ``presets.py``) import diffusers and run only when named. How each part
times and what it prints is in its module's docstring.
"""
from __future__ import annotations

import argparse

import torch

from .csa import run
from .storysync import run as run_storysync


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lib_consistency.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per case (default 10 CUDA, 3 CPU; --only presets: 3 CUDA, 1 CPU)")
    parser.add_argument("--side-divisor", type=int, default=None,
                        help="divide every token-grid side (default 1 on CUDA, 2 on CPU: a quarter of the tokens)")
    parser.add_argument("--only", choices=("csa", "storysync", "oneactor", "storysync-unet", "flux", "presets"),
                        default=None, help="run one part (default: CSA, then StorySync; the others only when named)")
    parser.add_argument("--arch", "--oneactor-arch", dest="arch", choices=("sd15", "sdxl"), default="sd15",
                        help="UNet for --only oneactor, storysync-unet and presets (default sd15)")
    parser.add_argument("--latent-side", "--oneactor-latent-side", dest="latent_side", type=int, default=None,
                        help="latent side for --only oneactor / storysync-unet / presets (default: the real 64 for "
                             "sd15, 128 for sdxl; presets on the CPU: half of it)")
    parser.add_argument("--steps", type=int, default=None,
                        help="--only presets: sampling steps per generation (default 30 on CUDA, 10 on the CPU)")
    parser.add_argument("--flux-size", choices=("real", "small"), default=None,
                        help="--only flux: Flux.1's configuration at 1024² (default on CUDA) or a small one at 512² "
                             "(default on the CPU)")
    parser.add_argument("--profile", action="store_true",
                        help="--only presets: one more generation per row under torch.profiler, printed as where "
                             "the time goes (UNet, attention modules, the methods' own work)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    if args.only == "oneactor":
        from .oneactor import run_inference_bench, run_tuning_bench  # import diffusers when run
        run_inference_bench(args.arch, device, torch.float16 if on_cuda else torch.float32,
                            latent_side=args.latent_side)
        # bf16 for tuning: fp16 gradients through a frozen fp16 UNet overflow more easily
        run_tuning_bench(args.arch, device, torch.bfloat16 if on_cuda else torch.float32,
                         latent_side=args.latent_side)
        return
    if args.only == "flux":
        from .flux import run as run_flux  # imports diffusers when run
        run_flux(args.flux_size or ("real" if on_cuda else "small"), device,
                 torch.bfloat16 if on_cuda else torch.float32, repeats=args.repeats or (10 if on_cuda else 3))
        return
    if args.only == "presets":
        from .oneactor import LATENT_SIDES
        from .presets import run as run_presets  # imports diffusers when run
        run_presets(args.arch, device, torch.float16 if on_cuda else torch.float32,
                    steps=args.steps or (30 if on_cuda else 10), repeats=args.repeats or (3 if on_cuda else 1),
                    latent_side=args.latent_side or (None if on_cuda else LATENT_SIDES[args.arch] // 2),
                    oneactor_batches=(1, 4) if on_cuda else (1,), profile=args.profile)
        return
    if args.only == "storysync-unet":
        from .storysync_unet import run as run_unet  # imports diffusers when run
        run_unet(args.arch, device, torch.float16 if on_cuda else torch.float32, latent_side=args.latent_side)
        return
    repeats = args.repeats or (10 if on_cuda else 3)
    divisor = args.side_divisor or (1 if on_cuda else 2)
    dtype = torch.float16 if on_cuda else torch.float32
    memory = "CUDA max_memory_allocated" if on_cuda else "peak bytes of tensors allocated by aten ops (dispatch ledger)"
    print(f"device {device} ({torch.get_num_threads()} CPU threads), dtype {str(dtype).removeprefix('torch.')}, "
          f"{repeats} shared runs between {repeats + 1} plain runs, token-grid sides divided by {divisor}")
    if args.only != "storysync":
        print("plain = the module without hook; shared = hook installed, all frames share; "
              "time x = median of shared / neighbouring plain runs")
        print(f"memory: {memory}; extra/exp = extra peak over plain / (extended context + extra K/V + gather index)")
        worst, worst_memory = run(device, dtype, repeats, divisor)
        print(f"worst extra memory / (extended context + extra K/V + index): {worst_memory:.2f}")
        print(f"worst time ratio / FLOPs bound: {worst:.2f}")
    if args.only != "csa":
        run_storysync(device, dtype, repeats, divisor)
