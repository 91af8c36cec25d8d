"""Composition and validation: every shipped config composes; bad input names its key."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from launcher.cli import CONF_DIR, HIDDEN_GROUPS, load
from launcher.config import Config, ConfigError


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
    """A hostile YAML group file is refused by validation; nothing is ever instantiated."""
    marker = tmp_path / "pwned"
    hostile = CONF_DIR / "tracking" / "zz_hostile_test.yaml"
    hostile.write_text(f"uri: null\nexperiment: x\nhook:\n  _target_: os.system\n  command: touch {marker}\n")
    try:
        errs = _errors(["tracking=zz_hostile_test"])
    finally:
        hostile.unlink()
    assert any("tracking.hook" in e for e in errs)
    assert not marker.exists()


def test_cluster_ray_needs_shared_storage() -> None:
    (err,) = _errors(["cluster=ray"])
    assert err.startswith("cluster.storage_path: required with cluster=ray")
    (err,) = _errors(["cluster=ray", "cluster.storage_path=runs/here"])
    assert "a relative local path; the other nodes of the cluster cannot see it" in err
    for ok in ("/mnt/shared/runs", "s3://bucket/runs", "gs://b/r"):
        assert load(["cluster=ray", f"cluster.storage_path={ok}"]).cluster.storage_path == ok
    (err,) = _errors(["action=submit"])
    assert "action: submit talks to a Ray cluster's job API; add cluster=ray" in err
