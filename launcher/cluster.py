"""Ray, local or a cluster someone else runs: start or connect, read its hardware, use its job API.

``cluster=local`` trains on a Ray the user keeps running on this machine (``ray start --head``,
once) when it has room for the run (``warm_local``), else starts an embedded single-node Ray on
127.0.0.1 and removes it afterwards.
``cluster=ray`` connects to an existing cluster (``cluster.address``, else ``$RAY_ADDRESS``,
else ``auto``), ships the launcher's code to its workers (``py_modules``), and reads the
GPUs per node and their memory from it for the planner. ``action=submit|status|logs|stop``
go through Ray Jobs (``JobSubmissionClient``). See docs/cluster.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import launcher
import recipes
from launcher.config import Cluster, Config, ConfigError
from launcher.planner import Hardware

ROOT = Path(launcher.__file__).resolve().parent.parent  # conf/, launcher/, recipes/
GB = 1024**3
# What a submitted job's working directory leaves out (besides what .gitignore lists)
EXCLUDES = [".git", ".venv", "outputs", "mlruns", "mlflow.db", "*.egg-info", "bench/results", "__pycache__",
            ".mypy_cache", ".ruff_cache", ".pytest_cache"]
JOB_STOP_WAIT_S = 120  # SIGTERM -> SIGKILL grace of a stopped job: time to finish a step and checkpoint
QUIET = "launcher.raylog.quiet"  # worker_process_setup_hook; imports nothing heavy
# In a job's env: Ray reads it in each worker, which then keeps the niceness of the node that started it
# instead of lowering itself to 15, below any busy process on the machine (a smoke run beside two busy
# loops: 210.9 s at nice 15, 48.6 s at 0). For the runs on this machine, as torchrun's processes run
OWN_PRIORITY = {"RAY_worker_niceness": "0"}
_embedded = False  # this process started the Ray it is connected to (start_local): stop() removes it
_token_found = ""  # where authentication() found the token it then used with $RAY_AUTH_MODE unset


def warm_local(cpus: int, gpus: int, verbose: bool = False) -> bool:
    """Connect to the Ray the user started on this machine with ``ray start --head``, when it answers and
    has ``cpus`` CPUs and ``gpus`` GPUs for the run; say so either way. False: none was found (or it is
    too small, or refused the connection): start an embedded one.

    Found as Ray's own ``ray.init(address="auto")`` finds it: the address that ``ray start`` wrote
    last in ``<temp>/ray/ray_current_cluster`` (``<temp>``: ``$RAY_TMPDIR``, else ``$TMPDIR``, else
    /tmp), only when something listens there. Connected as to any cluster (``connect``: the
    launcher's code shipped to its workers, the authentication policy of ``authentication``).
    Saves the embedded Ray's start (seconds) and its workers' imports; the warm Ray is left running.
    The run's workers there run at the launcher's priority, as an embedded Ray's do (``start_local``).
    """
    record = Path(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp") / "ray" / "ray_current_cluster"
    address = record.read_text().strip() if record.is_file() else ""
    host, _, port = address.rpartition(":")
    if not (host and port.isdigit() and _unreachable(host, int(port), timeout=2) is None):
        return False
    try:
        connect(Cluster(kind="ray", address=address), verbose=verbose, found=f"a warm Ray: {record}", own_priority=True)
    except ConfigError as e:
        print(f"ray: not using the Ray at {address} ({e.errors[0]}); starting an embedded one", flush=True)
        return False
    import ray  # after connect: Ray reads the authentication mode that connect sets on import

    have = ray.available_resources()  # what is free now: a busy warm Ray would hold the run waiting
    if have.get("CPU", 0) < cpus or have.get("GPU", 0) < gpus:
        ray.shutdown()
        print(f"ray: the Ray at {address} has {have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs; this "
              f"run needs {cpus} and {gpus}: starting an embedded one", flush=True)  # fmt: skip
        return False
    return True


def _unreachable(host: str, port: int, timeout: float) -> OSError | None:
    """Why nothing answers at ``host:port`` within ``timeout`` seconds; None when something does."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return e


def start_local(cpus: int, verbose: bool = False) -> None:
    """An embedded Ray for this run on 127.0.0.1, without dashboard. Its workers' output stays in its
    session's logs (kept in the run's log folder by ``stop``) unless ``verbose`` (``run.verbose``)."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # no spot preemption on this machine
    # Ray Train's controller polls its workers every 2 s by default: on one machine the polls are
    # cheap, and a run's end (or a worker's failure) is seen within 0.5 s (about 4 s less per smoke run)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # Ray turns a node address of 127.0.0.1 into the machine's outward IP, and its servers then
    # listen on every interface; as a single-node Ray (its setting on macOS and Windows) it keeps
    # 127.0.0.1 and its gRPC servers listen on loopback only.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # The launcher decides the embedded Ray's authentication, whatever started it: loopback only
    # and no token (Ray 2.60's default would write one into ~/.ray/auth_token)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # Its address fixed before it starts, and given to its processes: Ray's own helpers inside
    # them (Ray Train's placement-group cleaner asks the state API with no address) otherwise
    # look for "the" cluster among the machine's GCS processes and fail when another Ray runs
    gcs_port, dashboard_port = free_ports(2)
    os.environ["RAY_GCS_SERVER_PORT"] = str(gcs_port)
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{gcs_port}"
    import ray

    # Ray starts a minimal dashboard even without the UI, and records its address (8265 by default)
    # as the cluster's API server. Ray Train's PlacementGroupCleaner asks that address whether the
    # run's controller is alive: when another Ray's dashboard holds 8265, it answers "no such
    # actor", and the cleaner removed this run's placement group, killing its workers mid-run.
    # A free port keeps the address this Ray's own.

    ray.init(
        address="local",
        num_cpus=max(os.cpu_count() or 2, cpus),
        include_dashboard=False,
        dashboard_port=dashboard_port,
        _node_ip_address="127.0.0.1",
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.WARNING,
        configure_logging=True,
        runtime_env={"worker_process_setup_hook": QUIET, "env_vars": OWN_PRIORITY},
        # Ray prestarts one idle worker per CPU for the first driver; with the job's runtime_env (above)
        # none of them can host this run's actors, so each only costs a process importing Ray while
        # the MLflow run opens: 0.4-1 s of the start-up on 2 cores
        _system_config={"prestart_worker_first_driver": False},
    )
    global _embedded
    _embedded = True


def free_ports(count: int) -> list[int]:
    """``count`` different ports free now on 127.0.0.1, none of them the fixed port of Ray's dashboard agent
    (52365, inside the range the system hands out: given to the dashboard, Ray refused to start, "trying to use
    a port number 52365 that is used by other components")."""
    import socket
    from contextlib import ExitStack

    from ray._private.ray_constants import DEFAULT_DASHBOARD_AGENT_LISTEN_PORT

    ports: list[int] = []
    with ExitStack() as held:  # each held until all are found, so no two are the same
        while len(ports) < count:
            s = held.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            if (port := int(s.getsockname()[1])) != DEFAULT_DASHBOARD_AGENT_LISTEN_PORT:
                ports.append(port)
    return ports


def connect(cluster: Cluster, verbose: bool = False, found: str = "", own_priority: bool = False) -> str:
    """Connect to an existing cluster with the launcher's code for its workers; returns the address used.
    Its workers' output stays in the cluster's session logs unless ``verbose`` (``run.verbose``).
    ``found``: where the address came from, for the console line. ``own_priority``: this job's workers
    run at the priority of the Ray node that starts them, not Ray's nice 15 (a warm Ray on this machine);
    a cluster's nodes keep their own policy."""
    address = cluster.address or os.environ.get("RAY_ADDRESS") or "auto"
    if address.startswith(("http://", "https://")):
        raise ConfigError(
            [
                f"cluster.address: {address} is a job API address (for action=submit); to train from here, "
                "give the cluster's address (host:6379, ray://host:10001, or auto on a cluster node)"
            ]
        )
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if host and port.isdigit():
        _check_reachable(host, int(port), address)
        if host in ("127.0.0.1", "localhost"):  # a cluster on this machine's loopback: Ray must not
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # rewrite it to the outward IP
    auth = authentication()
    import ray  # after the variable above: Ray reads it on import

    from launcher.tracking import credential_env

    try:
        ray.init(
            address=address,
            log_to_driver=verbose,
            logging_level=logging.INFO if verbose else logging.WARNING,
            configure_logging=True,
            runtime_env={
                "py_modules": [str(Path(launcher.__file__).parent), str(Path(recipes.__file__).parent)],
                "worker_process_setup_hook": QUIET,
                "env_vars": _worker_env(credential_env(), own_priority),
            },
        )
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ConfigError(
            [
                f"cluster.address: cannot connect to a Ray cluster at {address!r}: {str(e).splitlines()[0][:200]} "
                f"(authentication: {auth}; is `ray start --head` running there? set cluster.address or "
                "$RAY_ADDRESS; a cluster with token authentication needs its token in $RAY_AUTH_TOKEN, "
                "$RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"
            ]
        ) from None
    print(f"ray: connected to {address} ({found + '; ' if found else ''}authentication: {auth})", flush=True)
    return address


def _worker_env(credentials: dict[str, str], own_priority: bool = False) -> dict[str, str]:
    """What the workers get from this driver's environment: the tracking server's credentials (never in
    the payload) and the launcher's own variables (the sample ledger, fault injection), as an embedded
    Ray's workers inherit them; with ``own_priority``, ``OWN_PRIORITY``. Less what the Ray job running this driver
    (``action=submit``) already gives every worker: Ray refuses a variable given twice."""
    import json

    wanted = credentials | {k: v for k, v in os.environ.items() if k.startswith("LAUNCHER_")}
    wanted |= OWN_PRIORITY if own_priority else {}
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")  # set by Ray's job supervisor
    given = (job.get("runtime_env") or {}).get("env_vars") or {}
    return {k: v for k, v in wanted.items() if k not in given}


def authentication() -> str:
    """How the launcher authenticates to a Ray cluster it did not start, and where that came from.

    ``$RAY_AUTH_MODE`` when set; else token authentication when a token is at hand (Ray's own
    places: ``$RAY_AUTH_TOKEN``, the file ``$RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``), else
    none. Ray itself, with the mode unset, does not send a token it has, and its connection
    attempts then fail for a minute; the launcher sets the mode from what it found.
    """
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode:
        return f"{mode}, as $RAY_AUTH_MODE says"
    sources = [
        ("$RAY_AUTH_TOKEN", bool(os.environ.get("RAY_AUTH_TOKEN"))),
        ("$RAY_AUTH_TOKEN_PATH", Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or "/nonexistent").is_file()),
        ("~/.ray/auth_token", (Path.home() / ".ray" / "auth_token").is_file()),
    ]
    found = next((name for name, present in sources if present), None)
    global _token_found
    _token_found = found or ""
    os.environ["RAY_AUTH_MODE"] = "token" if found else "disabled"
    return f"token from {found}" if found else "none (no token in $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray)"


def failure_hint(report: str) -> str:
    """A line for a failed run whose actors Ray cancelled before they started, when the launcher chose token
    authentication only because it found a token: a cluster started without authentication (Ray 2.60)
    accepts the connection, then cancels the run's actors about 10 s later. Empty otherwise."""
    if not _token_found or "cancelled before it started running" not in report:
        return ""
    return (
        f"hint: the launcher authenticated with the token from {_token_found}, as $RAY_AUTH_MODE is unset; a "
        "cluster started without authentication cancels the run's actors like this: for such a cluster, "
        "run with RAY_AUTH_MODE=disabled"
    )


def _check_reachable(host: str, port: int, address: str) -> None:
    """Fail in seconds, not after Ray's minutes of retries, when nothing listens at the address."""
    if (e := _unreachable(host, port, timeout=5)) is not None:
        raise ConfigError(
            [
                f"cluster.address: nothing answers at {address} ({e}); is `ray start --head` running there? "
                "Set cluster.address (host:6379, ray://host:10001) or $RAY_ADDRESS"
            ]
        ) from None


def stop(logs: Path) -> Path | None:
    """Disconnect; where the workers' logs are. An embedded Ray (``start_local``) is shut down, its logs
    moved to ``logs``, its /tmp session removed, and any of its processes still there after 10 s (an
    actor stuck in its own shutdown) killed. A Ray someone else runs is left running, its logs in
    its session folder on its nodes (this one's when it is here)."""
    import psutil
    import ray
    from ray._private.ray_constants import PROCESS_TYPE_MONITOR

    global _embedded
    if not ray.is_initialized():
        return None
    embedded, _embedded = _embedded, False
    node = ray._private.worker._global_node
    session = Path(node.get_session_dir_path()) if node is not None else None
    started = psutil.Process().children(recursive=True) if embedded else []  # GCS, raylet, its workers
    if embedded and node is not None:
        # Ray's autoscaler monitor answers SIGTERM by reporting its own end through the GCS, which ray.shutdown
        # stops first: every run waited out Ray's 1 s grace for it. An embedded Ray has nothing to scale.
        for info in node.all_processes.get(PROCESS_TYPE_MONITOR, []):
            with contextlib.suppress(OSError):
                info.process.kill()
    ray.shutdown()
    if embedded:  # the embedded Ray's address is gone with it
        for var in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT"):
            os.environ.pop(var, None)
    for proc in _running(started, timeout=10):
        with contextlib.suppress(psutil.Error):
            proc.kill()
    logged = session / "logs" if session is not None and (session / "logs").is_dir() else None
    if session is None or not embedded:
        return logged
    if logged is not None:
        logs.mkdir(parents=True, exist_ok=True)
        shutil.move(str(logged), str(logs / session.name))
    shutil.rmtree(session, ignore_errors=True)
    latest = session.parent / "session_latest"
    if latest.is_symlink() and Path(os.readlink(latest)).name == session.name:
        latest.unlink()
    return logs


def _running(procs: list[Any], timeout: float) -> list[Any]:
    """Those of ``procs`` (``psutil.Process``) still running after up to ``timeout`` seconds. A zombie has ended
    (its files closed): waiting until its new parent reaps it, as ``psutil.wait_procs`` does, cost 1 s a run."""
    import psutil

    def running(p: Any) -> bool:
        with contextlib.suppress(psutil.Error):
            return bool(p.is_running() and p.status() != psutil.STATUS_ZOMBIE)
        return False

    deadline = time.monotonic() + timeout
    while (alive := [p for p in procs if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def hardware(cluster: Cluster) -> Hardware:
    """The connected cluster's devices, for the planner.

    GPUs: the alive nodes that have any, planned at the smallest count among them (a
    heterogeneous cluster is planned for its smallest GPU node), and one GPU task asks torch
    for the memory. No GPUs (or ``cluster.use_gpu=false``): ``cluster.num_workers`` CPU
    workers (2 by default), each with an equal share of the smallest node's memory. The CPUs
    per node, for the CPU budget (``planner.cpu_budget``), as Ray reports them (``_cpus_per_node``).
    """
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    gpu_nodes = [int(n["Resources"].get("GPU", 0)) for n in nodes if n["Resources"].get("GPU", 0) >= 1]
    if cluster.use_gpu is True and not gpu_nodes:
        raise ValueError("cluster.use_gpu: true, but the Ray cluster has no GPU node (use auto or false)")
    if gpu_nodes and cluster.use_gpu is not False:

        @ray.remote(num_gpus=1)
        def gpu_memory_gb() -> float:
            import torch

            return torch.cuda.get_device_properties(0).total_memory / GB

        memory = cluster.gpu_memory_gb or ray.get(gpu_memory_gb.remote(), timeout=300)
        per_node = cluster.num_workers or min(gpu_nodes)
        return Hardware(nodes=1 if cluster.num_workers else len(gpu_nodes), devices_per_node=per_node,
                        device_memory_gb=memory, cpus_per_node=_cpus_per_node(nodes, per_node, gpu=True))  # fmt: skip
    workers = cluster.num_workers or 2
    smallest = min(n["Resources"].get("memory", 0) for n in nodes) / GB
    share = cluster.gpu_memory_gb or smallest / workers
    return Hardware(nodes=1, devices_per_node=workers, device_memory_gb=share, device="cpu",
                    cpus_per_node=_cpus_per_node(nodes, workers, gpu=False))  # fmt: skip


def cpus_per_node(per_node: int, gpu: bool) -> int | None:
    """The connected cluster's CPUs for a node of ``per_node`` workers (``_cpus_per_node``)."""
    import ray

    return _cpus_per_node([n for n in ray.nodes() if n.get("Alive")], per_node, gpu)


def _cpus_per_node(nodes: list[dict[str, Any]], per_node: int, gpu: bool) -> int | None:
    """CPUs for a node of ``per_node`` workers, as Ray reports its nodes' resources. GPU workers: at the
    fewest CPUs per GPU among the GPU nodes (each worker's share then fits on every one of them); CPU
    workers: the smallest node's CPUs, as if it held them all (as their memory share is planned). None:
    no such node has a CPU."""
    if gpu:
        found = [int(r.get("CPU", 0) * per_node // r["GPU"]) for r in (n["Resources"] for n in nodes)
                 if r.get("GPU", 0) >= 1]  # fmt: skip
    else:
        found = [int(n["Resources"].get("CPU", 0)) for n in nodes]
    found = [c for c in found if c >= 1]
    return min(found) if found else None


# --- Ray Jobs: submit, status, logs, stop ---------------------------------------------------------


def _client(cfg: Config) -> Any:
    auth = authentication()  # before Ray's import: it reads the mode once
    from ray.job_submission import JobSubmissionClient

    address = cfg.cluster.address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ConfigError(
            [
                f"cluster.address: no Ray job API at {address or 'the local cluster'}: {str(e).splitlines()[0][:200]} "
                f"(authentication: {auth}; give the dashboard address, e.g. cluster.address=http://head:8265)"
            ]
        ) from None


AGENT_WAIT_S = 60.0  # a cluster that just started may not have a job agent yet


def _submit_when_an_agent_is_up(client: Any, job: dict[str, Any]) -> str:
    """``client.submit_job(**job)``; while the head answers that no job agent is up yet (a cluster
    that just started), it is asked again for up to ``AGENT_WAIT_S``."""
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return str(client.submit_job(**job))
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def submit(cfg: Config, argv: list[str], tracking_uri: str, name: str) -> int:
    """``action=submit``: the same command as a Ray job under run ``name``; prints its id and how to follow it."""
    from launcher.tracking import credential_env

    client = _client(cfg)
    keep = [a for a in argv if not a.startswith(("action=", "cluster.address=", "run.name=", "tracking.uri="))]
    # Inside the job, Ray Jobs sets $RAY_ADDRESS: the job connects to the cluster it runs on. The
    # tracking URI goes as an environment variable: the entrypoint is printed in the job's logs,
    # and a URI may carry credentials.
    args = [*keep, "action=train", f"run.name={name}", "tracking.uri=null"]
    if tracking_uri.startswith("sqlite:"):
        print(
            f"warning: tracking.uri {tracking_uri} is a file on this machine; a job on another machine cannot "
            "write it (use tracking=server tracking.uri=http://...)",
            flush=True,
        )
    job = {
        "entrypoint": "python -m launcher " + shlex.join(args),
        "runtime_env": {
            "working_dir": str(ROOT),
            "excludes": EXCLUDES,
            "env_vars": {
                "MLFLOW_TRACKING_URI": tracking_uri,  # without credentials: they follow in MLflow's variables
                **credential_env(),
                "RAY_JOB_STOP_WAIT_TIME_S": str(JOB_STOP_WAIT_S),
                "PYTHONUNBUFFERED": "1",
            },
        },
        "metadata": {"launcher_run": name, "recipe": cfg.recipe.name},
    }
    job_id = _submit_when_an_agent_is_up(client, job)
    address = client.get_address()
    follow = f"python -m launcher cluster=ray cluster.address={address} run.job_id={job_id}"
    print(
        f"submitted job {job_id} (run {name}) to {address}\n"
        f"  status: {follow} action=status\n"
        f"  logs:   {follow} action=logs      (follow live: ray job logs -f {job_id} --address {address})\n"
        f"  stop:   {follow} action=stop      (graceful: a checkpoint, then the run is marked killed)\n"
        f"  resume: submit again with run.name={name}",
        flush=True,
    )
    return 0


def job(cfg: Config) -> int:
    """``action=status|logs|stop`` for ``run.job_id``, else the newest job of ``run.name``."""
    client = _client(cfg)
    job_id = cfg.run.job_id
    if job_id is None:
        if not cfg.run.name:
            raise ConfigError([f"run.job_id: action={cfg.action} needs run.job_id or run.name"])
        mine = [j for j in client.list_jobs() if (j.metadata or {}).get("launcher_run") == cfg.run.name]
        if not mine:
            raise ConfigError([f"run.name: no job of run {cfg.run.name!r} at {client.get_address()}"])
        job_id = max(mine, key=lambda j: j.start_time or 0).submission_id
    if cfg.action == "logs":
        sys.stdout.write(client.get_job_logs(job_id))
        return 0
    if cfg.action == "stop":
        stopped = client.stop_job(job_id)
        print(f"job {job_id}: {'stop asked (SIGTERM; it checkpoints and ends)' if stopped else 'not running'}")
        return 0
    info = client.get_job_info(job_id)
    run = (info.metadata or {}).get("launcher_run", "?")
    print(f"job {job_id} (run {run}): {info.status}" + (f": {info.message}" if info.message else ""))
    return 0
