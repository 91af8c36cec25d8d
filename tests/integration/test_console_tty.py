"""The console as a user sees it: ``make run``'s command in an 80-column terminal (tmux), and where Ray's
own output goes. The plain fallback off a terminal is what every other launcher test reads
(``tests/integration/test_train.py`` checks it has no Ray prefixes either).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

PREFIX = re.compile(r"\((?:RayTrainWorker|TrainController|\w+) pid=\d+")  # Ray's log_to_driver prefix


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (.ci/run installs it)")
def test_make_run_in_an_80_column_terminal_shows_the_plan_table_a_bar_and_no_ray_lines(
    tmp_path: Path, shared_outputs: Path
) -> None:
    socket = f"launcher-test-{tmp_path.name}"  # a tmux server of its own: nobody else's sessions are touched
    tmux = ["tmux", "-L", socket, "-f", str(tmp_path / "tmux.conf")]
    (tmp_path / "tmux.conf").write_text("set -g remain-on-exit on\nset -g history-limit 10000\n")
    command = [sys.executable, "-m", "launcher", "scale=smoke", "train.max_steps=10", "train.log_every=5",
               f"run.output_dir={shared_outputs}"]  # make run's command, shorter (the tokenizer cache shared)
    # its exit status printed by the shell: tmux 3.3a was seen to leave the launcher a zombie, without a status
    shell = f"{shlex.join(command)}; echo launcher exited $?"
    earlier = set(shared_outputs.glob("logs/*"))  # other tests' runs share these outputs
    subprocess.run([*tmux, "new-session", "-d", "-s", "run", "-x", "80", "-y", "30", "-c", str(tmp_path), shell],
                   check=True, cwd=ROOT)  # the server inherits this test's environment
    try:
        deadline = time.monotonic() + 600
        while "launcher exited " not in (screen := pane(tmux)):
            assert time.monotonic() < deadline, screen
            time.sleep(1)
        joined = pane(tmux, "-J")  # lines the terminal wrapped, joined again: what was written as one line
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
    lines = screen.splitlines()
    ended = next(i for i, line in enumerate(lines) if line.startswith("launcher exited "))
    assert lines[ended] == "launcher exited 0", screen
    lines = lines[:ended]  # what the launcher wrote (tmux adds "Pane is dead" below)
    assert lines.count("plan") == 1 and any(re.fullmatch(r"┌─+┬─+┐", line) for line in lines), screen
    assert any(re.fullmatch(r"│ micro-batch / device │ 16 \(memory bound \d+\) +│", line) for line in lines), screen
    assert "why:" in lines and not any(line.startswith("-----") for line in lines)  # not the plain text
    bar = [i for i, line in enumerate(lines) if re.match(r"step 10/10 ━+ loss \d+\.\d{4}  lr ", line)]
    assert len(bar) == 1 and lines[bar[0]].endswith("samples/s  eta 0s"), screen  # one bar, its last state
    assert not re.search(r"^step \d+/10 \|", screen, flags=re.MULTILINE)  # no plain step lines on a terminal
    above = "\n".join(lines[: bar[0]])
    assert "eval at step 10 on " in above and "checkpoint at step 10" in above, screen  # lines above the bar
    assert not PREFIX.search(screen) and "Failed to register placement group" not in screen, screen
    drawn = [line for line in joined.splitlines() if line.startswith(("step 10/10", "┌", "│", "└"))]
    assert len(drawn) > 15 and max(map(len, drawn)) <= 80, joined  # rich drew the table and bar for 80 columns
    (logs,) = set(shared_outputs.glob("logs/*")) - earlier  # this run's
    workers = [f for f in logs.glob("session_*/worker-*.out") if ":actor_name:RayTrainWorker" in f.read_text()]
    assert len(workers) == 2  # the two training workers' own output, kept with the run's logs


def pane(tmux: list[str], *flags: str) -> str:
    """The pane's text, its scrollback included."""
    return subprocess.run([*tmux, "capture-pane", "-p", "-S", "-", *flags, "-t", "run"], capture_output=True,
                          text=True, check=True).stdout


def test_run_verbose_puts_ray_workers_output_on_the_console_and_keeps_it_in_the_logs(tmp_path: Path) -> None:
    """``run.verbose=true`` (``cluster.start_local(verbose=True)``): a Ray worker's line reaches the driver's
    console, with Ray's prefix, and is kept with the run's logs too (``cluster.stop``). Without it the
    console has none (the test above, and test_train.py off a terminal)."""
    script = (
        "import sys, time\nfrom pathlib import Path\nimport ray\nfrom launcher import cluster\n"
        "cluster.start_local(1, verbose=True)\n"
        "@ray.remote\ndef shout():\n    print('a line from a Ray worker', flush=True)\n"
        "ray.get(shout.remote())\ntime.sleep(2)  # Ray's log monitor forwards within a second\n"
        "cluster.stop(Path(sys.argv[1]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "logs")], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"\(shout pid=\d+\).* a line from a Ray worker", out.stdout + out.stderr), out.stdout + out.stderr
    kept = [f for f in (tmp_path / "logs").glob("session_*/worker-*.out")
            if "a line from a Ray worker" in f.read_text()]
    assert len(kept) == 1
