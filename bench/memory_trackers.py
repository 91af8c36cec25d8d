"""The memory estimate's accounting, three ways, against the peaks ``bench/batch_finders.py`` measured under a
real allocation cap: which one the planner keeps (docs/planner.md, "The memory estimate").

For each model of ``bench/results/batch_finders.json``, at its measured true maximum micro-batch ``n``:

- **states + saved**: the accounting the estimate used before issue #20: parameters, gradients and
  optimizer state counted in full, plus ``n`` x the bytes autograd saves per sample in a real CPU forward
  (``launcher.faults.SavedBytes``, at micro-batch 1 and 2, or 2 and 4 where one sample is refused);
- **MemTracker**: ``torch.distributed._tools.mem_tracker.MemTracker``'s peak over one training step traced
  under ``FakeTensorMode`` (the step of ``launcher/memory.py``: forward, backward, optimizer step with its
  state allocated);
- **Timeline**: ``launcher.memory.Timeline``'s peak over the same step, and the estimate's prediction
  (``memory.estimate``: the line through two traced sizes, read at ``n``).

A last row traces the COCO recipe's Mask R-CNN at 800 px, one image (no measured peak): MemTracker stops
there (it hooks every parameter's gradient, and the frozen stem has none); the Timeline's step is timed.

    python bench/memory_trackers.py        # -> bench/results/memory_trackers.json (about 2 min on 2 cores)
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from launcher import memory  # noqa: E402
from launcher.cli import load  # noqa: E402
from launcher.faults import SavedBytes  # noqa: E402
from recipes import RECIPES  # noqa: E402

GB = 1024**3
RESULTS = Path(__file__).parent / "results"


def saved_per_sample(cfg: Any, recipe: Any) -> float:
    """The old estimate's bytes per sample: what autograd saves in a real CPU forward, ``max(f2 - f1, f2 / 2)``."""
    model = recipe.trace_model(cfg)
    model.train()

    def saved(n: int) -> int:
        counter = SavedBytes(model.parameters())
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            out = model(recipe.example_batch(cfg, n))
        del out
        return counter.total

    try:
        n, small, big = 1, saved(1), saved(2)
    except ValueError:  # one sample refused (BatchNorm)
        n, small, big = 2, saved(2), saved(4)
    return float(max((big - small) / n, math.ceil(big / (2 * n))))


def traced_peak(cfg: Any, recipe: Any, n: int, tracker: str) -> tuple[int, float]:
    """(peak bytes, seconds) of one training step at micro-batch ``n`` under fake tensors, kept by ``tracker``."""
    from torch.distributed._tools.mem_tracker import MemTracker

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = memory._fake(recipe.trace_model(cfg), mode)
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    adam = memory.OPTIMIZER_STATES[cfg.recipe.reference.optimizer] == 2
    opt = torch.optim.AdamW(trained) if adam else torch.optim.SGD(trained, lr=0.1, momentum=0.9)
    with mode:
        for p in trained:
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
    batch = recipe.example_batch(cfg, n)
    timeline = memory.Timeline()  # routes the batch's own ops to real tensors for both trackers
    state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    for t in [*model.parameters(), *model.buffers(), *state, *batch.values()]:
        timeline.track(t)
    mt = MemTracker()
    mt.track_external(model, opt, *batch.values())
    started = time.perf_counter()
    with mode, timeline, mt if tracker == "memtracker" else _null():
        sum(model(batch).values()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    if tracker == "memtracker":
        (snapshot,) = mt.get_tracker_snapshot("peak").values()
        return int(snapshot["Total"]), seconds
    return timeline.peak, seconds


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: Any) -> None:
        return None


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    return fn(), time.perf_counter() - started


def main() -> None:
    finders = json.loads((RESULTS / "batch_finders.json").read_text())
    torch.set_num_threads(2)
    rows = []
    for r in finders["rows"]:
        cfg = memory.without_weights(load(r["overrides"]))
        recipe = RECIPES[cfg.recipe.name]
        n, measured = r["exhaustive"]["max"], r["exhaustive"]["peak_gb_at_max"]
        model = recipe.trace_model(cfg)
        trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        states = sum(p.numel() * p.element_size() for p in model.parameters()) + trainable * (
            1 + memory.OPTIMIZER_STATES[cfg.recipe.reference.optimizer])
        per_sample, old_s = timed(lambda: saved_per_sample(cfg, recipe))  # noqa: B023
        mt, mt_s = traced_peak(cfg, recipe, n, "memtracker")
        tl, tl_s = traced_peak(cfg, recipe, n, "timeline")
        with tempfile.TemporaryDirectory() as cache:
            os.environ["LAUNCHER_CACHE"] = cache
            profile, est_s = timed(lambda: memory.estimate(cfg, recipe))  # noqa: B023
        row = {
            "scenario": r["scenario"], "budget_gb": r["budget_gb"], "true_max": n, "measured_gb": measured,
            "states_plus_saved_gb": (states + n * per_sample) / GB, "states_plus_saved_s": old_s,
            "memtracker_gb": mt / GB, "memtracker_step_s": mt_s,
            "timeline_gb": tl / GB, "timeline_step_s": tl_s,
            "estimate_gb": profile.model_gb + n * profile.per_sample_gb, "estimate_s": est_s,
        }
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    cfg = memory.without_weights(load(["recipe=coco"]))
    try:
        traced_peak(cfg, RECIPES["coco"], 1, "memtracker")
        failed = None
    except RuntimeError as e:
        failed = str(e)
    tl, tl_s = traced_peak(cfg, RECIPES["coco"], 1, "timeline")
    rows.append({"scenario": "coco", "true_max": 1, "memtracker_error": failed, "timeline_gb": tl / GB,
                 "timeline_step_s": tl_s})
    print(json.dumps(rows[-1]), flush=True)
    out = {"date": time.strftime("%Y-%m-%d"), "command": "python bench/memory_trackers.py",
           "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores), 2 torch threads",
           "versions": {"torch": torch.__version__}, "measured_from": finders["date"], "rows": rows}
    (RESULTS / "memory_trackers.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
