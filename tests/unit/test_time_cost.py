"""Time and cost in the plan (#21): step time, time to train, GPU-hours and cost, each with its source."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from launcher.config import ConfigError
from launcher.devices import GPUS, gpu_type_of
from launcher.planner import Hardware, MemoryProfile, Plan, Reference, Request, describe, plan

REF = Reference(global_batch=256, lr=1e-4, max_steps=1000, optimizer="adamw", source="test")
MEM = dataclasses.replace(
    MemoryProfile.from_total(4.0, 0.1, source="estimate"), flops_per_sample=3e11, flops_detail="counted (test)"
)


def h100s(nodes: int = 2, per_node: int = 8, **kw: object) -> Hardware:
    return Hardware(nodes=nodes, devices_per_node=per_node, device_memory_gb=80, gpu_type="h100", **kw)  # type: ignore[arg-type]


def reasons(p: Plan) -> str:
    return "\n".join(p.reasons)


def test_the_arithmetic_against_a_hand_computation() -> None:
    # 256 samples on 2 x 8 H100s: 16 per rank; 16 x 3e11 FLOP / (0.4 x 989e12 FLOP/s) = 4.8e12 / 3.956e14 s
    p = plan(Request(reference=REF, gpu_hour_usd=2.5), h100s(), MEM)
    assert p.step_time_s == pytest.approx(0.0121334681, rel=1e-8)
    assert p.time_to_train_h == pytest.approx(1000 * 0.0121334681 / 3600, rel=1e-8)  # 0.00337041 h
    assert p.gpu_hours == pytest.approx(0.0539262, rel=1e-5)  # x 16 GPUs
    assert p.cost_usd == pytest.approx(0.1348155, rel=1e-5)  # x $2.5
    why = reasons(p)
    assert "estimated at 40% of the H100 SXM's 989 TFLOP/s bf16 dense" in why
    assert "16 samples per rank x 300 GFLOP/sample" in why and "NVIDIA H100 Tensor Core GPU datasheet" in why
    assert "1000 steps x 0.0121 s" in why and "x 16 GPUs" in why and "x $2.5 (cluster.gpu_hour_usd)" in why
    assert p.time_basis == "estimated at 40% of the H100 SXM's 989 TFLOP/s bf16 dense"


def test_mfu_precision_and_the_gpu_change_the_peak() -> None:
    half = plan(Request(reference=REF, mfu=0.2), h100s(), MEM)
    assert half.step_time_s == pytest.approx(2 * 0.0121334681, rel=1e-8)
    fp32 = plan(Request(reference=REF, precision="fp32"), h100s(), MEM)
    assert fp32.step_time_s == pytest.approx(16 * 3e11 / (0.4 * 67e12), rel=1e-9)
    assert "67 TFLOP/s fp32" in fp32.time_basis
    a100 = plan(Request(reference=REF), dataclasses.replace(h100s(), gpu_type="a100-80gb"), MEM)
    assert a100.step_time_s == pytest.approx(16 * 3e11 / (0.4 * 312e12), rel=1e-9)
    assert a100.cost_usd is None and "cost" not in describe(a100).split("why:")[0]


def test_uneven_shares_take_the_largest_share() -> None:
    p = plan(Request(reference=REF, global_batch=250), h100s(), MEM)  # 250 on 16: shares of 16 and 15
    assert p.step_time_s == pytest.approx(16 * 3e11 / (0.4 * 989e12), rel=1e-9)


def test_the_probes_measured_step_wins_over_the_flop_count() -> None:
    measured = dataclasses.replace(MEM, step_s_fixed=0.01, step_s_per_sample=0.002, step_detail="timed (test)")
    p = plan(Request(reference=REF, global_batch=512), h100s(gpu_name="NVIDIA H100 80GB HBM3"), measured)
    assert p.step_time_s == pytest.approx(0.01 + 32 * 0.002)  # 1 micro-step of 32 samples
    assert "measured by the GPU probe on NVIDIA H100 80GB HBM3" in p.time_basis


@pytest.mark.parametrize(
    ("hw", "mem", "why"),
    [
        (Hardware(nodes=1, devices_per_node=2, device_memory_gb=8, device="cpu"), MEM, "the workers are CPUs"),
        (dataclasses.replace(h100s(), gpu_type=None), MEM, "no gpu_type: set cluster.gpu_type to one of h100,"),
        (dataclasses.replace(h100s(), gpu_type=None, gpu_name="Tesla T4"), MEM, "no gpu_type: the GPU here, 'Tesla"),
        (h100s(), MemoryProfile.from_total(4.0, 0.1, source="override"), "no FLOP count of the model's step: planner"),
    ],
)
def test_no_estimate_says_why(hw: Hardware, mem: MemoryProfile, why: str) -> None:
    p = plan(Request(reference=REF, gpu_hour_usd=2.0), hw, mem)
    assert p.step_time_s is p.time_to_train_h is p.gpu_hours is p.cost_usd is None
    assert f"time to train not estimated: {why}" in reasons(p)
    assert re.search(r"\ntime to train +not estimated \(see why\)\n", describe(p))


def test_a_step_beyond_a_float_is_left_out_with_a_reason() -> None:
    p = plan(Request(reference=REF, mfu=5e-324), h100s(), MEM)
    assert p.time_to_train_h is None and "beyond a float" in reasons(p)
    json.dumps(p.to_dict(), allow_nan=False)


def test_the_time_fields_round_trip_through_json() -> None:
    p = plan(Request(reference=REF, gpu_hour_usd=2.5), h100s(), MEM)
    d = json.loads(json.dumps(p.to_dict()))
    assert {"step_time_s", "time_to_train_h", "gpu_hours", "cost_usd", "time_basis"} <= set(d)
    assert Plan.from_dict(d) == p
    rows = describe(p).split("why:")[0]
    assert "step time" in rows and "time to train" in rows and "GPU-hours" in rows and "cost  " in rows


@pytest.mark.parametrize(
    ("name", "memory_gb", "key"),
    [
        ("NVIDIA H100 80GB HBM3", 80, "h100"),
        ("NVIDIA H100 PCIe", 80, "h100-pcie"),
        ("NVIDIA H200", 141, "h200"),
        ("NVIDIA A100-SXM4-80GB", 80, "a100-80gb"),
        ("NVIDIA A100-SXM4-40GB", 40, "a100-40gb"),
        ("NVIDIA A100 PCIe", 40, "a100-40gb"),
        ("NVIDIA L40S", 48, "l40s"),
        ("NVIDIA L4", 24, "l4"),
        ("Tesla V100-SXM2-16GB", 16, None),
    ],
)
def test_a_gpus_own_name_maps_to_its_table_entry(name: str, memory_gb: float, key: str | None) -> None:
    assert gpu_type_of(name, memory_gb) == key


def test_the_table_holds_dense_peaks_with_their_sources() -> None:
    assert {k: g.bf16_tflops for k, g in GPUS.items() if k in ("h100", "h200", "a100-80gb", "l4")} == {
        "h100": 989, "h200": 989, "a100-80gb": 312, "l4": 121,
    }  # fmt: skip
    assert all("datasheet" in g.source and f"{g.bf16_tflops:g}" in g.source for g in GPUS.values())


def test_the_config_checks_gpu_type_price_and_mfu() -> None:
    from launcher.cli import load

    with pytest.raises(ConfigError) as e:
        load(["action=plan", "cluster.gpu_type=h10", "cluster.gpu_hour_usd=0", "planner.mfu=1.5"])
    text = str(e.value)
    assert "cluster.gpu_type: got 'h10', expected one of h100, h100-pcie, h200, a100-80gb" in text
    assert "cluster.gpu_hour_usd: got 0" in text and "planner.mfu: got 1.5, expected a fraction in (0, 1]" in text
    cfg = load(["action=plan", "cluster.gpu_type=a100-40gb", "cluster.gpu_hour_usd=1.8"])
    assert (cfg.cluster.gpu_type, cfg.cluster.gpu_hour_usd, cfg.planner.mfu) == ("a100-40gb", 1.8, 0.4)


def test_the_probes_step_times_fit_a_line() -> None:
    from launcher.memory import _step_fit

    fit = _step_fit({2: 0.1, 8: 0.22}, "NVIDIA H200")  # t(n) = 0.06 + 0.02 n
    assert fit["step_s_fixed"] == pytest.approx(0.06) and fit["step_s_per_sample"] == pytest.approx(0.02)
    assert "NVIDIA H200" in fit["step_detail"]
    assert "step_s_per_sample" not in _step_fit({2: 0.2, 8: 0.2}, "x")  # flat: no fit, and says so


def test_described_gpus_take_their_memory_from_the_gpu_type() -> None:
    from launcher.config import Cluster
    from launcher.memory import detect_hardware

    hw = detect_hardware(Cluster(nodes=2, gpus_per_node=8, gpu_type="l4"))
    assert (hw.world_size, hw.device_memory_gb, hw.gpu_type, hw.device) == (16, 24, "l4", "cuda")
    assert detect_hardware(Cluster(gpus_per_node=8, gpu_memory_gb=80, gpu_type="h200")).device_memory_gb == 80
