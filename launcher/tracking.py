"""MLflow tracking on the driver: it opens the run, logs what rank 0 reports, closes the run.

The driver creates the run before any worker starts (so config and plan are recorded even
if training never begins) and sets its final status. Rank 0's tracker (``PostTracker``) sends each
log step's metrics and each record to the driver through the run's control actor
(``launcher/control.py``), beside the console's lines; the driver's ``MlflowTracker`` sends them to
MLflow (``record``). No worker imports MLflow to train: that took rank 0 about 1.5 s of CPU before
its first step. Every other rank gets a ``NullTracker``. Nothing else checks the rank for logging.

A tracking server that goes away mid-run does not stop training: ``MlflowTracker`` keeps
what it could not send, retries every ``RETRY_S`` seconds without holding up the console, and
sends the backlog when the server is back. What is still unsent when training ends is sent by
``finish_run`` or, if the server is still away, written to a spool file, and the console says
where. Only an outage is waited out (no connection, a timeout, HTTP 5xx or 429): a metric key the
server rejects is named once and its values dropped, the rest still sent; a run deleted on the
server is reported once and no longer written to.

The run also gets rank 0's node's CPU, memory, disk, network and (with ``nvidia-ml-py`` and an
NVIDIA GPU) GPU figures as ``system/...`` metrics, from MLflow's own monitor (``SystemMetrics``),
every ``tracking.system_metrics_s`` seconds: sampled by the driver while rank 0 runs on the
driver's node (always, on ``cluster=local``), else by rank 0 on its own node.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any, Protocol

DEFAULT_STORE = "mlflow.db"
RETRY_S = 5.0  # between attempts to reach a server that went away
REACH_TIMEOUT_S = 5.0  # the launch-time reachability check


def resolve_uri(configured: str | None) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else SQLite in the cwd (absolute)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path.cwd() / DEFAULT_STORE}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"  # workers run elsewhere
    return uri


# the user-info part of a URI (``user:token@`` after ``://``), up to the last ``@`` before the host
_CREDENTIALS = re.compile(r"(?<=://)[^/\s]+@")


def mask(text: str) -> str:
    """Hide credentials in URIs anywhere in a text (``https://user:token@host`` -> ``https://***@host``)."""
    return _CREDENTIALS.sub("***@", text)


def strip_credentials(uri: str) -> str:
    """A URI without its credentials (``https://user:token@host`` -> ``https://host``)."""
    return _CREDENTIALS.sub("", uri)


# MLflow's own variables for a server's credentials; the launcher's workers get them in their
# process environment, never in the Ray payload, a log line or an MLflow param
CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def split_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """(the URI without credentials, MLflow's credential variables from them).

    ``https://user:password@host`` gives basic auth (``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD``),
    ``https://token@host`` a bearer token (``MLFLOW_TRACKING_TOKEN``); both percent-decoded.
    """
    from urllib.parse import unquote

    found = _CREDENTIALS.search(uri)
    if found is None:
        return uri, {}
    user, colon, password = found.group(0)[:-1].partition(":")
    if colon:
        env = {"MLFLOW_TRACKING_USERNAME": unquote(user), "MLFLOW_TRACKING_PASSWORD": unquote(password)}
    else:
        env = {"MLFLOW_TRACKING_TOKEN": unquote(user)}
    return strip_credentials(uri), env


def credential_env() -> dict[str, str]:
    """The MLflow credential variables set in this process (what a cluster's workers must get)."""
    return {k: os.environ[k] for k in CREDENTIAL_VARS if k in os.environ}


def quick_requests() -> None:
    """MLflow's requests in this process: no blocking retries, 5 s each (the tracker's backlog, or nothing,
    retries instead). Its defaults, 7 retries with backoff and 120 s, would hold a run's end for minutes."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "5"


class Tracker(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_dict(self, data: dict[str, Any], name: str) -> None: ...
    def close(self, patience_s: float = 30.0) -> None: ...


class NullTracker:
    """What every rank but 0 gets."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        pass

    def close(self, patience_s: float = 30.0) -> None:
        pass


class SystemMetrics:
    """This node's ``system/...`` figures in the run, sampled by MLflow's own monitor; best effort, never raises.

    MLflow's ``SystemMetricsMonitor`` (a daemon thread with its own client) logs, every
    ``interval_s``, the mean of its samples as one step of ``system/cpu_utilization_percentage``,
    ``system/system_memory_usage_megabytes`` and ``_percentage``, disk, network and, where
    ``nvidia-ml-py`` finds NVIDIA GPUs, ``system/gpu_<i>_utilization_percentage`` and
    ``_memory_usage_megabytes`` for each GPU of the node. It stops by itself at its first failed
    request or once the run is no longer RUNNING; ``start`` after an outage begins a new one, whose
    steps continue the old one's (``resume_logging``). MLflow's ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``,
    when set, wins over ``interval_s`` (MLflow reads it).
    """

    def __init__(self, uri: str, run_id: str, interval_s: float) -> None:
        import psutil

        psutil.cpu_percent()  # psutil's first reading is always 0.0: this one starts the first sample's clock
        # its warnings (a failed request, with the whole urllib3 error) would repeat the tracker's outage line
        logging.getLogger("mlflow.system_metrics").setLevel(logging.CRITICAL)
        self.uri, self.run_id, self.interval_s = uri, run_id, interval_s
        self.monitor: Any = None

    def start(self) -> None:
        """Start sampling, unless it runs already."""
        if self.monitor is not None:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(
                self.run_id, sampling_interval=self.interval_s, resume_logging=True, tracking_uri=self.uri
            )
            self.monitor.start()
        except Exception:  # noqa: BLE001 - system figures are not worth a failed run
            self.monitor = None

    def stop(self, last: bool = False) -> None:
        """Stop sampling; ``last``: log what was sampled since the last step (a short run's only figures)."""
        monitor, self.monitor = self.monitor, None
        if monitor is None:
            return
        with suppress(Exception):
            monitor.finish()  # joins its thread: at most one request (MLFLOW_HTTP_REQUEST_TIMEOUT) away
            if last:
                monitor.collect_metrics()
                monitor.publish_metrics(monitor.aggregate_metrics())
                monitor.mlflow_logger.flush()


class PostTracker:
    """Rank 0's tracker: metrics and records go to the driver (``post``: an event to the run's control actor,
    sent without waiting), whose ``MlflowTracker`` sends them on (``record``). ``node`` is rank 0's Ray node;
    ``system`` samples it when the driver is elsewhere (None when the driver samples it, or no sampling):
    started with the first metrics (importing MLflow then, on that node only), it is not started again
    after it stopped at a failed request (the driver knows of outages, this node does not)."""

    def __init__(self, post: Callable[[dict[str, Any]], None], node: str, system: SystemMetrics | None) -> None:
        self.post, self.node, self.system = post, node, system

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.system is not None:
            self.system.start()
        values = {k: float(v) for k, v in metrics.items()}
        self.post({"metrics": values, "step": step, "at": int(time.time() * 1000), "node": self.node})

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        self.post({"dict": data, "name": name})

    def close(self, patience_s: float = 30.0) -> None:
        """The driver sends what was posted; only this node's sampling ends here."""
        if self.system is not None:
            self.system.stop(last=True)


def record(tracker: MlflowTracker, node: str | None, event: dict[str, Any]) -> bool:
    """On the driver (on ``node``; None: on no node of the cluster, a Ray Client): a ``PostTracker``'s event sent
    to MLflow; False for any other event."""
    if "metrics" in event:
        tracker.samples_here = event["node"] == node  # rank 0 on this node: its system figures sampled here
        tracker.log_metrics(event["metrics"], event["step"], event["at"])
    elif "dict" in event:
        tracker.log_dict(event["dict"], event["name"])
    else:
        return False
    return True


class MlflowTracker:
    """The driver's handle on the run it opened, for what rank 0 reports; survives a tracking server outage.

    What no retry fixes (``_transient`` says which errors are worth waiting out) is not kept:
    a metric key the server rejects is reported once and its values dropped (the rest of the
    batch is still sent), and a run that can no longer be written (deleted on the server) is
    reported once and left alone.
    """

    def __init__(
        self,
        uri: str,
        run_id: str,
        keep: Callable[[dict[str, Any]], None],
        say: Callable[[str], None] = print,
        system_metrics_s: float = 0.0,
    ) -> None:
        from mlflow.tracking import MlflowClient

        quick_requests()  # the backlog retries
        self.client, self.run_id, self.uri = MlflowClient(tracking_uri=uri), run_id, uri
        self.keep, self.say = keep, say
        self.pending: list[tuple[str, float, int, int]] = []  # (key, value, timestamp ms, step)
        self.pending_dicts: list[tuple[dict[str, Any], str]] = []
        self.down_since: float | None = None
        self.next_try = 0.0
        self.refused: dict[str, int] = {}  # metric keys the server rejected -> values dropped
        self.gone: str | None = None  # why the run cannot be written any more; then nothing is sent
        self.unsent = 0  # metric values not sent because the run is gone
        # started with the first metrics (training has begun); after an outage, again; stopped by close()
        self.system = SystemMetrics(uri, run_id, system_metrics_s) if system_metrics_s > 0 else None
        self.samples_here = True  # rank 0 runs on this node (``record`` says, event by event)

    def log_metrics(self, metrics: dict[str, float], step: int, at_ms: int | None = None) -> None:
        """``at_ms``: when rank 0 logged them (milliseconds since the epoch); now if not given."""
        if self.gone is not None:
            self.unsent += len(metrics)
            return
        if self.system is not None and self.down_since is None:
            self.system.start() if self.samples_here else self.system.stop()
        now = int(time.time() * 1000) if at_ms is None else at_ms
        for k, v in metrics.items():
            if k in self.refused:
                self.refused[k] += 1
            else:
                self.pending.append((k, float(v), now, step))
        self.flush()

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        if self.gone is None:
            self.pending_dicts.append((data, name))
            self.flush()

    def flush(self, wait: bool = False) -> bool:
        """Send the backlog; True when nothing is left. Between retries, returns at once."""
        if not (self.pending or self.pending_dicts):
            return True
        if not wait and time.monotonic() < self.next_try:
            return False
        try:
            while self.pending and self.gone is None:
                chunk = self.pending[:1000]
                rejected = _send_metrics(self.client, self.run_id, chunk)
                del self.pending[: len(chunk)]
                self._refuse(rejected)
            while self.pending_dicts and self.gone is None:
                self._send_dict(*self.pending_dicts[0])
                del self.pending_dicts[0]
        except _RunGone as e:
            self.gone = str(e)
            if self.system is not None:
                self.system.stop()
            self.say(
                f"tracking: run {self.run_id} at {mask(self.uri)} is {self.gone}; training goes on, "
                "its metrics are no longer sent"
            )
        except Exception as e:  # noqa: BLE001 - only what is worth waiting out gets here: keep the data, retry later
            if self.down_since is None:
                self.down_since = time.monotonic()
                self.say(
                    f"tracking: cannot reach {mask(self.uri)} ({_reason(e)[:160]}); "
                    f"training goes on, metrics are kept and resent every {RETRY_S:g}s"
                )
            self.next_try = time.monotonic() + RETRY_S
            return False
        if self.down_since is not None and self.gone is None:
            away = time.monotonic() - self.down_since
            self.say(f"tracking: {mask(self.uri)} is back after {away:.0f}s; backlog sent")
            if self.system is not None:
                self.system.stop()  # MLflow's monitor ends at its first failed request: the next metrics start another
        self.down_since = None
        if self.gone is not None:
            self.unsent += len(self.pending)
            self.pending.clear()
            self.pending_dicts.clear()
        return True

    def _refuse(self, rejected: dict[str, tuple[int, str]]) -> None:
        """Each key the server rejected: said once; its later values are dropped without sending."""
        for key, (count, why) in rejected.items():
            self.refused[key] = self.refused.get(key, 0) + count
            self.say(
                f"tracking: run {self.run_id}: the server rejected metric {_show(key)} ({why}); "
                f"{count} value{'s' * (count != 1)} dropped, and its later values are dropped too"
            )
        if rejected:  # a backlog may hold more of them
            for m in self.pending:
                if m[0] in rejected:
                    self.refused[m[0]] += 1
            self.pending[:] = [m for m in self.pending if m[0] not in rejected]

    def _send_dict(self, data: dict[str, Any], name: str) -> None:
        try:
            self.client.log_dict(self.run_id, data, name)
        except Exception as e:
            if _transient(e):
                raise
            self.say(f"tracking: run {self.run_id}: the server refused the artifact {name} ({_reason(e)}); dropped")

    def close(self, patience_s: float = 30.0) -> None:
        """At the end of training: send the backlog, waiting up to ``patience_s``; else ``keep`` it (for
        ``finish_run``, which tries once more, then writes it to a spool file)."""
        if self.system is not None:
            self.system.stop(last=self.gone is None)
        deadline = time.monotonic() + patience_s
        while not self.flush(wait=True):
            if time.monotonic() > deadline:
                self.keep({"metrics": self.pending, "dicts": [[d, n] for d, n in self.pending_dicts]})
                self.say(f"tracking: {len(self.pending)} metric values not sent yet")
                break
            time.sleep(RETRY_S)
        if self.refused:
            self.say(
                f"tracking: {sum(self.refused.values())} metric values the server rejected were dropped in all: "
                + ", ".join(f"{_show(k)} ({n})" for k, n in self.refused.items())
            )


class _RunGone(Exception):
    """The run can no longer be written, for good (deleted, not found, not ours to write); says which."""


# MLflow error codes that MLflow maps to HTTP 5xx but that no retry fixes
_PERMANENT_5XX = frozenset({"INVALID_STATE", "NOT_IMPLEMENTED"})
# a 401 / 403: nothing more can be written to this run
_NO_ACCESS = frozenset({"PERMISSION_DENIED", "UNAUTHENTICATED", "CUSTOMER_UNAUTHORIZED"})


def _transient(e: BaseException) -> bool:
    """Worth waiting out: no connection, a timeout, HTTP 5xx or 429. Anything else no retry fixes.

    MLflow's REST client raises ``MlflowException`` for both: a connection error or a timeout is
    wrapped with ``INTERNAL_ERROR`` (HTTP 500), the server's own errors carry their code
    (``INVALID_PARAMETER_VALUE`` 400, ``RESOURCE_DOES_NOT_EXIST`` 404, ...). Artifact uploads to
    an ``mlflow-artifacts`` server raise ``requests.HTTPError``.
    """
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(e, MlflowException):
        status = e.get_http_status_code()
        return e.error_code not in _PERMANENT_5XX and (status >= 500 or status == 429)
    if isinstance(e, requests.HTTPError | urllib.error.HTTPError):
        found = e.code if isinstance(e, urllib.error.HTTPError) else getattr(e.response, "status_code", None)
        return found is None or found >= 500 or found == 429
    if isinstance(e, requests.RequestException):  # requests' errors are OSErrors: only these are outages
        return isinstance(e, requests.ConnectionError | requests.Timeout | requests.exceptions.ChunkedEncodingError)
    return isinstance(e, OSError)  # refused, reset, timed out, unreachable (urllib's URLError too)


def _reason(e: BaseException) -> str:
    """The first line of an error, masked, for the console; of a failed request, its cause."""
    text = mask(str(e)).strip()
    if "(Caused by " in text:  # MLflow's wrapping of urllib3's error ends with what went wrong
        text = text[text.rindex("(Caused by ") + len("(Caused by ") :].removesuffix(")")
    return (text.splitlines() or [type(e).__name__])[0][:200]


def _show(key: str) -> str:
    return repr(key if len(key) <= 60 else f"{key[:57]}...")


def _check_run(client: Any, run_id: str, error: BaseException) -> None:
    """After ``error``, which no retry fixes: raise ``_RunGone`` if the run itself cannot be written."""
    if getattr(error, "error_code", None) in _NO_ACCESS:
        raise _RunGone(f"not writable ({_reason(error)})")
    try:
        stage = client.get_run(run_id).info.lifecycle_stage
    except Exception as e:
        if _transient(e):
            raise
        if getattr(e, "error_code", None) in {"RESOURCE_DOES_NOT_EXIST", *_NO_ACCESS}:
            raise _RunGone(f"not found or not readable ({_reason(e)})") from e
        return  # nothing says the run is gone: the metrics themselves were refused
    if stage != "active":
        raise _RunGone(stage)  # "deleted": the server refuses every write to it (INVALID_PARAMETER_VALUE)


def _send_metrics(client: Any, run_id: str, chunk: list[tuple[str, float, int, int]]) -> dict[str, tuple[int, str]]:
    """Send one chunk (at most 1000 values); what the server rejected, by key: (values, why).

    A rejected batch is sent again key by key, so one bad key does not cost the others (what
    MLflow refuses in a metric is its name: characters, length, a path that climbs out). Raises
    what is worth retrying (``_transient``) and ``_RunGone``. A retried chunk may send some
    values twice; MLflow's SQL store keeps one of identical values.
    """
    from mlflow.entities import Metric

    try:
        client.log_batch(run_id, metrics=[Metric(*m) for m in chunk], synchronous=True)
        return {}
    except Exception as e:
        if _transient(e):
            raise
        _check_run(client, run_id, e)
    by_key: dict[str, list[tuple[str, float, int, int]]] = {}
    for m in chunk:
        by_key.setdefault(m[0], []).append(m)
    rejected = {}
    for key, values in by_key.items():
        try:
            client.log_batch(run_id, metrics=[Metric(*m) for m in values], synchronous=True)
        except Exception as e:
            if _transient(e):
                raise
            rejected[key] = (len(values), _reason(e))
    return rejected


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
    shown = {k: v for k, v in plan.items() if k not in ("reasons", "notes", "memory", "deepspeed")}
    shown["cpus"] = {k: v for k, v in plan["cpus"].items() if k != "reason"}  # the reason is among the reasons
    params = {**_flatten(config), **_flatten(shown, "plan.")}
    items = [Param(k, mask(str(v))[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])
    client.log_batch(run_id, tags=[RunTag("plan.reasons", mask("\n".join(plan["reasons"]))[:5000])])
    client.log_dict(run_id, _masked(config), "config.yaml")
    client.log_dict(run_id, plan, "plan.json")
    return run_id


def latest_noise_scale(uri: str, experiment: str, recipe: str, scale: str) -> tuple[float, str] | None:
    """The last ``noise_scale`` logged by the newest run of this recipe and scale, and where it came from.

    None when there is none, or no store yet (a missing SQLite file is not created by looking).
    """
    found = _newest_run(
        uri, experiment, f"tags.recipe = '{recipe}' and tags.scale = '{scale}' and metrics.noise_scale > 0"
    )
    if found is None:
        return None
    client, run = found
    last = max(client.get_metric_history(run.info.run_id, "noise_scale"), key=lambda m: m.step)
    return last.value, f"run {run.info.run_name} ({run.info.run_id[:8]}) at step {last.step}"


def find_run(uri: str, experiment: str, name: str) -> tuple[str, str] | None:
    """(run id, recipe) of the newest training run called ``name`` in ``experiment``, if any."""
    escaped = name.replace("'", "\\'")
    found = _newest_run(uri, experiment, f"attributes.run_name = '{escaped}' and tags.action = 'train'")
    return (found[1].info.run_id, found[1].data.tags.get("recipe", "")) if found else None


def _newest_run(uri: str, experiment: str, filter_string: str) -> tuple[Any, Any] | None:
    """(client, run): the newest run of ``experiment`` matching ``filter_string``; None without a store."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id], filter_string=filter_string, order_by=["attributes.start_time DESC"], max_results=1
    )
    return (client, runs[0]) if runs else None


def reopen_run(uri: str, run_id: str, plan: dict[str, Any], step: int) -> None:
    """Mark an earlier run running again; its new plan goes beside the first (params stay as they were)."""
    from mlflow.entities import RunStatus
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    client.log_dict(run_id, plan, f"resume/plan_at_step_{step}.json")
    client.set_tag(run_id, "resumed_at_step", str(step))


def finish_run(uri: str, run_id: str, status: str, backlog: dict[str, Any] | None, spool: Path) -> None:
    """Send what the tracker could not (if anything) and set the run's final status; never raises.

    If the store is still unreachable, the backlog goes to ``spool`` (JSON) and the console says so;
    metric keys the server rejects are dropped and named; a run deleted on the server is said to be.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        try:
            if backlog is not None:
                metrics = [(k, v, t, s) for k, v, t, s in backlog["metrics"]]
                rejected: dict[str, tuple[int, str]] = {}
                for i in range(0, len(metrics), 1000):
                    rejected |= _send_metrics(client, run_id, metrics[i : i + 1000])
                for data, name in backlog["dicts"]:
                    client.log_dict(run_id, data, name)
                for key, (count, why) in rejected.items():
                    print(
                        f"tracking: the server rejected metric {_show(key)} ({why}); {count} values dropped", flush=True
                    )
                sent = len(metrics) - sum(n for n, _ in rejected.values())
                print(f"tracking: sent {sent} metric values kept through the outage", flush=True)
            for attempt in range(3):  # the status matters most: a passing outage is waited out (2 s, twice)
                try:
                    client.set_terminated(run_id, status)
                    break
                except Exception as e:
                    if attempt == 2 or not _transient(e):
                        raise
                    time.sleep(2)
        except Exception as e:
            if not isinstance(e, _RunGone) and not _transient(e):
                _check_run(client, run_id, e)  # a deleted run refuses its status too: say so
            raise
    except Exception as e:  # noqa: BLE001 - training is over; say what was not recorded and where it is
        kept = ""
        if backlog is not None:
            spool.parent.mkdir(parents=True, exist_ok=True)
            spool.write_text(json.dumps(backlog))
            kept = f"; the {len(backlog['metrics'])} unsent metric values are in {spool}"
        if isinstance(e, _RunGone):
            print(
                f"tracking: run {run_id} at {mask(uri)} is {e}; its final status {status} is not recorded{kept}",
                flush=True,
            )
        else:
            print(
                f"tracking: could not mark run {run_id} {status} at {mask(uri)} ({mask(str(e))[:200]}){kept}",
                flush=True,
            )


def check_reachable(uri: str) -> str | None:
    """None if an http(s) tracking server answers ``/health`` within seconds; else why not."""
    if not uri.startswith(("http://", "https://")):
        return None
    bare = strip_credentials(uri).rstrip("/")  # /health needs no credentials
    try:
        with urllib.request.urlopen(f"{bare}/health", timeout=REACH_TIMEOUT_S) as r:
            return None if r.status == 200 else f"/health answered HTTP {r.status}"
    except urllib.error.HTTPError as e:
        return f"/health answered HTTP {e.code}; is this an MLflow server?"
    except (urllib.error.URLError, OSError) as e:
        return str(getattr(e, "reason", e))


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
