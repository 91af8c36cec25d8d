"""The gradient noise scale estimator, the DDP hook that feeds it, and the LR range test.

The estimator is checked against a known answer (gradients drawn with a known mean and
covariance); the hook on a real 2-process gloo group against gradients computed without
DDP; the range test on a tiny real model (restored afterwards, suggestion on the curve).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from launcher import lr_find
from launcher.noise import LocalGradNorm, NoiseScale
from launcher.step import DDPStep, StepScalars
from tests.conftest import spawn_gloo


def test_estimator_recovers_a_known_noise_scale() -> None:
    """Per-sample gradients ~ N(G, diag(s^2)): B_simple = tr(S)/|G|^2 = 64 * 4 / 16 = 16."""
    g = torch.Generator().manual_seed(0)
    dim, small, big = 64, 8, 32
    mean = torch.full((dim,), 0.5)  # |G|^2 = 64 * 0.25 = 16
    est = NoiseScale(b_small=small, b_big=big, decay=0.99)
    for _ in range(3000):
        samples = mean + 2.0 * torch.randn(big, dim, generator=g)  # tr(S) = 64 * 4 = 256
        per_rank = samples.view(big // small, small, dim).mean(1)  # 4 "ranks" of 8 samples
        small_sq = float(per_rank.pow(2).sum(1).mean())
        big_sq = float(samples.mean(0).pow(2).sum())
        out = est.update(small_sq, big_sq)
    assert out["noise_scale"] == pytest.approx(16.0, rel=0.15)
    assert out["noise_trace"] == pytest.approx(256.0, rel=0.15)
    assert out["noise_grad_sq"] == pytest.approx(16.0, rel=0.15)


def test_estimator_recovers_the_noise_scale_of_a_linear_regression() -> None:
    """Least squares, y = x.w* + e with x ~ N(0, I_d) and e ~ N(0, s^2), at a point w = w* + delta.

    Per-sample gradient of (x.w - y)^2 / 2 is g = (x.delta - e) x, so G = E[g] = delta and
    Sigma = (|delta|^2 + s^2) I + delta delta^T (Gaussian fourth moments). Hence
    B_simple = tr(Sigma) / |G|^2 = (d (|delta|^2 + s^2) + |delta|^2) / |delta|^2 = 1 + d (1 + s^2 / |delta|^2).
    Tolerance: 10%, from 4000 steps of 4 ranks x 16 samples, EMA decay 0.99.
    """
    g = torch.Generator().manual_seed(1)
    d, small, ranks, noise_sd = 8, 16, 4, 1.5
    delta = torch.full((d,), 0.5)  # |delta|^2 = 2
    expected = 1 + d * (1 + noise_sd**2 / float(delta @ delta))  # 1 + 8 * (1 + 2.25 / 2) = 18
    est = NoiseScale(b_small=small, b_big=small * ranks, decay=0.99)
    for _ in range(4000):
        x = torch.randn(small * ranks, d, generator=g)
        e = noise_sd * torch.randn(small * ranks, generator=g)
        grads = (x @ delta - e)[:, None] * x  # one row per sample
        per_rank = grads.view(ranks, small, d).mean(1)
        out = est.update(float(per_rank.pow(2).sum(1).mean()), float(grads.mean(0).pow(2).sum()))
    assert out["noise_scale"] == pytest.approx(expected, rel=0.10)


def test_estimator_refuses_equal_batch_sizes() -> None:
    with pytest.raises(ValueError, match="B_small < B_big"):
        NoiseScale(b_small=8, b_big=8)


class Linear(nn.Module):
    """Returns a loss *sum* like the recipes do, with its unit count."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 1)

    def forward(self, b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"mse": (self.lin(b["x"]).squeeze(1) - b["y"]).pow(2).sum()}


def count(b: dict[str, torch.Tensor]) -> dict[str, int]:
    return {"mse": len(b["y"])}


def data(rank: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(10 + rank)
    return [{"x": torch.randn(3, 6, generator=g), "y": torch.randn(3, generator=g)} for _ in range(2)]


def _worker(rank: int) -> tuple[float, float]:
    model = nn.parallel.DistributedDataParallel(Linear())
    hook = LocalGradNorm.attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scalars = StepScalars()
    scalars.register("noise_local_sq", lambda: float(hook.sq))  # as launcher/hooks.py: NoiseScaleHook
    result = DDPStep(model, opt, count, scalars, device=torch.device("cpu"), need_grad_norm=True).attempt(data(rank))
    assert result is not None and result.grad_norm is not None
    return result.scalars["noise_local_sq"] / 2, result.grad_norm**2


def test_ddp_hook_sees_each_ranks_accumulated_gradient_before_the_all_reduce() -> None:
    out = spawn_gloo(_worker, 2)

    def grad(batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """The mean-loss gradient over these samples, without DDP."""
        m = Linear()
        n = sum(len(b["y"]) for b in batches)
        sum(m(b)["mse"] for b in batches).div(n).backward()
        return torch.cat([p.grad.flatten() for p in m.parameters()])

    local = [grad(data(r)) for r in range(2)]  # each rank's 6 samples (2 micro-batches of 3)
    expected_small = float(sum(g.pow(2).sum() for g in local) / 2)
    expected_big = float(grad(data(0) + data(1)).pow(2).sum())
    for rank in range(2):
        small_sq, big_sq = out[rank]
        assert small_sq == pytest.approx(expected_small, rel=1e-5)
        assert big_sq == pytest.approx(expected_big, rel=1e-5)
    assert expected_small > expected_big  # two noisy halves vs their mean


def test_lr_range_test_restores_the_model_and_optimizer_and_finds_the_slope() -> None:
    torch.manual_seed(0)
    model = Linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.123, momentum=0.9)
    x = torch.randn(256, 6)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 1.0])
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def batches():  # type: ignore[no-untyped-def]
        i = 0
        while True:
            idx = torch.arange(i, i + 32) % 256
            yield [{"x": x[idx[:16]], "y": y[idx[:16]]}, {"x": x[idx[16:]], "y": y[idx[16:]]}]
            i += 32

    schedule = lr_find.lrs(60, 1e-4, 10.0)
    tried, losses = lr_find.range_test(
        model, opt, batches(), count, schedule=schedule, diverge=4.0,
        device=torch.device("cpu"), precision="fp32", grad_clip=None, progress=lambda _m: None,
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert opt.param_groups[0]["lr"] == 0.123 and not opt.state  # momentum buffers gone again
    assert len(tried) < len(schedule)  # SGD on this quadratic diverges well before lr 10: it stopped
    found = lr_find.suggest(tried, lr_find.smooth(losses), 4.0)
    assert found["diverged_lr"] is not None and found["steepest_lr"] < found["min_loss_lr"] < found["diverged_lr"]
    # The known stable range of heavy-ball SGD (momentum b) on this quadratic: lr < 2 (1 + b) / lambda_max,
    # with the Hessian of the mean squared error H = 2 E[x~ x~^T] (x~ = x with a 1 for the bias).
    xb = torch.cat([x, torch.ones(256, 1)], 1)
    lr_max = 2 * (1 + 0.9) / float(torch.linalg.eigvalsh(2 * xb.T @ xb / 256).max())
    assert found["steepest_lr"] < lr_max  # the suggestion trains
    assert lr_max / 3 < found["diverged_lr"] < 3 * lr_max  # the divergence it saw is the real edge (1.42 vs 1.55)
    smoothed = lr_find.smooth(losses)
    i = tried.index(found["steepest_lr"])
    assert smoothed[i + 1] < smoothed[i - 1]  # the loss falls there


def test_suggestion_on_a_known_curve() -> None:
    lrs = lr_find.lrs(41, 1e-4, 1.0)  # 10 points per decade
    # flat, then a steep fall centred at 1e-2, a minimum at 1e-1.5, then a blow-up
    curve = [5 - 4 / (1 + math.exp(-3 * (math.log10(lr) + 2))) for lr in lrs]
    curve = [v if lr < 10**-1.3 else v + 50 * (math.log10(lr) + 1.3) for lr, v in zip(lrs, curve, strict=True)]
    found = lr_find.suggest(lrs, curve, 4.0)
    assert found["steepest_lr"] == pytest.approx(1e-2, rel=0.3)
    assert found["diverged_lr"] is not None and found["diverged_lr"] > found["min_loss_lr"] > found["steepest_lr"]
    assert lr_find.lrs(3, 1e-3, 1e-1) == pytest.approx([1e-3, 1e-2, 1e-1])
