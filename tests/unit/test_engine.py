"""The generated DeepSpeed config goes through DeepSpeed's own DeepSpeedConfig, for the planned world."""

from __future__ import annotations

from launcher.engine import check_deepspeed_config
from launcher.planner import Hardware, MemoryProfile, Reference, Request, plan

GOOD = {
    "train_batch_size": 64,
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 2,
    "zero_optimization": {"stage": 2},
    "bf16": {"enabled": True},
}


def test_a_consistent_config_passes_for_its_world_size() -> None:
    assert check_deepspeed_config(GOOD, 8) == []


def test_deepspeed_checks_the_batch_arithmetic_against_the_planned_world() -> None:
    (error,) = check_deepspeed_config(GOOD, 4)  # 4 x 2 x 4 != 64
    assert "train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size" in error


def test_deepspeed_refuses_a_bad_zero_stage_and_we_refuse_unknown_keys() -> None:
    errors = check_deepspeed_config({**GOOD, "zero_optimization": {"stage": 7}, "zero_stage": 2}, 8)
    assert errors[0] == "deepspeed.zero_stage: not a DeepSpeed config key"
    assert "stage" in errors[1] and "DeepSpeedConfig refuses" in errors[1]


def test_every_plan_the_planner_writes_is_accepted() -> None:
    ref = Reference(global_batch=256, lr=1e-4, warmup_steps=100, max_steps=1000, optimizer="adamw")
    mem = MemoryProfile.from_total(40, 0.1, source="override", detail="")
    for nodes, gpus, batch in [(1, 8, 256), (2, 8, 1000), (4, 8, 8192), (3, 5, 77)]:
        req = Request(reference=ref, global_batch=batch, engine="deepspeed", precision="bf16", grad_clip=1.0)
        p = plan(req, Hardware(nodes=nodes, devices_per_node=gpus, device_memory_gb=16), mem)
        assert p.deepspeed is not None and check_deepspeed_config(p.deepspeed, p.world_size) == [], (nodes, gpus)
