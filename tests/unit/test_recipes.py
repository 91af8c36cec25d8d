"""Every registered recipe implements the ``Recipe`` protocol, and its functions stay short."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from recipes import RECIPES, Recipe

ROOT = Path(__file__).resolve().parents[2]
MEMBERS = ["METRICS", "build_model", "trace_model", "build_data", "count", "example_batch", "evaluate"]


def test_the_protocol_declares_the_members_callers_use() -> None:
    declared = {n for n in vars(Recipe) if not n.startswith("_")} | set(Recipe.__annotations__)
    assert declared == set(MEMBERS)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_each_recipe_defines_every_member(name: str) -> None:
    recipe = RECIPES[name]
    missing = [m for m in MEMBERS if m not in vars(recipe)]  # a module: its own names, not inherited ones
    assert not missing, f"recipes/{name}.py lacks {missing}"
    for fn in ("build_model", "trace_model", "build_data", "count", "example_batch"):
        assert callable(getattr(recipe, fn))
    assert recipe.METRICS and all(isinstance(m, str) for m in recipe.METRICS)
    if recipe.evaluate is not None:
        params = list(inspect.signature(recipe.evaluate).parameters)
        assert params == ["model", "batches", "data", "device", "precision"]


def test_only_coco_has_its_own_evaluation() -> None:
    assert sorted(n for n, r in RECIPES.items() if r.evaluate is not None) == ["coco"]


def test_every_shipped_recipe_config_names_a_registered_recipe() -> None:
    from omegaconf import OmegaConf

    for path in sorted((ROOT / "conf" / "recipe").glob("*.yaml")):
        name = OmegaConf.load(path).get("name")
        assert name in RECIPES, f"conf/recipe/{path.name}: name {name!r} is not in recipes.RECIPES"
