"""The recipes: one module each, every one an implementation of ``Recipe`` (``recipes/protocol.py``).

A recipe module defines, at module level, for ``launcher/worker.py`` and ``launcher/memory.py``:

- ``build_model(cfg) -> nn.Module`` whose ``forward(batch)`` returns a dict of loss *sums*
  (in eval mode, also the sums of the metrics in ``METRICS``);
- ``trace_model(cfg) -> nn.Module``: the model the memory estimate traces under fake tensors
  (``build_model`` itself, unless the model picks sizes from its activations' values: ``coco``);
- ``build_data(cfg, cache_dir) -> launcher.data.Data`` (checks the data, on the driver, before Ray);
- ``count(batch) -> {key: units}``: what each returned sum averages over;
- ``example_batch(cfg, n)``: a full-size synthetic batch of ``n`` samples (memory estimate);
- ``METRICS``: the keys evaluation reports;
- ``evaluate``: ``None`` (evaluation is the mean of the per-sample sums), or a callable
  ``(model, batches, data, device, precision) -> {eval_*: value}`` for a metric that is not
  such a mean (COCO mAP); every rank must return the same numbers. Callers test
  ``recipe.evaluate is not None``.

Adding a recipe ``foo``:

1. ``recipes/foo.py``: the names above (``evaluate = None`` unless it has its own metric);
   ``mypy`` checks it against ``Recipe`` through the ``RECIPES`` line below.
2. ``conf/recipe/foo.yaml``: ``name: foo``, its ``reference`` hyper-parameters (with their
   source) and its own keys; optionally ``conf/recipe_scale/foo_smoke.yaml`` for ``scale=smoke``.
3. One line here: ``"foo": foo`` in ``RECIPES`` (and ``foo`` in the import).

A recipe whose YAML has keys of its own also declares their schema: a ``FooRecipe`` dataclass
in ``launcher/config.py``, added to ``RecipeConfig`` and ``RECIPE_SCHEMAS`` there (the config
is validated against it before anything runs).
"""

from recipes import bert, coco, imagenet
from recipes.protocol import Recipe

RECIPES: dict[str, Recipe] = {"bert": bert, "imagenet": imagenet, "coco": coco}

__all__ = ["RECIPES", "Recipe"]
