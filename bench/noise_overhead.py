"""The cost of ``train.measure_noise_scale``, isolated: ``torchrun --nproc-per-node=2 bench/noise_overhead.py``.

Whole launcher runs vary by several percent from run to run on a shared 2-core machine, more
than the measurement costs. So this times the launcher's own ``train_step`` on the BERT smoke
model: at every step, the same micro-batches go through a DDP model without the noise-scale
hook and through one with it (``launcher/noise.py``: the per-bucket squared norm before DDP's
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
from launcher.loop import train_step
from launcher.noise import LocalGradNorm, NoiseScale
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
    models = {}
    for name in ("plain", "noise"):
        torch.manual_seed(0)
        model = DDP(bert.build_model(cfg))
        models[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    hook = LocalGradNorm.attach(models["noise"][0])
    estimator = NoiseScale(b_small=args.micro * args.accum, b_big=args.micro * args.accum * world)
    device = torch.device("cpu")

    times: dict[str, list[float]] = {"plain": [], "noise": []}
    for step in range(args.warmup + args.steps):
        micro = [next(batches) for _ in range(args.accum)]
        order = ("plain", "noise") if step % 2 == 0 else ("noise", "plain")  # no side always goes first
        for name in order:
            model, opt = models[name]
            dist.barrier()
            started = time.perf_counter()
            result = train_step(model, opt, micro, bert.count, device=device, grad_clip=1.0,
                                local_norm=hook if name == "noise" else None)
            if name == "noise" and result is not None and result.small_sq is not None:
                estimator.update(result.small_sq, result.big_sq or 0.0)
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
