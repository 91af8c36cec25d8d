"""Per-rank setup inside a Ray Train worker: recipe parts, the plan applied, then the loop.

Receives plain data only (the resolved config dict, the plan dict, the run id), never
live objects, and never a ``${hydra:...}`` interpolation.
"""

from __future__ import annotations

import math
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch.utils.data import DataLoader

from launcher import checkpoint
from launcher.config import Config, validate
from launcher.data import StepBatches, eval_shard
from launcher.loop import Hooks, evaluate, run
from launcher.optim import build_optimizer, build_scheduler
from launcher.planner import Plan
from launcher.tracking import MlflowTracker, NullTracker, Tracker


def train_loop(payload: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``."""
    cfg: Config = validate(payload["config"])
    plan = Plan.from_dict(payload["plan"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if world != plan.world_size:
        raise RuntimeError(f"planned for {plan.world_size} workers, running on {world}")
    from recipes import RECIPES

    recipe = RECIPES[cfg.recipe.name]
    torch.manual_seed(cfg.run.seed)
    device = ray.train.torch.get_device()
    data = recipe.build_data(cfg, Path(payload["cache_dir"]))

    model = convert_norm(recipe.build_model(cfg), plan.norm)
    model = ray.train.torch.prepare_model(
        model,
        parallel_strategy="ddp" if world > 1 else None,
        # No collective in forward: buffers are synced from rank 0 before eval and checkpoints
        # instead, which also lets ranks back off from an OOM without desynchronizing.
        parallel_strategy_kwargs={"forward_sync_buffers": False} if world > 1 else None,
    )
    raw_model = getattr(model, "module", model)
    optimizer = build_optimizer(raw_model, plan, cfg.optim)
    scheduler = build_scheduler(optimizer, plan)
    ema = None
    if cfg.train.ema_decay is not None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(raw_model, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay), use_buffers=True)

    start_step = 0
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            state = checkpoint.load(Path(d))
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"])
        checkpoint.set_rng_state(state["rng"])
        start_step = int(state["step"])

    tracker: Tracker = MlflowTracker(payload["tracking_uri"], payload["run_id"]) if rank == 0 else NullTracker()
    say = console if rank == 0 else (lambda _msg: None)
    if restored is not None:
        say(f"resumed from the checkpoint at step {start_step}")

    sampler = StepBatches(
        len(data.train),
        micro=plan.micro_batch,
        accum=plan.grad_accum,
        world=world,
        rank=rank,
        seed=cfg.run.seed,
        start_step=start_step,
    )
    loader = DataLoader(
        data.train,
        batch_sampler=sampler,
        collate_fn=data.collate,
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.data.num_workers > 0,
    )

    def eval_batches() -> Iterator[dict[str, torch.Tensor]]:
        collate = data.eval_collate or data.collate
        for chunk in eval_shard(len(data.eval), rank, world, plan.micro_batch, cfg.train.eval_batches):
            yield collate([data.eval[i] for i in chunk])

    def evaluate_model(m: torch.nn.Module) -> dict[str, float]:
        if hasattr(recipe, "evaluate"):  # a recipe with its own metric (COCO mAP)
            return recipe.evaluate(m, eval_batches(), data, device, cfg.train.precision)
        return evaluate(m, eval_batches(), recipe.count, device, cfg.train.precision, recipe.METRICS)

    def report(step: int, metrics: dict[str, float]) -> None:
        ray.train.report({**metrics, "step": step})

    def save(step: int, metrics: dict[str, float]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                checkpoint.save(
                    Path(tmp),
                    {
                        "model": raw_model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        **({"ema": ema.state_dict()} if ema is not None else {}),
                        "rng": checkpoint.rng_state(),
                        "step": step,
                        "recipe": cfg.recipe.name,
                        "plan": {k: v for k, v in plan.to_dict().items() if k not in ("memory", "deepspeed")},
                    },
                )
                ray.train.report({**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            else:
                ray.train.report({**metrics, "step": step})
        say(f"checkpoint at step {step}")

    run(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        batches=iter(loader),
        evaluate_model=evaluate_model,
        count=recipe.count,
        plan=plan,
        start_step=start_step,
        device=device,
        precision=cfg.train.precision,
        grad_clip=cfg.train.grad_clip,
        log_every=cfg.train.log_every,
        eval_every=cfg.train.eval_every,
        checkpoint_every=cfg.train.checkpoint_every,
        tracker=tracker,
        hooks=Hooks(report=report, checkpoint=save, print=say),
        launched_at=payload.get("timings", {}).get("launched_at"),
        ema=ema,
    )


def convert_norm(model: torch.nn.Module, policy: str) -> torch.nn.Module:
    """The plan's BatchNorm policy applied: sync_bn, group_norm, frozen_bn; else unchanged."""
    if policy == "sync_bn":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if policy not in ("group_norm", "frozen_bn"):
        return model
    from torchvision.ops import FrozenBatchNorm2d

    for name, child in model.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            c = child.num_features
            if policy == "group_norm":  # 32 groups (Wu & He 2018), fewer when channels do not divide
                new: torch.nn.Module = torch.nn.GroupNorm(math.gcd(32, c), c, eps=child.eps)
            else:
                new = FrozenBatchNorm2d(c, eps=child.eps)
                new.load_state_dict(child.state_dict(), strict=False)  # running stats and affine, frozen
            setattr(model, name, new)
        else:
            convert_norm(child, policy)
    return model


def console(message: str) -> None:
    """One line on the driver's console. Not ``print``: Ray Train patches it to go both to its
    logger and to stdout, and the driver would show every line twice."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()
