"""The full-scale tier: each recipe at ``scale=full`` (the published model at its real input size) for
two optimizer steps on 2 CPU workers, on a realistic tree the test builds (nothing downloaded), and
an evaluation that covers the whole val split.

- ``imagenet``: ResNet-50 at 224 px on an ImageNet-shaped ImageFolder: 1000 class folders named
  like WordNet ids, photo-size JPEGs of varied sizes (grayscale and CMYK ones among them, and a
  PNG named ``.JPEG``, as ImageNet has), one image per class in ``val/``.
- ``coco``: Mask R-CNN R50-FPN at 800-1333 px on a COCO-2017-shaped set: ``instances_train2017.json``
  and ``instances_val2017.json`` with COCO's 80 category ids (1..90 with its gaps), 640x480-class
  images, polygon masks, a crowd region as uncompressed RLE, an image without annotations and a
  zero-size box in each split, 20 val images; the backbone from a ResNet-50 weights file.
- ``bert``: BERT-base on 512-token pairs from a 32 MiB generated corpus (``write_corpus``).

``make test-full`` runs the three (marker ``full``; not in ``make test``) and writes each run's wall
time and time to first step to ``bench/results/full_scale.json`` (BENCHMARKS.md's table, by
``bench/tables.py``). ``make test`` runs BERT's through the same builders and checks on a 2 MiB
corpus (``test_bert_at_full_scale_on_a_small_corpus``), so the tier cannot rot.

What is pinned, and why (never the model or its input size): a global batch of a few samples, 2
steps; BERT's held-out share ``recipe.eval_fraction`` (BERT-base evaluates a 512-token pair in about
1.5 s on one core: the default 2% of this corpus's ~45,000 pairs would take over 10 minutes).
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from mlflow.tracking import MlflowClient
from PIL import Image, ImageDraw

from tests.conftest import ROOT, launcher, write_corpus

RESULTS = ROOT / "bench" / "results" / "full_scale.json"
STEPS = 2  # in the tier; make test's variant takes one
COMMON = ["train.log_every=1", "cluster=local"]
PINNED = {  # per recipe, on top of COMMON; the module docstring says why each
    "bert": ["batch.global_batch=2", "recipe.eval_fraction=0.001"],
    "imagenet": ["batch.global_batch=4"],
    "coco": ["batch.global_batch=2"],
}


@dataclass(frozen=True)
class Tree:
    """A dataset the test built: its root, what it is, its split sizes (``val`` None: the recipe
    holds out its own share, BERT), and how long it took to build."""

    path: Path
    what: str
    train: int
    val: int | None
    build_s: float


# --- the trees -----------------------------------------------------------------------------

PHOTO_SIZES = [(500, 375), (375, 500), (500, 333), (500, 400), (640, 480), (500, 500), (333, 500), (400, 300)]


def photo(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """A photo-like RGB image: a smooth random colour field (it compresses like a photo, not like
    noise) with a few shapes on it."""
    w, h = size
    cw, ch = w // 32 + 2, h // 32 + 2
    image = Image.frombytes("RGB", (cw, ch), rng.randbytes(3 * cw * ch)).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 4)):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.05, 0.3) * min(w, h)
        fill = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x - r, y - r, x + r, y + r), fill=fill)
    return image


def imagenet_tree(root: Path, classes: int = 1000, train_per_class: int = 1, val_per_class: int = 1) -> Tree:
    """ImageNet's layout (``train/<wnid>/<wnid>_<n>.JPEG``, ``val/<wnid>/ILSVRC2012_val_<n>.JPEG``)
    with photo-size JPEGs; every 50th grayscale and every 50th (another) CMYK, as ImageNet has both,
    and one PNG named ``.JPEG`` (ImageNet's n02105855_2933.JPEG)."""
    started = time.perf_counter()
    rng = random.Random(0)
    wnids = [f"n{1440764 + 8731 * c:08d}" for c in range(classes)]  # n01440764 is ImageNet's first class
    n = 0
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c, wnid in enumerate(wnids):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                n += 1
                name = f"{wnid}_{k}.JPEG" if split == "train" else f"ILSVRC2012_val_{c * per_class + k + 1:08d}.JPEG"
                image = photo(rng, rng.choice(PHOTO_SIZES))
                mode = {7: "L", 31: "CMYK"}.get(n % 50, "RGB")
                if split == "train" and n == 2:
                    image.save(folder / name, format="PNG")
                else:
                    image.convert(mode).save(folder / name, format="JPEG", quality=60)
    train, val = classes * train_per_class, classes * val_per_class
    what = f"{classes} classes, {train} + {val} photo-size JPEGs (grayscale, CMYK, a PNG named .JPEG among them)"
    return Tree(root, what, train, val, time.perf_counter() - started)


COCO_GAPS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}  # COCO 2017's 80 category ids are 1..90 without these
COCO_SIZES = [(640, 480), (480, 640), (640, 427), (640, 512), (612, 612), (500, 375)]


def coco_tree(root: Path, train_images: int = 6, val_images: int = 20) -> Tree:
    """COCO 2017's layout (``annotations/instances_{train,val}2017.json``, ``{train,val}2017/<12-digit
    id>.jpg``): 80 categories with COCO's ids, 1-4 polygon instances per image, and in each split an
    image without annotations, a crowd region as uncompressed RLE (COCO's form for ``iscrowd: 1``) and
    a zero-size box."""
    started = time.perf_counter()
    rng = random.Random(1)
    cats = [c for c in range(1, 91) if c not in COCO_GAPS]
    ids = iter(rng.sample(range(1, 581_930), train_images + val_images))  # COCO's image ids are sparse too
    ann_ids = iter(range(100_000, 10**7, 7))
    for split, count in (("train2017", train_images), ("val2017", val_images)):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for k in range(count):
            image_id = next(ids)
            w, h = rng.choice(COCO_SIZES)
            image = photo(rng, (w, h))
            draw = ImageDraw.Draw(image)
            for _ in range(0 if k == 0 else rng.randint(1, 4)):  # image 0: no annotations
                poly = _polygon(rng, w, h)
                draw.polygon(poly, fill=tuple(rng.randrange(256) for _ in range(3)))
                anns.append(_annotation(next(ann_ids), image_id, rng.choice(cats), poly))
            file_name = f"{image_id:012d}.jpg"
            image.save(root / split / file_name, format="JPEG", quality=60)
            images.append({"id": image_id, "file_name": file_name, "width": w, "height": h, "license": 1,
                           "date_captured": "2013-11-14 16:28:13"})  # fmt: skip
        crowd_image = images[1]
        anns.append(_crowd(next(ann_ids), crowd_image, rng.choice(cats)))
        zero = {**anns[-2], "id": next(ann_ids), "bbox": [40.0, 50.0, 0.0, 12.0], "area": 0.0}  # detectron2 skips it
        anns.append(zero)
        d = {"info": {"description": "COCO-2017-shaped, generated", "version": "1.0", "year": 2017},
             "licenses": [{"id": 1, "name": "generated", "url": ""}], "images": images, "annotations": anns,
             "categories": [{"id": c, "name": f"category {c}", "supercategory": "thing"} for c in cats]}  # fmt: skip
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(d))
    what = (f"80 categories (ids 1..90 with COCO's gaps), {train_images} + {val_images} images of 375-640 px; "
            "per split an image without annotations, a crowd region (uncompressed RLE), a zero-size box")  # fmt: skip
    return Tree(root, what, train_images, val_images, time.perf_counter() - started)


def _polygon(rng: random.Random, w: int, h: int) -> list[tuple[float, float]]:
    r = rng.uniform(0.05, 0.3) * min(w, h)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    sides = rng.randint(3, 8)
    turn = rng.uniform(0, 2 * math.pi)
    return [(cx + r * math.cos(turn + 2 * math.pi * j / sides), cy + r * math.sin(turn + 2 * math.pi * j / sides))
            for j in range(sides)]  # fmt: skip


def _annotation(ann_id: int, image_id: int, cat: int, poly: list[tuple[float, float]]) -> dict[str, Any]:
    xs, ys = [p[0] for p in poly], [p[1] for p in poly]
    area = 0.5 * abs(sum(xs[j] * ys[j - 1] - xs[j - 1] * ys[j] for j in range(len(poly))))
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "iscrowd": 0, "area": area,
            "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
            "segmentation": [[round(c, 2) for p in poly for c in p]]}  # fmt: skip


def _crowd(ann_id: int, image: dict[str, Any], cat: int) -> dict[str, Any]:
    """A crowd region over a quarter of the image, as COCO stores one: uncompressed RLE, column-major
    run lengths starting with a run of zeros."""
    h, w = image["height"], image["width"]
    region = np.zeros((h, w), dtype=np.uint8)
    region[h // 4 : h // 2, w // 3 : 2 * w // 3] = 1
    flat = region.flatten(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = ([0] if flat[0] else []) + np.diff(bounds).tolist()
    box = [w // 3, h // 4, 2 * w // 3 - w // 3, h // 2 - h // 4]
    return {"id": ann_id, "image_id": image["id"], "category_id": cat, "iscrowd": 1, "area": float(region.sum()),
            "bbox": [float(v) for v in box], "segmentation": {"counts": counts, "size": [h, w]}}  # fmt: skip


def text_corpus(root: Path, mb: float) -> Tree:
    started = time.perf_counter()
    path = write_corpus(root / "corpus.txt", mb, seed=0)
    what = f"{mb:g} MiB of generated text (tests/conftest.py write_corpus, seed 0)"
    return Tree(path, what, 0, None, time.perf_counter() - started)


# --- one run and its checks ------------------------------------------------------------------


def run_at_full_scale(recipe: str, tree: Tree, cwd: Path, *extra: str, steps: int = STEPS) -> dict[str, Any]:
    """``python -m launcher recipe=RECIPE scale=full data.path=TREE`` with COMMON and PINNED; checks its
    MLflow run (finished, ``steps`` steps with a finite loss, one evaluation over the whole val split)
    and returns what ``bench/results/full_scale.json`` records of it."""
    from launcher.cli import load
    from launcher.data import size
    from recipes import RECIPES

    args = [f"recipe={recipe}", "scale=full", f"data.path={tree.path}", f"train.max_steps={steps}", *COMMON,
            *PINNED[recipe], *extra]  # fmt: skip
    started = time.perf_counter()
    out = launcher(*args, cwd=cwd, timeout=1500)
    wall = time.perf_counter() - started
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("launcher").experiment_id])
    assert run.info.status == "FINISHED"
    assert (run.data.tags["recipe"], run.data.tags["scale"]) == (recipe, "full")
    assert run.data.params["train.eval_batches"] == "0"  # scale=full's own: the whole val split
    loss = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert sorted(loss) == list(range(1, steps + 1)) and all(math.isfinite(v) for v in loss.values())
    data = RECIPES[recipe].build_data(load(args), cwd / "outputs" / "cache")  # the run's splits (its cache)
    val = size(data.eval)
    assert tree.val is None or val == tree.val  # every val image the tree has (none dropped)
    evaluated = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval_samples")}
    assert evaluated == {steps: val}  # one evaluation, at the end, over the whole split
    metrics = run.data.metrics
    shutil.rmtree(cwd / "outputs" / "ray", ignore_errors=True)  # the checkpoint (BERT-base with AdamW: 1.3 GB)
    return {
        "data": tree.what,
        "train": size(data.train),
        "val": val,
        "overrides": [a.replace(str(tree.path), "<tree>").replace(str(cwd), "<tmp>") for a in args],
        "tree_s": tree.build_s,
        "wall_s": wall,
        "time_to_first_step_s": metrics["time_to_first_step_s"],
        "startup": {
            k.removeprefix("startup_").removesuffix("_s"): v for k, v in metrics.items() if k.startswith("startup_")
        },
        "steps": steps,
        "eval_samples": evaluated[steps],
        "eval": {k: v for k, v in metrics.items() if k.startswith("eval_") and k != "eval_samples"},
    }


# --- in make test: one recipe, so the tier cannot rot --------------------------------------------


def test_bert_at_full_scale_on_a_small_corpus(tmp_path: Path) -> None:
    """BERT-base, 512-token pairs, the tier's overrides and checks, one step on 2 MiB of text (about a minute)."""
    row = run_at_full_scale("bert", text_corpus(tmp_path / "text", mb=2), tmp_path, steps=1)
    assert row["val"] >= 2 and row["train"] > 1000  # 0.1% held out of the pairs 2 MiB makes


# --- make test-full ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def full_record() -> Iterator[dict[str, Any]]:
    """The tier's runs by recipe; at the end of a session that ran all three, ``bench/results/full_scale.json``.
    Requested first by each full test, so its clock starts before the first tree is built."""
    started = time.perf_counter()
    runs: dict[str, Any] = {}
    yield runs
    if set(runs) == set(PINNED):
        write_results(runs, time.perf_counter() - started)


def write_results(runs: dict[str, Any], wall_s: float) -> None:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    record = {
        "name": "full_scale",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "make test-full",
        "device": f"CPU: {cpu}, {os.cpu_count()} cores",
        "load_average": os.getloadavg()[0],  # at the end; the machine may be shared
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "wall_s": wall_s,  # the three trees built and the three runs
        "runs": {r: runs[r] for r in PINNED},
    }
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")


@pytest.fixture(scope="session")
def imagenet_full(tmp_path_factory: pytest.TempPathFactory) -> Tree:
    return imagenet_tree(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture(scope="session")
def coco_full(tmp_path_factory: pytest.TempPathFactory) -> Tree:
    return coco_tree(tmp_path_factory.mktemp("coco"))


@pytest.fixture(scope="session")
def text_full(tmp_path_factory: pytest.TempPathFactory) -> Tree:
    return text_corpus(tmp_path_factory.mktemp("text"), mb=32)


@pytest.mark.full
def test_imagenet_at_full_scale(full_record: dict, imagenet_full: Tree, tmp_path: Path) -> None:
    row = run_at_full_scale("imagenet", imagenet_full, tmp_path)
    assert row["train"] == 1000 and row["val"] == 1000
    assert 0 <= row["eval"]["eval_top1"] <= row["eval"]["eval_top5"] <= 1
    full_record["imagenet"] = row


@pytest.mark.full
def test_coco_at_full_scale(full_record: dict, coco_full: Tree, tmp_path: Path) -> None:
    """With ``recipe.backbone_weights``: a ResNet-50 state dict the test saves (checked on the driver,
    read once by each worker)."""
    weights = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), weights)
    row = run_at_full_scale("coco", coco_full, tmp_path, f"recipe.backbone_weights={weights}")
    assert row["train"] == coco_full.train - 1  # the image without annotations is not trained on (detectron2)
    assert row["eval"]["eval_images"] == row["val"]  # COCOeval scored every val image, the empty one too
    assert {"eval_bbox_AP", "eval_segm_AP"} <= set(row["eval"])
    full_record["coco"] = row


@pytest.mark.full
def test_bert_at_full_scale(full_record: dict, text_full: Tree, tmp_path: Path) -> None:
    row = run_at_full_scale("bert", text_full, tmp_path)
    assert row["val"] >= 20  # tens of 512-token pairs
    full_record["bert"] = row
