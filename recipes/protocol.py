"""What a recipe provides: the ``Recipe`` protocol, implemented by a plain module (PEP 544).

A recipe module defines the names below at module level; ``recipes/__init__.py`` types its
``RECIPES`` dict with this protocol, so mypy checks every recipe against it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from launcher.config import Config
from launcher.data import Data

Batch = dict[str, torch.Tensor]
Evaluate = Callable[[nn.Module, Iterable[Batch], Data, torch.device, str], dict[str, float]]
"""``(model, batches, data, device, precision) -> {eval_<name>: value}``, the same on every rank."""


class Recipe(Protocol):
    """One training recipe: model, data, loss units, a synthetic batch, its metrics.

    Every member is required; ``evaluate`` is the one optional *part*: a recipe without its
    own metric sets ``evaluate = None`` and callers test ``recipe.evaluate is not None``.
    """

    METRICS: list[str]
    """The keys evaluation reports (logged as ``eval_<key>``)."""

    def build_model(self, cfg: Config) -> nn.Module:
        """The model; ``forward(batch)`` returns a dict of loss *sums* (in eval mode also the
        sums of ``METRICS``)."""
        ...

    def trace_model(self, cfg: Config) -> nn.Module:
        """The model the device-free memory estimate traces under fake tensors (``launcher/memory.py``):
        ``build_model``'s, where that model would choose a size from values a fake trace does not have
        (proposals kept by NMS), with the largest size training takes."""
        ...

    def build_data(self, cfg: Config, cache_dir: Path) -> Data:
        """The checked train and eval datasets and their collates (run on the driver, before Ray)."""
        ...

    def count(self, batch: Batch) -> dict[str, int]:
        """The units (samples, tokens, images) each returned sum averages over."""
        ...

    def example_batch(self, cfg: Config, n: int) -> Batch:
        """A full-size synthetic batch of ``n`` samples (for the memory estimate and probe)."""
        ...

    @property
    def evaluate(self) -> Evaluate | None:
        """``None``: evaluation is the mean of the per-sample sums of ``METRICS``. Otherwise a
        metric that is not such a mean (COCO mAP), computed by this callable."""
        ...
