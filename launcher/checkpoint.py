"""Checkpoints: one ``state.pt`` per checkpoint directory, written atomically, read safely.

A checkpoint holds the model, optimizer, scheduler, RNG states, the step (which is the
data position, see ``launcher/data.py``), and the plan it was made under. It is loaded
with ``torch.load(weights_only=True)``: no pickled code runs on load.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

FILE = "state.pt"


def save(directory: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``directory/state.pt`` via a temporary name and an atomic rename."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (FILE + ".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(directory / FILE)
    return directory / FILE


def load(directory: Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save``; no arbitrary objects are unpickled."""
    path = Path(directory) / FILE
    if not path.exists():
        raise FileNotFoundError(f"no {FILE} in checkpoint {directory}")
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
