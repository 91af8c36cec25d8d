"""recipe=imagenet end to end: the smoke run, a tree it has not seen, bad data, exact eval, Goyal's plan.

Real Hydra, Ray (2 CPU workers, gloo), MLflow (SQLite), torchvision models, and images
drawn into temporary ImageFolder trees.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from launcher import checkpoint
from launcher.cli import load
from launcher.cluster import start_local, stop
from launcher.data import eval_shard
from launcher.step import evaluate
from recipes import imagenet
from tests.conftest import launcher

FAST = ["train.log_every=1", "train.eval_every=0", "train.checkpoint_every=0"]


def make_tree(root: Path, train: dict[str, int], val: dict[str, int], formats: tuple[str, ...]) -> Path:
    """An ImageFolder tree with the given per-class counts, formats cycled per image."""
    rng = random.Random(1)
    for split, counts in (("train", train), ("val", val)):
        for c, n in counts.items():
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for k in range(n):
                image = imagenet.draw_shape(imagenet.SHAPES[sorted(counts).index(c)], 40, rng)
                image.save(root / split / c / f"img{k}.{formats[k % len(formats)]}")
    return root


def run_record(cwd: Path) -> tuple[MlflowClient, str]:
    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("launcher").experiment_id])
    return client, run.info.run_id


def history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_smoke_run_learns_and_logs_top1_top5(tmp_path: Path, shared_outputs: Path) -> None:
    out = launcher(
        "recipe=imagenet", "scale=smoke", "train.ema_decay=0.9", f"run.output_dir={shared_outputs}", cwd=tmp_path
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client, run_id = run_record(tmp_path)
    assert client.get_run(run_id).info.status == "FINISHED"
    loss, top1, top5 = (history(client, run_id, k) for k in ("loss", "eval_top1", "eval_top5"))
    last = max(loss)
    assert loss[last] < loss[min(loss)]  # it learns
    classes = 8  # conf/recipe_scale/imagenet_smoke.yaml
    assert top1[last] > 2 / classes and top5[last] > 5 / classes  # well above chance
    assert top5[last] >= top1[last]
    params = client.get_run(run_id).data.params
    assert params["recipe.model"] == "resnet18" and params["plan.norm"] == "batch_norm"
    ema_top1 = history(client, run_id, "eval_ema_top1")  # the EMA of the weights, evaluated beside them
    assert set(ema_top1) == set(top1) and ema_top1[last] > 2 / classes
    state = checkpoint.read_layout(  # the parts of the newest checkpoint's state.pt
        torch.load(max(shared_outputs.glob(f"ray/*{run_id[:8]}/checkpoint_*/state.pt")), weights_only=True))["parts"]
    assert set(state["ema"]) >= {f"module.{k}" for k in state["model"]}  # averaged weights and BN statistics


def test_a_tree_it_has_not_seen(tmp_path: Path, shared_outputs: Path) -> None:
    """3 classes (not the default), uneven class sizes, JPEG / PNG / BMP mixed, odd val size, and one
    truncated training image skipped as ``recipe.bad_images=skip`` asks; decoded in a DataLoader
    process, with the CPU budget's torch threads (Ray sets $OMP_NUM_THREADS to the 2 CPUs it reserved)."""
    root = make_tree(
        tmp_path / "flowers",
        train={"daisy": 20, "rose": 9, "tulip": 14},
        val={"daisy": 5, "rose": 3, "tulip": 5},
        formats=("jpg", "png", "bmp", "JPEG"),
    )
    bad = root / "train" / "rose" / "img3.JPEG"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated JPEG
    out = launcher(
        "recipe.bad_images=skip",
        "recipe=imagenet",
        "scale=smoke",
        f"data.path={root}",
        "train.max_steps=3",
        "recipe.train_crop=32",
        "recipe.eval_resize=36",
        "recipe.eval_crop=32",
        f"run.output_dir={shared_outputs}",
        "cluster.cpus_per_worker=2",
        "data.num_workers=1",
        *FAST,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"skipped unreadable image {bad}" in out.stdout + out.stderr
    assert "CPUs / worker         2: 1 DataLoader process(es), 1 torch thread(s)" in out.stdout  # planned
    assert "cpus: 2 per worker: 1 DataLoader process(es), 1 torch thread(s)" in out.stdout  # as rank 0 runs
    client, run_id = run_record(tmp_path)
    params = client.get_run(run_id).data.params  # the CPU budget, one param each (its reason is in plan.reasons)
    assert (params["plan.cpus.cpus_per_worker"], params["plan.cpus.loader_workers"]) == ("2", "1")
    assert "plan.cpus.reason" not in params and "CPUs per worker 2 (cluster.cpus_per_worker)" in (
        client.get_run(run_id).data.tags["plan.reasons"])
    assert set(history(client, run_id, "eval_top1")) == {3}
    assert history(client, run_id, "eval_samples") == {3: 13}  # the whole val split (7 + 6 on 2 workers), once
    assert "eval at step 3 on 13 samples: " in out.stdout
    ckpt = max(shared_outputs.glob(f"ray/*{run_id[:8]}/checkpoint_*/state.pt"))
    state = checkpoint.read_layout(torch.load(ckpt, weights_only=True))["parts"]
    assert state["model"]["net.fc.weight"].shape[0] == 3  # the head has the tree's class count


def test_a_corrupt_image_stops_the_run_naming_it(tmp_path: Path, shared_outputs: Path) -> None:
    """The default, ``recipe.bad_images=error``; skipping it is shown by ``test_a_tree_it_has_not_seen``."""
    root = make_tree(tmp_path / "data", train={"a": 6, "b": 6}, val={"a": 2, "b": 2}, formats=("jpg",))
    bad = root / "train" / "b" / "img3.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated JPEG
    common = ["recipe=imagenet", "scale=smoke", f"data.path={root}", "train.max_steps=2", "batch.global_batch=12"]
    common += ["recipe.train_crop=32", "recipe.eval_resize=36", "recipe.eval_crop=32", *FAST]
    stopped = launcher(*common, f"run.output_dir={tmp_path / 'o1'}", cwd=tmp_path)
    assert stopped.returncode == 1
    assert f"training failed: BadImage: cannot read image {bad}" in stopped.stdout
    assert "recipe.bad_images=skip" in stopped.stdout
    client, run_id = run_record(tmp_path)
    assert client.get_run(run_id).info.status == "FAILED"


BROKEN = {
    "empty-train-class": "class folder {root}/train/b has no images",
    "empty-val-class": "class folder {root}/val/a has no images",
    "no-val-split": "{root}/val is missing",
}


@pytest.mark.parametrize("how", sorted(BROKEN))
def test_bad_trees_fail_before_anything_runs(tmp_path: Path, how: str) -> None:
    root = make_tree(tmp_path / "data", train={"a": 3, "b": 3}, val={"a": 1, "b": 1}, formats=("png",))
    if how == "no-val-split":
        shutil.rmtree(root / "val")
    else:
        split, cls = ("train", "b") if how == "empty-train-class" else ("val", "a")
        for f in (root / split / cls).iterdir():
            f.unlink()
    out = launcher("recipe=imagenet", "scale=smoke", f"data.path={root}", cwd=tmp_path)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert BROKEN[how].format(root=root) in out.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing was recorded, nothing scheduled


def test_a_missing_weights_file_fails_before_anything_runs(tmp_path: Path) -> None:
    missing = tmp_path / "resnet18.pth"
    out = launcher("recipe=imagenet", "scale=smoke", f"recipe.weights={missing}", cwd=tmp_path)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"recipe.weights: {missing} is not a file" in out.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing was recorded, nothing scheduled
    assert not (tmp_path / "outputs" / "ray").exists()


def test_unknown_model_name_suggests_the_closest() -> None:
    with pytest.raises(Exception, match=r"recipe.model: 'resnet51'.*did you mean resnet50"):
        imagenet.build_model(load(["recipe=imagenet", "recipe.model=resnet51", "recipe.num_classes=4"]))


def test_goyal_8192_on_256_gpus(tmp_path: Path) -> None:
    out = launcher(
        "recipe=imagenet",
        "action=plan",
        "plan.format=json",
        "cluster.nodes=32",
        "cluster.gpus_per_node=8",
        "cluster.gpu_memory_gb=16",
        "batch.global_batch=8192",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    p = json.loads(out.stdout)
    assert (p["world_size"], p["micro_batch"], p["grad_accum"], p["global_batch"]) == (256, 32, 1, 8192)
    assert p["lr"] == pytest.approx(3.2) and p["lr_rule"] == "anchor"
    assert p["warmup_steps"] == 782  # 5 epochs of 1,281,167 images at 8192
    assert p["optimizer"] == "sgd"  # Goyal et al. use plain SGD with momentum at 8k, not LARS
    assert any("lr 3.2 from the published anchor" in r and "Goyal et al. 2017" in r for r in p["reasons"])
    assert any(r.startswith("warmup 782 steps from the published anchor (Goyal et al. 2017") for r in p["reasons"])


# --- distributed evaluation is exact ----------------------------------------------------


def eval_config(root: Path):  # type: ignore[no-untyped-def]
    return load(
        [
            "recipe=imagenet",
            "scale=smoke",
            f"data.path={root}",
            "recipe.eval_resize=36",
            "recipe.eval_crop=32",
            "recipe.train_crop=32",
        ]
    )


def eval_on(root: Path, rank: int, world: int) -> dict[str, float]:
    cfg = eval_config(root)
    data = imagenet.build_data(cfg, root.parent / "cache")
    torch.manual_seed(7)
    model = imagenet.build_model(cfg)
    batches = (imagenet.collate([data.eval[i] for i in c]) for c in eval_shard(len(data.eval), rank, world, 4))
    return evaluate(model, batches, imagenet.count, torch.device("cpu"), "fp32", imagenet.METRICS)


def test_two_workers_evaluate_exactly_like_one_process_on_an_odd_val_set() -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    with tempfile.TemporaryDirectory() as tmp:
        root = make_tree(
            Path(tmp) / "data", train={"a": 2, "b": 2, "c": 2}, val={"a": 5, "b": 4, "c": 4}, formats=("png",)
        )
        single = eval_on(root, 0, 1)
        out = Path(tmp) / "metrics.json"

        def per_worker(payload: dict) -> None:
            import ray.train

            ctx = ray.train.get_context()
            metrics = eval_on(Path(payload["root"]), ctx.get_world_rank(), ctx.get_world_size())
            if ctx.get_world_rank() == 0:
                Path(payload["out"]).write_text(json.dumps(metrics))
            ray.train.report({"done": 1})

        start_local(2)  # the launcher's own embedded Ray: loopback, no auth token
        try:
            TorchTrainer(
                per_worker,
                train_loop_config={"root": str(root), "out": str(out)},
                scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                run_config=RunConfig(storage_path=tmp, name="eval"),
            ).fit()
        finally:
            stop(Path(tempfile.gettempdir()) / "launcher-test-ray-logs")  # and its address
        two = json.loads(out.read_text())
    assert len(eval_shard(13, 0, 2, 4)) + len(eval_shard(13, 1, 2, 4)) == 4  # 7 + 6 samples: uneven shares
    assert two == pytest.approx(single, rel=1e-6)
    assert single["eval_top1"] * 13 == pytest.approx(round(single["eval_top1"] * 13))  # a count over all 13
