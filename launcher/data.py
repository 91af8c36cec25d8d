"""Which samples each rank reads at each step: a position in one global sample stream.

The stream is the concatenation of per-epoch permutations (seeded by run seed + epoch).
Step ``s`` consumes stream positions ``[s * G, (s + 1) * G)`` for global batch ``G``;
rank ``r`` takes the ``r``-th contiguous share and splits it into its micro-batches. When the
world size does not divide ``G``, the shares differ by at most one sample (``planner.shares``:
32 on 3 ranks is 11, 11, 10), and every rank still yields ``accum`` micro-batches per step,
sizes within a share differing by at most one. So the data position is just the step, the set
of samples in a step does not depend on the world size or the micro-batch, and every sample is
used once per epoch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from torch.utils.data import Dataset, Sampler

from launcher.planner import shares


@dataclass
class Data:
    """What a recipe's ``build_data`` returns: the splits and how to batch them."""

    train: Dataset
    eval: Dataset
    collate: Callable[[list[Any]], dict[str, torch.Tensor]]  # training micro-batches
    eval_collate: Callable[[list[Any]], dict[str, torch.Tensor]] | None = None  # None: ``collate``


def size(dataset: Dataset) -> int:
    """The number of samples of a map-style dataset (``Dataset`` itself does not declare ``__len__``)."""
    return len(dataset)  # type: ignore[arg-type]


def built_once(parent: Path, name: str, key: list[Any], build: Callable[[Path], None]) -> Path:
    """``parent/<name>-<hash of key>``, filled by ``build`` once per key.

    File-locked, so the workers of a node (and concurrent runs) build it once; a folder whose
    build was interrupted is rebuilt, because only a finished build leaves ``.done``.
    """
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    root = parent / f"{name}-{digest}"
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        if not (root / ".done").exists():
            root.mkdir(exist_ok=True)
            build(root)
            (root / ".done").touch()
    return root


def eval_shard(n: int, rank: int, world: int, micro: int, limit: int = 0) -> list[list[int]]:
    """This rank's evaluation micro-batches: every sample on exactly one rank (``rank::world``).

    ``limit`` > 0 keeps the first ``limit`` micro-batches per rank (a quick estimate).
    """
    mine = list(range(rank, n, world))
    chunks = [mine[i : i + micro] for i in range(0, len(mine), micro)]
    return chunks[:limit] if limit else chunks


def eval_samples(n: int, world: int, micro: int, limit: int = 0) -> int:
    """The distinct samples one evaluation covers, summed over the ranks' ``eval_shard``: ``n`` when ``limit`` is 0."""
    return sum(min(len(range(rank, n, world)), limit * micro if limit else n) for rank in range(world))


class StepBatches(Sampler[list[int]]):
    """Yields this rank's micro-batches (lists of indices) from ``start_step`` on, forever.

    An index is ``epoch * n + sample`` so a dataset can vary augmentation or masking by
    epoch; ``i % n`` is the sample.
    """

    def __init__(
        self,
        n: int,
        *,
        micro: int,
        accum: int,
        world: int,
        rank: int,
        seed: int,
        start_step: int = 0,
        global_batch: int | None = None,
    ) -> None:
        if n < 1:
            raise ValueError("the training set is empty")
        self.n, self.micro, self.accum, self.world, self.rank = n, micro, accum, world, rank
        self.seed, self.start_step = seed, start_step
        self.global_batch = micro * accum * world if global_batch is None else global_batch  # None: even shares
        sizes = shares(self.global_batch, world)
        self.first, self.share = sum(sizes[:rank]), sizes[rank]  # this rank's offset and samples in a step
        if self.share < accum or -(-self.share // accum) > micro:
            raise ValueError(
                f"rank {rank}'s share of {self.share} samples cannot be {accum} micro-batches of 1 to {micro} samples"
            )
        self._perm: tuple[int, torch.Tensor] | None = None

    def _order(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def indices(self, step: int) -> list[list[int]]:
        """This rank's micro-batches at ``step``: its share of the step's positions, in ``accum`` near-equal parts."""
        pos = step * self.global_batch + self.first
        out = []
        for size in shares(self.share, self.accum):
            batch = []
            for p in range(pos, pos + size):
                epoch, k = divmod(p, self.n)
                batch.append(epoch * self.n + int(self._order(epoch)[k]))
            out.append(batch)
            pos += size
        return out

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            yield from self.indices(step)
            step += 1

    def __len__(self) -> int:  # infinite stream; DataLoader only needs a number
        return 2**62


class SampleLedger:
    """An audit of which samples each optimizer step trained on, when ``$LAUNCHER_SAMPLE_LEDGER`` names a directory.

    Each rank appends one JSON line per step to ``rank<r>.jsonl``: the step and the ids of the
    samples in its micro-batches. The ids travel inside the batches through the DataLoader, so
    the ledger records what was loaded, not what the sampler meant to load. On start the lines
    of steps after the checkpoint are dropped: those steps were rolled back with the model.
    So after any number of restarts the ledger lists exactly the samples the model learned
    from; the failure tests check each sample of an epoch appears once. Inert when unset.
    """

    KEY = "_sample_ids"

    def __init__(self, path: Path, start_step: int, accum: int) -> None:
        self.roll_back(path, start_step)
        self.path, self.step, self.accum = path, start_step, accum

    @staticmethod
    def roll_back(path: Path, step: int) -> None:
        """Drop the lines of the steps after ``step`` (creating the file)."""
        kept = []
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(line + "\n" for line in kept))

    @classmethod
    def from_env(cls, rank: int, world: int, start_step: int, accum: int) -> SampleLedger | None:
        import os

        where = os.environ.get("LAUNCHER_SAMPLE_LEDGER")
        if not where:
            return None
        if rank == 0:  # the ranks a resize took away: their steps after the checkpoint were rolled back too
            for path in Path(where).glob("rank*.jsonl"):
                if path.stem[4:].isdigit() and int(path.stem[4:]) >= world:
                    cls.roll_back(path, start_step)
        return cls(Path(where) / f"rank{rank}.jsonl", start_step, accum)

    def dataset(self, data: Dataset) -> Dataset:
        return _WithIndex(data)

    def collate(self, collate: Callable[[list[Any]], dict[str, torch.Tensor]]) -> Callable[[list[Any]], Any]:
        return _CollateWithIds(collate, self.KEY)

    def record(self, batches: Iterator[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
        """The batches without their ids; a step's line is written when its last micro-batch is taken."""
        ids: list[int] = []
        taken = 0
        for batch in batches:
            ids += batch.pop(self.KEY).tolist()
            taken += 1
            if taken == self.accum:
                self.step += 1
                with self.path.open("a") as f:
                    f.write(json.dumps({"step": self.step, "ids": ids}) + "\n")
                ids, taken = [], 0
            yield batch


class _WithIndex(Dataset):
    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return i, self.data[i]


class _CollateWithIds:
    def __init__(self, collate: Callable[[list[Any]], dict[str, torch.Tensor]], key: str) -> None:
        self.inner, self.key = collate, key

    def __call__(self, items: list[tuple[int, Any]]) -> dict[str, torch.Tensor]:
        return {**self.inner([item for _, item in items]), self.key: torch.tensor([i for i, _ in items])}
