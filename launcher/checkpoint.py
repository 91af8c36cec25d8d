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
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

FILE = "state.pt"
META = "meta.json"


class Unreadable(Exception):
    """A part of a checkpoint (a rank's shard) cannot be read: skip the checkpoint for the one before."""


class CheckpointMismatch(RuntimeError):
    """A readable checkpoint that belongs to another recipe or model: never silently loaded."""


def save(directory: Path, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write ``state`` to ``directory/state.pt`` via a temporary name and an atomic rename."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (FILE + ".tmp")
    torch.save(state, tmp)
    _die_mid_write(tmp, int(meta.get("step", -1)))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    (directory / META).write_text(json.dumps({**meta, "bytes": tmp.stat().st_size}))
    tmp.replace(directory / FILE)
    return directory / FILE


def _die_mid_write(tmp: Path, step: int) -> None:
    """Fault injection for tests: ``$LAUNCHER_INJECT_CHECKPOINT_KILL=<step>:<marker file>`` kills this
    process (SIGKILL) halfway through writing the checkpoint of that step, once (the marker file
    says it happened). Unset (always, outside tests): nothing."""
    spec = os.environ.get("LAUNCHER_INJECT_CHECKPOINT_KILL")
    if not spec:
        return
    at, _, marker = spec.partition(":")
    if int(at) != step or Path(marker).exists():
        return
    Path(marker).touch()
    with open(tmp, "r+b") as f:
        f.truncate(tmp.stat().st_size // 2)
    os.kill(os.getpid(), signal.SIGKILL)


def shard_file(rank: int) -> str:
    """A rank's own file in a checkpoint (DeepSpeed: its ZeRO optimizer partition)."""
    return f"zero_rank{rank}.pt"


def load(directory: Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save``; no arbitrary objects are unpickled."""
    path = Path(directory) / FILE
    if not path.exists():
        raise FileNotFoundError(f"no {FILE} in checkpoint {directory}")
    return torch.load(path, map_location="cpu", weights_only=True)


def candidates(run_root: str, warn: Callable[[str], None] = print) -> list[str]:
    """A run's complete checkpoint directories (paths or URIs), newest first.

    ``run_root`` is the run's directory in the storage: a local path or an object-store URI
    (read through pyarrow's filesystems, as Ray Train writes it). Ray names checkpoints by
    time (``checkpoint_<date>``), so the name orders them. Complete: ``state.pt`` is there
    (it appears only by an atomic rename) and has the size ``meta.json`` recorded, and under
    DeepSpeed every rank's ZeRO shard is there; an incomplete one is skipped with a warning.
    """
    from pyarrow import fs as pafs

    filesystem, root = pafs.FileSystem.from_uri(run_root)
    infos = filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    found = []
    for info in sorted(infos, key=lambda i: i.base_name, reverse=True):
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        state = filesystem.get_file_info(f"{info.path}/{FILE}")
        if state.type != pafs.FileType.File:
            continue
        where = f"{run_root.rstrip('/')}/{info.base_name}"
        recorded = meta(where) or {}
        expected = recorded.get("bytes")
        if expected is not None and state.size != expected:
            warn(f"warning: checkpoint {where} is incomplete ({state.size} of {expected} bytes); skipping it")
            continue
        plan = recorded.get("plan") or {}
        ranks = plan.get("world_size", 0) if plan.get("engine") == "deepspeed" else 0
        shards = [shard_file(r) for r in range(ranks)]
        missing = [f for f in shards if filesystem.get_file_info(f"{info.path}/{f}").type != pafs.FileType.File]
        if missing:
            warn(f"warning: checkpoint {where} lacks {', '.join(missing)} (ZeRO shards); skipping it")
            continue
        found.append(where)
    return found


def meta(directory: str | Path) -> dict[str, Any] | None:
    """``meta.json`` of a checkpoint (path or URI): recipe, step, plan, size of ``state.pt``."""
    from pyarrow import fs as pafs

    try:
        filesystem, path = pafs.FileSystem.from_uri(str(directory))
        with filesystem.open_input_stream(f"{path}/{META}") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def restore(
    dirs: list[str], recipe: str, apply: Callable[[dict[str, Any], Path], None], warn: Callable[[str], None]
) -> tuple[str, dict[str, Any]] | None:
    """Load the first readable checkpoint of ``dirs`` (paths or URIs, newest first) and ``apply`` it.

    ``apply(state, local_dir)`` gets rank 0's state and the checkpoint's local directory (where
    per-rank files, such as DeepSpeed's optimizer shards, are). Unreadable ones are skipped with
    a warning. A readable one from another recipe, or whose tensors do not fit the model
    (``apply`` raises), stops with ``CheckpointMismatch``.
    """
    from ray.train import Checkpoint

    def skip(i: int, why: str) -> None:
        older = "trying the one before it" if i + 1 < len(dirs) else "no older checkpoint is left"
        warn(f"warning: checkpoint {dirs[i]} is unreadable ({why}); {older}")

    for i, d in enumerate(dirs):
        with Checkpoint(d).as_directory() as local:  # a download only when d is a URI
            try:
                state = load(Path(local))
            except Exception as e:  # noqa: BLE001 - torch/zip/pickle errors of a torn file all mean "unreadable"
                skip(i, f"{type(e).__name__}: {str(e)[:160]}")
                continue
            if state.get("recipe") != recipe:
                raise CheckpointMismatch(
                    f"checkpoint {d} is from recipe {state.get('recipe')!r}, not {recipe!r}; "
                    "use another run.name, or run.resume=false to start over"
                )
            try:
                apply(state, Path(local))
            except Unreadable as e:
                skip(i, str(e))
                continue
            except CheckpointMismatch:
                raise
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
