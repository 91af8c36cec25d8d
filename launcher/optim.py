"""The optimizer and lr schedule a plan asks for (maintained implementations only)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from launcher.config import Optim
from launcher.planner import Plan


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-d tensors), as in Goyal et al. / BERT."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    decays = group_decays(weight_decay)
    return [{"params": params, "weight_decay": wd} for params, wd in zip((decay, no_decay), decays, strict=True)]


def group_decays(weight_decay: float) -> list[float]:
    """The weight decay of each group ``param_groups`` makes, in order: the weights, then biases and norms."""
    return [weight_decay, 0.0]


def hyper_parameters(plan: Plan, optim: Optim) -> dict[str, Any]:
    """What the optimizer is built with beyond its groups (and what ``apply_plan`` re-applies after a restore)."""
    betas = (optim.betas[0], optim.betas[1])
    by_optimizer: dict[str, dict[str, Any]] = {
        "adamw": {"betas": betas},
        "sgd": {"momentum": optim.momentum, "nesterov": optim.nesterov},
        # timm's Lamb clips the global grad norm at 1.0 by itself; the step object clips once, at
        # train.grad_clip (null: not at all), so Lamb's own clipping is off (it reads its defaults)
        "lamb": {"betas": betas, "max_grad_norm": None},
        "lars": {"momentum": optim.momentum},
    }
    if plan.optimizer not in by_optimizer:
        raise ValueError(f"plan.optimizer: unknown optimizer {plan.optimizer!r}")
    return {"lr": plan.lr, **by_optimizer[plan.optimizer]}


def build_optimizer(model: nn.Module, plan: Plan, optim: Optim) -> torch.optim.Optimizer:
    groups = param_groups(model, plan.weight_decay)
    kwargs = hyper_parameters(plan, optim)
    if plan.optimizer == "adamw":
        return torch.optim.AdamW(groups, **kwargs)
    if plan.optimizer == "sgd":
        return torch.optim.SGD(groups, **kwargs)
    if plan.optimizer == "lamb":
        from timm.optim import Lamb

        return Lamb(groups, **kwargs)
    from timm.optim import Lars

    return Lars(groups, **kwargs)


def apply_plan(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, plan: Plan, optim: Optim
) -> list[str]:
    """After a restore, this plan's hyper-parameters over the checkpoint's; returns what changed.

    A restored optimizer's param groups hold the old run's lr, weight decay and betas/momentum, and
    LambdaLR's ``base_lrs`` its lr; the schedule's lambda (warmup, max_steps, milestones) is this
    plan's already, since LambdaLR saves no function. The lr of the coming step is recomputed as
    LambdaLR does (``base_lr x factor(last_epoch)``), so an unchanged config changes nothing.
    """
    changed: dict[str, str] = {}
    want = hyper_parameters(plan, optim)
    base = want.pop("lr")
    if scheduler.base_lrs and scheduler.base_lrs[0] != base:
        changed["lr"] = f"lr {scheduler.base_lrs[0]:g} -> {base:g}"
    for group, decay in zip(optimizer.param_groups, group_decays(plan.weight_decay), strict=True):
        for key, value in {**want, "weight_decay": decay}.items():
            old = tuple(group[key]) if isinstance(group.get(key), (list, tuple)) else group.get(key)
            if key in group and old != value and key not in changed:
                changed[key] = f"{key} {old} -> {value}"
            group[key] = value
        group["initial_lr"] = base
    scheduler.base_lrs = [base] * len(optimizer.param_groups)
    lrs = [b * factor(scheduler.last_epoch) for factor, b in zip(scheduler.lr_lambdas, scheduler.base_lrs, strict=True)]
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs  # type: ignore[attr-defined]  # what get_last_lr() gives the coming step
    return list(changed.values())


def lr_factor(step: int, plan: Plan) -> float:
    """Multiplier of ``plan.lr`` at optimizer step ``step`` (0-based): warmup, then the schedule."""
    if step < plan.warmup_steps:
        return (step + 1) / plan.warmup_steps
    if plan.schedule == "constant":
        return 1.0
    if plan.schedule == "step":
        return 0.1 ** sum(step >= m for m in plan.milestones)
    progress = (step - plan.warmup_steps) / max(1, plan.max_steps - plan.warmup_steps)
    if plan.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1 - progress)  # linear decay to zero (BERT)


def build_scheduler(optimizer: torch.optim.Optimizer, plan: Plan) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, plan))
