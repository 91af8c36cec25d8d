"""The planner, called directly: memory bound -> split -> lr/steps -> optimizer/norm/ZeRO.

Sections follow ``launcher/planner.py``: the seed worked examples, the memory bound and the
split (with hypothesis properties), lr, steps and warmup, the large-batch optimizer, the norm
policy, ZeRO and the DeepSpeed config, input errors, and the plan's own output. The last section
holds regression tests for two planner bugs it found.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import replace

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from launcher.planner import (
    Anchor,
    Hardware,
    MemoryProfile,
    Plan,
    PlanError,
    Reference,
    Request,
    check,
    cpu_budget,
    deepspeed_config,
    describe,
    plan,
)

# --- fixtures ---------------------------------------------------------------------------------

# A plain SGD recipe: linear lr rule, no large-batch optimizer, no BatchNorm.
SGD = Reference(
    global_batch=256,
    lr=0.1,
    warmup_steps=500,
    max_steps=10_000,
    optimizer="sgd",
    lr_rule="linear",
    devices=8,
    source="test sgd reference",
)

# Mirrors conf/recipe/bert.yaml: adamw @ 256, sqrt rule, LAMB from 8192, two LAMB anchors.
BERT = Reference(
    global_batch=256,
    lr=1e-4,
    warmup_steps=10_000,
    max_steps=1_000_000,
    optimizer="adamw",
    weight_decay=0.01,
    lr_rule="sqrt",
    devices=16,
    large_batch_optimizer="lamb",
    large_batch_threshold=8192,
    anchors=(
        Anchor(global_batch=65536, lr=6e-3, warmup_steps=2000, source="LAMB phase 1"),
        Anchor(global_batch=32768, lr=4e-3, warmup_steps=200, source="LAMB phase 2"),
    ),
    source="test bert reference",
)

# A ResNet-like recipe with BatchNorm (the norm policy is swapped per test).
RESNET = replace(SGD, uses_batchnorm=True, norm_policy="sync_bn")


def gpus(nodes: int = 1, per_node: int = 1, memory_gb: float = 80.0, device: str = "cuda") -> Hardware:
    return Hardware(nodes=nodes, devices_per_node=per_node, device_memory_gb=memory_gb, device=device)


def profile(model_gb: float = 1.0, per_sample_gb: float = 0.01) -> MemoryProfile:
    return MemoryProfile.from_total(model_gb, per_sample_gb, source="override")


# 80 GB, 1 GB model, 0.01 GB/sample, headroom 0.1: memory bound floor(71 / 0.01) = 7100.
ROOMY = profile()


def make(ref: Reference = SGD, hw: Hardware | None = None, mem: MemoryProfile = ROOMY, **request: object) -> Plan:
    return plan(Request(reference=ref, **request), hw or gpus(), mem)  # type: ignore[arg-type]


def has_reason(p: Plan, *fragments: str) -> bool:
    """Some reason contains every fragment."""
    return any(all(f in r for f in fragments) for r in p.reasons)


def plan_error(ref: Reference = SGD, hw: Hardware | None = None, mem: MemoryProfile = ROOMY, **request: object) -> str:
    with pytest.raises(PlanError) as info:
        make(ref, hw, mem, **request)
    return str(info.value)


def raw_bound(hw: Hardware, mem: MemoryProfile, headroom: float, state_gb: float | None = None) -> int:
    """The memory bound written out independently: floor((usable - model states) / per sample)."""
    state = mem.model_gb if state_gb is None else state_gb
    return math.floor((hw.device_memory_gb * (1 - headroom) - state) / mem.per_sample_gb + 1e-9)


# --- the seed worked examples -------------------------------------------------------------------


def test_seed_24gb_card_4gb_model_fits_100_samples() -> None:
    """(24 - 4) / 0.2 = 100, despite the float quotient being 99.99999999999999."""
    hw = Hardware(nodes=1, devices_per_node=1, device_memory_gb=24)
    p = make(hw=hw, mem=profile(4, 0.2), headroom=0, global_batch=200)
    assert p.max_micro_batch == 100
    assert (p.micro_batch, p.grad_accum, p.global_batch) == (100, 2, 200)


def test_seed_12gb_card_bound_18_rounds_to_16_and_accumulates_4_for_64() -> None:
    hw = Hardware(nodes=1, devices_per_node=1, device_memory_gb=12)
    mem = profile(3, 0.5)
    assert make(hw=hw, mem=mem, headroom=0, global_batch=64).max_micro_batch == 18

    p = make(hw=hw, mem=mem, headroom=0, global_batch=64, power_of_two=True)
    assert p.max_micro_batch == 16
    assert (p.micro_batch, p.grad_accum, p.global_batch) == (16, 4, 64)
    assert has_reason(p, "max micro-batch 18", "rounded down to the power of two 16")


def test_seed_linear_rule_64_at_0_1_becomes_256_at_0_4() -> None:
    ref = replace(SGD, global_batch=64, lr=0.1, lr_rule="linear")
    p = make(ref, global_batch=256)
    assert p.lr == pytest.approx(0.4)
    assert p.lr_rule == "linear"


def test_headroom_shrinks_the_usable_memory() -> None:
    hw = Hardware(nodes=1, devices_per_node=1, device_memory_gb=24)
    p = make(hw=hw, mem=profile(4, 0.2), headroom=0.1, global_batch=200)
    assert p.max_micro_batch == 88  # floor((21.6 - 4) / 0.2)
    assert p.memory["usable_gb"] == pytest.approx(21.6)


def test_bound_survives_a_float_quotient_just_below_an_integer() -> None:
    """(8 - 1) / 0.07 is 99.99999999999999 in floats; the bound is still 100 (planner.EPS)."""
    assert (8 - 1) / 0.07 < 100
    hw = Hardware(nodes=1, devices_per_node=1, device_memory_gb=8)
    assert make(hw=hw, mem=profile(1, 0.07), headroom=0, global_batch=100).max_micro_batch == 100


# --- split properties ---------------------------------------------------------------------------

shapes = st.fixed_dictionaries(
    {
        "nodes": st.integers(1, 4),
        "per_node": st.integers(1, 8),
        "memory_gb": st.floats(16, 80),
        "model_gb": st.floats(0.1, 4),
        "per_sample_gb": st.floats(0.01, 2),
        "headroom": st.floats(0, 0.5),
        "power_of_two": st.booleans(),
        "target": st.integers(1, 4096),
    }
)


def _plan_shape(s: dict, engine: str = "ddp") -> tuple[Plan, Hardware, MemoryProfile]:
    """A feasible plan (16 GB x 0.5 leaves 8 GB > 4 GB model + 2 GB sample)."""
    hw = gpus(s["nodes"], s["per_node"], s["memory_gb"])
    assume(s["target"] >= hw.world_size)
    mem = profile(s["model_gb"], s["per_sample_gb"])
    try:
        p = make(hw=hw, mem=mem, headroom=s["headroom"], power_of_two=s["power_of_two"], global_batch=s["target"],
                 engine=engine)
    except PlanError as e:  # uneven shares that cannot fill the micro-steps: a clear error, tested below
        assume("batch.global_batch" not in str(e))
        raise
    return p, hw, mem


@settings(max_examples=300, deadline=None)
@given(shapes)
def test_split_is_exact_whenever_an_exact_split_exists(s: dict) -> None:
    p, hw, _ = _plan_shape(s)
    world, target = hw.world_size, s["target"]
    allowed = [m for m in range(1, p.max_micro_batch + 1) if not s["power_of_two"] or m & (m - 1) == 0]
    exact = [m for m in allowed if target % world == 0 and (target // world) % m == 0]
    assert p.global_batch == target  # engine=ddp: exact, or uneven shares that keep it (#18)
    if exact:
        assert p.global_batch == p.micro_batch * p.grad_accum * world
        assert p.micro_batch == max(exact)  # fewest accumulation steps
        assert has_reason(p, "exactly the target")
    else:
        assert has_reason(p, "uneven shares")


@settings(max_examples=300, deadline=None)
@given(shapes)
def test_micro_batch_never_exceeds_the_memory_bound(s: dict) -> None:
    p, hw, mem = _plan_shape(s)
    raw = raw_bound(hw, mem, s["headroom"])
    assert 1 <= p.micro_batch <= p.max_micro_batch <= raw
    if s["power_of_two"]:
        assert p.max_micro_batch & (p.max_micro_batch - 1) == 0 and p.max_micro_batch * 2 > raw
    else:
        assert p.max_micro_batch == raw
    usable = hw.device_memory_gb * (1 - s["headroom"])
    assert mem.model_gb + p.micro_batch * mem.per_sample_gb <= usable + 1e-6


@settings(max_examples=300, deadline=None)
@given(shapes)
def test_split_is_the_nearest_reachable_global_batch(s: dict) -> None:
    """engine=deepspeed: micro x accumulation x world must equal train_batch_size, so the nearest split."""
    p, hw, _ = _plan_shape(s, engine="deepspeed")
    world, target = hw.world_size, s["target"]
    micros = [m for m in range(1, p.max_micro_batch + 1) if not s["power_of_two"] or m & (m - 1) == 0]
    # for each micro the best accumulation is one of the two integers around target / (micro x world)
    best = min(
        abs(m * a * world - target)
        for m in micros
        for a in {max(1, math.floor(target / (m * world))), max(1, math.ceil(target / (m * world)))}
    )
    assert abs(p.global_batch - target) == best


@settings(max_examples=100, deadline=None)
@given(target=st.integers(1, 2048), worlds=st.lists(st.integers(1, 64), min_size=2, max_size=5))
def test_global_batch_and_lr_do_not_depend_on_the_world_size(target: int, worlds: list[int]) -> None:
    feasible = [w for w in worlds if w <= target]
    assume(len(feasible) >= 2)
    plans = {w: make(BERT, gpus(1, w), global_batch=target, scale_with_world=False) for w in feasible}
    assert {p.target_global_batch for p in plans.values()} == {target}
    dividing = [plans[w] for w in feasible if target % w == 0]
    assert {p.global_batch for p in dividing} <= {target}
    assert len({(p.lr, p.max_steps, p.warmup_steps) for p in dividing}) <= 1


def test_world_size_changes_only_the_split_without_scale_with_world() -> None:
    one, many = make(global_batch=512, hw=gpus(1, 1)), make(global_batch=512, hw=gpus(8, 8))
    assert one.global_batch == many.global_batch == 512
    assert one.lr == many.lr and one.max_steps == many.max_steps
    assert (one.micro_batch * one.grad_accum, many.micro_batch * many.grad_accum) == (512, 8)


@settings(max_examples=100, deadline=None)
@given(per_device=st.integers(1, 64), devices=st.integers(1, 32), w1=st.integers(1, 64), w2=st.integers(1, 64))
def test_scale_with_world_grows_the_global_batch(per_device: int, devices: int, w1: int, w2: int) -> None:
    assume(w1 < w2)
    ref = replace(SGD, global_batch=per_device * devices, devices=devices)
    small, big = (make(ref, gpus(1, w), scale_with_world=True) for w in (w1, w2))
    assert (small.global_batch, big.global_batch) == (per_device * w1, per_device * w2)
    assert big.lr > small.lr  # linear rule follows the batch
    assert has_reason(big, "batch.scale_with_world=true")


@settings(max_examples=100, deadline=None)
@given(base=st.integers(1, 4096), devices=st.integers(1, 64), w1=st.integers(1, 64), w2=st.integers(1, 64))
def test_scale_with_world_target_is_monotone_in_the_world(base: int, devices: int, w1: int, w2: int) -> None:
    assume(w1 < w2)
    ref = replace(SGD, devices=devices)
    targets = []
    for w in (w1, w2):
        try:
            targets.append(make(ref, gpus(1, w), global_batch=base, scale_with_world=True).target_global_batch)
        except PlanError:  # scaled target below the world size
            assume(False)
    assert targets[0] <= targets[1]
    assert targets[1] == max(1, round(base * w2 / devices))


def test_nearest_split_when_no_exact_one_exists() -> None:
    p = make(hw=gpus(1, 8), global_batch=100, engine="deepspeed")  # 100 is not a multiple of 8 devices
    assert p.target_global_batch == 100
    assert p.global_batch in (96, 104) and p.global_batch == p.micro_batch * p.grad_accum * 8
    assert has_reason(p, "no split of 100", "is exact", "nearest is")
    assert "(target 100)" in describe(p)


def test_pinned_micro_batch_gets_the_nearest_accumulation() -> None:
    p = make(hw=gpus(1, 2), global_batch=100, micro_batch=8, engine="deepspeed")
    assert (p.micro_batch, p.grad_accum, p.global_batch) == (8, 6, 96)
    assert has_reason(p, "pinned by batch.micro_batch", "nearest")
    ddp = make(hw=gpus(1, 2), global_batch=100, micro_batch=8)  # 50 per rank in 7 micro-batches of at most 8
    assert (ddp.micro_batch, ddp.grad_accum, ddp.global_batch) == (8, 7, 100)


def test_small_exact_micro_is_flagged_as_slow() -> None:
    """36 = 4 x 9: the only power-of-two exact split uses micro 4, far below the bound 16."""
    hw = Hardware(nodes=1, devices_per_node=1, device_memory_gb=12)
    p = make(hw=hw, mem=profile(3, 0.5), headroom=0, power_of_two=True, global_batch=36)
    assert (p.micro_batch, p.grad_accum, p.global_batch) == (4, 9, 36)
    assert has_reason(p, "well below the memory bound 16")


# --- learning rate --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "expected"),
    [("linear", 0.1 * 4), ("sqrt", 0.1 * 2), ("none", 0.1)],
)
def test_lr_rules_at_four_times_the_reference_batch(rule: str, expected: float) -> None:
    p = make(SGD, global_batch=1024, lr_rule=rule)
    assert p.lr == pytest.approx(expected)
    assert p.lr_rule == rule
    assert has_reason(p, "planner.lr_rule")


def test_auto_lr_rule_is_the_recipes() -> None:
    p = make(BERT, global_batch=1024)
    assert p.lr == pytest.approx(2e-4)  # 1e-4 x sqrt(4)
    assert p.lr_rule == "sqrt"
    assert has_reason(p, "recipe default")


def test_pinned_lr_is_not_scaled() -> None:
    p = make(BERT, global_batch=32768, lr=5e-4, hw=gpus(8, 8))
    assert p.lr == 5e-4
    assert p.lr_rule == "pinned"
    assert has_reason(p, "pinned by optim.lr")


def test_anchor_wins_at_its_global_batch_with_auto_rule() -> None:
    p = make(BERT, global_batch=32768, hw=gpus(8, 8))
    assert (p.lr, p.lr_rule) == (4e-3, "anchor")
    assert p.warmup_steps == 200
    assert has_reason(p, "published anchor", "LAMB phase 2")


def test_anchor_is_skipped_by_an_explicit_rule_or_another_batch() -> None:
    explicit = make(BERT, global_batch=32768, hw=gpus(8, 8), lr_rule="linear")
    assert explicit.lr == pytest.approx(1e-4 * 128) and explicit.lr_rule == "linear"
    between = make(BERT, global_batch=16384, hw=gpus(8, 8))
    assert between.lr == pytest.approx(1e-4 * 8) and between.lr_rule == "sqrt"


# --- steps and warmup ------------------------------------------------------------------------------


def test_steps_and_warmup_keep_the_samples_of_the_reference() -> None:
    p = make(SGD, global_batch=1024)
    assert (p.max_steps, p.warmup_steps) == (2500, 125)
    assert p.max_steps * p.global_batch == SGD.max_steps * SGD.global_batch


@settings(max_examples=100, deadline=None)
@given(global_batch=st.integers(1, 65536))
def test_max_steps_is_the_ceiling_of_the_reference_samples(global_batch: int) -> None:
    p = make(SGD, hw=gpus(1, 1), global_batch=global_batch)
    samples = SGD.max_steps * SGD.global_batch
    assert p.global_batch == global_batch
    assert (p.max_steps - 1) * global_batch < samples <= p.max_steps * global_batch
    assert p.warmup_steps == min(p.max_steps, round(SGD.warmup_steps * SGD.global_batch / global_batch))


def test_pinned_max_steps_scales_warmup_by_the_reference_share() -> None:
    p = make(SGD, global_batch=1024, max_steps=4000)
    assert p.max_steps == 4000
    assert p.warmup_steps == 200  # 500 / 10000 = 5% of 4000
    assert has_reason(p, "pinned by train.max_steps") and has_reason(p, "warmup share")


def test_pinned_warmup_is_kept() -> None:
    p = make(SGD, global_batch=1024, warmup_steps=7)
    assert p.warmup_steps == 7 and p.max_steps == 2500


def test_max_epochs_with_a_dataset_size() -> None:
    p = make(SGD, global_batch=1000, max_epochs=2, dataset_size=10_500)
    assert p.max_steps == 21  # ceil(2 x 10500 / 1000)
    assert p.warmup_steps == 1  # round(0.05 x 21)


def test_warmup_is_added_when_the_lr_doubles_from_no_warmup() -> None:
    ref = replace(SGD, warmup_steps=0)
    doubled = make(ref, global_batch=512)
    assert doubled.lr == pytest.approx(0.2)
    assert doubled.warmup_steps == math.ceil(doubled.max_steps * 5 / 90) == 278
    assert has_reason(doubled, "warmup 278 steps added")
    assert make(ref, global_batch=384).warmup_steps == 0  # 1.5x: none added
    assert make(ref, global_batch=512, warmup_steps=0).warmup_steps == 0  # pinned
    assert make(ref, global_batch=512, lr=0.2).warmup_steps == 0  # lr pinned


def test_step_schedule_milestones_follow_max_steps() -> None:
    ref = replace(SGD, schedule="step", milestones=(0.3, 0.6, 0.9))
    p = make(ref, global_batch=1024)
    assert p.milestones == [750, 1500, 2250]


# --- large-batch optimizer ---------------------------------------------------------------------------


def test_lamb_at_the_threshold() -> None:
    p = make(BERT, hw=gpus(8, 8), global_batch=8192)
    assert p.optimizer == "lamb"
    assert has_reason(p, "LAMB instead of adamw", ">= 8192")


def test_adamw_below_the_threshold() -> None:
    just_below = make(BERT, hw=gpus(1, 1), global_batch=8191)
    assert just_below.global_batch == 8191 and just_below.optimizer == "adamw"
    assert has_reason(just_below, "optimizer adamw", "< 8192")
    assert make(BERT, global_batch=256).optimizer == "adamw"


# --- norm policy -------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["sync_bn", "group_norm", "frozen_bn"])
def test_small_micro_batch_applies_the_recipe_norm_policy(policy: str) -> None:
    ref = replace(RESNET, norm_policy=policy)
    p = make(ref, hw=gpus(1, 8), global_batch=256, micro_batch=16, bn_min_group=32)
    assert p.norm == policy
    assert has_reason(p, f"norm {policy}", "16 samples per device < 32")


def test_batch_norm_kept_at_the_minimum_group() -> None:
    p = make(RESNET, hw=gpus(1, 8), global_batch=256, micro_batch=32, bn_min_group=32)
    assert p.norm == "batch_norm"
    assert make(RESNET, hw=gpus(1, 8), global_batch=256, micro_batch=31, bn_min_group=32).norm == "sync_bn"


def test_sync_bn_warns_when_even_the_pooled_group_is_small() -> None:
    small = make(RESNET, hw=gpus(1, 4), global_batch=64, micro_batch=2)
    assert small.norm == "sync_bn" and has_reason(small, "warning", "8 samples per statistics group")
    pooled = make(RESNET, hw=gpus(1, 8), global_batch=256, micro_batch=16)
    assert not has_reason(pooled, "warning")


def test_norm_unchanged_without_batch_norm() -> None:
    p = make(SGD, global_batch=256, micro_batch=2)
    assert p.norm == "unchanged"
    assert has_reason(p, "no BatchNorm")


# --- ZeRO and the DeepSpeed config ---------------------------------------------------------------------

# 40 GB of model states (10 params, 10 grads, 20 moments) on 8 x 16 GB: usable 14.4 GB per device.
# Stage 1: 10 + 10 + 20/8 = 22.5 (no); stage 2: 10 + 30/8 = 13.75 (+0.1 sample: fits); stage 3: 5.
BIG = profile(40, 0.1)


def test_ddp_with_states_too_large_names_the_key_and_a_stage() -> None:
    message = plan_error(hw=gpus(1, 8, 16), mem=BIG, engine="ddp")
    assert "planner.memory.model_gb" in message
    assert "engine=deepspeed would fit with ZeRO stage 2" in message


def test_deepspeed_picks_the_lowest_fitting_stage() -> None:
    p = make(hw=gpus(1, 8, 16), mem=BIG, engine="deepspeed")
    assert p.zero_stage == 2
    assert p.memory["model_state_per_device_gb"] == pytest.approx(13.75)
    assert p.max_micro_batch == raw_bound(gpus(1, 8, 16), BIG, 0.1, state_gb=13.75) == 6
    assert has_reason(p, "ZeRO stage 2", "lowest stage")


def test_deepspeed_stage_1_shards_only_the_optimizer_states() -> None:
    """16 GB (4 + 4 + 8) on 8 x 16 GB: stage 0 needs 16, stage 1 needs 4 + 4 + 8/8 = 9."""
    p = make(hw=gpus(1, 8, 16), mem=profile(16, 0.1), engine="deepspeed")
    assert p.zero_stage == 1
    assert p.memory["model_state_per_device_gb"] == pytest.approx(9.0)


def test_deepspeed_keeps_stage_0_when_the_model_fits() -> None:
    p = make(engine="deepspeed")
    assert p.zero_stage == 0 and has_reason(p, "ZeRO stage 0")


def test_pinned_zero_stage_is_checked_and_kept() -> None:
    message = plan_error(hw=gpus(1, 8, 16), mem=BIG, engine="deepspeed", zero_stage=1)
    assert "engine.zero_stage" in message and "stage 1 does not fit" in message
    p = make(hw=gpus(1, 8, 16), mem=BIG, engine="deepspeed", zero_stage=3)
    assert p.zero_stage == 3 and has_reason(p, "pinned by engine.zero_stage")


def test_no_stage_fits_names_the_model_key() -> None:
    message = plan_error(hw=gpus(1, 1, 24), mem=profile(40, 0.1), engine="deepspeed")
    assert "planner.memory.model_gb" in message and "even with ZeRO stage 3" in message


@settings(max_examples=100, deadline=None)
@given(nodes=st.integers(1, 4), per_node=st.integers(1, 8), target=st.integers(1, 8192), stage=st.integers(0, 3))
def test_deepspeed_config_batch_sizes_are_the_plans(nodes: int, per_node: int, target: int, stage: int) -> None:
    hw = gpus(nodes, per_node)
    assume(target >= hw.world_size)
    p = make(hw=hw, engine="deepspeed", zero_stage=stage, global_batch=target)
    ds = p.deepspeed
    assert ds is not None
    assert ds["train_batch_size"] == p.micro_batch * p.grad_accum * hw.world_size == p.global_batch
    assert ds["train_micro_batch_size_per_gpu"] == p.micro_batch
    assert ds["gradient_accumulation_steps"] == p.grad_accum
    assert ds["zero_optimization"] == {"stage": stage}


def test_deepspeed_config_precision_and_clipping() -> None:
    req = Request(reference=SGD, engine="deepspeed", grad_clip=1.0)
    p = plan(req, gpus(), ROOMY)
    assert p.deepspeed == deepspeed_config(p, req, gpus())
    assert p.deepspeed["bf16"] == {"enabled": True} and p.deepspeed["gradient_clipping"] == 1.0
    assert deepspeed_config(p, replace(req, precision="fp32"), gpus())["bf16"] == {"enabled": False}
    assert deepspeed_config(p, req, gpus(device="cpu"))["bf16"] == {"enabled": False}
    assert "gradient_clipping" not in deepspeed_config(p, replace(req, grad_clip=None), gpus())
    assert make(engine="ddp").deepspeed is None


# --- input errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"hw": gpus(nodes=0)}, "cluster.nodes"),
        ({"hw": gpus(per_node=-1)}, "cluster.gpus_per_node"),
        ({"hw": gpus(memory_gb=0)}, "cluster.gpu_memory_gb"),
        ({"mem": profile(1, 0)}, "planner.memory.per_sample_gb"),
        ({"mem": profile(0, 0.1)}, "planner.memory.model_gb"),
        ({"mem": profile(-1, 0.1)}, "planner.memory.model_gb"),
        ({"ref": replace(SGD, global_batch=0)}, "recipe.reference.global_batch"),
        ({"ref": replace(SGD, lr=-0.1)}, "recipe.reference.lr"),
        ({"ref": replace(SGD, max_steps=0)}, "recipe.reference.max_steps"),
        ({"global_batch": 0}, "batch.global_batch"),
        ({"micro_batch": -2}, "batch.micro_batch"),
        ({"headroom": 1.0}, "planner.headroom"),
        ({"max_steps": 10, "max_epochs": 1.0}, "train.max_epochs and train.max_steps"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_input_names_its_key(change: dict, key: str) -> None:
    assert key in plan_error(**change)


def test_every_bad_input_is_reported_at_once() -> None:
    with pytest.raises(PlanError) as info:
        make(hw=gpus(nodes=0, memory_gb=-1), global_batch=0)
    assert len(info.value.errors) == 3
    assert all(k in str(info.value) for k in ("cluster.nodes", "cluster.gpu_memory_gb", "batch.global_batch"))


def test_micro_batch_pinned_above_the_bound() -> None:
    hw = Hardware(nodes=1, devices_per_node=1, device_memory_gb=24)
    message = plan_error(hw=hw, mem=profile(4, 0.2), headroom=0, global_batch=256, micro_batch=101)
    assert "batch.micro_batch" in message and "memory bound 100" in message


def test_global_batch_smaller_than_the_world() -> None:
    message = plan_error(hw=gpus(1, 8), global_batch=4)
    assert "batch.global_batch" in message and "smaller than the world size 8" in message


def test_memory_smaller_than_the_model() -> None:
    message = plan_error(hw=gpus(1, 1, 24), mem=profile(30, 0.1))
    assert "planner.memory.model_gb" in message and "does not fit one device" in message


# --- before the data: what fails without a memory profile or the dataset size ----------------------------


def test_check_reports_what_needs_no_memory_profile_at_once() -> None:
    with pytest.raises(PlanError) as info:
        check(Request(reference=SGD, global_batch=4, max_steps=10, max_epochs=1.0), gpus(1, 8))
    first, second = info.value.errors
    assert first.startswith("train.max_epochs and train.max_steps are both set")
    assert second.startswith("batch.global_batch:") and "smaller than the world size 8" in second


def test_check_leaves_to_plan_what_needs_the_memory_profile_or_the_measurement() -> None:
    check(Request(reference=SGD, micro_batch=100_000), gpus())  # the memory bound is not known yet
    check(Request(reference=SGD, auto_noise_scale=True), gpus(1, 8))  # looked up after the check
    check(Request(reference=SGD, global_batch=8), gpus(1, 8))
    assert "batch.micro_batch: pinned to 100000, above the memory bound 7100" in plan_error(micro_batch=100_000)
    with pytest.raises(PlanError, match="cluster.nodes") as info:  # no target check on a world of 0
        check(Request(reference=SGD), gpus(nodes=0))
    assert len(info.value.errors) == 1


STEPS_ONLY = {"max_steps", "warmup_steps", "milestones", "reasons"}  # what the dataset size may change
requests = st.fixed_dictionaries(
    {
        "per_node": st.integers(1, 8),
        "memory_gb": st.floats(0.5, 40),
        "model_gb": st.floats(0.1, 8),
        "per_sample_gb": st.floats(0.01, 2),
        "global_batch": st.none() | st.integers(1, 64),
        "micro_batch": st.none() | st.integers(1, 64),
        "max_steps": st.none() | st.integers(1, 10_000),
        "max_epochs": st.none() | st.floats(0.1, 100),
        "engine": st.sampled_from(["ddp", "deepspeed"]),
        "dataset_size": st.integers(1, 10**6),
    }
)


@settings(max_examples=300, deadline=None)
@given(requests)
def test_the_dataset_size_changes_only_the_steps_and_never_an_error(r: dict) -> None:
    """What lets the driver plan before building any data: a request without the dataset size fails exactly
    where one with it does, and else the two plans differ only in the steps; ``check`` refuses nothing
    that ``plan`` would accept."""
    ref = replace(RESNET, epochs=90.0, schedule="step", milestones=(0.3, 0.6))  # epochs: the size sets the steps
    hw, mem = gpus(1, r["per_node"], r["memory_gb"]), profile(r["model_gb"], r["per_sample_gb"])
    asked = {k: r[k] for k in ("global_batch", "micro_batch", "max_steps", "max_epochs", "engine")}

    def outcome(dataset_size: int | None) -> Plan | list[str]:
        try:
            return plan(Request(reference=ref, dataset_size=dataset_size, **asked), hw, mem)
        except PlanError as e:
            return e.errors

    without, counted = outcome(None), outcome(r["dataset_size"])
    if isinstance(without, list):
        assert counted == without
    else:
        assert isinstance(counted, Plan)
        assert {k: v for k, v in without.to_dict().items() if k not in STEPS_ONLY} == {
            k: v for k, v in counted.to_dict().items() if k not in STEPS_ONLY
        }
    try:
        check(Request(reference=ref, **asked), hw)
    except PlanError as e:
        assert isinstance(without, list) and without[0] in e.errors


# --- the plan as output --------------------------------------------------------------------------------


def test_describe_and_dict_round_trip() -> None:
    p = make(BERT, hw=gpus(8, 8), global_batch=8192)
    assert Plan.from_dict(p.to_dict()) == p
    text = describe(p)
    assert "lamb" in text and "8192" in text
    assert all(f"{i + 1:>2}. {r}" in text for i, r in enumerate(p.reasons))
    assert p.memory["source"] == "override" and p.memory["model_gb"] == pytest.approx(1.0)


# --- regressions: two bugs this suite found (added warmup keyed on batch; anchor warmup without its lr) ---


@pytest.mark.parametrize("rule", ["none", "sqrt"])
def test_added_warmup_requires_the_lr_to_double(rule: str) -> None:
    ref = replace(SGD, warmup_steps=0)
    p = make(ref, global_batch=512, lr_rule=rule)
    assert p.lr < 2 * ref.lr
    assert p.warmup_steps == 0
    assert not has_reason(p, "the lr grew >= 2x")


def test_anchor_warmup_only_with_the_anchor_lr() -> None:
    p = make(BERT, global_batch=32768, hw=gpus(8, 8), lr_rule="sqrt")
    assert p.lr_rule == "sqrt"
    assert not has_reason(p, "from the published anchor")
    assert p.warmup_steps == round(BERT.warmup_steps * BERT.global_batch / 32768)  # 78, the rescaled warmup


# --- batch-size science: advice from a measured noise scale ---------------------------------------


def test_advice_is_a_reason_and_never_changes_the_plan() -> None:
    plain = make(global_batch=1024)
    advised = make(global_batch=1024, noise_scale=100.0, noise_source="run x at step 9")
    assert (advised.global_batch, advised.lr, advised.max_steps) == (plain.global_batch, plain.lr, plain.max_steps)
    # B = 1024 vs B_noise = 100: steps 1 + 100/1024 = 1.10x the minimum, samples 1 + 10.24 = 11.24x
    assert has_reason(advised, "advice:", "10x the measured critical batch 100", "1.10x", "11.24x", "well above")
    assert has_reason(make(global_batch=16, noise_scale=100.0), "well below", "1.16x the fewest samples")
    assert has_reason(make(global_batch=128, noise_scale=100.0), "near it")


def test_advise_without_a_measurement_says_how_to_get_one() -> None:
    assert has_reason(make(advise=True), "advice:", "train.measure_noise_scale=true")
    assert not any("advice" in r for r in make().reasons)


def test_auto_noise_scale_takes_the_measured_critical_batch() -> None:
    p = make(auto_noise_scale=True, noise_scale=511.6, noise_source="run y at step 300")
    assert p.target_global_batch == 512 and p.lr == pytest.approx(0.1 * 512 / 256)
    assert has_reason(p, "measured critical batch B_simple 511.6 (run y at step 300)")
    assert "batch.global_batch: auto_noise_scale needs a noise-scale measurement" in plan_error(auto_noise_scale=True)


# --- one definition of the inputs, a frozen plan, notes after the reasons --------------------------


def test_reference_and_anchor_are_the_configs() -> None:
    from launcher import config, planner

    assert planner.Reference is config.Reference and planner.Anchor is config.Anchor


def test_request_defaults_are_the_config_defaults() -> None:
    """A Request with only a reference asks what a default config asks (its defaults are read, not restated)."""
    from launcher.config import BertRecipe, Config
    from launcher.planner import request_from_config

    cfg = Config(recipe=BertRecipe(reference=BERT))
    assert request_from_config(cfg) == Request(reference=BERT)


def test_plan_is_frozen_and_notes_come_after_the_reasons() -> None:
    p = make(BERT, hw=gpus(8, 8), global_batch=8192)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.lr = 1.0  # type: ignore[misc]
    noted = p.with_notes("resume: run x from step 3")
    assert p.notes == () and noted.notes == ("resume: run x from step 3",) and noted.reasons == p.reasons
    text = describe(noted)
    assert text.index("resume: run x from step 3") > text.index(p.reasons[-1])
    assert "notes:" not in describe(p)
    assert p.with_reasons("checked").reasons == (*p.reasons, "checked")


def test_plan_dict_is_plain_data_and_reads_back_from_json() -> None:
    p = make(replace(SGD, schedule="step", milestones=(0.5,)), engine="deepspeed").with_notes("a note")
    d = p.to_dict()
    assert isinstance(d["reasons"], list) and d["notes"] == ["a note"]
    assert Plan.from_dict(json.loads(json.dumps(d))) == p
    old = {k: v for k, v in d.items() if k != "notes"}  # a plan written before notes existed
    assert Plan.from_dict(old).notes == ()


# --- the CPU budget (planner.cpu_budget) --------------------------------------------------------------


@pytest.mark.parametrize(
    ("node_cpus", "workers", "device", "expected"),
    [
        (16, 1, "cuda", (16, 15, 1)),  # one GPU: every CPU but the training process's decodes
        (64, 8, "cuda", (8, 7, 1)),  # 8 GPUs: 64 // 8 each, 7 of them loaders
        (96, 8, "cuda", (12, 11, 1)),  # an 8-GPU H100 node with 96 cores: 11 decode processes per GPU
        (10, 3, "cuda", (3, 2, 1)),  # 10 // 3: the CPU left over stays free
        (2, 1, "cuda", (2, 1, 1)),
        (1, 1, "cuda", (1, 0, 1)),  # no CPU to spare: the training process loads
        (2, 2, "cpu", (1, 0, 1)),  # the 2-core laptop: the workers are the compute
        (16, 2, "cpu", (8, 0, 8)),  # CPU workers keep every CPU for torch's threads
        (2, 3, "cpu", (1, 0, 1)),  # more workers than CPUs: 1 each, oversubscribed (and said so)
    ],
)
def test_cpu_budget_by_hand(node_cpus: int, workers: int, device: str, expected: tuple[int, int, int]) -> None:
    b = cpu_budget(node_cpus, workers, device)
    assert (b.cpus_per_worker, b.loader_workers, b.torch_threads) == expected
    assert f"{node_cpus} CPUs of a node // {workers} worker(s)" in b.reason and "(data.num_workers=auto)" in b.reason
    assert ("warning: " in b.reason) == (workers > node_cpus)


def test_cpu_budget_pins_win_and_the_threads_take_what_the_loaders_leave() -> None:
    pinned = cpu_budget(64, 8, "cuda", cpus_per_worker=4)  # cluster.cpus_per_worker=4: its loaders follow
    assert (pinned.cpus_per_worker, pinned.loader_workers, pinned.torch_threads) == (4, 3, 1)
    assert "4 (cluster.cpus_per_worker)" in pinned.reason
    loaders = cpu_budget(16, 2, "cpu", loader_workers=2)  # data.num_workers=2 on CPU workers: 8 - 2 threads
    assert (loaders.cpus_per_worker, loaders.loader_workers, loaders.torch_threads) == (8, 2, 6)
    assert "2 (data.num_workers)" in loaders.reason and "warning" not in loaders.reason
    smoke = cpu_budget(2, 2, "cpu", loader_workers=0)  # scale=smoke on 2 cores: as before the budget existed
    assert (smoke.cpus_per_worker, smoke.loader_workers, smoke.torch_threads) == (1, 0, 1)
    crowded = cpu_budget(2, 2, "cpu", loader_workers=2)  # 2 loaders + the training process on 1 CPU
    assert crowded.torch_threads == 1
    assert "warning: 2 loader process(es) and the training process on 1 CPU(s)" in crowded.reason


def test_cpu_budget_without_the_nodes_cpus_reserves_one_and_says_where_it_is_planned() -> None:
    b = cpu_budget(None, 8, "cuda")  # hardware described from a laptop: its CPUs are not these
    assert (b.cpus_per_worker, b.loader_workers, b.torch_threads) == (1, 0, 1)
    assert "the hardware is described: its CPUs are read where it trains" in b.reason and b.node_cpus is None
    described = describe(make(hw=gpus(8, 8)))
    assert "CPUs / worker         1: 0 DataLoader process(es), 1 torch thread(s) (the nodes' CPUs are not" in described
    assert cpu_budget(None, 8, "cuda", cpus_per_worker=12).loader_workers == 11


def test_the_plan_carries_the_cpu_budget_with_its_reason_row_and_json() -> None:
    hw = replace(gpus(2, 8), cpus_per_node=96)
    p = make(hw=hw)
    assert (p.cpus.cpus_per_worker, p.cpus.loader_workers, p.cpus.torch_threads) == (12, 11, 1)
    assert p.cpus.reason in p.reasons
    assert "CPUs / worker         12: 11 DataLoader process(es), 1 torch thread(s)" in describe(p)
    assert json.loads(json.dumps(p.to_dict()))["cpus"]["loader_workers"] == 11
    pinned = make(hw=hw, cpus_per_worker=6, loader_workers=3)  # cluster.cpus_per_worker, data.num_workers
    assert (pinned.cpus.cpus_per_worker, pinned.cpus.loader_workers, pinned.cpus.torch_threads) == (6, 3, 3)


@given(st.integers(1, 512), st.integers(1, 16), st.integers(1, 64))
def test_an_elastic_world_keeps_each_workers_cpus(cpus: int, per_node: int, world: int) -> None:
    """Ray reserves the driver's CPUs per worker for the whole run: a re-plan on another world size
    (``Hardware.with_world``) must give each worker the same budget."""
    def budget(hw: Hardware) -> tuple[int, int, int]:
        b = cpu_budget(hw.cpus_per_node, hw.devices_per_node, hw.device)
        return b.cpus_per_worker, b.loader_workers, b.torch_threads

    hw = Hardware(nodes=2, devices_per_node=per_node, device_memory_gb=80, cpus_per_node=cpus)
    assert budget(hw.with_world(world)) == budget(hw)
