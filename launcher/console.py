"""The driver's console: the plan, then the run as rank 0 reports it.

Rank 0 posts its lines (evaluation, checkpoints, resumes) and each log step's progress from the
Trainer's metrics hook to the run's control actor (``launcher/control.py``); every rank posts its
Python warnings there too. The driver drains them every ``DRAIN_S`` while Ray Train runs, and once
more when it returns, and shows them here (rank 0's metrics for MLflow travel the same way and go to
the driver's tracker instead). No worker prints to the console.

On a terminal (rich): the plan as a table, then one progress bar for the run (step / max steps,
loss, lr, samples/s and the ETA, all as the metrics hook computed them, and the world size when it
differs from the plan's) with the other lines printed above it. Anywhere else (CI, ``| tee``, a
submitted job's log): plain text, the metrics hook's ``step N/M | loss ...`` line at every
``train.log_every``, as ``describe`` and the hooks write them.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from launcher.planner import describe, plan_rows

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

    from launcher.planner import Plan

DRAIN_S = 0.3  # how often the driver takes the actor's events: the display lags rank 0 by at most this


def terminal() -> bool:
    """Whether stdout is a terminal that can redraw a line (not a pipe, a file, or TERM=dumb)."""
    return sys.stdout.isatty() and os.environ.get("TERM") != "dumb"


def show_plan(p: Plan) -> None:
    """The plan: a rich table with its reasons on a terminal; ``describe``'s plain text anywhere else."""
    if not terminal():
        print(describe(p), flush=True)
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(title="plan", title_justify="left", show_header=False, box=box.SQUARE)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for what, value in plan_rows(p):
        table.add_row(what, value)
    console = Console(highlight=False)
    console.print(table)
    console.print("why:", style="bold")
    console.print(_numbered([f"{i + 1}." for i in range(len(p.reasons))], p.reasons))
    if p.notes:
        console.print("notes:", style="bold")
        console.print(_numbered(["-"] * len(p.notes), p.notes))


def _numbered(marks: list[str], texts: Sequence[str]) -> Any:
    """A list whose items wrap under their own text, not under the mark."""
    from rich.table import Table

    grid = Table.grid(padding=(0, 1))
    grid.add_column(justify="right", no_wrap=True)
    grid.add_column(overflow="fold")
    for mark, text in zip(marks, texts, strict=True):
        grid.add_row(mark, text)
    return grid


class Display:
    """Shows the events rank 0 (and any rank's warnings) posted: with rich on ``console`` (a terminal),
    else as plain lines on stdout."""

    def __init__(self, world_size: int, console: Console | None) -> None:
        self.world_size = world_size  # the plan's; the bar names the world only when it differs
        self.console = console
        self.warned: set[str] = set()  # a warning every rank raises is shown once
        self.bar: Progress | None = None
        self.task: Any = None

    def show(self, event: dict[str, Any]) -> None:
        if "warning" in event:
            if event["warning"] not in self.warned:
                self.warned.add(event["warning"])
                self._line(f"warning (rank {event['rank']}): {event['warning']}")
        elif "step" in event and self.console is not None:
            self._progress(event)
        else:
            self._line(event["line"])

    def _line(self, text: str) -> None:
        if self.console is None:
            print(text, flush=True)
        else:
            from rich.text import Text

            self.console.print(Text(text))  # above the bar while it shows; never read as markup

    def _progress(self, event: dict[str, Any]) -> None:
        from rich.progress import BarColumn, Progress, TextColumn

        if self.bar is None:
            self.bar = Progress(TextColumn("{task.fields[step]}"), BarColumn(bar_width=None),
                                TextColumn("{task.fields[stats]}"), console=self.console, expand=True)
            self.task = self.bar.add_task("run", total=event["max_steps"], step="", stats="")
            self.bar.start()
        world = f"  world {event['world_size']}" if event["world_size"] != self.world_size else ""
        stats = (f"loss {event['loss']:.4f}  lr {event['lr']:.3g}  {event['samples_per_s']:,.1f} samples/s  "
                 f"eta {duration(event['eta_s'])}{world}")
        self.bar.update(self.task, completed=event["step"], total=event["max_steps"],
                        step=f"step {event['step']}/{event['max_steps']}", stats=stats)

    def close(self) -> None:
        """The bar stays as it was last drawn; what follows prints below it."""
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def duration(seconds: float) -> str:
    """An ETA in the bar: 42s, 3m05s, 2h07m."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


@contextlib.contextmanager
def follow(actor: Any, world_size: int, record: Callable[[dict[str, Any]], bool]) -> Iterator[Display]:
    """While the block runs (Ray Train's ``fit``), the run's events drained from its control actor and shown,
    those that ``record`` takes (rank 0's metrics for MLflow) excepted; once more after it, so the last step's
    line, the final evaluation and checkpoint are shown too."""
    import ray

    if terminal():
        from rich.console import Console

        display = Display(world_size, Console(highlight=False))
    else:
        display = Display(world_size, None)
    done, one = threading.Event(), threading.Lock()  # one drain at a time: ``record`` is not thread-safe
    handled = [0]  # events handled so far: the actor forgets them at the next drain, and only them

    def drain() -> None:
        with one:
            for event in ray.get(actor.take.remote(handled[0]), timeout=30):
                handled[0] += 1  # counted first: an event that fails to show is not taken again
                if not record(event):
                    display.show(event)

    def loop() -> None:
        while not done.wait(DRAIN_S):
            with contextlib.suppress(Exception):  # a slow or lost answer: the next drain, or the last, has them
                drain()

    thread = threading.Thread(target=loop, name="console", daemon=True)
    thread.start()
    try:
        yield display
    finally:
        done.set()
        thread.join(timeout=35)
        with contextlib.suppress(Exception):
            drain()
        display.close()
