"""Where the CPU budget's inputs come from and where its numbers go (``planner.cpu_budget``).

In: this machine's CPUs (affinity mask, cgroup quota) and a Ray cluster's (its nodes' resources).
Out: the DataLoader a worker builds. The hand-computed budgets are in ``tests/unit/test_planner.py``;
torch's thread count inside real Ray workers is checked by ``tests/integration/test_imagenet.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

from launcher import memory
from launcher.cluster import _cpus_per_node
from launcher.config import Cluster
from launcher.data import Data
from launcher.planner import Hardware, MemoryProfile, plan, request_from_config


def test_local_cpus_are_the_affinity_mask_within_a_cgroup_quota(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3, 4, 5}, raising=False)  # taskset -c 0-5
    monkeypatch.setattr(memory, "CGROUP_CPU_MAX", tmp_path / "absent")  # no cgroup v2 file: the mask
    assert memory.local_cpus() == 6
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr(memory, "CGROUP_CPU_MAX", quota)
    for text, cpus in [("max 100000\n", 6), ("400000 100000\n", 4), ("250000 100000\n", 2), ("50000 100000\n", 1),
                       ("1600000 100000\n", 6)]:  # docker --cpus=4, 2.5 (whole CPUs only), 0.5; above the mask
        quota.write_text(text)
        assert memory.local_cpus() == cpus, text
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS: no affinity; os.cpu_count()
    monkeypatch.setattr(os, "cpu_count", lambda: 10)
    assert memory.local_cpus() == 10


def test_local_workers_plan_with_this_machines_cpus_and_described_gpus_without(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "local_cpus", lambda: 12)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert memory.detect_hardware(Cluster(num_workers=3)).cpus_per_node == 12  # 3 CPU workers: 4 CPUs each
    laptop = memory.detect_hardware(Cluster(gpus_per_node=8, gpu_memory_gb=80))  # a cluster planned from here
    assert laptop.cpus_per_node is None


def node(cpus: float, gpus: float = 0, alive: bool = True) -> dict[str, Any]:
    """A node as ``ray.nodes()`` lists it (the fields read here)."""
    return {"Alive": alive, "Resources": {"CPU": cpus, "memory": 64e9} | ({"GPU": gpus} if gpus else {})}


def test_a_ray_clusters_cpus_leave_every_worker_room_on_every_node() -> None:
    head = node(0)  # a head started with --num-cpus=0, as KubeRay's often is
    same = [head, node(96, 8), node(96, 8)]
    assert _cpus_per_node(same, 8, gpu=True) == 96  # 12 per GPU
    mixed = [head, node(64, 8), node(48, 4)]  # 8 and 12 CPUs per GPU: planned at 8, which fits both
    assert _cpus_per_node(mixed, 4, gpu=True) == 32  # a planned node of 4 GPUs at 8 CPUs each
    assert _cpus_per_node(mixed, 8, gpu=True) == 64
    assert _cpus_per_node([head, node(2, 0), node(8, 0)], 3, gpu=False) == 2  # CPU workers: the smallest node
    assert _cpus_per_node([head, node(4, 0)], 1, gpu=True) is None  # no GPU node
    assert _cpus_per_node([head], 2, gpu=False) is None


def test_the_worker_builds_its_dataloader_with_the_plans_loader_processes() -> None:
    """``data.num_workers=auto`` (the default at full scale): only the plan knows the count."""
    from launcher.cli import load
    from launcher.worker import Worker, data_loader

    cfg = load(["recipe=imagenet", "batch.global_batch=4", "batch.micro_batch=2", "train.max_steps=2",
                "planner.memory.model_gb=0.01", "planner.memory.per_sample_gb=0.001"])  # fmt: skip
    assert cfg.data.num_workers == "auto"
    hw = Hardware(nodes=1, devices_per_node=1, device_memory_gb=80.0, cpus_per_node=2)  # one GPU, 2 CPUs
    p = plan(request_from_config(cfg), hw, MemoryProfile.from_total(0.01, 0.001, source="override"))
    assert (p.cpus.cpus_per_worker, p.cpus.loader_workers) == (2, 1)
    x = torch.arange(16.0).reshape(8, 2)

    def collate(items: list[tuple[torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {"x": torch.stack([i[0] for i in items])}

    data = Data(train=TensorDataset(x), eval=TensorDataset(x), collate=collate)
    w = Worker(cfg, p, None, data, torch.device("cpu"), 0, 1, None, lambda _m: None)  # type: ignore[arg-type]
    loader = data_loader(w, 0, None)
    assert loader.num_workers == 1 and loader.persistent_workers
    first = next(iter(loader))  # from the loader process
    assert first["x"].shape == (2, 2)


def test_a_rank_below_the_launchers_priority_says_why_and_how_to_change_it() -> None:
    """A Ray cluster runs its workers at nice 15; rank 0's ``cpus:`` line says so, against the launcher's own
    niceness (``nice -n 10 python -m launcher`` on an embedded Ray, whose workers then run at 10 too, says
    nothing). The embedded Ray's workers run at the launcher's priority: ``tests/integration/test_accumulation.py``."""
    from launcher.cluster import _worker_env
    from launcher.worker import priority_note

    assert priority_note(0, 0) == "" and priority_note(10, 10) == ""
    note = priority_note(15, 0)
    assert "niceness 15 (the launcher's: 0)" in note and "RAY_worker_niceness=0" in note
    # a warm Ray on this machine: the job's workers at the priority its node started them with (Ray reads
    # the variable in each worker); a cluster keeps its nodes' policy
    assert _worker_env({}, own_priority=True)["RAY_worker_niceness"] == "0"
    assert "RAY_worker_niceness" not in _worker_env({})
