"""Shared test setup: real Ray, real MLflow, real Hydra; no downloads, no telemetry."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from itertools import accumulate
from pathlib import Path
from typing import Any

import psutil
import pytest

from launcher.cluster import OWN_PRIORITY, free_ports

ROOT = Path(__file__).resolve().parent.parent

# No RAY_AUTH_MODE here: the launcher decides Ray's authentication itself (tests/integration/
# test_cluster.py runs a token-authenticated head; the embedded Ray is checked with a bare HOME).
os.environ.pop("RAY_AUTH_MODE", None)
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray's temp dir for the Rays the tests start and the one place `cluster=local` looks for a warm Ray
# (<dir>/ray/ray_current_cluster): the session's own, so a developer's `ray start --head` is never used
os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="lt-", dir="/tmp")


def launcher(
    *args: str, cwd: Path, env: dict[str, str | None] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run ``python -m launcher ARGS`` as a user would, from ``cwd``; ``env`` adds variables (None: unset)."""
    merged = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args],
        cwd=cwd,
        env={k: v for k, v in merged.items() if v is not None},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def shared_outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One outputs dir (and so one tokenizer/pairs cache) for every training test."""
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture(autouse=True)
def _memory_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the memory-estimate cache inside the test session, never in ~/.cache."""
    monkeypatch.setenv("LAUNCHER_CACHE", str(tmp_path_factory.getbasetemp() / "launcher-cache"))


def _gloo_rank(rank: int, world: int, port: int, fn: Any, args: tuple, out: Any) -> None:  # type: ignore[type-arg]
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out[rank] = fn(rank, *args)
    dist.destroy_process_group()


def spawn_gloo(fn: Any, world: int, *args: Any) -> dict[int, Any]:
    """``fn(rank, *args)`` in ``world`` local processes joined in a gloo process group; what each returned, by rank.
    ``fn`` must be a module-level function (the processes are spawned)."""
    import torch.multiprocessing as mp

    out = mp.Manager().dict()
    mp.spawn(_gloo_rank, args=(world, free_port(), fn, args, out), nprocs=world, join=True)
    return dict(out)


def free_port() -> int:
    return free_ports(1)[0]


@contextlib.contextmanager
def ray_head(*options: str, env: dict[str, str], others: bool = False) -> Iterator[tuple[subprocess.Popen, Path, int]]:
    """``ray start --head`` on 127.0.0.1 with ``options``: (its process, its temp dir, its GCS port).

    Its temp dir is short and its own (Ray's socket paths must stay within AF_UNIX's 107 bytes,
    which pytest's per-worker folders pass), its job agent gets a free port (Ray's default 52365
    is taken by any other Ray on the machine), its output goes to ``head.log`` there, and it is
    stopped by its own process ids. Its dashboard (Ray starts a minimal one even without the UI)
    gets a free port unless ``options`` name one: at Ray's default 8265 it would answer for another
    Ray's API address. Its workers run at normal priority (``OWN_PRIORITY``, as the launcher's runs on this
    machine; at Ray's nice 15 a test's time followed its neighbour test process's load) unless ``env`` sets
    ``RAY_worker_niceness``. Whether it is up is the caller's check. ``others``: other nodes
    may join (Ray then registers the machine's address and its servers listen on every interface).
    """
    temp = Path(tempfile.mkdtemp(prefix="rayhead-", dir="/tmp"))
    port, dashboard, agent = free_ports(3)  # distinct, none of them 52365
    if not any(o.startswith("--dashboard-port=") for o in options):
        options = (*options, f"--dashboard-port={dashboard}")
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={port}", f"--temp-dir={temp}", f"--dashboard-agent-listen-port={agent}",
         "--disable-usage-stats", *options],
        env={**OWN_PRIORITY, **env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1" if others else "0"},  # "0": loopback
        stdout=(temp / "head.log").open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        yield head, temp, port
    finally:
        started = [head, *psutil.Process(head.pid).children(recursive=True)]  # only what this head started
        for proc in started:
            proc.terminate()
        # `ray start --block`, the GCS, the raylet and two of Ray's Python helpers outlive a SIGTERM by
        # more than 10 s (measured 2026-12-07): waiting for them cost every head 10 s; the rest go in 1
        _, alive = psutil.wait_procs(started, timeout=1)
        for proc in alive:
            proc.kill()
        shutil.rmtree(temp, ignore_errors=True)


# The GCS declares a node dead after 3 failed health checks 1 s apart (Ray's defaults: 5, 3 s apart).
# A killed raylet fails each at once; a live one on a loaded machine has 5 s to answer each
# (at 0.5 s, a raylet of a loaded 2-core machine was declared dead and exited)
FAST_NODE_DEATH = {"RAY_health_check_initial_delay_ms": "0", "RAY_health_check_period_ms": "1000",
                   "RAY_health_check_timeout_ms": "5000", "RAY_health_check_failure_threshold": "3"}


def wait_for(log: Path, text: str, proc: subprocess.Popen, what: str, timeout: float = 90) -> None:
    """Until ``text`` is in ``log``; a test failure naming ``what`` if ``proc`` ends or ``timeout`` passes first."""
    deadline = time.time() + timeout
    while text not in (log.read_text() if log.exists() else ""):
        if proc.poll() is not None or time.time() > deadline:
            pytest.fail(f"{what} did not come up:\n{log.read_text()[-3000:] if log.exists() else ''}")
        time.sleep(0.2)


class RayNode:
    """A second Ray node on 127.0.0.2 joined to the head, in its own process group.

    ``ray start`` gives a raylet 30 s to register with the GCS (Ray's own constant); on a loaded
    2-core machine that can pass, and it exits. Starting the node is then tried again (3 tries):
    the node's start-up is the test's scaffolding, not what it tests."""

    def __init__(self, address: str, temp: Path, env: dict[str, str]) -> None:
        for _ in range(3):
            self.temp = Path(tempfile.mkdtemp(prefix="raynode-", dir="/tmp"))  # short: AF_UNIX paths
            self.log = temp / f"node-{time.time_ns()}.log"
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "ray"), "start", "--block", f"--address={address}",
                 "--node-ip-address=127.0.0.2", "--num-cpus=1", f"--temp-dir={self.temp}",
                 f"--dashboard-agent-listen-port={free_port()}", "--object-store-memory=100000000",
                 "--disable-usage-stats"],
                env={**OWN_PRIORITY, **env}, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            deadline = time.time() + 90
            while "Ray runtime started" not in self.log.read_text() and self.proc.poll() is None:
                if time.time() > deadline:
                    break
                time.sleep(0.2)
            if "Ray runtime started" in self.log.read_text():
                return
            self.kill()
        pytest.fail(f"the second Ray node did not come up in 3 tries:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL to the node's process group and every process it started (raylet, workers)."""
        try:
            procs = [self.proc, *psutil.Process(self.proc.pid).children(recursive=True)]
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (psutil.Error, ProcessLookupError):  # it had exited (a start that failed)
            procs = []
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)
        shutil.rmtree(self.temp, ignore_errors=True)


def ledger_steps(ledger: Path, ranks: int) -> dict[int, list[int]]:
    """The sample ledger (``LAUNCHER_SAMPLE_LEDGER``) of ranks ``0..ranks-1``: each step's sample ids, all ranks'."""
    per_step: dict[int, list[int]] = {}
    for rank in range(ranks):
        for line in (ledger / f"rank{rank}.jsonl").read_text().splitlines():
            entry = json.loads(line)
            per_step.setdefault(entry["step"], []).extend(entry["ids"])
    return per_step


def start_mlflow_server(root: Path, port: int) -> tuple[subprocess.Popen, str]:
    """A real ``mlflow server`` on 127.0.0.1:port over ``root`` (store and artifacts), once healthy."""
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
            f"sqlite:///{root / 'server.db'}",
            "--workers",
            "1",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("mlflow server did not start in 90 s")


def write_corpus(path: Path, mb: float, seed: int = 0) -> Path:
    """A plain-text corpus of at least ``mb`` MiB at ``path``, the same for a seed: documents of 2 to 12
    sentences separated by blank lines, each sentence 5 to 24 words drawn Zipf-like from 20,000 made-up
    words (a real corpus's shape: a long tail of rare words for the tokenizer to split)."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    words: dict[str, None] = {}  # first-seen order
    while len(words) < 20_000:
        words["".join(rng.choices(syllables, k=rng.choice((1, 2, 2, 3, 3, 4))))] = None
    vocabulary = list(words)
    weights = list(accumulate(1 / rank for rank in range(1, len(vocabulary) + 1)))
    path.parent.mkdir(parents=True, exist_ok=True)
    size, limit = 0, int(mb * 2**20)
    with path.open("w") as out:
        while size < limit:
            sentences = []
            for _ in range(rng.randint(2, 12)):
                s = " ".join(rng.choices(vocabulary, cum_weights=weights, k=rng.randint(5, 24)))
                sentences.append(s[0].upper() + s[1:] + rng.choice("....?!"))
            size += out.write(" ".join(sentences) + "\n\n")
    return path
