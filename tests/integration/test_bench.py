"""``make bench``'s scripts import and run: a tiny run of each comparison (the numbers are not checked;
``make bench`` is not a test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize(
    ("script", "args", "keys"),
    [
        ("plain_ddp.py", ["--steps=4", "--window=2"], {"time_to_first_step_s", "samples_per_s"}),
        ("noise_overhead.py", ["--steps=3", "--warmup=1"], {"step_ms_without", "step_ms_with", "overhead"}),
        ("step_overhead.py", ["--steps=3", "--warmup=1"], {"step_ms_plain", "step_ms_launcher", "ratio"}),
    ],
)
def test_bench_script_runs_under_torchrun(script: str, args: list[str], keys: set[str], shared_outputs: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", str(ROOT / "bench" / script), *args,
         f"--cache={shared_outputs / 'cache'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    assert keys <= set(result) and all(result[k] > 0 for k in keys - {"overhead"})


def test_batch_finders_tiny_run(tmp_path: Path) -> None:
    """ResNet-18 at 32 px under a 0.25 GB cap: all four ways finish, the cap binds, and the planner's bound
    fits: it ran 2 optimizer steps in a fresh capped process (a capped process that crashed is run again, so
    one spurious crash does not fail it). The true maximum is searched from the largest planner size that
    fit, so a spurious failure cannot put it below a size shown to fit either."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "batch_finders.py"), "--scenario=cnn", "--budget=0.25",
         "--override", "recipe.train_crop=32", f"--out={tmp_path / 'finders.json'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=1100,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (row,) = json.loads((tmp_path / "finders.json").read_text())["rows"]
    exhaustive, planner = row["exhaustive"], row["planner"]
    true_max = exhaustive["max"]
    trials = [(t["n"], t["fits"], t.get("died") or t.get("oom")) for t in exhaustive["sizes"]]
    assert planner["fits"] is True, planner
    assert planner["steps"] == 0
    assert 2 < true_max < 4096, trials  # a finite maximum: the cap stopped the doubling
    assert exhaustive["first_oom"] > true_max >= exhaustive["start"] >= planner["max"]
    assert planner["max_headroom_0"] > planner["max"]  # the default headroom leaves 10% of the budget free
    for method in ("planner", "lightning_power", "lightning_binsearch", "accelerate"):
        assert "error" not in row[method], row[method]
        assert 0 < row[method]["max"] <= true_max, (method, row[method]["max"], true_max, trials)
    assert 0.9 < planner["predicted_over_measured"] < 1.1, planner  # the estimated peak against the capped one
    assert "| cnn | 0.25 GB |" in out.stdout


def test_bench_runner_imports() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import run  # bench/run.py, the make bench entry point

        assert callable(run.main) and callable(run.noise_overhead_run)
    finally:
        sys.path.remove(str(ROOT / "bench"))
