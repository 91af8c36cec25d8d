"""End to end: ``python -m launcher scale=smoke`` trains BERT on 2 Ray workers and records it.

Real Hydra, real Ray (2 CPU workers, gloo), real MLflow (a SQLite store, and a real
``mlflow server`` on 127.0.0.1).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from launcher.optim import lr_factor
from launcher.planner import Plan
from tests.conftest import launcher, ray_head

SHORT = [
    "scale=smoke",
    "train.max_steps=30",
    "train.log_every=5",
    "train.eval_every=15",
    "train.checkpoint_every=15",
    "recipe.reference.warmup_steps=60",
]


def only_run(uri: str) -> tuple[MlflowClient, str]:
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("launcher").experiment_id])
    assert len(runs) == 1
    return client, runs[0].info.run_id


def history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory, shared_outputs: Path) -> tuple[Path, str]:
    """The 30-step smoke run at micro-batch 4 x accumulation 4 x 2 workers, measuring the noise scale
    (its dir and console output). Run with a bare HOME and $RAY_AUTH_MODE unset:
    the embedded Ray's authentication is the launcher's decision, not the caller's environment."""
    cwd = tmp_path_factory.mktemp("smoke")
    (cwd / "home").mkdir()
    with other_ray():  # another Ray on the machine while it runs, as a second user's run would be
        out = launcher(
            *SHORT,
            "batch.micro_batch=4",
            "train.measure_noise_scale=true",
            f"run.output_dir={shared_outputs}",
            "run.name=smoke-test",
            cwd=cwd,
            env={"HOME": str(cwd / "home"), "RAY_AUTH_MODE": None},
        )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return cwd, out.stdout + out.stderr  # the console, as a user sees it


@contextlib.contextmanager
def other_ray() -> Iterator[None]:
    """A second single-node Ray on the machine, up while the block runs, with its dashboard on Ray's
    default port 8265 (as a user's own ``ray start --head`` has it). The embedded Ray's placement-group
    cleaner once asked that dashboard about this run's controller, was told it did not exist, and
    removed the run's placement group: the workers died mid-run."""
    with ray_head(
        "--include-dashboard=true", "--dashboard-port=8265", "--num-cpus=1",
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    ) as (head, _, _):  # fmt: skip
        deadline = time.monotonic() + 90
        while not _answers("http://127.0.0.1:8265/api/v0/actors"):
            assert head.poll() is None and time.monotonic() < deadline, "the other Ray's dashboard did not start"
            time.sleep(0.5)
        yield


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return bool(r.status == 200)
    except OSError:
        return False


PROBE = """
import json, sys
from launcher.cluster import start_local
start_local(1)
import ray
from ray.util.state import get_actor
from ray.util.state.exception import RayStateApiException

@ray.remote(num_cpus=0)
class Alive:
    def ping(self):
        return True

@ray.remote(num_cpus=0)
def ask(actor_id):  # what Ray Train's PlacementGroupCleaner asks, from inside the cluster
    try:
        return "found" if get_actor(actor_id, timeout=10) is not None else "no such actor"
    except RayStateApiException:
        return "no answer"

actor = Alive.remote()
ray.get(actor.ping.remote())
print(json.dumps(ray.get(ask.remote(actor._actor_id.hex()))))
"""


def test_the_embedded_rays_state_api_is_its_own(tmp_path: Path) -> None:
    """With another Ray's dashboard on 8265, a live actor of the embedded Ray is never reported
    missing: Ray Train's placement-group cleaner would take that for a dead controller and remove
    the run's placement group (a CI run lost its workers so). "no answer" is the embedded Ray's own
    minimal dashboard, which serves no state API; the cleaner keeps waiting then."""
    with other_ray():
        out = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) in ("found", "no answer")


def test_noise_scale_is_logged_and_advises_the_next_plan(smoke: tuple[Path, str]) -> None:
    cwd, stdout = smoke
    client, run_id = only_run(f"sqlite:///{cwd / 'mlflow.db'}")
    noise = history(client, run_id, "noise_scale")
    trace, grad_sq = history(client, run_id, "noise_trace"), history(client, run_id, "noise_grad_sq")
    assert sorted(noise) == [5, 10, 15, 20, 25, 30] and "| noise scale " in stdout
    assert all(math.isfinite(v) and v > 0 for v in noise.values()) and all(v > 0 for v in trace.values())
    assert noise[30] == pytest.approx(trace[30] / grad_sq[30], rel=1e-6)

    out = launcher("scale=smoke", "action=plan", cwd=cwd)  # the same store: the measurement is found
    assert out.returncode == 0, out.stderr[-2000:]
    assert "advice: global batch 32 is" in out.stdout and "run smoke-test" in out.stdout
    out = launcher("scale=smoke", "action=plan", "batch.global_batch=auto_noise_scale", "plan.format=json", cwd=cwd)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["target_global_batch"] == max(1, round(noise[30]))
    assert len(client.search_runs([client.get_experiment_by_name("launcher").experiment_id])) == 1  # plan logs nothing


def test_smoke_run_is_recorded_with_plan_applied(smoke: tuple[Path, str], tmp_path: Path, shared_outputs: Path) -> None:
    cwd, stdout = smoke
    assert not (cwd / "home" / ".ray").exists()  # no ~/.ray/auth_token: the embedded Ray runs without a token
    assert "micro-batch / device  4" in stdout  # the plan is printed before training
    logs = [f for f in shared_outputs.glob("logs/smoke-test-*/**/*") if f.is_file()]  # Ray's lines go there
    assert logs and not any(b"multiple active Ray instances" in f.read_bytes() for f in logs)  # its Ray's
    # every Ray worker process hosted one of the run's actors: none was prestarted outside the job
    # (job id ffffffff), idle, importing Ray while the MLflow run opened (cluster.start_local)
    assert not [f.name for f in logs if f.name.startswith("worker-") and "-ffffffff-" in f.name]
    assert "multiple active Ray instances" not in stdout  # own processes find their cluster
    assert stdout.count("eval at step 15 on ") == 1  # rank 0's console lines, once each
    # off a terminal: the metrics hook's plain line at every train.log_every, shown by the driver; no
    # line of Ray's own or its workers' (run.verbose=false), so none with Ray's "(RayTrainWorker pid=...)"
    assert re.findall(r"^step (\d+)/30 \| loss ", stdout, flags=re.MULTILINE) == ["5", "10", "15", "20", "25", "30"]
    assert not re.search(r"\(\w+ pid=\d+\)", stdout), stdout[-3000:]
    client, run_id = only_run(f"sqlite:///{cwd / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "smoke-test"

    local = Path(client.download_artifacts(run_id, "", str(tmp_path / "artifacts")))
    plan = Plan.from_dict(json.loads((local / "plan.json").read_text()))
    assert (local / "config.yaml").exists()
    assert (plan.world_size, plan.micro_batch, plan.grad_accum, plan.global_batch) == (2, 4, 4, 32)
    assert run.data.params["plan.grad_accum"] == "4" and run.data.params["batch.micro_batch"] == "4"

    loss, lr = history(client, run_id, "loss"), history(client, run_id, "lr")
    assert sorted(loss) == [5, 10, 15, 20, 25, 30]
    assert set(history(client, run_id, "mlm")) == set(history(client, run_id, "nsp")) == set(loss)
    assert loss[30] < loss[5]  # it learns
    for step, value in lr.items():  # the logged lr is the plan's schedule, step for step
        assert value == pytest.approx(plan.lr * lr_factor(step - 1, plan), rel=1e-6)
    assert all(v == plan.grad_accum for v in history(client, run_id, "grad_accum").values())
    evals = history(client, run_id, "eval_mlm_acc")
    assert set(evals) == {15, 30} and 0 <= history(client, run_id, "eval_nsp_acc")[30] <= 1
    assert history(client, run_id, "samples_per_s")[30] > 0
    assert any(shared_outputs.glob("ray/*/checkpoint_*/state.pt"))

    # the start-up breakdown: every phase from the command to the first step, in order, adding up
    phases = {k: v for k, v in run.data.metrics.items() if k.startswith("startup_")}
    assert set(phases) == {f"startup_{p}_s" for p in (
        "config", "data", "plan", "tracking", "ray", "workers", "worker_data", "worker_model", "first_step")}
    assert all(v >= 0 for v in phases.values()) and phases["startup_workers_s"] > 0
    assert sum(phases.values()) == pytest.approx(run.data.metrics["time_to_first_step_s"], abs=1e-3)
    assert "first optimizer step " in stdout and "workers " in stdout

    # rank 0's node, sampled by MLflow's system-metrics monitor (tracking.system_metrics_s) while it trained:
    # steps 0, 1, ... each within the run, the last one logged when training ended
    cpu = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    memory = history(client, run_id, "system/system_memory_usage_megabytes")
    assert cpu and sorted(m.step for m in cpu) == list(range(len(cpu))) and set(memory) == {m.step for m in cpu}
    assert all(0 <= m.value <= 100 for m in cpu) and any(m.value > 0 for m in cpu)
    assert all(0 < mb < psutil.virtual_memory().total / 1e6 for mb in memory.values())
    assert all(run.info.start_time <= m.timestamp <= run.info.end_time for m in cpu)


def test_out_of_memory_backs_off_and_keeps_the_global_batch(
    smoke: tuple[Path, str], tmp_path: Path, shared_outputs: Path
) -> None:
    """Planned micro-batch 16 x 1 does not fit an injected activation budget of ~3 samples.

    The run must cut each worker's share of 16 into more micro-batches until they fit (the
    fewest whose largest is below the size that failed, not halving: 16 -> 8x2 -> 6x1+5x2 ...),
    on both workers alike, and then train exactly as the smoke run planned at 4 x 4: same
    global batch, same samples, same losses.
    """
    planned = launcher("scale=smoke", "action=plan", "plan.format=json", cwd=tmp_path)
    assert planned.returncode == 0, planned.stderr
    per_sample = json.loads(planned.stdout)["memory"]["per_sample_gb"] * 1024**3
    out = launcher(
        *SHORT,
        "batch.micro_batch=16",
        f"run.output_dir={shared_outputs}",
        cwd=tmp_path,
        env={"LAUNCHER_INJECT_MEMORY_LIMIT": str(int(3 * per_sample))},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "out of memory at micro-batch 16 (step 1)" in out.stdout
    client, run_id = only_run(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FINISHED"
    plan = json.loads(Path(client.download_artifacts(run_id, "plan.json", str(tmp_path))).read_text())
    assert (plan["micro_batch"], plan["grad_accum"], plan["global_batch"]) == (16, 1, 32)
    events = Path(client.download_artifacts(run_id, "oom", str(tmp_path / "oom")))
    backoffs = sorted((json.loads(e.read_text()) for e in events.iterdir()), key=lambda e: e["step"])
    assert backoffs[0]["step"] == 1 and backoffs[0]["micro_batch"] < backoffs[0]["size"] <= 16
    micro, accum = history(client, run_id, "micro_batch"), history(client, run_id, "grad_accum")
    assert all(micro[s] == -(-16 // accum[s]) for s in micro)  # 16 per worker per step in near-equal cuts
    assert list(micro.values()) == sorted(micro.values(), reverse=True)  # it only ever backs off
    assert (micro[30], accum[30]) == (backoffs[-1]["micro_batch"], backoffs[-1]["grad_accum"])

    base_client, base_id = only_run(f"sqlite:///{smoke[0] / 'mlflow.db'}")
    base, backed_off = history(base_client, base_id, "loss"), history(client, run_id, "loss")
    assert sorted(backed_off) == sorted(base)
    for step in base:  # the same math on the same samples: only float summation order differs
        assert backed_off[step] == pytest.approx(base[step], rel=1e-4), step


def test_deepspeed_zero2_on_two_cpu_workers_matches_ddp(
    smoke: tuple[Path, str], tmp_path: Path, shared_outputs: Path
) -> None:
    """The same 30 steps (4 x 4 x 2 workers) through DeepSpeed ZeRO-2 on gloo: the losses follow DDP's."""
    out = launcher(
        *SHORT, "batch.micro_batch=4", "engine=deepspeed", "engine.zero_stage=2", f"run.output_dir={shared_outputs}",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client, run_id = only_run(f"sqlite:///{tmp_path / 'mlflow.db'}")
    plan = json.loads(Path(client.download_artifacts(run_id, "plan.json", str(tmp_path))).read_text())
    assert (plan["engine"], plan["zero_stage"], plan["deepspeed"]["zero_optimization"]["stage"]) == ("deepspeed", 2, 2)
    assert plan["deepspeed"]["gradient_accumulation_steps"] == 4 and plan["deepspeed"]["train_batch_size"] == 32
    base_client, base_id = only_run(f"sqlite:///{smoke[0] / 'mlflow.db'}")
    ddp, ds = history(base_client, base_id, "loss"), history(client, run_id, "loss")
    assert sorted(ds) == sorted(ddp)
    for step in (5, 10, 15):  # the first steps: same samples, same normalization, same clipping and AdamW
        assert ds[step] == pytest.approx(ddp[step], rel=2e-3), (step, ds[step], ddp[step])
    saved = next(shared_outputs.glob(f"ray/*-{run_id[:8]}"))
    files = {p.name for p in next(saved.glob("checkpoint_*")).iterdir()}
    assert files >= {"state.pt", "zero_rank0.pt", "zero_rank1.pt"}  # each rank's ZeRO partition
