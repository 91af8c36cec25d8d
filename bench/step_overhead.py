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
import sys
from pathlib import Path
from types import ModuleType

import torch
import torch.distributed as dist
from ranks import bert_smoke, finish, paired_args, time_paired  # bench/ranks.py (the script's folder is on sys.path)
from torch.nn.parallel import DistributedDataParallel as DDP

from launcher.step import Batch, DDPStep, StepScalars
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
    args = paired_args(ap)
    old = old_loop(args.old_loop)
    cfg, batches = bert_smoke(args, "recipe.model.dropout=0.0")
    rank = dist.get_rank()
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

    def run_old(micro: list[Batch], _step: int) -> None:
        old.train_step(old_model, old_opt, micro, bert.count, device=device, grad_clip=1.0, stop=False)

    ms, ratio = time_paired(args, batches, {"old": run_old, "new": new})
    same = all(torch.equal(a, b) for a, b in zip(old_model.parameters(), models["new"][0].parameters(), strict=True))
    if rank == 0:
        print(json.dumps({
            "step_ms_old": ms["old"], "step_ms_new": ms["new"],
            "slowdown": ratio - 1,  # the median of per-step ratios, same micro-batches
            "steps": args.steps, "same_parameters": same,
        }))
    finish()


if __name__ == "__main__":
    main()
