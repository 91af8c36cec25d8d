"""The launcher's step against a plain DDP step, step for step: ``torchrun --nproc-per-node=2 bench/step_overhead.py``.

In one gloo process group, two identical DDP models of the BERT smoke recipe (same seed) take the
same micro-batches at every step (``bench/ranks.py: time_paired``, alternating which goes first):

- **plain**: ``bench/plain_ddp.py: plain_step``, the loop the whole-run comparison runs under torchrun
  (per micro-batch mean losses divided by the accumulation, ``no_sync`` on all but the last backward,
  clipping, AdamW, the lr schedule);
- **launcher**: ``launcher/step.py: DDPStep`` as the Trainer calls it (``launcher/trainer.py: fit``):
  with the next step's micro-batches as ``upcoming``, whose unit counts ride in the step's one scalar
  all-reduce; the scalars a training run registers (the graceful stop's ``stop``); DDP without the
  per-forward buffer broadcast, as the worker wraps it; then the lr schedule's step.

Both sides use the same optimizer and schedule (``plain_ddp.optimizer``), so the difference is the
step itself: the launcher's exact global-batch loss normalization, its scalar all-reduce (out of
memory, stop, the next step's counts), the out-of-memory back-off's bookkeeping, its per-term sums.
The ratio is the median of the per-step ratios plain time / launcher time (the launcher's share of
the plain step's throughput). Rank 0 prints one JSON line; ``--profile=FILE`` also writes cProfiles of
rank 0's steps after the warm-up, one per side (``FILE.launcher``, ``FILE.plain``; ``python -m pstats``).
"""

from __future__ import annotations

import argparse
import cProfile
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from plain_ddp import optimizer, plain_step  # bench/plain_ddp.py (the script's folder is on sys.path)
from ranks import bert_smoke, finish, paired_args, time_paired  # bench/ranks.py
from torch.nn.parallel import DistributedDataParallel as DDP

from launcher.step import Batch, DDPStep, StepScalars
from recipes import bert

Side = Callable[[list[Batch], int, "list[Batch] | None"], Any]  # (micro-batches, step, the next step's)


def launcher_side(cfg: Any) -> Side:
    torch.manual_seed(0)
    model = DDP(bert.build_model(cfg), forward_sync_buffers=False)  # as launcher/worker.py: _engine wraps it
    opt, sched = optimizer(model)
    scalars = StepScalars()
    scalars.register("stop", lambda: 0.0)  # as hooks.GracefulStop registers it on every rank
    step = DDPStep(model, opt, bert.count, scalars, device=torch.device("cpu"), grad_clip=1.0)

    def run(micro: list[Batch], index: int, upcoming: list[Batch] | None) -> None:  # as Trainer.fit
        float(sched.get_last_lr()[0])
        step(micro, index, upcoming)
        sched.step()

    return run


def plain_side(cfg: Any) -> Side:
    torch.manual_seed(0)
    model = DDP(bert.build_model(cfg))  # as bench/plain_ddp.py wraps it
    opt, sched = optimizer(model)
    return lambda micro, _index, _upcoming: plain_step(model, opt, sched, micro)


def profiled(run: Side, warmup: int, profile: cProfile.Profile | None) -> Side:
    """``run``, its calls after the warm-up under ``profile`` (None: as it is)."""
    if profile is None:
        return run

    def side(micro: list[Batch], index: int, upcoming: list[Batch] | None) -> None:
        if index < warmup:
            return run(micro, index, upcoming)
        profile.runcall(run, micro, index, upcoming)

    return side


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", type=Path, help="rank 0: a cProfile of each side's steps to PROFILE.<side>")
    args = paired_args(ap)
    cfg, batches = bert_smoke(args)
    sides = {"launcher": launcher_side(cfg), "plain": plain_side(cfg)}
    profiles = {k: cProfile.Profile() if args.profile and dist.get_rank() == 0 else None for k in sides}
    ms, ratio = time_paired(args, batches, {k: profiled(run, args.warmup, profiles[k]) for k, run in sides.items()})
    for name, profile in profiles.items():
        if profile is not None:
            profile.dump_stats(f"{args.profile}.{name}")
    if dist.get_rank() == 0:
        result: dict[str, Any] = {
            "step_ms_plain": ms["plain"], "step_ms_launcher": ms["launcher"],
            "ratio": ratio,  # plain / launcher: the median of per-step ratios, same micro-batches
            "steps": args.steps, "warmup": args.warmup, "micro": args.micro, "accum": args.accum,
            "world": dist.get_world_size(), "profiled": bool(args.profile),
        }  # fmt: skip
        print(json.dumps(result))
    finish()


if __name__ == "__main__":
    main()
