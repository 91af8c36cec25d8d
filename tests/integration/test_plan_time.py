"""``action=plan`` shows the time to train and the GPU-hours (#21): BERT-base on 8x8 H100 80 GB, ResNet-50
on 4x8 A100 80 GB, FLOPs counted from the recipe's real model (traced once per session, then cached); and it
answers in seconds with nothing cached, Mask R-CNN at 800 px included (#20)."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import pytest

from launcher import launch
from launcher.cli import load
from launcher.planner import Plan, describe
from tests.conftest import launcher

BERT_8X8_H100 = ["cluster.nodes=8", "cluster.gpus_per_node=8", "cluster.gpu_memory_gb=80", "cluster.gpu_type=h100"]
RESNET_4X8_A100 = [
    "recipe=imagenet", "cluster.nodes=4", "cluster.gpus_per_node=8", "cluster.gpu_memory_gb=80",
    "cluster.gpu_type=a100-80gb",
]  # fmt: skip


@pytest.fixture
def no_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cwd and an absent tracking store: the plan's noise-scale lookup finds nothing."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'absent' / 'mlflow.db'}")
    return tmp_path


def plan_of(*args: str) -> Plan:
    return launch.build_plan(load(["action=plan", *args]), None)


def test_bert_base_on_8x8_h100_prints_time_to_train_and_gpu_hours(no_store: Path) -> None:
    p = plan_of(*BERT_8X8_H100)
    table, why = describe(p).split("why:")
    assert "time to train" in table and "GPU-hours" in table
    assert "estimated at 40% of the H100 SXM's 989 TFLOP/s bf16 dense" in table
    # BERT-base forward ~ 2 x 85M encoder weights x 512 tokens + attention + the MLM head on the masked
    # tokens ~ 100 GFLOP; x 3 for the backward
    assert 250e9 < (p.step_time_s or 0) * 989e12 * 0.4 / (256 // 64) < 350e9  # 4 samples per rank
    assert p.time_to_train_h == pytest.approx(p.max_steps * (p.step_time_s or 0) / 3600)
    assert p.gpu_hours == pytest.approx(64 * p.time_to_train_h)
    assert "FlopCounterMode" in why and "backward = 2x forward" in why and "planner.mfu" in why
    assert p.cost_usd is None


def test_resnet50_on_4x8_a100_prints_time_to_train_and_gpu_hours(no_store: Path) -> None:
    cfg = load(["action=plan", *RESNET_4X8_A100])
    assert cfg.recipe.model == "resnet50"  # type: ignore[union-attr]
    p = launch.build_plan(cfg, None)
    table, why = describe(p).split("why:")
    assert "time to train" in table and "GPU-hours" in table and "A100 80GB's 312 TFLOP/s bf16 dense" in table
    per_sample = (p.step_time_s or 0) * 312e12 * 0.4 / (256 // 32)
    assert 3 * 8.0e9 < per_sample < 3 * 8.4e9  # ResNet-50: 4.1 GMAC = 8.2 GFLOP forward at 224 x 224
    assert p.gpu_hours == pytest.approx(32 * (p.time_to_train_h or 0))
    assert "NVIDIA A100 Tensor Core GPU datasheet" in why


def test_the_json_carries_time_to_train_gpu_hours_and_cost(no_store: Path) -> None:
    out = launcher("action=plan", "plan.format=json", "cluster.gpu_hour_usd=2.5", *BERT_8X8_H100, cwd=no_store)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["time_to_train_h"] > 0 and d["gpu_hours"] == pytest.approx(64 * d["time_to_train_h"])
    assert d["cost_usd"] == pytest.approx(2.5 * d["gpu_hours"])
    assert any(r.startswith("cost $") and "cluster.gpu_hour_usd" in r for r in d["reasons"])


@pytest.mark.serial  # a time bound: nothing of this session runs beside it
def test_the_coco_plan_with_nothing_cached_answers_in_seconds(no_store: Path) -> None:
    """Mask R-CNN at 800 px, its memory traced under fake tensors (shapes, no compute): about 7 s on 2 idle
    cores, where a real CPU forward took a minute. The bound is on the command's CPU time, which other
    work on a shared machine does not stretch as it stretches the wall clock, at twice the 10 s goal."""
    cache = no_store / "cache"
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    out = launcher("recipe=coco", "action=plan", cwd=no_store, env={"LAUNCHER_CACHE": str(cache)})
    after, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter() - started
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    assert out.returncode == 0, out.stderr
    assert "memory                estimate:" in out.stdout
    assert [p.name.split("-")[0] for p in cache.glob("*.json")] == ["memory"]  # traced now, not read
    assert cpu < 20, (cpu, wall)
