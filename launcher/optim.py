"""The optimizer and lr schedule a plan asks for (maintained implementations only)."""

from __future__ import annotations

import math

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
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, plan: Plan, optim: Optim) -> torch.optim.Optimizer:
    groups = param_groups(model, plan.weight_decay)
    betas = (optim.betas[0], optim.betas[1])
    if plan.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=plan.lr, betas=betas)
    if plan.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=plan.lr, momentum=optim.momentum, nesterov=optim.nesterov)
    if plan.optimizer == "lamb":
        from timm.optim import Lamb

        return Lamb(groups, lr=plan.lr, betas=betas)
    if plan.optimizer == "lars":
        from timm.optim import Lars

        return Lars(groups, lr=plan.lr, momentum=optim.momentum)
    raise ValueError(f"plan.optimizer: unknown optimizer {plan.optimizer!r}")


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
