"""Elastic training's pure parts (issue #18): what ``cluster.min_workers`` requires, the driver's plan of
every world size in range, the plan the workers make again from plain data, the record of a worker
group's start, and the sample ledger of the ranks a resize took away."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.cli import load
from launcher.config import ConfigError
from launcher.data import SampleLedger
from launcher.launch import Planning, _elastic
from launcher.planner import Hardware, MemoryProfile, Plan
from launcher.worker import group_record

ELASTIC = ["scale=smoke", "cluster.min_workers=2", "cluster.num_workers=3", "cluster.max_failures=3",
           "train.checkpoint_every=5"]


def _errors(args: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load(args)
    return e.value.errors


def test_an_elastic_run_needs_what_a_resize_relies_on() -> None:
    assert load(ELASTIC).cluster.min_workers == 2
    (err,) = _errors([*ELASTIC, "cluster.max_failures=0"])
    assert err.startswith("cluster.max_failures: 0 with cluster.min_workers: a lost worker would end the run")
    (err,) = _errors([*ELASTIC, "train.checkpoint_every=0"])
    assert err.startswith("train.checkpoint_every: 0 with cluster.min_workers") and "step 0" in err
    (err,) = _errors([*ELASTIC, "batch.scale_with_world=true"])
    assert err.startswith("batch.scale_with_world: true with cluster.min_workers")
    (err,) = _errors([*ELASTIC, "engine=deepspeed"])
    assert err.startswith("cluster.min_workers: engine=deepspeed cannot change its world size")
    (err,) = _errors([*ELASTIC, "action=lr_find"])
    assert err.startswith("cluster.min_workers: elastic training is for action=train")
    (err,) = _errors([*ELASTIC, "cluster.min_workers=4"])
    assert err == "cluster.min_workers: got 4, above cluster.num_workers=3 (the most workers)"
    (err,) = _errors([*ELASTIC, "cluster.min_workers=0"])
    assert err.startswith("cluster.min_workers: got 0, expected an integer >= 1")
    errors = _errors(["scale=smoke", "cluster.min_workers=2", "train.checkpoint_every=0"])  # both at once: both named
    assert [e.split(":")[0] for e in errors] == ["cluster.max_failures", "train.checkpoint_every"]


def _planning(*overrides: str) -> Planning:
    cfg = load([*ELASTIC, *overrides])
    hw = Hardware(nodes=1, devices_per_node=cfg.cluster.num_workers or 2, device_memory_gb=8.0, device="cpu")
    mem = MemoryProfile(params_gb=0.01, grads_gb=0.01, optimizer_gb=0.02, per_sample_gb=0.001, source="override")
    return Planning(cfg, hw, mem, None)


def test_every_world_size_in_range_is_planned_before_anything_runs() -> None:
    planning = _planning("cluster.num_workers=4")
    note = _elastic(planning.cfg, planning, planning.plan(None), None)
    assert "2: 16 x 1, 3: 11 x 1, 4: 8 x 1" in note and "Global batch 32" in note

    planning = _planning("cluster.min_workers=1", "train.measure_noise_scale=true")  # needs 2 workers
    with pytest.raises(ConfigError) as e:
        _elastic(planning.cfg, planning, planning.plan(None), None)
    (err,) = e.value.errors
    assert err.startswith("train.measure_noise_scale: needs engine=ddp with 2 or more")
    assert err.endswith("(at 1 workers: cluster.min_workers=1 allows 1 to 3)")


def test_the_workers_plan_from_plain_data_what_the_driver_would_plan_for_their_world() -> None:
    planning = _planning()
    again = Planning.from_dict(planning.cfg, json.loads(json.dumps(planning.to_dict())))  # as the payload travels
    for world in (2, 3):
        assert again.plan(1000, world) == planning.plan(1000, world)
    shrunk = again.plan(1000, 2)
    assert (shrunk.world_size, shrunk.micro_batch, shrunk.grad_accum, shrunk.global_batch) == (2, 16, 1, 32)
    top = planning.plan(1000)
    same = ("global_batch", "lr", "warmup_steps", "max_steps", "schedule", "milestones", "optimizer", "weight_decay")
    assert {k: getattr(shrunk, k) for k in same} == {k: getattr(top, k) for k in same}


def test_hardware_with_another_world_keeps_whole_nodes_where_it_can() -> None:
    hw = Hardware(nodes=4, devices_per_node=8, device_memory_gb=80)
    assert (hw.with_world(16).nodes, hw.with_world(16).devices_per_node) == (2, 8)
    assert (hw.with_world(12).nodes, hw.with_world(12).devices_per_node) == (1, 12)
    assert hw.with_world(12).device_memory_gb == 80


def _plan(world: int, micro: int) -> Plan:
    planning = _planning()
    return Plan.from_dict({**planning.plan(1000, world).to_dict(), "micro_batch": micro})


def test_a_group_record_says_what_changed_and_which_steps_are_trained_again() -> None:
    planned, small = _plan(3, 11), _plan(2, 16)
    first = group_record(planned, planned, None, 0)
    assert first["first"] and not first["resized"] and first["line"] == ""

    shrunk = group_record(small, planned, {"world": 3, "micro_batch": 11, "grad_accum": 1, "reached": 12}, 10)
    assert shrunk["resized"] and not shrunk["first"]
    assert shrunk["line"] == (
        "world 3 -> 2 at step 10: micro 11x1 -> 16x1, global 32 kept; steps 11-12 are trained again from the checkpoint"
    )
    assert shrunk["record"]["steps_trained_again"] == [11, 12]
    assert shrunk["record"]["world_size"] == {"from": 3, "to": 2}

    one = group_record(small, planned, {"world": 2, "micro_batch": 16, "grad_accum": 1, "reached": 11}, 10)
    assert one["line"].endswith("(world unchanged); step 11 is trained again from the checkpoint")

    restarted = group_record(small, planned, {"world": 2, "micro_batch": 16, "grad_accum": 1, "reached": 10}, 10)
    assert not restarted["resized"] and restarted["line"] == "restarted at step 10 on 2 workers (world unchanged)"

    started_small = group_record(small, planned, None, 0)  # the run's first group, with less room than planned
    assert started_small["resized"] and started_small["line"].startswith("world 3 -> 2 at step 0")


def test_the_ledger_of_a_rank_a_resize_took_away_is_rolled_back_too(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("LAUNCHER_SAMPLE_LEDGER", str(tmp_path))
    for rank in (0, 1, 2):
        (tmp_path / f"rank{rank}.jsonl").write_text(
            "".join(json.dumps({"step": s, "ids": [rank]}) + "\n" for s in range(1, 13))
        )
    SampleLedger.from_env(0, 2, 10, 1)  # rank 0 of a 2-worker group from step 10
    steps = {r: [json.loads(x)["step"] for x in (tmp_path / f"rank{r}.jsonl").read_text().splitlines()]
             for r in (0, 1, 2)}  # fmt: skip
    assert steps[0] == steps[2] == list(range(1, 11))  # rank 2 is gone: rank 0 rolled its file back
    assert steps[1] == list(range(1, 13))  # rank 1 rolls back its own, when it starts
