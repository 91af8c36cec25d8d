"""The driver's console (``launcher/console.py``) on its own: plain lines off a terminal, rich at 80 columns.

The whole path (rank 0 -> the run's control actor -> the driver, in a real terminal) is
``tests/integration/test_console_tty.py``.
"""

from __future__ import annotations

import io
import re
from typing import Any

import pytest
from rich.console import Console

from launcher import console
from launcher.console import Display, duration
from launcher.planner import Hardware, MemoryProfile, describe, plan, request_from_config


def step_event(step: int, world: int = 2, **extra: Any) -> dict[str, Any]:
    """What the Trainer's metrics hook posts at a log step (``hooks.Metrics``)."""
    return {"loss": 8.7834, "mlm": 8.088, "nsp": 0.696, "lr": 0.000667, "samples_per_s": 165.8, "grad_accum": 1,
            "micro_batch": 16, "step": step, "max_steps": 10, "world_size": world, "eta_s": 65.2,
            "line": f"step {step}/10 | loss 8.7834 (mlm 8.088 nsp 0.696) | lr 0.000667 | 165.8 samples/s | eta 65s",
            **extra}


def test_off_a_terminal_every_event_is_its_plain_line(capsys: pytest.CaptureFixture[str]) -> None:
    display = Display(2, None)
    for event in [{"line": "first optimizer step 5.0s after the command started"}, step_event(5),
                  {"warning": "UserWarning: skipped unreadable image a.jpg", "rank": 1},
                  {"warning": "UserWarning: skipped unreadable image a.jpg", "rank": 0},  # every rank: shown once
                  step_event(10), {"line": "checkpoint at step 10"}]:
        display.show(event)
    display.close()
    assert capsys.readouterr().out.splitlines() == [
        "first optimizer step 5.0s after the command started",
        "step 5/10 | loss 8.7834 (mlm 8.088 nsp 0.696) | lr 0.000667 | 165.8 samples/s | eta 65s",
        "warning (rank 1): UserWarning: skipped unreadable image a.jpg",
        "step 10/10 | loss 8.7834 (mlm 8.088 nsp 0.696) | lr 0.000667 | 165.8 samples/s | eta 65s",
        "checkpoint at step 10",
    ]


def rendered(renderable: Any, width: int = 80) -> list[str]:
    out = Console(width=width, file=io.StringIO(), color_system=None, highlight=False)
    out.print(renderable)
    return out.file.getvalue().splitlines()  # type: ignore[attr-defined]


def test_on_a_terminal_one_bar_shows_the_hooks_numbers_in_80_columns() -> None:
    term = Console(width=80, file=io.StringIO(), force_terminal=True, color_system=None)
    display = Display(2, term)
    display.show({"line": "eval at step 5 on 128 samples: eval_mlm 7.6955 eval_nsp 0.6900"})
    assert display.bar is None  # no bar before the first log step
    display.show(step_event(5))
    assert display.bar is not None
    (bar,) = rendered(display.bar.get_renderable())
    assert len(bar) <= 80 and bar.startswith("step 5/10 ━")
    # the metrics hook's numbers as they came (eta_s 65.2 -> 1m05s): nothing measured here
    assert bar.endswith("loss 8.7834  lr 0.000667  165.8 samples/s  eta 1m05s")
    display.show(step_event(10, world=3, eta_s=0.0))  # an elastic run shrank or grew: the world is named
    (bar,) = rendered(display.bar.get_renderable())
    assert len(bar) <= 80 and bar.startswith("step 10/10 ━") and bar.endswith("eta 0s  world 3")
    display.close()
    assert "eval at step 5 on 128 samples" in term.file.getvalue()  # type: ignore[attr-defined]


@pytest.mark.parametrize(("seconds", "shown"), [(0.4, "0s"), (59.6, "1m00s"), (185, "3m05s"), (7625, "2h07m")])
def test_eta_in_the_bar(seconds: float, shown: str) -> None:
    assert duration(seconds) == shown


def bert_plan() -> Any:
    from launcher.cli import load

    cfg = load(["scale=smoke"])
    hw = Hardware(nodes=1, devices_per_node=2, device_memory_gb=12.0, device="cpu")
    return plan(request_from_config(cfg), hw, MemoryProfile.from_total(0.0131, 0.000937, source="estimate"))


def test_the_plan_is_a_table_on_a_terminal_and_describes_text_elsewhere(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    p = bert_plan()
    console.show_plan(p)  # pytest's stdout is no terminal: the text tests and users grep
    assert capsys.readouterr().out == describe(p) + "\n"

    monkeypatch.setattr(console, "terminal", lambda: True)
    monkeypatch.setenv("COLUMNS", "80")
    console.show_plan(p)
    lines = [line.rstrip() for line in capsys.readouterr().out.splitlines()]  # the title is padded
    assert max(map(len, lines)) <= 80
    assert lines[0] == "plan" and lines[1].startswith("┌") and lines[1].endswith("┐")
    assert any(re.fullmatch(r"│ micro-batch / device │ 16 \(memory bound \d+\) +│", line) for line in lines)
    words = " ".join(lines[lines.index("why:"):]).split()
    for i, reason in enumerate(p.reasons):  # every reason, wrapped under its own number
        assert " ".join(words).find(f"{i + 1}. {' '.join(reason.split())}") >= 0


def test_the_actor_forgets_only_the_events_the_driver_has_handled() -> None:
    """A drain whose answer is lost (a ``ray.get`` timed out) loses no event: rank 0's metrics travel this way."""
    from launcher.control import RunControl

    actor = RunControl()
    for i in range(3):
        actor.post({"line": f"line {i}"})
    assert [e["line"] for e in actor.take(0)] == ["line 0", "line 1", "line 2"]  # ... and the answer is lost
    assert [e["line"] for e in actor.take(0)] == ["line 0", "line 1", "line 2"]  # the next drain gets them again
    actor.post({"line": "line 3"})
    assert [e["line"] for e in actor.take(3)] == ["line 3"]  # handled ones forgotten, the new one kept
    assert actor.take(4) == [] and actor.take(4) == []
