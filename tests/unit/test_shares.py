"""Any world size keeps the global batch (uneven shares), and on resume the new plan wins (issue #18).

1. The planner keeps a global batch the world size does not divide: shares that differ by at
   most one sample; ``StepBatches`` reads exactly the step's stream positions from them
   (hypothesis), and the gradient of one step over 2 or 3 gloo processes equals the
   single-process full-batch gradient with uneven token counts.
2. ``optim.apply_plan`` puts the plan's lr, weight decay and betas over a restored optimizer and
   schedule; under an unchanged plan the next step is bit-identical to an uninterrupted run's.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from launcher.config import Optim
from launcher.data import StepBatches
from launcher.launch import Resume
from launcher.optim import apply_plan, build_optimizer, build_scheduler, lr_factor
from launcher.planner import Hardware, MemoryProfile, Plan, PlanError, Reference, Request, describe, plan, shares
from launcher.step import Batch, DDPStep, StepScalars
from tests.conftest import spawn_gloo

REF = Reference(global_batch=32, lr=0.1, warmup_steps=2, max_steps=10, optimizer="sgd", lr_rule="linear")


def plan_for(world: int, global_batch: int, micro: int | None = None, bound_samples: int = 7100, **kw: Any) -> Plan:
    """A plan on ``world`` CPU devices whose memory bound is ``bound_samples`` (1 GB model, 0.01 GB/sample)."""
    mem = MemoryProfile.from_total(1.0, 0.01, source="override")
    hw = Hardware(nodes=1, devices_per_node=world, device_memory_gb=1.0 + bound_samples * 0.01, device="cpu")
    return plan(Request(reference=REF, global_batch=global_batch, micro_batch=micro, headroom=0.0, **kw), hw, mem)


# --- the planner ---------------------------------------------------------------------------------


def test_32_on_3_workers_is_11_11_10_and_says_so() -> None:
    p = plan_for(3, 32)
    assert (p.global_batch, p.target_global_batch, p.micro_batch, p.grad_accum) == (32, 32, 11, 1)
    assert shares(32, 3) == [11, 11, 10]
    assert any("uneven shares" in r and "2 rank(s) take 11 samples and 1 take 10" in r for r in p.reasons)
    assert "up to 11, shares of 11 or 10 samples" in describe(p) and "(target" not in describe(p)
    assert p.lr == pytest.approx(0.1)  # the lr follows the kept global batch, as on 2 workers
    assert (p.lr, p.max_steps, p.warmup_steps) == (lambda q: (q.lr, q.max_steps, q.warmup_steps))(plan_for(2, 32))


def test_uneven_plan_respects_the_memory_bound_and_round_trips() -> None:
    p = plan_for(3, 32, micro=4)  # 11 in 3 micro-batches of at most 4 (4, 4, 3); 10 as 4, 3, 3
    assert (p.micro_batch, p.grad_accum, p.global_batch) == (4, 3, 32)
    assert Plan.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    q = plan_for(5, 52, bound_samples=4)  # shares 11, 11, 10, 10, 10; bound 4 -> 3 micro-batches of at most 4
    assert (q.micro_batch, q.grad_accum, q.global_batch, q.max_micro_batch) == (4, 3, 52, 4)


def test_an_even_split_is_unchanged() -> None:
    p = plan_for(2, 32, micro=4)
    assert (p.micro_batch, p.grad_accum, p.global_batch) == (4, 4, 32)
    assert not any("uneven" in r for r in p.reasons)


def test_global_batch_below_the_world_and_one_sample_micro_batches_are_clear_errors() -> None:
    with pytest.raises(PlanError, match="batch.global_batch: global batch 2 is smaller than the world size 3"):
        plan_for(3, 2)
    # 7 on 3: shares 3, 2, 2; at 1 sample per micro-batch the 3-share needs 3 micro-steps, the 2-shares have 2
    with pytest.raises(PlanError, match=r"batch.global_batch: 7 on 3 workers .* every rank must run the same number"):
        plan_for(3, 7, bound_samples=1)
    assert (plan_for(3, 8, bound_samples=2).grad_accum, plan_for(3, 8, bound_samples=2).micro_batch) == (2, 2)


def test_deepspeed_takes_no_uneven_shares() -> None:
    p = plan_for(3, 32, engine="deepspeed")
    assert p.global_batch != 32 and p.global_batch == p.micro_batch * p.grad_accum * 3
    assert p.deepspeed is not None and p.deepspeed["train_batch_size"] == p.global_batch
    assert any("engine=deepspeed requires micro x accumulation x world = train_batch_size" in r for r in p.reasons)


# --- the shares cover the step's stream positions exactly once ------------------------------------


@settings(max_examples=200, deadline=None)
@given(world=st.integers(1, 8), times=st.integers(1, 20), extra=st.integers(0, 7), bound=st.integers(1, 64),
       step=st.integers(0, 3))
def test_shares_cover_the_steps_stream_positions_exactly_once(
    world: int, times: int, extra: int, bound: int, step: int
) -> None:
    global_batch = world * times + extra % world  # from 1x to 20x the world, dividing or not
    try:
        p = plan_for(world, global_batch, bound_samples=bound)
    except PlanError as e:  # only micro-batches of 1 sample with uneven shares cannot line up
        assert bound == 1 and global_batch % world and "same number" in str(e)
        return
    assert p.global_batch == global_batch
    sizes = shares(global_batch, world)
    assert sum(sizes) == global_batch and max(sizes) - min(sizes) <= 1
    n = 1000  # more than 4 steps of 20 x 8 + 7 samples: one epoch, so ids are positions through one permutation
    whole = StepBatches(n, micro=global_batch, accum=1, world=1, rank=0, seed=5).indices(step)[0]
    got = []
    for rank in range(world):
        mine = StepBatches(n, micro=p.micro_batch, accum=p.grad_accum, world=world, rank=rank, seed=5,
                           global_batch=p.global_batch).indices(step)
        assert len(mine) == p.grad_accum  # every rank the same number of micro-steps
        assert all(1 <= len(b) <= p.micro_batch <= p.max_micro_batch for b in mine)  # never empty, under the bound
        assert sum(map(len, mine)) == sizes[rank]
        got += [i for b in mine for i in b]
    assert got == whole  # the step's positions, in order, each exactly once


def test_even_shares_read_what_they_always_read() -> None:
    old = StepBatches(50, micro=4, accum=2, world=2, rank=1, seed=3)
    new = StepBatches(50, micro=4, accum=2, world=2, rank=1, seed=3, global_batch=16)
    assert [old.indices(s) for s in range(5)] == [new.indices(s) for s in range(5)]


# --- one step over uneven shares equals the full batch --------------------------------------------

VOCAB = 11


class TokenModel(nn.Module):
    """Per-token prediction (a sum over labeled tokens) plus a per-sequence one: two unit counts."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.tok, self.seq = nn.Embedding(VOCAB, 6), nn.Linear(6, VOCAB), nn.Linear(6, 2)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        h = self.emb(batch["ids"])
        tok = nn.functional.cross_entropy(self.tok(h).flatten(0, 1), batch["labels"].flatten(), reduction="sum")
        seq = nn.functional.cross_entropy(self.seq(h[:, 0]), batch["cls"], reduction="sum")
        return {"tok": tok, "seq": seq}


def token_count(batch: Batch) -> dict[str, int]:
    return {"tok": int((batch["labels"] != -100).sum()), "seq": len(batch["cls"])}


def items(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        length = int(torch.randint(2, 12, (1,), generator=g))  # uneven lengths -> uneven token counts
        ids = torch.randint(1, VOCAB, (length,), generator=g)
        labels = torch.where(torch.rand(length, generator=g) < 0.5, ids, torch.full_like(ids, -100))
        out.append({"ids": ids, "labels": labels, "cls": torch.tensor(i % 2)})
    return out


def collate(chunk: list[dict[str, torch.Tensor]]) -> Batch:
    pad = max(len(c["ids"]) for c in chunk)
    ids = torch.zeros(len(chunk), pad, dtype=torch.long)
    labels = torch.full((len(chunk), pad), -100)
    for j, c in enumerate(chunk):
        ids[j, : len(c["ids"])], labels[j, : len(c["ids"])] = c["ids"], c["labels"]
    return {"ids": ids, "labels": labels, "cls": torch.stack([c["cls"] for c in chunk])}


def token_model() -> nn.Module:
    torch.manual_seed(7)
    return TokenModel()


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in getattr(model, "module", model).parameters()])


def sgd_step(model: nn.Module, micro_batches: list[Batch]) -> None:
    """One SGD step at lr 1 (params - gradient: the parameters show the gradient at its scale)."""
    DDPStep(model, torch.optim.SGD(model.parameters(), lr=1.0), token_count, StepScalars(),
            device=torch.device("cpu"))(micro_batches, 0)


def _rank_step(rank: int, world: int, p: dict[str, Any]) -> tuple[torch.Tensor, list[int]]:
    plan_ = Plan.from_dict(p)
    data = items(plan_.global_batch)
    sampler = StepBatches(len(data), micro=plan_.micro_batch, accum=plan_.grad_accum, world=world, rank=rank,
                          seed=1, global_batch=plan_.global_batch)
    model = nn.parallel.DistributedDataParallel(token_model())
    micro = [collate([data[i] for i in b]) for b in sampler.indices(0)]
    sgd_step(model, micro)
    return flat(model), [token_count(b)["tok"] for b in micro]


@pytest.mark.parametrize(("world", "global_batch", "micro"), [(2, 7, None), (3, 32, 4)])
def test_one_step_over_uneven_shares_is_the_full_batch_step(world: int, global_batch: int, micro: int | None) -> None:
    p = plan_for(world, global_batch, micro=micro)
    assert p.micro_batch * p.grad_accum * world != global_batch  # really uneven
    out = spawn_gloo(_rank_step, world, world, p.to_dict())
    single = token_model()
    sampler = StepBatches(global_batch, micro=global_batch, accum=1, world=1, rank=0, seed=1)
    data = items(global_batch)
    sgd_step(single, [collate([data[i] for i in sampler.indices(0)[0]])])
    tokens = [t for r in range(world) for t in out[r][1]]
    assert len(set(tokens)) > 1  # uneven token counts across micro-batches and ranks
    for r in range(world):
        torch.testing.assert_close(out[r][0], out[0][0], rtol=0, atol=0)  # one step, the same on every rank
    start = flat(token_model())
    assert not torch.allclose(flat(single), start)
    torch.testing.assert_close(start - out[0][0], start - flat(single), rtol=1e-5, atol=1e-6)  # the gradients


# --- the new plan wins on resume -------------------------------------------------------------------


def small_plan() -> Plan:
    p = plan_for(1, 8)
    return replace(p, optimizer="adamw", weight_decay=0.01, warmup_steps=2, max_steps=10, schedule="linear")


def saved(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` through torch.save and torch.load, as a checkpoint holds it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def run_steps(
    model: nn.Module, p: Plan, optim: Optim, steps: range, state: dict[str, Any] | None = None
) -> tuple[dict[str, Any], list[float], list[str], torch.optim.Optimizer]:
    """``steps`` of training from scratch, or from a saved ``state`` and then the plan re-applied."""
    opt = build_optimizer(model, p, optim)
    sched = build_scheduler(opt, p)
    changed: list[str] = []
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        changed = apply_plan(opt, sched, p, optim)
    data = items(8 * steps.stop)
    lrs = []
    for s in steps:
        lrs.append(sched.get_last_lr()[0])
        step = DDPStep(model, opt, token_count, StepScalars(), device=torch.device("cpu"))
        step([collate(data[8 * s : 8 * s + 8])], s)
        sched.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    return saved(state), lrs, changed, opt


def test_a_resume_under_an_unchanged_plan_changes_nothing() -> None:
    p, optim = small_plan(), Optim()
    whole = token_model()
    _, whole_lrs, _, _ = run_steps(whole, p, optim, range(5))
    half, _, _, _ = run_steps(token_model(), p, optim, range(3))
    torch.manual_seed(99)  # a fresh process: other initial weights, overwritten by the checkpoint
    resumed = TokenModel()
    _, lrs, changed, _ = run_steps(resumed, p, optim, range(3, 5), state=half)
    assert changed == [] and lrs == whole_lrs[3:]
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_resume_under_a_new_plan_takes_its_lr_weight_decay_and_betas() -> None:
    p, optim = small_plan(), Optim()
    half, _, _, _ = run_steps(token_model(), p, optim, range(3))
    new = replace(p, lr=0.05, weight_decay=0.1, max_steps=20)
    betas = replace(optim, betas=[0.8, 0.99])
    _, lrs, changed, opt = run_steps(token_model(), new, betas, range(3, 5), state=half)
    assert lrs == [pytest.approx(0.05 * lr_factor(s, new)) for s in (3, 4)]  # the new lr and schedule (max_steps)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert all(tuple(g["betas"]) == (0.8, 0.99) for g in opt.param_groups)
    assert changed == [f"lr {p.lr:g} -> 0.05", "betas (0.9, 0.999) -> (0.8, 0.99)", "weight_decay 0.01 -> 0.1"]


def test_the_resume_note_lists_what_changed() -> None:
    two = plan_for(2, 32, micro=4)
    three = replace(plan_for(3, 32, micro=4, lr=0.05), warmup_steps=two.warmup_steps + 1)
    note = Resume(run_id="r", name="x", step=10, plan=two.to_dict()).explain(three)
    assert "global batch 32 kept" in note
    assert "world size 2 -> 3, so micro-batch x accumulation 4 x 4 -> 4 x 3 (at most; shares differing" in note
    assert f"lr 0.1 -> 0.05, warmup_steps {two.warmup_steps} -> {two.warmup_steps + 1}" in note
    same = Resume(run_id="r", name="x", step=10, plan=two.to_dict()).explain(two)
    assert same.endswith("lr schedule unchanged")
