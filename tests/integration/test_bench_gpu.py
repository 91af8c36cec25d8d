"""``make bench-gpu``'s script (bench/gpu.py) end to end on CPU: ``--dry-run``'s tiny sizes, every measure
in its JSON (the numbers are not benchmarks; their presence, signs and ranges are checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

GPU_PY = ROOT / "bench" / "gpu.py"


@pytest.mark.timeout(300)  # about 35 s on 2 cores shared with other work
def test_dry_run_measures_every_workload(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    run = subprocess.run([sys.executable, str(GPU_PY), "--dry-run", f"--out={out}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=280)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["dry_run"] is True and d["peak_flops"] > 0 and d["versions"]["torch"] == torch.__version__
    assert d["command"].startswith("python bench/gpu.py --dry-run") and d["device"] and d["date"]
    assert set(d["workloads"]) == {"resnet50", "bert_large", "maskrcnn"}
    for name, w in d["workloads"].items():
        assert "error" not in w, (name, w.get("error"))
        for side in ("plain", "launcher"):
            assert w[side]["samples_per_s"] > 0 and w[side]["step_ms"] > 0, (name, side)
            assert w[side]["samples_per_s"] == pytest.approx(1000 * w["micro_batch"] / w[side]["step_ms"])
        assert 0.1 < w["launcher_vs_plain"] < 10, (name, w["launcher_vs_plain"])  # the same step, twice over
        m = w["memory"]
        assert m["predicted_source"] == "estimate"  # on CPU the planner gets the device-free estimate
        assert m["predicted_gb"] > 0 and m["estimate_gb"] > 0 and m["measured_gb"] > 0, (name, m)
        assert m["predicted_gb"] == pytest.approx(m["model_gb"] + w["micro_batch"] * m["per_sample_gb"])
        assert 0.2 < m["predicted_over_measured"] < 5, (name, m)  # same units: GB on both sides
        assert w["flops_per_sample"]["counted"] > 0
        # under 1 but for Mask R-CNN, whose count takes the heads' largest sample (128 positive ROIs an image,
        # the memory trace's: recipes/coco.py), which the tiny images' real steps do not reach; a units slip is 1000x
        assert all(0 < w["mfu_counted"][side] < (5 if name == "maskrcnn" else 1) for side in ("plain", "launcher")), (
            name, w["mfu_counted"])
    bert = d["workloads"]["bert_large"]
    assert bert["what"] == "BERT L2 H128, 32 tokens" and bert["params"] > 0
    assert bert["flops_per_sample"]["6n"] == 6 * bert["params"] * 32
    assert all(0 < bert["mfu_6n"][side] < 1 for side in ("plain", "launcher")), bert["mfu_6n"]
    assert bert["tokens_per_s"]["launcher"] == pytest.approx(32 * bert["launcher"]["samples_per_s"])
    assert d["workloads"]["resnet50"]["mfu_6n"] is None  # 6 x params per token: transformers only
    assert "| BERT L2 H128, 32 tokens | 4 |" in run.stdout  # both markdown tables printed
    assert "| resnet50, 32 px | 4 | " in run.stdout and "(estimate) |" in run.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the script would run for real")
def test_without_a_gpu_it_says_to_use_dry_run() -> None:
    run = subprocess.run([sys.executable, str(GPU_PY)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    (line,) = run.stderr.strip().splitlines()
    assert "needs a CUDA GPU" in line and "--dry-run" in line
