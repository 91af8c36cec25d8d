"""What passes between the driver and rank 0 while a run trains, on whatever node rank 0 is.

Three things: a graceful stop asked on the driver (Ctrl-C, SIGTERM, ``action=stop``), which
worker group trains (its world size and the last step it finished: what a restart, or an elastic
resize, follows), and events for the driver (``launcher/console.py`` drains them): rank 0's lines,
its metrics and records for MLflow (``launcher/tracking.py``: the driver sends them) and every
rank's Python warnings. All go through a tiny named Ray actor that the driver creates for the run,
so none needs a shared filesystem.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

POLL_S = 1.0  # rank 0 asks whether to stop at most this often (one round trip, ~1 ms)


class RunControl:
    """The actor's class (``ray.remote(num_cpus=0)(RunControl)``): a flag and a mailbox."""

    def __init__(self) -> None:
        self._stop = False
        self._group: dict[str, Any] | None = None  # the worker group training now, or the last one
        self._events: list[dict[str, Any]] = []  # for the driver, oldest first, from event number ``_first``
        self._first = 0

    def post(self, event: dict[str, Any]) -> None:
        """A line, a log step's progress, metrics or a record for MLflow, or a warning, for the driver."""
        self._events.append(event)

    def take(self, done: int) -> list[dict[str, Any]]:
        """The events after the first ``done`` (those the driver has handled: forgotten now). An answer that
        never arrives loses nothing: the next call, with the same ``done``, gets its events again."""
        del self._events[: done - self._first]
        self._first = max(self._first, done)
        return list(self._events)

    def group_started(self, group: dict[str, Any]) -> dict[str, Any] | None:
        """A worker group (re)started: its world, split and start step in; the previous group's out
        (None for the run's first: its start-up is timed), with the last step it finished."""
        previous, self._group = self._group, {**group, "reached": group["step"]}
        return previous

    def reached(self, step: int) -> None:
        """Rank 0 finished ``step`` (sent without waiting for an answer, after every step)."""
        if self._group is not None:
            self._group["reached"] = step

    def ask_stop(self) -> None:
        self._stop = True

    def stop_asked(self) -> bool:
        return self._stop


def actor_name(run_id: str) -> str:
    return f"launcher-control-{run_id}"


def create(run_id: str) -> Any:
    """The run's control actor (on the driver, after Ray is up)."""
    import ray

    # on the driver's node, as Ray Train's own controller: a node lost during training (an elastic
    # run shrinks) must not take the run's control with it
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(RunControl).options(name=actor_name(run_id), scheduling_strategy=here).remote()


class StopPoll:
    """Rank 0's ``Hooks.stop``: has a stop been asked? Asks the actor at most every ``POLL_S``."""

    def __init__(self, run_id: str) -> None:
        import ray

        self._ray, self._actor = ray, ray.get_actor(actor_name(run_id))
        self._next, self._asked = 0.0, False

    def __call__(self) -> bool:
        now = time.monotonic()
        if not self._asked and now >= self._next:
            self._next = now + POLL_S
            self._asked = bool(self._ray.get(self._actor.stop_asked.remote(), timeout=30))
        return self._asked

    def group_started(self, group: dict[str, Any]) -> dict[str, Any] | None:
        return self._ray.get(self._actor.group_started.remote(group), timeout=30)  # type: ignore[return-value]

    def reached(self, step: int) -> None:
        self._actor.reached.remote(step)  # ordered after this caller's earlier calls; no reply awaited


class ConsoleLink:
    """A rank's side of the driver's console and tracking: events posted to the run's control actor without
    waiting for a reply, in the order this process sends them (Ray runs one caller's calls in order)."""

    def __init__(self, run_id: str, rank: int) -> None:
        import ray

        self._actor, self.rank = ray.get_actor(actor_name(run_id)), rank

    def say(self, text: str) -> None:
        """One line on the driver's console (rank 0's ``say``)."""
        self._actor.post.remote({"line": text})

    def post(self, event: dict[str, Any]) -> None:
        """Any event: a log step's progress from the Trainer's metrics hook, with its plain line
        (``event["line"]``), or rank 0's metrics and records (``tracking.PostTracker``)."""
        self._actor.post.remote(event)

    def flush(self) -> None:
        """Wait until the actor has every event this process posted (a call's answer comes after theirs)."""
        import ray

        ray.get(self._actor.stop_asked.remote(), timeout=30)

    def forward_warnings(self) -> None:
        """This process's Python warnings to the driver's console too (they also stay in the worker's log),
        and those of the DataLoader processes forked from it (a skipped image is found there): a forked
        process must not use Ray, so it hands them through a pipe to a thread here, which posts them."""
        import multiprocessing
        import threading

        shown, pid = warnings.showwarning, os.getpid()
        forked = multiprocessing.get_context("fork").SimpleQueue()

        def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
            text = f"{category.__name__}: {message}"
            if os.getpid() == pid:
                self._actor.post.remote({"warning": text, "rank": self.rank})
            else:
                forked.put(text)
            shown(message, category, filename, lineno, file, line)

        def relay() -> None:
            while True:
                self._actor.post.remote({"warning": forked.get(), "rank": self.rank})

        threading.Thread(target=relay, name="warnings-from-loaders", daemon=True).start()
        warnings.showwarning = show
