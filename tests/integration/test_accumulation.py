"""Gradient accumulation is exact: 8 x 1 == 4 x 2 == 2 workers x 4, with uneven token counts.

A tiny BERT (dropout off) takes one SGD step on the same 8 sentence pairs split three ways;
the pairs have different lengths, so micro-batches hold different numbers of tokens and
masked positions. SGD (not Adam, whose first step hides the gradient's scale) makes any
normalization error show up in the parameters.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from launcher.cli import load
from launcher.cluster import start_local, stop
from launcher.step import DDPStep, StepScalars
from recipes import bert

CFG = load(["scale=smoke", "recipe.model.dropout=0.0"])


def pairs(n: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        length = int(torch.randint(8, 40, (1,), generator=g))  # uneven lengths -> uneven token counts
        ids = torch.randint(len(bert.SPECIALS), CFG.recipe.model.vocab_size, (length,), generator=g)
        ids[0], ids[length // 2], ids[-1] = bert.CLS, bert.SEP, bert.SEP
        masked, labels = bert.mask_tokens(ids, 0.3, CFG.recipe.model.vocab_size, g)
        types = (torch.arange(length) > length // 2).long()
        items.append(
            {"input_ids": masked, "token_type_ids": types, "labels": labels, "next_sentence_label": torch.tensor(i % 2)}
        )
    return items


def fresh_model() -> torch.nn.Module:
    torch.manual_seed(123)
    return bert.build_model(CFG)


def one_step(model: torch.nn.Module, micro_batches: list[dict[str, torch.Tensor]]) -> torch.nn.Module:
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    DDPStep(model, opt, bert.count, StepScalars(), device=torch.device("cpu"))(micro_batches, 0)
    return model


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in getattr(model, "module", model).parameters()])


def test_uneven_token_counts_really_are_uneven() -> None:
    items = pairs()
    a, b = bert.collate(items[:4]), bert.collate(items[4:])
    assert bert.count(a)["mlm"] != bert.count(b)["mlm"]
    assert a["input_ids"].shape[1] != b["input_ids"].shape[1]


def test_accumulation_equals_one_big_batch() -> None:
    items = pairs()
    big = flat(one_step(fresh_model(), [bert.collate(items)]))
    acc = flat(one_step(fresh_model(), [bert.collate(items[:4]), bert.collate(items[4:])]))
    acc8 = flat(one_step(fresh_model(), [bert.collate(items[i : i + 1]) for i in range(8)]))
    start = flat(fresh_model())
    assert not torch.allclose(big, start)  # the step moved the weights
    torch.testing.assert_close(acc, big, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acc8, big, rtol=1e-5, atol=1e-6)


def test_naive_mean_of_means_would_differ() -> None:
    """The check above is sensitive: averaging per-micro-batch means does not match."""
    items = pairs()
    big = flat(one_step(fresh_model(), [bert.collate(items)]))
    model = fresh_model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for half in (items[:4], items[4:]):
        batch = bert.collate(half)
        out = model(batch)
        counts = bert.count(batch)
        (sum(out[k] / counts[k] for k in out) / 2).backward()
    opt.step()
    assert not torch.allclose(flat(model), big, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def local_ray():
    start_local(2)  # the launcher's own embedded Ray: loopback, no auth token
    yield
    stop(Path(tempfile.gettempdir()) / "launcher-test-ray-logs")  # and its address


def test_two_workers_match_one_big_batch(local_ray: None) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    items = pairs()
    big = flat(one_step(fresh_model(), [bert.collate(items)]))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "params.pt"

        def per_worker(payload: dict) -> None:
            import ray.train
            import ray.train.torch

            rank = ray.train.get_context().get_world_rank()
            # the embedded Ray's workers run at the launcher's priority, not Ray's nice 15 (starved by any busy process)
            assert os.nice(0) == payload["nice"], f"worker niceness {os.nice(0)}, driver {payload['nice']}"
            model = ray.train.torch.prepare_model(fresh_model())
            mine = payload["items"][4 * rank : 4 * rank + 4]
            one_step(model, [bert.collate(mine)])
            if rank == 0:
                torch.save(flat(model), payload["out"])
            ray.train.report({"done": 1})

        TorchTrainer(
            per_worker,
            train_loop_config={"items": items, "out": str(out), "nice": os.nice(0)},
            scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
            run_config=RunConfig(storage_path=tmp, name="accum"),
        ).fit()
        ddp = torch.load(out, weights_only=True)
    torch.testing.assert_close(ddp, big, rtol=1e-5, atol=1e-6)
