"""The typed configuration schema and its validation.

Hydra composes YAML (``conf/``) and command-line overrides into a plain dict; this module
checks that dict against the dataclasses below and turns it into typed objects. It never
imports Hydra, torch or Ray (a layering test keeps it so).

Each field carries, in one place, its default, its one-line doc and (where a range applies)
its check: ``dataclasses.fields(Train)[i].metadata`` holds ``"doc"`` and ``"check"``, a
``(predicate, "what is allowed")`` pair; ``schema_field("train.max_steps")`` finds the field of a
dotted key, ``doc(key)`` and ``check_of(key)`` read its metadata.
``conf/config.yaml`` restates the defaults with their sources; a unit test keeps the two equal.

Validation collects *every* error of a config before reporting, names each by its full
key, lists the allowed values and suggests the closest valid key for a typo.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from launcher.devices import GPUS

# ---------------------------------------------------------------------------------------
# Fields: a default, a one-line doc and an optional range check, side by side.
# ---------------------------------------------------------------------------------------

Check = tuple[Callable[[Any], bool], str]  # (predicate on a typed, non-null value, what is allowed)

POSITIVE: Check = (lambda v: v > 0, "a number > 0")
AT_LEAST_1: Check = (lambda v: v == "auto" or v >= 1, "an integer >= 1")
NON_NEGATIVE: Check = (lambda v: v >= 0, "a number >= 0")
FRACTION: Check = (lambda v: 0 <= v < 1, "a fraction in [0, 1)")
PROBABILITY: Check = (lambda v: 0 < v < 1, "a probability in (0, 1)")


def at_least(n: int) -> Check:
    return (lambda v: v >= n, f"an integer >= {n}")


def _two_betas(v: list[float]) -> bool:
    return len(v) == 2 and all(0 <= b < 1 for b in v)


def about(doc: str, check: Check | None = None) -> dict[str, Any]:
    """A field's metadata: its one-line doc and its range check (``None`` for no range)."""
    return {"doc": doc, "check": check}


def setting(default: Any, doc: str, check: Check | None = None) -> Any:
    """A field with a default (a list default is copied per instance)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=about(doc, check))
    return field(default=default, metadata=about(doc, check))


def section(schema: type, doc: str) -> Any:
    """A nested section, defaulting to its own defaults."""
    return field(default_factory=schema, metadata=about(doc))


def schema_field(key: str, recipe: str = "bert") -> dataclasses.Field[Any]:
    """The schema field of a dotted key (``train.max_steps``, ``recipe.reference.lr``): its
    ``default`` and its ``metadata["doc"]`` and ``metadata["check"]``. ``KeyError`` if unknown."""
    schema: type = Config
    *branches, leaf = key.split(".")
    prefix = ""
    for name in branches:
        prefix = _join(prefix, name)
        sub = _dataclass_of(_hints(schema).get(name), prefix, recipe)
        if sub is None:
            raise KeyError(key)
        schema = sub
    for f in dataclasses.fields(schema):
        if f.name == leaf:
            return f
    raise KeyError(key)


def doc(key: str, recipe: str = "bert") -> str:
    """The one-line doc of a dotted key."""
    return str(schema_field(key, recipe).metadata.get("doc", ""))


def check_of(key: str, recipe: str = "bert") -> Check | None:
    """The range check ``(predicate, allowed)`` of a dotted key, or ``None``."""
    check: Check | None = schema_field(key, recipe).metadata.get("check")
    return check


# ---------------------------------------------------------------------------------------
# Schema. conf/*.yaml carries the values and their sources.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Anchor:
    """A published (global batch -> lr, warmup) point that wins over the scaling rule."""

    global_batch: int = field(metadata=about("the global batch the point was published at", AT_LEAST_1))
    lr: float = field(metadata=about("the published lr at that batch", POSITIVE))
    warmup_steps: int | None = setting(None, "the published warmup at that batch (null: the planner's)", NON_NEGATIVE)
    source: str = setting("", "where the point was published")


@dataclass(frozen=True, kw_only=True)
class Reference:
    """The recipe's published hyper-parameters: what the planner scales from (frozen: the planner's input)."""

    global_batch: int = field(metadata=about("global batch of the published run", AT_LEAST_1))
    lr: float = field(metadata=about("lr of the published run at its global batch", POSITIVE))
    warmup_steps: int = setting(0, "warmup steps of the published run", NON_NEGATIVE)
    max_steps: int = field(metadata=about("optimizer steps of the published run", AT_LEAST_1))
    optimizer: Literal["sgd", "adamw"] = setting("sgd", "the published optimizer")
    weight_decay: float = setting(0.0, "the published weight decay", NON_NEGATIVE)
    lr_rule: Literal["linear", "sqrt", "none"] = setting("linear", "lr scaling rule (planner.lr_rule=auto)")
    schedule: Literal["linear", "cosine", "step", "constant"] = setting("linear", "lr schedule after warmup")
    milestones: tuple[float, ...] = setting((), "fractions of max_steps where lr drops x0.1 (schedule: step)")
    devices: int = setting(8, "devices the published run used (for batch.scale_with_world)", AT_LEAST_1)
    large_batch_optimizer: Literal["lars", "lamb"] | None = setting(None, "optimizer for a large global batch")
    large_batch_threshold: int | None = setting(
        None, "global batch at or above which large_batch_optimizer is used", AT_LEAST_1
    )
    uses_batchnorm: bool = setting(False, "the model has BatchNorm layers (the norm policy applies)")
    norm_policy: Literal["sync_bn", "group_norm", "frozen_bn"] = setting(
        "sync_bn", "norm used when the micro-batch is below planner.bn_min_group"
    )
    anchors: tuple[Anchor, ...] = setting((), "published points that win over the lr rule at their batch")
    epochs: float | None = setting(None, "set: steps keep the reference's epochs on the dataset at hand", POSITIVE)
    source: str = setting("", "the publication these numbers come from")


@dataclass(kw_only=True)
class BertModel:
    vocab_size: int = setting(30522, "WordPiece vocabulary trained locally")
    hidden_size: int = setting(768, "hidden size (H)")
    num_layers: int = setting(12, "layers (L)")
    num_heads: int = setting(12, "attention heads (A)")
    intermediate_size: int = setting(3072, "feed-forward width")
    dropout: float = setting(0.1, "dropout of hidden states and attention", FRACTION)


@dataclass(kw_only=True)
class BertRecipe:
    name: Literal["bert"] = setting("bert", "the recipe module")
    reference: Reference = field(metadata=about("the published hyper-parameters"))
    model: BertModel = section(BertModel, "the BertForPreTraining config")
    seq_len: int = setting(512, "tokens per sentence pair", at_least(8))
    mask_prob: float = setting(0.15, "share of tokens masked for the MLM loss", PROBABILITY)
    eval_fraction: float = setting(0.02, "share of sentence pairs held out for evaluation", PROBABILITY)
    corpus_max_mb: float = setting(200.0, "cap on text read from data.path (or the fallback corpus)", POSITIVE)


@dataclass(kw_only=True)
class Synthetic:
    """A small real image set drawn locally (shapes on noise) when ``data.path`` is null."""

    classes: int = setting(0, "0: no synthetic set; data.path is required", NON_NEGATIVE)
    train_per_class: int = setting(64, "training images per class", AT_LEAST_1)
    val_per_class: int = setting(17, "validation images per class", AT_LEAST_1)
    size: int = setting(64, "pixels per side", at_least(16))


@dataclass(kw_only=True)
class ImagenetRecipe:
    name: Literal["imagenet"] = setting("imagenet", "the recipe module")
    reference: Reference = field(metadata=about("the published hyper-parameters"))
    model: str = setting("resnet50", "any torchvision classification model name")
    num_classes: int | None = setting(
        None, "null: the number of class folders under train/", (lambda v: v >= 2, "an integer >= 2")
    )
    train_crop: int = setting(224, "RandomResizedCrop size", AT_LEAST_1)
    eval_resize: int = setting(256, "shorter side before the center crop", AT_LEAST_1)
    eval_crop: int = setting(224, "center crop size", AT_LEAST_1)
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy", FRACTION)
    mixup_alpha: float = setting(0.0, "0: off (torchvision v2 MixUp on training batches)", NON_NEGATIVE)
    cutmix_alpha: float = setting(0.0, "0: off", NON_NEGATIVE)
    auto_augment: Literal["ta_wide"] | None = setting(None, "ta_wide: TrivialAugmentWide")
    random_erase: float = setting(0.0, "probability of RandomErasing", FRACTION)
    channels_last: bool = setting(True, "channels-last memory format on CUDA")
    compile: bool = setting(False, "torch.compile the model on CUDA")
    bad_images: Literal["error", "skip"] = setting("error", "an unreadable image stops the run, or is skipped")
    weights: str | None = setting(
        None, "a local file: the torchvision model's state dict, loaded before training; null: from scratch"
    )
    synthetic: Synthetic = section(Synthetic, "the drawn set used when data.path is null")


@dataclass(kw_only=True)
class SyntheticCoco:
    """A small real COCO-format set drawn locally (shapes with boxes and masks) when ``data.path`` is null."""

    classes: int = setting(0, "0: no synthetic set; data.path is required", NON_NEGATIVE)
    train_images: int = setting(64, "training images", AT_LEAST_1)
    val_images: int = setting(16, "validation images", AT_LEAST_1)
    size: int = setting(128, "pixels per side", at_least(16))


@dataclass(kw_only=True)
class CocoRecipe:
    name: Literal["coco"] = setting("coco", "the recipe module")
    reference: Reference = field(metadata=about("the published hyper-parameters"))
    model: Literal["fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn"] = setting(
        "maskrcnn_resnet50_fpn", "the torchvision detection model"
    )
    trainable_backbone_layers: int = setting(
        3, "of 5; detectron2 freezes the stem and res2", (lambda v: 0 <= v <= 5, "an integer in [0, 5]")
    )
    min_size: int = setting(800, "shorter side after resizing (detectron2 / torchvision)", AT_LEAST_1)
    max_size: int = setting(1333, "longer side cap after resizing", AT_LEAST_1)
    train_split: str = setting("train2017", "annotations/instances_<split>.json and the image folder <split>/")
    val_split: str = setting("val2017", "the split evaluated with COCOeval")
    keep_empty: bool = setting(False, "keep training images without annotations (detectron2 drops them)")
    weights: str | None = setting(
        None, "a local file: the detection model's state dict, loaded before training; null: from scratch"
    )
    backbone_weights: str | None = setting(
        None, "a local file: a torchvision ResNet-50 ImageNet state dict for backbone.body (fc.* dropped)"
    )
    synthetic: SyntheticCoco = section(SyntheticCoco, "the drawn set used when data.path is null")


RecipeConfig = BertRecipe | ImagenetRecipe | CocoRecipe
RECIPE_SCHEMAS: dict[str, type] = {"bert": BertRecipe, "imagenet": ImagenetRecipe, "coco": CocoRecipe}


@dataclass(kw_only=True)
class Run:
    name: str | None = setting(None, "MLflow run name; the same name again continues that run from its last checkpoint")
    resume: bool = setting(True, "false: a run.name that exists starts over as a new run")
    job_id: str | None = setting(None, "action=status|logs|stop: the Ray job (else the newest job of run.name)")
    seed: int = setting(0, "seed of every random generator")
    output_dir: str = setting("outputs", "checkpoints and Ray storage, relative to the cwd")
    verbose: bool = setting(
        False, "true: Ray's own and its workers' log lines on the console too (else in <output_dir>/logs/ only)"
    )


@dataclass(kw_only=True)
class Data:
    path: str | None = setting(None, "dataset root; null: the recipe makes or finds local data")
    num_workers: int | Literal["auto"] = setting(
        "auto",
        "DataLoader processes per training worker; auto: on GPUs its CPUs less one (planner.cpu_budget), on CPUs 0",
        (lambda v: v == "auto" or v >= 0, "an integer >= 0, or auto"),
    )


@dataclass(kw_only=True)
class Train:
    max_steps: int | None = setting(None, "optimizer steps; null: planned from the reference", AT_LEAST_1)
    max_epochs: float | None = setting(None, "alternative to max_steps", POSITIVE)
    warmup_steps: int | None = setting(None, "null: planned from the reference", NON_NEGATIVE)
    log_every: int = setting(10, "steps between logged metrics", AT_LEAST_1)
    checkpoint_every: int = setting(0, "steps; 0 = only at the end", NON_NEGATIVE)
    eval_every: int = setting(0, "steps; 0 = only at the end", NON_NEGATIVE)
    eval_batches: int = setting(0, "micro-batches per rank per evaluation; 0 = the whole split", NON_NEGATIVE)
    grad_clip: float | None = setting(1.0, "max gradient norm; null: no clipping", POSITIVE)
    precision: Literal["auto", "fp32", "bf16"] = setting("auto", "auto: bf16 autocast on CUDA")
    ema_decay: float | None = setting(
        None, "a number: keep an EMA of the weights (and BN stats), evaluated as eval_ema_*", FRACTION
    )
    measure_noise_scale: bool = setting(
        False, "log the gradient noise scale (critical batch) while training; needs 2+ workers"
    )


@dataclass(kw_only=True)
class Batch:
    global_batch: int | Literal["auto_noise_scale"] | None = setting(
        None,
        "null: the reference's; see docs/batch-size.md",
        (lambda v: v == "auto_noise_scale" or v >= 1, "an integer >= 1"),
    )
    micro_batch: int | Literal["auto"] = setting("auto", "a number pins it; auto plans it", AT_LEAST_1)
    scale_with_world: bool = setting(False, "true: the global batch grows with the world (detectron2)")


@dataclass(kw_only=True)
class Optim:
    lr: float | None = setting(None, "a number pins the lr; null: planned", POSITIVE)
    weight_decay: float | None = setting(None, "null: the reference's", NON_NEGATIVE)
    betas: list[float] = setting([0.9, 0.999], "Adam / LAMB betas", (_two_betas, "two numbers in [0, 1)"))
    momentum: float = setting(0.9, "SGD / LARS momentum", (lambda v: 0 <= v < 1, "a number in [0, 1)"))
    nesterov: bool = setting(False, "Nesterov momentum (SGD / LARS)")


@dataclass(kw_only=True)
class Memory:
    model_gb: float | None = setting(None, "params + grads + optimizer state per device", POSITIVE)
    per_sample_gb: float | None = setting(None, "activation memory per sample", POSITIVE)


@dataclass(kw_only=True)
class Planner:
    headroom: float = setting(0.1, "fraction of device memory kept free", FRACTION)
    power_of_two: bool = setting(False, "only powers of two as micro-batch")
    lr_rule: Literal["linear", "sqrt", "none", "auto"] = setting("auto", "auto: the recipe's rule")
    bn_min_group: int = setting(32, "samples per BatchNorm statistics group below which norm changes", AT_LEAST_1)
    mfu: float = setting(
        0.4, "assumed model FLOP utilization: the share of the GPU's peak the step reaches (time to train)",
        (lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
    )
    advise: bool = setting(False, "compare the global batch with the last measured noise scale of this recipe")
    memory: Memory = section(Memory, "override the memory profile")


@dataclass(kw_only=True)
class LrFind:
    """``action=lr_find``: Smith's exponential LR sweep at the planned batch."""

    min_lr: float = setting(1e-7, "first lr of the sweep", POSITIVE)
    max_lr: float = setting(10.0, "last lr of the sweep", POSITIVE)
    steps: int = setting(100, "optimizer steps at most (it stops when the loss diverges)", at_least(10))
    diverge: float = setting(
        4.0, "stop when the smoothed loss exceeds this many times its minimum", (lambda v: v > 1, "a number > 1")
    )


@dataclass(kw_only=True)
class PlanOutput:
    format: Literal["table", "json"] = setting("table", "how action=plan prints the plan")


@dataclass(kw_only=True)
class Cluster:
    kind: Literal["local", "ray"] = setting("local", "local: an embedded Ray; ray: an existing Ray cluster")
    address: str | None = setting(None, "ray: the cluster (null: $RAY_ADDRESS, else auto); submit: its job API too")
    storage_path: str | None = setting(None, "ray: checkpoints, shared by all nodes (absolute path or URI); required")
    image: str | None = setting(None, "action=manifest: the container image of the Ray pods (`make docker`); required")
    max_failures: int = setting(
        0,
        "worker-group restarts from the latest checkpoint before the run fails",
        (lambda v: v >= -1, "an integer >= 0, or -1 for no limit"),
    )
    nodes: int = setting(1, "nodes (used when gpus_per_node describes hardware)", AT_LEAST_1)
    gpus_per_node: int | None = setting(None, "null: detected (0 without GPUs)", NON_NEGATIVE)
    gpu_memory_gb: float | None = setting(None, "null: detected", POSITIVE)
    gpu_type: str | None = setting(
        None,
        "which GPU (its peak FLOP/s, for the plan's time to train); null: the GPU's own name when one is here",
        (lambda v: v in GPUS, "one of " + ", ".join(GPUS)),
    )
    gpu_hour_usd: float | None = setting(None, "price of one GPU-hour: the plan shows the cost", POSITIVE)
    num_workers: int | None = setting(None, "null: nodes x GPUs, or 2 CPU workers without GPUs", AT_LEAST_1)
    min_workers: int | None = setting(
        None, "elastic training: at least this many workers, at most num_workers; null: a fixed size", AT_LEAST_1
    )
    resize_interval_s: float = setting(
        60.0, "elastic training: how often Ray Train looks for room for more workers", POSITIVE
    )
    use_gpu: bool | Literal["auto"] = setting("auto", "auto: GPUs when there are any")
    cpus_per_worker: int | Literal["auto"] = setting(
        "auto",
        "CPUs Ray reserves per training worker; auto: the node's CPUs divided among its workers",
        (lambda v: v == "auto" or v >= 1, "an integer >= 1, or auto"),
    )


@dataclass(kw_only=True)
class Engine:
    name: Literal["ddp", "deepspeed"] = setting("ddp", "how the workers train the model")
    zero_stage: int | Literal["auto"] = setting(
        "auto",
        "deepspeed: auto picks the lowest fitting stage",
        (lambda v: v in ("auto", 0, 1, 2, 3), "0, 1, 2, 3 or auto"),
    )


@dataclass(kw_only=True)
class Tracking:
    uri: str | None = setting(None, "null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the cwd")
    experiment: str = setting("launcher", "the MLflow experiment")
    required: bool = setting(True, "false: an unreachable server at launch falls back to a local store")
    system_metrics_s: float = setting(
        10.0, "seconds between samples of rank 0's node's CPU, memory and GPU (system/... metrics); 0: none",
        NON_NEGATIVE,
    )


@dataclass(kw_only=True)
class Config:
    action: Literal["train", "plan", "lr_find", "submit", "status", "logs", "stop", "manifest"] = setting(
        "train", "what to do with the task"
    )
    choices: dict[str, str] = field(default_factory=dict, metadata=about("Hydra group choices (filled in)"))
    run: Run = section(Run, "the MLflow run and its outputs")
    data: Data = section(Data, "where the data comes from")
    train: Train = section(Train, "the training loop")
    batch: Batch = section(Batch, "global and micro-batch")
    optim: Optim = section(Optim, "optimizer overrides")
    planner: Planner = section(Planner, "the planner's knobs")
    plan: PlanOutput = section(PlanOutput, "action=plan output")
    lr_find: LrFind = section(LrFind, "action=lr_find")
    cluster: Cluster = section(Cluster, "where the workers run")
    engine: Engine = section(Engine, "DDP or DeepSpeed")
    tracking: Tracking = section(Tracking, "MLflow")
    recipe: RecipeConfig = field(metadata=about("the task: model, data and reference hyper-parameters"))


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
    errors += run_name_errors(raw.get("run"))
    if isinstance(cfg, Config) and not errors:  # rules across keys need each key valid first
        errors += _cross_checks(cfg)
    if errors:
        raise ConfigError(errors)
    assert isinstance(cfg, Config)
    return cfg


RUN_NAME_MAX = 100
RUN_NAME_ALLOWED = (
    f"letters, digits, '.', '_' and '-', at most {RUN_NAME_MAX} characters, not starting with '.' or '-', "
    "no '..' (it names folders under run.output_dir and cluster.storage_path)"
)
_RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def run_name_errors(run: Any) -> list[str]:
    """The error for a ``run.name`` that could not be a single, plain folder name; none for null."""
    name = run.get("name") if isinstance(run, dict) else None
    if not isinstance(name, str):  # null, or a wrong type already reported by _build
        return []
    if _RUN_NAME.fullmatch(name) and ".." not in name and len(name) <= RUN_NAME_MAX:
        return []
    return [f"run.name: got {name!r}, expected {RUN_NAME_ALLOWED}"]


# A RayJob's name: a DNS-1035 label of at most 47 characters (KubeRay 1.5 ValidateRayJobMetadata:
# MaxRayJobNameLength = 53 - 6, as its RayCluster and their Services are named after it)
RAYJOB_NAME_MAX = 47
_RAYJOB_NAME = re.compile(r"[a-z]([a-z0-9-]*[a-z0-9])?")


def rayjob_name(run_name: str) -> str | None:
    """The RayJob name of a run: ``run.name`` lowercased, each '_' and '.' made '-'; None when that is not a
    DNS-1035 label (a letter first, a letter or digit last) of at most 47 characters."""
    name = run_name.lower().replace("_", "-").replace(".", "-")
    return name if len(name) <= RAYJOB_NAME_MAX and _RAYJOB_NAME.fullmatch(name) else None


def _manifest_errors(cfg: Config) -> list[str]:
    """``action=manifest`` describes a cluster that does not exist yet: its image, its hardware, a run name."""
    errors = []
    if cfg.cluster.kind != "ray":
        errors.append("action: manifest writes a KubeRay RayJob; add cluster=ray (and cluster.storage_path)")
    if not cfg.cluster.image:
        errors.append("cluster.image: required with action=manifest: the image of the Ray pods (e.g. "
                      "cluster.image=registry.example.com/launcher:latest; `make docker` builds it)")
    if not cfg.cluster.gpus_per_node or cfg.cluster.gpu_memory_gb is None:
        errors.append("cluster.gpus_per_node: action=manifest plans the cluster it describes: give "
                      "cluster.nodes, cluster.gpus_per_node (>= 1) and cluster.gpu_memory_gb")
    if not cfg.run.name:
        errors.append("run.name: required with action=manifest: it names the RayJob (and resumes the run)")
    elif rayjob_name(cfg.run.name) is None:
        errors.append(
            f"run.name: got {cfg.run.name!r}; the RayJob is named after it (lowercased, '_' and '.' as '-'), "
            f"which must start with a letter, end with a letter or digit and have at most {RAYJOB_NAME_MAX} "
            "characters (KubeRay 1.5)"
        )
    return errors


def _cross_checks(cfg: Config) -> list[str]:
    """Rules that involve more than one key."""
    errors = []
    if cfg.lr_find.max_lr <= cfg.lr_find.min_lr:
        errors.append(f"lr_find.max_lr: got {cfg.lr_find.max_lr:g}, expected a number > lr_find.min_lr")
    storage = cfg.cluster.storage_path
    if cfg.cluster.kind == "ray":
        if not storage and cfg.action in ("train", "lr_find", "submit", "manifest"):
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
    if cfg.action == "manifest":
        errors += _manifest_errors(cfg)
    if cfg.action in ("submit", "status", "logs", "stop") and cfg.cluster.kind != "ray":
        errors.append(
            f"action: {cfg.action} talks to a Ray cluster's job API; add cluster=ray "
            "(with cluster.address and cluster.storage_path)"
        )
    if cfg.engine.name == "deepspeed" and cfg.action == "lr_find":
        errors.append("engine=deepspeed: action=lr_find runs with engine=ddp (the lr it finds is the same)")
    if cfg.cluster.min_workers is not None:
        errors += _elastic_errors(cfg)
    if isinstance(cfg.recipe, CocoRecipe) and cfg.recipe.weights and cfg.recipe.backbone_weights:
        errors.append(
            "recipe.backbone_weights: set with recipe.weights, whose state dict already holds the backbone; "
            "give one of them"
        )
    return errors


def _elastic_errors(cfg: Config) -> list[str]:
    """``cluster.min_workers``: what a run that changes its world size while it trains needs."""
    low, high = cfg.cluster.min_workers, cfg.cluster.num_workers
    errors = []
    if high is not None and low is not None and low > high:
        errors.append(f"cluster.min_workers: got {low}, above cluster.num_workers={high} (the most workers)")
    if cfg.cluster.max_failures == 0:
        errors.append(
            "cluster.max_failures: 0 with cluster.min_workers: a lost worker would end the run instead of "
            "shrinking it; set it to the restarts allowed (e.g. 3, or -1 for no limit)"
        )
    if cfg.train.checkpoint_every <= 0:
        errors.append(
            "train.checkpoint_every: 0 with cluster.min_workers: after a resize the run goes on from the latest "
            "checkpoint, and without periodic ones that is step 0; set it (e.g. train.checkpoint_every=100)"
        )
    if cfg.batch.scale_with_world:
        errors.append(
            "batch.scale_with_world: true with cluster.min_workers: an elastic run keeps its global batch "
            "whatever the world size (that is what keeps its lr schedule and sample stream); set it to false"
        )
    if cfg.engine.name == "deepspeed":
        errors.append(
            "cluster.min_workers: engine=deepspeed cannot change its world size (its ZeRO partitions are "
            "saved per rank); use engine=ddp for elastic training, or a fixed size (cluster.min_workers=null)"
        )
    if cfg.action == "lr_find":
        errors.append("cluster.min_workers: elastic training is for action=train; lr_find runs at a fixed size")
    return errors


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of a config (what crosses process boundaries): tuples become lists, as in YAML/JSON."""
    plain: dict[str, Any] = _plain(dataclasses.asdict(cfg))
    return plain


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _recipe_name(raw: dict[str, Any]) -> str:
    recipe = raw.get("recipe")
    name = recipe.get("name") if isinstance(recipe, dict) else None
    return name if isinstance(name, str) and name in RECIPE_SCHEMAS else "bert"


@functools.cache
def _hints(schema: type) -> dict[str, Any]:
    """A schema's field types (cached: evaluating the string annotations compiles each one, every call)."""
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
            values[f.name] = _check_value(tp, raw[f.name], full, errors, recipe, f.metadata.get("check"))
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


def _check_value(tp: Any, value: Any, key: str, errors: list[str], recipe: str, check: Check | None) -> Any:
    """The value converted to its type, then held to the field's range check."""
    ok, converted = _matches(tp, value, key, errors, recipe)
    if not ok:
        limits = f" ({NUMBER_LIMITS})" if _is_number(value) and not _within_limits(value) else ""
        errors.append(f"{key}: got {value!r}, expected {_describe(tp)}{limits}")
        return value
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
        return isinstance(value, int) and not isinstance(value, bool) and _within_limits(value), value
    if tp is float:
        ok = _is_number(value) and _within_limits(value)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    if origin is list or origin is tuple:  # a tuple field (frozen Reference) reads a YAML list too
        return _matches_items(tp, value, key, errors, recipe)
    if origin is dict:
        return isinstance(value, dict), value
    raise TypeError(f"schema type {tp!r} at {key} is not supported by the validator")


INT64 = 2**63
NUMBER_LIMITS = "numbers must be finite (no nan or inf) and integers fit in 64 bits"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _within_limits(value: int | float) -> bool:
    """Finite, and an integer within int64: what the planner's float arithmetic, torch and JSON can take."""
    return -INT64 <= value < INT64 if isinstance(value, int) else math.isfinite(value)


def _matches_items(tp: Any, value: Any, key: str, errors: list[str], recipe: str) -> tuple[bool, Any]:
    """``list[X]`` (a list) or ``tuple[X, ...]`` (a list or a tuple), item by item."""
    is_tuple = typing.get_origin(tp) is tuple
    if not isinstance(value, list) and not (is_tuple and isinstance(value, tuple)):
        return False, value
    item = typing.get_args(tp)[0]
    sub = _dataclass_of(item, key, recipe)
    out = []
    for i, v in enumerate(value):
        if sub is not None:
            out.append(_build(sub, v, f"{key}[{i}].", errors, recipe))
            continue
        ok, conv = _matches(item, v, key, errors, recipe)
        if not ok:
            return False, value
        out.append(conv)
    return True, tuple(out) if is_tuple else out


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list or origin is tuple:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _unknown_key(full: str, known: set[str]) -> str:
    parent, _, leaf = full.rpartition(".")
    siblings = sorted(k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent)
    same_but_case = [k for k in sorted(known) if k.lower() == full.lower()]
    close = same_but_case or [_join(parent, k) for k in difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)]
    if not close:  # a key placed under the wrong parent: compare whole keys (not its own parents)
        others = sorted(k for k in known if not full.startswith(k + "."))
        close = difflib.get_close_matches(full, others, n=1, cutoff=0.75)
    hint = f"; did you mean `{close[0]}`?" if close else ""
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
