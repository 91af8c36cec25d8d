"""The plain alternative: a hand-written PyTorch DDP loop, run with ``torchrun --nproc-per-node=2``.

Same model (the BERT smoke config), same cached sentence pairs, same micro-batch and
accumulation as the launcher's run; a DistributedSampler and per-micro-batch mean losses,
as a typical script would do. Rank 0 prints one JSON line with its measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from ranks import finish  # bench/ranks.py (the script's folder is on sys.path)
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from launcher.cli import load, process_started
from launcher.hooks import startup_phases
from recipes import bert


def optimizer(model: torch.nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with a 20-step linear warm-up, as a typical script has it."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))


def plain_step(
    model: DDP, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler, micro: list[dict]
) -> torch.Tensor:
    """One optimizer step over ``micro`` (this rank's micro-batches): per micro-batch mean losses divided
    by the accumulation, ``no_sync`` on all but the last backward, clipping at 1.0, AdamW, the schedule.
    ``bench/step_overhead.py`` times this against the launcher's step. Returns the last micro-step's loss."""
    for i, batch in enumerate(micro):
        with model.no_sync() if i < len(micro) - 1 else nullcontext():
            out = model(batch)
            counts = bert.count(batch)
            loss = sum(out[k] / counts[k] for k in out) / len(micro)
            loss.backward()  # type: ignore[union-attr]
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss  # type: ignore[return-value]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--window", type=int, default=10)
    args = ap.parse_args()
    started = process_started()
    launched_at = float(os.environ.get("BENCH_LAUNCHED_AT", started))  # make bench: when it ran torchrun
    stamps = {"process_done_at": started, "imports_done_at": time.time()}

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    stamps["process_group_done_at"] = time.time()
    cfg = load(["scale=smoke"])
    torch.manual_seed(0)
    data = bert.build_data(cfg, Path(args.cache))
    stamps["data_done_at"] = time.time()
    sampler = DistributedSampler(data.train, num_replicas=world, rank=rank, seed=0)
    loader = DataLoader(data.train, batch_size=args.micro, sampler=sampler, collate_fn=data.collate, drop_last=True)
    model = DDP(bert.build_model(cfg))
    opt, sched = optimizer(model)
    stamps["model_done_at"] = time.time()

    it = iter(loader)
    first_step_s = None
    windows, t0 = [], time.perf_counter()
    for step in range(args.steps):
        loss = plain_step(model, opt, sched, [next(it) for _ in range(args.accum)])
        if first_step_s is None:
            stamps["first_step_done_at"] = time.time()
            first_step_s = stamps["first_step_done_at"] - launched_at
        if (step + 1) % args.window == 0:
            loss_value = torch.tensor([loss.item()])
            dist.all_reduce(loss_value)  # a plain script logs a reduced loss too
            elapsed = time.perf_counter() - t0
            windows.append(args.micro * args.accum * world * args.window / elapsed)
            t0 = time.perf_counter()
    if rank == 0:
        steady = windows[1:] or windows
        startup = {"launched_at": launched_at, **stamps}
        print(json.dumps({"time_to_first_step_s": first_step_s, "samples_per_s": statistics.median(steady),
                          "windows": windows, "startup": startup_phases(startup, stamps["first_step_done_at"])}))
    finish()


if __name__ == "__main__":
    main()
