"""The Trainer's hooks: each one thing a run does besides the step, with its own state.

``build_hooks`` sets their order (detectron2's ``build_hooks``): it matters where one hook
uses what another made in the same step. Hooks talk to the outside only through what they
are given (the tracker, rank 0's console, the checkpoint callback), so the Trainer runs without
Ray in tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from launcher.step import all_sum, sync_buffers
from launcher.trainer import HookBase, StepInfo, Trainer

if TYPE_CHECKING:
    from torch.optim.swa_utils import AveragedModel

    from launcher.data import SampleLedger
    from launcher.noise import LocalGradNorm, NoiseScale
    from launcher.planner import Plan
    from launcher.tracking import Tracker

def every(n: int, info: StepInfo) -> bool:
    """A periodic hook's step: every ``n`` steps (0: never) and at the last one."""
    return bool(n and info.done % n == 0) or info.last


class StartupTiming(HookBase):
    """Seconds from the command to the first optimizer step, by phase: logged and printed once per run."""

    def __init__(self, stamps: dict[str, float]) -> None:
        self.stamps = stamps

    def after_step(self, trainer: Trainer, info: StepInfo) -> None:
        if info.done != trainer.start_step + 1:
            return
        phases = startup_phases(self.stamps, time.time())
        trainer.tracker.log_metrics(phases, info.done)
        trainer.say(
            f"first optimizer step {phases['time_to_first_step_s']:.1f}s after the command started ("
            + ", ".join(f"{k[8:-2]} {v:.1f}" for k, v in phases.items() if k.startswith("startup_"))
            + ")"
        )


def startup_phases(stamps: dict[str, float], now: float) -> dict[str, float]:
    """Seconds from the command to the first optimizer step, and per phase.

    ``stamps`` are wall-clock times, ``<phase>_done_at``, taken by the driver (config, connect,
    plan, data, tracking, ray) and by rank 0 (workers: Ray Train's controller, the worker group
    and the process group; worker_data; worker_model: model, DDP, optimizer, restore, loader).
    A phase lasts from the stamp before it to its own, so phases that overlap (the MLflow run opens
    while the embedded Ray starts) count only the time after the one that ended first; on a cluster
    the driver's and rank 0's clocks may differ a little.
    """
    order = sorted((t, k) for k, t in {**stamps, "first_step_done_at": now}.items() if k.endswith("_done_at"))
    phases, last = {}, stamps["launched_at"]
    for t, k in order:
        phases[f"startup_{k.removesuffix('_done_at')}_s"] = t - last
        last = t
    return {"time_to_first_step_s": now - stamps["launched_at"], **phases}


class NoiseScaleHook(HookBase):
    """The gradient noise scale (``launcher/noise.py``) from each step's local and global gradient norms.

    This rank's squared norm rides the step's scalar all-reduce as ``noise_local_sq``; the global
    one is the norm the step computed for clipping anyway.
    """

    def __init__(self, local_norm: LocalGradNorm, estimator: NoiseScale) -> None:
        self.local_norm, self.estimator = local_norm, estimator
        self.latest: dict[str, float] = {}

    def before_train(self, trainer: Trainer) -> None:
        trainer.scalars.register("noise_local_sq", self._local_sq)

    def _local_sq(self) -> float:
        return float(self.local_norm.sq) if self.local_norm.sq is not None else 0.0

    def before_step(self, trainer: Trainer) -> None:
        self.local_norm.reset()

    def after_step(self, trainer: Trainer, info: StepInfo) -> None:
        norm = info.result.grad_norm
        if norm is not None:
            world = trainer.plan.world_size
            self.latest = self.estimator.update(info.result.scalars["noise_local_sq"] / world, norm**2)


class EMAHook(HookBase):
    """An exponential moving average of the weights (and BN statistics), updated after every step."""

    def __init__(self, ema: AveragedModel) -> None:
        self.ema = ema

    def after_step(self, trainer: Trainer, info: StepInfo) -> None:
        self.ema.update_parameters(trainer.raw_model)


class LedgerEnd(HookBase):
    """The sample ledger ends at the last step trained: a graceful stop drops the step fetched ahead."""

    def __init__(self, ledger: SampleLedger) -> None:
        self.ledger = ledger

    def after_train(self, trainer: Trainer) -> None:
        self.ledger.roll_back(self.ledger.path, trainer.done)


class Metrics(HookBase):
    """The metrics window: per-term losses over the steps since the last log, throughput, lr.

    At each log step (and the last): one all-reduce of the window's loss sums, then the
    tracker and the console: the metrics, the ETA and the plain ``step N/M | ...`` line to the
    driver's progress display (``Trainer.progress``), or the line said. Throughput counts
    training time only (``Trainer.clock``: evaluation and checkpoints pause it). Nothing goes to
    Ray Train here: its ``report`` waits until the controller has taken the previous one (it polls
    every 2 s), which capped a smoke run at one log window per 2 s; rank 0's tracker posts the metrics
    to the driver, which logs them to MLflow (``launcher/tracking.py``), and checkpoints are reported.
    """

    def __init__(self, log_every: int, extras: list[Callable[[], dict[str, float]]]) -> None:
        self.log_every, self.extras = log_every, extras
        self._reset(0.0)

    def _reset(self, now: float) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, float] = {}
        self.steps, self.since = 0, now

    def before_train(self, trainer: Trainer) -> None:
        self._reset(trainer.clock.seconds())

    def after_step(self, trainer: Trainer, info: StepInfo) -> None:
        for k, v in info.result.sums.items():
            self.sums[k] = self.sums.get(k, 0) + v
            self.counts[k] = self.counts.get(k, 0) + info.result.totals[k]
        self.steps += 1
        if info.done % self.log_every and not info.last:
            return
        now = trainer.clock.seconds()
        metrics = self._metrics(trainer.plan, info, now - self.since)
        trainer.tracker.log_metrics(metrics, info.done)
        eta_s = (trainer.plan.max_steps - info.done) * (now - self.since) / self.steps
        line = self._line(trainer.plan, info.done, metrics, eta_s)
        if trainer.progress is not None:  # the driver's progress display: these numbers, not its own
            trainer.progress({**metrics, "step": info.done, "max_steps": trainer.plan.max_steps,
                              "world_size": trainer.plan.world_size, "eta_s": eta_s, "line": line})
        else:
            trainer.say(line)
        trainer.metrics = metrics
        self._reset(now)

    def _metrics(self, plan: Plan, info: StepInfo, elapsed: float) -> dict[str, float]:
        keys = sorted(self.sums)
        reduced = all_sum(torch.stack([self.sums[k] for k in keys]))
        metrics = {k: float(reduced[i] / self.counts[k]) for i, k in enumerate(keys)}
        metrics["loss"] = float(sum(metrics[k] for k in keys))
        metrics["lr"] = info.lr
        metrics["samples_per_s"] = plan.global_batch * self.steps / elapsed
        metrics["grad_accum"] = info.result.grad_accum  # as the step ran: out-of-memory back-offs change them
        metrics["micro_batch"] = info.result.micro_batch
        for extra in self.extras:
            metrics.update(extra())
        return metrics

    def _line(self, plan: Plan, done: int, metrics: dict[str, float], eta_s: float) -> str:
        terms = " ".join(f"{k} {metrics[k]:.3f}" for k in sorted(self.sums))
        noise = f" | noise scale {metrics['noise_scale']:.4g}" if "noise_scale" in metrics else ""
        return (
            f"step {done}/{plan.max_steps} | loss {metrics['loss']:.4f} ({terms}) | "
            f"lr {metrics['lr']:.3g}{noise} | {metrics['samples_per_s']:.1f} samples/s | eta {eta_s:.0f}s"
        )


class Evaluate(HookBase):
    """Evaluation every ``eval_every`` steps and at the end: the model, and its EMA on the same samples.

    ``samples`` is how many distinct samples each evaluation covers over all ranks (the split's size
    unless ``train.eval_batches`` limits it); it is logged with the metrics as ``eval_samples``.
    """

    def __init__(
        self, eval_every: int, evaluate: Callable[[nn.Module], dict[str, float]], ema: nn.Module | None, samples: int
    ) -> None:
        self.eval_every, self.evaluate, self.ema, self.samples = eval_every, evaluate, ema, samples

    def after_step(self, trainer: Trainer, info: StepInfo) -> None:
        if not every(self.eval_every, info):
            return
        with trainer.clock.paused():
            results = {"eval_samples": float(self.samples), **self.evaluate(trainer.model)}
            if self.ema is not None:
                averaged = self.evaluate(self.ema)
                results.update({k.replace("eval_", "eval_ema_", 1): v for k, v in averaged.items()})
        trainer.tracker.log_metrics(results, info.done)
        shown = " ".join(f"{k} {v:.4f}" for k, v in results.items() if k != "eval_samples")
        trainer.say(f"eval at step {info.done} on {self.samples} samples: {shown}")
        trainer.metrics.update(results)


class PeriodicCheckpoint(HookBase):
    """A checkpoint every ``checkpoint_every`` steps and at the end (a graceful stop included)."""

    def __init__(self, checkpoint_every: int, save: Callable[[int, dict[str, float]], None]) -> None:
        self.checkpoint_every, self.save = checkpoint_every, save

    def after_step(self, trainer: Trainer, info: StepInfo) -> None:
        if not every(self.checkpoint_every, info):
            return
        with trainer.clock.paused():
            sync_buffers(trainer.model)
            self.save(info.done, trainer.metrics)
        trainer.say(f"checkpoint at step {info.done}")


class GracefulStop(HookBase):
    """A stop asked on the driver (Ctrl-C, SIGTERM, ``action=stop``) ends the run after the current step.

    Rank 0 polls (``poll``); the answer rides the step's scalar all-reduce as ``stop``, so every
    rank stops at the same step. Every rank registers it, so the reduction has the same shape.
    """

    def __init__(self, poll: Callable[[], bool] | None) -> None:
        self.poll = poll

    def before_train(self, trainer: Trainer) -> None:
        trainer.scalars.register("stop", lambda: float(self.poll()) if self.poll is not None else 0.0)

    def after_step(self, trainer: Trainer, info: StepInfo) -> None:
        if info.stop:
            trainer.say(
                f"stopped at step {info.done} of {trainer.plan.max_steps} as asked; the checkpoint above resumes it"
            )


class WorkerGroup(HookBase):
    """Rank 0's record of the worker group training: the ``world_size`` metric at its first step, the
    last step finished (to the run's control actor, after every step), and for a group that restarts
    the run how long its start took (metrics ``restart_*_s``: re-plan, data, restore, first step),
    in ``plans/step_<N>.json`` too after an elastic resize."""

    def __init__(self, group: dict[str, Any], stamps: dict[str, float], reached: Callable[[int], None]) -> None:
        self.group, self.stamps, self.reached = group, stamps, reached

    def before_train(self, trainer: Trainer) -> None:
        trainer.tracker.log_metrics({"world_size": trainer.plan.world_size}, trainer.start_step)

    def after_step(self, trainer: Trainer, info: StepInfo) -> None:
        self.reached(info.done)
        if info.done != trainer.start_step + 1 or (self.group["first"] and not self.group["resized"]):
            return
        t = self.stamps
        timings = {"started_at": t["workers_done_at"], "replan_s": t["replanned_at"] - t["workers_done_at"],
                   "data_s": t["worker_data_done_at"] - t["replanned_at"],
                   "restore_s": t["worker_model_done_at"] - t["worker_data_done_at"],
                   "first_step_s": time.time() - t["worker_model_done_at"]}  # fmt: skip
        if not self.group["first"]:
            trainer.tracker.log_metrics({f"restart_{k}": v for k, v in timings.items()}, info.done)
        if self.group["resized"]:
            record = {**self.group["record"], "timings": timings}
            trainer.tracker.log_dict(record, f"plans/step_{trainer.start_step}.json")


def build_hooks(
    *,
    log_every: int,
    eval_every: int,
    checkpoint_every: int,
    evaluate: Callable[[nn.Module], dict[str, float]],
    eval_samples: int,
    save: Callable[[int, dict[str, float]], None],
    poll: Callable[[], bool] | None,
    startup: dict[str, float] | None = None,
    ema: AveragedModel | None = None,
    noise: tuple[LocalGradNorm, NoiseScale] | None = None,
    group: WorkerGroup | None = None,
    hold: Callable[[int, Callable[[str], None]], None] | None = None,
) -> list[HookBase]:
    """The hooks of a training run, in the order they run after each step."""
    hooks: list[HookBase] = []
    if startup is not None:  # first: the first step's time, before other hooks add theirs
        hooks.append(StartupTiming(startup))
    if group is not None:  # rank 0
        hooks.append(group)
    noise_hook = NoiseScaleHook(*noise) if noise is not None else None
    if noise_hook is not None:  # before Metrics: its estimate goes into this step's log line
        hooks.append(noise_hook)
    if ema is not None:  # before Evaluate: the averaged weights include this step
        hooks.append(EMAHook(ema))
    # the log line, then evaluation (which adds to the metrics), then the checkpoint (which
    # reports those metrics to Ray with it), then the stop message below the checkpoint line
    extras: list[Callable[[], dict[str, float]]] = [lambda: noise_hook.latest] if noise_hook is not None else []
    hooks.append(Metrics(log_every, extras))
    hooks.append(Evaluate(eval_every, evaluate, ema, eval_samples))
    hooks.append(PeriodicCheckpoint(checkpoint_every, save))
    hooks.append(GracefulStop(poll))
    if hold is not None:  # fault injection (launcher/faults.py): last, once the step is done and saved
        hooks.append(Hold(hold))
    return hooks


class Hold(HookBase):
    def __init__(self, hold: Callable[[int, Callable[[str], None]], None]) -> None:
        self.hold = hold

    def after_step(self, trainer: Trainer, info: StepInfo) -> None:
        self.hold(info.done, trainer.say)


def back_off_notice(plan: Plan, tracker: Tracker, say: Callable[[str], None]) -> Callable[[dict[str, Any]], None]:
    """What ``DDPStep`` calls after an out-of-memory back-off: the console line and an ``oom/step_N.json`` record.

    The line names the split before and after (micro-batch x count per rank, ``launcher/step.py:
    describe``) and why this one: the fewest micro-batches whose largest is below the one that failed.
    """

    def notice(event: dict[str, Any]) -> None:
        reason = (
            f"out of memory at micro-batch {event['size']} (step {event['step']}): micro-batch {event['from']} -> "
            f"{event['to']} per rank x world {plan.world_size} (the fewest micro-batches whose largest is below "
            f"{event['size']}); retrying the step, global batch {plan.global_batch} unchanged"
        )
        say(reason)
        record = {k: event[k] for k in ("step", "size", "micro_batch", "grad_accum", "from", "to")}
        tracker.log_dict({**record, "reason": reason}, f"oom/step_{event['step']}.json")

    return notice
