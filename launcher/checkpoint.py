"""Checkpoints: a ``{name: Stateful}`` map saved atomically and restored safely.

The layout, in one place (``layout`` / ``read_layout``):

    state.pt          rank 0's file: {"format": 2, "recipe", "step", "plan", "parts": {name: state_dict}}
                      parts: model, optimizer (DDP), scheduler, rng, and ema / noise_scale when on
    <name>_rank<r>.pt one file per rank for a part split over the ranks (DeepSpeed: ``zero``, its
                      ZeRO optimizer partition); such parts load only on the same world size
    meta.json         recipe, step, plan, the size of state.pt and ``"manifest": 1``, so the driver
                      plans a resume without loading tensors
    manifest_rank<r>.json  each rank's files (rank 0: state.pt, meta.json; every rank its shards) with
                      their size and SHA-256, hashed in the rank's local folder before the upload and
                      written into the storage's folder last, after Ray Train copied the files there

state.pt and the shards are written under a temporary name, fsynced and renamed in the local
folder; the copy to the storage is not atomic, so the manifests are what makes a checkpoint
complete: ``candidates`` uses one only when every rank's manifest is there and its files have the
recorded size and SHA-256 (``manifest`` computes one, ``verify`` checks one). A checkpoint whose
meta.json has no ``manifest`` key was written before manifests: only state.pt's size is checked.

The step is the data position (``launcher/data.py``). A checkpoint written before the map
(format 1: the parts at the top level beside recipe, step and plan) is read as format 2.
``state.pt`` is loaded with ``torch.load(weights_only=True)``: no pickled code runs on load.
A checkpoint that cannot be read (truncated, corrupt) is skipped for the one before it, with
a warning; one from another recipe or model shape is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import torch

FILE = "state.pt"
META = "meta.json"
FORMAT = 2  # the layout of state.pt (see above); format 1 had no "format" key
MANIFEST = 1  # meta.json's "manifest": the checkpoint has per-rank manifests (no key: written before them)
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
    _fsync(tmp)
    (directory / META).write_text(json.dumps({**meta, "bytes": tmp.stat().st_size, "manifest": MANIFEST}))
    tmp.replace(directory / FILE)
    return directory / FILE


def shard_file(rank: int, name: str = "zero") -> str:
    """A rank's own file of a part split over the ranks (DeepSpeed: ``zero``, its ZeRO optimizer partition)."""
    return f"{name}_rank{rank}.pt"


def manifest_file(rank: int) -> str:
    """The name of a rank's manifest in a checkpoint folder."""
    return f"manifest_rank{rank}.json"


def manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """Every file of one rank's local checkpoint folder: ``{name: {"bytes", "sha256"}}``."""
    files = sorted(p for p in directory.iterdir() if p.is_file())
    listed = {}
    for p in files:
        with open(p, "rb") as f:
            listed[p.name] = {"bytes": p.stat().st_size, "sha256": _sha256(f.read)}
    return listed


def write_manifest(filesystem: Any, path: str, rank: int, files: dict[str, dict[str, Any]]) -> None:
    """Rank ``rank``'s manifest into the checkpoint folder ``path`` of a pyarrow filesystem: last, after its files."""
    with filesystem.open_output_stream(f"{path}/{manifest_file(rank)}") as f:
        f.write(json.dumps({"manifest": MANIFEST, "rank": rank, "files": files}).encode())


def verify(filesystem: Any, path: str, files: dict[str, dict[str, Any]], *, hashes: bool = True) -> str | None:
    """Why the folder ``path`` does not hold ``files`` (a manifest's) as recorded, naming the file; None if it does.

    ``hashes=False`` checks that each file is there with its size, without reading it.
    """
    from pyarrow import fs as pafs

    for name, want in sorted(files.items()):
        info = filesystem.get_file_info(f"{path}/{name}")
        if info.type != pafs.FileType.File:
            return f"{name} is missing"
        if info.size != want.get("bytes"):
            return f"{name} has {info.size} of its {want.get('bytes')} bytes"
        if hashes:
            with filesystem.open_input_stream(f"{path}/{name}") as f:
                got = _sha256(f.read)
            if got != want.get("sha256"):
                return f"{name} has SHA-256 {got[:12]}..., its manifest recorded {str(want.get('sha256'))[:12]}..."
    return None


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
    time (``checkpoint_<date>``), so the name orders them. Complete: rank 0's manifest and,
    under DeepSpeed, every rank's (the plan's world size) are there and each file they list has
    its recorded size and SHA-256. Only the newest complete one is hashed: the older ones,
    fallbacks, get the size checks. One written before manifests needs ``state.pt`` at the size
    ``meta.json`` recorded and every ZeRO shard. Any other is skipped with one warning naming
    it and the file. The answer depends on the storage only, so every rank reaches the same one.
    """
    from pyarrow import fs as pafs

    filesystem, root = pafs.FileSystem.from_uri(run_root)
    infos = filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    found: list[str] = []
    for info in sorted(infos, key=lambda i: i.base_name, reverse=True):
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        where = f"{run_root.rstrip('/')}/{info.base_name}"
        why = _incomplete(filesystem, info.path, hashes=not found)
        if why is not None:
            warn(f"warning: checkpoint {where} is incomplete or damaged ({why}); skipping it")
            continue
        found.append(where)
    return found


def _incomplete(filesystem: Any, path: str, *, hashes: bool) -> str | None:
    """Why the checkpoint folder ``path`` cannot be used, naming the file; None when it is complete."""
    from pyarrow import fs as pafs

    recorded = _read_json(filesystem, f"{path}/{META}")
    if recorded is None:
        return f"no readable {META}"
    plan = recorded.get("plan") or {}
    ranks = int(plan.get("world_size", 1)) if plan.get("engine") == "deepspeed" else 0  # ranks with ZeRO shards
    if "manifest" not in recorded:  # written before manifests: state.pt's recorded size, every shard there
        expected = recorded.get("bytes")
        for name in [FILE] + [shard_file(r) for r in range(ranks)]:
            info = filesystem.get_file_info(f"{path}/{name}")
            if info.type != pafs.FileType.File:
                return f"{name} is missing"
            if name == FILE and expected is not None and info.size != expected:
                return f"{name} has {info.size} of its {expected} bytes"
        return None
    for r in range(max(ranks, 1)):
        listed = _read_json(filesystem, f"{path}/{manifest_file(r)}")
        files = listed.get("files") if listed is not None else None
        if not isinstance(files, dict):
            return f"{manifest_file(r)} is missing or unreadable"
        needed = ([FILE, META] if r == 0 else []) + ([shard_file(r)] if ranks else [])
        if unlisted := [n for n in needed if n not in files]:
            return f"{manifest_file(r)} does not list {', '.join(unlisted)}"
        if (why := verify(filesystem, path, files, hashes=hashes)) is not None:
            return why
    return None


def meta(directory: str | Path) -> dict[str, Any] | None:
    """``meta.json`` of a checkpoint (path or URI): recipe, step, plan, size of ``state.pt``."""
    from pyarrow import fs as pafs

    try:
        filesystem, path = pafs.FileSystem.from_uri(str(directory))
    except (OSError, ValueError):
        return None
    return _read_json(filesystem, f"{path}/{META}")


def _read_json(filesystem: Any, path: str) -> dict[str, Any] | None:
    """A JSON object from a pyarrow filesystem; None when it is missing or not a whole JSON object."""
    try:
        with filesystem.open_input_stream(path) as f:
            data = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _sha256(read: Callable[[int], bytes]) -> str:
    digest = hashlib.sha256()
    while chunk := read(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


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
    _fsync(tmp)
    tmp.replace(path)
