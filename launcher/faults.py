"""Fault injection for tests, in one place: read from the environment once, when a worker starts.

Outside tests none of these variables is set and ``from_env()`` returns ``Faults()``, whose
parts are no-ops; nothing on a hot path reads the environment.

- ``LAUNCHER_INJECT_MEMORY_LIMIT=<bytes>``: a forward pass that makes autograd save more
  than that many bytes of activations (``SavedBytes``: each saved storage once) raises
  ``torch.OutOfMemoryError``, as a device would, so the out-of-memory back-off runs on CPU.
- ``LAUNCHER_INJECT_CHECKPOINT_KILL=<step>:<marker file>``: the process writing the
  checkpoint of that step is SIGKILLed halfway through writing ``state.pt``, once (the
  marker file says it happened).
- ``LAUNCHER_INJECT_HOLD=<step>:<file>[,<step>:<file>...]``: after finishing that step, every
  rank waits until the file exists (rank 0 says so once), so a test can lose or add a node
  while the run is at a known step.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


class SavedBytes:
    """Bytes autograd saves for backward (a ``saved_tensors_hooks`` pack hook), each tensor once:
    a ReLU output that the next layer also saves counts once; a view counts the bytes it spans;
    parameters (``skip``) do not count."""

    def __init__(self, skip: Iterable[torch.Tensor] = ()) -> None:
        self.skip = {p.data_ptr() for p in skip}
        self.seen: set[tuple[int, ...]] = set()
        self.total = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            ptr = t.data_ptr()
        except RuntimeError:  # sparse or storage-less: no address to share
            ptr = 0
        if ptr and ptr in self.skip:
            return t
        key = (ptr, t.numel(), t.element_size()) if ptr else (id(t),)
        if key not in self.seen:
            self.seen.add(key)
            self.total += t.numel() * t.element_size()
        return t


@dataclass(frozen=True)
class Faults:
    memory_limit: int = 0  # bytes of saved activations per forward; 0: no limit
    checkpoint_kill: tuple[int, Path] | None = None  # (step, marker file)
    holds: tuple[tuple[int, Path], ...] = ()  # (step, file): wait there until the file exists

    def hold(self, step: int, say: Any) -> None:
        """After finishing ``step``: wait for its file, if it has one."""
        for at, file in self.holds:
            if at == step and not file.exists():
                say(f"held after step {step} until {file} exists (fault injection)")
                while not file.exists():
                    time.sleep(0.1)

    def memory_guard(self, model: nn.Module) -> AbstractContextManager[Any]:
        """Around a forward pass: raises an out-of-memory past ``memory_limit``."""
        if not self.memory_limit:
            return nullcontext()
        saved, limit = SavedBytes(model.parameters()), self.memory_limit

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.pack(t)
            if saved.total > limit:
                raise torch.OutOfMemoryError(f"injected: {saved.total} bytes of activations > {limit}")
            return t

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def after_write(self, tmp: Path, step: int) -> None:
        """Between writing a checkpoint's ``state.pt`` (under its temporary name) and its rename."""
        if self.checkpoint_kill is None:
            return
        at, marker = self.checkpoint_kill
        if at != step or marker.exists():
            return
        marker.touch()
        with open(tmp, "r+b") as f:
            f.truncate(tmp.stat().st_size // 2)
        os.kill(os.getpid(), signal.SIGKILL)


def from_env() -> Faults:
    kill = os.environ.get("LAUNCHER_INJECT_CHECKPOINT_KILL")
    at, _, marker = (kill or "").partition(":")
    holds = [item.partition(":") for item in os.environ.get("LAUNCHER_INJECT_HOLD", "").split(",") if item]
    return Faults(
        memory_limit=int(os.environ.get("LAUNCHER_INJECT_MEMORY_LIMIT", "0")),
        checkpoint_kill=(int(at), Path(marker)) if kill else None,
        holds=tuple((int(step), Path(file)) for step, _, file in holds),
    )
