"""The Trainer without Ray: a tiny model on CPU, the real step objects, hooks and checkpointer.

Where a collective matters (an out-of-memory on one rank only), two local processes run
``torch.distributed`` with gloo.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from launcher import checkpoint, hooks
from launcher.faults import Faults
from launcher.noise import NoiseScale
from launcher.optim import build_optimizer, build_scheduler
from launcher.planner import Hardware, MemoryProfile, Plan, plan, request_from_config
from launcher.step import Batch, DDPStep, StepResult, StepScalars, _next_parts, batch_size, joinable, layout, regroup
from launcher.trainer import HookBase, StepInfo, Trainer
from tests.conftest import ROOT, spawn_gloo

FIXTURE = ROOT / "tests" / "fixtures" / "checkpoint_v1"


class Tiny(nn.Sequential):
    """Linear -> BatchNorm -> Linear (the fixture's model): loss sums out, as a recipe's model returns them."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {"mse": (super().forward(batch["x"]) - batch["y"]).pow(2).sum()}


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return Tiny()


def count(batch: Batch) -> dict[str, int]:
    return {"mse": batch_size(batch)}


def stream(micro: int, seed: int = 1) -> Iterator[Batch]:
    g = torch.Generator().manual_seed(seed)
    while True:
        yield {"x": torch.randn(micro, 4, generator=g), "y": torch.randn(micro, 2, generator=g)}


def tiny_plan(max_steps: int = 6, micro: int = 4, accum: int = 2) -> Plan:
    from launcher.cli import load

    cfg = load([
        "recipe=imagenet", "scale=smoke", f"train.max_steps={max_steps}", f"batch.global_batch={micro * accum}",
        f"batch.micro_batch={micro}", "optim.lr=0.1", "train.warmup_steps=2",
        "planner.memory.model_gb=0.01", "planner.memory.per_sample_gb=0.001",
    ])
    hw = Hardware(nodes=1, devices_per_node=1, device_memory_gb=8.0, device="cpu")
    return plan(request_from_config(cfg), hw, MemoryProfile.from_total(0.01, 0.001, source="override"))


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def trainer(p: Plan, hook_list: list[HookBase], model: nn.Module | None = None, **step_kw: Any) -> Trainer:
    model = model or tiny()
    optimizer = build_optimizer(model, p, _optim())
    scalars = StepScalars()
    step = DDPStep(model, optimizer, count, scalars, device=torch.device("cpu"), **step_kw)
    return Trainer(model=model, step_fn=step, scheduler=build_scheduler(optimizer, p), batches=stream(p.micro_batch),
                   plan=p, start_step=0, hooks=hook_list, tracker=Recorder(), say=lambda _m: None, scalars=scalars)


def _optim() -> Any:
    from launcher.config import Optim

    return Optim()


class Recorder:
    """A tracker that keeps what it is given."""

    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.dicts: list[tuple[dict[str, Any], str]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        self.dicts.append((data, name))

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- the loop and its hooks


class Calls(HookBase):
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def before_train(self, trainer: Trainer) -> None:
        self.log.append(f"{self.name}.before_train")

    def before_step(self, trainer: Trainer) -> None:
        self.log.append(f"{self.name}.before_step")

    def after_step(self, trainer: Trainer, info: StepInfo) -> None:
        self.log.append(f"{self.name}.after_step {info.done}{' last' if info.last else ''}")

    def after_train(self, trainer: Trainer) -> None:
        self.log.append(f"{self.name}.after_train")


def test_fit_calls_hooks_in_their_order_around_each_step() -> None:
    log: list[str] = []
    trainer(tiny_plan(max_steps=2), [Calls("a", log), Calls("b", log)]).fit()
    assert log == [
        "a.before_train", "b.before_train",
        "a.before_step", "b.before_step", "a.after_step 1", "b.after_step 1",
        "a.before_step", "b.before_step", "a.after_step 2 last", "b.after_step 2 last",
        "a.after_train", "b.after_train",
    ]


def test_build_hooks_order() -> None:
    ema = AveragedModel(tiny())
    from launcher.noise import LocalGradNorm

    built = hooks.build_hooks(
        log_every=1, eval_every=0, checkpoint_every=0, evaluate=lambda _m: {}, eval_samples=1,
        save=lambda _s, _m: None, poll=None, startup={"launched_at": 0.0}, ema=ema,
        noise=(LocalGradNorm(), NoiseScale(b_small=1, b_big=2)),
    )
    assert [type(h).__name__ for h in built] == [
        "StartupTiming", "NoiseScaleHook", "EMAHook", "Metrics", "Evaluate", "PeriodicCheckpoint", "GracefulStop",
    ]
    plain = hooks.build_hooks(log_every=1, eval_every=0, checkpoint_every=0,
                              evaluate=lambda _m: {}, eval_samples=1, save=lambda _s, _m: None, poll=None)
    assert [type(h).__name__ for h in plain] == ["Metrics", "Evaluate", "PeriodicCheckpoint", "GracefulStop"]


def test_metrics_hook_logs_the_global_batch_mean_at_log_steps_and_the_end() -> None:
    p = tiny_plan(max_steps=5)
    lines: list[str] = []
    t = trainer(p, hooks.build_hooks(log_every=2, eval_every=0, checkpoint_every=0,
                                     evaluate=lambda _m: {"eval_mse": 1.0}, eval_samples=13,
                                     save=lambda _s, _m: None, poll=None))
    t.say = lines.append
    t.fit()
    logged = [(s, m) for s, m in t.tracker.metrics if "loss" in m]  # type: ignore[attr-defined]
    assert [s for s, _ in logged] == [2, 4, 5]
    assert all(m["samples_per_s"] > 0 and m["micro_batch"] == 4 and m["grad_accum"] == 2 for _, m in logged)
    assert all(m["loss"] == m["mse"] for _, m in logged)
    assert t.metrics["eval_mse"] == 1.0  # the last evaluation joined the last metrics
    # each evaluation says how many distinct samples it covered over all ranks, beside its metrics
    evals = [m for _, m in t.tracker.metrics if "eval_mse" in m]  # type: ignore[attr-defined]
    assert evals == [{"eval_samples": 13, "eval_mse": 1.0}]
    assert "eval at step 5 on 13 samples: eval_mse 1.0000" in lines


def test_the_progress_display_gets_the_metrics_hooks_own_numbers_and_line() -> None:
    """Rank 0's log steps go to the driver's progress display (``Trainer.progress``) as the metrics the
    tracker got, plus step, ETA, world and the plain line; none is said then. Without it the line is said."""
    p = tiny_plan(max_steps=5)
    events: list[dict[str, Any]] = []
    lines: list[str] = []
    t = trainer(p, [hooks.Metrics(2, [])])
    t.say, t.progress = lines.append, events.append
    t.fit()
    logged = [m for _, m in t.tracker.metrics]  # type: ignore[attr-defined]
    assert [e["step"] for e in events] == [2, 4, 5] and lines == []
    for event, metrics in zip(events, logged, strict=True):
        assert {k: event[k] for k in metrics} == metrics  # the same numbers, not recomputed
        assert event["max_steps"] == 5 and event["world_size"] == 1 and event["eta_s"] >= 0
        assert event["line"].startswith(f"step {event['step']}/5 | loss {metrics['loss']:.4f} (mse ")
    assert events[-1]["eta_s"] == 0 and events[-1]["line"].endswith("| eta 0s")

    said: list[str] = []
    t = trainer(p, [hooks.Metrics(2, [])])
    t.say = said.append
    t.fit()
    assert [line.split(" | ")[0] for line in said] == ["step 2/5", "step 4/5", "step 5/5"]


def test_the_ema_is_evaluated_on_the_same_samples_counted_once() -> None:
    p = tiny_plan(max_steps=2)
    model = tiny()
    ema = AveragedModel(model)
    t = trainer(p, [hooks.Evaluate(0, lambda m: {"eval_mse": 2.0 if m is ema else 1.0}, ema, samples=104)],
                model=model)
    t.fit()
    logged = t.tracker.metrics  # type: ignore[attr-defined]
    assert logged == [(2, {"eval_samples": 104, "eval_mse": 1.0, "eval_ema_mse": 2.0})]  # no eval_ema_samples


def test_ema_hook_averages_the_weights_after_every_step() -> None:
    p = tiny_plan(max_steps=3)
    model = tiny()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    snapshots: list[torch.Tensor] = []

    class Snap(HookBase):
        def after_step(self, trainer: Trainer, info: StepInfo) -> None:
            snapshots.append(flat(trainer.raw_model).clone())

    trainer(p, [Snap(), hooks.EMAHook(ema)], model=model).fit()
    expected = snapshots[0]  # AveragedModel copies the first update, then averages
    for s in snapshots[1:]:
        expected = 0.5 * expected + 0.5 * s
    torch.testing.assert_close(flat(ema.module), expected)


def test_graceful_stop_ends_after_the_step_with_a_checkpoint() -> None:
    p = tiny_plan(max_steps=10)
    asked = iter([False, False, True])
    saved: list[int] = []
    lines: list[str] = []
    t = trainer(p, hooks.build_hooks(log_every=5, eval_every=0, checkpoint_every=0,
                                     evaluate=lambda _m: {}, eval_samples=1, save=lambda s, _m: saved.append(s),
                                     poll=lambda: next(asked)))
    t.say = lines.append
    t.fit()
    assert saved == [3]  # the stop step is the last: checkpointed there, not at 10
    assert "stopped at step 3 of 10 as asked; the checkpoint above resumes it" in lines
    assert lines.index("checkpoint at step 3") < lines.index(
        "stopped at step 3 of 10 as asked; the checkpoint above resumes it")


# ---------------------------------------------------------------- out-of-memory back-off


class Lin(nn.Module):
    """No BatchNorm: any split of the batch gives the same gradient, so back-offs can be checked exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"mse": (self.net(batch["x"]) - batch["y"]).pow(2).sum()}


def lin() -> nn.Module:
    torch.manual_seed(0)
    return Lin()


def saved_per_sample() -> int:
    """Bytes autograd saves per sample in Lin's forward, counted as the injection counts them."""
    from launcher.faults import SavedBytes

    model = lin()
    saved = SavedBytes(model.parameters())
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        model(next(stream(4)))
    return saved.total // 4


class Results(HookBase):
    """Keeps every step's result."""

    def __init__(self) -> None:
        self.results: list[StepResult] = []

    def after_step(self, trainer: Trainer, info: StepInfo) -> None:
        self.results.append(info.result)


def joined(batches: Iterator[Batch], n: int) -> Iterator[Batch]:
    """``n`` batches of ``batches`` at a time as one: the same samples, un-split."""
    while True:
        group = [next(batches) for _ in range(n)]
        yield {k: torch.cat([b[k] for b in group]) for k in group[0]}


def oom_events(events: list[dict[str, Any]]) -> list[tuple[int, int, str, str]]:
    return [(e["step"], e["size"], e["from"], e["to"]) for e in events]


def test_oom_back_off_trains_a_share_of_96_that_fails_at_48_at_3_x_32() -> None:
    """Planned 48 x 2; 48 samples do not fit, 32 do: one micro-step more (3 x 32), not halving's 4 x 24."""
    p = tiny_plan(max_steps=2, micro=48, accum=2)
    whole, whole_results = trainer(tiny_plan(max_steps=2, micro=96, accum=1), [], model=lin()), Results()
    whole.hooks, whole.batches = [whole_results], joined(stream(48), 2)  # the same samples in one micro-batch
    whole.fit()
    events: list[dict[str, Any]] = []
    backed_results = Results()
    limit = Faults(memory_limit=40 * saved_per_sample())  # 32 samples fit, 48 do not
    backed = trainer(p, [backed_results], model=lin(), guard=limit.memory_guard, on_back_off=events.append)
    backed.fit()
    assert oom_events(events) == [(1, 48, "48x2", "32x3")]  # once: step 2 starts at 3 x 32
    assert (events[0]["micro_batch"], events[0]["grad_accum"]) == (32, 3)
    assert backed.step_fn.parts == 3  # type: ignore[attr-defined]
    for r, w in zip(backed_results.results, whole_results.results, strict=True):
        assert (r.micro_batch, r.grad_accum, int(r.totals["mse"])) == (32, 3, 96)  # the global batch unchanged
        torch.testing.assert_close(r.sums["mse"], w.sums["mse"])  # the same losses
    torch.testing.assert_close(flat(backed.model), flat(whole.model))  # the un-split full-batch update


def _five(limit: int) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    model = lin()
    events: list[dict[str, Any]] = []
    step = DDPStep(model, torch.optim.SGD(model.parameters(), lr=0.1), count, StepScalars(),
                   device=torch.device("cpu"), on_back_off=events.append, guard=Faults(memory_limit=limit).memory_guard)
    step([next(stream(5))], 0)
    return flat(model), events


def test_oom_back_off_skips_a_count_that_would_not_shrink_the_micro_batch() -> None:
    """A share of 5 failing at 2 (2+2+1): 4 parts are 2+1+1+1, still 2, so it goes to 1 x 5."""
    unsplit, _ = _five(0)
    backed, events = _five(int(1.5 * saved_per_sample()))  # 1 sample fits, 2 do not
    assert oom_events(events) == [(1, 5, "5x1", "3x1+2x1"), (1, 3, "3x1+2x1", "2x2+1x1"), (1, 2, "2x2+1x1", "1x5")]
    torch.testing.assert_close(backed, unsplit)


def test_oom_back_off_stops_with_an_error_at_one_sample() -> None:
    with pytest.raises(RuntimeError, match=r"out of memory at micro-batch 1 \(step 1\): the model states alone"):
        _five(1)  # not even one sample fits: 5 -> 3+2 -> 2+2+1 -> 1 x 5 -> the error


def test_oom_back_off_cuts_padded_micro_batches_each_when_they_cannot_be_joined() -> None:
    """Sequences padded per micro-batch (lengths 3 and 5) cannot be joined: each is cut, sizes still near-equal."""
    g = torch.Generator().manual_seed(0)
    padded = [{"x": torch.randn(4, n, 4, generator=g), "y": torch.randn(4, n, 2, generator=g)} for n in (3, 5)]
    assert not joinable(padded) and joinable([next(stream(4)), next(stream(4))])
    assert _next_parts(padded, 2, 4) == 3 and layout(padded, 3) == [2, 2, 2, 2]  # each planned one in ceil(3 / 2)
    assert [batch_size(b) for b in regroup(padded, 3)] == layout(padded, 3)
    assert torch.equal(torch.cat([b["x"] for b in regroup(padded, 3)[2:]]), padded[1]["x"])  # in order, uncopied


def test_oom_back_off_notice_says_what_changed() -> None:
    p = tiny_plan(max_steps=1, micro=48, accum=2)
    tracker, lines = Recorder(), list[str]()
    hooks.back_off_notice(p, tracker, lines.append)(
        {"step": 1, "size": 48, "micro_batch": 32, "grad_accum": 3, "from": "48x2", "to": "32x3"})
    assert lines == ["out of memory at micro-batch 48 (step 1): micro-batch 48x2 -> 32x3 per rank x world 1 (the "
                     "fewest micro-batches whose largest is below 48); retrying the step, global batch 96 unchanged"]
    name, record = tracker.dicts[0][1], tracker.dicts[0][0]
    assert name == "oom/step_1.json" and (record["micro_batch"], record["grad_accum"], record["to"]) == (32, 3, "32x3")


def _one_rank_runs_out(
    rank: int, limit: int, clip: float | None
) -> tuple[torch.Tensor, int, list[tuple[int, int, str, str]]]:
    model = nn.parallel.DistributedDataParallel(lin())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    events: list[dict[str, Any]] = []
    guard = Faults(memory_limit=limit if rank == 1 else 0).memory_guard  # only rank 1 runs out
    step = DDPStep(model, opt, count, StepScalars(), device=torch.device("cpu"), on_back_off=events.append,
                   guard=guard, grad_clip=clip)
    step([next(stream(96, seed=10 + rank))], 0)
    return flat(model.module), step.parts, oom_events(events)


@pytest.mark.parametrize("clip", [None, 1.0])  # 1.0 clips (the norm is 1.31): rank 0 clips its gradient, then drops it
def test_an_oom_on_one_rank_backs_off_every_rank_together(clip: float | None) -> None:
    out = spawn_gloo(_one_rank_runs_out, 2, 40 * saved_per_sample(), clip)  # 32 samples fit on rank 1, 48 do not
    (w0, parts0, e0), (w1, parts1, e1) = out[0], out[1]
    assert (parts0, parts1) == (3, 3)  # both learned each out-of-memory from the one all-reduce
    assert e0 == e1 == [(1, 96, "96x1", "48x2"), (1, 48, "48x2", "32x3")]
    single = lin()
    both = {k: torch.cat([next(stream(96, seed=10))[k], next(stream(96, seed=11))[k]]) for k in ("x", "y")}
    DDPStep(single, torch.optim.SGD(single.parameters(), lr=0.1), count, StepScalars(),
            device=torch.device("cpu"), grad_clip=clip)([both], 0)
    torch.testing.assert_close(w0, w1)  # the same step on both ranks
    torch.testing.assert_close(w0, flat(single))  # and the step of the whole global batch in one process


# ---------------------------------------------------------------- checkpoints


def parts_of(model: nn.Module, p: Plan) -> dict[str, checkpoint.Stateful]:
    optimizer = build_optimizer(model, p, _optim())
    return {
        "model": model, "optimizer": optimizer, "scheduler": build_scheduler(optimizer, p), "rng": checkpoint.RNG(),
        "ema": AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True),
        "noise_scale": NoiseScale(b_small=4, b_big=8),
    }


def advance(parts: dict[str, Any], steps: int) -> None:
    model = parts["model"]
    batches = stream(8, seed=3)
    for _ in range(steps):
        model(next(batches))["mse"].backward()
        parts["optimizer"].step()
        parts["optimizer"].zero_grad(set_to_none=True)
        parts["scheduler"].step()
        parts["ema"].update_parameters(model)
        parts["noise_scale"].update(2.0, 1.0)


def same_state(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def test_every_stateful_part_round_trips(tmp_path: Path) -> None:
    p = tiny_plan()
    parts = parts_of(tiny(), p)
    advance(parts, 3)
    before = {name: part.state_dict() for name, part in parts.items()}
    saver = checkpoint.Checkpointer(parts, {}, recipe="tiny", plan={"world_size": 1}, rank=0, world=1)
    saver.save(tmp_path / "checkpoint_1", step=3)
    torch.manual_seed(99)  # the RNG state too must come back
    fresh = parts_of(Tiny(), p)
    found = checkpoint.Checkpointer(fresh, {}, recipe="tiny", plan={}, rank=0, world=1).restore(
        [str(tmp_path / "checkpoint_1")], warn=print)
    assert found is not None and found[1]["step"] == 3 and found[1]["format"] == checkpoint.FORMAT
    for name, part in fresh.items():
        assert same_state(part.state_dict(), before[name]), name


def test_a_checkpoint_of_the_old_layout_restores(tmp_path: Path) -> None:
    """``tests/fixtures/checkpoint_v1`` was written by launcher 08cb4ac (its README has the script)."""
    raw = torch.load(FIXTURE / "state.pt", weights_only=True)
    assert "format" not in raw and "model" in raw  # the old layout: parts at the top level
    p = tiny_plan()
    fresh = parts_of(tiny(), p)
    found = checkpoint.Checkpointer(fresh, {}, recipe="tiny", plan={}, rank=0, world=2).restore(
        [str(FIXTURE)], warn=print)
    assert found is not None and found[1]["step"] == 3 and found[1]["plan"]["world_size"] == 2
    for name in ("model", "optimizer", "scheduler", "ema", "noise_scale", "rng"):
        assert same_state(fresh[name].state_dict(), raw[name]), name
    assert fresh["scheduler"].last_epoch == 3  # type: ignore[attr-defined]


def test_a_checkpoint_of_another_recipe_is_refused(tmp_path: Path) -> None:
    p = tiny_plan()
    with pytest.raises(checkpoint.CheckpointMismatch, match="from recipe 'tiny', not 'bert'"):
        checkpoint.Checkpointer(parts_of(tiny(), p), {}, recipe="bert", plan={}, rank=0, world=2).restore(
            [str(FIXTURE)], warn=print)


def test_shards_restore_only_on_the_world_they_were_split_over(tmp_path: Path) -> None:
    p = tiny_plan()
    shard = NoiseScale(b_small=1, b_big=2)  # any Stateful stands in for a ZeRO partition
    checkpoint.Checkpointer({}, {"zero": shard}, recipe="tiny", plan={"world_size": 2}, rank=0, world=2).save(
        tmp_path / "c", step=1)
    assert (tmp_path / "c" / "zero_rank0.pt").exists()
    other = checkpoint.Checkpointer(parts_of(tiny(), p), {"zero": shard}, recipe="tiny", plan={}, rank=0, world=3)
    with pytest.raises(checkpoint.CheckpointMismatch, match="split over 2 workers, this run has 3"):
        other.restore([str(tmp_path / "c")], warn=print)


# ---------------------------------------------------------------- collectives per step


class MaskedLin(Lin):
    """Loss over the rows whose mask is 1 only: each rank's unit count differs from step to step."""

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {"mse": ((self.net(batch["x"]) - batch["y"]).pow(2).sum(1) * batch["m"]).sum()}


def masked_count(batch: Batch) -> dict[str, int]:
    return {"mse": int(batch["m"].sum())}


def masked_stream(micro: int, seed: int) -> Iterator[Batch]:
    g = torch.Generator().manual_seed(seed)
    for batch in stream(micro, seed):
        yield {**batch, "m": (torch.rand(micro, generator=g) < 0.5).float()}


def _counted_run(rank: int, steps: int) -> tuple[torch.Tensor, list[int], list[float]]:
    """``steps`` optimizer steps of 2 x 3 samples per rank through the Trainer, counting the launcher's all-reduces."""
    import torch.distributed as dist

    calls: list[int] = []
    real = dist.all_reduce

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[-1] += 1
        return real(*args, **kwargs)

    class PerStep(HookBase):
        def before_step(self, trainer: Trainer) -> None:
            calls.append(0)

    p = tiny_plan(max_steps=steps, micro=3, accum=2)
    model = nn.parallel.DistributedDataParallel(_masked())
    scalars = StepScalars()
    t = Trainer(model=model, step_fn=DDPStep(model, torch.optim.SGD(model.parameters(), lr=0.1), masked_count,
                                             scalars, device=torch.device("cpu")),
                scheduler=torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1)]), lambda _s: 1.0),
                batches=masked_stream(3, seed=20 + rank), plan=p, start_step=0, hooks=[PerStep(), Results()],
                tracker=Recorder(), say=lambda _m: None, scalars=scalars)
    dist.all_reduce = counted  # type: ignore[assignment]
    try:
        t.fit()
    finally:
        dist.all_reduce = real
    totals = [r.totals["mse"] for r in t.hooks[1].results]  # type: ignore[attr-defined]
    return flat(model.module), calls, totals


def _masked() -> nn.Module:
    torch.manual_seed(0)
    return MaskedLin()


def test_one_all_reduce_per_step_beyond_ddps_and_the_same_steps() -> None:
    """The unit counts travel one step ahead with the step's scalars: one all-reduce per step (two on the
    first, which counts its own), and the steps equal those of the whole global batch in one process."""
    steps = 4
    out = spawn_gloo(_counted_run, 2, steps)
    (w0, calls0, totals0), (w1, calls1, totals1) = out[0], out[1]
    assert calls0 == calls1 == [2] + [1] * (steps - 1)
    single = _masked()
    step = DDPStep(single, torch.optim.SGD(single.parameters(), lr=0.1), masked_count, StepScalars(),
                   device=torch.device("cpu"))
    streams = [masked_stream(3, seed=20), masked_stream(3, seed=21)]
    expected = []
    for i in range(steps):  # each step's own counts, all-reduced before it: the reference normalization
        micro = [next(s) for s in streams for _ in range(2)]
        expected.append(step(micro, i).totals["mse"])
    assert totals0 == totals1 == expected and len(set(expected)) > 1  # the counts vary from step to step
    torch.testing.assert_close(w0, w1)
    torch.testing.assert_close(w0, flat(single))
