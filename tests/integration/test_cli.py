"""The command line as users run it: plans as JSON, and errors before anything is scheduled."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import launcher

OVERRIDE = ["action=plan", "plan.format=json", "cluster.nodes=1", "cluster.gpus_per_node=1"]


def plan_json(*args: str, cwd: Path) -> dict:
    out = launcher(*OVERRIDE, *args, cwd=cwd)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_seed_example_24gb_card(tmp_path: Path) -> None:
    """24 GB card, 4 GB model, 0.2 GB per sample, no headroom -> max micro-batch 100."""
    p = plan_json(
        "cluster.gpu_memory_gb=24",
        "planner.memory.model_gb=4",
        "planner.memory.per_sample_gb=0.2",
        "planner.headroom=0",
        "batch.global_batch=100",
        cwd=tmp_path,
    )
    assert p["max_micro_batch"] == 100
    assert (p["micro_batch"], p["grad_accum"], p["global_batch"]) == (100, 1, 100)
    assert p["memory"]["source"] == "override"


def test_seed_example_unet_power_of_two_and_accumulation(tmp_path: Path) -> None:
    """12 GB, 3 GB model, 0.5 GB/sample -> 18 -> 16 (power of two); target 64 -> accumulate 4."""
    p = plan_json(
        "cluster.gpu_memory_gb=12",
        "planner.memory.model_gb=3",
        "planner.memory.per_sample_gb=0.5",
        "planner.headroom=0",
        "planner.power_of_two=true",
        "batch.global_batch=64",
        cwd=tmp_path,
    )
    assert p["max_micro_batch"] == 16
    assert any("max micro-batch 18" in r and "power of two 16" in r for r in p["reasons"])
    assert (p["micro_batch"], p["grad_accum"], p["global_batch"]) == (16, 4, 64)


def test_seed_example_linear_lr(tmp_path: Path) -> None:
    """Reference 64 @ 0.1 -> 256 @ 0.4 under the linear rule."""
    p = plan_json(
        "cluster.gpu_memory_gb=24",
        "planner.memory.model_gb=4",
        "planner.memory.per_sample_gb=0.2",
        "recipe.reference.global_batch=64",
        "recipe.reference.lr=0.1",
        "planner.lr_rule=linear",
        "batch.global_batch=256",
        cwd=tmp_path,
    )
    assert p["lr"] == pytest.approx(0.4) and p["lr_rule"] == "linear" and p["global_batch"] == 256


def test_json_has_the_documented_fields(tmp_path: Path) -> None:
    p = plan_json(
        "cluster.gpu_memory_gb=24",
        "planner.memory.model_gb=4",
        "planner.memory.per_sample_gb=0.2",
        "engine=deepspeed",
        cwd=tmp_path,
    )
    for key in (
        "world_size",
        "device",
        "micro_batch",
        "grad_accum",
        "global_batch",
        "lr",
        "lr_rule",
        "warmup_steps",
        "max_steps",
        "optimizer",
        "norm",
        "zero_stage",
        "memory",
        "cpus",
        "reasons",
        "deepspeed",
    ):
        assert key in p, key
    assert set(p["cpus"]) == {"cpus_per_worker", "loader_workers", "torch_threads", "node_cpus", "reason"}
    ds = p["deepspeed"]
    assert ds["train_batch_size"] == p["micro_batch"] * p["grad_accum"] * p["world_size"]
    assert ds["zero_optimization"]["stage"] == p["zero_stage"]


def test_bert_on_64_gpus_at_8192_picks_lamb(tmp_path: Path) -> None:
    """The memory profile here is the device-free estimate of BERT-base (traced on CPU)."""
    p = launcher(
        "action=plan",
        "plan.format=json",
        "cluster.nodes=8",
        "cluster.gpus_per_node=8",
        "cluster.gpu_memory_gb=80",
        "batch.global_batch=8192",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)
    assert plan["world_size"] == 64 and plan["global_batch"] == 8192
    assert plan["optimizer"] == "lamb"
    assert any("LAMB" in r and "8192" in r for r in plan["reasons"])
    assert plan["memory"]["source"] == "estimate"
    assert plan["micro_batch"] * plan["grad_accum"] * 64 == 8192


def test_zero_stage_when_model_states_do_not_fit(tmp_path: Path) -> None:
    common = [
        "cluster.gpus_per_node=8",
        "cluster.gpu_memory_gb=16",
        "planner.memory.model_gb=40",
        "planner.memory.per_sample_gb=0.1",
    ]
    refused = launcher(*OVERRIDE[:2], *common, cwd=tmp_path)
    assert refused.returncode == 2
    assert "planner.memory.model_gb" in refused.stderr and "engine=deepspeed" in refused.stderr
    ok = plan_json(*common, "engine=deepspeed", cwd=tmp_path)
    assert ok["zero_stage"] == 2  # 10 GB params + 30/8 GB sharded grads+moments fit 14.4 GB; stage 1 does not
    assert any(r.startswith("ZeRO stage 2") for r in ok["reasons"])
    assert ok["deepspeed"]["zero_optimization"]["stage"] == 2
    assert "DeepSpeed config validated by DeepSpeed's own DeepSpeedConfig for 8 ranks" in ok["reasons"]


def test_zero_stage_3_training_is_refused_before_anything_runs(tmp_path: Path) -> None:
    out = launcher("scale=smoke", "engine=deepspeed", "engine.zero_stage=3", cwd=tmp_path)
    assert out.returncode == 2 and "engine.zero_stage: stage 3" in out.stderr and "zero_stage=2" in out.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "outputs" / "ray").exists()
    assert not (tmp_path / "outputs" / "cache").exists()  # refused before BERT's tokenizer is trained


def test_table_output_shows_reasons(tmp_path: Path) -> None:
    out = launcher(
        "action=plan",
        "cluster.gpus_per_node=1",
        "cluster.gpu_memory_gb=24",
        "planner.memory.model_gb=4",
        "planner.memory.per_sample_gb=0.2",
        cwd=tmp_path,
    )
    assert out.returncode == 0
    assert "micro-batch / device" in out.stdout and "why:" in out.stdout


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["planner.memory.model_gb=30"], "planner.memory.model_gb"),  # memory smaller than the model
        (["batch.micro_batch=64"], "batch.micro_batch"),  # pinned above the memory bound (40)
        (["batch.global_batch=4", "cluster.gpus_per_node=8"], "batch.global_batch"),  # < world size
        (["cluster.gpu_memory_gb=0"], "cluster.gpu_memory_gb"),
        (["planner.memory.per_sample_gb=-1"], "planner.memory.per_sample_gb"),
    ],
)
def test_bad_plan_input_names_the_key(args: list[str], key: str, tmp_path: Path) -> None:
    base = [
        "cluster.gpu_memory_gb=24",
        "planner.memory.model_gb=4",
        "planner.memory.per_sample_gb=0.5",
        "planner.headroom=0",
    ]
    out = launcher(*OVERRIDE, *base, *args, cwd=tmp_path)
    assert out.returncode == 2, out.stdout
    assert key in out.stderr


@pytest.mark.parametrize(
    ("args", "keys"),
    [
        # no memory profile needed: found by planner.check, before the model is traced; collected together
        (["batch.global_batch=1", "train.max_epochs=1", "train.max_steps=5"],
         ["batch.global_batch: global batch 1 is smaller than the world size 2",
          "train.max_epochs and train.max_steps are both set"]),
        # the memory profile (pinned here, so no model is traced) but not the data
        (["batch.micro_batch=64", "cluster.gpu_memory_gb=2", "planner.memory.model_gb=0.5",
          "planner.memory.per_sample_gb=0.1"],
         ["batch.micro_batch: pinned to 64, above the memory bound 13"]),
    ],
    ids=["global-batch-below-world-and-epochs-with-steps", "micro-batch-above-the-memory-bound"],
)
def test_planner_errors_come_before_any_data_is_built(args: list[str], keys: list[str], tmp_path: Path) -> None:
    """action=train: every planner error before the data (here ImageNet smoke's drawn images, into
    <run.output_dir>/cache), the memory estimate and the MLflow store: the run leaves its cwd empty."""
    started = time.perf_counter()
    out = launcher("recipe=imagenet", "scale=smoke", "cluster.num_workers=2", f"run.output_dir={tmp_path / 'out'}",
                   *args, cwd=tmp_path, env={"LAUNCHER_CACHE": str(tmp_path / "memory"), "MLFLOW_TRACKING_URI": None})
    elapsed = time.perf_counter() - started
    assert out.returncode == 2, out.stdout + out.stderr
    assert all(k in out.stderr for k in keys), out.stderr
    assert not (tmp_path / "out" / "cache").exists()  # no data built
    assert not (tmp_path / "memory").exists()  # no memory estimate made (nor cached)
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow store
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing else either
    assert "plan\n---" not in out.stdout and "Ray" not in out.stdout + out.stderr
    assert elapsed < 60, elapsed  # the imports and the check (about 5 s idle); not the data


@pytest.mark.parametrize(
    ("arg", "suggestion"), [("recipe.modle=1", "recipe.model"), ("train.max_stepz=3", "train.max_steps")]
)
def test_typos_fail_fast_before_ray(arg: str, suggestion: str, tmp_path: Path) -> None:
    started = time.perf_counter()
    out = launcher(arg, cwd=tmp_path)
    elapsed = time.perf_counter() - started
    assert out.returncode == 2
    assert f"did you mean `{suggestion}`" in out.stderr
    assert elapsed < 15, elapsed  # seconds, not a Ray start
    assert "Ray" not in out.stdout + out.stderr
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "mlflow.db").exists()


def test_help_lists_groups(tmp_path: Path) -> None:
    out = launcher("--help", cwd=tmp_path)
    assert out.returncode == 0 and "recipe=bert" in out.stdout and "scale=full|smoke" in out.stdout
