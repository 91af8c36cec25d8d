"""The gradient noise scale, measured from what a data-parallel step already computes.

McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training",
appendix A.1. Each optimizer step holds two gradient estimates of the same loss:

    G_small  one rank's gradient over its own B_small = micro x accum samples
             (DDP hands it to the communication hook below before the all-reduce)
    G_big    the all-reduced gradient over the whole B_big = global batch

With E|G_B|^2 = |G|^2 + tr(S) / B, the two squared norms give unbiased estimates of

    |G|^2  = (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(S)  = (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

each one noisy, so both are smoothed with an exponential moving average (bias-corrected)
and the simple noise scale is their ratio, B_simple = tr(S) / |G|^2: the critical batch
above which a bigger batch buys little speed. |G_small|^2 is averaged over the ranks in
the all-reduce the loop already does per step; no extra collective, no extra backward.

The unit is samples (the global batch's unit). For recipes whose loss is normalized over
tokens or boxes, G_small is exact when the ranks hold equal shares of them, close otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

DECAY = 0.95  # EMA decay of the two estimates (about the last 20 steps)


class LocalGradNorm:
    """A DDP communication hook: adds up this rank's squared gradient norm, bucket by bucket,
    before DDP's own all-reduce (which it then runs unchanged)."""

    def __init__(self) -> None:
        self.sq: torch.Tensor | None = None

    def reset(self) -> None:
        self.sq = None

    def on_bucket(self, state, bucket):  # type: ignore[no-untyped-def]  # DDP checks real annotations only
        flat = bucket.buffer().detach().float()
        s = torch.dot(flat, flat)  # one fused pass, no temporary
        self.sq = s if self.sq is None else self.sq + s
        return allreduce_hook(state, bucket)

    @classmethod
    def attach(cls, model: torch.nn.Module) -> LocalGradNorm:
        hook = cls()
        model.register_comm_hook(None, hook.on_bucket)  # type: ignore[operator]
        return hook


@dataclass
class NoiseScale:
    """The EMA-smoothed estimator for one pair of batch sizes (B_small < B_big)."""

    b_small: int
    b_big: int
    decay: float = DECAY
    _trace: float = 0.0
    _grad_sq: float = 0.0
    _weight: float = 0.0  # 1 - decay^n: the bias correction

    def __post_init__(self) -> None:
        if not 0 < self.b_small < self.b_big:
            raise ValueError(f"noise scale needs 0 < B_small < B_big, got {self.b_small} and {self.b_big}")

    def update(self, small_sq: float, big_sq: float) -> dict[str, float]:
        """One step's squared norms in; the smoothed estimates out (metric name -> value)."""
        bs, bb = self.b_small, self.b_big
        grad_sq = (bb * big_sq - bs * small_sq) / (bb - bs)
        trace = (small_sq - big_sq) / (1 / bs - 1 / bb)
        self._trace = self.decay * self._trace + (1 - self.decay) * trace
        self._grad_sq = self.decay * self._grad_sq + (1 - self.decay) * grad_sq
        self._weight = self.decay * self._weight + (1 - self.decay)
        trace_s, grad_s = self._trace / self._weight, self._grad_sq / self._weight
        return {
            "noise_scale": trace_s / grad_s if grad_s > 0 else math.nan,
            "noise_trace": trace_s,
            "noise_grad_sq": grad_s,
        }

    def state_dict(self) -> dict[str, float]:
        return {"trace": self._trace, "grad_sq": self._grad_sq, "weight": self._weight}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self._trace, self._grad_sq, self._weight = state["trace"], state["grad_sq"], state["weight"]

