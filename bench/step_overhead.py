"""The step object against the loop it replaced, step for step: ``torchrun --nproc-per-node=2 bench/step_overhead.py``.

``--old-loop`` is ``launcher/loop.py`` of an earlier commit (``git show 08cb4ac:launcher/loop.py
> /tmp/old_loop.py``: the last one with ``train_step``). Two identical DDP models of the BERT
smoke recipe take the same micro-batches at every step, one through that ``train_step``, one
through ``launcher/step.py: DDPStep`` with the scalars a training run registers (the graceful
stop's), in alternating order; the result is the median of the per-step time ratios. Both
models must stay equal: the script checks their parameters at the end.
Rank 0 prints one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

import torch
import torch.distributed as dist
from ranks import finish  # bench/ranks.py (the script's folder is on sys.path)
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from launcher.cli import load
from launcher.data import StepBatches
from launcher.step import DDPStep, StepScalars
from recipes import bert


def old_loop(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("old_loop", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_loop"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old-loop", type=Path, required=True, help="launcher/loop.py of the commit to compare with")
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--cache", required=True)
    args = ap.parse_args()

    old = old_loop(args.old_loop)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load(["scale=smoke", "recipe.model.dropout=0.0"])
    data = bert.build_data(cfg, Path(args.cache))
    sampler = StepBatches(len(data.train), micro=args.micro, accum=args.accum, world=world, rank=rank, seed=0)
    batches = iter(DataLoader(data.train, batch_sampler=sampler, collate_fn=data.collate))
    device = torch.device("cpu")
    models = {}
    for name in ("old", "new"):
        torch.manual_seed(0)
        model = DDP(bert.build_model(cfg))
        models[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    scalars = StepScalars()
    scalars.register("stop", lambda: 0.0)  # as hooks.GracefulStop registers it on every rank
    new = DDPStep(*models["new"], bert.count, scalars, device=device, grad_clip=1.0)
    old_model, old_opt = models["old"]

    times: dict[str, list[float]] = {"old": [], "new": []}
    for step in range(args.warmup + args.steps):
        micro = [next(batches) for _ in range(args.accum)]
        for name in ("old", "new") if step % 2 == 0 else ("new", "old"):  # no side always goes first
            dist.barrier()
            started = time.perf_counter()
            if name == "old":
                old.train_step(old_model, old_opt, micro, bert.count, device=device, grad_clip=1.0, stop=False)
            else:
                new(micro, step)
            if step >= args.warmup:
                times[name].append(time.perf_counter() - started)
    same = all(torch.equal(a, b) for a, b in zip(old_model.parameters(), models["new"][0].parameters(), strict=True))
    if rank == 0:
        paired = [n / o for n, o in zip(times["new"], times["old"], strict=True)]
        print(json.dumps({
            "step_ms_old": 1000 * statistics.median(times["old"]),
            "step_ms_new": 1000 * statistics.median(times["new"]),
            "slowdown": statistics.median(paired) - 1,  # the median of per-step ratios, same micro-batches
            "steps": args.steps,
            "same_parameters": same,
        }))
    finish()


if __name__ == "__main__":
    main()
