"""Hardening (issue #22): run names that stay folder names, credentials masked in what is printed."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from launcher.cli import load
from launcher.config import ConfigError, run_name_errors, validate

# ---------------------------------------------------------------------------------------
# run.name: a plain folder name; every path derived from it stays under its root
# ---------------------------------------------------------------------------------------


def test_a_run_name_that_climbs_out_is_refused_naming_run_name() -> None:
    with pytest.raises(ConfigError) as e:
        load(["run.name=../../x"])
    (err,) = e.value.errors
    assert err.startswith("run.name: got '../../x', expected letters, digits, '.', '_' and '-'")


@pytest.mark.parametrize("name", ["bert-1", "smoke-test", "resize", "on-cluster", "run_2.v3", "_x", "A" * 100])
def test_good_run_names_pass(name: str) -> None:
    assert load([f"run.name={name}"]).run.name == name


@pytest.mark.parametrize(
    "name", ["../x", "a/b", "..", ".", ".hidden", "-x", "a..b", "A" * 101, "a b", "a\\b", "é", "a\nb", "x'y"]
)
def test_bad_run_names_are_refused(name: str) -> None:
    (err,) = run_name_errors({"name": name})
    assert err.startswith(f"run.name: got {name!r}, expected letters, digits")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=120))
def test_an_accepted_run_name_is_one_plain_folder_name(name: str) -> None:
    if run_name_errors({"name": name}):
        return
    assert 1 <= len(name) <= 100 and Path(name).name == name and ".." not in name
    assert name[0] not in ".-" and name.isascii() and "/" not in name and "\\" not in name


def test_run_name_is_checked_by_validate_itself() -> None:
    """The workers validate the plain dict again: a bad name cannot travel around the command line."""
    raw = dataclasses.asdict(load([]))
    raw["run"]["name"] = "../x"
    with pytest.raises(ConfigError, match=r"run\.name: got '\.\./x'"):
        validate(raw)


@pytest.mark.parametrize("root", ["/tmp/runs", "s3://bucket/runs", "gs://bucket"])
def test_run_path_stays_under_its_root(root: str) -> None:
    from launcher.launch import run_path

    assert run_path(root, "bert-1", "0123456789ab") == f"{root}/bert-1-01234567"
    for name in ("../../x", "a/../../x", "../x"):
        with pytest.raises(ConfigError, match="run.name: the run folder"):
            run_path(root, name, "0123456789ab")


def test_run_path_resolves_links_before_checking(tmp_path: Path) -> None:
    from launcher.launch import run_path

    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "evil-01234567").symlink_to(tmp_path)  # a run folder that is a link out of the root
    with pytest.raises(ConfigError, match="would leave"):
        run_path(tmp_path / "root", "evil", "0123456789ab")
    assert run_path(tmp_path / "root", "good", "0123456789ab") == f"{tmp_path / 'root'}/good-01234567"


# ---------------------------------------------------------------------------------------
# credentials: one masking function, used for every error text the launcher prints
# ---------------------------------------------------------------------------------------

TRACEBACK = """Traceback (most recent call last):
  File "launcher/tracking.py", line 3, in start_run
    client.create_run(...)
(RayTrainWorker pid=123) mlflow.exceptions.MlflowException: API request to http://user:secret@127.0.0.1:9/api failed
ray.train.base_trainer.TrainingFailedError: the run failed at https://user:token@host/x (see above)
  retry with http://user:secret@127.0.0.1:9
"""


def test_mask_hides_the_user_info_of_every_uri_in_a_text() -> None:
    from launcher.tracking import mask

    assert mask("https://user:token@host/x") == "https://***@host/x"
    assert mask("http://user:secret@127.0.0.1:9") == "http://***@127.0.0.1:9"
    assert mask("https://u:p@ss@host/x") == "https://***@host/x"  # an unencoded @ in the token
    masked = mask(TRACEBACK)
    assert "secret" not in masked and "token" not in masked and masked.count("***@") == 3
    assert mask("sqlite:////tmp/mlflow.db and http://host:5000") == "sqlite:////tmp/mlflow.db and http://host:5000"


def test_strip_credentials_is_the_same_rule() -> None:
    from launcher.tracking import strip_credentials

    assert strip_credentials("http://user:secret@127.0.0.1:9/") == "http://127.0.0.1:9/"
    assert strip_credentials("https://host/x") == "https://host/x"


def test_split_credentials_gives_mlflows_variables() -> None:
    from launcher.tracking import split_credentials

    assert split_credentials("https://alice:p%40ss%3Aw@host:5000/x") == (
        "https://host:5000/x",
        {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "p@ss:w"},
    )
    assert split_credentials("https://tok3n@host") == ("https://host", {"MLFLOW_TRACKING_TOKEN": "tok3n"})
    assert split_credentials("http://127.0.0.1:5000") == ("http://127.0.0.1:5000", {})
    assert split_credentials("sqlite:////tmp/x.db") == ("sqlite:////tmp/x.db", {})


def test_credentials_leave_the_uri_before_anything_is_sent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A real HTTP server answers /health; what the workers get (config and payload) has no secret,
    the process environment (which the workers inherit) has MLflow's variables."""
    import http.server
    import json
    import threading

    from launcher import launch
    from launcher.config import to_dict

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    port = server.server_address[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://env:other-secret@127.0.0.1:{port}")
    try:
        cfg = load([f"tracking.uri=http://alice:secret@127.0.0.1:{port}"])
        uri = launch._tracking_uri(cfg, tmp_path)
    finally:
        server.shutdown()
    assert uri == f"http://127.0.0.1:{port}" == cfg.tracking.uri
    sent = json.dumps({"config": to_dict(cfg), "tracking_uri": uri})  # what _fit hands to Ray Train
    assert "secret" not in sent
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice" and os.environ["MLFLOW_TRACKING_PASSWORD"] == "secret"
    assert "secret" not in os.environ["MLFLOW_TRACKING_URI"]  # the workers inherit the environment too


def test_check_reachable_never_sends_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.request

    from launcher import tracking

    asked: list[str] = []

    def refuse(url: str, timeout: float) -> None:
        asked.append(url)
        raise OSError("refused")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    assert tracking.check_reachable("http://user:secret@127.0.0.1:9") == "refused"
    assert asked == ["http://127.0.0.1:9/health"]


def test_the_failure_report_masks_the_whole_error_and_its_cause() -> None:
    from launcher.launch import failure_report

    shown = failure_report(TRACEBACK)
    assert "secret" not in shown and "training failed: " in shown and shown.count("http://***@127.0.0.1:9") >= 2


CANCELLED = """ActorDiedError: The actor died unexpectedly before finishing this task.
	class_name: TrainController
The actor is dead because all references to the actor were removed including lineage ref count.
The actor never ran - it was cancelled before it started running.
"""


def test_a_run_cancelled_after_a_token_found_in_a_file_says_how_to_reach_an_unauthenticated_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray 2.60 writes ~/.ray/auth_token on a default `ray start`; with $RAY_AUTH_MODE unset the launcher then
    authenticates with it, and a cluster started without authentication cancels the run's actors: the
    failure says so. Not when the mode was the user's choice, nor for other failures."""
    from launcher import cluster
    from launcher.launch import failure_report

    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("a" * 64)
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.setenv(var, "")  # recorded, so what authentication() sets is undone after the test
        monkeypatch.delenv(var)
    monkeypatch.setattr(cluster, "_token_found", "")
    assert cluster.authentication() == "token from ~/.ray/auth_token"
    shown = failure_report(CANCELLED)
    assert "training failed: ActorDiedError" in shown
    assert "token from ~/.ray/auth_token" in shown and "RAY_AUTH_MODE=disabled" in shown
    assert "a" * 64 not in shown
    assert "hint:" not in failure_report("ValueError: something else\n")

    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # the user's own choice: no guess to point at
    monkeypatch.setattr(cluster, "_token_found", "")
    assert cluster.authentication() == "token, as $RAY_AUTH_MODE says"
    assert "hint:" not in failure_report(CANCELLED)


def test_root_cause_masks_credentials() -> None:
    from launcher.launch import root_cause

    cause = root_cause(TRACEBACK)
    assert cause == "TrainingFailedError: the run failed at https://***@host/x (see above)"
    assert "secret" not in root_cause("ValueError: cannot reach http://user:secret@127.0.0.1:9\n")


def test_the_cli_masks_a_config_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from launcher import cli

    def fail(_argv: list[str]) -> None:
        raise ConfigError(["tracking.uri: no MLflow server answers at http://user:secret@127.0.0.1:9"])

    monkeypatch.setattr(cli, "load", fail)
    assert cli.main(["action=plan"]) == 2
    err = capsys.readouterr().err
    assert "secret" not in err and "http://***@127.0.0.1:9" in err


# ---------------------------------------------------------------------------------------
# LAMB: clipped once, by the step object at train.grad_clip, not again by timm's Lamb
# ---------------------------------------------------------------------------------------


def _lamb_plan() -> Any:
    from tests.unit.test_shares import small_plan

    return dataclasses.replace(small_plan(), optimizer="lamb")


def test_lamb_does_not_clip_by_itself() -> None:
    from torch import nn

    from launcher.config import Optim
    from launcher.optim import build_optimizer

    opt = build_optimizer(nn.Linear(4, 2), _lamb_plan(), Optim())
    assert type(opt).__name__ == "Lamb"
    assert opt.defaults["max_grad_norm"] is None  # what timm's Lamb reads when it steps
    assert all(g["max_grad_norm"] is None for g in opt.param_groups)


def test_lamb_steps_without_a_clip_factor() -> None:
    import torch
    from torch import nn

    from launcher.config import Optim
    from launcher.optim import build_optimizer

    model = nn.Linear(4, 2, bias=False)
    opt = build_optimizer(model, _lamb_plan(), Optim())
    model.weight.grad = torch.full_like(model.weight, 100.0)  # a norm far above timm's default 1.0
    assert opt._get_clip_grad_norm() is None  # type: ignore[attr-defined]  # timm: None means no clipping
    opt.step()


def test_a_restored_lamb_has_its_clipping_off_too() -> None:
    """A checkpoint written before the fix holds max_grad_norm 1.0 in its groups; apply_plan sets it to None."""
    from torch import nn

    from launcher.config import Optim
    from launcher.optim import apply_plan, build_optimizer, build_scheduler

    p, optim = _lamb_plan(), Optim()
    old = build_optimizer(nn.Linear(4, 2), p, optim)
    state = old.state_dict()
    for g in state["param_groups"]:
        g["max_grad_norm"] = 1.0
    opt = build_optimizer(nn.Linear(4, 2), p, optim)
    opt.load_state_dict(state)
    changed = apply_plan(opt, build_scheduler(opt, p), p, optim)
    assert all(g["max_grad_norm"] is None for g in opt.param_groups) and opt.defaults["max_grad_norm"] is None
    assert changed == ["max_grad_norm 1.0 -> None"]


# ---------------------------------------------------------------------------------------
# the memory profile cache: a profile measured under one precision is not read for another
# ---------------------------------------------------------------------------------------


def test_the_profile_cache_is_keyed_by_precision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from launcher.memory import _cache_path

    monkeypatch.setenv("LAUNCHER_CACHE", str(tmp_path))
    fp32, bf16, auto = (load([f"train.precision={p}"]) for p in ("fp32", "bf16", "auto"))
    paths = {_cache_path(c, "memory") for c in (fp32, bf16, auto)}
    assert len(paths) == 3 and all(p.parent == tmp_path for p in paths)
    assert _cache_path(fp32, "probe", "H200") != _cache_path(bf16, "probe", "H200")
    assert _cache_path(fp32, "memory") == _cache_path(load(["train.precision=fp32"]), "memory")  # still a cache
    assert fp32.recipe.reference.optimizer == "adamw"
    sgd = load(["train.precision=fp32", "recipe.reference.optimizer=sgd"])
    assert _cache_path(sgd, "memory") != _cache_path(fp32, "memory")  # the optimizer is in the recipe section


# ---------------------------------------------------------------------------------------
# stopping: the signal handler, and a run none of whose checkpoints can be read
# ---------------------------------------------------------------------------------------


def test_one_signal_asks_the_run_to_stop_a_second_stops_at_once(tmp_path: Path) -> None:
    """A real embedded Ray and the run's real control actor; the signals are sent to this process."""
    import signal
    import time

    import ray

    from launcher import cluster, control
    from launcher.launch import _graceful_stop

    cluster.start_local(1)
    try:
        actor = control.create("signal-test")
        before = signal.getsignal(signal.SIGINT)
        with _graceful_stop(actor) as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.asked
            deadline = time.monotonic() + 30
            while not ray.get(actor.stop_asked.remote()) and time.monotonic() < deadline:
                time.sleep(0.1)  # the handler asks from a thread: no Ray call inside a signal handler
            assert ray.get(actor.stop_asked.remote())
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)  # the handler runs between bytecodes; it raises here at the latest
        assert signal.getsignal(signal.SIGINT) == before  # the previous handler is back
    finally:
        cluster.stop(tmp_path / "logs")


def test_a_run_whose_checkpoints_are_all_unreadable_stops_instead_of_starting_over(tmp_path: Path) -> None:
    import torch

    from launcher.checkpoint import Checkpointer

    dirs = []
    for name in ("checkpoint_2", "checkpoint_1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.pt").write_bytes(b"PK\x03\x04 not a whole zip")
        dirs.append(str(tmp_path / name))
    model = torch.nn.Linear(2, 2)
    saver = Checkpointer({"model": model}, {}, recipe="bert", plan={}, rank=0, world=1)
    warnings: list[str] = []
    with pytest.raises(RuntimeError, match="none of the 2 checkpoints of this run could be read; run.resume=false"):
        saver.restore(dirs, warnings.append)
    assert len(warnings) == 2 and "no older checkpoint is left" in warnings[1]


def test_the_wait_for_rays_processes_counts_a_zombie_as_ended_and_keeps_one_still_running() -> None:
    """``cluster.stop`` waits for the embedded Ray's processes to end: one that has ended but whose parent has not
    reaped it yet (a zombie: its files closed) does not hold the run's end up; one still running is returned."""
    import subprocess
    import sys

    import psutil

    from launcher.cluster import _running

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        zombie = psutil.Process(ended.pid)
        deadline = time.monotonic() + 60
        while zombie.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _running([zombie], timeout=60) == []
        assert zombie.status() == psutil.STATUS_ZOMBIE  # returned before anyone reaped it
        assert _running([psutil.Process(running.pid)], timeout=0.2) == [psutil.Process(running.pid)]
    finally:
        running.kill()
        running.wait()
        ended.wait()


def test_the_embedded_rays_ports_are_distinct_and_never_its_dashboard_agents() -> None:
    """In a network namespace of its own whose free ports are 52364-52369, with 52367 and 52369 taken, the system
    hands out 52365 first (it tries odd ports first): the fixed port of Ray's dashboard agent, which made the
    embedded Ray refuse to start when it was given to the dashboard. It is passed over."""
    import subprocess
    import sys

    script = """import socket
taken = [socket.socket(), socket.socket()]
taken[0].bind(("127.0.0.1", 52367))
taken[1].bind(("127.0.0.1", 52369))
first = socket.socket()
first.bind(("127.0.0.1", 0))
print(first.getsockname()[1])
first.close()
from launcher.cluster import free_ports
print(*free_ports(2))"""
    namespace = 'ip link set lo up && sysctl -q -w net.ipv4.ip_local_port_range="52364 52369" && exec "$0" -c "$1"'
    out = subprocess.run(["unshare", "--net", "sh", "-c", namespace, sys.executable, script],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    system_first, ports = out.stdout.splitlines()
    assert system_first == "52365"  # what a port of its own would have been
    chosen = [int(p) for p in ports.split()]
    assert len(set(chosen)) == 2 and set(chosen) <= {52364, 52366, 52368}
