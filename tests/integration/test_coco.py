"""recipe=coco: the smoke run with COCOeval in MLflow, exact gathering, bad data, detectron2's 1x plan.

Real Hydra, Ray (2 CPU workers, gloo), MLflow, torchvision Mask R-CNN and pycocotools, on
COCO-format sets drawn into temporary folders.
"""

from __future__ import annotations

import json
import random
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from launcher.cli import load
from launcher.cluster import start_local, stop
from launcher.config import ConfigError
from launcher.data import eval_shard
from recipes import coco
from tests.conftest import launcher

CFG = load(["recipe=coco", "scale=smoke"])


def coco_set(root: Path, val_images: int = 11) -> Path:
    rng = random.Random(3)
    coco.write_split(root, "train2017", 6, 96, coco.CATEGORIES[:3], rng)
    coco.write_split(root, "val2017", val_images, 96, coco.CATEGORIES[:3], rng)
    return root


def test_the_smoke_set_is_drawn_with_the_configured_sizes(tmp_path: Path) -> None:
    """Without ``data.path`` (``make run recipe=coco``), the synthetic set has the configured image counts."""
    data = coco.build_data(CFG, tmp_path)
    sizes = (len(data.train), len(data.eval))  # type: ignore[arg-type]
    assert sizes == (CFG.recipe.synthetic.train_images, CFG.recipe.synthetic.val_images)


def test_a_set_it_has_not_seen_trains_and_logs_cocoeval_box_and_mask_ap(tmp_path: Path, shared_outputs: Path) -> None:
    """Category ids 1, 3, 7 (not 1..N), an RLE crowd region, an image without annotations, in both splits:
    the run trains, evaluates every val image once, and logs COCOeval's box and mask AP and each loss term."""
    from pycocotools import mask as mask_util

    root = coco_set(tmp_path / "data", val_images=5)
    for split in ("train2017", "val2017"):
        coco.write_split(root, "extra", 1, 96, coco.CATEGORIES[:1], random.Random(0))  # one more image file
        (root / "extra" / "000000.jpg").rename(root / split / "empty.jpg")

        def add(d: dict) -> None:
            d["images"].append({"id": 500, "file_name": "empty.jpg", "height": 96, "width": 96})  # no annotations
            region = np.zeros((96, 96), dtype=np.uint8, order="F")
            region[10:40, 50:90] = 1
            rle = mask_util.encode(region)
            rle["counts"] = rle["counts"].decode("ascii")
            d["annotations"].append(
                {
                    "id": 900,
                    "image_id": 1,
                    "category_id": 7,
                    "iscrowd": 1,
                    "bbox": [50, 10, 40, 30],
                    "area": 1200,
                    "segmentation": rle,
                }
            )

        _edit(root, split, add)
    out = launcher(
        "recipe=coco",
        "scale=smoke",
        f"data.path={root}",
        "recipe.min_size=96",
        "recipe.max_size=96",
        "train.max_steps=2",
        "train.log_every=1",
        f"run.output_dir={shared_outputs}",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("launcher").experiment_id])
    metrics = run.data.metrics
    assert run.info.status == "FINISHED"
    assert metrics["eval_images"] == 6  # the 5 drawn ones and the empty one, once
    for kind in ("bbox", "segm"):
        for stat in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
            assert -1 <= metrics[f"eval_{kind}_{stat}"] <= 1, (kind, stat)
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} <= set(metrics)
    assert run.data.params["plan.norm"] == "frozen_bn"


def test_ground_truth_as_detections_scores_ap_1_however_it_is_sharded(tmp_path: Path) -> None:
    """Boxes to xywh, labels back to the non-contiguous category ids, masks to RLE, 2 ranks merged."""
    data = coco.build_data(load(["recipe=coco", "scale=smoke", f"data.path={coco_set(tmp_path)}"]), tmp_path)
    parts = []
    for rank in range(2):
        seen, found = [], []
        for chunk in eval_shard(len(data.eval), rank, 2, 4):
            for i in chunk:
                item = data.eval[i]
                out = {
                    "boxes": item["boxes"],
                    "labels": item["labels"],
                    "scores": torch.ones(len(item["labels"])),
                    "masks": item["masks"][:, None].float(),
                }
                seen.append(item["image_id"])
                found += coco.detections(item["image_id"], out, data.eval.to_cat)
        parts.append((seen, found))
    assert len(parts[0][0]) == 6 and len(parts[1][0]) == 5  # 11 images: uneven shares
    assert {d["category_id"] for _, found in parts for d in found} <= {1, 3, 7}
    m = coco.coco_metrics(data.eval.coco, parts, masks=True)
    assert m["eval_images"] == 11
    assert m["eval_bbox_AP"] == pytest.approx(1.0) and m["eval_segm_AP"] == pytest.approx(1.0)
    shifted = [(seen, [{**d, "bbox": [d["bbox"][0] + 6, *d["bbox"][1:]]} for d in found]) for seen, found in parts]
    assert coco.coco_metrics(data.eval.coco, shifted, masks=False)["eval_bbox_AP"] < 0.9  # and it can tell


def test_two_workers_evaluate_like_one_process(tmp_path: Path) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    root = coco_set(tmp_path / "data", val_images=5)

    def run_eval(rank: int, world: int) -> dict[str, float]:
        cfg = load(["recipe=coco", "scale=smoke", f"data.path={root}", "recipe.min_size=96", "recipe.max_size=96"])
        data = coco.build_data(cfg, root.parent / "cache")
        torch.manual_seed(5)
        model = coco.build_model(cfg)
        batches = (coco.collate([data.eval[i] for i in c]) for c in eval_shard(len(data.eval), rank, world, 2))
        return coco.evaluate(model, batches, data, torch.device("cpu"), "fp32")

    single = run_eval(0, 1)
    out = tmp_path / "metrics.json"

    def per_worker(_: dict) -> None:
        import ray.train

        ctx = ray.train.get_context()
        metrics = run_eval(ctx.get_world_rank(), ctx.get_world_size())
        if ctx.get_world_rank() == 0:
            out.write_text(json.dumps(metrics))
        ray.train.report({"done": 1})

    start_local(2)  # the launcher's own embedded Ray: loopback, no auth token
    try:
        with tempfile.TemporaryDirectory() as tmp:
            TorchTrainer(
                per_worker,
                scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                run_config=RunConfig(storage_path=tmp, name="coco-eval"),
            ).fit()
    finally:
        stop(Path(tempfile.gettempdir()) / "launcher-test-ray-logs")  # and its address
    two = json.loads(out.read_text())
    assert single["eval_images"] == two["eval_images"] == 5
    assert two == pytest.approx(single, abs=1e-3)  # same weights, same images: same COCOeval


def _edit(root: Path, split: str, change) -> Path:  # type: ignore[no-untyped-def]
    path = root / "annotations" / f"instances_{split}.json"
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))
    return path


def _load(root: Path):  # type: ignore[no-untyped-def]
    return coco.build_data(load(["recipe=coco", "scale=smoke", f"data.path={root}"]), root.parent)


def test_unknown_category_and_missing_image_are_named(tmp_path: Path) -> None:
    root = coco_set(tmp_path / "data")

    def corrupt(d: dict) -> None:
        d["annotations"][2]["category_id"] = 42
        d["annotations"][4]["image_id"] = 999

    path = _edit(root, "train2017", corrupt)
    with pytest.raises(ConfigError) as e:
        _load(root)
    text = str(e.value)
    assert f"{path}: annotation id 3 has unknown category_id 42 (known: [1, 3, 7])" in text
    assert f"{path}: annotation id 5 points at image_id 999" in text
    (root / "annotations" / "instances_train2017.json").unlink()
    with pytest.raises(ConfigError, match=r"instances_train2017.json is missing \(found: \['instances_val2017.json'\]"):
        _load(root)


def test_missing_image_file_and_non_coco_json(tmp_path: Path) -> None:
    root = coco_set(tmp_path / "data")
    (root / "val2017" / "000003.jpg").unlink()
    with pytest.raises(ConfigError, match=r"1 image\(s\) listed in .*instances_val2017.json are not in .*000003.jpg"):
        _load(root)
    (root / "annotations" / "instances_train2017.json").write_text('{"images": []}')
    with pytest.raises(ConfigError, match=r"is not COCO instances JSON \(no annotations, categories\)"):
        _load(root)
    (root / "annotations" / "instances_train2017.json").write_text("not json")
    with pytest.raises(ConfigError, match=r"instances_train2017.json is not readable JSON"):
        _load(root)


def test_degenerate_boxes_are_skipped_with_a_count_and_crowds_kept_out(tmp_path: Path) -> None:
    root = coco_set(tmp_path / "data")
    anns = json.loads((root / "annotations" / "instances_train2017.json").read_text())["annotations"]
    per_image = Counter(a["image_id"] for a in anns)
    degenerate_images = {anns[0]["image_id"], anns[1]["image_id"]}
    crowd = next(a for a in anns if per_image[a["image_id"]] > 1 and a["image_id"] not in degenerate_images)

    def degenerate(d: dict) -> None:
        d["annotations"][0]["bbox"][2] = 0
        d["annotations"][1]["bbox"][3] = -3
        d["annotations"][crowd["id"] - 1]["iscrowd"] = 1

    _edit(root, "train2017", degenerate)
    with pytest.warns(UserWarning, match=r"skipped 2 annotation\(s\) with a non-positive box size"):
        data = _load(root)
    item = data.train[data.train.ids.index(crowd["image_id"])]
    edited = json.loads((root / "annotations" / "instances_train2017.json").read_text())["annotations"]
    usable = [a for a in edited if a["image_id"] == crowd["image_id"] and not a["iscrowd"] and min(a["bbox"][2:]) > 0]
    assert len(item["labels"]) == len(usable) < per_image[crowd["image_id"]]  # the crowd region is not a target


def test_bad_data_fails_before_anything_runs(tmp_path: Path) -> None:
    root = coco_set(tmp_path / "data")
    _edit(root, "val2017", lambda d: d["annotations"][0].update(category_id=5))
    out = launcher("recipe=coco", "scale=smoke", f"data.path={root}", cwd=tmp_path)
    assert out.returncode == 2 and "has unknown category_id 5" in out.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_detectron2_1x_plan_and_its_rescaling(tmp_path: Path) -> None:
    def plan(*args: str) -> dict:
        common = [
            "recipe=coco",
            "action=plan",
            "plan.format=json",
            "cluster.gpus_per_node=8",
            "cluster.gpu_memory_gb=32",
        ]
        out = launcher(*common, *args, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    p = plan()
    assert (p["micro_batch"], p["grad_accum"], p["global_batch"]) == (2, 1, 16)
    assert (p["lr"], p["warmup_steps"], p["max_steps"], p["milestones"]) == (0.02, 1000, 90000, [60000, 80000])
    assert p["norm"] == "frozen_bn" and p["optimizer"] == "sgd"
    assert any(r.startswith("norm frozen_bn: 2 samples per device < 32") for r in p["reasons"])
    assert any("lr 0.02" in r for r in p["reasons"])
    big = plan("batch.global_batch=32")
    assert big["lr"] == pytest.approx(0.04) and big["max_steps"] == 45000 and big["milestones"] == [30000, 40000]
    assert big["warmup_steps"] == 500
