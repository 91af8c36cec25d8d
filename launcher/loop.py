"""The generic training loop: any recipe, any world size, read top to bottom.

Batch arithmetic (see launcher/planner.py): each optimizer step consumes ``global_batch =
micro_batch x grad_accum x world_size`` samples. A recipe's model returns loss *sums*
(e.g. summed cross-entropy over masked tokens); the loop divides each by the number of
units (tokens, sentences, images) in the whole global batch, counted before the first
micro-step and all-reduced once. Because DDP averages gradients over ranks, each rank
scales its loss by the world size. The result is the gradient of the global-batch mean,
exactly, however the batch is split and however many tokens each micro-batch holds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from launcher.noise import LocalGradNorm, NoiseScale
from launcher.planner import Plan
from launcher.tracking import Tracker

Batch = dict[str, torch.Tensor]


@dataclass
class Hooks:
    """What the loop calls out to; the worker fills them in (Ray reports, checkpoints)."""

    report: Callable[[int, dict[str, float]], None]  # every log step, on every rank
    checkpoint: Callable[[int, dict[str, float]], None]  # every checkpoint step, on every rank
    print: Callable[[str], None]  # rank 0's console; a no-op elsewhere
    stop: Callable[[], bool] = lambda: False  # rank 0: was a graceful stop asked for (Ctrl-C, SIGTERM)?


@dataclass
class StepResult:
    sums: dict[str, torch.Tensor]  # this rank's loss sums per term
    totals: dict[str, torch.Tensor]  # the global batch's unit counts per term
    small_sq: float | None = None  # |G_small|^2, mean over ranks (noise scale only)
    big_sq: float | None = None  # |G_big|^2
    stop: bool = False  # some rank was asked to stop after this step


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(values)
    return values


def sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running stats) on every rank, before eval and checkpoints."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for b in getattr(model, "module", model).buffers():
            dist.broadcast(b, 0)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def autocast(device: torch.device, precision: str) -> Any:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def split(batch: Batch, parts: int) -> list[Batch]:
    """``batch`` cut into up to ``parts`` non-empty pieces along the sample dimension."""
    cut = {k: v.tensor_split(parts) for k, v in batch.items()}
    pieces = [{k: cut[k][i] for k in batch} for i in range(parts)]
    return [p for p in pieces if batch_size(p)]


def batch_size(batch: Batch) -> int:
    return len(next(iter(batch.values())))


class SavedBytes:
    """Bytes autograd saves for backward (a ``saved_tensors_hooks`` pack hook), each tensor once:
    a ReLU output that the next layer also saves counts once; a view counts the bytes it spans;
    parameters (``skip``) do not count."""

    def __init__(self, skip: Iterable[torch.Tensor] = ()) -> None:
        self.skip = {p.data_ptr() for p in skip}
        self.seen: set[tuple[int, ...]] = set()
        self.total = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            ptr = t.data_ptr()
        except RuntimeError:  # sparse or storage-less: no address to share
            ptr = 0
        if ptr and ptr in self.skip:
            return t
        key = (ptr, t.numel(), t.element_size()) if ptr else (id(t),)
        if key not in self.seen:
            self.seen.add(key)
            self.total += t.numel() * t.element_size()
        return t


def memory_limit(model: nn.Module) -> Any:
    """Fault injection for tests: ``$LAUNCHER_INJECT_MEMORY_LIMIT`` bytes of saved activations per forward,
    counted as the memory estimate counts them (``SavedBytes``).

    A forward pass that makes autograd save more than that raises ``torch.OutOfMemoryError``,
    as a device would, so the OOM back-off runs on CPU. Unset (always, outside tests): no hook.
    """
    limit = int(os.environ.get("LAUNCHER_INJECT_MEMORY_LIMIT", "0"))
    if not limit:
        return nullcontext()
    saved = SavedBytes(model.parameters())

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.pack(t)
        if saved.total > limit:
            raise torch.OutOfMemoryError(f"injected: {saved.total} bytes of activations > {limit}")
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[Batch],
    count: Callable[[Batch], dict[str, int]],
    *,
    device: torch.device,
    precision: str = "fp32",
    grad_clip: float | None = None,
    local_norm: LocalGradNorm | None = None,
    stop: bool = False,
) -> StepResult | None:
    """One optimizer step over this rank's micro-batches: local loss sums and global counts.

    With ``local_norm`` (the DDP hook of ``launcher/noise.py``) it also returns the squared
    norms the noise scale needs: this rank's gradient (averaged over ranks in the all-reduce
    below, which runs anyway) and the all-reduced one. ``stop`` (a graceful stop asked on
    this rank) rides the same all-reduce, so every rank learns it at the same step.

    Returns None, with gradients cleared and no step taken, when any rank ran out of memory;
    all ranks learn it from one all-reduce and back off together. DDP's only collective is
    the all-reduce in the final micro-step's backward (the worker turns off DDP's per-forward
    buffer broadcast), so a rank that ran out skips its remaining micro-batches and runs the
    final one on a single sample with a zero loss: its all-reduce lines up with the others'.
    """
    totals = global_counts(micro_batches, count, device)
    world = world_size()
    no_sync = getattr(model, "no_sync", None)
    sums: dict[str, torch.Tensor] = {}
    oom = False
    if local_norm is not None:
        local_norm.reset()
    for i, batch in enumerate(micro_batches):
        final = i == len(micro_batches) - 1
        if oom and not final:
            continue
        with nullcontext() if final or no_sync is None else no_sync():
            if not oom:
                try:
                    with autocast(device, precision), memory_limit(model):
                        out = model(to_device(batch, device))
                        loss = sum(out[k] / totals[k] for k in out) * world
                except torch.OutOfMemoryError:
                    oom = True
                    out = loss = None  # type: ignore[assignment]
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                else:
                    try:
                        loss.backward()
                    except torch.OutOfMemoryError as e:
                        if final and no_sync is not None:  # DDP is mid all-reduce: ranks cannot be realigned
                            raise RuntimeError(
                                f"out of memory in the gradient-synchronizing backward at micro-batch "
                                f"{batch_size(batch)}; the last checkpoint is intact: rerun with a smaller "
                                "batch.micro_batch"
                            ) from e
                        oom = True
                        out = loss = None  # type: ignore[assignment]
                    else:
                        for k, v in out.items():
                            sums[k] = sums.get(k, 0) + v.detach().double()
            if oom and final and no_sync is not None:  # stand-in so DDP's all-reduce matches the other ranks'
                with autocast(device, precision):
                    out = model(to_device(split(batch, batch_size(batch))[0], device))
                    loss = sum(v * 0.0 for v in out.values())
                loss.backward()
    local_sq = local_norm.sq if local_norm is not None and local_norm.sq is not None else 0.0
    flags = all_sum(
        torch.tensor([float(oom), float(local_sq), float(stop)], dtype=torch.float64, device=device)
    ).tolist()
    if flags[0]:
        optimizer.zero_grad(set_to_none=True)
        return None
    result = StepResult(sums, {k: totals[k] for k in sums}, stop=flags[2] > 0)
    params = [p for p in model.parameters() if p.grad is not None]
    if local_norm is not None:
        norm = nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        result.small_sq, result.big_sq = flags[1] / world, float(norm) ** 2
        if grad_clip:
            nn.utils.clip_grads_with_norm_(params, grad_clip, norm)
    elif grad_clip:
        nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return result


def deepspeed_step(
    engine: Any, micro_batches: list[Batch], count: Callable[[Batch], dict[str, int]], *, device: torch.device,
    stop: bool = False,
) -> StepResult:
    """One optimizer step through a DeepSpeed engine, with the same loss normalization as ``train_step``.

    The engine counts micro-steps: ``engine.step()`` after each backward runs the (ZeRO)
    gradient reduction, clipping (``gradient_clipping`` in its config) and the optimizer only
    at the accumulation boundary. ``scale_wrt_gas=False``: the loss is already divided by the
    global batch's units, as for DDP. Precision is DeepSpeed's (``bf16`` in its config).
    """
    totals = global_counts(micro_batches, count, device)
    world = world_size()
    sums: dict[str, torch.Tensor] = {}
    for batch in micro_batches:
        out = engine(to_device(batch, device))
        loss = sum(out[k] / totals[k] for k in out) * world
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()
        for k, v in out.items():
            sums[k] = sums.get(k, 0) + v.detach().double()
    asked = all_sum(torch.tensor([float(stop)], dtype=torch.float64, device=device)).item()
    return StepResult(sums, {k: totals[k] for k in sums}, stop=asked > 0)


def global_counts(
    micro_batches: list[Batch], count: Callable[[Batch], dict[str, int]], device: torch.device
) -> dict[str, torch.Tensor]:
    """Units (tokens, pairs, images) per loss term in the whole global batch: one all-reduce."""
    keys = sorted(count(micro_batches[0]))
    local = torch.tensor([[count(b)[k] for k in keys] for b in micro_batches], dtype=torch.float64).sum(0)
    return dict(zip(keys, all_sum(local.to(device)).clamp(min=1), strict=True))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    count: Callable[[Batch], dict[str, int]],
    device: torch.device,
    precision: str,
    keys: list[str],
) -> dict[str, float]:
    """Mean of each metric in ``keys`` (as the model returns it in eval mode) over all ranks' shares."""
    sync_buffers(model)
    module = getattr(model, "module", model)  # no DDP forward: ranks may hold different counts
    module.eval()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for batch in batches:
        with autocast(device, precision):
            out = module(to_device(batch, device))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
            counts[k] = counts.get(k, 0.0) + count(batch)[k]
    module.train()
    both = all_sum(
        torch.tensor(
            [sums.get(k, 0.0) for k in keys] + [counts.get(k, 0.0) for k in keys], dtype=torch.float64, device=device
        )
    )
    n = len(keys)
    return {f"eval_{k}": float(both[i] / both[n + i].clamp(min=1)) for i, k in enumerate(keys)}


def startup_phases(stamps: dict[str, float], now: float) -> dict[str, float]:
    """Seconds from the command to the first optimizer step, and per phase.

    ``stamps`` are wall-clock times, ``<phase>_done_at``, taken by the driver (config, connect,
    data, plan, tracking, ray) and by rank 0 (workers: Ray Train's controller, the worker group
    and the process group; worker_data; worker_model: model, DDP, optimizer, restore, loader).
    A phase lasts from the stamp before it to its own; on a cluster the driver's and rank 0's
    clocks may differ a little.
    """
    order = sorted((t, k) for k, t in {**stamps, "first_step_done_at": now}.items() if k.endswith("_done_at"))
    phases, last = {}, stamps["launched_at"]
    for t, k in order:
        phases[f"startup_{k.removesuffix('_done_at')}_s"] = t - last
        last = t
    return {"time_to_first_step_s": now - stamps["launched_at"], **phases}


def run(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: Iterator[Batch],
    evaluate_model: Callable[[nn.Module], dict[str, float]],  # model (or its EMA) -> eval_* metrics
    count: Callable[[Batch], dict[str, int]],
    plan: Plan,
    start_step: int,
    device: torch.device,
    precision: str,
    grad_clip: float | None,
    log_every: int,
    eval_every: int,
    checkpoint_every: int,
    tracker: Tracker,
    hooks: Hooks,
    startup: dict[str, float] | None = None,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
    noise: tuple[LocalGradNorm, NoiseScale] | None = None,
) -> dict[str, float]:
    """Train from ``start_step`` to ``plan.max_steps``; returns the last metrics."""
    window: dict[str, torch.Tensor] = {}
    window_counts: dict[str, torch.Tensor] = {}
    window_start, window_steps = time.perf_counter(), 0
    metrics: dict[str, float] = {}
    parts = 1  # each planned micro-batch is cut into this many after out-of-memory back-offs
    noise_metrics: dict[str, float] = {}
    model.train()
    for step in range(start_step, plan.max_steps):
        micro = [next(batches) for _ in range(plan.grad_accum)]
        lr = float(scheduler.get_last_lr()[0])  # the lr this step used
        result: StepResult | None
        if plan.engine == "deepspeed":  # DeepSpeed reduces, clips and steps; no OOM back-off there
            result = deepspeed_step(model, micro, count, device=device, stop=hooks.stop())
        else:
            while True:
                pieces = micro if parts == 1 else [piece for b in micro for piece in split(b, parts)]
                result = train_step(
                    model,
                    optimizer,
                    pieces,
                    count,
                    device=device,
                    precision=precision,
                    grad_clip=grad_clip,
                    local_norm=noise[0] if noise else None,
                    stop=hooks.stop(),
                )
                if result is not None:
                    break
                parts = _back_off(parts, max(batch_size(b) for b in pieces), step + 1, plan, tracker, hooks)
        assert result is not None  # the loop above ends only with a step taken
        sums, totals = result.sums, result.totals
        if noise is not None and result.small_sq is not None and result.big_sq is not None:
            noise_metrics = noise[1].update(result.small_sq, result.big_sq)
        if ema is not None:
            ema.update_parameters(getattr(model, "module", model))
        scheduler.step()
        for k in sums:
            window[k] = window.get(k, 0) + sums[k]
            window_counts[k] = window_counts.get(k, 0) + totals[k]
        window_steps += 1
        done = step + 1
        if startup is not None and step == start_step:  # command -> first optimizer step, by phase
            phases = startup_phases(startup, time.time())
            tracker.log_metrics(phases, done)
            hooks.print(
                f"first optimizer step {phases['time_to_first_step_s']:.1f}s after the command started ("
                + ", ".join(f"{k[8:-2]} {v:.1f}" for k, v in phases.items() if k.startswith("startup_"))
                + ")"
            )
        last = done == plan.max_steps or result.stop

        if done % log_every == 0 or last:
            keys = sorted(window)
            reduced = all_sum(torch.stack([window[k] for k in keys]))
            elapsed = time.perf_counter() - window_start
            metrics = {k: float(reduced[i] / window_counts[k]) for i, k in enumerate(keys)}
            metrics["loss"] = float(sum(metrics[k] for k in keys))
            metrics["lr"] = lr
            metrics["samples_per_s"] = plan.global_batch * window_steps / elapsed
            metrics["grad_accum"] = plan.grad_accum * parts
            metrics["micro_batch"] = -(-plan.micro_batch // parts)
            metrics.update(noise_metrics)
            tracker.log_metrics(metrics, done)
            terms = " ".join(f"{k} {metrics[k]:.3f}" for k in keys)
            extra = f" | noise scale {noise_metrics['noise_scale']:.4g}" if noise_metrics else ""
            eta = (plan.max_steps - done) * elapsed / window_steps
            hooks.print(
                f"step {done}/{plan.max_steps} | loss {metrics['loss']:.4f} ({terms}) | "
                f"lr {metrics['lr']:.3g}{extra} | {metrics['samples_per_s']:.1f} samples/s | eta {eta:.0f}s"
            )
            hooks.report(done, metrics)
            window, window_counts, window_steps = {}, {}, 0
            window_start = time.perf_counter()

        if (eval_every and done % eval_every == 0) or last:
            results = evaluate_model(model)
            if ema is not None:  # the averaged weights, on the same samples
                averaged = evaluate_model(ema)
                results.update({k.replace("eval_", "eval_ema_", 1): v for k, v in averaged.items()})
            tracker.log_metrics(results, done)
            hooks.print(f"eval at step {done}: " + " ".join(f"{k} {v:.4f}" for k, v in results.items()))
            metrics.update(results)
            window_start = time.perf_counter()  # evaluation time is not training throughput

        if (checkpoint_every and done % checkpoint_every == 0) or last:
            sync_buffers(model)
            hooks.checkpoint(done, metrics)
            window_start = time.perf_counter()
        if result.stop:
            hooks.print(f"stopped at step {done} of {plan.max_steps} as asked; the checkpoint above resumes it")
            break
    return metrics


def _back_off(parts: int, size: int, step: int, plan: Plan, tracker: Tracker, hooks: Hooks) -> int:
    """After an OOM on any rank: cut micro-batches in two, double accumulation; global batch unchanged."""
    if size == 1:
        raise RuntimeError(
            f"out of memory at micro-batch 1 (step {step}): the model states alone do not fit; "
            "try engine=deepspeed (action=plan says which ZeRO stage fits) or a smaller model"
        )
    parts *= 2
    micro, accum = -(-plan.micro_batch // parts), plan.grad_accum * parts
    reason = (
        f"out of memory at micro-batch {size} (step {step}): retrying the step at micro-batch {micro} x "
        f"accumulation {accum} x world {plan.world_size}; global batch {plan.global_batch} unchanged"
    )
    hooks.print(reason)
    event = {"step": step, "micro_batch": micro, "grad_accum": accum, "reason": reason}
    tracker.log_dict(event, f"oom/step_{step}.json")
    return parts
