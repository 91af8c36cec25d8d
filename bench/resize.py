"""From a node's loss to the first step after it, by phase: an elastic run against a fixed-size one.

The cluster of ``tests/integration/test_elastic.py`` on this machine: a head with 2 CPUs and a second
node on 127.0.0.2 with 1, Ray told to declare a dead node after 3 missed health checks 0.5 s apart.
Both runs train BERT smoke at global batch 32 on 3 workers with a checkpoint every 5 steps, and are
held after step 12 (``LAUNCHER_INJECT_HOLD``) while the second node is SIGKILLed:

- **elastic** (``cluster.min_workers=2 cluster.num_workers=3``, ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=20``):
  goes on on 2 workers;
- **fixed** (``cluster.num_workers=3``, the plain alternative): a replacement node is started as soon
  as the old one is killed, and the run goes on when it is there.

Phases, from the kill: detection (until the GCS marks the node dead, polled 10 times a second),
restart (until the new worker group's train function starts: Ray Train's teardown, scheduling, the
process group), then re-plan, data, restore and first step (the workers' ``restart_*`` metrics).
Writes ``bench/results/resize.json`` and prints the table. Run from the repository root.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"

from tests.conftest import FAST_NODE_DEATH, RayNode, ray_head, wait_for  # noqa: E402

COMMON = ["scale=smoke", "cluster=ray", "cluster.num_workers=3", "cluster.max_failures=3", "train.max_steps=20",
          "train.checkpoint_every=5", "train.log_every=5", "train.eval_every=1000", "train.eval_batches=1",
          "data.num_workers=0", "run.name=resize-bench"]
ELASTIC = ["cluster.min_workers=2", "cluster.resize_interval_s=600"]  # no scale-up during the measurement


def _node_death(stop: threading.Event, found: dict[str, float]) -> None:
    """When the GCS first lists the second node (on 127.0.0.2) as dead (asked through this process's driver)."""
    import ray

    first: list[str] = []  # the second node's id (a replacement gets another)
    while not stop.is_set():
        alive = {n["NodeID"]: n["Alive"] for n in ray.nodes() if n["NodeManagerAddress"] == "127.0.0.2"}
        first = first or [node for node, up in alive.items() if up]
        if first and not alive.get(first[0]) and "dead_at" not in found:
            found["dead_at"] = time.time()
        time.sleep(0.1)


def scenario(name: str, extra: list[str], replace_node: bool, work: Path, env_extra: dict | None = None) -> dict:
    from mlflow.tracking import MlflowClient

    env = {**os.environ, **FAST_NODE_DEATH, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
    with ray_head("--num-cpus=2", "--object-store-memory=200000000", env=env, others=True) as (head, temp, port):
        wait_for(temp / "head.log", "Ray runtime started", head, "ray start --head")
        slug = "".join(c if c.isalnum() else "_" for c in name)
        address, go, work = f"127.0.0.1:{port}", work / f"go-{slug}", work / slug
        nodes = [RayNode(address, temp, env)]
        import ray

        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        stop, found = threading.Event(), {}
        watcher = threading.Thread(target=_node_death, args=(stop, found), daemon=True)
        watcher.start()
        cmd = [sys.executable, "-m", "launcher", *COMMON, *extra, f"cluster.address={address}",
               f"cluster.storage_path={work.parent / 'storage'}"]  # one for both runs: the data cache built once
        work.mkdir(parents=True)  # its console.log is kept in bench/results/resize/
        # the launcher decides the authentication, from a HOME without a token file (a `ray start` leaves one)
        (work / "home").mkdir()
        run_env = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"} | {"LAUNCHER_INJECT_HOLD": f"12:{go}",
                                                                             "HOME": str(work / "home")}
        run_env |= env_extra or {}
        log = (work / "console.log").open("w")
        run = subprocess.Popen(cmd, cwd=work, env=run_env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(work / "console.log", "held after step 12", run, f"{name}: step 12", timeout=300)
            killed_at = time.time()
            nodes.pop().kill()
            if replace_node:
                nodes.append(RayNode(address, temp, env))
            go.touch()  # the hold only served to kill at a known step
            assert run.wait(timeout=600) == 0, (work / "console.log").read_text()[-3000:]
        finally:
            run.kill()
            stop.set()
            for node in nodes:
                node.kill()
            watcher.join(timeout=10)
            ray.shutdown()
            keep = RESULTS / "resize" / f"{slug}.log"
            keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(work / "console.log", keep)
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    (found_run,) = client.search_runs([client.get_experiment_by_name("launcher").experiment_id])
    m = found_run.data.metrics
    detection = found["dead_at"] - killed_at
    phases = {"detection_s": detection, "restart_s": m["restart_started_at"] - found["dead_at"],
              "replan_s": m["restart_replan_s"], "data_s": m["restart_data_s"], "restore_s": m["restart_restore_s"],
              "first_step_s": m["restart_first_step_s"]}  # fmt: skip
    worlds = sorted((x.step, int(x.value)) for x in client.get_metric_history(found_run.info.run_id, "world_size"))
    return {"name": name, "command": " ".join(["python -m launcher", *cmd[3:]]), "env": env_extra or {},
            "worlds": worlds, "total_s": sum(phases.values()), **phases}  # fmt: skip


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="resize-bench-") as tmp:
        # Ray Train's first restart after a loss asks for the old size: its resource view (Ray Data's
        # AutoscalingCoordinator) refreshes every 20 s, and a group that cannot be placed waits
        # RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s by default) before the smaller one is tried. The
        # elastic run sets it to 20 s, as docs/cluster.md advises; the default adds those 40 s (measured
        # 2026-12-06: 65.1 s restart against 24.8), which make bench no longer spends a run on.
        rows = [scenario("elastic, start timeout 20 s", ELASTIC, replace_node=False, work=Path(tmp),
                         env_extra={"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"}),
                scenario("fixed", [], replace_node=True, work=Path(tmp))]  # fmt: skip
    out = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "device": f"CPU, {os.cpu_count()} cores",
           "python": platform.python_version(), "rows": rows}  # fmt: skip
    (RESULTS / "resize.json").write_text(json.dumps(out, indent=2))
    keys = ["detection_s", "restart_s", "replan_s", "data_s", "restore_s", "first_step_s", "total_s"]
    print("| run | worlds (step, size) | " + " | ".join(k.removesuffix("_s") + " (s)" for k in keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for r in rows:
        print(f"| {r['name']} | {r['worlds']} | " + " | ".join(f"{r[k]:.1f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
