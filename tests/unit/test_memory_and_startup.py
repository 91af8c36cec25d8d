"""The device-free activation estimate counts each saved storage once; the start-up breakdown adds up."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from launcher.hooks import startup_phases
from launcher.memory import _activations_per_sample

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
