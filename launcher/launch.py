"""Launching: plan on the driver, open the MLflow run, start Ray, run Ray Train, close up.

Locally the launcher starts an embedded Ray bound to 127.0.0.1 (no dashboard) and shuts
it down at the end, whatever happened.
"""

from __future__ import annotations

import logging
import os
import re
import time
from datetime import datetime
from pathlib import Path

from launcher.config import Config, ConfigError, to_dict
from launcher.planner import Plan, PlanError, describe, plan, request_from_config
from launcher.tracking import finish_run, mask, resolve_uri, start_run


def build_plan(cfg: Config, dataset_size: int | None) -> Plan:
    """Hardware + memory profile + request -> plan; planner errors become config errors."""
    from launcher.memory import detect_hardware, memory_profile
    from recipes import RECIPES

    try:
        hw = detect_hardware(cfg.cluster)
        if cfg.action == "train" and cfg.cluster.gpus_per_node and hw.device == "cuda":
            import torch

            if torch.cuda.device_count() < hw.devices_per_node:
                raise ValueError(
                    f"cluster.gpus_per_node: {hw.devices_per_node} GPUs described, "
                    f"{torch.cuda.device_count()} here; use action=plan to plan hardware that is not here"
                )
        p = plan(request_from_config(cfg, dataset_size), hw, memory_profile(cfg, RECIPES[cfg.recipe.name], hw))
    except PlanError as e:
        raise ConfigError(e.errors) from None
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError([str(e)]) from None
    if p.deepspeed is not None:
        _check_deepspeed(p)
    return p


def _check_deepspeed(p: Plan) -> None:
    from launcher.engine import check_deepspeed_config

    assert p.deepspeed is not None
    try:
        errors = check_deepspeed_config(p.deepspeed, p.world_size)
    except ImportError:
        p.reasons.append("DeepSpeed config NOT validated: deepspeed is not installed (pip install -e '.[deepspeed]')")
        return
    if errors:
        raise ConfigError(errors)
    p.reasons.append(f"DeepSpeed config validated by DeepSpeed's own DeepSpeedConfig for {p.world_size} ranks")


def train(cfg: Config, timings: dict[str, float]) -> int:
    """``action=train``: returns the process exit code."""
    from recipes import RECIPES

    if cfg.engine.name == "deepspeed":
        raise ConfigError(
            [
                "engine=deepspeed: training under DeepSpeed is not wired into the loop yet; "
                "action=plan prints (and validates) the DeepSpeed config it would use. Train with engine=ddp"
            ]
        )
    t0 = time.perf_counter()
    out = Path(cfg.run.output_dir).resolve()
    cache = out / "cache"
    data = RECIPES[cfg.recipe.name].build_data(cfg, cache)  # bad data fails here, before Ray
    timings["data_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    p = build_plan(cfg, len(data.train))
    timings["plan_s"] = time.perf_counter() - t0
    print(describe(p), flush=True)

    uri = resolve_uri(cfg.tracking.uri)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    name = cfg.run.name or f"{cfg.recipe.name}-{cfg.choices.get('scale', 'full')}-{datetime.now():%Y%m%d-%H%M%S}"
    config_dict = to_dict(cfg)
    try:
        run_id = start_run(
            uri,
            cfg.tracking.experiment,
            name,
            config_dict,
            p.to_dict(),
            tags={"recipe": cfg.recipe.name, "scale": cfg.choices.get("scale", ""), "world_size": str(p.world_size)},
        )
    except Exception as e:  # noqa: BLE001 - any tracking failure: say where and how to fix
        raise ConfigError(
            [
                f"tracking.uri: cannot open an MLflow run at {mask(uri)}: {mask(str(e))[:300]} "
                "(start the server, fix tracking.uri, or unset MLFLOW_TRACKING_URI)"
            ]
        ) from None
    print(f"mlflow: run {name} ({run_id}) in {mask(uri)}", flush=True)

    status = "FAILED"
    try:
        t0 = time.perf_counter()
        import ray

        ray.init(
            address="local",
            num_cpus=max(os.cpu_count() or 2, p.world_size * cfg.cluster.cpus_per_worker),
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
            logging_level=logging.WARNING,
            configure_logging=True,
        )
        timings["ray_start_s"] = time.perf_counter() - t0
        result = _fit(cfg, p, uri, run_id, name, out, timings)
        status = "FINISHED" if result.error is None else "FAILED"
        if result.error is not None:
            print(f"{result.error}\n\ntraining failed: {root_cause(str(result.error))}", flush=True)
    except Exception as e:  # noqa: BLE001 - Ray raises its own wrapper; the run is marked failed
        print(f"{type(e).__name__}: {e}\n\ntraining failed: {root_cause(f'{type(e).__name__}: {e}')}", flush=True)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        finish_run(uri, run_id, status)
        import ray

        if ray.is_initialized():
            ray.shutdown()
    print(f"mlflow: run {run_id} {status.lower()}; see it with `make mlflow-ui`", flush=True)
    return 0 if status == "FINISHED" else 1


def root_cause(report: str) -> str:
    """The last ``Type: message`` line of a (Ray-wrapped) traceback: what went wrong, in one line."""
    found = re.findall(
        r"^(?:\x1b\[[0-9;]*m|\(\w+ pid=\d+\) )*([A-Za-z_][\w.]*(?:Error|Exception|Image)): (.+)$",
        report,
        flags=re.MULTILINE,
    )
    causes = [f"{kind.rpartition('.')[2]}: {msg.strip()}" for kind, msg in found if kind != "WorkerGroupError"]
    return causes[-1] if causes else report.strip().splitlines()[0]


def _fit(  # type: ignore[no-untyped-def]
    cfg: Config, p: Plan, uri: str, run_id: str, name: str, out: Path, timings: dict[str, float]
):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from launcher.worker import train_loop

    use_gpu = _uses_gpu(cfg)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "config": to_dict(cfg),
            "plan": p.to_dict(),
            "run_id": run_id,
            "tracking_uri": uri,
            "cache_dir": str(out / "cache"),
            "timings": timings,
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=p.world_size, use_gpu=use_gpu, resources_per_worker={"CPU": cfg.cluster.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=f"{name}-{run_id[:8]}",
            storage_path=str(out / "ray"),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=0),
        ),
    )
    return trainer.fit()


def _uses_gpu(cfg: Config) -> bool:
    import torch

    return cfg.cluster.use_gpu is True or (cfg.cluster.use_gpu == "auto" and torch.cuda.is_available())
