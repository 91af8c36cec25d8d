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
from functools import partial

import torch
import torch.distributed as dist
from ranks import bert_smoke, finish, paired_args, time_paired  # bench/ranks.py (the script's folder is on sys.path)
from torch.nn.parallel import DistributedDataParallel as DDP

from launcher.noise import LocalGradNorm, NoiseScale
from launcher.step import Batch, DDPStep, StepScalars
from recipes import bert


def local_sq(hook: LocalGradNorm) -> float:
    return float(hook.sq) if hook.sq is not None else 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    args = paired_args(ap)
    cfg, batches = bert_smoke(args)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    steps = {}
    for name in ("plain", "noise"):
        torch.manual_seed(0)
        model = DDP(bert.build_model(cfg))
        scalars = StepScalars()
        if name == "noise":  # as launcher/hooks.py: NoiseScaleHook
            hook = LocalGradNorm.attach(model)
            scalars.register("noise_local_sq", partial(local_sq, hook))
        steps[name] = DDPStep(model, torch.optim.AdamW(model.parameters(), lr=1e-4), bert.count, scalars,
                              device=device, grad_clip=1.0, need_grad_norm=name == "noise")
    estimator = NoiseScale(b_small=args.micro * args.accum, b_big=args.micro * args.accum * world)

    def run_noise(micro: list[Batch], step: int, upcoming: list[Batch] | None) -> None:
        hook.reset()  # as NoiseScaleHook.before_step
        result = steps["noise"](micro, step, upcoming)
        if result.grad_norm is not None:
            estimator.update(result.scalars["noise_local_sq"] / world, result.grad_norm**2)

    ms, ratio = time_paired(args, batches, {"plain": steps["plain"], "noise": run_noise})
    if rank == 0:
        print(json.dumps({
            "step_ms_without": ms["plain"], "step_ms_with": ms["noise"],
            "overhead": ratio - 1,  # the median of per-step ratios, same micro-batches
            "steps": args.steps,
        }))
    finish()


if __name__ == "__main__":
    main()
