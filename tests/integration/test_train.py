"""End to end: ``python -m launcher scale=smoke`` trains BERT on 2 Ray workers and records it.

Real Hydra, real Ray (2 CPU workers, gloo), real MLflow (a SQLite store, and a real
``mlflow server`` on 127.0.0.1).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from launcher.optim import lr_factor
from launcher.planner import Plan
from tests.conftest import launcher

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


def test_smoke_run_is_recorded_with_plan_applied(tmp_path: Path, shared_outputs: Path) -> None:
    out = launcher(
        *SHORT, "batch.micro_batch=4", f"run.output_dir={shared_outputs}", "run.name=smoke-test", cwd=tmp_path
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "micro-batch / device  4" in out.stdout  # the plan is printed before training
    client, run_id = only_run(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "smoke-test"

    local = Path(client.download_artifacts(run_id, "", str(tmp_path / "artifacts")))
    plan = Plan.from_dict(json.loads((local / "plan.json").read_text()))
    assert (local / "config.yaml").exists()
    assert (plan.world_size, plan.micro_batch, plan.grad_accum, plan.global_batch) == (2, 4, 4, 32)
    assert run.data.params["plan.grad_accum"] == "4" and run.data.params["batch.micro_batch"] == "4"

    def history(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run_id, key)}

    loss, lr = history("loss"), history("lr")
    assert sorted(loss) == [5, 10, 15, 20, 25, 30]
    assert set(history("mlm")) == set(history("nsp")) == set(loss)
    assert loss[30] < loss[5]  # it learns
    for step, value in lr.items():  # the logged lr is the plan's schedule, step for step
        assert value == pytest.approx(plan.lr * lr_factor(step - 1, plan), rel=1e-6)
    assert all(v == plan.grad_accum for v in history("grad_accum").values())
    assert set(history("eval_mlm_acc")) == {15, 30} and 0 <= history("eval_nsp_acc")[30] <= 1
    assert history("samples_per_s")[30] > 0
    assert any(shared_outputs.glob("ray/*/checkpoint_*/state.pt"))


def test_tracking_uri_from_the_environment_wins(tmp_path: Path, shared_outputs: Path) -> None:
    store = tmp_path / "elsewhere.db"
    out = launcher(
        "scale=smoke",
        "train.max_steps=2",
        "train.log_every=1",
        "train.eval_batches=1",
        f"run.output_dir={shared_outputs}",
        cwd=tmp_path,
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{store}"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert store.exists() and not (tmp_path / "mlflow.db").exists()
    client, run_id = only_run(f"sqlite:///{store}")
    assert client.get_run(run_id).info.status == "FINISHED"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path: Path):
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--workers",
            "1",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not start in 90 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_run_against_a_real_mlflow_server(tmp_path: Path, shared_outputs: Path, mlflow_server: str) -> None:
    out = launcher(
        "scale=smoke",
        "tracking=server",
        f"tracking.uri={mlflow_server}",
        "train.max_steps=4",
        "train.log_every=2",
        "train.eval_batches=1",
        f"run.output_dir={shared_outputs}",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    client, run_id = only_run(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert {m.step for m in client.get_metric_history(run_id, "loss")} == {2, 4}
    assert "plan.json" in [a.path for a in client.list_artifacts(run_id)]
