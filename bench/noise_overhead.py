"""The cost of ``train.measure_noise_scale``, isolated: ``torchrun --nproc-per-node=2 bench/noise_overhead.py``.

Whole launcher runs vary by several percent from run to run on a shared 2-core machine, more
than the measurement costs. So this times the launcher's own step (``launcher/step.py:
DDPStep``) on the BERT smoke model: at every step, the same micro-batches go through a DDP
model without the noise-scale hook and through one with it (``launcher/noise.py``, wired as
``launcher/hooks.py: NoiseScaleHook`` does: the per-bucket squared norm before DDP's
all-reduce, the global norm, the estimator update), in alternating order, and the overhead is
the median of the per-step time ratios.
Rank 0 prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from ranks import finish  # bench/ranks.py (the script's folder is on sys.path)
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from launcher.cli import load
from launcher.data import StepBatches
from launcher.noise import LocalGradNorm, NoiseScale
from launcher.step import DDPStep, StepScalars
from recipes import bert


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--cache", required=True)
    args = ap.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load(["scale=smoke"])
    data = bert.build_data(cfg, Path(args.cache))
    sampler = StepBatches(len(data.train), micro=args.micro, accum=args.accum, world=world, rank=rank, seed=0)
    batches = iter(DataLoader(data.train, batch_sampler=sampler, collate_fn=data.collate))
    device = torch.device("cpu")
    steps = {}
    for name in ("plain", "noise"):
        torch.manual_seed(0)
        model = DDP(bert.build_model(cfg))
        scalars = StepScalars()
        if name == "noise":  # as launcher/hooks.py: NoiseScaleHook
            hook = LocalGradNorm.attach(model)
            scalars.register("noise_local_sq", lambda h=hook: float(h.sq) if h.sq is not None else 0.0)
        steps[name] = DDPStep(model, torch.optim.AdamW(model.parameters(), lr=1e-4), bert.count, scalars,
                              device=device, grad_clip=1.0, need_grad_norm=name == "noise")
    estimator = NoiseScale(b_small=args.micro * args.accum, b_big=args.micro * args.accum * world)

    times: dict[str, list[float]] = {"plain": [], "noise": []}
    for step in range(args.warmup + args.steps):
        micro = [next(batches) for _ in range(args.accum)]
        order = ("plain", "noise") if step % 2 == 0 else ("noise", "plain")  # no side always goes first
        for name in order:
            dist.barrier()
            started = time.perf_counter()
            if name == "noise":
                hook.reset()
            result = steps[name](micro, step)
            if name == "noise" and result.grad_norm is not None:
                estimator.update(result.scalars["noise_local_sq"] / world, result.grad_norm**2)
            if step >= args.warmup:
                times[name].append(time.perf_counter() - started)
    if rank == 0:
        paired = [n / p for n, p in zip(times["noise"], times["plain"], strict=True)]
        print(json.dumps({
            "step_ms_without": 1000 * statistics.median(times["plain"]),
            "step_ms_with": 1000 * statistics.median(times["noise"]),
            "overhead": statistics.median(paired) - 1,  # the median of per-step ratios, same micro-batches
            "steps": args.steps,
        }))
    finish()


if __name__ == "__main__":
    main()
