"""The global sample stream: every sample once per epoch, the same set per step at any split; the evaluation
shards: every sample on exactly one rank."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from launcher.data import StepBatches, eval_samples, eval_shard


def _step_samples(n: int, step: int, micro: int, accum: int, world: int, seed: int = 0) -> list[int]:
    out = []
    for rank in range(world):
        s = StepBatches(n, micro=micro, accum=accum, world=world, rank=rank, seed=seed)
        out += [i for batch in s.indices(step) for i in batch]
    return out


@settings(max_examples=60, deadline=None)
@given(n=st.integers(5, 200), micro=st.integers(1, 8), accum=st.integers(1, 4), world=st.integers(1, 4))
def test_every_sample_exactly_once_per_epoch(n: int, micro: int, accum: int, world: int) -> None:
    global_batch = micro * accum * world
    steps = n // global_batch + 2
    seen = [i for step in range(steps) for i in _step_samples(n, step, micro, accum, world)]
    epoch0 = [i for i in seen if i < n]
    # the first n stream positions are epoch 0: a permutation of the dataset
    assert sorted(seen[:n]) == list(range(n))
    assert len(epoch0) == len(set(epoch0)) == min(n, len(seen))


@settings(max_examples=40, deadline=None)
@given(step=st.integers(0, 50))
def test_a_step_holds_the_same_samples_whatever_the_split(step: int) -> None:
    a = _step_samples(37, step, micro=8, accum=1, world=1)
    b = _step_samples(37, step, micro=4, accum=2, world=1)
    c = _step_samples(37, step, micro=4, accum=1, world=2)
    d = _step_samples(37, step, micro=2, accum=1, world=4)
    assert a == b == c == d


def test_resuming_at_a_step_continues_the_stream() -> None:
    full = StepBatches(50, micro=4, accum=2, world=1, rank=0, seed=3)
    resumed = StepBatches(50, micro=4, accum=2, world=1, rank=0, seed=3, start_step=5)
    it_full, it_res = iter(full), iter(resumed)
    head = [next(it_full) for _ in range(2 * 8)]
    assert [next(it_res) for _ in range(6)] == head[10:16]


def test_epochs_differ_and_encode_the_epoch() -> None:
    s = StepBatches(10, micro=10, accum=1, world=1, rank=0, seed=0)
    e0, e1 = s.indices(0)[0], s.indices(1)[0]
    assert sorted(e0) == list(range(10)) and sorted(i - 10 for i in e1) == list(range(10))
    assert [i % 10 for i in e0] != [i % 10 for i in e1]


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 300), world=st.integers(1, 9), micro=st.integers(1, 16), limit=st.integers(0, 6))
def test_evaluation_shards_cover_the_split_once_and_count_it(n: int, world: int, micro: int, limit: int) -> None:
    """With no limit every sample is evaluated exactly once across the ranks, however unevenly the world
    divides the split; ``eval_samples`` (logged as ``eval_samples``) counts what the shards hold."""
    shards = [eval_shard(n, rank, world, micro, limit) for rank in range(world)]
    seen = [i for chunks in shards for chunk in chunks for i in chunk]
    assert all(1 <= len(chunk) <= micro for chunks in shards for chunk in chunks)
    assert len(seen) == len(set(seen)) == eval_samples(n, world, micro, limit)  # distinct: no sample twice
    if limit == 0:
        assert sorted(seen) == list(range(n)) and eval_samples(n, world, micro) == n
    else:
        for rank, chunks in enumerate(shards):  # a limit keeps each rank's first micro-batches, whole
            assert len(chunks) <= limit
            assert [i for chunk in chunks for i in chunk] == list(range(rank, n, world))[: limit * micro]
