"""Live elastic training on a real two-node Ray cluster on this machine (issue #18).

The head (``ray start --head --num-cpus=2`` on 127.0.0.1) and a second node (``ray start
--address=... --num-cpus=1`` on 127.0.0.2: a host address of its own, its own process group)
run ``cluster=ray cluster.min_workers=2 cluster.num_workers=3`` with the sample ledger on.
Fault injection holds the run at known steps (``LAUNCHER_INJECT_HOLD``) while the test:

1. kills the second node during step 12: the run goes on from the checkpoint of step 10 on
   the 2 workers left, re-planned (micro 11 -> 16), global batch 32 kept;
2. starts a node again during step 17: the run scales back to 3 workers from step 15;
3. checks the ledger (every sample of the 20 steps trained exactly once), the ``world_size``
   metric and one ``plans/step_N.json`` per resize naming the steps trained again.

Ray is told to notice a dead node within seconds, to look for room every 2 s, and to give up on
a worker group that cannot start after 30 s (not 60).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import FAST_NODE_DEATH, RayNode, ledger_steps, ray_head, wait_for


@pytest.fixture
def cluster() -> Iterator[tuple[str, Path, dict[str, str], list[RayNode]]]:
    """(head address, its temp dir, the nodes' environment, the second nodes started: killed at the end)."""
    env = {**os.environ, **FAST_NODE_DEATH, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
    with ray_head("--num-cpus=2", "--object-store-memory=200000000", env=env, others=True) as (head, temp, port):
        wait_for(temp / "head.log", "Ray runtime started", head, "ray start --head")
        nodes: list[RayNode] = []
        try:
            yield f"127.0.0.1:{port}", temp, env, nodes
        finally:
            for node in nodes:
                node.kill()


def _lines(proc: subprocess.Popen) -> queue.Queue[str]:
    out: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            out.put(line)
        out.put("")

    threading.Thread(target=pump, daemon=True).start()
    return out


def test_an_elastic_run_shrinks_when_a_node_dies_and_grows_when_one_joins_keeping_every_sample_once(
    cluster: tuple, tmp_path: Path  # type: ignore[type-arg]
) -> None:
    address, temp, env, nodes = cluster
    nodes.append(RayNode(address, temp, env))
    ledger, go1, go2 = tmp_path / "ledger", tmp_path / "go1", tmp_path / "go2"
    home = tmp_path / "home"
    home.mkdir()
    run = subprocess.Popen(
        [sys.executable, "-m", "launcher", "scale=smoke", "cluster=ray", f"cluster.address={address}",
         f"cluster.storage_path={tmp_path / 'storage'}", "cluster.min_workers=2", "cluster.num_workers=3",
         "cluster.max_failures=3", "cluster.resize_interval_s=2", "train.max_steps=20", "train.checkpoint_every=5",
         "train.log_every=5", "train.eval_every=1000", "train.eval_batches=1", "data.num_workers=0",
         "run.name=elastic"],
        cwd=tmp_path, env={**{k: v for k, v in env.items() if k != "RAY_AUTH_MODE"},  # the launcher decides,
                           "HOME": str(home),  # from a HOME without a token file (a `ray start` leaves one)
                           "LAUNCHER_SAMPLE_LEDGER": str(ledger),
                           "LAUNCHER_INJECT_HOLD": f"12:{go1},17:{go2}", "PYTHONUNBUFFERED": "1",
                           # after the node's loss Ray Train first asks for 3 workers again and waits this
                           # long for them (60 s by default) before it starts the 2 it has
                           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines, seen = _lines(run), []

    def until(text: str, timeout: float = 180) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            seen.append(line)
            if text in line:
                return line
            if line == "":
                break
        run.kill()
        pytest.fail(f"no {text!r} in the run's output:\n{''.join(seen)[-6000:]}")

    try:
        assert "Micro-batch x accumulation by world size: 2: 16 x 1, 3: 11 x 1" in until("elastic: 2 to 3 workers")
        until("held after step 12")
        nodes.pop().kill()  # the second node dies during step 12 (its worker with it)
        shrunk = until("world 3 -> 2 at step 10")
        assert "micro 11x1 -> 16x1, global 32 kept; steps 11-12 are trained again" in shrunk
        go1.touch()
        until("held after step 17")
        nodes.append(RayNode(address, temp, env))  # a node joins during step 17
        grown = until("world 2 -> 3 at step 15")
        assert "micro 16x1 -> 11x1, global 32 kept; steps 16-17 are trained again" in grown
        go2.touch()
        until("finished")
        assert run.wait(timeout=60) == 0, "".join(seen)[-6000:]
    finally:
        run.kill()

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("launcher").experiment_id])
    run_id = found.info.run_id
    worlds = [(m.step, int(m.value)) for m in client.get_metric_history(run_id, "world_size")]
    assert sorted(worlds) == [(0, 3), (10, 2), (15, 3)]
    records = {}
    for step in (10, 15):
        path = client.download_artifacts(run_id, f"plans/step_{step}.json", str(tmp_path / "artifacts"))
        records[step] = json.loads(Path(path).read_text())
    assert records[10]["world_size"] == {"from": 3, "to": 2} and records[10]["steps_trained_again"] == [11, 12]
    assert records[15]["world_size"] == {"from": 2, "to": 3} and records[15]["steps_trained_again"] == [16, 17]
    assert all(r["global_batch"] == 32 and r["timings"]["first_step_s"] > 0 for r in records.values())
    logged = {m.step for m in client.get_metric_history(run_id, "loss")}
    assert {10, 15, 20} <= logged  # the steps trained again are logged again, at their own step numbers

    from launcher.cli import load
    from launcher.data import StepBatches
    from recipes import bert

    per_step = ledger_steps(ledger, 3)
    assert sorted(per_step) == list(range(1, 21))
    samples = len(bert.build_data(load(["scale=smoke"]), tmp_path / "storage" / "cache").train)
    stream = StepBatches(samples, micro=32, accum=1, world=1, rank=0, seed=0)  # the global stream
    for s in range(1, 21):  # each step trained exactly its 32 stream positions, once, whatever the world
        assert sorted(per_step[s]) == sorted(stream.indices(s - 1)[0]), s
