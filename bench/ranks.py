"""What the paired torchrun benchmark scripts share: the BERT smoke batches per rank, and their end."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def paired_args(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """The options every paired step benchmark takes."""
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--cache", required=True)
    return ap.parse_args()


def bert_smoke(args: argparse.Namespace, *overrides: str) -> tuple[Any, Iterator[dict[str, torch.Tensor]]]:
    """The process group, the BERT smoke config, and this rank's micro-batches in the launcher's order."""
    from torch.utils.data import DataLoader

    from launcher.cli import load
    from launcher.data import StepBatches, size
    from recipes import bert

    dist.init_process_group("gloo")
    cfg = load(["scale=smoke", *overrides])
    data = bert.build_data(cfg, Path(args.cache))
    sampler = StepBatches(size(data.train), micro=args.micro, accum=args.accum, world=dist.get_world_size(),
                          rank=dist.get_rank(), seed=0)
    return cfg, iter(DataLoader(data.train, batch_sampler=sampler, collate_fn=data.collate))


def time_paired(
    args: argparse.Namespace,
    batches: Iterator[dict[str, torch.Tensor]],
    sides: dict[str, Callable[[list[Any], int, list[Any] | None], Any]],
) -> tuple[dict[str, float], float]:
    """Each step's micro-batches through both ``sides`` (a, b), in alternating order so no side always goes
    first; (median ms per side, median of the per-step ratios b / a), after ``args.warmup`` steps.

    As the Trainer does, the next step's micro-batches are fetched before a step runs: each side is
    called ``(micro_batches, step, upcoming)``, ``upcoming`` being the next step's (None at the last).
    Fetching is not timed."""
    import statistics
    import time

    (a, run_a), (b, run_b) = sides.items()
    times: dict[str, list[float]] = {a: [], b: []}
    total = args.warmup + args.steps
    upcoming: list[Any] | None = [next(batches) for _ in range(args.accum)]
    for step in range(total):
        micro, upcoming = upcoming, [next(batches) for _ in range(args.accum)] if step + 1 < total else None
        assert micro is not None
        for name, run in ((a, run_a), (b, run_b)) if step % 2 == 0 else ((b, run_b), (a, run_a)):
            dist.barrier()
            started = time.perf_counter()
            run(micro, step, upcoming)
            if step >= args.warmup:
                times[name].append(time.perf_counter() - started)
    ratio = statistics.median(y / x for x, y in zip(times[a], times[b], strict=True))
    return {k: 1000 * statistics.median(v) for k, v in times.items()}, ratio


def finish() -> None:
    """Tear the process group down together, then exit without interpreter finalization: torch 2.x/gloo
    aborts there now and then ("terminate called without an active exception", no Python frame; about
    1 run in 10 on 2 CPU ranks), after the numbers are printed."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
