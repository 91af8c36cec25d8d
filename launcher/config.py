"""The typed configuration schema and its validation.

Hydra composes YAML (``conf/``) and command-line overrides into a plain dict; this module
checks that dict against the dataclasses below and turns it into typed objects. It never
imports Hydra, torch or Ray (a layering test keeps it so).

Validation collects *every* error of a config before reporting, names each by its full
key, lists the allowed values and suggests the closest valid key for a typo.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

# ---------------------------------------------------------------------------------------
# Schema. Every field is documented by the comment or docstring beside it; conf/*.yaml
# carries the values and their sources.
# ---------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Anchor:
    """A published (global batch -> lr, warmup) point that wins over the scaling rule."""

    global_batch: int
    lr: float
    warmup_steps: int | None = None
    source: str = ""


@dataclass(kw_only=True)
class Reference:
    """The recipe's published hyper-parameters: what the planner scales from."""

    global_batch: int
    lr: float
    warmup_steps: int = 0
    max_steps: int
    optimizer: Literal["sgd", "adamw"] = "sgd"
    weight_decay: float = 0.0
    lr_rule: Literal["linear", "sqrt", "none"] = "linear"  # used when planner.lr_rule=auto
    schedule: Literal["linear", "cosine", "step", "constant"] = "linear"
    milestones: list[float] = field(default_factory=list)  # fractions of max_steps (step)
    devices: int = 8  # devices the published run used (for batch.scale_with_world)
    large_batch_optimizer: Literal["lars", "lamb"] | None = None
    large_batch_threshold: int | None = None  # global batch at or above which it is used
    uses_batchnorm: bool = False
    norm_policy: Literal["sync_bn", "group_norm", "frozen_bn"] = "sync_bn"
    anchors: list[Anchor] = field(default_factory=list)
    epochs: float | None = None  # set: steps keep the reference's epochs on the dataset at hand
    source: str = ""


@dataclass(kw_only=True)
class BertModel:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    dropout: float = 0.1


@dataclass(kw_only=True)
class BertRecipe:
    name: Literal["bert"] = "bert"
    reference: Reference
    model: BertModel = field(default_factory=BertModel)
    seq_len: int = 512
    mask_prob: float = 0.15
    eval_fraction: float = 0.02  # share of sentence pairs held out for evaluation
    corpus_max_mb: float = 200.0  # cap on text read from data.path (or the fallback corpus)


@dataclass(kw_only=True)
class Synthetic:
    """A small real image set drawn locally (shapes on noise) when ``data.path`` is null."""

    classes: int = 0  # 0: no synthetic set; data.path is required
    train_per_class: int = 64
    val_per_class: int = 17
    size: int = 64  # pixels per side


@dataclass(kw_only=True)
class ImagenetRecipe:
    name: Literal["imagenet"] = "imagenet"
    reference: Reference
    model: str = "resnet50"  # any torchvision classification model name
    num_classes: int | None = None  # null: the number of class folders under train/
    train_crop: int = 224  # RandomResizedCrop size
    eval_resize: int = 256  # shorter side before the center crop
    eval_crop: int = 224
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0  # 0: off (torchvision v2 MixUp on training batches)
    cutmix_alpha: float = 0.0  # 0: off
    auto_augment: Literal["ta_wide"] | None = None  # TrivialAugmentWide
    random_erase: float = 0.0  # probability
    channels_last: bool = True  # on CUDA
    compile: bool = False  # torch.compile the model on CUDA
    bad_images: Literal["error", "skip"] = "error"  # an unreadable image stops the run, or is skipped
    synthetic: Synthetic = field(default_factory=Synthetic)


@dataclass(kw_only=True)
class SyntheticCoco:
    """A small real COCO-format set drawn locally (shapes with boxes and masks) when ``data.path`` is null."""

    classes: int = 0  # 0: no synthetic set; data.path is required
    train_images: int = 64
    val_images: int = 16
    size: int = 128  # pixels per side


@dataclass(kw_only=True)
class CocoRecipe:
    name: Literal["coco"] = "coco"
    reference: Reference
    model: Literal["fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn"] = "maskrcnn_resnet50_fpn"
    trainable_backbone_layers: int = 3  # of 5; detectron2 freezes the stem and res2
    min_size: int = 800  # shorter side after resizing (detectron2 / torchvision)
    max_size: int = 1333
    train_split: str = "train2017"  # annotations/instances_<split>.json and the image folder <split>/
    val_split: str = "val2017"
    keep_empty: bool = False  # keep training images without annotations (detectron2 drops them)
    synthetic: SyntheticCoco = field(default_factory=SyntheticCoco)


RecipeConfig = BertRecipe | ImagenetRecipe | CocoRecipe
RECIPE_SCHEMAS: dict[str, type] = {"bert": BertRecipe, "imagenet": ImagenetRecipe, "coco": CocoRecipe}


@dataclass(kw_only=True)
class Run:
    name: str | None = None  # MLflow run name; the same name again continues that run from its last checkpoint
    resume: bool = True  # false: a run.name that exists starts over as a new run
    job_id: str | None = None  # action=status|logs|stop: the Ray job (else the newest job of run.name)
    seed: int = 0
    output_dir: str = "outputs"  # checkpoints and Ray storage, relative to the cwd


@dataclass(kw_only=True)
class Data:
    path: str | None = None  # dataset root; null: the recipe makes or finds local data
    num_workers: int = 2  # DataLoader worker processes per training worker


@dataclass(kw_only=True)
class Train:
    max_steps: int | None = None  # optimizer steps; null: planned from the reference
    max_epochs: float | None = None  # alternative to max_steps
    warmup_steps: int | None = None  # null: planned from the reference
    log_every: int = 10
    checkpoint_every: int = 0  # steps; 0 = only at the end
    eval_every: int = 0  # steps; 0 = only at the end
    eval_batches: int = 20  # micro-batches per rank per evaluation (0 = whole split)
    grad_clip: float | None = 1.0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA
    ema_decay: float | None = None  # a number: keep an EMA of the weights (and BN stats), evaluated as eval_ema_*
    measure_noise_scale: bool = False  # log the gradient noise scale (critical batch) while training; needs 2+ workers


@dataclass(kw_only=True)
class Batch:
    global_batch: int | Literal["auto_noise_scale"] | None = None  # null: the reference's; see docs/batch-size.md
    micro_batch: int | Literal["auto"] = "auto"  # a number pins it; auto plans it
    scale_with_world: bool = False


@dataclass(kw_only=True)
class Optim:
    lr: float | None = None  # a number pins the lr; null: planned
    weight_decay: float | None = None  # null: the reference's
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9
    nesterov: bool = False  # SGD / LARS


@dataclass(kw_only=True)
class Memory:
    model_gb: float | None = None  # params + grads + optimizer state per device
    per_sample_gb: float | None = None  # activation memory per sample


@dataclass(kw_only=True)
class Planner:
    headroom: float = 0.1  # fraction of device memory kept free
    power_of_two: bool = False
    lr_rule: Literal["linear", "sqrt", "none", "auto"] = "auto"
    bn_min_group: int = 32  # samples per BatchNorm statistics group below which norm changes
    advise: bool = False  # compare the global batch with the last measured noise scale of this recipe
    memory: Memory = field(default_factory=Memory)


@dataclass(kw_only=True)
class LrFind:
    """``action=lr_find``: Smith's exponential LR sweep at the planned batch."""

    min_lr: float = 1e-7
    max_lr: float = 10.0
    steps: int = 100  # optimizer steps at most (it stops when the loss diverges)
    diverge: float = 4.0  # stop when the smoothed loss exceeds this many times its minimum


@dataclass(kw_only=True)
class PlanOutput:
    format: Literal["table", "json"] = "table"


@dataclass(kw_only=True)
class Cluster:
    kind: Literal["local", "ray"] = "local"  # local: an embedded Ray; ray: an existing Ray cluster
    address: str | None = None  # ray: the cluster (null: $RAY_ADDRESS, else auto); submit: its job API too
    storage_path: str | None = None  # ray: checkpoints, shared by all nodes (absolute path or URI); required
    max_failures: int = 0  # worker-group restarts from the latest checkpoint before the run fails
    nodes: int = 1
    gpus_per_node: int | None = None  # null: detected (0 without GPUs)
    gpu_memory_gb: float | None = None  # null: detected
    num_workers: int | None = None  # null: nodes x GPUs, or 2 CPU workers without GPUs
    use_gpu: bool | Literal["auto"] = "auto"
    cpus_per_worker: int = 1


@dataclass(kw_only=True)
class Engine:
    name: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: int | Literal["auto"] = "auto"


@dataclass(kw_only=True)
class Tracking:
    uri: str | None = None  # null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the cwd
    experiment: str = "launcher"
    required: bool = True  # false: an unreachable server at launch falls back to a local store


@dataclass(kw_only=True)
class Config:
    action: Literal["train", "plan", "lr_find", "submit", "status", "logs", "stop"] = "train"
    choices: dict[str, str] = field(default_factory=dict)  # Hydra group choices (filled in)
    run: Run = field(default_factory=Run)
    data: Data = field(default_factory=Data)
    train: Train = field(default_factory=Train)
    batch: Batch = field(default_factory=Batch)
    optim: Optim = field(default_factory=Optim)
    planner: Planner = field(default_factory=Planner)
    plan: PlanOutput = field(default_factory=PlanOutput)
    lr_find: LrFind = field(default_factory=LrFind)
    cluster: Cluster = field(default_factory=Cluster)
    engine: Engine = field(default_factory=Engine)
    tracking: Tracking = field(default_factory=Tracking)
    recipe: RecipeConfig


# ---------------------------------------------------------------------------------------
# Range checks: (key, predicate, what is allowed). Applied after types are right.
# ---------------------------------------------------------------------------------------

_POSITIVE = (lambda v: v is None or v > 0, "a number > 0")
_AT_LEAST_1 = (lambda v: v is None or v == "auto" or v >= 1, "an integer >= 1")
_NON_NEGATIVE = (lambda v: v is None or v >= 0, "a number >= 0")
_FRACTION = (lambda v: 0 <= v < 1, "a fraction in [0, 1)")
_PROBABILITY = (lambda v: 0 < v < 1, "a probability in (0, 1)")

RANGES: dict[str, tuple[Any, str]] = {
    "train.max_steps": _AT_LEAST_1,
    "train.max_epochs": _POSITIVE,
    "train.warmup_steps": _NON_NEGATIVE,
    "train.log_every": _AT_LEAST_1,
    "train.checkpoint_every": _NON_NEGATIVE,
    "train.eval_every": _NON_NEGATIVE,
    "train.eval_batches": _NON_NEGATIVE,
    "train.grad_clip": _POSITIVE,
    "train.ema_decay": _FRACTION,
    "batch.global_batch": (lambda v: v is None or v == "auto_noise_scale" or v >= 1, "an integer >= 1"),
    "lr_find.min_lr": _POSITIVE,
    "lr_find.max_lr": _POSITIVE,
    "lr_find.steps": (lambda v: v >= 10, "an integer >= 10"),
    "lr_find.diverge": (lambda v: v > 1, "a number > 1"),
    "batch.micro_batch": _AT_LEAST_1,
    "optim.lr": _POSITIVE,
    "optim.weight_decay": _NON_NEGATIVE,
    "optim.momentum": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "optim.betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "planner.headroom": _FRACTION,
    "planner.bn_min_group": _AT_LEAST_1,
    "planner.memory.model_gb": _POSITIVE,
    "planner.memory.per_sample_gb": _POSITIVE,
    "cluster.nodes": _AT_LEAST_1,
    "cluster.gpus_per_node": _NON_NEGATIVE,
    "cluster.gpu_memory_gb": _POSITIVE,
    "cluster.num_workers": _AT_LEAST_1,
    "cluster.cpus_per_worker": _AT_LEAST_1,
    "cluster.max_failures": (lambda v: v >= -1, "an integer >= 0, or -1 for no limit"),
    "engine.zero_stage": (lambda v: v == "auto" or v in (0, 1, 2, 3), "0, 1, 2, 3 or auto"),
    "data.num_workers": _NON_NEGATIVE,
    "recipe.reference.global_batch": _AT_LEAST_1,
    "recipe.reference.lr": _POSITIVE,
    "recipe.reference.max_steps": _AT_LEAST_1,
    "recipe.reference.warmup_steps": _NON_NEGATIVE,
    "recipe.reference.weight_decay": _NON_NEGATIVE,
    "recipe.reference.devices": _AT_LEAST_1,
    "recipe.reference.large_batch_threshold": _AT_LEAST_1,
    "recipe.reference.epochs": _POSITIVE,
    "recipe.seq_len": (lambda v: v >= 8, "an integer >= 8"),
    "recipe.mask_prob": _PROBABILITY,
    "recipe.eval_fraction": _PROBABILITY,
    "recipe.corpus_max_mb": _POSITIVE,
    "recipe.model.dropout": _FRACTION,
    "recipe.num_classes": (lambda v: v is None or v >= 2, "an integer >= 2"),
    "recipe.train_crop": _AT_LEAST_1,
    "recipe.eval_resize": _AT_LEAST_1,
    "recipe.eval_crop": _AT_LEAST_1,
    "recipe.label_smoothing": _FRACTION,
    "recipe.mixup_alpha": _NON_NEGATIVE,
    "recipe.cutmix_alpha": _NON_NEGATIVE,
    "recipe.random_erase": _FRACTION,
    "recipe.synthetic.classes": _NON_NEGATIVE,
    "recipe.synthetic.train_per_class": _AT_LEAST_1,
    "recipe.synthetic.val_per_class": _AT_LEAST_1,
    "recipe.synthetic.size": (lambda v: v >= 16, "an integer >= 16"),
    "recipe.synthetic.train_images": _AT_LEAST_1,
    "recipe.synthetic.val_images": _AT_LEAST_1,
    "recipe.trainable_backbone_layers": (lambda v: 0 <= v <= 5, "an integer in [0, 5]"),
    "recipe.min_size": _AT_LEAST_1,
    "recipe.max_size": _AT_LEAST_1,
}


class ConfigError(ValueError):
    """Every problem found in one config, one per line, each naming its full key."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        head = "1 config error" if len(errors) == 1 else f"{len(errors)} config errors"
        super().__init__(head + ":\n" + "\n".join(f"  - {e}" for e in errors))


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------


def all_keys(schema: type, prefix: str = "", recipe: str = "bert") -> list[str]:
    """Every leaf and branch key of a schema, dotted (``train.max_steps``)."""
    keys = []
    for f in dataclasses.fields(schema):
        full = f"{prefix}{f.name}"
        keys.append(full)
        sub = _dataclass_of(_hints(schema)[f.name], full, recipe)
        if sub is not None:
            keys.extend(all_keys(sub, full + ".", recipe))
    return keys


def check_override_keys(keys: list[str], recipe: str) -> list[str]:
    """Errors for dotted keys (from ``key=value`` overrides) that the schema lacks."""
    known = set(all_keys(Config, recipe=recipe))
    errors = []
    for key in keys:
        if key in known or key.startswith("choices."):
            continue
        errors.append(_unknown_key(key, known))
    return errors


def validate(raw: dict[str, Any]) -> Config:
    """Check a composed config dict and build the typed ``Config``; raise ``ConfigError``."""
    errors: list[str] = []
    cfg = _build(Config, raw, "", errors, recipe=_recipe_name(raw))
    if isinstance(cfg, Config) and not errors:  # rules across keys need each key valid first
        errors += _cross_checks(cfg)
    if errors:
        raise ConfigError(errors)
    assert isinstance(cfg, Config)
    return cfg


def _cross_checks(cfg: Config) -> list[str]:
    """Rules that involve more than one key."""
    errors = []
    if cfg.lr_find.max_lr <= cfg.lr_find.min_lr:
        errors.append(f"lr_find.max_lr: got {cfg.lr_find.max_lr:g}, expected a number > lr_find.min_lr")
    storage = cfg.cluster.storage_path
    if cfg.cluster.kind == "ray":
        if not storage and cfg.action in ("train", "lr_find", "submit"):
            errors.append(
                "cluster.storage_path: required with cluster=ray: a path every node sees (NFS, EFS, a "
                "mounted volume; absolute) or an object-store URI (s3://bucket/runs, gs://...)"
            )
        elif storage and "://" not in storage and not storage.startswith("/"):
            errors.append(
                f"cluster.storage_path: got {storage!r}, a relative local path; the other nodes of the "
                "cluster cannot see it: give an absolute path on shared storage or an object-store URI"
            )
    elif storage is not None:
        errors.append(
            "cluster.storage_path: only used with cluster=ray (local runs keep checkpoints in run.output_dir)"
        )
    if cfg.action in ("submit", "status", "logs", "stop") and cfg.cluster.kind != "ray":
        errors.append(
            f"action: {cfg.action} talks to a Ray cluster's job API; add cluster=ray "
            "(with cluster.address and cluster.storage_path)"
        )
    return errors


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of a config (what crosses process boundaries)."""
    return dataclasses.asdict(cfg)


def _recipe_name(raw: dict[str, Any]) -> str:
    recipe = raw.get("recipe")
    name = recipe.get("name") if isinstance(recipe, dict) else None
    return name if isinstance(name, str) and name in RECIPE_SCHEMAS else "bert"


def _hints(schema: type) -> dict[str, Any]:
    return typing.get_type_hints(schema)


def _dataclass_of(tp: Any, key: str, recipe: str) -> type | None:
    if key == "recipe":
        return RECIPE_SCHEMAS[recipe]
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    return None


def _build(schema: type, raw: Any, prefix: str, errors: list[str], recipe: str) -> Any:
    if not isinstance(raw, dict):
        errors.append(f"{prefix.rstrip('.') or '<root>'}: expected a mapping, got {raw!r}")
        return None
    hints = _hints(schema)
    names = {f.name for f in dataclasses.fields(schema)}
    for key in raw:
        if key not in names:
            full = f"{prefix}{key}"
            if key == "_target_" or _carries_target(raw[key]):
                errors.append(
                    f"{full}: refused: `_target_` is not accepted anywhere in this config; objects are "
                    "built by the recipes from typed fields, never from an import path"
                )
            else:
                errors.append(_unknown_key(full, set(all_keys(Config, recipe=recipe))))
    values: dict[str, Any] = {}
    for f in dataclasses.fields(schema):
        full = f"{prefix}{f.name}"
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.name not in raw:
            if required:
                errors.append(f"{full}: required, but missing")
            continue
        tp = hints[f.name]
        sub = _dataclass_of(tp, full, recipe)
        if sub is not None:
            values[f.name] = _build(sub, raw[f.name], full + ".", errors, recipe)
        else:
            values[f.name] = _check_value(tp, raw[f.name], full, errors, recipe)
    if any(e.startswith(prefix) for e in errors) and prefix:
        return None
    try:
        return schema(**values)
    except TypeError:  # a required sub-field failed; its error is already recorded
        return None


def _carries_target(value: Any) -> bool:
    if isinstance(value, dict):
        return "_target_" in value or any(_carries_target(v) for v in value.values())
    if isinstance(value, list):
        return any(_carries_target(v) for v in value)
    return False


def _check_value(tp: Any, value: Any, key: str, errors: list[str], recipe: str) -> Any:
    ok, converted = _matches(tp, value, key, errors, recipe)
    if not ok:
        errors.append(f"{key}: got {value!r}, expected {_describe(tp)}")
        return value
    check = RANGES.get(key)
    if check is not None and converted is not None:
        predicate, allowed = check
        try:
            good = predicate(converted)
        except TypeError:
            good = False
        if not good:
            errors.append(f"{key}: got {converted!r}, expected {allowed}")
    return converted


def _matches(tp: Any, value: Any, key: str, errors: list[str], recipe: str) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (Union, types.UnionType):
        for arm in typing.get_args(tp):
            ok, conv = _matches(arm, value, key, [], recipe)
            if ok:
                return True, conv
        return False, value
    if origin is Literal:
        return value in typing.get_args(tp), value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        (item,) = typing.get_args(tp)
        sub = _dataclass_of(item, key, recipe)
        if sub is not None:
            return True, [_build(sub, v, f"{key}[{i}].", errors, recipe) for i, v in enumerate(value)]
        out = []
        for v in value:
            ok, conv = _matches(item, v, key, errors, recipe)
            if not ok:
                return False, value
            out.append(conv)
        return True, out
    if origin is dict:
        return isinstance(value, dict), value
    raise TypeError(f"schema type {tp!r} at {key} is not supported by the validator")


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _unknown_key(full: str, known: set[str]) -> str:
    parent, _, leaf = full.rpartition(".")
    siblings = sorted(k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent)
    close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
    if not close:  # a key placed under the wrong parent: compare whole keys
        close = [
            k.rpartition(".")[2] if k.rpartition(".")[0] == parent else k
            for k in difflib.get_close_matches(full, sorted(known), n=1, cutoff=0.75)
        ]
    hint = f"; did you mean `{_join(parent, close[0]) if '.' not in close[0] else close[0]}`?" if close else ""
    where = f"`{parent}`" if parent else "the top level"
    allowed = ", ".join(siblings) if siblings else "none"
    return f"{full}: unknown key{hint} (keys allowed under {where}: {allowed})"


def _join(parent: str, leaf: str) -> str:
    return f"{parent}.{leaf}" if parent else leaf


def _unknown_value(key: str, value: Any, allowed: list[str]) -> str:
    close = difflib.get_close_matches(str(value), allowed, n=1)
    hint = f"; did you mean `{close[0]}`?" if close else ""
    return f"{key}: unknown value {value!r}{hint} (allowed: {', '.join(allowed)})"


def unknown_choice(group: str, value: str, allowed: list[str]) -> str:
    """The error for ``group=value`` when ``conf/group/value.yaml`` does not exist."""
    return _unknown_value(group, value, allowed)
