"""Checkpoints: a ``{name: Stateful}`` map saved atomically and restored safely.

The layout, in one place (``layout`` / ``read_layout``):

    state.pt          rank 0's file: {"format": 2, "recipe", "step", "plan", "parts": {name: state_dict}}
                      parts: model, optimizer (DDP), scheduler, rng, and ema / noise_scale when on
    <name>_rank<r>.pt one file per rank for a part split over the ranks (DeepSpeed: ``zero``, its
                      ZeRO optimizer partition); such parts load only on the same world size
    meta.json         recipe, step, plan and the size of state.pt, so the driver plans a resume
                      without loading tensors

The step is the data position (``launcher/data.py``). A checkpoint written before the map
(format 1: the parts at the top level beside recipe, step and plan) is read as format 2.
``state.pt`` is loaded with ``torch.load(weights_only=True)``: no pickled code runs on load.
A checkpoint that cannot be read (truncated, corrupt) is skipped for the one before it, with
a warning; one from another recipe or model shape is refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import torch

FILE = "state.pt"
META = "meta.json"
FORMAT = 2  # the layout of state.pt (see above); format 1 had no "format" key
AfterWrite = Callable[[Path, int], None]


class Stateful(Protocol):
    """What the checkpointer saves and restores by name (torch modules, optimizers and schedulers are)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any], /) -> Any: ...


class Unreadable(Exception):
    """A part of a checkpoint (a rank's shard) cannot be read: skip the checkpoint for the one before."""


class CheckpointMismatch(RuntimeError):
    """A readable checkpoint that belongs to another recipe or model: never silently loaded."""


def save(
    directory: Path, state: dict[str, Any], meta: dict[str, Any], after_write: AfterWrite = lambda _tmp, _step: None
) -> Path:
    """Write ``state`` to ``directory/state.pt`` via a temporary name, fsync and an atomic rename."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (FILE + ".tmp")
    torch.save(state, tmp)
    after_write(tmp, int(meta.get("step", -1)))  # fault injection in tests (launcher/faults.py)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    (directory / META).write_text(json.dumps({**meta, "bytes": tmp.stat().st_size}))
    tmp.replace(directory / FILE)
    return directory / FILE


def shard_file(rank: int, name: str = "zero") -> str:
    """A rank's own file of a part split over the ranks (DeepSpeed: ``zero``, its ZeRO optimizer partition)."""
    return f"{name}_rank{rank}.pt"


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


def layout(recipe: str, step: int, plan: dict[str, Any], parts: dict[str, Any]) -> dict[str, Any]:
    """What ``state.pt`` holds (format 2)."""
    return {"format": FORMAT, "recipe": recipe, "step": step, "plan": plan, "parts": parts}


def read_layout(state: dict[str, Any]) -> dict[str, Any]:
    """A loaded ``state.pt`` as format 2; format 1 (launcher 08cb4ac and before) kept its parts at the top level."""
    version = state.get("format", 1)
    if version == FORMAT:
        return state
    if version == 1:
        head = ("recipe", "step", "plan")
        parts = {k: v for k, v in state.items() if k not in head}
        return layout(state.get("recipe", ""), int(state["step"]), state.get("plan") or {}, parts)
    raise CheckpointMismatch(
        f"checkpoint format {version} is newer than this launcher reads ({FORMAT}); upgrade the launcher"
    )


def shard_world_refusal(saved: int, world: int) -> str:
    """Why per-rank parts (ZeRO optimizer shards) cannot restore on another world size, and what to do."""
    return (
        f"cluster.num_workers: the checkpoint's ZeRO optimizer state is split over {saved} workers, this run has "
        f"{world}; resume it with cluster.num_workers={saved} (engine=ddp runs re-plan for any world size)"
    )


class RNG:
    """The torch (and CUDA) generators' states, as a Stateful part."""

    def state_dict(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any], /) -> None:
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    """Saves and restores a run's ``{name: Stateful}`` parts (see the layout above).

    ``parts`` are the same on every rank and saved by rank 0; ``shards`` are each rank's own
    (one file per rank and name). ``meta`` is what a checkpoint records beside them: the
    recipe and the plan it was made under.
    """

    def __init__(
        self,
        parts: dict[str, Stateful],
        shards: dict[str, Stateful],
        *,
        recipe: str,
        plan: dict[str, Any],
        rank: int,
        world: int,
        after_write: AfterWrite = lambda _tmp, _step: None,
    ) -> None:
        self.parts, self.shards, self.recipe, self.plan = parts, shards, recipe, plan
        self.rank, self.world, self.after_write = rank, world, after_write

    def save(self, directory: Path, step: int) -> None:
        """This rank's files of the checkpoint at ``step`` into ``directory`` (a local folder)."""
        for name, part in self.shards.items():
            _write_atomic(part.state_dict(), directory / shard_file(self.rank, name))
        if self.rank == 0:
            state = layout(self.recipe, step, self.plan, {n: p.state_dict() for n, p in self.parts.items()})
            save(directory, state, {"recipe": self.recipe, "step": step, "plan": self.plan}, self.after_write)

    def restore(self, dirs: list[str], warn: Callable[[str], None]) -> tuple[str, dict[str, Any]] | None:
        """Load the first readable checkpoint of ``dirs`` (paths or URIs, newest first) into the parts.

        Returns (its path, its state.pt less the parts: recipe, step, plan), or None when ``dirs``
        is empty. Unreadable ones are skipped with a warning. A readable one from another recipe,
        or whose tensors do not fit the model, stops with ``CheckpointMismatch``.
        """
        from ray.train import Checkpoint

        def skip(i: int, why: str) -> None:
            older = "trying the one before it" if i + 1 < len(dirs) else "no older checkpoint is left"
            warn(f"warning: checkpoint {dirs[i]} is unreadable ({why}); {older}")

        for i, d in enumerate(dirs):
            with Checkpoint(d).as_directory() as local:  # a download only when d is a URI
                try:
                    state = read_layout(load(Path(local)))
                except CheckpointMismatch:
                    raise
                except Exception as e:  # noqa: BLE001 - torch/zip/pickle errors of a torn file all mean "unreadable"
                    skip(i, f"{type(e).__name__}: {str(e)[:160]}")
                    continue
                try:
                    self._apply(d, state, Path(local), warn)
                except Unreadable as e:
                    skip(i, str(e))
                    continue
                return d, {k: v for k, v in state.items() if k != "parts"}
        if dirs:
            raise RuntimeError(
                f"none of the {len(dirs)} checkpoints of this run could be read; run.resume=false starts over"
            )
        return None

    def _apply(self, where: str, state: dict[str, Any], local: Path, warn: Callable[[str], None]) -> None:
        if state["recipe"] != self.recipe:
            raise CheckpointMismatch(
                f"checkpoint {where} is from recipe {state['recipe']!r}, not {self.recipe!r}; "
                "use another run.name, or run.resume=false to start over"
            )
        saved_world = (state["plan"] or {}).get("world_size", self.world)
        if self.shards and saved_world != self.world:
            raise CheckpointMismatch(shard_world_refusal(saved_world, self.world))
        try:
            for name, part in self.parts.items():
                if name in state["parts"]:
                    part.load_state_dict(state["parts"][name])
                elif self.rank == 0:
                    warn(f"checkpoint {PurePosixPath(where).name} has no {name}: it starts fresh")
            for name, part in self.shards.items():
                part.load_state_dict(_read_shard(local / shard_file(self.rank, name)))
        except (Unreadable, CheckpointMismatch):
            raise
        except (RuntimeError, KeyError, ValueError) as e:
            first = str(e).strip().splitlines()[0][:300]
            raise CheckpointMismatch(
                f"checkpoint {where} does not fit this model ({first}); the recipe's model settings changed "
                "since it was written: use another run.name, or run.resume=false to start over"
            ) from None


def _read_shard(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # type: ignore[no-any-return]
    except (OSError, RuntimeError, EOFError) as e:  # a torn or missing shard: try the checkpoint before
        raise Unreadable(f"{path.name}: {e}") from e


def _write_atomic(state: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
