"""The optional DeepSpeed engine: the config the planner generates, checked by DeepSpeed itself.

The planner (pure) writes the DeepSpeed config from the plan, so its batch sizes cannot
disagree with the plan. This module hands that dict to DeepSpeed's own ``DeepSpeedConfig``
(batch arithmetic, ZeRO section, precision) for the planned world size, and checks the
top-level keys itself, because ``DeepSpeedConfig`` accepts unknown top-level keys silently.

Inside the workers, ``wrap`` puts the model and the launcher's optimizer into a DeepSpeed
engine (ZeRO 1 or 2) on Ray Train's process group; the loop then drives it
(``launcher/step.py: DeepSpeedStep``) and checkpoints its optimizer shards (``ZeroShard``).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any

# Top-level keys the planner may write; each is a field DeepSpeed 0.19 reads.
KNOWN_KEYS = {
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "zero_optimization",
    "bf16",
    "gradient_clipping",
    "steps_per_print",
    "wall_clock_breakdown",
}


def check_deepspeed_config(config: dict[str, Any], world_size: int) -> list[str]:
    """Problems DeepSpeed (or the key check) finds in ``config`` for ``world_size`` ranks; [] if none.

    Raises ImportError when DeepSpeed is not installed (``pip install -e '.[deepspeed]'``).
    """
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs to stdout; plan.format=json owns it
        from deepspeed.runtime.config import DeepSpeedConfig
        from deepspeed.utils import logger as ds_logger

    class Planned(DeepSpeedConfig):  # type: ignore[misc]
        """DeepSpeedConfig for a world that is not running: it would otherwise assume 1 rank."""

        def _initialize_params(self, param_dict: dict[str, Any]) -> None:
            self.world_size = world_size
            super()._initialize_params(param_dict)

    errors = [f"deepspeed.{k}: not a DeepSpeed config key" for k in sorted(set(config) - KNOWN_KEYS)]
    level = ds_logger.level
    ds_logger.setLevel(logging.ERROR)
    try:
        Planned(dict(config))
    except (AssertionError, ValueError) as e:  # batch checks assert; pydantic raises ValidationError(ValueError)
        errors.append(f"deepspeed: DeepSpeedConfig refuses the generated config: {' '.join(str(e).split())}")
    finally:
        ds_logger.setLevel(level)
    return errors


# --- Training through DeepSpeed (inside a Ray Train worker) ------------------------------------
# ZeRO's optimizer state is partitioned: each rank saves its own shard next to rank 0's
# state.pt. DeepSpeed's own state_dict holds Python objects (its loss scaler, an enum,
# fragment maps) that torch.load(weights_only=True) refuses; those are dropped on save and
# taken from the live optimizer on load, so shards stay loadable without unpickling code.
_LIVE_KEYS = ("loss_scaler", "zero_stage", "param_slice_mappings")


def wrap(model: Any, optimizer: Any, config: dict[str, Any]) -> tuple[Any, Any]:
    """(DeepSpeed engine, its ZeRO optimizer) around ``model`` and the launcher's ``optimizer``.

    The process group is Ray Train's (NCCL or gloo); the config is the plan's. The lr
    scheduler stays on ``optimizer``: ZeRO keeps using its param groups.
    """
    import os

    if not _cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed
        from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    if not _cuda():
        # DeepSpeed's CPU backend compiles its shared-memory op (deepspeed_shm_comm, half a minute on 2
        # cores, in every fresh environment) when it sets up communication; the op serves only its
        # inference all-reduce (tensor-parallel inference), never training, which goes through the
        # process group. Marked unavailable in DeepSpeed's table of ops, it is not built.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    engine, zero_optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=dict(config), dist_init_required=False
    )
    return engine, zero_optimizer


class ZeroShard:
    """This rank's ZeRO optimizer partition as a Stateful part (checkpointed per rank, as ``zero``).

    It loads only on the world size it was saved on (``checkpoint.Checkpointer`` refuses others).
    """

    def __init__(self, zero_optimizer: Any, world: int) -> None:
        self.zero, self.world = zero_optimizer, world

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.zero.state_dict().items() if k not in _LIVE_KEYS}

    def load_state_dict(self, state: dict[str, Any], /) -> None:
        live = self.zero.state_dict()
        state = {**state, **{k: live[k] for k in _LIVE_KEYS if k in live}}
        self.zero.load_state_dict([state] * self.world, load_optimizer_states=True, load_from_fp32_weights=True)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
