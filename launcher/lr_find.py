"""The LR range test (Smith 2017, "Cyclical Learning Rates for Training Neural Networks", §3.3).

``action=lr_find`` trains for at most ``lr_find.steps`` optimizer steps at the planned
micro-batch, accumulation and world size, raising the lr exponentially from
``lr_find.min_lr`` to ``lr_find.max_lr``, and records the global-batch loss at each step.
It stops early once the smoothed loss exceeds ``lr_find.diverge`` times its minimum. The
model and optimizer are restored to their starting state afterwards.

Two lrs are read off the smoothed curve: the steepest descent (the most negative slope of
loss against log lr, before the minimum: the usual suggestion, as in fastai and Lightning)
and the divergence point (where the loss blows up: an upper bound, not a setting). The
suggested lr belongs to the planned global batch; ``optim.lr=<it>`` pins it there.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from launcher.step import BackOff, Batch, DDPStep, StepScalars, all_sum

SMOOTHING = 0.9  # EMA of the loss, bias-corrected: about the last 10 steps (fastai's 0.98 suits 100s of steps)


def lrs(steps: int, min_lr: float, max_lr: float) -> list[float]:
    """``steps`` lrs spaced evenly in log between ``min_lr`` and ``max_lr`` (both included)."""
    if steps == 1:
        return [min_lr]
    return [min_lr * (max_lr / min_lr) ** (i / (steps - 1)) for i in range(steps)]


def smooth(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    out, avg = [], 0.0
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def suggest(lr: list[float], smoothed: list[float], diverge: float) -> dict[str, float | None]:
    """Steepest descent before the minimum, the minimum, and the divergence point (None if not reached)."""
    finite = [i for i, v in enumerate(smoothed) if math.isfinite(v)]
    if not finite:
        raise RuntimeError(f"the loss was not finite even at lr {lr[0]:.3g}; lower lr_find.min_lr")
    low = min(finite, key=lambda i: smoothed[i])
    limit = diverge * smoothed[low]
    diverged = next((lr[i] for i in range(low, len(lr)) if not smoothed[i] <= limit), None)  # NaN too
    skip = max(1, low // 10)  # the first points are mostly the EMA warming up
    slopes = {
        i: (smoothed[i + 1] - smoothed[i - 1]) / (math.log(lr[i + 1]) - math.log(lr[i - 1]))
        for i in range(skip, low)
        if i + 1 < len(lr)
    }
    steepest = lr[min(slopes, key=lambda i: slopes[i])] if slopes else lr[low]
    return {"steepest_lr": steepest, "min_loss_lr": lr[low], "diverged_lr": diverged}


def range_test(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[list[Batch]],
    count: Callable[[Batch], dict[str, int]],
    *,
    schedule: list[float],
    diverge: float,
    device: torch.device,
    precision: str,
    grad_clip: float | None,
    progress: Callable[[str], None],
) -> tuple[list[float], list[float]]:
    """Run the sweep over ``schedule`` (one lr per step); return (lrs, losses) up to where it stopped.

    ``batches`` yields one optimizer step's micro-batches at a time. Every rank computes the
    same all-reduced loss, so every rank stops at the same step.
    """
    model_state = copy.deepcopy(model.state_dict())
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    tried: list[float] = []
    losses: list[float] = []
    best = math.inf
    step = DDPStep(model, optimizer, count, StepScalars(), device=device, precision=precision, grad_clip=grad_clip)
    try:
        for i, lr in enumerate(schedule):
            for group in optimizer.param_groups:
                group["lr"] = lr
            try:
                result = step.attempt(next(batches))
            except BackOff:
                raise RuntimeError(
                    "out of memory during lr_find at the planned micro-batch; pin a smaller batch.micro_batch"
                ) from None
            keys = sorted(result.sums)
            sums = all_sum(torch.stack([result.sums[k] for k in keys]))
            loss = float(sum(sums[j] / result.totals[k] for j, k in enumerate(keys)))
            tried.append(lr)
            losses.append(loss)
            smoothed = smooth(losses)[-1]
            best = min(best, smoothed)
            if (i + 1) % 10 == 0 or i == 0:
                progress(f"lr_find step {i + 1}/{len(schedule)} | lr {lr:.3g} | loss {loss:.4f}")
            if not math.isfinite(loss) or (i >= 5 and smoothed > diverge * best):
                progress(f"lr_find: loss diverged at lr {lr:.3g} (step {i + 1}); stopping")
                break
    finally:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
    return tried, losses


def save_curve(lr: list[float], losses: list[float], found: dict[str, Any], directory: Path) -> list[Path]:
    """``curve.csv`` (lr, loss, smoothed) and ``curve.png`` (loss vs lr, log x, the suggestion marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    smoothed = smooth(losses)
    csv = directory / "curve.csv"
    rows = zip(lr, losses, smoothed, strict=True)
    csv.write_text("lr,loss,smoothed_loss\n" + "".join(f"{a:.6g},{b:.6g},{c:.6g}\n" for a, b, c in rows))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lr, losses, color="0.75", lw=1, label="loss")
    ax.plot(lr, smoothed, color="C0", lw=2, label="smoothed")
    ax.axvline(found["steepest_lr"], color="C2", ls="--", label=f"steepest descent {found['steepest_lr']:.2g}")
    if found["diverged_lr"] is not None:
        ax.axvline(found["diverged_lr"], color="C3", ls=":", label=f"diverges {found['diverged_lr']:.2g}")
    finite = [v for v in smoothed + losses if math.isfinite(v)]
    ax.set_ylim(min(finite) * 0.95, min(max(finite), 2 * min(smoothed)) * 1.05)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (at the planned global batch)")
    ax.set_ylabel("training loss")
    ax.set_title("LR range test")
    ax.legend()
    fig.tight_layout()
    png = directory / "curve.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return [csv, png]
