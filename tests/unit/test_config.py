"""Composition and validation: every shipped config composes; bad input names its key."""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import typing
from pathlib import Path
from typing import Any

import pytest

from launcher.cli import CONF_DIR, HIDDEN_GROUPS, load
from launcher.config import RECIPE_SCHEMAS, Config, ConfigError, all_keys, check_of, doc, to_dict, validate


def _choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


GROUPS = sorted(d.name for d in CONF_DIR.iterdir() if d.is_dir() and d.name not in HIDDEN_GROUPS)


def test_groups_are_the_documented_ones() -> None:
    assert GROUPS == ["cluster", "engine", "recipe", "scale", "tracking"]


@pytest.mark.parametrize(
    "combo", list(itertools.product(*[[f"{g}={c}" for c in _choices(g)] for g in GROUPS])), ids=str
)
def test_every_shipped_config_composes(combo: tuple[str, ...]) -> None:
    needs = ["cluster.storage_path=/shared/runs"] if "cluster=ray" in combo else []  # its one required key
    cfg = load([*combo, *needs])
    assert isinstance(cfg, Config)
    for override in combo:
        group, choice = override.split("=")
        assert cfg.choices[group] == choice


def test_every_recipe_scale_file_is_reachable() -> None:
    """conf/recipe_scale/<recipe>_<scale>.yaml must name a real recipe and scale."""
    for f in (CONF_DIR / "recipe_scale").glob("*.yaml"):
        recipe, _, scale = f.stem.rpartition("_")
        assert recipe in _choices("recipe") and scale in _choices("scale"), f


def test_smoke_shrinks_the_recipe() -> None:
    full, smoke = load([]), load(["scale=smoke"])
    assert smoke.recipe.model.hidden_size < full.recipe.model.hidden_size
    assert smoke.recipe.seq_len < full.recipe.seq_len
    assert full.recipe.reference.global_batch == 256 and full.recipe.reference.lr == 1e-4


def test_overrides_are_typed() -> None:
    cfg = load(["train.max_steps=7", "optim.lr=3e-4", "batch.micro_batch=4", "cluster.use_gpu=false"])
    assert cfg.train.max_steps == 7 and cfg.optim.lr == 3e-4
    assert cfg.batch.micro_batch == 4 and cfg.cluster.use_gpu is False


def _errors(args: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load(args)
    return e.value.errors


def test_typo_suggests_the_key() -> None:
    (err,) = _errors(["train.max_stepz=3"])
    assert err.startswith("train.max_stepz: unknown key")
    assert "did you mean `train.max_steps`" in err


def test_typo_under_recipe_suggests_the_key() -> None:
    (err,) = _errors(["recipe.modle=1"])
    assert "recipe.modle" in err and "did you mean `recipe.model`" in err


def test_all_errors_are_reported_together() -> None:
    errs = _errors(["train.max_stepz=3", "batch.globl_batch=8", "optim.lrr=0.1"])
    assert len(errs) == 3
    assert any("train.max_steps" in e for e in errs)
    assert any("batch.global_batch" in e for e in errs)
    assert any("optim.lr" in e for e in errs)


def test_wrong_types_and_ranges_are_all_reported() -> None:
    errs = _errors(["train.max_steps=abc", "planner.headroom=1.5", "batch.micro_batch=0", "optim.lr=-1"])
    joined = "\n".join(errs)
    assert len(errs) == 4
    assert "train.max_steps: got 'abc', expected an integer or null" in joined
    assert "planner.headroom: got 1.5, expected a fraction in [0, 1)" in joined
    assert "batch.micro_batch: got 0" in joined
    assert "optim.lr: got -1.0" in joined


def test_loader_processes_and_cpus_per_worker_take_a_count_or_auto() -> None:
    full, smoke = load([]), load(["scale=smoke"])
    assert (full.data.num_workers, full.cluster.cpus_per_worker) == ("auto", "auto")  # the CPU budget plans them
    assert smoke.data.num_workers == 0  # 2 cores: loading in the training process (conf/scale/smoke.yaml)
    assert load(["data.num_workers=12", "cluster.cpus_per_worker=13"]).data.num_workers == 12
    errs = _errors(["data.num_workers=-1", "cluster.cpus_per_worker=0"])
    assert errs == ["data.num_workers: got -1, expected an integer >= 0, or auto",
                    "cluster.cpus_per_worker: got 0, expected an integer >= 1, or auto"]  # fmt: skip
    for bad in ("many", "1.5", "true", "AUTO", "[2]"):
        (err,) = _errors([f"data.num_workers={bad}"])
        assert err.startswith("data.num_workers: got ") and "expected an integer or one of 'auto'" in err, err


def test_literal_values_list_what_is_allowed() -> None:
    (err,) = _errors(["planner.lr_rule=cubic"])
    assert "planner.lr_rule" in err and "'linear'" in err and "'sqrt'" in err


def test_unknown_group_choice_suggests_one() -> None:
    (err,) = _errors(["scale=smok"])
    assert "scale: unknown value 'smok'; did you mean `smoke`?" in err


@pytest.mark.parametrize(
    "how", ["+recipe._target_=os.system", "+_target_=builtins.eval", "+train.x._target_=os.system"]
)
def test_target_additions_are_refused(how: str, tmp_path: Path) -> None:
    errs = _errors([how])
    assert any("_target_" in e for e in errs)


def test_target_in_a_yaml_file_is_refused(tmp_path: Path) -> None:
    """A hostile YAML group file is refused by validation; nothing is ever instantiated. It goes into a
    copy of conf/, so the source tree is never written."""
    marker = tmp_path / "pwned"
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    hostile = conf / "tracking" / "zz_hostile_test.yaml"
    hostile.write_text(f"uri: null\nexperiment: x\nhook:\n  _target_: os.system\n  command: touch {marker}\n")
    with pytest.raises(ConfigError) as e:
        load(["tracking=zz_hostile_test"], conf_dir=conf)
    assert any("tracking.hook" in err for err in e.value.errors)
    assert not marker.exists()
    assert not (CONF_DIR / "tracking" / "zz_hostile_test.yaml").exists()


def test_lr_find_under_deepspeed_is_refused_before_anything_runs() -> None:
    (err,) = _errors(["engine=deepspeed", "action=lr_find"])
    assert err == "engine=deepspeed: action=lr_find runs with engine=ddp (the lr it finds is the same)"


def test_cluster_ray_needs_shared_storage() -> None:
    (err,) = _errors(["cluster=ray"])
    assert err.startswith("cluster.storage_path: required with cluster=ray")
    (err,) = _errors(["cluster=ray", "cluster.storage_path=runs/here"])
    assert "a relative local path; the other nodes of the cluster cannot see it" in err
    for ok in ("/mnt/shared/runs", "s3://bucket/runs", "gs://b/r"):
        assert load(["cluster=ray", f"cluster.storage_path={ok}"]).cluster.storage_path == ok
    (err,) = _errors(["action=submit"])
    assert "action: submit talks to a Ray cluster's job API; add cluster=ray" in err


# --- one source of truth: the dataclasses hold every default; conf/ agrees with them ------------------


def _defaults(schema: type, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of a schema that has a default, with it (tuples as lists, as in YAML).

    A required section (``recipe.reference``) is walked for its fields that have defaults; a
    required leaf (``recipe.reference.lr``) has none and is left out.
    """
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        factory = f.default_factory
        if dataclasses.is_dataclass(factory) or (dataclasses.is_dataclass(tp) and f.default is dataclasses.MISSING):
            out.update(_defaults(typing.cast(type, factory if dataclasses.is_dataclass(factory) else tp), key + "."))
        elif f.default is not dataclasses.MISSING:
            out[key] = list(f.default) if isinstance(f.default, tuple) else f.default
        elif factory is not dataclasses.MISSING:
            out[key] = factory()
    return out


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k != "choices":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _schema_defaults(recipe: str) -> dict[str, Any]:
    base = {k: v for k, v in _defaults(Config).items() if k != "choices"}
    return base | {f"recipe.{k}": v for k, v in _defaults(RECIPE_SCHEMAS[recipe]).items()}


def test_config_yaml_agrees_with_the_dataclasses_key_for_key_and_default_for_default() -> None:
    from omegaconf import OmegaConf

    raw: Any = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"))
    del raw["defaults"]
    # config.yaml owns every top-level section except those a group fills in and Hydra's choices
    owned = {f.name for f in dataclasses.fields(Config)} - set(GROUPS) - {"choices"}
    assert set(raw) == owned
    expected = {k: v for k, v in _defaults(Config).items() if k.split(".")[0] in owned}
    assert _flat(raw) == expected


CITED = "CITED"  # a published value (an anchor list, a source text) with its citation in the YAML: it must differ
# from the default, and the YAML is where to read it

# What each group file changes from the dataclass defaults (launcher/config.py); every other key of the
# composed config must equal its default. Recipes: only keys that have a default (reference.lr has none).
OVERRIDES: dict[str, dict[str, Any]] = {
    "cluster/local": {},
    "cluster/ray": {
        "cluster.kind": "ray",
        "cluster.max_failures": 3,  # a multi-node cluster loses nodes: restart the group from its checkpoint
    },
    "engine/ddp": {},
    "engine/deepspeed": {"engine.name": "deepspeed"},
    "tracking/local": {},
    "tracking/server": {"tracking.uri": "http://127.0.0.1:5000"},  # a server on this machine, to override
    "scale/full": {},
    "scale/smoke": {  # 2 CPU cores: log often, evaluate briefly, load data in the training process
        "train.log_every": 5,
        "train.eval_batches": 4,
        "data.num_workers": 0,
    },
    "recipe/bert": {  # Devlin et al. 2018; LAMB past 8k (You et al. 2019)
        "recipe.reference.warmup_steps": 10000,
        "recipe.reference.optimizer": "adamw",
        "recipe.reference.weight_decay": 0.01,
        "recipe.reference.lr_rule": "sqrt",
        "recipe.reference.devices": 16,
        "recipe.reference.large_batch_optimizer": "lamb",
        "recipe.reference.large_batch_threshold": 8192,
        "recipe.reference.anchors": CITED,
        "recipe.reference.source": CITED,
    },
    "recipe/coco": {  # detectron2 mask_rcnn_R_50_FPN_1x
        "recipe.reference.warmup_steps": 1000,
        "recipe.reference.weight_decay": 1e-4,
        "recipe.reference.schedule": "step",
        "recipe.reference.milestones": [0.6666666667, 0.8888888889],
        "recipe.reference.uses_batchnorm": True,
        "recipe.reference.norm_policy": "frozen_bn",
        "recipe.reference.source": CITED,
    },
    "recipe/imagenet": {  # torchvision ResNet-50 V1; Goyal et al. 2017 at 8k; LARS past 16k
        "recipe.reference.weight_decay": 1e-4,
        "recipe.reference.schedule": "step",
        "recipe.reference.milestones": [0.3333333333, 0.6666666667],
        "recipe.reference.large_batch_optimizer": "lars",
        "recipe.reference.large_batch_threshold": 16384,
        "recipe.reference.uses_batchnorm": True,
        "recipe.reference.epochs": 90.0,
        "recipe.reference.anchors": CITED,
        "recipe.reference.source": CITED,
    },
}
OVERRIDES["recipe/imagenet_tv2"] = OVERRIDES["recipe/imagenet"] | {  # composes imagenet; torchvision V2
    "recipe.reference.warmup_steps": 6256,
    "recipe.reference.weight_decay": 2e-5,
    "recipe.reference.schedule": "cosine",
    "recipe.reference.milestones": [],
    "recipe.reference.anchors": [],
    "recipe.reference.epochs": 600.0,
    "recipe.train_crop": 176,
    "recipe.eval_resize": 232,
    "recipe.label_smoothing": 0.1,
    "recipe.mixup_alpha": 0.2,
    "recipe.cutmix_alpha": 1.0,
    "recipe.auto_augment": "ta_wide",
    "recipe.random_erase": 0.1,
}
OVERRIDES["recipe_scale/bert_smoke"] = {  # a 2-layer, 128-wide encoder on 64-token pairs
    "train.eval_every": 100,
    "train.checkpoint_every": 100,
    "recipe.seq_len": 64,
    "recipe.corpus_max_mb": 4.0,
    "recipe.eval_fraction": 0.05,
    "recipe.model.vocab_size": 4000,
    "recipe.model.hidden_size": 128,
    "recipe.model.num_layers": 2,
    "recipe.model.num_heads": 2,
    "recipe.model.intermediate_size": 256,
    "recipe.model.dropout": 0.0,
    "recipe.reference.warmup_steps": 20,
    "recipe.reference.anchors": [],
    "recipe.reference.source": "smoke: tuned for the tiny model, not published",
}
OVERRIDES["recipe_scale/coco_smoke"] = {  # Mask R-CNN at 128 pixels on a drawn set
    "train.eval_batches": 0,  # the whole (drawn) val split
    "recipe.min_size": 128,
    "recipe.max_size": 128,
    "recipe.trainable_backbone_layers": 5,
    "recipe.synthetic.classes": 3,
    "recipe.synthetic.train_images": 48,
    "recipe.synthetic.val_images": 11,
    "recipe.reference.warmup_steps": 5,
    "recipe.reference.milestones": [0.8],
    "recipe.reference.source": "smoke: tuned for 2 CPU workers, not published",
}
OVERRIDES["recipe_scale/imagenet_smoke"] = {  # ResNet-18 on 48-pixel drawn shapes
    "train.eval_every": 30,
    "train.checkpoint_every": 30,
    "train.eval_batches": 0,
    "recipe.model": "resnet18",
    "recipe.train_crop": 48,
    "recipe.eval_resize": 56,
    "recipe.eval_crop": 48,
    "recipe.synthetic.classes": 8,
    "recipe.synthetic.train_per_class": 48,
    "recipe.synthetic.val_per_class": 13,
    "recipe.reference.warmup_steps": 5,
    "recipe.reference.epochs": 5.0,
    "recipe.reference.schedule": "cosine",
    "recipe.reference.milestones": [],
    "recipe.reference.anchors": [],
    "recipe.reference.source": "smoke: tuned for ResNet-18 on drawn shapes, not published",
}
OVERRIDES["recipe_scale/imagenet_tv2_smoke"] = OVERRIDES["recipe_scale/imagenet_smoke"]  # composes it

# Hydra's order: config.yaml, then the groups as its defaults list names them, the recipe's shrink last
ORDER = ["recipe", "cluster", "tracking", "engine", "scale"]


def test_every_group_file_has_its_overrides_listed() -> None:
    files = {f"{d.name}/{f.stem}" for d in CONF_DIR.iterdir() if d.is_dir() for f in d.glob("*.yaml")}
    assert files == set(OVERRIDES)


def _compositions() -> list[list[str]]:
    one_choice = [[f"{g}={c}"] for g in GROUPS for c in _choices(g)]
    shrinks = [f.stem.rpartition("_") for f in (CONF_DIR / "recipe_scale").glob("*.yaml")]
    return one_choice + sorted([f"recipe={r}", f"scale={s}"] for r, _, s in shrinks)


@pytest.mark.parametrize("choices", _compositions(), ids=" ".join)
def test_each_group_file_changes_only_its_listed_keys(choices: list[str]) -> None:
    needs = ["cluster.storage_path=/shared/runs"] if "cluster=ray" in choices else []
    cfg = load([*choices, *needs])
    chosen = cfg.choices
    expected = _schema_defaults(cfg.recipe.name)
    changed: dict[str, Any] = {"cluster.storage_path": "/shared/runs"} if needs else {}
    for group in ORDER:
        changed |= OVERRIDES[f"{group}/{chosen[group]}"]
    changed |= OVERRIDES.get(f"recipe_scale/{chosen['recipe']}_{chosen['scale']}", {})
    got = {k: v for k, v in _flat(to_dict(cfg)).items() if k in expected}
    for key, value in changed.items():
        if value == CITED:
            assert got[key] != expected[key], key
            got[key] = value
    assert got == expected | changed


def test_every_key_has_a_one_line_doc() -> None:
    for recipe in RECIPE_SCHEMAS:
        for key in all_keys(Config, recipe=recipe):
            text = doc(key, recipe)
            assert text and "\n" not in text, key


def test_range_checks_live_on_their_fields() -> None:
    predicate, allowed = check_of("planner.headroom") or (None, "")
    assert allowed == "a fraction in [0, 1)" and predicate is not None and not predicate(1.0)
    assert check_of("recipe.reference.lr") is not None and check_of("run.name") is None
    assert check_of("recipe.num_classes", recipe="imagenet") is not None


@pytest.mark.parametrize("recipe", ["bert", "imagenet_tv2", "coco"])
def test_the_plain_dict_validates_back_to_the_same_config(recipe: str) -> None:
    """Workers get ``to_dict(cfg)`` (JSON-shaped) or its pickled tuples; both validate to the same config."""
    cfg = load([f"recipe={recipe}"])
    assert validate(json.loads(json.dumps(to_dict(cfg)))) == cfg
    assert validate(dataclasses.asdict(cfg)) == cfg
    assert isinstance(cfg.recipe.reference.milestones, tuple) and isinstance(cfg.recipe.reference.anchors, tuple)
