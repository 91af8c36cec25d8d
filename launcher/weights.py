"""Pretrained weights from a local file (``recipe.weights``, ``recipe.backbone_weights``): never a download.

A weights file is a state dict, ``torch.save(model.state_dict(), path)``, or a checkpoint dict
that holds one under ``"model"`` (torchvision's reference scripts save ``{"model": ..., "optimizer":
...}``) or ``"state_dict"`` (many other trainers). It is read with ``torch.load(weights_only=True,
map_location="cpu")``, so no pickled code runs, and checked key by key against the module it is for:
every missing key, unexpected key and shape mismatch is listed (a few names of each and their
count) in one ``ConfigError`` naming the config key. A missing ``num_batches_tracked`` is allowed
(older torchvision files lack it; BatchNorm fills it in).

The recipes load weights inside ``build_model``, so they are in place before the worker applies the
plan's norm policy: ``frozen_bn`` freezes the loaded running statistics, not a fresh init's. Each
worker reads a file once, there. The driver checks it before anything is scheduled (``check``,
called by ``launcher/launch.py``): the recipe's ``build_model`` on the meta device, so the check
reads the file and compares shapes, and allocates and initialises no model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from launcher.config import Config, ConfigError

KEYS = ("weights", "backbone_weights")  # the recipe keys that name a weights file
WRAPPERS = ("model", "state_dict")  # a checkpoint dict's key that holds the state dict, in this order
SHOWN = 5  # names listed per kind of mismatch


def read(path: str, key: str) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (unwrapped from a checkpoint dict); a ConfigError naming ``key`` if it
    is missing, unreadable or not a mapping of names to tensors."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError([f"{key}: {file} is not a file (a state dict saved with torch.save; nothing is downloaded)"])
    try:
        state: Any = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - permission, truncated zip, pickle refused by weights_only
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError([f"{key}: cannot read {file} as a torch state dict: {why}"]) from None
    if isinstance(state, dict):
        for name in WRAPPERS:
            if isinstance(state.get(name), dict):
                state = state[name]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(
            [
                f"{key}: {file} holds no state dict (a mapping of parameter names to tensors, "
                f"alone or under {' or '.join(repr(w) for w in WRAPPERS)})"
            ]
        )
    return state


def mismatches(module: nn.Module, state: dict[str, torch.Tensor], key: str, path: str) -> list[str]:
    """One error per kind of mismatch between ``state`` and ``module``'s own state dict."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    errors = []
    for what, names in (("missing from the file", missing), ("not in the model", unexpected),
                        ("with another shape", shapes)):  # fmt: skip
        if names:
            more = f", ... ({len(names) - SHOWN} more)" if len(names) > SHOWN else ""
            errors.append(f"{key}: {path}: {len(names)} key(s) {what}: {'; '.join(names[:SHOWN])}{more}")
    return errors


def load(module: nn.Module, state: dict[str, torch.Tensor], key: str, path: str) -> None:
    """``state`` into ``module`` after the key-by-key check (a ConfigError listing every mismatch)."""
    errors = mismatches(module, state, key, path)
    if errors:
        raise ConfigError(errors)
    if any(t.is_meta for t in module.state_dict().values()):  # the driver's check (``check``): shapes only
        return
    module.load_state_dict(state, strict=False)  # strict but for num_batches_tracked, checked above


def check(cfg: Config, build_model: Callable[[Config], nn.Module]) -> None:
    """Every weights file ``cfg.recipe`` names, read and checked key by key against the model
    ``build_model`` makes of ``cfg``, built on the meta device (no memory, no init: a second for any
    size); a ConfigError as ``load`` raises it. On the driver, before anything is scheduled."""
    if any(getattr(cfg.recipe, k, None) is not None for k in KEYS):
        with torch.device("meta"):
            build_model(cfg)


def without_weights(cfg: Config) -> Config:
    """``cfg`` with no weights file (the memory estimate's model: same shapes, and its cache key stays
    the same whichever file a run starts from)."""
    named = {k: None for k in KEYS if getattr(cfg.recipe, k, None) is not None}
    return dataclasses.replace(cfg, recipe=dataclasses.replace(cfg.recipe, **named)) if named else cfg  # type: ignore[arg-type]
