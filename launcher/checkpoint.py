"""Checkpoints: one ``state.pt`` per checkpoint directory, written atomically, read safely.

A checkpoint holds the model, optimizer, scheduler, RNG states, the step (which is the
data position, see ``launcher/data.py``), and the plan it was made under; ``meta.json``
beside it repeats the recipe, step and plan so the driver can plan a resume without
loading tensors. ``state.pt`` is loaded with ``torch.load(weights_only=True)``: no pickled
code runs on load. A checkpoint that cannot be read (truncated, corrupt) is skipped for
the one before it, with a warning; one from another recipe or model shape is refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

FILE = "state.pt"
META = "meta.json"


class CheckpointMismatch(RuntimeError):
    """A readable checkpoint that belongs to another recipe or model: never silently loaded."""


def save(directory: Path, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write ``state`` to ``directory/state.pt`` via a temporary name and an atomic rename."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (FILE + ".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    (directory / META).write_text(json.dumps({**meta, "bytes": tmp.stat().st_size}))
    tmp.replace(directory / FILE)
    return directory / FILE


def load(directory: Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save``; no arbitrary objects are unpickled."""
    path = Path(directory) / FILE
    if not path.exists():
        raise FileNotFoundError(f"no {FILE} in checkpoint {directory}")
    return torch.load(path, map_location="cpu", weights_only=True)


def candidates(run_dir: Path, warn: Callable[[str], None] = print) -> list[Path]:
    """A run's complete checkpoint directories, newest first.

    Complete: ``state.pt`` is there (it appears only by an atomic rename) and has the size
    ``meta.json`` recorded; a truncated one is skipped with a warning.
    """
    found = []
    for d in sorted(run_dir.glob("checkpoint_*"), key=lambda d: d.stat().st_mtime, reverse=True):
        if not (d / FILE).exists():
            continue
        expected, size = (meta(d) or {}).get("bytes"), (d / FILE).stat().st_size
        if expected is not None and size != expected:
            warn(f"warning: checkpoint {d} is incomplete ({size} of {expected} bytes); skipping it")
            continue
        found.append(d)
    return found


def meta(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / META).read_text())
    except (OSError, ValueError):
        return None


def restore(
    dirs: list[Path], recipe: str, apply: Callable[[dict[str, Any]], None], warn: Callable[[str], None]
) -> tuple[Path, dict[str, Any]] | None:
    """Load the first readable checkpoint of ``dirs`` (newest first) and ``apply`` it.

    Unreadable ones are skipped with a warning. A readable one from another recipe, or whose
    tensors do not fit the model (``apply`` raises), stops with ``CheckpointMismatch``.
    """
    for i, d in enumerate(dirs):
        try:
            state = load(d)
        except Exception as e:  # noqa: BLE001 - torch/zip/pickle errors of a torn file all mean "unreadable"
            older = "trying the one before it" if i + 1 < len(dirs) else "no older checkpoint is left"
            warn(f"warning: checkpoint {d} is unreadable ({type(e).__name__}: {str(e)[:160]}); {older}")
            continue
        if state.get("recipe") != recipe:
            raise CheckpointMismatch(
                f"checkpoint {d} is from recipe {state.get('recipe')!r}, not {recipe!r}; "
                "use another run.name, or run.resume=false to start over"
            )
        try:
            apply(state)
        except (RuntimeError, KeyError, ValueError) as e:
            first = str(e).strip().splitlines()[0][:300]
            raise CheckpointMismatch(
                f"checkpoint {d} does not fit this model ({first}); the recipe's model settings changed "
                "since it was written: use another run.name, or run.resume=false to start over"
            ) from None
        return d, state
    if dirs:
        raise RuntimeError(
            f"none of the {len(dirs)} checkpoints of this run could be read; run.resume=false starts over"
        )
    return None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
