"""``action=manifest`` (#21): a KubeRay RayJob on stdout, checked against the CRD of KubeRay v1.5.1.

The structure check below is written from ``ray-operator/config/crd/bases/ray.io_rayjobs.yaml`` at
KubeRay tag v1.5.1 (``ray.io/v1``; the release whose ``rayClusterSpec.authOptions`` token mode the
manifest uses, for Ray 2.60.0, the pin in constraints.txt): for every field the launcher emits, its
type (int32, string, boolean, a map of strings, a map of quantities, objects, arrays), the keys the
CRD requires at that level, and the enums; a field the CRD does not have there is an error. KubeRay's
own rule on the name (``ValidateRayJobMetadata``: a DNS-1035 label of at most 47 characters) is
checked too. ``planner.memory.*`` is pinned, so no model is traced; the CLI path runs in-process.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from launcher import manifest as mf
from launcher.cli import load, main
from launcher.config import ConfigError, rayjob_name, to_dict
from launcher.tracking import CREDENTIAL_VARS

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = "v1.5.1"
BASE = [
    "recipe=bert", "cluster=ray", "cluster.nodes=4", "cluster.gpus_per_node=8", "cluster.gpu_memory_gb=80",
    "cluster.image=registry.example.com/launcher:1", "cluster.storage_path=/mnt/runs", "run.name=Bert_base.1",
    "planner.memory.model_gb=2", "planner.memory.per_sample_gb=0.01", "action=manifest",
]  # fmt: skip

# --- the RayJob CRD of KubeRay v1.5.1, for the fields the launcher emits ------------------------------

INT32, STR, BOOL = "int32", "string", "boolean"
STR_MAP, QUANTITIES = "map of strings", "map of quantities"
NUMBER = r"(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
QUANTITY = re.compile(rf"^(\+|-)?{NUMBER}(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?{NUMBER}))?$")  # the CRD's pattern


def obj(required: tuple[str, ...] = (), **fields: Any) -> tuple[str, set[str], dict[str, Any]]:
    return ("object", set(required), fields)


def arr(item: Any) -> tuple[str, Any]:
    return ("array", item)


def enum(*values: str) -> tuple[str, set[str]]:
    return ("enum", set(values))


ENV = obj(("name",), name=STR, value=STR, valueFrom=obj(secretKeyRef=obj(("key",), key=STR, name=STR, optional=BOOL)))
CONTAINER = obj(
    ("name",),
    name=STR,
    image=STR,
    ports=arr(obj(("containerPort",), containerPort=INT32, name=STR)),
    env=arr(ENV),
    resources=obj(limits=QUANTITIES, requests=QUANTITIES),
    volumeMounts=arr(obj(("mountPath", "name"), mountPath=STR, name=STR)),
)
VOLUME = obj(("name",), name=STR, persistentVolumeClaim=obj(("claimName",), claimName=STR))
POD_TEMPLATE = obj(spec=obj(("containers",), containers=arr(CONTAINER), volumes=arr(VOLUME)))
RAYJOB = obj(
    ("apiVersion", "kind", "metadata", "spec"),  # the CRD requires none at the top; Kubernetes these
    apiVersion=enum("ray.io/v1"),
    kind=enum("RayJob"),
    metadata=obj(("name",), name=STR),
    spec=obj(
        entrypoint=STR,
        submissionMode=enum("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"),
        shutdownAfterJobFinishes=BOOL,
        ttlSecondsAfterFinished=INT32,
        metadata=STR_MAP,
        rayClusterSpec=obj(
            ("headGroupSpec",),
            rayVersion=STR,
            authOptions=obj(mode=enum("disabled", "token")),
            headGroupSpec=obj(("template",), rayStartParams=STR_MAP, template=POD_TEMPLATE),
            workerGroupSpecs=arr(
                obj(
                    ("groupName", "maxReplicas", "minReplicas", "template"),
                    groupName=STR,
                    replicas=INT32,
                    minReplicas=INT32,
                    maxReplicas=INT32,
                    rayStartParams=STR_MAP,
                    template=POD_TEMPLATE,
                )
            ),
        ),
    ),
)


def problems(value: Any, schema: Any, at: str = "") -> list[str]:
    """Where ``value`` departs from ``schema`` (the CRD subset above), one line each."""
    if schema == INT32:
        ok = isinstance(value, int) and not isinstance(value, bool) and -(2**31) <= value < 2**31
        return [] if ok else [f"{at}: expected an int32, got {value!r}"]
    if schema in (STR, BOOL):
        ok = isinstance(value, str if schema == STR else bool)
        return [] if ok else [f"{at}: expected a {schema}, got {value!r}"]
    if schema in (STR_MAP, QUANTITIES):
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            return [f"{at}: expected a {schema}, got {value!r}"]
        if schema == STR_MAP:
            return [f"{at}.{k}: expected a string, got {v!r}" for k, v in value.items() if not isinstance(v, str)]
        return [f"{at}.{k}: not a quantity: {v!r}" for k, v in value.items()
                if isinstance(v, bool) or not isinstance(v, int | str) or not QUANTITY.match(str(v))]  # fmt: skip
    kind = schema[0]
    if kind == "enum":
        return [] if value in schema[1] else [f"{at}: expected one of {sorted(schema[1])}, got {value!r}"]
    if kind == "array":
        if not isinstance(value, list):
            return [f"{at}: expected an array, got {value!r}"]
        return [p for i, v in enumerate(value) for p in problems(v, schema[1], f"{at}[{i}]")]
    _, required, fields = schema
    if not isinstance(value, dict):
        return [f"{at}: expected an object, got {value!r}"]
    out = [f"{at}.{k}: required by the CRD, missing" for k in sorted(required - set(value))]
    out += [f"{at}.{k}: not a field of the CRD here" for k in value if k not in fields]
    return out + [p for k, v in value.items() if k in fields for p in problems(v, fields[k], f"{at}.{k}")]


def check_rayjob(doc: Any) -> None:
    """The structure check, and KubeRay's own checks of what the CRD leaves open."""
    found = problems(doc, RAYJOB, "rayjob")
    name = doc["metadata"]["name"]
    if len(name) > 47 or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        found.append(f"metadata.name: {name!r} is not a DNS-1035 label of at most 47 characters")
    for c in _containers(doc):
        for e in c.get("env", []):
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", e["name"]) or {"value", "valueFrom"} <= set(e):
                found.append(f"env {e['name']}: not a C identifier, or both value and valueFrom")
        for port in c.get("ports", []):
            if not 0 < port["containerPort"] < 65536 or len(port["name"]) > 15:
                found.append(f"port {port}: not a port, or a name longer than 15 characters")
    for group in doc["spec"]["rayClusterSpec"].get("workerGroupSpecs", []):
        if not group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]:
            found.append(f"{group['groupName']}: replicas outside [minReplicas, maxReplicas]")
    assert found == [], f"not a RayJob of KubeRay {KUBERAY}:\n" + "\n".join(found)


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]
    return [c for pod in pods for c in pod["spec"]["containers"]]


def head_env(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    (head,) = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    return {e["name"]: e for e in head["env"]}


# --- the command -------------------------------------------------------------------------------------


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(autouse=True)
def _no_credentials_here(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MLFLOW_TRACKING_URI", *CREDENTIAL_VARS):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("storage", ["/mnt/runs", "s3://bucket/runs"])
def test_manifest_passes_the_rayjob_structure_check(storage: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = [*BASE, f"cluster.storage_path={storage}", "tracking=server", "tracking.uri=http://mlflow:5000"]
    rc, out, err = run_cli(args, capsys)
    assert rc == 0, err
    doc = yaml.safe_load(out)
    check_rayjob(doc)
    spec, cluster = doc["spec"], doc["spec"]["rayClusterSpec"]
    assert doc["metadata"]["name"] == "bert-base-1" and spec["shutdownAfterJobFinishes"] is True
    assert cluster["rayVersion"] == "2.60.0" and cluster["authOptions"] == {"mode": "token"}
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 4  # 32 GPUs / 8 per node
    worker = workers["template"]["spec"]["containers"][0]
    assert worker["resources"] == {"limits": {"nvidia.com/gpu": 8}}
    assert {c["image"] for c in _containers(doc)} == {"registry.example.com/launcher:1"}
    assert head_env(doc)["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow:5000"
    mounted = [m["mountPath"] for c in _containers(doc) for m in c.get("volumeMounts", [])]
    assert mounted == ([storage, storage] if storage.startswith("/") else [])
    assert "manifest: RayJob bert-base-1: 4 worker pod(s) x 8 GPU(s)" in err


def test_the_entrypoint_parses_back_to_the_same_config(capsys: pytest.CaptureFixture[str]) -> None:
    args = [*BASE, "tracking=server", "tracking.uri=http://mlflow:5000", "cluster.address=http://head:8265",
            "optim.lr=3e-4", "run.seed=7", "data.path=/mnt/data/wiki"]  # fmt: skip
    rc, out, err = run_cli(args, capsys)
    assert rc == 0, err
    command = shlex.split(yaml.safe_load(out)["spec"]["entrypoint"])
    assert command[:3] == ["python", "-m", "launcher"] and "action=train" in command
    assert not any(a.startswith(("tracking.uri=http", "cluster.address=", "action=manifest")) for a in command)
    back, given = to_dict(load(command[3:])), to_dict(load(args))
    assert back["action"] == "train" and back["tracking"]["uri"] is None  # the URI comes from $MLFLOW_TRACKING_URI
    for d in (back, given):
        del d["action"], d["tracking"]["uri"], d["cluster"]["address"]  # the job's own cluster's address
    assert back == given


SECRET_URIS = [
    "http://user:s3cret@mlflow:5000",
    "http://s3cret@mlflow:5000",  # a bearer token
    "https://us%40er:s3cret%2Fx@mlflow:5000",
    "http://u:p@s3cret@mlflow:5000",  # '@' in the password
]


@pytest.mark.parametrize("uri", SECRET_URIS)
def test_credentials_in_the_tracking_uri_never_reach_the_manifest(uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_cli([*BASE, "tracking=server", f"tracking.uri={uri}"], capsys)
    assert rc == 0, err
    assert "s3cret" not in out and "s3cret" not in err and "user" not in out
    doc = yaml.safe_load(out)
    check_rayjob(doc)
    env = head_env(doc)
    assert env["MLFLOW_TRACKING_URI"]["value"].endswith("mlflow:5000")
    basic = uri.count(":") > 2  # user:password, else a token
    wanted = {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} if basic else {"MLFLOW_TRACKING_TOKEN"}
    refs = {n: e["valueFrom"]["secretKeyRef"] for n, e in env.items() if "valueFrom" in e}
    assert refs == {n: {"name": "mlflow-credentials", "key": n, "optional": True} for n in wanted}


def test_credentials_set_here_are_named_from_the_secret_never_copied(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "t0ken-here")
    rc, out, err = run_cli(BASE, capsys)
    assert rc == 0, err
    assert "t0ken-here" not in out and "MLFLOW_TRACKING_TOKEN" in out
    check_rayjob(yaml.safe_load(out))


HOSTILE_USER_INFO = [  # what split_credentials strips: quotes, an interpolation, a YAML document marker
    "http://${EVIL}'\"q:s3cret@mlflow:5000",
    "http://u:s3cret'}\"---!!python&object@mlflow:5000",
    "http://a,b;c=d:s3cret@mlflow:5000",
    "http://[u:s3cret@mlflow:5000",
]
REFUSED = [  # what it cannot tell from a host: refused, and the refusal does not echo it
    "http://u\n:s3cret@mlflow:5000",
    "http://u :s3cret@mlflow:5000",
    "http://u\x00:s3cret@mlflow:5000",
    "http://\u202eu:s3cret@mlflow:5000",
    "http://mlflow:5000/$(cat /etc/s3cret)",
    "http://u:s3cret'}/--- !!python/object@mlflow:5000",  # '/' ends the user-info: s3cret... would be the port
    "http://u:s3/cret@mlflow:5000",
    'http://u"s3cret/@mlflow:5000',  # ... or the host
]


@pytest.mark.parametrize("uri", HOSTILE_USER_INFO)
def test_a_hostile_user_info_never_reaches_the_manifest(uri: str) -> None:
    text = mf.render({"env": mf.tracking_env(uri)})
    assert yaml.safe_load(text)["env"][0] == {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow:5000"}
    assert not any(s in text for s in ("s3cret", "EVIL", "'", "!!", "---", "a,b"))


@pytest.mark.parametrize("uri", REFUSED)
def test_a_tracking_uri_the_manifest_cannot_clean_is_refused_without_echoing_it(uri: str) -> None:
    with pytest.raises(ConfigError) as e:
        mf.tracking_env(uri)
    assert e.value.errors[0].startswith("tracking.uri: refused") and "s3cret" not in str(e.value)


def test_a_hostile_uri_through_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    """What Hydra's parser lets through from argv: a quoted value with quotes, '$' and '@' in its user-info."""
    rc, out, err = run_cli([*BASE, "tracking=server", "tracking.uri='http://\\${X}\"q:s3cret@mlflow:5000'"], capsys)
    assert "s3cret" not in out + err and "${X}" not in out
    if rc == 0:
        check_rayjob(yaml.safe_load(out))
    else:
        assert out == "" and "tracking.uri" in err


@pytest.mark.parametrize(
    ("drop", "add", "key"),
    [
        ("cluster.image=registry.example.com/launcher:1", [], "cluster.image"),
        ("run.name=Bert_base.1", [], "run.name"),
        ("run.name=Bert_base.1", ["run.name=1bert"], "run.name"),
        ("run.name=Bert_base.1", ["run.name=" + "b" * 48], "run.name"),
        ("cluster.gpus_per_node=8", [], "cluster.gpus_per_node"),
        ("cluster=ray", [], "action"),
    ],
)
def test_what_a_manifest_needs_is_named_when_missing(
    drop: str, add: list[str], key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [a for a in BASE if a != drop and not (drop == "cluster=ray" and a.startswith("cluster."))] + add
    rc, out, err = run_cli(args, capsys)
    assert rc == 2 and out == ""
    assert f"  - {key}: " in err


def test_the_rayjob_name_rule() -> None:
    assert rayjob_name("Bert_base.1") == "bert-base-1"
    assert rayjob_name("b" * 47) == "b" * 47
    assert [rayjob_name(n) for n in ("1bert", "bert-", "bert_", "b" * 48)] == [None] * 4


def test_the_ray_version_is_the_pinned_one() -> None:
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().split() if "==" in line)
    assert pins["ray"] == mf.RAY_VERSION


def test_a_job_on_a_cluster_plans_described_gpus_that_its_driver_does_not_have() -> None:
    """The entrypoint keeps cluster.gpus_per_node; the job's driver runs on the head pod, without GPUs."""
    from launcher import launch

    cfg = load([*BASE[:-1], "action=train"])
    assert launch.prepare_plan(cfg).hw.world_size == 32


def test_python_m_launcher_action_manifest_prints_yaml_only(tmp_path: Path) -> None:
    args = [*BASE, "tracking=server", "tracking.uri=http://user:s3cret@mlflow:5000"]
    done = subprocess.run([sys.executable, "-m", "launcher", *args], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("apiVersion: ray.io/v1\n") and "s3cret" not in done.stdout + done.stderr
    check_rayjob(yaml.safe_load(done.stdout))
    assert list(tmp_path.iterdir()) == []  # nothing written: no tracking store, no Hydra outputs
