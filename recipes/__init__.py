"""The recipes. Each module provides, for ``launcher/worker.py`` and ``launcher/memory.py``:

- ``build_model(cfg) -> nn.Module`` whose ``forward(batch)`` returns a dict of loss *sums*
  (in eval mode, also the sums of the metrics in ``METRICS``);
- ``build_data(cfg, cache_dir) -> launcher.data.Data`` (checks the data, on the driver, before Ray);
- ``count(batch) -> {key: units}``: what each returned sum averages over;
- ``example_batch(cfg, n)``: a full-size synthetic batch of ``n`` samples (memory estimate);
- ``METRICS``: the keys evaluation reports.
"""

from types import ModuleType

from recipes import bert, imagenet

RECIPES: dict[str, ModuleType] = {"bert": bert, "imagenet": imagenet}
