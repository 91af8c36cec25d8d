"""The Trainer: a short loop over optimizer steps, and hooks that do everything else.

``fit()`` reads top to bottom: before-train hooks; per step: take the step's micro-batches
(and the next step's, fetched one step ahead: their unit counts ride with this step's
all-reduce, ``launcher/step.py: Units``), run the step object (``launcher/step.py``: DDP or
DeepSpeed, chosen once), step the lr schedule, call every hook's ``after_step``; after-train
hooks. What a run does beyond that (metrics and the console, EMA, noise scale, evaluation,
checkpoints, start-up timing, a graceful stop) is a hook with its own state
(``launcher/hooks.py``, where their order is set).

Every piece that must survive a restart exposes ``state_dict``/``load_state_dict`` and is
handed to the checkpointer by name (``launcher/checkpoint.py``); the step is the data
position (``launcher/data.py: StepBatches``), so a restored step resumes the sample stream.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from launcher.step import Batch, StepResult, StepScalars

if TYPE_CHECKING:
    from launcher.planner import Plan
    from launcher.tracking import Tracker

StepFn = Callable[[list[Batch], int, "list[Batch] | None"], StepResult]  # (micro-batches, step, the next step's)


@dataclass
class StepInfo:
    """What hooks see after a step: ``done`` optimizer steps so far, the lr this step used, its result."""

    done: int
    lr: float
    result: StepResult
    last: bool  # the final step of this run: max_steps reached, or a stop was asked

    @property
    def stop(self) -> bool:
        return self.result.scalars.get("stop", 0.0) > 0


class HookBase:
    """A hook: override what it needs. Hooks run in the order ``hooks.build_hooks`` gives them."""

    def before_train(self, trainer: Trainer) -> None:
        """Once, before the first step (after any restore)."""

    def before_step(self, trainer: Trainer) -> None:
        """Before each step (its micro-batches were fetched with the previous step, except the first's)."""

    def after_step(self, trainer: Trainer, info: StepInfo) -> None:
        """After each optimizer step and lr-schedule step."""

    def after_train(self, trainer: Trainer) -> None:
        """Once, after the last step (also after a graceful stop)."""


class TrainClock:
    """Seconds spent training: hooks that spend time on something else (eval, checkpoints) pause it."""

    def __init__(self) -> None:
        self._paused_s = 0.0
        self._origin = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self._origin - self._paused_s

    @contextmanager
    def paused(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self._paused_s += time.perf_counter() - started


@dataclass
class Trainer:
    """The loop's state: the model, how to take one step, the schedule, the batches and the hooks."""

    model: nn.Module  # as trained (DDP- or DeepSpeed-wrapped)
    step_fn: StepFn
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: Iterator[Batch]  # this rank's micro-batches, from the start step on
    plan: Plan
    start_step: int
    hooks: list[HookBase]
    tracker: Tracker
    say: Callable[[str], None]  # rank 0's console; a no-op elsewhere
    # rank 0: each log step's metrics to the driver's progress display (launcher/console.py), its
    # plain line in event["line"]; None: that line is said
    progress: Callable[[dict[str, Any]], None] | None = None
    scalars: StepScalars = field(default_factory=StepScalars)  # the per-step all-reduced scalars, by name
    metrics: dict[str, float] = field(default_factory=dict)  # the latest logged metrics (hooks fill it)
    clock: TrainClock = field(default_factory=TrainClock)
    done: int = 0  # optimizer steps done (the data position): ``start_step`` until the first step ends

    @property
    def raw_model(self) -> nn.Module:
        return getattr(self.model, "module", self.model)

    def fit(self) -> dict[str, float]:
        """Train from ``start_step`` to ``plan.max_steps`` (or a graceful stop); the last metrics."""
        self.model.train()
        self.clock = TrainClock()
        self.done = self.start_step
        for hook in self.hooks:
            hook.before_train(self)
        upcoming: list[Batch] | None = None
        for step in range(self.start_step, self.plan.max_steps):
            for hook in self.hooks:
                hook.before_step(self)
            micro = upcoming or self._take()
            upcoming = self._take() if step + 1 < self.plan.max_steps else None
            lr = float(self.scheduler.get_last_lr()[0])  # the lr this step uses
            result = self.step_fn(micro, step, upcoming)
            self.scheduler.step()
            self.done = done = step + 1
            info = StepInfo(done=done, lr=lr, result=result, last=done == self.plan.max_steps)
            info.last = info.last or info.stop
            for hook in self.hooks:
                hook.after_step(self, info)
            if info.stop:
                break
        for hook in self.hooks:
            hook.after_train(self)
        return self.metrics

    def _take(self) -> list[Batch]:
        return [next(self.batches) for _ in range(self.plan.grad_accum)]

