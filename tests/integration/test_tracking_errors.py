"""Tracking errors that no retry fixes, against a real ``mlflow server`` on 127.0.0.1 (issue #22).

An outage (no connection, HTTP 5xx or 429) is kept and resent; a metric key the server rejects
(HTTP 400) is dropped and named once while the rest of its batch is recorded; a run deleted on
the server is reported once and left alone. One server serves the whole module (it takes ~30 s
to start on two cores). Outages and a proxy's own answers come from ``Gate``, a TCP forwarder in
front of the server; MLflow's client and server are the real ones throughout.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from launcher.tracking import MlflowTracker, PostTracker, SystemMetrics, finish_run, record
from tests.conftest import free_port, start_mlflow_server

BAD_CHARS, TOO_LONG = "bad key!", "k" * 300  # MLflow's server answers 400 INVALID_PARAMETER_VALUE to both


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), free_port())
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(autouse=True)
def _mlflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the driver runs with (``tracking.quick_requests``, ``launch.py``), put back after each test."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


@pytest.fixture
def gate(server: str) -> Iterator[Gate]:
    found = Gate(server)
    yield found
    if found.listener is not None:
        found.shut()


def new_run(url: str) -> str:
    client = MlflowClient(tracking_uri=url)
    found = client.get_experiment_by_name("tracking-errors")
    exp_id = found.experiment_id if found else client.create_experiment("tracking-errors")
    return str(client.create_run(exp_id).info.run_id)


def monitor_threads() -> list[threading.Thread]:
    """MLflow's system-metrics monitors running in this process."""
    return [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]


def steps(url: str, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(tracking_uri=url).get_metric_history(run_id, key))


class Gate:
    """A TCP forwarder to the server on 127.0.0.1: ``open`` forwards, ``shut`` listens no more (connection
    refused; open connections are cut), ``answer(status)`` answers every request with that HTTP status
    itself, as a reverse proxy does in front of a server that is away or rate-limits."""

    def __init__(self, url: str) -> None:
        self.target = int(url.rsplit(":", 1)[1])
        self.port, self.status = free_port(), 0
        self.url = f"http://127.0.0.1:{self.port}"
        self.conns: list[socket.socket] = []
        self.listener: socket.socket | None = None
        self.open()

    def open(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(16)
        self.listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def shut(self) -> None:
        assert self.listener is not None
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() below
        self.listener.close()
        self.listener = None
        for c in self.conns:
            c.close()
        self.conns.clear()

    def answer(self, status: int) -> None:
        self.status = status
        for c in self.conns:  # new requests come on new connections
            c.close()
        self.conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            self.conns.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        if self.status:
            head = b""
            while b"\r\n\r\n" not in head:
                head += client.recv(65536)
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            body = head.split(b"\r\n\r\n", 1)[1]
            while len(body) < length:
                body += client.recv(65536)
            client.sendall(f"HTTP/1.1 {self.status} From the gate\r\nContent-Length: 0\r\n"
                           "Connection: close\r\n\r\n".encode())
            client.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.target))
        self.conns.append(upstream)
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
        self._pump(client, upstream)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


RANK_ZERO = """
import json, sys
from launcher.tracking import PostTracker
events = []
tracker = PostTracker(events.append, "node-a", None)
tracker.log_metrics({"loss": 0.5, "lr": 1e-3}, 3)
tracker.log_dict({"micro_batch": 32}, "oom/step_3.json")
tracker.close()
print(json.dumps({"events": events, "mlflow": sorted(m for m in sys.modules if m.startswith("mlflow"))}))
"""


def test_rank_zeros_metrics_reach_mlflow_through_the_driver_and_no_worker_imports_it(
    server: str, tmp_path: Path
) -> None:
    """Rank 0's tracker only posts events (in a fresh interpreter: no MLflow module loaded); the driver's
    ``record`` sends them with rank 0's step and time, and samples system figures only for its own node; a
    rank 0 on another node samples its own."""
    rank_zero = subprocess.run([sys.executable, "-c", RANK_ZERO], capture_output=True, text=True, check=True)
    out = json.loads(rank_zero.stdout)
    assert out["mlflow"] == []
    events = [*out["events"], {"line": "checkpoint at step 3"}]
    run_id, said, kept = new_run(server), [], []
    tracker = MlflowTracker(server, run_id, kept.append, said.append, system_metrics_s=0.2)

    earlier = len(monitor_threads())  # any an earlier test left

    def monitors() -> int:
        return len(monitor_threads()) - earlier

    assert [record(tracker, "node-b", e) for e in events] == [True, True, False]  # rank 0 on another node
    assert monitors() == 0  # that node samples itself
    assert record(tracker, "node-a", {**events[0], "step": 4})  # rank 0 on the driver's node
    assert monitors() == 1
    tracker.close()
    assert monitors() == 0 and said == [] and kept == []
    key = "system/cpu_utilization_percentage"
    sampled = len(steps(server, run_id, key))
    away = PostTracker(lambda _event: None, "node-b", SystemMetrics(server, run_id, 0.2))  # rank 0 elsewhere
    away.log_metrics({"loss": 0.4}, 5)
    assert monitors() == 1
    deadline = time.monotonic() + 20
    while len(steps(server, run_id, key)) <= sampled and time.monotonic() < deadline:
        time.sleep(0.2)
    away.close()
    assert monitors() == 0 and len(steps(server, run_id, key)) > sampled
    client = MlflowClient(tracking_uri=server)
    loss = [(m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, "loss")]
    assert sorted(loss) == [(3, 0.5, events[0]["at"]), (4, 0.5, events[0]["at"])]
    record_file = client.download_artifacts(run_id, "oom/step_3.json", str(tmp_path))
    assert json.loads(Path(record_file).read_text()) == {"micro_batch": 32}


def test_a_run_deleted_on_the_server_is_reported_once_and_left_alone(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_id, said, kept = new_run(server), [], []
    tracker = MlflowTracker(server, run_id, kept.append, said.append)
    for step in range(1, 4):
        tracker.log_metrics({"loss": 1.0 / step, "lr": 0.1}, step)
    assert said == [] and steps(server, run_id, "loss") == [1, 2, 3]

    MlflowClient(tracking_uri=server).delete_run(run_id)  # the server now answers 400 to every write to it
    started = time.perf_counter()
    tracker.log_metrics({"loss": 0.25, "lr": 0.1}, 4)  # one refused batch and one get_run find it out
    found_out = time.perf_counter() - started
    started = time.perf_counter()
    for step in range(5, 205):
        tracker.log_metrics({"loss": 1.0 / step, "lr": 0.1}, step)
        tracker.log_dict({"step": step}, f"oom/step_{step}.json")
    assert tracker.flush() and tracker.flush(wait=True)
    tracker.close()
    after = time.perf_counter() - started
    assert len(said) == 1, said
    assert said[0].startswith(f"tracking: run {run_id} at {server} is deleted; training goes on")
    assert found_out < 5 and after < 0.5, (found_out, after)  # 200 steps later: no request was sent
    assert tracker.pending == [] and tracker.pending_dicts == [] and kept == []  # nothing for the driver
    assert tracker.unsent == 2 + 200 * 2
    assert steps(server, run_id, "loss") == [1, 2, 3]

    capsys.readouterr()
    finish_run(server, run_id, "FINISHED", None, tmp_path / "spool.json")
    (line,) = capsys.readouterr().out.splitlines()
    assert line == f"tracking: run {run_id} at {server} is deleted; its final status FINISHED is not recorded"
    assert not (tmp_path / "spool.json").exists()


def test_a_run_the_server_does_not_know_is_reported_once(server: str) -> None:
    said: list[str] = []
    kept: list[dict] = []  # type: ignore[type-arg]
    tracker = MlflowTracker(server, "0" * 32, kept.append, said.append)  # RESOURCE_DOES_NOT_EXIST (404)
    for step in range(1, 20):
        tracker.log_metrics({"loss": 1.0}, step)
    tracker.close()
    assert len(said) == 1 and "is not found or not readable (RESOURCE_DOES_NOT_EXIST" in said[0], said
    assert kept == [] and tracker.pending == []


def test_a_rejected_key_is_dropped_and_named_once_the_rest_of_its_batch_is_recorded(server: str) -> None:
    run_id, said, kept = new_run(server), [], []
    tracker = MlflowTracker(server, run_id, kept.append, said.append)
    for step in range(1, 6):
        tracker.log_metrics({"loss": 1.0 / step, BAD_CHARS: 1.0, TOO_LONG: 2.0, "acc": 0.5}, step)
    assert steps(server, run_id, "loss") == steps(server, run_id, "acc") == [1, 2, 3, 4, 5]
    assert len(said) == 2, said  # one line per rejected key, at its first value
    assert f"rejected metric {BAD_CHARS!r} (INVALID_PARAMETER_VALUE: Invalid value \"bad key!\"" in said[0]
    assert "1 value dropped, and its later values are dropped too" in said[0]
    assert f"rejected metric '{'k' * 57}...' (INVALID_PARAMETER_VALUE: 'Metric name' exceeds" in said[1]
    tracker.close()
    assert said[2] == f"tracking: 10 metric values the server rejected were dropped in all: {BAD_CHARS!r} (5), " \
                      f"'{'k' * 57}...' (5)"
    assert len(said) == 3 and kept == [] and tracker.pending == []


def test_a_rejected_key_in_a_backlog_costs_only_its_own_values(server: str, gate: Gate) -> None:
    """An outage, then a backlog of two chunks (1000 + 200 values) holding a key the server rejects."""
    run_id, said, kept = new_run(server), [], []
    tracker = MlflowTracker(gate.url, run_id, kept.append, said.append)
    tracker.log_metrics({"loss": 1.0, "acc": 0.5, "lr": 0.1}, 0)
    gate.shut()
    for step in range(1, 301):
        tracker.log_metrics({"loss": 1.0 / step, "acc": 0.5, "lr": 0.1, BAD_CHARS: 0.0}, step)
    assert len(tracker.pending) == 1200 and len(said) == 1 and "cannot reach" in said[0]
    assert "Connection refused" in said[0] or "Connection aborted" in said[0]  # a new or a kept-alive connection
    gate.open()
    assert tracker.flush(wait=True)
    assert steps(server, run_id, "loss") == steps(server, run_id, "lr") == list(range(301))
    assert len(said) == 3, said  # named once, in the first chunk (steps 1-250); the second chunk's are dropped unsent
    assert f"rejected metric {BAD_CHARS!r}" in said[1] and "250 values dropped" in said[1]
    assert said[2].startswith(f"tracking: {gate.url} is back after")
    tracker.close()
    assert said[3] == f"tracking: 300 metric values the server rejected were dropped in all: {BAD_CHARS!r} (300)"
    assert kept == []


@pytest.mark.parametrize("status", [503, 429])
def test_an_outage_is_kept_and_resent(server: str, gate: Gate, status: int) -> None:
    """A proxy answering ``status`` for the server, then nothing listening: kept; once through, everything arrives."""
    run_id, said, kept = new_run(server), [], []
    gate.answer(status)
    tracker = MlflowTracker(gate.url, run_id, kept.append, said.append)
    started = time.perf_counter()
    for step in range(1, 4):
        tracker.log_metrics({"loss": 1.0 / step}, step)
    assert len(said) == 1 and said[0].startswith(f"tracking: cannot reach {gate.url} ("), said
    assert f"too many {status} error responses" in said[0]
    gate.shut()
    for step in range(4, 7):
        tracker.log_metrics({"loss": 1.0 / step}, step)
    assert not tracker.flush(wait=True)  # connection refused
    assert time.perf_counter() - started < 5  # between retries, log_metrics returns at once
    assert len(tracker.pending) == 6 and len(said) == 1
    gate.open()
    gate.answer(0)
    assert tracker.flush(wait=True)
    assert steps(server, run_id, "loss") == [1, 2, 3, 4, 5, 6]
    assert len(said) == 2 and "is back after" in said[1] and kept == []


def test_system_metrics_stop_in_an_outage_and_start_again_after_it(server: str, gate: Gate) -> None:
    """MLflow's monitor ends at its first failed request; the tracker starts another when the server is back,
    its steps going on from the last; meanwhile no step waits for it, and close() stops it."""
    run_id, said, kept = new_run(server), [], []
    tracker = MlflowTracker(gate.url, run_id, kept.append, said.append, system_metrics_s=0.2)
    key = "system/cpu_utilization_percentage"

    def sampled(more_than: int) -> list[int]:
        deadline = time.monotonic() + 20
        while len(found := steps(server, run_id, key)) <= more_than and time.monotonic() < deadline:
            time.sleep(0.2)
        return found

    tracker.log_metrics({"loss": 1.0}, 0)  # the first metrics start the monitor
    assert len(monitor_threads()) == 1 and sampled(2)
    gate.shut()
    started = time.perf_counter()
    for step in range(1, 6):
        tracker.log_metrics({"loss": 1.0 / step}, step)
        time.sleep(0.2)
    assert time.perf_counter() - started < 3  # no step waited for the monitor
    deadline = time.monotonic() + 20
    while monitor_threads() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert monitor_threads() == [] and len(said) == 1 and said[0].startswith(f"tracking: cannot reach {gate.url}")
    before = steps(server, run_id, key)

    gate.open()
    assert tracker.flush(wait=True)
    tracker.log_metrics({"loss": 0.1}, 6)
    after = sampled(len(before) + 2)
    assert len(monitor_threads()) == 1 and after == list(range(len(after))) and len(after) > len(before) + 2
    tracker.close()
    assert monitor_threads() == [] and kept == [] and steps(server, run_id, "loss") == list(range(7))


def test_a_forbidden_run_is_left_alone(server: str, gate: Gate) -> None:
    """A proxy answering 403 (MLflow's client reads it as PERMISSION_DENIED): nothing more can be written."""
    run_id, said, kept = new_run(server), [], []
    gate.answer(403)
    tracker = MlflowTracker(gate.url, run_id, kept.append, said.append)
    for step in range(1, 10):
        tracker.log_metrics({"loss": 1.0}, step)
    tracker.close()
    assert len(said) == 1 and "is not writable (API request to endpoint" in said[0], said
    assert "failed with error code 403" in said[0] and kept == [] and tracker.pending == []


def test_a_run_deleted_while_it_launches_does_not_stop_training_and_is_reported_once(
    server: str, tmp_path: Path, shared_outputs: Path
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "scale=smoke", "tracking=server", f"tracking.uri={server}",
         "train.max_steps=10", "train.log_every=2", "train.eval_batches=1", "run.name=deleted",
         f"run.output_dir={shared_outputs}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"},  # every line shown, none merged
    )
    lines, run_id = [], ""
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            lines.append(line)
            if found := re.match(r"mlflow: .*\(([0-9a-f]{32})\)", line):
                # deleted on the server as soon as the driver opened it: the workers are still to
                # start, so their first metrics meet a deleted run whatever the machine's load
                run_id = found.group(1)
                MlflowClient(tracking_uri=server).delete_run(run_id)
                break
        rest, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    console = "".join(lines) + rest
    assert proc.returncode == 0, console[-3000:]
    assert "step 10/10" in console, console[-3000:]
    assert console.count(f"tracking: run {run_id} at {server} is deleted; training goes on") == 1, console[-3000:]
    assert f"tracking: run {run_id} at {server} is deleted; its final status FINISHED is not recorded" in console
    assert "cannot reach" not in console and "not sent yet" not in console
    assert not (shared_outputs / "spool" / f"{run_id}.json").exists()
    assert steps(server, run_id, "loss") == []  # nothing was written after the deletion
