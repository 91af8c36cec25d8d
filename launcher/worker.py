"""Per-rank setup inside a Ray Train worker: a Trainer built from the plain payload, then ``fit()``.

Receives plain data only (the resolved config dict, the plan dict, the run id), never
live objects, and never a ``${hydra:...}`` interpolation. The action (train or lr_find) is
dispatched here, once.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from launcher import checkpoint, faults
from launcher.config import Config, validate
from launcher.control import ConsoleLink, StopPoll
from launcher.data import Data, SampleLedger, StepBatches, eval_samples, eval_shard, size
from launcher.hooks import LedgerEnd, WorkerGroup, back_off_notice, build_hooks
from launcher.noise import LocalGradNorm, NoiseScale
from launcher.optim import apply_plan, build_optimizer, build_scheduler
from launcher.planner import Plan
from launcher.step import Batch, DDPStep, DeepSpeedStep, StepScalars, evaluate
from launcher.tracking import NullTracker, PostTracker, SystemMetrics, Tracker, quick_requests
from launcher.trainer import StepFn, Trainer
from recipes import RECIPES, Recipe


@dataclass
class Worker:
    """What every part of a rank's run is built from."""

    cfg: Config
    plan: Plan
    recipe: Recipe
    data: Data
    device: torch.device
    rank: int
    world: int
    tracker: Tracker
    say: Callable[[str], None]  # rank 0's console; a no-op elsewhere
    progress: Callable[[dict[str, Any]], None] | None = None  # rank 0's metrics to the driver's progress display
    niceness: int = 0  # the launcher's (the driver's) priority: a rank below it says so


def train_loop(payload: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``."""
    stamps = {**payload.get("timings", {}), "workers_done_at": time.time()}  # for the start-up breakdown
    cfg: Config = validate(payload["config"])
    plan = Plan.from_dict(payload["plan"])
    # Ray Train logs every ``ray.train.report`` at INFO from a logger named after its file, which
    # RunConfig(logging_config=...) does not reach; the Trainer's metrics hook prints its own line.
    from ray.train.v2._internal.execution import context as ray_train_context

    logging.getLogger(ray_train_context.__file__).setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if world != plan.world_size:  # an elastic run (re)started on another world size than the driver planned
        plan = replan(cfg, payload, world, rank)
    stamps["replanned_at"] = time.time()  # for a restart's timings; not a start-up phase (no "_done_at")
    torch.set_num_threads(plan.cpus.torch_threads)  # the CPU budget's (Ray set $OMP_NUM_THREADS to all of them)
    recipe = RECIPES[cfg.recipe.name]
    torch.manual_seed(cfg.run.seed)
    data = recipe.build_data(cfg, Path(payload["cache_dir"]))
    stamps["worker_data_done_at"] = time.time()
    poll = StopPoll(payload["run_id"]) if rank == 0 else None
    link = ConsoleLink(payload["run_id"], rank)  # the driver's console (launcher/console.py)
    link.forward_warnings()
    say = link.say if rank == 0 else (lambda _msg: None)
    tracker: Tracker = rank_zero_tracker(cfg, payload, link) if rank == 0 else NullTracker()
    w = Worker(cfg, plan, recipe, data, ray.train.torch.get_device(), rank, world, tracker, say,
               link.post if rank == 0 else None, payload["niceness"])  # fmt: skip
    try:
        if cfg.action == "lr_find":
            _lr_find(w, payload["tracking_uri"], payload["run_id"])
        else:
            build_trainer(w, payload, poll, stamps).fit()
    except BaseException:
        tracker.close(patience_s=0)  # a system monitor on this node stopped; the driver sends what was posted
        link.flush()  # the lines before the failure reach the driver's console too
        raise
    tracker.close()
    link.flush()  # before Ray Train ends this process: the driver's last drain finds every line


def rank_zero_tracker(cfg: Config, payload: dict[str, Any], link: ConsoleLink) -> PostTracker:
    """Rank 0's metrics and records to the driver, which sends them to MLflow; this node's system figures
    sampled here only when the driver runs elsewhere (it samples its own node)."""
    node = ray.get_runtime_context().get_node_id()
    quick_requests()  # what rank 0 still sends itself (another node's system figures, lr_find's curve files)
    every = cfg.tracking.system_metrics_s
    away = every > 0 and node != payload["driver_node"]
    system = SystemMetrics(payload["tracking_uri"], payload["run_id"], every) if away else None
    return PostTracker(link.post, node, system)


def replan(cfg: Config, payload: dict[str, Any], world: int, rank: int) -> Plan:
    """Rank 0 plans for the world this worker group has (the planner is pure: the driver's inputs, another
    world size), with the driver's refusals; every rank trains under rank 0's plan."""
    from launcher.launch import Planning, refuse_unsupported

    box: list[Any] = [None]
    if rank == 0:
        new = Planning.from_dict(cfg, payload["planning"]).plan(payload["dataset_size"], world)
        refuse_unsupported(cfg, new, None)
        box = [new.to_dict()]
    if dist.is_initialized():  # NCCL carries the pickled plan on this rank's GPU
        dist.broadcast_object_list(box, src=0, device=ray.train.torch.get_device())
    return Plan.from_dict(box[0])


def build_trainer(w: Worker, payload: dict[str, Any], poll: StopPoll | None, stamps: dict[str, float]) -> Trainer:
    """The Trainer of a training run: engine and step, its Stateful parts restored, batches, hooks."""
    cfg, plan = w.cfg, w.plan
    injected = faults.from_env()
    scalars = StepScalars()
    eng = _engine(w, scalars, injected)
    raw = getattr(eng.model, "module", eng.model)
    scheduler = build_scheduler(eng.optimizer, plan)
    ema = None
    if cfg.train.ema_decay is not None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(raw, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay), use_buffers=True)
    noise = None
    if cfg.train.measure_noise_scale:  # engine=ddp, world >= 2: checked on the driver
        noise = (LocalGradNorm.attach(eng.model), NoiseScale(b_small=plan.micro_batch * plan.grad_accum,
                                                             b_big=plan.global_batch))
    parts: dict[str, checkpoint.Stateful] = {"model": raw, **eng.parts, "scheduler": scheduler, "rng": checkpoint.RNG()}
    parts |= {"ema": ema} if ema is not None else {}
    parts |= {"noise_scale": noise[1]} if noise is not None else {}
    record = {k: v for k, v in plan.to_dict().items() if k not in ("memory", "deepspeed")}
    saver = checkpoint.Checkpointer(parts, eng.shards, recipe=cfg.recipe.name, plan=record, rank=w.rank,
                                    world=w.world, after_write=injected.after_write)
    # The run's complete checkpoints in the storage, newest first (paths or URIs): after a worker
    # failure, after a run of the same name. Listed here rather than asked of Ray
    # (ray.train.get_checkpoint), which misses one it had not registered yet when a worker died.
    found = saver.restore(checkpoint.candidates(payload["run_root"], w.say), w.say)
    start = int(found[1]["step"]) if found is not None else 0
    if found is not None:
        w.say(f"resumed from {PurePosixPath(found[0]).name} at step {start}")
        _plan_over_checkpoint(w, eng.optimizer, scheduler)
    agree_on_step(start, w.device)
    ledger = SampleLedger.from_env(w.rank, w.world, start, plan.grad_accum)
    batches = _batches(w, start, ledger)
    stamps["worker_model_done_at"] = time.time()
    group = None
    if poll is not None:  # rank 0: which worker group this is, after which
        previous = poll.group_started({**_split(plan), "step": start})
        group = group_record(plan, Plan.from_dict(payload["plan"]), previous, start)
        if group["line"]:
            w.say(group["line"])
    timed = group is not None and "launched_at" in stamps and group["first"]
    hooks = build_hooks(
        log_every=cfg.train.log_every, eval_every=cfg.train.eval_every, checkpoint_every=cfg.train.checkpoint_every,
        evaluate=partial(_evaluate, w), save=partial(_save, saver, w.say), poll=poll,
        eval_samples=eval_samples(size(w.data.eval), w.world, plan.micro_batch, cfg.train.eval_batches),
        startup=stamps if timed else None, ema=ema, noise=noise,
        group=WorkerGroup(group, stamps, poll.reached) if group is not None and poll is not None else None,
        hold=injected.hold if injected.holds else None,
    ) + ([LedgerEnd(ledger)] if ledger else [])
    return Trainer(model=eng.model, step_fn=eng.step, scheduler=scheduler, batches=batches, plan=plan,
                   start_step=start, hooks=hooks, tracker=w.tracker, say=w.say, progress=w.progress, scalars=scalars)


def _plan_over_checkpoint(
    w: Worker, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR
) -> None:
    """The new plan wins on resume: its lr, weight decay, betas/momentum and schedule over the restored ones."""
    changed = apply_plan(optimizer, scheduler, w.plan, w.cfg.optim)
    what = ", ".join(changed) if changed else "none changed"
    w.say(f"resume: this plan's optimizer hyper-parameters re-applied over the checkpoint's ({what})")


def group_record(plan: Plan, planned: Plan, previous: dict[str, Any] | None, start: int) -> dict[str, Any]:
    """What this worker group's start means for the run: its console line, and (a resize) the record
    ``plans/step_<start>.json`` says. ``previous``: the group before, with the last step it finished
    (None: the run's first group, compared with the driver's plan)."""
    before = previous or {**_split(planned), "reached": start}
    again = list(range(start + 1, before["reached"] + 1))  # finished, then rolled back with the model
    resized = before["world"] != plan.world_size
    steps = f"steps {again[0]}-{again[-1]} are" if len(again) > 1 else f"step {again[0]} is" if again else ""
    redo = f"; {steps} trained again from the checkpoint" if again else ""
    if resized:
        line = (
            f"world {before['world']} -> {plan.world_size} at step {start}: micro {before['micro_batch']}x"
            f"{before['grad_accum']} -> {plan.micro_batch}x{plan.grad_accum}, global {plan.global_batch} kept{redo}"
        )
    elif previous is not None:
        line = f"restarted at step {start} on {plan.world_size} workers (world unchanged){redo}"
    else:
        line = ""  # the run's first group on the world planned: the plan printed says it all
    record = {
        "step": start, "world_size": {"from": before["world"], "to": plan.world_size},
        "micro_batch": {"from": before["micro_batch"], "to": plan.micro_batch},
        "grad_accum": {"from": before["grad_accum"], "to": plan.grad_accum},
        "global_batch": plan.global_batch, "steps_trained_again": again, "message": line,
        "reasons": list(plan.reasons),
    }  # fmt: skip
    return {"first": previous is None, "resized": resized, "line": line, "record": record}


def _split(p: Plan) -> dict[str, int]:
    """A worker group's world and split, as the run's control actor keeps them."""
    return {"world": p.world_size, "micro_batch": p.micro_batch, "grad_accum": p.grad_accum}


@dataclass
class Engine:
    """The model as trained and how one step runs: DDP, or DeepSpeed ZeRO (chosen here, once)."""

    model: nn.Module  # DDP-wrapped (or plain on one worker), or the DeepSpeed engine
    optimizer: torch.optim.Optimizer  # the launcher's own; ZeRO wraps it, the lr schedule drives it
    step: StepFn
    parts: dict[str, checkpoint.Stateful]  # optimizer state rank 0 saves (DDP)
    shards: dict[str, checkpoint.Stateful]  # state each rank saves (ZeRO's partition)


def _engine(w: Worker, scalars: StepScalars, injected: faults.Faults) -> Engine:
    cfg, plan = w.cfg, w.plan
    model = convert_norm(w.recipe.build_model(cfg), plan.norm)
    if plan.engine == "deepspeed":
        from launcher import engine

        optimizer = build_optimizer(model.to(w.device), plan, cfg.optim)
        wrapped, zero = engine.wrap(model, optimizer, plan.deepspeed or {})
        zero_step = DeepSpeedStep(wrapped, w.recipe.count, scalars, device=w.device)
        return Engine(wrapped, optimizer, zero_step, {}, {"zero": engine.ZeroShard(zero, w.world)})
    model = ray.train.torch.prepare_model(
        model,
        parallel_strategy="ddp" if w.world > 1 else None,
        # No collective in forward: buffers are synced from rank 0 before eval and checkpoints
        # instead, which also lets ranks back off from an OOM without desynchronizing.
        parallel_strategy_kwargs={"forward_sync_buffers": False} if w.world > 1 else None,
    )
    optimizer = build_optimizer(getattr(model, "module", model), plan, cfg.optim)
    step = DDPStep(
        model, optimizer, w.recipe.count, scalars, device=w.device, precision=cfg.train.precision,
        grad_clip=cfg.train.grad_clip, need_grad_norm=cfg.train.measure_noise_scale,
        on_back_off=back_off_notice(plan, w.tracker, w.say), guard=injected.memory_guard,
    )
    return Engine(model, optimizer, step, {"optimizer": optimizer}, {})


def _batches(w: Worker, start_step: int, ledger: SampleLedger | None) -> Iterator[Batch]:
    """This rank's micro-batches from ``start_step`` on (through the sample ledger when it is on)."""
    loader = data_loader(w, start_step, ledger)
    w.say(f"cpus: {w.plan.cpus.cpus_per_worker} per worker: {loader.num_workers} DataLoader process(es), "
          f"{torch.get_num_threads()} torch thread(s){priority_note(os.nice(0), w.niceness)}")  # as it runs
    return ledger.record(iter(loader)) if ledger else iter(loader)


def priority_note(niceness: int, launcher: int) -> str:
    """What the console line of a rank's CPUs adds when it runs at a lower priority than the launcher
    (``launcher``: its niceness): a Ray cluster runs its workers at nice 15 (Ray's ``worker_niceness``),
    where busy processes beside them on the node get the CPUs first; the embedded Ray and a warm one
    on this machine keep them at the launcher's priority."""
    if niceness <= launcher:
        return ""
    return (f"; niceness {niceness} (the launcher's: {launcher}): busy processes beside it get the CPUs first "
            "(`RAY_worker_niceness=0 ray start ...` on each node keeps Ray's workers at normal priority)")  # fmt: skip


def data_loader(w: Worker, start_step: int, ledger: SampleLedger | None) -> DataLoader:
    """The DataLoader of this rank's training micro-batches, with the CPU budget's loader processes."""
    sampler = StepBatches(size(w.data.train), micro=w.plan.micro_batch, accum=w.plan.grad_accum, world=w.world,
                          rank=w.rank, seed=w.cfg.run.seed, start_step=start_step,
                          global_batch=w.plan.global_batch)  # uneven shares when the world does not divide it
    loaders = w.plan.cpus.loader_workers
    return DataLoader(
        ledger.dataset(w.data.train) if ledger else w.data.train,
        batch_sampler=sampler,
        collate_fn=ledger.collate(w.data.collate) if ledger else w.data.collate,
        num_workers=loaders,
        pin_memory=w.device.type == "cuda",
        persistent_workers=loaders > 0,
    )


def _evaluate(w: Worker, model: nn.Module) -> dict[str, float]:
    """The recipe's metric over this rank's share of the evaluation split (every sample on one rank)."""
    collate = w.data.eval_collate or w.data.collate
    chunks = eval_shard(size(w.data.eval), w.rank, w.world, w.plan.micro_batch, w.cfg.train.eval_batches)
    batches = (collate([w.data.eval[i] for i in chunk]) for chunk in chunks)
    if w.recipe.evaluate is not None:  # a recipe with its own metric (COCO mAP)
        return w.recipe.evaluate(model, batches, w.data, w.device, w.cfg.train.precision)
    return evaluate(model, batches, w.recipe.count, w.device, w.cfg.train.precision, w.recipe.METRICS)


def _save(saver: checkpoint.Checkpointer, say: Callable[[str], None], step: int, metrics: dict[str, float]) -> None:
    """Every rank writes its files of the checkpoint; Ray Train merges the ranks' folders in the storage.

    Each rank hashes its files here, in its local folder, and writes its manifest into the storage's
    folder after Ray Train copied them there (``_upload_then_manifest``): a checkpoint whose copy
    was cut short, or changed since, has no manifest or one that does not match (``checkpoint.candidates``).
    """
    with tempfile.TemporaryDirectory() as tmp:
        saver.save(Path(tmp), step)
        if not any(Path(tmp).iterdir()):  # DDP: only rank 0 has files
            ray.train.report({**metrics, "step": step})
            return
        upload = partial(_upload_then_manifest, saver.rank, checkpoint.manifest(Path(tmp)))
        ray.train.report({**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_upload_fn=upload)


def _upload_then_manifest(
    rank: int, files: dict[str, dict[str, Any]], local: ray.train.Checkpoint, dir_name: str
) -> ray.train.Checkpoint:
    """Ray Train's own upload (what ``report`` does without an upload function), then this rank's manifest."""
    persisted: ray.train.Checkpoint = ray.train.get_context().get_storage().persist_current_checkpoint(local, dir_name)
    checkpoint.write_manifest(persisted.filesystem, persisted.path, rank, files)
    return persisted


def _lr_find(w: Worker, uri: str, run_id: str) -> None:
    """``action=lr_find`` on every rank; rank 0 logs the curve and suggestion, all report the suggestion."""
    from launcher import lr_find

    eng = _engine(w, StepScalars(), faults.Faults())
    plan, batches = w.plan, _batches(w, 0, None)
    steps = ([next(batches) for _ in range(plan.grad_accum)] for _ in iter(int, 1))
    schedule = lr_find.lrs(w.cfg.lr_find.steps, w.cfg.lr_find.min_lr, w.cfg.lr_find.max_lr)
    w.say(
        f"lr_find: {len(schedule)} steps from lr {schedule[0]:.3g} to {schedule[-1]:.3g} at global batch "
        f"{plan.global_batch} ({plan.micro_batch} x {plan.grad_accum} x {plan.world_size})"
    )
    tried, losses = lr_find.range_test(
        eng.model, eng.optimizer, steps, w.recipe.count, schedule=schedule, diverge=w.cfg.lr_find.diverge,
        device=w.device, precision=w.cfg.train.precision, grad_clip=w.cfg.train.grad_clip, progress=w.say,
    )
    found = lr_find.suggest(tried, lr_find.smooth(losses), w.cfg.lr_find.diverge)
    for i, (lr, loss) in enumerate(zip(tried, losses, strict=True)):
        w.tracker.log_metrics({"lr_find_lr": lr, "lr_find_loss": loss}, i + 1)
    if w.rank == 0:  # the curve's files: the one upload a worker makes itself (its MLflow import after the sweep)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        with tempfile.TemporaryDirectory() as tmp:
            for path in lr_find.save_curve(tried, losses, found, Path(tmp)):
                client.log_artifact(run_id, str(path), "lr_find")
    summary = {f"lr_find_{k}": v for k, v in found.items() if v is not None} | {"lr_find_steps": len(tried)}
    w.tracker.log_metrics(summary, len(tried))
    w.tracker.log_dict({**found, "steps": len(tried), "global_batch": plan.global_batch}, "lr_find/result.json")


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


def convert_norm(model: nn.Module, policy: str) -> nn.Module:
    """The plan's BatchNorm policy applied: sync_bn, group_norm, frozen_bn; else unchanged."""
    if policy == "sync_bn":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if policy not in ("group_norm", "frozen_bn"):
        return model
    from torchvision.ops import FrozenBatchNorm2d

    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            c = child.num_features
            if policy == "group_norm":  # 32 groups (Wu & He 2018), fewer when channels do not divide
                new: nn.Module = nn.GroupNorm(math.gcd(32, c), c, eps=child.eps)
            else:
                new = FrozenBatchNorm2d(c, eps=child.eps)
                new.load_state_dict(child.state_dict(), strict=False)  # running stats and affine, frozen
            setattr(model, name, new)
        else:
            convert_norm(child, policy)
    return model
