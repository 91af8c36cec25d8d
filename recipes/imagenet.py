"""ImageNet-style classification: any torchvision classification model on any ImageFolder tree.

Data: ``data.path`` holds ``train/`` and ``val/``, one folder per class (the same class
folders in both), images in any format PIL reads. The structure is checked on the driver
before anything is scheduled (missing split, empty class, classes that differ between
splits); an image that cannot be decoded stops the run with its path, or is skipped with
a warning under ``recipe.bad_images=skip``. Without ``data.path``, ``recipe.synthetic``
draws a small real image set (shapes on noise, JPEG and PNG) into the cache.

Transforms are torchvision's reference ones: RandomResizedCrop + flip for training (plus
TrivialAugmentWide / RandomErasing when asked), resize + center crop for evaluation;
MixUp / CutMix act on training batches. The model returns the summed cross-entropy (and
in eval mode the counts of top-1 / top-5 hits), so the loop's global-batch normalisation
is exact.

Any torchvision classifier trains. googlenet and inception_v3 return their auxiliary
classifiers' logits beside the main ones in training mode: loss and top-k use the main
logits; the auxiliary heads train too, their cross-entropy weighted as published and
returned as ``ce_aux`` (googlenet: 0.3 for each of its two heads, Szegedy et al. 2015,
"Going deeper with convolutions", sec. 5; inception_v3: 0.4, TF-slim's
train_image_classifier.py and PyTorch's fine-tuning tutorial). inception_v3's auxiliary head
needs a 17x17 grid, so it trains at ``recipe.train_crop >= 299`` (it evaluates from 75 px).
Models built for one input size (vision transformers: ``image_size``, maxvit: ``input_size``)
are built for ``recipe.train_crop``, and ``recipe.eval_crop`` must equal it.

``recipe.weights``: a local state dict of the torchvision model (launcher/weights.py checks it
key by key), loaded inside ``build_model``, so before the plan's norm policy converts BatchNorm;
the driver checks it before anything is scheduled (``weights.check``: the model on the meta
device), so each worker reads it once, when it builds its model.
"""

from __future__ import annotations

import colorsys
import difflib
import random
import warnings
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, UnidentifiedImageError
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from launcher import weights
from launcher.config import Config, ConfigError, ImagenetRecipe
from launcher.data import Data, built_once
from recipes.protocol import Evaluate

METRICS = ["ce", "top1", "top5"]  # evaluation: mean loss, top-1 and top-5 accuracy
evaluate: Evaluate | None = None  # evaluation: the mean of the per-sample METRICS sums


def spec(cfg: Config) -> ImagenetRecipe:
    """``cfg.recipe``, typed as this recipe's section."""
    assert isinstance(cfg.recipe, ImagenetRecipe), cfg.recipe
    return cfg.recipe


# --- model -------------------------------------------------------------------------------


class Classifier(nn.Module):
    """A torchvision classifier whose forward takes a batch and returns summed losses (and hits)."""

    def __init__(self, net: nn.Module, label_smoothing: float, channels_last: bool) -> None:
        super().__init__()
        self.net, self.label_smoothing, self.channels_last = net, label_smoothing, channels_last

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, labels = batch["images"], batch["labels"]
        if self.channels_last and images.is_cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        logits, aux = main_and_aux(self.net(images))
        ce = self.cross_entropy(logits, labels)
        if self.training:
            if aux:  # the auxiliary heads' weighted loss (the module docstring gives the weights' sources)
                return {"ce": ce, "ce_aux": sum(w * self.cross_entropy(a, labels) for w, a in aux)}  # type: ignore[dict-item]
            return {"ce": ce}
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        return {"ce": ce, "top1": hits[:, 0].sum().float(), "top5": hits.any(dim=1).sum().float()}

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed over the batch, in fp32; ``labels`` are class indices or (MixUp / CutMix) probabilities."""
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing, reduction="sum")


AUX_WEIGHTS = {"googlenet": 0.3, "inception_v3": 0.4}  # per auxiliary head (sources: the module docstring)
MIN_TRAIN_CROP = {"inception_v3": 299}  # its auxiliary head: a 5x5 conv after a 5x5/3 pool of a 17x17 grid


def main_and_aux(out: Any) -> tuple[torch.Tensor, list[tuple[float, torch.Tensor]]]:
    """A torchvision classifier's output as (main logits, [(weight, auxiliary logits)]): googlenet's
    ``GoogLeNetOutputs`` and inception_v3's ``InceptionOutputs`` in training mode, else a tensor."""
    from torchvision.models import GoogLeNetOutputs, InceptionOutputs

    if isinstance(out, GoogLeNetOutputs):
        heads, weight = [out.aux_logits1, out.aux_logits2], AUX_WEIGHTS["googlenet"]
    elif isinstance(out, InceptionOutputs):
        heads, weight = [out.aux_logits], AUX_WEIGHTS["inception_v3"]
    else:
        return out, []
    return out.logits, [(weight, a) for a in heads if a is not None]


def model_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_model(name: str) -> None:
    if name not in model_names():
        close = difflib.get_close_matches(name, model_names(), n=3)
        raise ConfigError(
            [
                f"recipe.model: {name!r} is not a torchvision classification model"
                + (f"; did you mean {', '.join(close)}?" if close else "")
                + " (the names: torchvision.models.list_models(module=torchvision.models))"
            ]
        )


def check_sizes(r: ImagenetRecipe) -> None:
    """The crops the model can take (``MIN_TRAIN_CROP``; one size for a model built for one); a ConfigError."""
    errors = []
    if r.train_crop < MIN_TRAIN_CROP.get(r.model, 0):
        errors.append(
            f"recipe.train_crop: {r.model} trains its auxiliary classifier, which needs at least "
            f"{MIN_TRAIN_CROP[r.model]} px; got {r.train_crop}"
        )
    if _size_kwargs(r) and r.eval_crop != r.train_crop:
        errors.append(
            f"recipe.eval_crop: {r.model} is built for one input size, recipe.train_crop={r.train_crop}; "
            f"got {r.eval_crop} (set recipe.eval_crop={r.train_crop})"
        )
    if errors:
        raise ConfigError(errors)


def _size_kwargs(r: ImagenetRecipe) -> dict[str, Any]:
    """The constructor's input size for a model built for one (vision transformers, maxvit), else none."""
    import torchvision

    family = torchvision.models.get_model_builder(r.model).__module__.rsplit(".", 1)[-1]
    if family == "vision_transformer":
        return {"image_size": r.train_crop}
    if family == "maxvit":
        return {"input_size": (r.train_crop, r.train_crop)}
    return {}


def build_net(cfg: Config) -> nn.Module:
    """The torchvision classifier, with ``recipe.weights`` loaded when set. No hub weights; zero-init of
    each residual block's last BN gamma (Goyal et al. 2017); googlenet / inception_v3 with their
    auxiliary heads and torchvision's init (named, so torchvision does not warn about its default)."""
    import torchvision

    r = spec(cfg)
    check_model(r.model)
    check_sizes(r)
    kwargs: dict[str, Any] = {"weights": None, "num_classes": _num_classes(cfg), **_size_kwargs(r)}
    if r.model in torchvision.models.resnet.__all__:
        kwargs["zero_init_residual"] = True
    if r.model in AUX_WEIGHTS:
        kwargs.update(aux_logits=True, init_weights=True)
    net = torchvision.models.get_model(r.model, **kwargs)
    if r.weights is not None:
        weights.load(net, weights.read(r.weights, "recipe.weights"), "recipe.weights", r.weights)
    return net


def build_model(cfg: Config) -> nn.Module:
    """``build_net`` wrapped to take a batch and return summed losses; channels-last and compile on CUDA."""
    r = spec(cfg)
    net = build_net(cfg)
    on_gpu = torch.cuda.is_available()
    if r.channels_last and on_gpu:
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if r.compile and on_gpu:
        net = torch.compile(net)  # type: ignore[assignment]
    return Classifier(net, r.label_smoothing, r.channels_last)


def trace_model(cfg: Config) -> nn.Module:
    """``build_model``'s, uncompiled (the memory trace runs eagerly under fake tensors)."""
    r = spec(cfg)
    return Classifier(build_net(cfg), r.label_smoothing, r.channels_last)


def count(batch: dict[str, torch.Tensor]) -> dict[str, int]:
    n = len(batch["images"])
    return {"ce": n, "ce_aux": n, "top1": n, "top5": n}


def example_batch(cfg: Config, n: int) -> dict[str, torch.Tensor]:
    """A batch of ``n`` training-size images (for the memory estimate and probe)."""
    r = spec(cfg)
    return {
        "images": torch.randn(n, 3, r.train_crop, r.train_crop),
        "labels": torch.zeros(n, dtype=torch.long),
    }


def _num_classes(cfg: Config) -> int:
    r = spec(cfg)
    if r.num_classes is not None:
        return r.num_classes
    if cfg.data.path is None:
        return max(2, r.synthetic.classes) if r.synthetic.classes else 1000
    train = Path(cfg.data.path) / "train"
    return len([d for d in train.iterdir() if d.is_dir()]) if train.is_dir() else 1000


# --- data --------------------------------------------------------------------------------


def build_data(cfg: Config, cache_dir: Path) -> Data:
    """The two ImageFolder splits (checked), their transforms and collates."""
    r = spec(cfg)
    check_model(r.model)
    check_sizes(r)
    root = Path(cfg.data.path).expanduser() if cfg.data.path else _synthetic(cfg, cache_dir)
    classes = check_tree(root)
    if r.num_classes is not None and r.num_classes != len(classes):
        raise ConfigError(
            [f"recipe.num_classes: {r.num_classes}, but {root / 'train'} has {len(classes)} class folders"]
        )
    train_tf, eval_tf = _transforms(r)
    train = Images(root / "train", train_tf, r.bad_images, cfg.run.seed)
    val = Images(root / "val", eval_tf, r.bad_images, cfg.run.seed, fixed=True)
    mixer = _mixer(r, len(classes))

    def collate_train(items: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
        batch = collate(items)
        if mixer is not None:  # soft labels: cross_entropy takes class probabilities
            batch["images"], batch["labels"] = mixer(batch["images"], batch["labels"])
        return batch

    return Data(train=train, eval=val, collate=collate_train, eval_collate=collate)


def _transforms(r: ImagenetRecipe) -> tuple[Any, Any]:
    """torchvision's reference training and evaluation transforms, as ``recipe`` configures them."""
    from torchvision.transforms import v2

    norm = v2.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    train_tf: list[Any] = [v2.RandomResizedCrop(r.train_crop, antialias=True), v2.RandomHorizontalFlip()]
    if r.auto_augment == "ta_wide":
        train_tf.append(v2.TrivialAugmentWide())
    train_tf += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), norm]
    if r.random_erase:
        train_tf.append(v2.RandomErasing(p=r.random_erase))
    eval_tf = [
        v2.Resize(r.eval_resize, antialias=True),
        v2.CenterCrop(r.eval_crop),
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        norm,
    ]
    return v2.Compose(train_tf), v2.Compose(eval_tf)


def _mixer(r: ImagenetRecipe, num_classes: int) -> Any:
    """MixUp and / or CutMix (one drawn per batch), or None when both are off."""
    from torchvision.transforms import v2

    mix = [v2.MixUp(alpha=r.mixup_alpha, num_classes=num_classes)] if r.mixup_alpha else []
    mix += [v2.CutMix(alpha=r.cutmix_alpha, num_classes=num_classes)] if r.cutmix_alpha else []
    return v2.RandomChoice(mix) if mix else None


def collate(items: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    return {
        "images": torch.stack([x for x, _ in items]),
        "labels": torch.tensor([y for _, y in items], dtype=torch.long),
    }


def image_extensions() -> tuple[str, ...]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return IMG_EXTENSIONS


def check_tree(root: Path) -> list[str]:
    """The class names, or a ConfigError naming every structural problem under ``root``."""
    errors: list[str] = []
    splits: dict[str, list[str]] = {}
    for split in ("train", "val"):
        d = root / split
        if not d.is_dir():
            errors.append(f"data.path: {d} is missing (expected {root}/train/<class>/* and {root}/val/<class>/*)")
            continue
        classes = sorted(c.name for c in d.iterdir() if c.is_dir())
        if not classes:
            errors.append(f"data.path: {d} has no class folders")
        for c in classes:
            if not any(f.suffix.lower() in image_extensions() for f in (d / c).iterdir() if f.is_file()):
                errors.append(f"data.path: class folder {d / c} has no images ({' '.join(image_extensions())})")
        splits[split] = classes
    if len(splits) == 2 and splits["train"] != splits["val"]:
        only_train = sorted(set(splits["train"]) - set(splits["val"]))
        only_val = sorted(set(splits["val"]) - set(splits["train"]))
        errors.append(
            f"data.path: train/ and val/ class folders differ (only in train: {only_train[:5]}, "
            f"only in val: {only_val[:5]})"
        )
    if errors:
        raise ConfigError(errors)
    return splits["train"]


class Images(Dataset):
    """An ImageFolder split read with PIL. Index ``i`` is ``epoch * len + position``.

    Augmentation draws from a generator seeded by (run seed, index), so a sample looks
    the same whatever the world size or micro-batch. An unreadable image raises a
    ``BadImage`` naming its path, or (``skip``) is replaced by the next readable one.
    """

    def __init__(self, root: Path, transform: Any, bad: str, seed: int, fixed: bool = False) -> None:
        from torchvision.datasets import ImageFolder

        folder = ImageFolder(str(root), allow_empty=False)
        self.samples, self.classes = folder.samples, folder.classes
        self.transform, self.bad, self.seed, self.fixed = transform, bad, seed, fixed
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        n = len(self.samples)
        for attempt in range(n):
            path, label = self.samples[(i + attempt) % n]
            try:
                with Image.open(path) as im:
                    image = im.convert("RGB")
                break
            except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
                if self.bad == "error":
                    raise BadImage(
                        f"cannot read image {path}: {e} (fix or remove it, or set recipe.bad_images=skip)"
                    ) from None
                self.skipped += 1
                warnings.warn(f"skipped unreadable image {path}: {e} ({self.skipped} skipped here)", stacklevel=1)
        else:
            raise BadImage(f"no readable image under {Path(self.samples[0][0]).parent.parent}")
        state = torch.random.get_rng_state()
        torch.manual_seed(hash((self.seed, 0 if self.fixed else i)) & 0x7FFFFFFF)
        try:
            return self.transform(image), label
        finally:
            torch.random.set_rng_state(state)


class BadImage(RuntimeError):
    """An image that PIL cannot decode (``recipe.bad_images=error``)."""


# --- the synthetic set -------------------------------------------------------------------

SHAPES = ["circle", "square", "triangle", "cross", "ring", "bar", "diamond", "dots"]


def _synthetic(cfg: Config, cache_dir: Path) -> Path:
    r = spec(cfg)
    s = r.synthetic
    if not s.classes:
        raise ConfigError(
            [
                "data.path: required for recipe=imagenet (an ImageFolder root with train/ and val/); "
                "scale=smoke draws a small image set instead"
            ]
        )
    if s.classes > len(SHAPES):
        raise ConfigError([f"recipe.synthetic.classes: at most {len(SHAPES)} (one per shape), got {s.classes}"])

    def build(root: Path) -> None:
        rng = random.Random(cfg.run.seed)
        for split, per_class in (("train", s.train_per_class), ("val", s.val_per_class)):
            for c in SHAPES[: s.classes]:
                (root / split / c).mkdir(parents=True, exist_ok=True)
                for k in range(per_class):
                    ext = "png" if k % 3 == 0 else "jpg"  # mixed formats, as real trees are
                    draw_shape(c, s.size, rng).save(root / split / c / f"{k:05d}.{ext}")

    return built_once(
        cache_dir, "images", [s.classes, s.train_per_class, s.val_per_class, s.size, cfg.run.seed, 2], build
    )


def draw_shape(shape: str, size: int, rng: random.Random) -> Image.Image:
    """One shape at a random place and scale on a noisy background; each class has its own hue.

    The hue (jittered) makes the set learnable in the minutes a smoke run has, even under
    RandomResizedCrop; the shape is what a longer run learns beyond it.
    """
    hue = (SHAPES.index(shape) / len(SHAPES) + rng.uniform(-0.04, 0.04)) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0))
    fg = (int(r * 255), int(g * 255), int(b * 255))
    bg = tuple(rng.randrange(0, 90) for _ in range(3))
    noise = Image.effect_noise((size, size), 40).convert("RGB")
    image = Image.blend(Image.new("RGB", (size, size), bg), noise, 0.3)
    d = ImageDraw.Draw(image)
    half = rng.uniform(0.2, 0.4) * size
    cx, cy = rng.uniform(half, size - half), rng.uniform(half, size - half)
    box = (cx - half, cy - half, cx + half, cy + half)
    w = max(2, int(half / 3))
    if shape == "circle":
        d.ellipse(box, fill=fg)
    elif shape == "square":
        d.rectangle(box, fill=fg)
    elif shape == "triangle":
        d.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fg)
    elif shape == "cross":
        d.line([(cx - half, cy), (cx + half, cy)], fill=fg, width=w)
        d.line([(cx, cy - half), (cx, cy + half)], fill=fg, width=w)
    elif shape == "ring":
        d.ellipse(box, outline=fg, width=w)
    elif shape == "bar":
        d.rectangle((cx - half, cy - w, cx + half, cy + w), fill=fg)
    elif shape == "diamond":
        d.polygon([(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)], fill=fg)
    else:
        for _ in range(5):
            x, y = rng.uniform(cx - half, cx + half), rng.uniform(cy - half, cy + half)
            d.ellipse((x - w, y - w, x + w, y + w), fill=fg)
    return image.rotate(rng.uniform(0, 360) if shape != "bar" else rng.choice([0, 90]), fillcolor=bg)
