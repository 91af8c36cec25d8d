"""bench/tables.py: BENCHMARKS.md's generated tables match bench/results/*.json, and follow them."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import ROOT

TABLES_PY = ROOT / "bench" / "tables.py"


def tables() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_tables", TABLES_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(TABLES_PY), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)  # fmt: skip


def copy(tmp_path: Path) -> tuple[Path, Path]:
    """BENCHMARKS.md and bench/results/*.json copied to ``tmp_path``."""
    results = tmp_path / "results"
    results.mkdir()
    for p in (ROOT / "bench" / "results").glob("*.json"):
        shutil.copy(p, results)
    doc = tmp_path / "BENCHMARKS.md"
    shutil.copy(ROOT / "BENCHMARKS.md", doc)
    return doc, results


def test_benchmarks_md_matches_the_committed_results() -> None:
    out = check("--check")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr


def test_every_marker_names_a_table_and_every_results_file_has_its_tables() -> None:
    t = tables()
    doc = (ROOT / "BENCHMARKS.md").read_text()
    marked = [f"{m['file']}:{m['table']}" for m in t.MARKED.finditer(doc)]
    assert len(marked) == len(set(marked)) == doc.count("<!-- /table -->") >= 6
    assert set(marked) <= set(t.TABLES)
    assert t.unmarked(doc, ROOT / "bench" / "results") == []


def test_a_changed_number_changes_its_table_and_nothing_outside_the_markers(tmp_path: Path) -> None:
    doc, results = copy(tmp_path)
    before = doc.read_text()
    smoke = json.loads((results / "cpu_smoke.json").read_text())
    old_ratio = f"**{smoke['throughput_ratio']:.3f}**"
    smoke["throughput_ratio"] = 0.5
    smoke["noise_scale_overhead"]["step_ms_with"] = 99.94
    smoke["step_vs_step"]["ratio"] = 0.4321
    (results / "cpu_smoke.json").write_text(json.dumps(smoke))
    t = tables()
    ratio_row = t.cpu_smoke_throughput(smoke)[-1]
    assert ratio_row.startswith("| launcher / plain |") and "| **0.500** |" in ratio_row
    args = ("--doc", str(doc), "--results", str(results))

    stale = check("--check", *args)
    assert stale.returncode == 1 and f"+{ratio_row}" in stale.stdout
    assert doc.read_text() == before  # --check writes nothing

    assert check(*args).returncode == 0
    after = doc.read_text()
    assert ratio_row in after and old_ratio not in after.split("<!-- table:cpu_smoke:throughput -->")[1][:2000]
    assert "| 99.9 |" in after and "**0.432** (median of the per-step ratios" in after
    assert t.MARKED.sub("", after) == t.MARKED.sub("", before)  # the prose as it was
    assert check("--check", *args).returncode == 0  # idempotent
    assert t.render(after, results) == after


def test_the_step_table_puts_the_whole_runs_ratio_beside_the_step_ratio() -> None:
    d = {"step_vs_step": {"steps": 200, "step_ms_plain": 60.04, "step_ms_launcher": 61.0, "ratio": 0.9876},
         "launcher": {"samples_per_s": 450.0, "repeats": [{}, {}, {}]}, "torchrun_plain_ddp": {"samples_per_s": 500.0},
         "throughput_ratio": 0.9}  # fmt: skip
    head, _, step, runs = tables().cpu_smoke_step(d)
    assert "| step against step: median step time (ms), 200 paired steps | 60.0 | 61.0 | **0.988** " in step
    assert runs == "| whole runs: steady samples/s, median of 3 runs each | 500.0 | 450.0 | **0.900** |"


def test_the_parts_table_gives_each_part_and_the_total_in_minutes() -> None:
    d = {"wall_s": {"whole_runs": 200.4, "resize": 150.0, "total": 570.0}}
    lines = tables().cpu_smoke_parts(d)
    assert lines[2:] == ["| whole runs, both sides | 200 |", "| node-loss recovery (`bench/resize.py`) | 150 |",
                         "| **`make bench` in all** | **570** (9.5 min) |"]  # fmt: skip


def test_the_startup_table_sums_the_launchers_own_phases_without_ray_trains_worker_group() -> None:
    phases = ["config", "data", "plan", "tracking", "ray", "workers", "worker_data", "worker_model", "first_step"]
    ours = {"startup": {f"startup_{k}_s": 1.0 for k in phases}, "time_to_first_step_s": 9.0}
    plain = {"startup": {f"startup_{k}_s": 0.5 for k in ("process", "imports", "process_group", "data", "model",
                                                          "first_step")}, "time_to_first_step_s": 3.0}  # fmt: skip
    lines = tables().cpu_smoke_startup({"launcher": ours, "torchrun_plain_ddp": plain})
    own = "| the launcher's own phases (all but Ray Train's worker group) against torchrun's whole start-up |"
    assert f"{own} 8.00 | 3.00 |" in lines
    assert lines[-1] == "| **command to first optimizer step** | **9.0** | **3.0** |"


def test_the_about_table_shows_what_a_results_file_records() -> None:
    about = tables().about
    lines = about({"date": "2026-12-06", "device": "CPU", "load_average": {"at_start": 1.25, "at_end": 3.0},
                   "versions": {"torch": "2.14.1"}, "command": "python bench/x.py"})  # fmt: skip
    assert lines[2:] == ["| date | 2026-12-06 |", "| device | CPU |",
                         "| load average (1 min) | 1.2 at the start, 3.0 at the end |", "| versions | torch 2.14.1 |",
                         "| command | `python bench/x.py` |"]  # fmt: skip
    assert about({"date": "d", "python": "3.11.7"})[2:] == ["| date | d |", "| versions | python 3.11.7 |"]


def test_a_results_file_without_markers_fails_the_check(tmp_path: Path) -> None:
    doc, results = copy(tmp_path)
    (results / "gpu.json").write_text(json.dumps({"workloads": {}}))
    out = check("--check", "--doc", str(doc), "--results", str(results))
    assert out.returncode == 1 and "no markers for gpu:throughput, gpu:memory" in out.stderr


def test_a_dry_run_is_not_a_measurement(tmp_path: Path) -> None:
    (tmp_path / "gpu.json").write_text(json.dumps({"dry_run": True, "workloads": {}}))
    with pytest.raises(SystemExit, match="--dry-run"):
        tables().render_table("gpu:throughput", tmp_path)


def test_the_full_scale_table_shows_each_run_its_start_up_and_its_evaluation() -> None:
    """``make test-full``'s record (tests/integration/test_full_scale.py) as BENCHMARKS.md shows it: the command,
    date and device, the tier's minutes, and per recipe what was pinned, the time to first step by phase, the
    wall, and the evaluated samples against the val split."""
    run = {"data": "1000 classes", "train": 1000, "val": 1000, "tree_s": 4.3, "wall_s": 250.04,
           "overrides": ["recipe=imagenet", "scale=full", "data.path=<tree>", "train.max_steps=2", "train.log_every=1",
                         "cluster=local", "batch.global_batch=4"],
           "time_to_first_step_s": 61.26, "startup": {"data": 1.0, "plan": 5.04, "tracking": 9.0, "first_step": 3.0},
           "steps": 2, "eval_samples": 1000.0, "eval": {"eval_top1": 0.0}}  # fmt: skip
    record = {"command": "make test-full", "date": "2026-12-06T18:00:59+00:00", "device": "CPU: X, 2 cores",
              "load_average": 1.04, "wall_s": 900.0, "runs": {"imagenet": run}}  # fmt: skip
    lines = tables().full_scale_runs(record)
    assert lines[0].startswith("- **Command / date / device**: `make test-full`, 2026-12-06 18:00 UTC, CPU: X, 2 cores")
    assert "**15.0 min** for the tier" in lines[0]
    (row,) = [line for line in lines if line.startswith("| imagenet |")]
    assert "| `train.max_steps=2` `batch.global_batch=4` |" in row and "data.path" not in row  # only what is pinned
    assert "| **61.3** (data 1.0, plan 5.0, first step 3.0) | **250.0** |" in row  # tracking is not shown
    assert row.endswith("| 1,000 of 1,000 |")
