"""The optional DeepSpeed engine: the config the planner generates, checked by DeepSpeed itself.

The planner (pure) writes the DeepSpeed config from the plan, so its batch sizes cannot
disagree with the plan. This module hands that dict to DeepSpeed's own ``DeepSpeedConfig``
(batch arithmetic, ZeRO section, precision) for the planned world size, and checks the
top-level keys itself, because ``DeepSpeedConfig`` accepts unknown top-level keys silently.
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
