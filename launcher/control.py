"""What passes between the driver and rank 0 while a run trains, on whatever node rank 0 is.

Two things: a graceful stop asked on the driver (Ctrl-C, SIGTERM, ``action=stop``), and the
metrics rank 0 could not send to MLflow by the end of training (and, once, whether this is the
run's first worker group, whose start-up is timed). Both go through a tiny
named Ray actor that the driver creates for the run, so neither needs a shared filesystem.
"""

from __future__ import annotations

import time
from typing import Any

POLL_S = 1.0  # rank 0 asks whether to stop at most this often (one round trip, ~1 ms)


class RunControl:
    """The actor's class (``ray.remote(num_cpus=0)(RunControl)``): a flag and a mailbox."""

    def __init__(self) -> None:
        self._stop = False
        self._backlog: dict[str, Any] | None = None
        self._started = False

    def first_start(self) -> bool:
        """True once per run: a worker group Ray Train restarts after a failure is not a start-up."""
        first, self._started = not self._started, True
        return first

    def ask_stop(self) -> None:
        self._stop = True

    def stop_asked(self) -> bool:
        return self._stop

    def keep(self, backlog: dict[str, Any]) -> None:
        self._backlog = backlog

    def kept(self) -> dict[str, Any] | None:
        return self._backlog


def actor_name(run_id: str) -> str:
    return f"launcher-control-{run_id}"


def create(run_id: str) -> Any:
    """The run's control actor (on the driver, after Ray is up)."""
    import ray

    return ray.remote(num_cpus=0)(RunControl).options(name=actor_name(run_id)).remote()


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

    def first_start(self) -> bool:
        return bool(self._ray.get(self._actor.first_start.remote(), timeout=30))

    def keep(self, backlog: dict[str, Any]) -> None:
        """Hand metrics that could not be sent to the driver, which sends or spools them."""
        self._ray.get(self._actor.keep.remote(backlog), timeout=30)
