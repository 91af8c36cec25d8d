"""Faults and hostile input, each tried for real: a torn checkpoint, Ctrl-C, a tracking server
that is down at launch or goes away mid-run, credentials in the tracking URI, a config that
smuggles in ``_target_``. See docs/reliability.md for the table these tests back.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from mlflow.tracking import MlflowClient

from launcher import checkpoint
from tests.conftest import free_port, launcher, start_mlflow_server

SECRET = "s3cret-t0ken"


def runs(uri: str) -> list:  # type: ignore[type-arg]
    client = MlflowClient(tracking_uri=uri)
    return client.search_runs([client.get_experiment_by_name("launcher").experiment_id])


def steps(uri: str, run_id: str, key: str = "loss") -> list[int]:
    return sorted(m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key))


def listeners(root: int) -> list[tuple[str, int, str]]:
    """(address, port, process name) of each TCP socket listening in ``root``'s process tree."""
    tree = {root} | {c.pid for c in psutil.Process(root).children(recursive=True)}
    found = []
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid in tree:
            found.append((c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name()))
    return found


def ray_processes() -> set[int]:
    """Pids of Ray's own processes (GCS, raylet, workers) on this machine."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    markers = ("gcs_server", "raylet", "ray::", "default_worker.py", "dashboard/agent", "runtime_env/agent")
    return {int(line.split()[0]) for line in out.splitlines() if any(m in line for m in markers)}


def test_resume_by_name_skips_a_torn_checkpoint_and_replans_for_one_worker(
    tmp_path: Path, shared_outputs: Path
) -> None:
    """The run keeps its checkpoints at 10 and 20 (Ray keeps two). 20 gets one byte flipped on the
    storage (the same size: only its manifest's SHA-256 tells), and a newer copy of it is torn (half
    of state.pt). The resume skips both, with a warning each, and restores 10."""
    common = ["scale=smoke", "train.log_every=5", "train.checkpoint_every=10", "train.eval_batches=1",
              "batch.micro_batch=4", "run.name=torn", f"run.output_dir={shared_outputs}"]
    first = launcher(*common, "train.max_steps=20", cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (run,) = runs(uri)
    saved = checkpoint.candidates(str(next(shared_outputs.glob("ray/torn-*"))))  # each with its manifest
    assert [checkpoint.meta(d)["step"] for d in saved] == [20, 10]  # type: ignore[index]
    assert all((Path(d) / checkpoint.manifest_file(0)).exists() for d in saved)
    torn = Path(saved[0]).with_name("checkpoint_9999-12-31_23-59-59.999999")  # the newest by name
    shutil.copytree(saved[0], torn)
    state = torn / checkpoint.FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # torn mid-write
    flipped = Path(saved[0]) / checkpoint.FILE
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))  # a same-size corruption on the storage side

    second = launcher(*common, "train.max_steps=30", "cluster.num_workers=1", cwd=tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    console = second.stdout
    assert f"/{torn.name} is incomplete or damaged (state.pt has " in console  # the recorded size
    assert f"/{Path(saved[0]).name} is incomplete or damaged (state.pt has SHA-256 " in console  # the hash
    assert "resumed from " in console and "at step 10" in console
    assert f"continuing run torn ({run.info.run_id})" in console
    assert "world size 2 -> 1, so micro-batch x accumulation 4 x 4 -> 4 x 8" in console
    assert "global batch 32 kept" in console

    (again,) = runs(uri)  # the same MLflow run, finished, steps continuing past the first run's
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert steps(uri, run.info.run_id)[-3:] == [20, 25, 30] and steps(uri, run.info.run_id)[0] == 5
    client = MlflowClient(tracking_uri=uri)
    replanned = json.loads(Path(client.download_artifacts(run.info.run_id, "resume/plan_at_step_10.json",
                                                          str(tmp_path))).read_text())
    first_plan = json.loads(Path(client.download_artifacts(run.info.run_id, "plan.json", str(tmp_path))).read_text())
    assert (replanned["global_batch"], replanned["lr"]) == (first_plan["global_batch"], first_plan["lr"])
    assert (replanned["world_size"], replanned["grad_accum"]) == (1, 8)

    done = launcher(*common, "train.max_steps=30", cwd=tmp_path)  # nothing left to do: says so, starts nothing
    assert done.returncode == 0 and "already reached step 30 of 30" in done.stdout


def test_killed_worker_and_killed_checkpoint_writer_recover_with_every_sample_once(
    tmp_path: Path, shared_outputs: Path
) -> None:
    """One epoch on 2 workers (cluster.max_failures=2) survives two deaths, and trains each sample once.

    1. A worker process is SIGKILLed from outside mid-run, after the checkpoint at step 10:
       Ray Train restarts the worker group from the latest checkpoint.
    2. Rank 0 is SIGKILLed halfway through writing the checkpoint of step 30
       (``LAUNCHER_INJECT_CHECKPOINT_KILL``): the restart resumes from step 20, the last complete one.
    The sample ledger (``LAUNCHER_SAMPLE_LEDGER``: the ids that came through the DataLoader, rolled
    back with the model on each restore) must then hold every sample of the epoch exactly once.
    """
    from launcher.cli import load
    from recipes import bert

    shrink = ["scale=smoke", "recipe.corpus_max_mb=0.4"]  # ~45 steps per epoch at global batch 32
    samples = len(bert.build_data(load(shrink), shared_outputs / "cache").train)
    ledger = tmp_path / "ledger"
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", *shrink, "train.max_epochs=1", "train.log_every=5",
         "train.checkpoint_every=10", "train.eval_every=1000", "train.eval_batches=1", "batch.micro_batch=8",
         "cluster.max_failures=2", "run.name=faults", f"run.output_dir={shared_outputs}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
             "LAUNCHER_SAMPLE_LEDGER": str(ledger),
             "LAUNCHER_INJECT_CHECKPOINT_KILL": f"30:{tmp_path / 'writer-killed'}"},
    )
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if "step 15/" in line:  # after the checkpoint at step 10
            workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
                       if c.name() == "ray::RayTrainWorker"]
            assert len(workers) == 2, workers
            max(workers, key=lambda c: c.pid).send_signal(signal.SIGKILL)
            break
    rest, _ = proc.communicate(timeout=400)
    console = "".join(lines) + rest
    assert proc.returncode == 0, console[-4000:]
    assert (tmp_path / "writer-killed").exists()  # the injected kill did happen
    resumed = [int(m) for m in re.findall(r"resumed from checkpoint_\S+ at step (\d+)", console)]
    events = [ln for ln in console.splitlines() if re.search(r"resumed|checkpoint|rror|step \d+/", ln)]
    assert len(resumed) == 2 and resumed[0] >= 10 and resumed[1] == 20, events[-60:]  # 30 was torn: 20 it is

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    plan = json.loads(Path(client.download_artifacts(run.info.run_id, "plan.json", str(tmp_path))).read_text())
    expected = math.ceil(samples / plan["global_batch"])  # train.max_epochs=1 sets the steps from the data
    assert plan["max_steps"] == expected and run.info.status == "FINISHED"
    assert f"max_steps {expected} = ceil(1 epochs x {samples} samples / {plan['global_batch']})" in plan["reasons"]

    trained: list[int] = []
    for rank in (0, 1):
        entries = [json.loads(line) for line in (ledger / f"rank{rank}.jsonl").read_text().splitlines()]
        assert [e["step"] for e in entries] == list(range(1, expected + 1))  # each step once, rolled back steps gone
        trained += [i for e in entries for i in e["ids"]]
    first_epoch = sorted(i for i in trained if i < samples)
    assert first_epoch == list(range(samples))  # every sample of the epoch, exactly once
    assert len(trained) == len(set(trained)) == expected * plan["global_batch"]


def test_a_checkpoint_of_another_recipe_is_refused(tmp_path: Path) -> None:
    calls: list[dict] = []  # type: ignore[type-arg]

    class Probe:  # a Stateful part that records what it is given, or refuses it as a wrong shape would
        def __init__(self, refuse: bool = False) -> None:
            self.refuse = refuse

        def state_dict(self) -> dict:  # type: ignore[type-arg]
            return {}

        def load_state_dict(self, state: dict, /) -> None:  # type: ignore[type-arg]
            if self.refuse:
                raise RuntimeError("Error(s) in loading state_dict: size mismatch for weight")
            calls.append(state)

    def restore(dirs: list[str], recipe: str, part: Probe, warn: Any) -> Any:
        return checkpoint.Checkpointer({"probe": part}, {}, recipe=recipe, plan={}, rank=0, world=1).restore(dirs, warn)

    d = tmp_path / "checkpoint_x"
    checkpoint.save(d, {"recipe": "imagenet", "step": 3, "probe": {"step": 3}}, {"recipe": "imagenet", "step": 3,
                                                                                  "plan": {}})
    with pytest.raises(checkpoint.CheckpointMismatch, match="from recipe 'imagenet', not 'bert'"):
        restore([str(d)], "bert", Probe(), print)
    assert calls == []

    with pytest.raises(checkpoint.CheckpointMismatch, match="does not fit this model .*size mismatch"):
        restore([str(d)], "imagenet", Probe(refuse=True), print)

    torn = tmp_path / "checkpoint_y"  # newer, but its state.pt is garbage
    torn.mkdir()
    (torn / checkpoint.FILE).write_bytes(b"PK\x03\x04 not a whole zip")
    warnings: list[str] = []
    found = restore([str(torn), str(d)], "imagenet", Probe(), warnings.append)
    assert found is not None and found[0] == str(d) and calls[-1]["step"] == 3
    assert "is unreadable" in warnings[0] and "trying the one before it" in warnings[0]


@pytest.mark.serial  # compares the machine's Ray processes and files: nothing else may run beside it
def test_sigint_checkpoints_marks_the_run_killed_and_leaves_no_ray_behind(tmp_path: Path, shared_outputs: Path) -> None:
    temp = Path(os.environ["RAY_TMPDIR"]) / "ray"  # the session's (tests/conftest.py): Ray's session dirs
    before, sessions = ray_processes(), set(temp.glob("session_2*"))
    shm = set(os.listdir("/dev/shm"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "scale=smoke", "train.max_steps=100000", "train.log_every=5",
         "batch.micro_batch=4", "run.name=interrupted", f"run.output_dir={shared_outputs}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if "step 10/100000" in line:
            listening = listeners(proc.pid)
            proc.send_signal(signal.SIGINT)
            break
    rest, _ = proc.communicate(timeout=300)
    console = "".join(lines) + rest
    assert proc.returncode == 130, console[-3000:]
    # Everything Ray starts listens on loopback only. The one exception is torch's process-group
    # store on rank 0 (MASTER_PORT): torch's TCPStore has no bind address (docs/reliability.md).
    assert len(listening) > 5, listening  # GCS, raylet, workers, ...: the check saw them
    exposed = [(ip, port, name) for ip, port, name in listening
               if not ip.removeprefix("::ffff:").startswith("127.") and ip != "::1"]
    assert len(exposed) <= 1 and all(name == "ray::RayTrainWorker" for _, _, name in exposed), exposed
    assert "SIGINT: stopping after the current step with a checkpoint" in console
    assert "stopped at step" in console and "resume with run.name=interrupted" in console

    (run,) = runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert run.info.status == "KILLED"
    saved = checkpoint.candidates(str(next(shared_outputs.glob("ray/interrupted-*"))))
    assert saved and checkpoint.meta(saved[0])["step"] >= 10  # type: ignore[index]
    time.sleep(2)
    assert ray_processes() <= before  # every Ray process it started is gone
    assert set(temp.glob("session_2*")) <= sessions  # its session dir too (logs kept in outputs)
    assert any((shared_outputs / "logs").glob("interrupted-*/session_*/raylet.out"))
    assert {f for f in os.listdir("/dev/shm") if "ray" in f.lower() or "plasma" in f.lower()} <= shm


def test_an_unreachable_tracking_server_fails_in_seconds_or_falls_back(tmp_path: Path, shared_outputs: Path) -> None:
    uri = f"http://alice:{SECRET}@127.0.0.1:{free_port()}"  # nothing listens there
    started = time.perf_counter()
    out = launcher("scale=smoke", f"tracking.uri={uri}", f"run.output_dir={tmp_path / 'out'}", cwd=tmp_path)
    took = time.perf_counter() - started
    assert out.returncode == 2 and took < 30, (took, out.stderr[-2000:])
    assert "tracking.uri: no MLflow server answers at http://127.0.0.1:" in out.stderr  # credentials taken out
    assert "tracking.required=false" in out.stderr and SECRET not in out.stdout + out.stderr
    assert not (tmp_path / "out" / "ray").exists()  # nothing was scheduled

    out = launcher("scale=smoke", f"tracking.uri={uri}", "tracking.required=false", "train.max_steps=2",
                   "train.log_every=1", "train.eval_batches=1", "run.name=fallback",
                   f"run.output_dir={shared_outputs}", cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "unreachable" in out.stdout and SECRET not in out.stdout + out.stderr
    (run,) = [r for r in runs(f"sqlite:///{shared_outputs / 'mlflow.db'}") if r.info.run_name == "fallback"]
    assert run.info.status == "FINISHED"


def test_a_run_that_cannot_be_opened_stops_the_ray_started_beside_it(tmp_path: Path) -> None:
    """The MLflow run opens while the embedded Ray starts: when the run cannot be opened, that Ray is
    stopped (its logs kept, none of its processes left) and the error names the key, exit 2."""
    out = launcher("scale=smoke", "tracking.uri=sqlite:////proc/no-such-dir/mlflow.db", "run.name=unopened",
                   f"run.output_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "tracking.uri: cannot open an MLflow run at sqlite:////proc/no-such-dir/mlflow.db" in out.stderr
    (session,) = (tmp_path / "out" / "logs" / "unopened-not-launched").iterdir()  # the embedded Ray's logs
    assert session.name.startswith("session_") and (session / "raylet.out").exists()
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if session.name in " ".join(p.info["cmdline"] or [])]
    assert not left, left


def test_a_tracking_outage_mid_run_loses_no_metric_and_no_secret(tmp_path: Path, shared_outputs: Path) -> None:
    port = free_port()
    server, url = start_mlflow_server(tmp_path, port)
    uri = f"http://alice:{SECRET}@127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "scale=smoke", "tracking=server", f"tracking.uri={uri}",
         "train.max_steps=60", "train.log_every=2", "train.eval_batches=1", "run.name=outage",
         f"run.output_dir={shared_outputs}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines = []
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            lines.append(line)
            if "step 10/60" in line:
                server.terminate()  # the tracking server goes away mid-run
                server.wait(timeout=30)
                break
        for line in proc.stdout:
            lines.append(line)
            if "tracking: cannot reach" in line:
                break
        server, _ = start_mlflow_server(tmp_path, port)  # ... and comes back on the same port
        rest, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    console = "".join(lines) + rest
    assert proc.returncode == 0, console[-3000:]
    assert "training goes on, metrics are kept" in console
    try:
        (run,) = runs(url)
        assert run.info.status == "FINISHED"
        assert steps(url, run.info.run_id) == list(range(2, 61, 2))  # every logged step, outage or not
        artifacts = [a.path for a in MlflowClient(tracking_uri=url).list_artifacts(run.info.run_id)]
        assert {"config.yaml", "plan.json"} <= set(artifacts)
        params = json.dumps(run.data.params) + json.dumps(run.data.tags)
        config = Path(MlflowClient(tracking_uri=url).download_artifacts(run.info.run_id, "config.yaml",
                                                                         str(tmp_path / "a"))).read_text()
        assert f"uri: http://127.0.0.1:{port}" in config  # the credentials went to MLflow's variables
        assert SECRET not in console + params + config
        (run_logs,) = shared_outputs.glob("logs/outage-*")  # Ray's and the workers' log files, kept
        logged = [f for f in run_logs.rglob("*") if f.is_file()]
        assert logged and not [f for f in logged if SECRET.encode() in f.read_bytes()]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_hostile_target_on_the_command_line_is_refused_before_anything_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    out = launcher("+hook._target_=os.system", f"+hook.command=touch {marker}",
                   "+recipe.model._target_=subprocess.call", cwd=tmp_path)
    assert out.returncode == 2
    assert "hook: refused: `_target_` is not accepted" in out.stderr
    assert "recipe.model: refused" in out.stderr or "recipe.model._target_" in out.stderr
    assert not marker.exists() and not (tmp_path / "mlflow.db").exists()
