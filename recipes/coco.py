"""COCO detection and instance segmentation: torchvision Faster / Mask R-CNN on any COCO-format set.

Data: ``data.path/annotations/instances_<split>.json`` and the images in ``data.path/<split>/``,
read with ``pycocotools``. Checked on the driver before anything is scheduled: a missing or
non-COCO annotation file, an annotation pointing at a missing image or an unknown category
is an error naming the file and the entry; a box with non-positive size is skipped and
counted (as detectron2 does). Crowd regions stay out of the training targets; COCOeval
handles them. Category ids need not be contiguous: they map to 1..K for the model and back
for evaluation. Without ``data.path``, ``recipe.synthetic`` draws a small COCO-format set.

Batches are dicts of tensors (images padded to the largest in the batch, boxes / labels /
masks padded per image), so the generic loop can move, split and accumulate them; the
model wrapper unpads them into torchvision's lists. Losses come back as torchvision's
per-batch means times the number of images, i.e. sums over images.

Weights come from local files only, loaded inside ``build_model`` (so before the worker applies
the plan's norm policy: ``frozen_bn`` freezes the loaded BatchNorm statistics; the driver checks
them first, ``weights.check``, so a missing or mismatched file fails before anything is scheduled):
``recipe.backbone_weights``, a torchvision ResNet-50 ImageNet state dict (e.g. the
``resnet50-*.pth`` torchvision keeps in ``$TORCH_HOME/hub/checkpoints``), goes onto
``backbone.body`` with its ``fc.*`` classifier dropped; ``recipe.weights``, the whole detection
model's state dict. Both are checked key by key (launcher/weights.py). The first
``5 - recipe.trainable_backbone_layers`` backbone stages stay frozen either way.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from launcher import weights
from launcher.config import CocoRecipe, Config, ConfigError
from launcher.data import Data, built_once

LOSSES = ["loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "loss_mask"]
STATS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]  # COCOeval.stats[0:6]
METRICS = [f"{kind}_{s}" for kind in ("bbox", "segm") for s in STATS]  # logged as eval_<name>


def spec(cfg: Config) -> CocoRecipe:
    """``cfg.recipe``, typed as this recipe's section."""
    assert isinstance(cfg.recipe, CocoRecipe), cfg.recipe
    return cfg.recipe


def has_masks(cfg: Config) -> bool:
    return spec(cfg).model.startswith("maskrcnn")


# --- model -------------------------------------------------------------------------------


class Detector(nn.Module):
    """A torchvision R-CNN whose forward takes a padded batch and returns summed losses."""

    def __init__(self, net: nn.Module, masks: bool) -> None:
        super().__init__()
        self.net, self.masks = net, masks

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, targets = unpack(batch, self.masks)
        losses = self.net(images, targets)
        return {k: v * len(images) for k, v in losses.items()}


def unpack(batch: dict[str, torch.Tensor], masks: bool) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    images, targets = [], []
    for i in range(len(batch["images"])):
        h, w = (int(v) for v in batch["sizes"][i])
        images.append(batch["images"][i, :, :h, :w])
        keep = batch["labels"][i] > 0
        target = {"boxes": batch["boxes"][i][keep], "labels": batch["labels"][i][keep]}
        if masks:
            target["masks"] = batch["masks"][i][keep][:, :h, :w]
        targets.append(target)
    return images, targets


def build_net(cfg: Config) -> nn.Module:
    """The torchvision R-CNN (no hub weights), with ``recipe.backbone_weights`` or ``recipe.weights`` loaded."""
    from torchvision.models import detection

    r = spec(cfg)
    with warnings.catch_warnings():  # torchvision warns that layer freezing needs weights: we freeze below
        warnings.simplefilter("ignore", UserWarning)
        net = getattr(detection, r.model)(
            weights=None,
            weights_backbone=None,
            num_classes=num_classes(cfg) + 1,
            min_size=r.min_size,
            max_size=r.max_size,
        )
    if r.backbone_weights is not None:  # an ImageNet classifier's state dict: its fc.* head has no place here
        state = weights.read(r.backbone_weights, "recipe.backbone_weights")
        body = {k: v for k, v in state.items() if not k.startswith("fc.")}
        weights.load(net.backbone.body, body, "recipe.backbone_weights", r.backbone_weights)
    if r.weights is not None:
        weights.load(net, weights.read(r.weights, "recipe.weights"), "recipe.weights", r.weights)
    return net


def build_model(cfg: Config) -> nn.Module:
    """``build_net`` wrapped to take a padded batch; the first ``5 - trainable_backbone_layers`` backbone
    stages frozen."""
    r = spec(cfg)
    net: Any = build_net(cfg)  # a torchvision GeneralizedRCNN: .backbone.body is its ResNet
    stages = ["layer4", "layer3", "layer2", "layer1", "conv1"][: r.trainable_backbone_layers]
    for name, p in net.backbone.body.named_parameters():
        if not any(name.startswith(s) for s in stages):
            p.requires_grad_(False)
    return Detector(net, has_masks(cfg))


def trace_model(cfg: Config) -> nn.Module:
    """``build_model``'s, as the memory estimate traces it under fake tensors, where no value is known.

    torchvision keeps the RPN's proposals by NMS over their scores and samples the ROI heads' boxes by their
    overlap with the ground truth: sizes chosen from values. Here the heads get the most training gives them,
    ``box_batch_size_per_image`` boxes per image (512), ``positive_fraction`` of them (25%: 128) positive, each
    with its mask target; the proposals, which only feed that sampling, are not made. The rest (backbone, FPN,
    the RPN's head, anchors and loss, the box and mask heads and their losses) runs as torchvision wrote it.
    """
    model = build_model(cfg)
    net: Any = model.net  # type: ignore[union-attr]
    net.rpn.filter_proposals = _no_proposals
    net.roi_heads.select_training_samples = functools.partial(_largest_sample, net.roi_heads)
    return model


def _no_proposals(proposals: torch.Tensor, objectness: torch.Tensor, image_shapes: list[tuple[int, int]],
                  num_anchors_per_level: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:  # fmt: skip
    return [torch.zeros(0, 4) for _ in image_shapes], [torch.zeros(0) for _ in image_shapes]


def _largest_sample(heads: Any, proposals: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> tuple[
        list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], tuple[torch.Tensor, ...]]:  # fmt: skip
    """``RoIHeads.select_training_samples``'s result at its largest: each image's ground-truth boxes repeated
    to fill the sample, the first ``positive_fraction`` of them labelled with their class, the rest background."""
    size = heads.fg_bg_sampler.batch_size_per_image
    positive = torch.arange(size) < int(size * heads.fg_bg_sampler.positive_fraction)
    boxes, matched, labels = [], [], []
    for t in targets:
        idx = torch.arange(size) % len(t["boxes"])
        boxes.append(t["boxes"][idx])
        matched.append(idx)
        labels.append(torch.where(positive, t["labels"][idx], 0))
    return boxes, matched, labels, heads.box_coder.encode(boxes, boxes)


def num_classes(cfg: Config) -> int:
    r = spec(cfg)
    if cfg.data.path is None:
        return r.synthetic.classes or 80
    ann = Path(cfg.data.path) / "annotations" / f"instances_{r.train_split}.json"
    return len(_read(ann)["categories"]) if ann.exists() else 80


def count(batch: dict[str, torch.Tensor]) -> dict[str, int]:
    n = len(batch["images"])
    return dict.fromkeys(LOSSES, n)


def example_batch(cfg: Config, n: int) -> dict[str, torch.Tensor]:
    """``n`` images at the training size, one box and mask each (memory estimate). The box is an eighth of
    the side (100 px at 800, about a median COCO object): the mask targets are cut from the masks with
    ``roi_align`` at a cost that grows with the box, and the memory does not."""
    r = spec(cfg)
    s = r.min_size
    item = {
        "image": torch.rand(3, s, s),
        "boxes": torch.tensor([[7 * s / 16, 7 * s / 16, 9 * s / 16, 9 * s / 16]]),
        "labels": torch.tensor([1]),
        "masks": torch.ones(1, s, s, dtype=torch.uint8),
        "image_id": 0,
    }
    return collate([item] * n)


# --- data --------------------------------------------------------------------------------


def build_data(cfg: Config, cache_dir: Path) -> Data:
    r = spec(cfg)
    root = Path(cfg.data.path).expanduser() if cfg.data.path else _synthetic(cfg, cache_dir)
    masks = has_masks(cfg)
    train = CocoImages(root, r.train_split, masks, cfg.run.seed, train=True, keep_empty=r.keep_empty)
    val = CocoImages(root, r.val_split, masks, cfg.run.seed, train=False, keep_empty=True)
    if train.cat_ids != val.cat_ids:
        raise ConfigError(
            [
                f"data.path: {train.ann_file} and {val.ann_file} list different categories "
                f"({train.cat_ids[:8]}... vs {val.cat_ids[:8]}...)"
            ]
        )
    return Data(train=train, eval=val, collate=collate)


def _read(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError([f"data.path: {path} is not readable JSON: {e}"]) from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(d, dict) or k not in d]
    if missing:
        raise ConfigError([f"data.path: {path} is not COCO instances JSON (no {', '.join(missing)})"])
    return d


class CocoImages(Dataset):
    """One split of a COCO-format set. Index ``i`` is ``epoch * len + position``."""

    def __init__(self, root: Path, split: str, masks: bool, seed: int, *, train: bool, keep_empty: bool) -> None:
        from pycocotools.coco import COCO

        self.ann_file = _annotation_file(root, split)
        d = _read(self.ann_file)
        self.image_dir = root / split
        images = {im["id"]: im for im in d["images"]}
        cats = sorted(c["id"] for c in d["categories"])
        kept = _checked_annotations(d, self.ann_file, self.image_dir)
        self.coco = COCO()
        self.coco.dataset = {**d, "annotations": kept}
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco.createIndex()
        self.cat_ids = cats
        self.to_label = {c: i + 1 for i, c in enumerate(cats)}  # 0 is the background
        self.to_cat = {i + 1: c for i, c in enumerate(cats)}
        ids = sorted(images)
        if not keep_empty:
            ids = [i for i in ids if any(not a.get("iscrowd", 0) for a in self.coco.imgToAnns[i])]
        if not ids:
            raise ConfigError([f"data.path: {self.ann_file} has no image with an annotation"])
        self.ids, self.masks, self.seed, self.train = ids, masks, seed, train

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image_id = self.ids[i % len(self.ids)]
        info = self.coco.imgs[image_id]
        with Image.open(self.image_dir / info["file_name"]) as im:
            image = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 255
        anns = [a for a in self.coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        h, w = image.shape[1:]
        masks = (
            torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns]))
            if self.masks and anns
            else torch.zeros(len(anns), h, w, dtype=torch.uint8)
        )
        if self.train and random.Random(hash((self.seed, i)) & 0x7FFFFFFF).random() < 0.5:  # horizontal flip
            image, masks = image.flip(-1), masks.flip(-1)
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
        labels = torch.tensor([self.to_label[a["category_id"]] for a in anns], dtype=torch.long)
        return {"image": image, "boxes": boxes, "labels": labels, "masks": masks, "image_id": image_id}


def _annotation_file(root: Path, split: str) -> Path:
    """``root/annotations/instances_<split>.json``, or a ConfigError listing the files that are there."""
    ann_file = root / "annotations" / f"instances_{split}.json"
    if not ann_file.exists():
        have = sorted(p.name for p in (root / "annotations").glob("*.json")) if (root / "annotations").is_dir() else []
        raise ConfigError(
            [
                f"data.path: {ann_file} is missing (found: {have or 'no annotations/ folder'}; "
                f"recipe.train_split / recipe.val_split name the splits)"
            ]
        )
    return ann_file


def _checked_annotations(d: dict[str, Any], ann_file: Path, image_dir: Path) -> list[dict[str, Any]]:
    """The usable annotations; a ConfigError naming bad references and missing images, a warning
    counting the degenerate boxes skipped."""
    images = {im["id"] for im in d["images"]}
    cats = sorted(c["id"] for c in d["categories"])
    errors, skipped, kept = [], 0, []
    for a in d["annotations"]:
        where = f"{ann_file}: annotation id {a.get('id')}"
        if a.get("image_id") not in images:
            errors.append(f"data.path: {where} points at image_id {a.get('image_id')}, which is not in images")
        elif a.get("category_id") not in cats:
            errors.append(f"data.path: {where} has unknown category_id {a.get('category_id')} (known: {cats})")
        elif len(a.get("bbox", [])) != 4 or a["bbox"][2] <= 0 or a["bbox"][3] <= 0:
            skipped += 1  # detectron2 and COCOeval ignore degenerate boxes too
        else:
            kept.append(a)
    missing = [im["file_name"] for im in d["images"] if not (image_dir / im["file_name"]).is_file()]
    if missing:
        errors.append(
            f"data.path: {len(missing)} image(s) listed in {ann_file} are not in {image_dir}, "
            f"e.g. {image_dir / missing[0]}"
        )
    if errors:
        raise ConfigError(errors[:10] + ([f"... and {len(errors) - 10} more"] if len(errors) > 10 else []))
    if skipped:
        warnings.warn(f"{ann_file}: skipped {skipped} annotation(s) with a non-positive box size", stacklevel=3)
    return kept


def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Pad images to the largest, and each image's instances to the most in the batch (label 0)."""
    h = max(x["image"].shape[1] for x in items)
    w = max(x["image"].shape[2] for x in items)
    m = max(1, max(len(x["labels"]) for x in items))

    def pad_rows(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, [0, 0] * (t.dim() - 1) + [0, m - len(t)])

    return {
        "images": torch.stack(
            [F.pad(x["image"], (0, w - x["image"].shape[2], 0, h - x["image"].shape[1])) for x in items]
        ),
        "sizes": torch.tensor([list(x["image"].shape[1:]) for x in items]),
        "boxes": torch.stack([pad_rows(x["boxes"]) for x in items]),
        "labels": torch.stack([pad_rows(x["labels"]) for x in items]),
        "masks": torch.stack(
            [F.pad(pad_rows(x["masks"]), (0, w - x["masks"].shape[2], 0, h - x["masks"].shape[1])) for x in items]
        ),
        "image_id": torch.tensor([x["image_id"] for x in items]),
    }


# --- evaluation --------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, batches: Any, data: Data, device: torch.device, precision: str) -> dict[str, float]:
    """COCOeval over the images this evaluation saw, detections gathered from every rank to rank 0."""
    detector = getattr(model, "module", model)
    assert isinstance(detector, Detector)
    val = data.eval
    assert isinstance(val, CocoImages)
    detector.eval()
    seen, found = _detect(detector, batches, val.to_cat, device, precision)
    detector.train()
    return _score_on_rank0(val.coco, seen, found, detector.masks)


def _detect(
    detector: Detector, batches: Any, to_cat: dict[int, int], device: torch.device, precision: str
) -> tuple[list[int], list[dict[str, Any]]]:
    """The ids of the images in ``batches`` and the detections on them, as COCO results."""
    from launcher.step import autocast, to_device

    seen: list[int] = []
    found: list[dict[str, Any]] = []
    for batch in batches:
        images, _ = unpack(to_device(batch, device), masks=False)
        with autocast(device, precision):
            outputs = detector.net(images)
        for image_id, out in zip(batch["image_id"].tolist(), outputs, strict=True):
            seen.append(image_id)
            found += detections(image_id, {k: v.float().cpu() for k, v in out.items()}, to_cat)
    return seen, found


def _score_on_rank0(gt: Any, seen: list[int], found: list[dict[str, Any]], masks: bool) -> dict[str, float]:
    """Every rank's (seen, found) gathered to rank 0, scored there, the numbers sent back to all."""
    import torch.distributed as dist

    parts: list[Any] = [(seen, found)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (seen, found))
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    metrics: list[Any] = [coco_metrics(gt, parts, masks) if rank0 else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(metrics, src=0)  # every rank returns (and reports) the same numbers
    result: dict[str, float] = metrics[0]
    return result


def detections(image_id: int, out: dict[str, torch.Tensor], to_cat: dict[int, int]) -> list[dict[str, Any]]:
    """One image's torchvision output as COCO results (xywh boxes, original category ids, RLE masks)."""
    from pycocotools import mask as mask_util

    results = []
    for k in range(len(out["boxes"])):
        x1, y1, x2, y2 = out["boxes"][k].tolist()
        r: dict[str, Any] = {
            "image_id": image_id,
            "category_id": to_cat[int(out["labels"][k])],
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "score": float(out["scores"][k]),
        }
        if "masks" in out:
            binary = (out["masks"][k, 0] > 0.5).numpy().astype(np.uint8)
            rle = mask_util.encode(np.asfortranarray(binary))
            rle["counts"] = rle["counts"].decode("ascii")
            r["segmentation"] = rle
        results.append(r)
    return results


def coco_metrics(gt: Any, parts: list[Any], masks: bool) -> dict[str, float]:
    """AP, AP50, AP75, APs/m/l per IoU type, on the union of the images the ranks evaluated."""
    from pycocotools.cocoeval import COCOeval

    ids = sorted({i for seen, _ in parts for i in seen})
    found = [d for _, dets in parts for d in dets]
    out: dict[str, float] = {"eval_images": float(len(ids)), "eval_detections": float(len(found))}
    for kind in ("bbox", "segm") if masks else ("bbox",):
        if not found:  # COCO.loadRes refuses an empty list; no detections score 0
            out.update({f"eval_{kind}_{s}": 0.0 for s in STATS})
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            e = COCOeval(gt, gt.loadRes(found), kind)
            e.params.imgIds = ids
            e.evaluate()
            e.accumulate()
            e.summarize()
        out.update({f"eval_{kind}_{s}": float(v) for s, v in zip(STATS, e.stats[:6], strict=True)})
    return out


# --- the synthetic set -------------------------------------------------------------------

CATEGORIES = [(1, "square"), (3, "triangle"), (7, "diamond"), (9, "hexagon")]  # non-contiguous ids on purpose


def _synthetic(cfg: Config, cache_dir: Path) -> Path:
    s = spec(cfg).synthetic
    if not s.classes:
        raise ConfigError(
            [
                "data.path: required for recipe=coco (annotations/instances_<split>.json + <split>/ images); "
                "scale=smoke draws a small COCO-format set instead"
            ]
        )
    if s.classes > len(CATEGORIES):
        raise ConfigError([f"recipe.synthetic.classes: at most {len(CATEGORIES)}, got {s.classes}"])
    r = spec(cfg)

    def build(root: Path) -> None:
        rng = random.Random(cfg.run.seed)
        for split, n in ((r.train_split, s.train_images), (r.val_split, s.val_images)):
            write_split(root, split, n, s.size, CATEGORIES[: s.classes], rng)

    return built_once(cache_dir, "coco", [s.classes, s.train_images, s.val_images, s.size, cfg.run.seed, 1], build)


def write_split(root: Path, split: str, n: int, size: int, cats: list[tuple[int, str]], rng: random.Random) -> None:
    """``n`` images of 1-3 filled polygons each, with COCO boxes, polygon segmentations and areas."""
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    for k in range(n):
        image = Image.new("RGB", (size, size), tuple(rng.randrange(0, 80) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 3)):
            cat, name, poly = _random_polygon(cats, size, rng)
            draw.polygon(poly, fill=(80 + 40 * cats.index((cat, name)), 200, 255 - 50 * cats.index((cat, name))))
            anns.append(_polygon_annotation(len(anns) + 1, k + 1, cat, poly))
        name = f"{k:06d}.jpg"
        image.save(root / split / name, quality=95)
        images.append({"id": k + 1, "file_name": name, "height": size, "width": size})
    d = {"images": images, "annotations": anns, "categories": [{"id": c, "name": nm} for c, nm in cats]}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(d))


def _random_polygon(
    cats: list[tuple[int, str]], size: int, rng: random.Random
) -> tuple[int, str, list[tuple[float, float]]]:
    """A category drawn from ``cats`` and its regular polygon at a random place and scale."""
    cat, name = rng.choice(cats)
    half = rng.uniform(0.1, 0.25) * size
    cx, cy = rng.uniform(half, size - half), rng.uniform(half, size - half)
    sides = {"square": 4, "triangle": 3, "diamond": 4, "hexagon": 6}[name]
    turn = math.pi / 4 if name == "square" else -math.pi / 2
    poly = [
        (
            cx + half * math.cos(turn + 2 * math.pi * j / sides),
            cy + half * math.sin(turn + 2 * math.pi * j / sides),
        )
        for j in range(sides)
    ]
    return cat, name, poly


def _polygon_annotation(ann_id: int, image_id: int, cat: int, poly: list[tuple[float, float]]) -> dict[str, Any]:
    """The COCO annotation of one polygon: its box, segmentation and (shoelace) area."""
    xs, ys = [p[0] for p in poly], [p[1] for p in poly]
    area = 0.5 * abs(sum(xs[j] * ys[j - 1] - xs[j - 1] * ys[j] for j in range(len(poly))))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": cat,
        "iscrowd": 0,
        "area": area,
        "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
        "segmentation": [[c for p in poly for c in p]],
    }
