"""Launching: plan on the driver, open the MLflow run while Ray starts, run Ray Train, close up.

Locally the launcher starts an embedded Ray bound to 127.0.0.1 (no dashboard) and shuts
it down at the end, whatever happened; ``cluster=ray`` connects to an existing cluster
first, so that its hardware feeds the plan (``launcher/cluster.py``).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from launcher.config import Config, ConfigError, to_dict
from launcher.console import show_plan
from launcher.planner import (
    Hardware,
    MemoryProfile,
    Plan,
    PlanError,
    check,
    plan,
    request_from_config,
)
from launcher.tracking import (
    DEFAULT_STORE,
    MlflowTracker,
    finish_run,
    mask,
    record,
    reopen_run,
    resolve_uri,
    split_credentials,
    start_run,
)


def build_plan(cfg: Config, dataset_size: int | None) -> Plan:
    """Hardware + memory profile + request -> plan; planner errors become config errors."""
    return prepare_plan(cfg).plan(dataset_size)


@dataclass(frozen=True)
class Planning:
    """What the planner is given besides the dataset size, gathered once on the driver (``prepare_plan``)."""

    cfg: Config
    hw: Hardware
    mem: MemoryProfile
    noise: tuple[float, str] | None

    def plan(self, dataset_size: int | None, world: int | None = None) -> Plan:
        """The plan for a dataset of that many training samples (None: not counted), on the hardware
        found or on ``world`` of its devices (an elastic run's workers re-plan so). The size only
        sets the steps, so a plan without it fails exactly where one with it would."""
        hw = self.hw if world is None else self.hw.with_world(world)
        try:
            p = plan(request_from_config(self.cfg, dataset_size, self.noise), hw, self.mem)
        except PlanError as e:
            raise ConfigError(e.errors) from None
        except ValueError as e:
            raise ConfigError([str(e)]) from None
        return _check_deepspeed(p) if p.deepspeed is not None else p

    def to_dict(self) -> dict[str, Any]:
        """What the workers need to plan again (the config travels beside it): plain data."""
        return {"hardware": asdict(self.hw), "memory": asdict(self.mem), "noise": self.noise}

    @classmethod
    def from_dict(cls, cfg: Config, d: dict[str, Any]) -> Planning:
        noise = tuple(d["noise"]) if d["noise"] is not None else None
        return cls(cfg, Hardware(**d["hardware"]), MemoryProfile(**d["memory"]), noise)  # type: ignore[arg-type]


def prepare_plan(cfg: Config) -> Planning:
    """The hardware, then every planner check that needs no memory profile (``planner.check``: in
    seconds), then the noise measurement and the memory profile (a model traced, or a GPU probe)."""
    from launcher.memory import detect_hardware, memory_profile
    from recipes import RECIPES

    try:
        hw = detect_hardware(cfg.cluster)
        local = cfg.cluster.kind == "local"  # on a cluster the driver (a RayJob's head pod) has no GPUs itself
        if cfg.action == "train" and local and cfg.cluster.gpus_per_node and hw.device == "cuda":
            import torch

            if torch.cuda.device_count() < hw.devices_per_node:
                raise ValueError(
                    f"cluster.gpus_per_node: {hw.devices_per_node} GPUs described, "
                    f"{torch.cuda.device_count()} here; use action=plan to plan hardware that is not here"
                )
        check(request_from_config(cfg), hw)
        noise = _noise_measurement(cfg)
        mem = memory_profile(cfg, RECIPES[cfg.recipe.name], hw)
    except PlanError as e:
        raise ConfigError(e.errors) from None
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError([str(e)]) from None
    return Planning(cfg, hw, mem, noise)


def _noise_measurement(cfg: Config) -> tuple[float, str] | None:
    """This recipe's last measured noise scale, looked up when the plan can use it (advice, auto batch)."""
    auto = cfg.batch.global_batch == "auto_noise_scale"
    if not (auto or cfg.planner.advise or cfg.action == "plan"):
        return None
    from launcher.tracking import latest_noise_scale

    uri = resolve_uri(cfg.tracking.uri)
    try:
        return latest_noise_scale(uri, cfg.tracking.experiment, cfg.recipe.name, cfg.choices.get("scale", ""))
    except Exception as e:  # noqa: BLE001 - advice is optional; an explicit auto batch is not
        if auto:
            raise ConfigError(
                [f"batch.global_batch=auto_noise_scale: cannot read {mask(uri)}: {mask(str(e))[:200]}"]
            ) from None
        return None


def _check_deepspeed(p: Plan) -> Plan:
    """The plan with a reason saying whether DeepSpeed itself accepted its config (the plan is frozen)."""
    from launcher.engine import check_deepspeed_config

    assert p.deepspeed is not None
    try:
        errors = check_deepspeed_config(p.deepspeed, p.world_size)
    except ImportError:
        return p.with_reasons(
            "DeepSpeed config NOT validated: deepspeed is not installed (pip install -e '.[deepspeed]')"
        )
    if errors:
        raise ConfigError(errors)
    return p.with_reasons(f"DeepSpeed config validated by DeepSpeed's own DeepSpeedConfig for {p.world_size} ranks")


def train(cfg: Config, timings: dict[str, float]) -> int:
    """``action=train`` and ``action=lr_find``: returns the process exit code."""
    from launcher import cluster

    out = Path(cfg.run.output_dir).resolve()
    uri = _tracking_uri(cfg, out)
    local = cfg.cluster.kind == "local"
    storage = str(out / "ray") if local else str(cfg.cluster.storage_path)
    if not local:  # connect first: the cluster's GPUs and their memory feed the plan
        cluster.connect(cfg.cluster, verbose=cfg.run.verbose)
        timings["connect_done_at"] = time.time()
    try:
        return _train(cfg, timings, out, uri, storage)
    finally:
        cluster.stop(out / "logs")  # a no-op once _train has stopped Ray


def _train(cfg: Config, timings: dict[str, float], out: Path, uri: str, storage: str) -> int:
    """Data, plan and MLflow run on the driver; then Ray Train; the run's status from how it ended."""
    from launcher import weights
    from launcher.data import size
    from recipes import RECIPES

    resume = _find_resume(cfg, uri, storage)
    if resume is not None and resume.plan is not None:  # the sample position needs the same global batch
        cfg.batch.global_batch, cfg.batch.scale_with_world = resume.plan["global_batch"], False
    # A weights file that is missing or does not fit, in a second (the model on the meta device); the
    # workers then read it once, when they build their model
    weights.check(cfg, RECIPES[cfg.recipe.name].build_model)
    # Every planner error before any data is built (a tokenizer trained, images drawn): the dataset
    # size only sets the steps, so the plan without it fails wherever the final one would
    planning = prepare_plan(cfg)
    first = planning.plan(None)
    refuse_unsupported(cfg, first, resume)
    elastic = _elastic(cfg, planning, first, resume) if cfg.cluster.min_workers is not None else None
    timings["plan_done_at"] = time.time()
    # derived data (tokenizer, indexes): shared by the nodes when the storage is a shared path
    cache = out / "cache" if cfg.cluster.kind == "local" or "://" in storage else Path(storage) / "cache"
    data = RECIPES[cfg.recipe.name].build_data(cfg, cache)  # bad data fails here, before training starts
    p = planning.plan(size(data.train))  # the steps on this dataset (train.max_epochs, the reference's epochs)
    timings["data_done_at"] = time.time()
    if resume is not None:
        p = p.with_notes(resume.explain(p))
    if elastic is not None:
        p = p.with_notes(elastic)
    show_plan(p)
    if resume is not None and resume.step >= p.max_steps:
        print(
            f"run {resume.name} already reached step {resume.step} of {p.max_steps}: nothing to train. "
            "Raise train.max_steps to continue it, or run.resume=false to start it over",
            flush=True,
        )
        return 0
    name = run_name(cfg)
    for root in (storage, out / "logs"):  # the run's folders checked before its MLflow run is opened
        run_path(root, name, "")
    run_id = _open_run_while_ray_starts(cfg, uri, p, name, resume, out, timings)
    payload = {"run_id": run_id, "tracking_uri": uri, "cache_dir": str(cache),
               "run_root": run_path(storage, name, run_id),  # the run's folder in the storage
               "planning": planning.to_dict(), "dataset_size": size(data.train),  # to plan again in the workers
               "niceness": os.nice(0)}  # the launcher's: a worker below it says so
    return _launch(cfg, p, out, storage, name, timings, payload)


def _open_run_while_ray_starts(
    cfg: Config, uri: str, p: Plan, name: str, resume: Resume | None, out: Path, timings: dict[str, float]
) -> str:
    """The MLflow run opens in a thread while the embedded Ray starts (seconds each; they overlap where
    cores are free, not on 2 busy ones); each is stamped when it is done. Either failing undoes the
    other: the run is closed, Ray stopped."""
    from launcher import cluster

    local = cfg.cluster.kind == "local"
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-open") as pool:
        opening = pool.submit(lambda: (_open_run(cfg, uri, p, name, resume), time.time()))
        try:
            if local:  # a warm Ray the user started here, else an embedded one
                cpus, gpus = p.world_size * p.cpus.cpus_per_worker, p.world_size if p.device == "cuda" else 0
                if not cluster.warm_local(cpus, gpus, verbose=cfg.run.verbose):
                    cluster.start_local(cpus, verbose=cfg.run.verbose)
                timings["ray_done_at"] = time.time()
            run_id, timings["tracking_done_at"] = opening.result()
        except BaseException as e:
            cluster.stop(out / "logs" / f"{name}-not-launched")
            with contextlib.suppress(Exception):  # the run, if it opened, is closed; the first error is reported
                opened = opening.result()[0]
                status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
                finish_run(uri, opened, status, None, out / "spool" / f"{opened}.json")
            raise
    return run_id


def _open_run(cfg: Config, uri: str, p: Plan, name: str, resume: Resume | None) -> str:
    """The MLflow run: a new one, or the resumed run reopened; its id."""
    try:
        if resume is not None:
            reopen_run(uri, resume.run_id, p.to_dict(), resume.step)
            run_id = resume.run_id
        else:
            tags = {"recipe": cfg.recipe.name, "scale": cfg.choices.get("scale", ""),
                    "world_size": str(p.world_size), "action": cfg.action}
            run_id = start_run(uri, cfg.tracking.experiment, name, to_dict(cfg), p.to_dict(), tags=tags)
    except Exception as e:  # noqa: BLE001 - any tracking failure: say where and how to fix
        raise ConfigError(
            [
                f"tracking.uri: cannot open an MLflow run at {mask(uri)}: {mask(str(e))[:300]} "
                "(start the server, fix tracking.uri, or unset MLFLOW_TRACKING_URI)"
            ]
        ) from None
    verb = f"continuing run {name}" if resume is not None else f"run {name}"
    print(f"mlflow: {verb} ({run_id}) in {mask(uri)}", flush=True)
    return run_id


def _launch(
    cfg: Config, p: Plan, out: Path, storage: str, name: str, timings: dict[str, float], payload: dict[str, Any]
) -> int:
    """Ray (embedded, already started, or connected): the run's control actor, Ray Train; rank 0's metrics sent to
    MLflow as they come (``tracking.record``); the MLflow run and an embedded Ray closed whatever happens."""
    import ray
    from ray.util.client import ray as ray_client

    from launcher import cluster, console, control

    run_id, uri = payload["run_id"], payload["tracking_uri"]
    run_dir, logs = _run_dir(name, run_id), Path(run_path(out / "logs", name, run_id))
    status, kept = "FAILED", list[dict[str, Any]]()  # kept: what the tracker could not send (an outage)
    tracker: MlflowTracker | None = None
    closed = False
    try:
        tracker = MlflowTracker(uri, run_id, kept.append, lambda line: print(line, flush=True),
                                cfg.tracking.system_metrics_s)  # fmt: skip
        # the driver's node: rank 0 on it has its system figures sampled here (a Ray Client driver is on no node)
        here = None if ray_client.is_connected() else ray.get_runtime_context().get_node_id()
        payload["driver_node"] = here
        actor = control.create(run_id)
        # after ray.init, which sets its own SIGTERM handler; the console shows what rank 0 reports
        with _graceful_stop(actor) as stop, console.follow(actor, p.world_size, partial(record, tracker, here)):
            result = _fit(cfg, p, storage, run_dir, timings, payload)
        if result.error is not None:
            print(failure_report(str(result.error)), flush=True)
        elif stop.asked:
            status = "KILLED"
            print(f"stopped as asked; resume with run.name={name}", flush=True)
        else:
            status = "FINISHED"
        if status != "FAILED":  # an outage's backlog waited for (30 s; a signal cuts it short, the status stays)
            tracker.close()
            closed = True
        if status == "FINISHED" and cfg.action == "lr_find":
            from mlflow.tracking import MlflowClient

            metrics = MlflowClient(tracking_uri=uri).get_run(run_id).data.metrics
            print(lr_find_summary(metrics, p, cfg), flush=True)
    except Exception as e:  # noqa: BLE001 - Ray raises its own wrapper; the run is marked failed
        report = f"{type(e).__name__}: {e}"
        print(failure_report(report), flush=True)
    except KeyboardInterrupt:
        status = "KILLED" if status == "FAILED" else status  # training that ended keeps its status
        raise
    finally:
        if tracker is not None and not closed:
            tracker.close(patience_s=0)  # after a failure or a signal, one more try; what is left goes to finish_run
        ray_logs = cluster.stop(logs)
        finish_run(uri, run_id, status, kept[0] if kept else None, out / "spool" / f"{run_id}.json")
    if status == "FAILED" and ray_logs is not None:  # the workers' own output is not on the console (run.verbose)
        print(f"Ray's and the workers' logs: {ray_logs}/", flush=True)
    print(f"mlflow: run {run_id} {status.lower()}; see it with `make mlflow-ui`", flush=True)
    return {"FINISHED": 0, "KILLED": 130}.get(status, 1)


def submit(cfg: Config, argv: list[str]) -> int:
    """``action=submit``: the tracking server is checked here, in seconds, before the job is sent."""
    from launcher import cluster

    return cluster.submit(cfg, argv, _tracking_uri(cfg, Path(cfg.run.output_dir).resolve()), run_name(cfg))


def run_name(cfg: Config) -> str:
    """``run.name``, else ``<recipe>-<scale>[-lr_find]-<time>``: the MLflow run's name, and the key that resumes it."""
    kind = "-lr_find" if cfg.action == "lr_find" else ""
    return cfg.run.name or f"{cfg.recipe.name}-{cfg.choices.get('scale', 'full')}{kind}-{datetime.now():%Y%m%d-%H%M%S}"


def _run_dir(name: str, run_id: str) -> str:
    """The run's folder in the storage (and under ``logs/``): name and MLflow run id, so names never mix runs."""
    return f"{name}-{run_id[:8]}"


def run_path(root: str | Path, name: str, run_id: str) -> str:
    """``root/<run dir>``, refused (``ConfigError`` naming ``run.name``) unless it stays inside ``root``.

    ``config.validate`` already allows only plain folder names; this holds for any caller. A URI root
    (``s3://...``) is checked on its normalized path, a local one after resolving its links; the path
    returned is the unresolved ``root/<run dir>``."""
    rel = _run_dir(name, run_id)
    root_s = str(root).rstrip("/")
    if "://" in root_s:
        rest = "/" + root_s.partition("://")[2]
        inside = posixpath.normpath(f"{rest}/{rel}").startswith(posixpath.normpath(rest).rstrip("/") + "/")
    else:
        base = Path(root_s or "/").resolve()
        resolved = (base / rel).resolve()
        inside = resolved.is_relative_to(base) and resolved != base
    if not inside or "/" in rel:
        raise ConfigError([f"run.name: the run folder {rel!r} would leave {mask(root_s)!r}; choose a plain name"])
    return f"{root_s}/{rel}"  # as given: the workers resolve it on their own nodes


def refuse_unsupported(cfg: Config, p: Plan, resume: Resume | None) -> None:
    """What the plan allows but this launcher cannot train yet; refused before anything runs."""
    if p.engine == "deepspeed" and p.zero_stage == 3:
        raise ConfigError(
            [
                "engine.zero_stage: stage 3 (parameters partitioned) is planned and its DeepSpeed config checked "
                "(action=plan), but the launcher's checkpoints do not gather partitioned parameters yet; "
                "train with engine.zero_stage=2 (or 1)"
            ]
        )
    if cfg.train.measure_noise_scale and (p.world_size < 2 or p.engine == "deepspeed"):
        raise ConfigError(
            [
                "train.measure_noise_scale: needs engine=ddp with 2 or more data-parallel workers (it compares "
                "one worker's gradient with the all-reduced one); set cluster.num_workers >= 2"
            ]
        )
    if p.engine == "deepspeed" and p.global_batch != p.target_global_batch:
        raise ConfigError(
            [
                f"cluster.num_workers: engine=deepspeed requires micro x accumulation x world = train_batch_size, "
                f"and global batch {p.target_global_batch} is not that on {p.world_size} workers (nearest "
                f"{p.global_batch}); use a world size that divides it, a global batch divisible by {p.world_size} "
                "(batch.global_batch), or engine=ddp, which keeps it with shares differing by one sample"
                + (f" (run {resume.name} was saved at global batch {p.target_global_batch})" if resume else "")
            ]
        )
    if resume is not None and resume.plan is not None and p.engine == "deepspeed":
        saved = resume.plan["world_size"]
        if resume.plan.get("engine") == "deepspeed" and saved != p.world_size:
            from launcher.checkpoint import shard_world_refusal

            raise ConfigError([f"{shard_world_refusal(saved, p.world_size)} (run {resume.name})"])


def _elastic(cfg: Config, planning: Planning, top: Plan, resume: Resume | None) -> str:
    """An elastic run (``cluster.min_workers``) planned, and refused or accepted, at every world size it
    may train on, before anything runs; the plan's note on what changes with the world and what does not."""
    low, high = cfg.cluster.min_workers or 1, top.world_size
    if low > high:
        raise ConfigError([f"cluster.min_workers: got {low}, above the {high} workers planned (cluster.num_workers)"])
    splits = []
    for world in range(low, high + 1):
        try:
            p = top if world == high else planning.plan(None, world)
            refuse_unsupported(cfg, p, resume)
        except ConfigError as e:
            raise ConfigError([f"{err} (at {world} workers: cluster.min_workers={low} allows {low} to {high})"
                               for err in e.errors]) from None
        splits.append(f"{world}: {p.micro_batch} x {p.grad_accum}")
    return (
        f"elastic: {low} to {high} workers (cluster.min_workers..num_workers); at each (re)start the workers "
        f"re-plan for the world they have. Micro-batch x accumulation by world size: {', '.join(splits)}. "
        f"Global batch {top.global_batch}, lr schedule, steps and sample stream are the same at every size"
    )


def _tracking_uri(cfg: Config, out: Path) -> str:
    """The tracking URI, checked within seconds; an unreachable server is an error unless not required."""
    from launcher.tracking import check_reachable

    uri, credentials = split_credentials(resolve_uri(cfg.tracking.uri))
    # the credentials go to MLflow's own variables: the driver's client and the workers (their
    # process environment) read them there; the URI itself, in the config, the payload and the
    # MLflow params, no longer has them
    os.environ.update(credentials)
    if cfg.tracking.uri and credentials:
        cfg.tracking.uri = uri
    if "MLFLOW_TRACKING_URI" in os.environ:
        os.environ["MLFLOW_TRACKING_URI"] = split_credentials(os.environ["MLFLOW_TRACKING_URI"])[0]
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"  # MLflow's "View run at <uri>" shows credentials
    problem = check_reachable(uri)
    if problem is None:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        return uri
    if cfg.tracking.required:
        raise ConfigError(
            [
                f"tracking.uri: no MLflow server answers at {mask(uri)} ({mask(problem)}); start it "
                "(mlflow server --host 127.0.0.1 --port 5000), fix tracking.uri or $MLFLOW_TRACKING_URI, "
                "or set tracking.required=false to train and log to a local store"
            ]
        )
    local = f"sqlite:///{out / DEFAULT_STORE}"
    out.mkdir(parents=True, exist_ok=True)
    print(f"warning: tracking: {mask(uri)} unreachable ({mask(problem)}); logging to {local} instead", flush=True)
    return local


@dataclass
class Resume:
    """An earlier run of the same ``run.name`` to continue: its MLflow run and checkpoints."""

    run_id: str
    name: str
    step: int
    plan: dict[str, Any] | None  # the plan the newest readable checkpoint was written under

    def explain(self, p: Plan) -> str:
        """The resume, and what changed in the plan since the checkpoint, with why."""
        if self.plan is None:
            return f"resume: run {self.name} has no checkpoint yet; it starts again from step 0 in the same MLflow run"
        old = self.plan
        kept = old["global_batch"] == p.global_batch
        text = f"resume: run {self.name} from step {self.step}; " + (
            f"global batch {p.global_batch} kept, so the sample position stays valid" if kept
            else f"global batch {old['global_batch']} -> {p.global_batch}: the sample position moves"
        )
        if (old["world_size"], old["micro_batch"], old["grad_accum"]) != (p.world_size, p.micro_batch, p.grad_accum):
            uneven = p.micro_batch * p.grad_accum * p.world_size != p.global_batch
            text += (
                f"; world size {old['world_size']} -> {p.world_size}, so micro-batch x accumulation "
                f"{old['micro_batch']} x {old['grad_accum']} -> {p.micro_batch} x {p.grad_accum} "
                + ("(at most; shares differing by one sample) " if uneven else "")
                + "(the same samples per step, split over the workers there are now)"
            )
        changed = [f"{k} {_shown(old[k])} -> {_shown(getattr(p, k))}" for k in Resume.HYPER
                   if old.get(k) is not None and old[k] != getattr(p, k)]
        if changed:
            text += "; changed by this config, and applied over the checkpoint's optimizer and schedule: " + \
                ", ".join(changed)
        else:
            text += "; lr schedule unchanged"
        return text

    # what the plan sets in the optimizer and the lr schedule; the workers re-apply it after the restore
    HYPER = ("lr", "weight_decay", "optimizer", "schedule", "warmup_steps", "max_steps", "milestones")


def _shown(value: Any) -> str:
    """A plan value in a resume note: numbers as %g, others as they are."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def _find_resume(cfg: Config, uri: str, storage: str) -> Resume | None:
    """With ``run.name`` set and ``run.resume`` true: the newest earlier training run of that name, if any."""
    if not cfg.run.name or not cfg.run.resume or cfg.action != "train":
        return None
    from launcher import checkpoint
    from launcher.tracking import find_run

    try:
        found = find_run(uri, cfg.tracking.experiment, cfg.run.name)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(
            [f"tracking.uri: cannot look up run.name={cfg.run.name} at {mask(uri)}: {mask(str(e))}"]
        ) from None
    if found is None:
        return None
    run_id, recipe = found
    if recipe != cfg.recipe.name:
        raise ConfigError(
            [
                f"run.name: run {cfg.run.name} ({run_id[:8]}) trained recipe {recipe!r}, not {cfg.recipe.name!r}; "
                "choose another run.name, or run.resume=false to start a new run under this name"
            ]
        )
    dirs = checkpoint.candidates(run_path(storage, cfg.run.name, run_id), warn=lambda _m: None)
    metas = [m for m in map(checkpoint.meta, dirs) if m is not None]  # the workers warn about skipped ones
    newest = metas[0] if metas else None
    return Resume(
        run_id=run_id,
        name=cfg.run.name,
        step=int(newest["step"]) if newest else 0,
        plan=newest["plan"] if newest else None,
    )


@dataclass
class _Stop:
    asked: bool = False


@contextlib.contextmanager
def _graceful_stop(actor: Any) -> Iterator[_Stop]:
    """SIGINT / SIGTERM once: ask rank 0, through the run's control actor, to checkpoint and stop.
    A second one: stop at once (KeyboardInterrupt), keeping the last periodic checkpoint."""
    stop = _Stop()

    def ask(signum: int, _frame: Any) -> None:
        if stop.asked:
            raise KeyboardInterrupt
        stop.asked = True
        threading.Thread(target=actor.ask_stop.remote, daemon=True).start()  # no Ray call inside a handler
        print(
            f"\n{signal.Signals(signum).name}: stopping after the current step with a checkpoint "
            "(send it again to stop at once)",
            flush=True,
        )

    previous = {s: signal.signal(s, ask) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def lr_find_summary(found: dict[str, float], p: Plan, cfg: Config) -> str:
    """What ``action=lr_find`` found, and the command line that uses it."""
    steepest, low = found["lr_find_steepest_lr"], found["lr_find_min_loss_lr"]
    diverged = found.get("lr_find_diverged_lr")
    scale = cfg.choices.get("scale", "full")
    lines = [
        f"lr_find: {int(found['lr_find_steps'])} steps at global batch {p.global_batch} (planned lr {p.lr:.3g})",
        f"  steepest descent   lr {steepest:.3g}   <- suggested",
        f"  lowest loss        lr {low:.3g}",
        f"  diverges           lr {diverged:.3g}" if diverged else "  diverges           not within lr_find.max_lr",
        "curve: lr_find/curve.png and lr_find/curve.csv in the MLflow run",
        f"use it: python -m launcher recipe={cfg.choices.get('recipe', cfg.recipe.name)} scale={scale} "
        f"batch.global_batch={p.global_batch} optim.lr={steepest:.3g}",
    ]
    return "\n".join(lines)


def failure_report(report: str) -> str:
    """What the console shows of a failed training: the whole error, then its root cause, masked (and a
    hint where the cause is known to mislead: ``cluster.failure_hint``)."""
    from launcher.cluster import failure_hint

    hint = failure_hint(report)
    return f"{mask(report)}\n\ntraining failed: {root_cause(report)}" + (f"\n{hint}" if hint else "")


def root_cause(report: str) -> str:
    """The last ``Type: message`` line of a (Ray-wrapped) traceback: what went wrong, in one line,
    credentials in URIs masked."""
    report = mask(report)
    found = re.findall(
        r"^(?:\x1b\[[0-9;]*m|\(\w+ pid=\d+\) )*([A-Za-z_][\w.]*(?:Error|Exception|Image)): (.+)$",
        report,
        flags=re.MULTILINE,
    )
    causes = [f"{kind.rpartition('.')[2]}: {msg.strip()}" for kind, msg in found if kind != "WorkerGroupError"]
    return causes[-1] if causes else report.strip().splitlines()[0]


def _fit(cfg: Config, p: Plan, storage: str, run_dir: str, timings: dict[str, float], payload: dict) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from launcher.worker import train_loop

    use_gpu = p.device == "cuda"
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": to_dict(cfg), "plan": p.to_dict(), "timings": timings, **payload},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(  # type: ignore[call-arg]  # mypy sees Ray Train v1's ScalingConfig
            # elastic: Ray Train starts as many as there is room for (at least min_workers), restarts
            # smaller after a loss, and larger when it finds room every resize_interval_s
            num_workers=(cfg.cluster.min_workers, p.world_size) if cfg.cluster.min_workers else p.world_size,  # type: ignore[arg-type]
            elastic_resize_monitor_interval_s=cfg.cluster.resize_interval_s,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": p.cpus.cpus_per_worker},  # the plan's CPU budget (planner.cpu_budget)
        ),
        run_config=RunConfig(  # type: ignore[call-arg]  # mypy sees Ray Train v1's RunConfig
            name=run_dir,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # a failed worker group restarts from the latest reported checkpoint (data position included)
            failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
            # Ray Train's per-report and per-checkpoint INFO lines stay in its log files; the driver's
            # console shows rank 0's progress instead (launcher/console.py)
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    # Ray Train's own Ctrl-C handler aborts the workers at once, without a checkpoint; the
    # launcher's (_graceful_stop) asks them to checkpoint first, so Ray's is not installed.
    trainer._register_sigint_handler = lambda _controller: None  # type: ignore[attr-defined]
    return trainer.fit()
