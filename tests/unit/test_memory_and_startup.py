"""The device-free activation estimate counts each saved storage once; the start-up breakdown adds up."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from launcher.hooks import startup_phases
from launcher.memory import SavedBytes, _activations_per_sample

D = 64


class MLP(nn.Module):
    """Linear -> ReLU -> Linear: the ReLU's output is saved twice (by the ReLU and by the second Linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"loss": self.b(torch.relu(self.a(batch["x"]))).sum()}


class Recipe:
    @staticmethod
    def example_batch(_cfg: Any, n: int) -> dict[str, torch.Tensor]:
        return {"x": torch.randn(n, D)}


def test_a_tensor_two_ops_save_is_counted_once() -> None:
    # saved per sample: the input x (for a's weight grad) and relu's output (for relu and for b): 2 x D floats
    per_sample = _activations_per_sample(MLP(), Recipe(), None)  # type: ignore[arg-type]
    assert per_sample == 2 * D * 4


class NormedMLP(nn.Module):
    """Linear -> BatchNorm1d -> Linear: BatchNorm refuses one sample per channel in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(D, D), nn.BatchNorm1d(D), nn.Linear(D, D)
        self.sizes: list[int] = []

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.sizes.append(len(batch["x"]))
        return {"loss": self.b(self.norm(self.a(batch["x"]))).sum()}


def test_the_trace_takes_one_and_two_samples_or_two_and_four_where_one_is_refused() -> None:
    mlp = MLP()
    sizes: list[int] = []
    mlp.register_forward_pre_hook(lambda _m, args: sizes.append(len(args[0]["x"])))
    _activations_per_sample(mlp, Recipe(), None)  # type: ignore[arg-type]
    assert sizes == [1, 2]
    normed = NormedMLP()
    per_sample = _activations_per_sample(normed, Recipe(), None)  # type: ignore[arg-type]
    assert normed.sizes == [1, 2, 4]  # the single sample refused, then 2 and 4

    def saved(n: int) -> int:  # counted here directly
        counter = SavedBytes(normed.parameters())
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            normed({"x": torch.randn(n, D)})
        return counter.total

    assert per_sample == max((saved(4) - saved(2)) / 2, saved(4) / 4)  # growth per sample, at least the mean


def test_startup_phases_follow_the_stamps_and_add_up() -> None:
    stamps = {"launched_at": 100.0, "config_done_at": 101.0, "data_done_at": 103.5, "workers_done_at": 110.0}
    phases = startup_phases(stamps, now=112.0)
    assert phases == {
        "time_to_first_step_s": 12.0,
        "startup_config_s": 1.0,
        "startup_data_s": 2.5,
        "startup_workers_s": 6.5,
        "startup_first_step_s": 2.0,
    }
    # a stamp taken earlier than listed (cluster=ray connects before the data) lands in its place
    phases = startup_phases({**stamps, "connect_done_at": 102.0}, now=112.0)
    assert phases["startup_connect_s"] == 1.0 and phases["startup_data_s"] == 1.5
    assert sum(v for k, v in phases.items() if k.startswith("startup_")) == pytest.approx(12.0)
