"""Any world size, at any time (issue #18), for real: ``python -m launcher`` resumed by name.

A 2-worker run at global batch 32, resumed on 3 workers with ``optim.lr`` pinned to a new value:

1. it keeps 32 (shares 11, 11, 10), and the sample ledger (``LAUNCHER_SAMPLE_LEDGER``: the ids
   that came through each rank's DataLoader) holds the global stream's positions of every step
   exactly once, across both world sizes;
2. it trains at the new lr: the optimizer's saved param groups and the schedule's saved base
   lrs no longer override the new plan.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from launcher.data import StepBatches
from launcher.optim import lr_factor
from launcher.planner import Plan
from tests.conftest import launcher, ledger_steps

COMMON = ["scale=smoke", "train.log_every=5", "train.checkpoint_every=10", "train.eval_every=1000",
          "train.eval_batches=1", "batch.micro_batch=4"]


def only_run(uri: str) -> tuple[MlflowClient, str]:
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("launcher").experiment_id])
    return client, run.info.run_id


def artifact(client: MlflowClient, run_id: str, path: str, into: Path) -> dict:  # type: ignore[type-arg]
    return json.loads(Path(client.download_artifacts(run_id, path, str(into))).read_text())


def test_a_2_worker_run_resumed_on_3_workers_at_a_new_lr_keeps_32_reads_each_sample_once_and_trains_at_it(
    tmp_path: Path, shared_outputs: Path
) -> None:
    """Both resumes at once (one run, one resume: the suite's time): another world size and a pinned lr."""
    from launcher.cli import load
    from recipes import bert

    ledger = tmp_path / "ledger"
    env = {"LAUNCHER_SAMPLE_LEDGER": str(ledger)}
    common = [*COMMON, "run.name=resize", f"run.output_dir={shared_outputs}"]
    first = launcher(*common, "train.max_steps=10", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    client, run_id = only_run(f"sqlite:///{tmp_path / 'mlflow.db'}")
    old = Plan.from_dict(artifact(client, run_id, "plan.json", tmp_path))
    new_lr = old.lr / 4
    second = launcher(*common, "train.max_steps=20", "cluster.num_workers=3", f"optim.lr={new_lr}", cwd=tmp_path,
                      env=env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    console = second.stdout
    assert "resumed from " in console and "at step 10" in console
    assert "global batch 32 kept" in console and "world size 2 -> 3" in console
    assert "2 rank(s) take 11 samples and 1 take 10" in console
    assert f"lr {old.lr:g} -> {new_lr:g}" in console  # the driver's resume note and the workers' line
    assert "re-applied over the checkpoint's (lr " in console

    replanned = Plan.from_dict(artifact(client, run_id, "resume/plan_at_step_10.json", tmp_path))
    assert (replanned.world_size, replanned.global_batch, replanned.micro_batch, replanned.grad_accum) == (3, 32, 4, 3)
    assert replanned.lr == pytest.approx(new_lr) and replanned.lr_rule == "pinned"
    logged = {m.step: m.value for m in client.get_metric_history(run_id, "lr")}
    for done in (5, 10):  # before the resume: the first plan's lr
        assert logged[done] == pytest.approx(old.lr * lr_factor(done - 1, old), rel=1e-6)
    for done in (15, 20):  # after it: the new plan's
        assert logged[done] == pytest.approx(new_lr * lr_factor(done - 1, replanned), rel=1e-6)
        assert logged[done] != pytest.approx(old.lr * lr_factor(done - 1, replanned), rel=1e-3)

    per_step = ledger_steps(ledger, 3)
    assert sorted(per_step) == list(range(1, 21))
    assert [len(per_step[s]) for s in range(1, 21)] == [32] * 20  # 2 x 16, then 11 + 11 + 10
    samples = len(bert.build_data(load(["scale=smoke"]), shared_outputs / "cache").train)
    stream = StepBatches(samples, micro=32, accum=1, world=1, rank=0, seed=0)  # run.seed 0: the global stream
    for s in range(1, 21):  # each step read exactly its 32 stream positions, once
        assert sorted(per_step[s]) == sorted(stream.indices(s - 1)[0]), s
    trained = [i for s in per_step for i in per_step[s]]
    assert len(trained) == len(set(trained)) == 20 * 32
