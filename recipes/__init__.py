"""The recipes. Each module provides, for ``launcher/worker.py`` and ``launcher/memory.py``:

- ``build_model(cfg) -> nn.Module`` whose ``forward(batch)`` returns a dict of loss *sums*
  (in eval mode, also the sums of the metrics in ``METRICS``);
- ``build_data(cfg, cache_dir) -> launcher.data.Data`` (checks the data, on the driver, before Ray);
- ``count(batch) -> {key: units}``: what each returned sum averages over;
- ``example_batch(cfg, n)``: a full-size synthetic batch of ``n`` samples (memory estimate);
- ``METRICS``: the keys evaluation reports;
- optionally ``evaluate(model, batches, data, device, precision) -> {eval_*: value}`` for a metric
  that is not a mean of per-sample sums (COCO mAP); every rank must return the same numbers.
"""

from types import ModuleType

from recipes import bert, coco, imagenet

RECIPES: dict[str, ModuleType] = {"bert": bert, "imagenet": imagenet, "coco": coco}
