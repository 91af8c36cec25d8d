"""One optimizer step: a step object chosen once per run (DDP or DeepSpeed), and what it shares.

Batch arithmetic (see launcher/planner.py): each optimizer step consumes ``global_batch =
micro_batch x grad_accum x world_size`` samples. A recipe's model returns loss *sums* (e.g.
summed cross-entropy over masked tokens); ``normalized_loss`` divides each by the number of
units (tokens, sentences, images) in the whole global batch, counted before the first
micro-step and all-reduced (``Units``). Because DDP averages gradients over
ranks, each rank scales its loss by the world size. The result is the gradient of the
global-batch mean, exactly, however the batch is split and however many tokens each
micro-batch holds.

Collectives per step, beyond DDP's (or ZeRO's) own gradient reduction: one, the step's named
scalars (``StepScalars``: out-of-memory, a graceful stop, the noise scale's local norm) after
the micro-steps; the gradient's norm and clipping run while it travels. The unit counts are
needed before the first backward, so they travel one step ahead in that all-reduce: the Trainer
fetches the next step's micro-batches before running this one, and their counts ride with this
step's scalars (``Units``). Only a run's first step (or a step taken without the next one's
batches) all-reduces its own counts first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

Batch = dict[str, torch.Tensor]
Count = Callable[[Batch], dict[str, int]]


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(values)
    return values


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def autocast(device: torch.device, precision: str) -> Any:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def split(batch: Batch, parts: int) -> list[Batch]:
    """``batch`` cut into up to ``parts`` non-empty pieces along the sample dimension."""
    cut = {k: v.tensor_split(parts) for k, v in batch.items()}
    pieces = [{k: cut[k][i] for k in batch} for i in range(parts)]
    return [p for p in pieces if batch_size(p)]


def batch_size(batch: Batch) -> int:
    return len(next(iter(batch.values())))


def joinable(planned: list[Batch]) -> bool:
    """Whether the planned micro-batches can be joined into one share: every tensor's trailing shape agrees.

    Fixed-size inputs join; batches padded to their own longest sequence or largest image (BERT,
    COCO collates) usually do not, and padding them alike would need the recipe's pad values.
    """
    first = planned[0]
    return all(b.keys() == first.keys() and all(b[k].shape[1:] == first[k].shape[1:] for k in first) for b in planned)


def regroup(planned: list[Batch], parts: int) -> list[Batch]:
    """This rank's share (the ``planned`` micro-batches) in ``parts`` micro-batches; 0: as planned.

    Joinable micro-batches are joined and cut into ``parts`` pieces in order, sizes differing by at
    most one (``split``): a share of 96 in 3 parts is 32 x 3 whether it was planned as 96 x 1 or
    48 x 2. Otherwise each planned micro-batch is cut into ``ceil(parts / len(planned))``; as the
    trainer plans them equal, the largest piece is then no larger than the joined cut's.
    """
    if not parts:
        return planned
    if len(planned) == 1:
        return split(planned[0], parts)
    if joinable(planned):
        return split({k: torch.cat([b[k] for b in planned]) for k in planned[0]}, parts)
    return [p for b in planned for p in split(b, -(-parts // len(planned)))]


def layout(planned: list[Batch], parts: int) -> list[int]:
    """The sizes of the micro-batches ``regroup(planned, parts)`` makes, without making them."""
    sizes = [batch_size(b) for b in planned]
    if not parts:
        return sizes
    if joinable(planned):
        return _cut(sum(sizes), parts)
    return [n for s in sizes for n in _cut(s, -(-parts // len(planned)))]


def _cut(n: int, parts: int) -> list[int]:
    """The sizes ``tensor_split`` gives ``n`` samples in ``parts`` pieces, empty ones dropped."""
    q, r = divmod(n, parts)
    return [q + 1] * r + [q] * (parts - r) if q else [1] * r


def describe(sizes: list[int]) -> str:
    """A split as ``micro-batch x count`` terms, largest first: ``32x3``, ``3x4+2x2`` (16 samples in 6)."""
    return "+".join(f"{n}x{sizes.count(n)}" for n in sorted(set(sizes), reverse=True))


def local_counts(micro_batches: list[Batch], count: Count) -> dict[str, float]:
    """Units (tokens, pairs, images) per loss term in this rank's micro-batches, by term in sorted order."""
    summed: dict[str, float] = {}
    for batch in micro_batches:
        for k, v in count(batch).items():
            summed[k] = summed.get(k, 0.0) + v
    return dict(sorted(summed.items()))


def global_counts(micro_batches: list[Batch], count: Count, device: torch.device) -> dict[str, float]:
    """Units per loss term in the whole global batch (at least 1 each): one all-reduce of its own."""
    local = local_counts(micro_batches, count)
    summed = all_sum(torch.tensor(list(local.values()), dtype=torch.float64, device=device)).tolist()
    return {k: max(v, 1.0) for k, v in zip(local, summed, strict=True)}


class Units:
    """The global batch's unit counts, one step ahead (see the module's docstring).

    ``ahead(upcoming)`` is this rank's counts of the next step's micro-batches, named for the
    step's scalar all-reduce; ``keep`` takes their sums out of the reduced scalars for step
    ``step``; ``totals`` gives them to that step, or all-reduces the step's own counts when none
    were kept for it (the first step, a step run without the next one's batches). The counts are
    whole numbers summed in float64: exact, so the normalization is the same either way.
    """

    PREFIX = "units/"

    def __init__(self, count: Count, device: torch.device) -> None:
        self.count, self.device = count, device
        self._kept: tuple[int, dict[str, float]] | None = None

    def totals(self, micro_batches: list[Batch], step: int) -> dict[str, float]:
        if self._kept is not None and self._kept[0] == step:
            return self._kept[1]
        return global_counts(micro_batches, self.count, self.device)

    def ahead(self, upcoming: list[Batch] | None) -> dict[str, float]:
        return {self.PREFIX + k: v for k, v in local_counts(upcoming, self.count).items()} if upcoming else {}

    def keep(self, scalars: dict[str, float], step: int) -> None:
        """The next step's counts out of ``scalars`` (the reduced values, which keep only the named ones)."""
        mine = {k: scalars.pop(k) for k in [k for k in scalars if k.startswith(self.PREFIX)]}
        if mine:
            self._kept = (step, {k[len(self.PREFIX):]: max(v, 1.0) for k, v in mine.items()})


def normalized_loss(out: dict[str, torch.Tensor], totals: dict[str, float], world: int) -> torch.Tensor:
    """The micro-batch's share of the global-batch mean loss (times ``world``: DDP averages over ranks)."""
    return sum(out[k] / totals[k] for k in out) * world  # type: ignore[return-value]


class StepScalars:
    """Scalars every rank contributes to once per step, summed over ranks in one all-reduce.

    A hook registers a name and a source (a function returning this rank's value, called at
    the reduction); the step object adds its own (``oom``) and reduces after the backward
    passes, before the optimizer step. ``values`` then holds the sums by name.
    """

    def __init__(self) -> None:
        self._sources: dict[str, Callable[[], float]] = {}
        self.values: dict[str, float] = {}

    def register(self, name: str, source: Callable[[], float]) -> None:
        if name in self._sources or name == "oom" or name.startswith(Units.PREFIX):
            raise ValueError(f"step scalar {name!r} is registered twice")
        self._sources[name] = source

    def reduce(self, device: torch.device, **local: float) -> dict[str, float]:
        return self.start(device, **local)()

    def start(self, device: torch.device, **local: float) -> Callable[[], dict[str, float]]:
        """The all-reduce begun, without waiting for it: what it returns waits, fills ``values`` and gives them.

        The sources are read now; the caller can do work that does not need the sums in the meantime.
        """
        names = [*local, *self._sources]
        mine = torch.tensor([*local.values(), *(source() for source in self._sources.values())], dtype=torch.float64,
                            device=device)  # fmt: skip
        work = dist.all_reduce(mine, async_op=True) if dist.is_initialized() else None

        def wait() -> dict[str, float]:
            if work is not None:
                work.wait()
            self.values = dict(zip(names, mine.tolist(), strict=True))
            return self.values

        return wait


@dataclass
class StepResult:
    sums: dict[str, torch.Tensor]  # this rank's loss sums per term
    totals: dict[str, float]  # the global batch's unit counts per term
    scalars: dict[str, float] = field(default_factory=dict)  # StepScalars.values, summed over ranks
    grad_norm: float | None = None  # the all-reduced gradient's norm, when clipping or a hook needed it
    micro_batch: int = 0  # this rank's largest micro-batch in the step (smaller after out-of-memory back-offs)
    grad_accum: int = 0  # this rank's micro-batches in the step (more after out-of-memory back-offs)


class BackOff(Exception):
    """Raised inside a DDP step when any rank ran out of memory: no step was taken."""


class DDPStep:
    """One optimizer step through a (DDP) model: accumulation, clipping, and out-of-memory back-off.

    An out-of-memory on any rank is learned by all from the step's scalar all-reduce; every
    rank then cuts its share (the step's samples on this rank, ``micro_batch x grad_accum``)
    into more micro-batches and retries the same step: the same samples, so the global batch
    and the loss normalization are unchanged. DDP's only collective is the all-reduce in the
    final micro-step's backward (the worker turns off DDP's per-forward buffer broadcast), so a
    rank that ran out skips its remaining micro-batches and runs the final one on a single
    sample with a zero loss: its all-reduce lines up with the others'.

    How many micro-batches (``_next_parts``): the memory profile is linear in the micro-batch
    (model states + ``per_sample x micro_batch``, launcher/planner.py), so an out-of-memory at
    the largest micro-batch ``s`` says only that the largest must shrink below ``s``. The share
    in ``p`` micro-batches goes to the fewest ``q > p`` whose largest is below ``s``: ``p + 1``
    when that shrinks it (96 = 48 x 2 -> 32 x 3, not halving's 24 x 4: one micro-step more,
    not two), more when ``p + 1`` would not (5 = 2+2+1 failing at 2: 2+1+1+1 is skipped, 1 x 5).
    Each micro-step more costs throughput, so no more are taken than the failure shows are
    needed; a second out-of-memory backs off again. Micro-batches stay near-equal (``regroup``).
    Each choice goes to ``on_back_off``; at micro-batch 1 the error is raised instead.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        count: Count,
        scalars: StepScalars,
        *,
        device: torch.device,
        precision: str = "fp32",
        grad_clip: float | None = None,
        need_grad_norm: bool = False,
        on_back_off: Callable[[dict[str, Any]], None] = lambda _event: None,
        guard: Callable[[nn.Module], AbstractContextManager[Any]] = lambda _m: nullcontext(),
    ) -> None:
        self.model, self.optimizer, self.count, self.scalars = model, optimizer, count, scalars
        self.device, self.precision, self.grad_clip = device, precision, grad_clip
        self.need_grad_norm, self.on_back_off, self.guard = need_grad_norm, on_back_off, guard
        self.no_sync = getattr(model, "no_sync", None)
        self.params = [p for p in model.parameters() if p.requires_grad]  # the ones that can have gradients
        self.world = world_size()
        self.parts = 0  # micro-batches this rank's share is cut into after out-of-memory back-offs; 0: as planned
        self.units = Units(count, device)

    def __call__(self, micro_batches: list[Batch], step: int, upcoming: list[Batch] | None = None) -> StepResult:
        """Step ``step`` (0-based) over this rank's micro-batches, retried in smaller ones after an out-of-memory.

        ``upcoming``: step ``step + 1``'s micro-batches, whose unit counts ride with this step's scalars.
        """
        totals, ahead = self.units.totals(micro_batches, step), self.units.ahead(upcoming)
        while True:
            pieces = regroup(micro_batches, self.parts)
            try:
                result = self.attempt(pieces, totals, ahead)
            except BackOff:
                self._back_off(step + 1, micro_batches)
                continue
            self.units.keep(result.scalars, step + 1)
            return result

    def attempt(
        self, micro_batches: list[Batch], totals: dict[str, float] | None = None, ahead: dict[str, float] | None = None
    ) -> StepResult:
        """One try: forward/backward over every micro-batch, the scalars' all-reduce, then the optimizer."""
        totals = totals or global_counts(micro_batches, self.count, self.device)
        sums: dict[str, torch.Tensor] = {}
        oom = False
        for i, batch in enumerate(micro_batches):
            final = i == len(micro_batches) - 1
            if oom and not final:
                continue
            with nullcontext() if final or self.no_sync is None else self.no_sync():
                if not oom:
                    oom = self._forward_backward(batch, totals, sums, final)
                if oom and final and self.no_sync is not None:
                    self._stand_in(batch)
        reduced = self.scalars.start(self.device, oom=float(oom), **(ahead or {}))
        norm = self._clip() if self.grad_clip or self.need_grad_norm else None  # while the scalars travel
        flags = reduced()
        if flags["oom"]:  # the gradients just clipped are dropped
            self.optimizer.zero_grad(set_to_none=True)
            raise BackOff
        sizes = [batch_size(b) for b in micro_batches]
        result = StepResult(sums, {k: totals[k] for k in sums}, flags, micro_batch=max(sizes), grad_accum=len(sizes))
        result.grad_norm = None if norm is None else float(norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return result

    def _clip(self) -> torch.Tensor:
        """The (all-reduced) gradient's norm; the gradients clipped to ``grad_clip`` when it is set."""
        params = [p for p in self.params if p.grad is not None]
        norm = nn.utils.get_total_norm([p.grad for p in params])  # type: ignore[misc]
        if self.grad_clip:
            nn.utils.clip_grads_with_norm_(params, self.grad_clip, norm)
        return norm

    def _forward_backward(
        self, batch: Batch, totals: dict[str, float], sums: dict[str, torch.Tensor], final: bool
    ) -> bool:
        """One micro-step; True when it ran out of memory (before DDP's all-reduce could start)."""
        try:
            with autocast(self.device, self.precision), self.guard(self.model):
                out = self.model(to_device(batch, self.device))
                loss = normalized_loss(out, totals, self.world)
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return True
        try:
            loss.backward()
        except torch.OutOfMemoryError as e:
            if final and self.no_sync is not None:  # DDP is mid all-reduce: ranks cannot be realigned
                raise RuntimeError(
                    f"out of memory in the gradient-synchronizing backward at micro-batch {batch_size(batch)}; "
                    "the last checkpoint is intact: rerun with a smaller batch.micro_batch"
                ) from e
            return True
        for k, v in out.items():
            sums[k] = sums.get(k, 0) + v.detach().double()
        return False

    def _stand_in(self, batch: Batch) -> None:
        """A zero-loss backward on one sample, so DDP's all-reduce matches the other ranks'."""
        with autocast(self.device, self.precision):
            out = self.model(to_device(split(batch, batch_size(batch))[0], self.device))
            loss = sum(v * 0.0 for v in out.values())
        loss.backward()  # type: ignore[union-attr]

    def _back_off(self, step: int, planned: list[Batch]) -> None:
        """After an OOM on any rank: the share in the fewest more micro-batches whose largest is smaller."""
        before = layout(planned, self.parts)
        size = max(before)
        if size == 1:
            raise RuntimeError(
                f"out of memory at micro-batch 1 (step {step}): the model states alone do not fit; "
                "try engine=deepspeed (action=plan says which ZeRO stage fits) or a smaller model"
            )
        self.parts = _next_parts(planned, len(before), size)
        after = layout(planned, self.parts)
        event = {"step": step, "size": size, "micro_batch": max(after), "grad_accum": len(after)}
        self.on_back_off({**event, "from": describe(before), "to": describe(after)})


def _next_parts(planned: list[Batch], parts: int, failed: int) -> int:
    """The fewest micro-batches, more than ``parts``, whose largest is below ``failed`` (see ``DDPStep``).

    Ends: at ``sum`` of the sizes (or ``len(planned) x`` the largest, unjoined) every micro-batch is 1.
    """
    more = parts + 1
    while max(layout(planned, more)) >= failed:
        more += 1
    return more


class DeepSpeedStep:
    """One optimizer step through a DeepSpeed engine, with the same loss normalization as ``DDPStep``.

    The engine counts micro-steps: ``engine.step()`` after each backward runs the (ZeRO)
    gradient reduction, clipping (``gradient_clipping`` in its config) and the optimizer only
    at the accumulation boundary. ``scale_wrt_gas=False``: the loss is already divided by the
    global batch's units, as for DDP. Precision is DeepSpeed's (``bf16`` in its config). No
    out-of-memory back-off: DeepSpeed's batch sizes are fixed in its config.
    """

    def __init__(self, engine: Any, count: Count, scalars: StepScalars, *, device: torch.device) -> None:
        self.engine, self.count, self.scalars, self.device = engine, count, scalars, device
        self.world = world_size()
        self.units = Units(count, device)

    def __call__(self, micro_batches: list[Batch], step: int, upcoming: list[Batch] | None = None) -> StepResult:
        totals = self.units.totals(micro_batches, step)
        sums: dict[str, torch.Tensor] = {}
        for batch in micro_batches:
            out = self.engine(to_device(batch, self.device))
            self.engine.backward(normalized_loss(out, totals, self.world), scale_wrt_gas=False)
            self.engine.step()
            for k, v in out.items():
                sums[k] = sums.get(k, 0) + v.detach().double()
        flags = self.scalars.reduce(self.device, **self.units.ahead(upcoming))
        self.units.keep(flags, step + 1)
        sizes = [batch_size(b) for b in micro_batches]
        return StepResult(sums, {k: totals[k] for k in sums}, flags, micro_batch=max(sizes), grad_accum=len(sizes))


def sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running stats) on every rank, before eval and checkpoints."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for b in getattr(model, "module", model).buffers():
            dist.broadcast(b, 0)


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[Batch], count: Count, device: torch.device, precision: str, keys: list[str]
) -> dict[str, float]:
    """Mean of each metric in ``keys`` (as the model returns it in eval mode) over all ranks' shares."""
    sync_buffers(model)
    module = getattr(model, "module", model)  # no DDP forward: ranks may hold different counts
    module.eval()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for batch in batches:
        with autocast(device, precision):
            out = module(to_device(batch, device))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
            counts[k] = counts.get(k, 0.0) + count(batch)[k]
    module.train()
    both = all_sum(
        torch.tensor(
            [sums.get(k, 0.0) for k in keys] + [counts.get(k, 0.0) for k in keys], dtype=torch.float64, device=device
        )
    )
    n = len(keys)
    return {f"eval_{k}": float(both[i] / both[n + i].clamp(min=1)) for i, k in enumerate(keys)}
