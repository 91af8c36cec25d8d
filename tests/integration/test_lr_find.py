"""``action=lr_find``: Smith's LR range test on 2 real Ray workers, recorded in MLflow."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import launcher

STEPS = 16


def test_lr_find_sweeps_records_the_curve_and_prints_a_usable_lr(tmp_path: Path, shared_outputs: Path) -> None:
    out = launcher(
        "recipe=imagenet",  # ResNet-18 with BatchNorm: its running stats are restored too
        "scale=smoke",
        "action=lr_find",
        f"lr_find.steps={STEPS}",
        "lr_find.min_lr=1e-5",
        "lr_find.max_lr=10",
        "batch.micro_batch=8",  # 8 x 2 accumulation x 2 workers
        f"run.output_dir={shared_outputs}",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    suggested = next(line for line in out.stdout.splitlines() if line.startswith("use it:"))
    lr = float(suggested.rpartition("optim.lr=")[2])

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("launcher").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["action"] == "lr_find"
    swept = sorted(client.get_metric_history(run.info.run_id, "lr_find_lr"), key=lambda m: m.step)
    losses = client.get_metric_history(run.info.run_id, "lr_find_loss")
    steps = int(run.data.metrics["lr_find_steps"])
    assert len(swept) == len(losses) == steps <= STEPS
    ratios = [b.value / a.value for a, b in zip(swept, swept[1:], strict=False)]
    assert ratios == pytest.approx([(10 / 1e-5) ** (1 / (STEPS - 1))] * len(ratios), rel=1e-6)  # exponential
    assert swept[0].value == 1e-5 and swept[0].value < lr < swept[-1].value
    assert run.data.metrics["lr_find_steepest_lr"] == pytest.approx(lr, rel=0.01)  # printed to 3 digits

    local = Path(client.download_artifacts(run.info.run_id, "lr_find", str(tmp_path / "artifacts")))
    assert (local / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((local / "curve.csv").open()))
    assert len(rows) == steps and float(rows[0]["lr"]) == 1e-5
    assert not any(shared_outputs.glob("ray/*lr_find*/checkpoint_*"))  # a sweep leaves no checkpoint
