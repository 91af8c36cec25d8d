"""``make bench``: the launcher vs torchrun + a plain DDP loop, same model, data and split, CPU, as whole
runs (alternating, ``REPEATS`` each) and step against step (``bench/step_overhead.py``); the noise
scale's cost (``bench/noise_overhead.py``); then the planner vs Lightning's and Accelerate's batch-size
finders (``bench/batch_finders.py``); then an elastic run's and a fixed-size run's recovery from a lost
node (``bench/resize.py``); then BERT data preparation on a generated corpus (``bench/bert_data.py``).

Writes ``bench/results/cpu_smoke.json`` (with each part's wall time and the total) and the other
parts' own results files (numbers, commands, device, versions, date), and prints the tables and the
total wall time. Run from the repository root.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work"
RESULTS = ROOT / "bench" / "results"
STORE_FILE = WORK / "mlflow.db"  # the launcher's runs share it, as a user's runs in one directory do
STORE = f"sqlite:///{STORE_FILE}"
T = TypeVar("T")
# A whole run is mostly start-up: 40 steps (3 windows of 10 after the first) take about 3 of its 30 s. Its
# throughput moves more from run to run than from window to window, so more steps would buy little.
STEPS, MICRO, ACCUM = 40, 8, 2
REPEATS = 3  # whole runs per side, alternating
PAUSE_S = 1  # between whole runs, so no side inherits another's shutdown
PAIRED_STEPS, PAIRED_WARMUP = 200, 10  # step against step
NOISE_STEPS = 60  # the noise scale's cost: within 1% of a step at 100 and 200 pairs (2026-12-06); 60 save time


def _median_run(runs: list[dict]) -> dict:
    keys = ("time_to_first_step_s", "samples_per_s", "wall_s")
    phases = {k: statistics.median(r["startup"].get(k, 0.0) for r in runs) for k in runs[0]["startup"]}
    return {**runs[0], **{k: statistics.median(r[k] for r in runs) for k in keys}, "startup": phases,
            "repeats": [{k: round(r[k], 2) for k in keys} for r in runs]}


def batch_finders_run() -> dict:
    """Planner quality against Lightning's and Accelerate's batch-size finders (its own JSON and table)."""
    cmd = [sys.executable, str(ROOT / "bench" / "batch_finders.py")]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    print("\n".join(line for line in out.stdout.splitlines() if line.startswith("|")))
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


def launcher_run(*extra: str) -> dict:
    from mlflow.tracking import MlflowClient

    # no run.name, as `make run`: a named run first looks for an earlier one to resume, in the store
    cmd = [sys.executable, "-m", "launcher", "scale=smoke", f"train.max_steps={STEPS}", "train.log_every=10",
           "train.eval_batches=1", f"batch.micro_batch={MICRO}", f"run.output_dir={WORK / 'outputs'}", *extra]
    started = time.perf_counter()
    subprocess.run(cmd, cwd=WORK, check=True, capture_output=True, text=True,
                   env={**os.environ, "MLFLOW_TRACKING_URI": STORE})
    wall = time.perf_counter() - started
    client = MlflowClient(tracking_uri=STORE)
    run = client.search_runs([client.get_experiment_by_name("launcher").experiment_id],
                             order_by=["attributes.start_time DESC"], max_results=1)[0]  # this one
    hist = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "samples_per_s"))
    steady = [v for _, v in hist[1:]] or [v for _, v in hist]
    return {
        "command": " ".join(["python -m launcher", *cmd[3:]]),
        "time_to_first_step_s": run.data.metrics["time_to_first_step_s"],
        "samples_per_s": statistics.median(steady),
        "wall_s": wall,
        "startup": {k: v for k, v in run.data.metrics.items() if k.startswith("startup_")},
        "grad_accum": run.data.params["plan.grad_accum"],
        "micro_batch": run.data.params["plan.micro_batch"],
    }


def torchrun_run() -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", str(ROOT / "bench" / "plain_ddp.py"),
           f"--steps={STEPS}", f"--micro={MICRO}", f"--accum={ACCUM}", f"--cache={WORK / 'outputs' / 'cache'}"]
    started = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True,
                         env={**os.environ, "BENCH_LAUNCHED_AT": str(time.time())})
    wall = time.perf_counter() - started
    result = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    return {"command": "torchrun --nproc-per-node=2 bench/plain_ddp.py " + " ".join(cmd[5:]),
            "time_to_first_step_s": result["time_to_first_step_s"], "samples_per_s": result["samples_per_s"],
            "startup": result["startup"], "wall_s": wall}


def paired_run(script: str, steps: int = PAIRED_STEPS) -> dict:
    """A paired-step script (``bench/ranks.py: time_paired``) under torchrun on 2 ranks: its JSON line."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", str(ROOT / "bench" / script),
           f"--micro={MICRO}", f"--accum={ACCUM}", f"--steps={steps}", f"--warmup={PAIRED_WARMUP}",
           f"--cache={WORK / 'outputs' / 'cache'}"]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    result = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    return {"command": f"torchrun --nproc-per-node=2 bench/{script} " + " ".join(cmd[5:-1]), **result}


def step_vs_step_run() -> dict:
    """The launcher's step (``DDPStep`` as the Trainer calls it) against plain_ddp.py's, same micro-batches."""
    return paired_run("step_overhead.py")


def noise_overhead_run() -> dict:
    """``train.measure_noise_scale``'s cost: the launcher's step with and without it, same batches."""
    return paired_run("noise_overhead.py", NOISE_STEPS)


def warm_up() -> None:
    """What every run reads and the first would otherwise build: the tokenizer/pairs cache, the memory estimate,
    and the MLflow store (MLflow creating its tables, 1.7 s, is paid by a directory's first run only)."""
    from mlflow.tracking import MlflowClient

    from launcher.cli import load
    from recipes import bert

    STORE_FILE.unlink(missing_ok=True)
    MlflowClient(tracking_uri=STORE).search_experiments()  # creates the store's tables
    bert.build_data(load(["scale=smoke"]), WORK / "outputs" / "cache")
    subprocess.run([sys.executable, "-m", "launcher", "scale=smoke", f"batch.micro_batch={MICRO}", "action=plan"],
                   cwd=WORK, check=True, capture_output=True, text=True)  # fmt: skip


def timed(walls: dict[str, float], part: str, fn: Callable[[], T]) -> T:
    """``fn()``, its wall time in seconds kept as ``walls[part]``."""
    started = time.perf_counter()
    try:
        return fn()
    finally:
        walls[part] = time.perf_counter() - started


def script(name: str) -> Callable[[], None]:
    """``bench/<name>`` run as it is (it writes its own results file and prints its table)."""

    def run() -> None:
        subprocess.run([sys.executable, str(ROOT / "bench" / name)], cwd=ROOT, check=True)

    return run


def whole_runs() -> dict[str, list[dict]]:
    sides = {"plain": torchrun_run, "launcher": launcher_run}
    runs: dict[str, list[dict]] = {k: [] for k in sides}
    for _ in range(REPEATS):  # alternate, with a pause, so no side inherits another's shutdown
        for name, fn in sides.items():
            time.sleep(PAUSE_S)
            runs[name].append(fn())
    return runs


def cpu_smoke(walls: dict[str, float]) -> dict:
    """The launcher against the plain DDP loop (whole runs, step against step) and the noise scale's cost:
    ``bench/results/cpu_smoke.json``, its tables printed. Each part's wall time goes to ``walls``."""
    import torch

    load = os.getloadavg()[0]
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    timed(walls, "warm_up", warm_up)
    runs = timed(walls, "whole_runs", whole_runs)
    ours, plain = (_median_run(runs[k]) for k in ("launcher", "plain"))
    step = timed(walls, "step_vs_step", step_vs_step_run)
    noise = timed(walls, "noise_overhead", noise_overhead_run)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    record = {
        "name": "cpu_smoke",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": f"CPU: {cpu}, {os.cpu_count()} cores; 2 workers (gloo)",
        "load_average_at_start": load,  # the machine may be shared
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "ray": __import__("ray").__version__, "mlflow": __import__("mlflow").__version__},
        "method": f"median of {REPEATS} alternating runs each, {PAUSE_S} s apart; steady samples/s = median over "
                  "10-step windows after the first; the launcher's runs share one MLflow store, created before them",
        "workload": f"BERT smoke (2 layers, hidden 128, seq <= 64), {STEPS} steps, micro {MICRO} x accum {ACCUM} x 2",
        "launcher": ours,
        "torchrun_plain_ddp": plain,
        "throughput_ratio": ours["samples_per_s"] / plain["samples_per_s"],
        "step_vs_step": step,
        "noise_scale_overhead": noise,
        "wall_s": dict(walls),  # main() adds the other parts' and the total
    }
    (RESULTS / "cpu_smoke.json").write_text(json.dumps(record, indent=2) + "\n")  # before the long parts
    print(f"\n{record['workload']}\n{record['device']}\n")
    print("| | time to first step (s) | steady samples/s | wall (s) |\n|---|---|---|---|")
    for name, r in (("launcher", ours), ("torchrun + plain DDP", plain)):
        print(f"| {name} | {r['time_to_first_step_s']:.1f} | {r['samples_per_s']:.1f} | {r['wall_s']:.1f} |")
    print(f"\nwhole runs, launcher / plain DDP samples/s: {record['throughput_ratio']:.3f}")
    print(f"step against step, plain / launcher step time: {step['ratio']:.3f} ({step['step_ms_plain']:.1f} vs "
          f"{step['step_ms_launcher']:.1f} ms, median of {step['steps']} paired steps)")
    print("\nstart-up, seconds per phase (median):")
    for name, r in (("launcher", ours), ("torchrun + plain DDP", plain)):
        print(f"  {name}: " + ", ".join(f"{k[8:-2]} {v:.2f}" for k, v in r["startup"].items() if k[:8] == "startup_"))
    print(f"noise-scale measurement: {noise['step_ms_with']:.1f} vs {noise['step_ms_without']:.1f} ms per step, "
          f"overhead {100 * noise['overhead']:.2f}% (median of {noise['steps']} paired steps)")
    return record


def main() -> None:
    started = time.perf_counter()
    walls: dict[str, float] = {}
    record = cpu_smoke(walls)
    finders = timed(walls, "batch_finders", batch_finders_run)
    print(f"batch finders: {finders['rows']} model/budget rows in {finders['out']} ({finders['wall_s']:.0f} s)")
    print("\nfrom a node's loss to the first step after it (bench/resize.py -> bench/results/resize.json):")
    timed(walls, "resize", script("resize.py"))
    print("\nBERT data preparation (bench/bert_data.py -> bench/results/bert_data.json):")
    timed(walls, "bert_data", script("bert_data.py"))
    record["wall_s"] = {**walls, "total": time.perf_counter() - started}
    (RESULTS / "cpu_smoke.json").write_text(json.dumps(record, indent=2) + "\n")
    print("\nwall time per part (s): " + ", ".join(f"{k} {v:.0f}" for k, v in walls.items()))
    print(f"make bench: {record['wall_s']['total'] / 60:.1f} min in all (bench/run.py; the tables follow)")


if __name__ == "__main__":
    main()
