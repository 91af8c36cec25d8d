"""Per-rank setup inside a Ray Train worker: recipe parts, the plan applied, then the loop.

Receives plain data only (the resolved config dict, the plan dict, the run id), never
live objects, and never a ``${hydra:...}`` interpolation.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from launcher import checkpoint
from launcher.config import Config, validate
from launcher.control import StopPoll
from launcher.data import SampleLedger, StepBatches, eval_shard
from launcher.loop import Hooks, evaluate, run
from launcher.noise import LocalGradNorm, NoiseScale
from launcher.optim import build_optimizer, build_scheduler
from launcher.planner import Plan
from launcher.tracking import MlflowTracker, NullTracker, Tracker


def train_loop(payload: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``."""
    stamps = {**payload.get("timings", {}), "workers_done_at": time.time()}  # for the start-up breakdown
    cfg: Config = validate(payload["config"])
    plan = Plan.from_dict(payload["plan"])
    # Ray Train logs every ``ray.train.report`` at INFO from a logger named after its file, which
    # RunConfig(logging_config=...) does not reach; the loop prints its own progress line.
    from ray.train.v2._internal.execution import context as ray_train_context

    logging.getLogger(ray_train_context.__file__).setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if world != plan.world_size:
        raise RuntimeError(f"planned for {plan.world_size} workers, running on {world}")
    from recipes import RECIPES

    recipe = RECIPES[cfg.recipe.name]
    torch.manual_seed(cfg.run.seed)
    device = ray.train.torch.get_device()
    data = recipe.build_data(cfg, Path(payload["cache_dir"]))
    stamps["worker_data_done_at"] = time.time()

    model = convert_norm(recipe.build_model(cfg), plan.norm)
    zero = None  # DeepSpeed's ZeRO optimizer (engine=deepspeed)
    if plan.engine == "deepspeed":
        from launcher import engine

        model = model.to(device)
        optimizer = build_optimizer(model, plan, cfg.optim)
        model, zero = engine.wrap(model, optimizer, plan.deepspeed or {})
    else:
        model = ray.train.torch.prepare_model(
            model,
            parallel_strategy="ddp" if world > 1 else None,
            # No collective in forward: buffers are synced from rank 0 before eval and checkpoints
            # instead, which also lets ranks back off from an OOM without desynchronizing.
            parallel_strategy_kwargs={"forward_sync_buffers": False} if world > 1 else None,
        )
    raw_model = getattr(model, "module", model)
    noise = None
    if cfg.train.measure_noise_scale:  # engine=ddp, world >= 2: checked on the driver
        per_rank = plan.micro_batch * plan.grad_accum
        noise = (LocalGradNorm.attach(model), NoiseScale(b_small=per_rank, b_big=plan.global_batch))
    if zero is None:
        optimizer = build_optimizer(raw_model, plan, cfg.optim)
    scheduler = build_scheduler(optimizer, plan)
    ema = None
    if cfg.train.ema_decay is not None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(raw_model, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay), use_buffers=True)

    say = console if rank == 0 else (lambda _msg: None)

    def apply(state: dict[str, Any], directory: Path) -> None:
        raw_model.load_state_dict(state["model"])
        if zero is not None:
            from launcher import engine

            if state["plan"]["world_size"] != world:
                raise checkpoint.CheckpointMismatch(
                    f"engine=deepspeed: the checkpoint's ZeRO optimizer is split over {state['plan']['world_size']} "
                    f"workers, this run has {world}; resume with cluster.num_workers={state['plan']['world_size']}"
                )
            try:
                engine.load_shard(zero, directory / checkpoint.shard_file(rank), world)
            except (OSError, RuntimeError, EOFError) as e:  # a torn or missing shard: try the one before
                raise checkpoint.Unreadable(f"{checkpoint.shard_file(rank)}: {e}") from e
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"])
        if noise is not None and "noise_scale" in state:
            noise[1].load_state_dict(state["noise_scale"])
        checkpoint.set_rng_state(state["rng"])

    # The run's complete checkpoints in the storage, newest first (paths or URIs): after a worker
    # failure, after a run of the same name. Listed here rather than asked of Ray
    # (ray.train.get_checkpoint), which misses one it had not registered yet when a worker died.
    dirs = checkpoint.candidates(payload["run_root"], say)
    start_step = 0
    found = checkpoint.restore(dirs, cfg.recipe.name, apply, say) if cfg.action == "train" else None
    if found is not None:
        start_step = int(found[1]["step"])
        say(f"resumed from {PurePosixPath(found[0]).name} at step {start_step}")
    agree_on_step(start_step, device)

    poll = StopPoll(payload["run_id"]) if rank == 0 else None
    tracker: Tracker = (
        MlflowTracker(payload["tracking_uri"], payload["run_id"], poll.keep, say) if poll is not None else NullTracker()
    )

    sampler = StepBatches(
        len(data.train),
        micro=plan.micro_batch,
        accum=plan.grad_accum,
        world=world,
        rank=rank,
        seed=cfg.run.seed,
        start_step=start_step,
    )
    ledger = SampleLedger.from_env(rank, start_step, plan.grad_accum) if cfg.action == "train" else None
    loader = DataLoader(
        ledger.dataset(data.train) if ledger else data.train,
        batch_sampler=sampler,
        collate_fn=ledger.collate(data.collate) if ledger else data.collate,
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.data.num_workers > 0,
    )

    stamps["worker_model_done_at"] = time.time()
    if cfg.action == "lr_find":
        _lr_find(cfg, plan, model, optimizer, loader, recipe.count, device, tracker, say)
        return

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
            if zero is not None:  # every rank keeps its ZeRO partition; Ray merges the ranks' files
                from launcher import engine

                engine.save_shard(zero, Path(tmp) / checkpoint.shard_file(rank))
            if rank == 0:
                plan_record = {k: v for k, v in plan.to_dict().items() if k not in ("memory", "deepspeed")}
                checkpoint.save(
                    Path(tmp),
                    {
                        "model": raw_model.state_dict(),
                        **({"optimizer": optimizer.state_dict()} if zero is None else {}),
                        "scheduler": scheduler.state_dict(),
                        **({"ema": ema.state_dict()} if ema is not None else {}),
                        **({"noise_scale": noise[1].state_dict()} if noise is not None else {}),
                        "rng": checkpoint.rng_state(),
                        "step": step,
                        "recipe": cfg.recipe.name,
                        "plan": plan_record,
                    },
                    {"recipe": cfg.recipe.name, "step": step, "plan": plan_record},
                )
            has_files = any(Path(tmp).iterdir())
            ray.train.report(
                {**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp) if has_files else None
            )
        say(f"checkpoint at step {step}")

    run(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        batches=ledger.record(iter(loader)) if ledger else iter(loader),
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
        hooks=Hooks(report=report, checkpoint=save, print=say, stop=poll if poll is not None else (lambda: False)),
        startup=stamps if poll is not None and "launched_at" in stamps and poll.first_start() else None,
        ema=ema,
        noise=noise,
    )
    tracker.close()


def _lr_find(  # type: ignore[no-untyped-def]
    cfg: Config, plan: Plan, model, optimizer, loader: DataLoader, count, device, tracker: Tracker, say
) -> None:
    """``action=lr_find`` on every rank; rank 0 logs the curve and suggestion, all report the suggestion."""
    from launcher import lr_find

    batches = iter(loader)
    steps = (list(itertools.islice(batches, plan.grad_accum)) for _ in itertools.count())
    schedule = lr_find.lrs(cfg.lr_find.steps, cfg.lr_find.min_lr, cfg.lr_find.max_lr)
    say(
        f"lr_find: {len(schedule)} steps from lr {schedule[0]:.3g} to {schedule[-1]:.3g} at global batch "
        f"{plan.global_batch} ({plan.micro_batch} x {plan.grad_accum} x {plan.world_size})"
    )
    tried, losses = lr_find.range_test(
        model,
        optimizer,
        steps,
        count,
        schedule=schedule,
        diverge=cfg.lr_find.diverge,
        device=device,
        precision=cfg.train.precision,
        grad_clip=cfg.train.grad_clip,
        progress=say,
    )
    found = lr_find.suggest(tried, lr_find.smooth(losses), cfg.lr_find.diverge)
    for i, (lr, loss) in enumerate(zip(tried, losses, strict=True)):
        tracker.log_metrics({"lr_find_lr": lr, "lr_find_loss": loss}, i + 1)
    if isinstance(tracker, MlflowTracker):
        with tempfile.TemporaryDirectory() as tmp:
            for path in lr_find.save_curve(tried, losses, found, Path(tmp)):
                tracker.client.log_artifact(tracker.run_id, str(path), "lr_find")
    summary = {f"lr_find_{k}": v for k, v in found.items() if v is not None} | {"lr_find_steps": len(tried)}
    tracker.log_metrics(summary, len(tried))
    tracker.log_dict({**found, "steps": len(tried), "global_batch": plan.global_batch}, "lr_find/result.json")
    tracker.close()


def agree_on_step(step: int, device: torch.device) -> None:
    """Every rank must have restored the same checkpoint; training on mixed ones would silently diverge."""
    if not dist.is_initialized():
        return
    both = torch.tensor([step, -step], dtype=torch.int64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    if int(both[0]) != -int(both[1]):
        raise RuntimeError(
            f"the ranks restored different checkpoints (steps {-int(both[1])} to {int(both[0])}); one rank could "
            "not read its part of the newest one. Resume again, or with run.resume=false to start over"
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
