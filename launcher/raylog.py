"""Ray's ``worker_process_setup_hook`` for the embedded Ray: kept free of heavy imports.

The hook runs in every Ray worker process, Ray Train's own actors included. Importing torch
there (as ``launcher.worker`` would) made training 3x slower on 2 CPU cores, so it lives
in this module, which imports only ``logging``.
"""

from __future__ import annotations

import logging


def quiet() -> None:
    """A known-harmless warning off the console.

    Ray Train's PlacementGroupCleaner polls the state API every second; without the dashboard
    (the launcher never opens one) every poll fails with the same warning. Placement groups
    are still removed when the run ends.
    """
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
