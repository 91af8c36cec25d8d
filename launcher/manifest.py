"""``action=manifest``: a KubeRay ``RayJob`` that creates a Ray cluster, trains this config on it, removes it.

Nothing is contacted: the plan is made for the described hardware (``cluster.nodes`` x
``cluster.gpus_per_node`` GPUs of ``cluster.gpu_memory_gb``), as ``action=plan`` does, and the
YAML goes to stdout, alone (anything else is written to stderr), for ``kubectl apply -f -``.

The job runs ``python -m launcher <the same overrides> action=train`` on the head pod. The
tracking URI travels without its credentials in ``$MLFLOW_TRACKING_URI``; the credentials come
from the Kubernetes secret ``mlflow-credentials`` (``SECRET``), never from the manifest. Field
names follow the ``ray.io/v1`` RayJob CRD of KubeRay v1.5.1 (``authOptions`` needs >= 1.5.1);
the Ray version is the one ``constraints.txt`` pins. See docs/cluster.md.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import sys
from typing import Any
from urllib.parse import urlsplit

from launcher.config import Config, ConfigError, rayjob_name
from launcher.tracking import CREDENTIAL_VARS, credential_env, split_credentials

KUBERAY_VERSION = "1.5.1"  # the CRD the fields follow (tests/unit/test_manifest.py checks them)
RAY_VERSION = "2.60.0"  # constraints.txt's pin (a test keeps the two equal)
SECRET = "mlflow-credentials"  # the tracking server's credentials, one key per MLflow variable
CLAIM = "launcher-runs"  # a ReadWriteMany PersistentVolumeClaim, mounted at cluster.storage_path when that is a path
TTL_S = 600  # the cluster is removed this long after the job ends: time to read its logs
JOB_STOP_WAIT_S = 120  # as for action=submit (launcher/cluster.py): SIGTERM -> SIGKILL grace of a stopped job
_HOST = re.compile(r"[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]")  # a name, an IPv4 or a bracketed IPv6 address
HEAD_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001}
# what the job's command sets itself: the action; the URI (in its environment); the cluster's own address
SET_HERE = ("action", "tracking.uri", "cluster.address")


def run(cfg: Config, argv: list[str]) -> int:
    """Plan for the described hardware, print the RayJob on stdout and a summary on stderr."""
    from launcher.launch import build_plan

    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the YAML only
        p = build_plan(cfg, None)
        uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
        doc = manifest(cfg, argv, p.world_size, uri)
        if not uri or uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri:
            print(
                "warning: tracking: no tracking server given; the job logs to a store inside its pod, which is "
                "removed with the cluster (use tracking=server tracking.uri=http://...)"
            )
        workers = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
        print(
            f"manifest: RayJob {doc['metadata']['name']}: {workers['replicas']} worker pod(s) x "
            f"{cfg.cluster.gpus_per_node} GPU(s), world size {p.world_size}, global batch {p.global_batch}; "
            "apply with: kubectl apply -f <this file>"
        )
    sys.stdout.write(render(doc))
    sys.stdout.flush()
    return 0


def manifest(cfg: Config, argv: list[str], world_size: int, uri: str | None) -> dict[str, Any]:
    """The RayJob: one head pod (no GPUs; it runs the job's driver) and one worker pod per node."""
    name = rayjob_name(cfg.run.name or "")
    gpus, image = cfg.cluster.gpus_per_node, cfg.cluster.image
    if name is None or not gpus or not image or not cfg.cluster.storage_path:  # config.validate refused these
        raise ConfigError(["run.name: action=manifest needs run.name, cluster.image, cluster.gpus_per_node"])
    nodes = -(-world_size // gpus)  # one worker pod per node of the plan
    storage = cfg.cluster.storage_path
    stop_wait = {"name": "RAY_JOB_STOP_WAIT_TIME_S", "value": str(JOB_STOP_WAIT_S)}
    head = {
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0"},  # in the pod: the submitter reaches it
        "template": _pod("ray-head", image, [*tracking_env(uri), stop_wait], {}, storage, HEAD_PORTS),
    }
    worker = {
        "groupName": "gpu",
        "replicas": nodes,
        # fixed: KubeRay recreates a lost pod, and an elastic run (cluster.min_workers, in the
        # entrypoint) shrinks meanwhile and grows back when the pod is there again
        "minReplicas": nodes,
        "maxReplicas": nodes,
        "rayStartParams": {},
        "template": _pod("ray-worker", image, [], {"limits": {"nvidia.com/gpu": gpus}}, storage, {}),
    }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name},
        "spec": {
            "entrypoint": entrypoint(argv),
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": TTL_S,
            "metadata": {"launcher_run": cfg.run.name or name, "recipe": cfg.recipe.name},  # action=status finds it
            "rayClusterSpec": {
                "rayVersion": RAY_VERSION,
                "authOptions": {"mode": "token"},  # a generated token on every pod (KubeRay >= 1.5.1)
                "headGroupSpec": head,
                "workerGroupSpecs": [worker],
            },
        },
    }


def entrypoint(argv: list[str]) -> str:
    """``python -m launcher <the overrides> action=train``, shell-quoted. Without ``action``, ``tracking.uri``
    (it goes in ``$MLFLOW_TRACKING_URI``: the entrypoint is printed in the job's log) and ``cluster.address``
    (Ray Jobs gives the job its own cluster's)."""
    keep = [a for a in argv if a.split("=", 1)[0].lstrip("+~") not in SET_HERE]
    return shlex.join(["python", "-m", "launcher", *keep, "action=train", "tracking.uri=null"])


def tracking_env(uri: str | None) -> list[dict[str, Any]]:
    """``MLFLOW_TRACKING_URI`` without credentials, and each credential variable the job needs (those
    in the URI, and those set here) from the secret ``SECRET``: names only, never a value."""
    names = set(credential_env())
    env: list[dict[str, Any]] = []
    if uri:
        refused = ConfigError(
            [
                "tracking.uri: refused for a manifest: it has whitespace, control characters, `$(`, or "
                "user-info that cannot be told from the host and port; give a plain URI (http://host:5000) and put the "
                f"credentials in the Kubernetes secret {SECRET}"
            ]
        )
        if any(c.isspace() or not c.isprintable() for c in uri) or "$(" in uri:  # $(VAR): Kubernetes expands it
            raise refused
        bare, credentials = split_credentials(uri)
        try:
            parts = urlsplit(bare)
            host = parts.netloc.rpartition(":")[0] if parts.port is not None else parts.netloc  # a bad port raises
        except ValueError:
            raise refused from None
        if parts.netloc and not _HOST.fullmatch(host):
            raise refused  # user-info left over ('/' in it ends it early): it would land in the host or port
        names |= set(credentials)
        env.append({"name": "MLFLOW_TRACKING_URI", "value": bare})
    secret = [{"name": n, "valueFrom": {"secretKeyRef": {"name": SECRET, "key": n, "optional": True}}}
              for n in CREDENTIAL_VARS if n in names]  # fmt: skip
    return env + secret


def _storage(path: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, volume mounts): a path is the claim ``CLAIM`` mounted there on every pod; a URI needs none."""
    if "://" in path:
        return [], []
    return [{"name": "runs", "persistentVolumeClaim": {"claimName": CLAIM}}], [{"name": "runs", "mountPath": path}]


def _pod(
    name: str,
    image: str,
    env: list[dict[str, Any]],
    resources: dict[str, Any],
    storage: str,
    ports: dict[str, int],
) -> dict[str, Any]:
    """A pod template of one container; empty lists and maps are left out (each pod its own: no YAML aliases)."""
    volumes, mounts = _storage(storage)
    container: dict[str, Any] = {"name": name, "image": image}
    optional = {
        "ports": [{"containerPort": port, "name": n} for n, port in ports.items()],
        "env": env,
        "resources": resources,
        "volumeMounts": mounts,
    }
    container.update({k: v for k, v in optional.items() if v})
    spec: dict[str, Any] = {"containers": [container]}
    if volumes:
        spec["volumes"] = volumes
    return {"spec": spec}


def render(doc: dict[str, Any]) -> str:
    """The manifest as YAML, keys in the order built, each string on one line."""
    import yaml

    return str(yaml.safe_dump(doc, sort_keys=False, width=1_000_000))
