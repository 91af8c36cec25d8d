"""``cluster=ray`` against a real ``ray start --head`` on 127.0.0.1 (its own temp dir, stopped
by its own process id): a run that connects to it, a job submitted through Ray Jobs, both
recorded in MLflow, and the job's status and logs read back by run name.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import free_port, launcher, ray_head, wait_for

TOKEN = secrets.token_hex(32)  # the test cluster's authentication token


@pytest.fixture(scope="module")
def cluster_head() -> Iterator[tuple[str, str, Path]]:
    """(GCS address, job API address, its temp dir) of a token-authenticated head on loopback with 4 CPUs and
    the dashboard."""
    dashboard = free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",  # as docs/cluster.md tells a cluster's admin
        "RAY_AUTH_TOKEN": TOKEN,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # jobs run `python`
        # its workers below the launcher, as a cluster's nodes run them (Ray's default is 15; at 15 this module's
        # runs waited for the other test process's CPU: 158 s against 112 s for its first test)
        "RAY_worker_niceness": "1",
    }
    options = ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
               "--num-cpus=4"]
    with tempfile.TemporaryDirectory() as home, ray_head(*options, env={**env, "HOME": home}) as (head, temp, port):
        api = f"http://127.0.0.1:{dashboard}"  # HOME above: nothing written into the real ~/.ray
        deadline = time.time() + 90
        while True:
            try:
                ask = urllib.request.Request(f"{api}/api/version", headers={"Authorization": f"Bearer {TOKEN}"})
                if urllib.request.urlopen(ask, timeout=2).status == 200:
                    break
            except OSError:
                if time.time() > deadline or head.poll() is not None:
                    pytest.fail(f"ray start --head did not come up in 90 s:\n{(temp / 'head.log').read_text()[-3000:]}")
                time.sleep(0.5)
        # its job API can answer before `ray start` is done (it writes ray_current_cluster, then says this)
        wait_for(temp / "head.log", "Ray runtime started", head, "ray start --head")
        yield f"127.0.0.1:{port}", api, temp


SHORT = ["scale=smoke", "train.max_steps=10", "train.log_every=5", "train.eval_batches=1", "train.checkpoint_every=10"]


AUTH: dict[str, str | None] = {"RAY_AUTH_TOKEN": TOKEN, "RAY_AUTH_MODE": None}  # the launcher decides the mode


def test_plan_reads_the_clusters_hardware(cluster_head: tuple[str, str, Path], tmp_path: Path) -> None:
    out = launcher("scale=smoke", "cluster=ray", f"cluster.address={cluster_head[0]}", "action=plan", cwd=tmp_path,
                   env=AUTH)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "world size 2 = 1 node(s) x 2 cpu device(s)" in out.stdout  # no GPU node: 2 CPU workers
    assert "CPUs per worker 2 = 4 CPUs of a node // 2 worker(s) on it" in out.stdout  # as Ray reports the node
    assert "ray: connected to 127.0.0.1:" in out.stdout and "(authentication: token from $RAY_AUTH_TOKEN)" in out.stdout
    assert TOKEN not in out.stdout + out.stderr

    home = tmp_path / "home"  # Ray's own token file instead of the variable
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(TOKEN)
    out = launcher("scale=smoke", "cluster=ray", f"cluster.address={cluster_head[0]}", "action=plan", cwd=tmp_path,
                   env={"HOME": str(home), "RAY_AUTH_MODE": None})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(authentication: token from ~/.ray/auth_token)" in out.stdout


def test_a_token_cluster_refuses_a_launcher_without_its_token(
    cluster_head: tuple[str, str, Path], tmp_path: Path
) -> None:
    out = launcher("scale=smoke", "cluster=ray", f"cluster.address={cluster_head[0]}", "action=plan", cwd=tmp_path,
                   env={"HOME": str(tmp_path), "RAY_AUTH_MODE": None}, timeout=180)  # no token anywhere
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "cluster.address: cannot connect" in out.stderr and "authentication: none" in out.stderr
    assert "$RAY_AUTH_TOKEN" in out.stderr


def test_a_cluster_run_and_a_submitted_job_are_recorded(cluster_head: tuple[str, str, Path], tmp_path: Path) -> None:
    gcs, api, _ = cluster_head
    storage = tmp_path / "shared"
    store = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    env = {"MLFLOW_TRACKING_URI": store, **AUTH}  # $MLFLOW_TRACKING_URI wins over ./mlflow.db, here and in the job
    run = launcher(*SHORT, "cluster=ray", f"cluster.address={gcs}", f"cluster.storage_path={storage}",
                   "run.name=on-cluster", f"run.output_dir={tmp_path / 'out'}", cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "step 10/10" in run.stdout
    assert any(storage.glob("on-cluster-*/checkpoint_*/state.pt"))  # checkpoints in the shared storage
    # the cluster's policy is left alone (its workers at nice 1), and rank 0 says what it means
    assert f"(the launcher's: {os.nice(0)}): busy processes beside it get the CPUs first" in run.stdout

    common = ["cluster=ray", f"cluster.address={api}"]
    sent = launcher(*SHORT, *common, f"cluster.storage_path={storage}", "action=submit", "run.name=submitted",
                    cwd=tmp_path, env=env)
    assert sent.returncode == 0, sent.stdout[-3000:] + sent.stderr[-3000:]
    job_id = next(w for w in sent.stdout.split() if w.startswith("raysubmit_"))
    assert "action=logs" in sent.stdout and f"run.job_id={job_id}" in sent.stdout

    deadline = time.time() + 300
    while job_status(api, job_id) not in ("SUCCEEDED", "FAILED", "STOPPED") and time.time() < deadline:
        time.sleep(2)  # Ray's job API, cheaply: a launcher per poll took the job's CPU
    status = launcher(*common, "action=status", "run.name=submitted", cwd=tmp_path, env=AUTH)  # by run name
    assert status.returncode == 0, status.stderr[-2000:]
    logs = launcher(*common, "action=logs", f"run.job_id={job_id}", cwd=tmp_path, env=AUTH)
    assert f"job {job_id} (run submitted): SUCCEEDED" in status.stdout, status.stdout + logs.stdout[-3000:]
    assert "step 10/10" in logs.stdout

    client = MlflowClient(tracking_uri=store)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("launcher").experiment_id])}
    assert set(runs) == {"on-cluster", "submitted"} and not (tmp_path / "mlflow.db").exists()
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert {m.step for m in client.get_metric_history(runs["submitted"].info.run_id, "loss")} == {5, 10}


def job_status(api: str, job_id: str) -> str:
    """A submitted job's status from the cluster's job API (the module's head, token-authenticated)."""
    ask = urllib.request.Request(f"{api}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(ask, timeout=10) as answer:
        return str(json.load(answer)["status"])


def test_cluster_local_trains_on_a_warm_ray_it_finds_and_leaves_it_running(
    cluster_head: tuple[str, str, Path], tmp_path: Path
) -> None:
    """``ray start --head`` done once (here: the module's head, token-authenticated): ``cluster=local`` finds
    it where Ray records it (``$RAY_TMPDIR/ray/ray_current_cluster``), says so, trains on it, leaves it up."""
    gcs, api, temp = cluster_head
    where = Path(tempfile.mkdtemp(prefix="warm-", dir="/tmp"))
    (where / "ray").symlink_to(temp)  # the head's temp dir, where `ray start` wrote its address
    assert (temp / "ray_current_cluster").read_text().strip() == gcs
    out = launcher("scale=smoke", "train.max_steps=2", "train.eval_batches=1", f"run.output_dir={tmp_path / 'out'}",
                   cwd=tmp_path, env={**AUTH, "RAY_TMPDIR": str(where)})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    said = f"ray: connected to {gcs} (a warm Ray: {where}/ray/ray_current_cluster; authentication: token from "
    assert said in out.stdout and "step 2/2" in out.stdout
    assert "cpus: " in out.stdout and "get the CPUs first" not in out.stdout  # the launcher's priority
    assert TOKEN not in out.stdout + out.stderr
    assert not (tmp_path / "out" / "logs").exists()  # its logs stay in its own session folder
    ask = urllib.request.Request(f"{api}/api/version", headers={"Authorization": f"Bearer {TOKEN}"})
    assert urllib.request.urlopen(ask, timeout=10).status == 200  # the warm Ray is still up after the run


def test_an_unreachable_cluster_fails_in_seconds(tmp_path: Path) -> None:
    started = time.perf_counter()
    out = launcher("scale=smoke", "cluster=ray", f"cluster.address=127.0.0.1:{free_port()}",
                   f"cluster.storage_path={tmp_path}", cwd=tmp_path)
    assert out.returncode == 2 and time.perf_counter() - started < 30
    assert "cluster.address: nothing answers at 127.0.0.1:" in out.stderr
