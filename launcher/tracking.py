"""MLflow tracking: the driver opens and closes the run, rank 0 logs metrics into it.

The driver creates the run before any worker starts (so config and plan are recorded even
if training never begins) and sets its final status. Inside the workers, rank 0 gets an
``MlflowTracker`` for that run id; every other rank gets a ``NullTracker``. Nothing else
checks the rank for logging.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Protocol

DEFAULT_STORE = "mlflow.db"


def resolve_uri(configured: str | None) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else SQLite in the cwd (absolute)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path.cwd() / DEFAULT_STORE}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"  # workers run elsewhere
    return uri


def mask(text: str) -> str:
    """Hide credentials in URIs (``https://user:token@host`` -> ``https://***@host``)."""
    return re.sub(r"(?<=://)[^/@\s]+@", "***@", text)


class Tracker(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_dict(self, data: dict[str, Any], name: str) -> None: ...


class NullTracker:
    """What every rank but 0 gets."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        pass


class MlflowTracker:
    """Rank 0's handle on the run the driver opened."""

    def __init__(self, uri: str, run_id: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client, self.run_id = MlflowClient(tracking_uri=uri), run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch, synchronous=True)

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        self.client.log_dict(self.run_id, data, name)


def start_run(
    uri: str, experiment: str, run_name: str, config: dict[str, Any], plan: dict[str, Any], tags: dict[str, str]
) -> str:
    """Open the run; log params (config + plan), ``config.yaml`` and ``plan.json``; return its id."""
    from mlflow.entities import Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    exp_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    params = {
        **_flatten(config),
        **{f"plan.{k}": v for k, v in plan.items() if k not in ("reasons", "memory", "deepspeed")},
    }
    items = [Param(k, mask(str(v))[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])
    client.log_batch(run_id, tags=[RunTag("plan.reasons", mask("\n".join(plan["reasons"]))[:5000])])
    client.log_dict(run_id, _masked(config), "config.yaml")
    client.log_dict(run_id, plan, "plan.json")
    return run_id


def finish_run(uri: str, run_id: str, status: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=uri).set_terminated(run_id, status)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _masked(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _masked(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_masked(v) for v in d]
    return mask(d) if isinstance(d, str) else d
