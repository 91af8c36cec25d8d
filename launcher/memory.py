"""What the planner needs to know about memory: the hardware and the memory profile.

The profile comes from, in order of preference:

1. the user's override (``planner.memory.model_gb`` / ``planner.memory.per_sample_gb``);
2. a device-free estimate: parameter, gradient and optimizer-state bytes counted from the
   model, activation bytes per sample from the tensors autograd saves during a CPU forward
   pass at micro-batch 1 and 2 (``torch.autograd.graph.saved_tensors_hooks``), cached.

A probe on the real device (peak memory at two micro-batch sizes) is the planned third
source; it needs a GPU and is not implemented yet (see the issue notes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from launcher.config import Cluster, Config
from launcher.planner import Hardware, MemoryProfile

GB = 1024**3
DEFAULT_CPU_WORKERS = 2


def detect_hardware(cluster: Cluster) -> Hardware:
    """The devices training runs (or is planned) on.

    ``cluster.gpus_per_node`` set: hardware described, not detected (planning a cluster from
    a laptop). Otherwise the local GPUs, or CPU workers when there are none.
    """
    if cluster.gpus_per_node:
        memory = cluster.gpu_memory_gb
        if memory is None and torch.cuda.is_available():
            memory = torch.cuda.get_device_properties(0).total_memory / GB
        if memory is None:
            raise ValueError(
                "cluster.gpu_memory_gb: required when cluster.gpus_per_node describes GPUs that are not "
                "on this machine (e.g. cluster.gpu_memory_gb=80)"
            )
        return Hardware(nodes=cluster.nodes, devices_per_node=cluster.gpus_per_node, device_memory_gb=memory)
    want_gpu = cluster.use_gpu is True or (cluster.use_gpu == "auto" and torch.cuda.is_available())
    if want_gpu:
        if not torch.cuda.is_available():
            raise ValueError("cluster.use_gpu: true, but torch sees no CUDA device here (use auto or false)")
        count = cluster.num_workers or torch.cuda.device_count()
        memory = cluster.gpu_memory_gb or torch.cuda.get_device_properties(0).total_memory / GB
        return Hardware(nodes=cluster.nodes, devices_per_node=count, device_memory_gb=memory)
    workers = cluster.num_workers or DEFAULT_CPU_WORKERS
    host_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    share = cluster.gpu_memory_gb or host_gb / workers
    return Hardware(nodes=cluster.nodes, devices_per_node=workers, device_memory_gb=share, device="cpu")


def memory_profile(cfg: Config, recipe: Any) -> MemoryProfile:
    """The override where given, else the device-free estimate (both keys may mix)."""
    override = cfg.planner.memory
    if override.model_gb is not None and override.per_sample_gb is not None:
        return MemoryProfile.from_total(
            override.model_gb,
            override.per_sample_gb,
            source="override",
            detail="planner.memory.model_gb/per_sample_gb; split as fp32 Adam: params 1/4, grads 1/4, moments 1/2",
        )
    est = estimate(cfg, recipe)
    if override.model_gb is None and override.per_sample_gb is None:
        return est
    if override.model_gb is not None:
        scaled = override.model_gb / est.model_gb
        return MemoryProfile(
            params_gb=est.params_gb * scaled,
            grads_gb=est.grads_gb * scaled,
            optimizer_gb=est.optimizer_gb * scaled,
            per_sample_gb=est.per_sample_gb,
            source="override+estimate",
            detail=f"model_gb from planner.memory.model_gb; per-sample estimated ({est.detail})",
        )
    return MemoryProfile(
        params_gb=est.params_gb,
        grads_gb=est.grads_gb,
        optimizer_gb=est.optimizer_gb,
        per_sample_gb=override.per_sample_gb or est.per_sample_gb,
        source="override+estimate",
        detail=f"per_sample_gb from planner.memory.per_sample_gb; model states estimated ({est.detail})",
    )


OPTIMIZER_STATES = {"sgd": 1, "adamw": 2, "lamb": 2, "lars": 1}  # fp32 tensors per parameter


def estimate(cfg: Config, recipe: Any) -> MemoryProfile:
    """Device-free estimate from the recipe's model and a synthetic batch, cached per model.

    The cache (``$LAUNCHER_CACHE`` or ``~/.cache/launcher``) is keyed by the recipe section
    of the config and the torch version, so a rerun or a different cluster shape is instant.
    """
    key = hashlib.sha256(
        json.dumps(
            [cfg.recipe.name, dataclasses.asdict(cfg.recipe), torch.__version__], sort_keys=True, default=str
        ).encode()
    ).hexdigest()[:16]
    cache = Path(os.environ.get("LAUNCHER_CACHE", Path.home() / ".cache" / "launcher")) / f"memory-{key}.json"
    if cache.exists():
        return MemoryProfile(**json.loads(cache.read_text()))
    optimizer = cfg.recipe.reference.optimizer
    model = recipe.build_model(cfg)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    states = OPTIMIZER_STATES[optimizer] * trainable
    per_sample = _activations_per_sample(model, recipe, cfg)
    profile = MemoryProfile(
        params_gb=params / GB,
        grads_gb=trainable / GB,
        optimizer_gb=states / GB,
        per_sample_gb=max(per_sample, 1) / GB,
        source="estimate",
        detail=(
            f"device-free: {params / GB:.3g} GB params, {trainable / GB:.3g} GB grads, {states / GB:.3g} GB "
            f"{optimizer} state (fp32); activations autograd saves per sample, traced on CPU at the recipe's "
            "full input size in fp32 (temporaries not counted: planner.headroom covers them)"
        ),
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(profile)))
    tmp.replace(cache)
    return profile


def _activations_per_sample(model: nn.Module, recipe: Any, cfg: Config) -> float:
    """Bytes autograd saves for backward, per sample: f(2) - f(1) (the fixed part cancels)."""
    param_ids = {id(p) for p in model.parameters()}

    def saved_bytes(n: int) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            if id(t) not in param_ids:
                total += t.numel() * t.element_size()
            return t

        batch = recipe.example_batch(cfg, n)
        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(batch)
        return total

    one, two = saved_bytes(1), saved_bytes(2)
    return float(max(two - one, math.ceil(two / 2)))
