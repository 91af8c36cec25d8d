"""Planner quality: the largest micro-batch that fits a memory budget, found four ways.

For each model and budget:

- **planner**: the launcher's memory bound (``plan.max_micro_batch``) from its device-free
  estimate (no training step), at the default ``planner.headroom`` and at 0, each then checked by running
  that size in a fresh capped process (as below);
- **exhaustive**: the true maximum (to within 2%), by growing steps then bisection, each size in a fresh
  process running 2 optimizer steps (the second with optimizer state allocated) under the budget; it
  starts from the largest size the planner's checks ran under the cap (2 when neither fit), so a size
  shown to fit is never above the maximum it finds, with a first step of 2% (then doubling steps), and
  stops below a size the planner's checks saw fail; a size counts as over the budget when torch's
  allocator runs out in its process (a fresh process allocates the same each time), or when its process
  dies without a result twice (below: a capped process now and then crashes outside torch at a size that
  fits, and one such failure would lower the maximum found); a failure in a process that started a
  thread under the cap (whose stack the budget then paid for) is run again; every trial is in the JSON
  (``sizes``), disagreeing ones in ``flaky_sizes``;
- **lightning**: ``Tuner.scale_batch_size`` with ``mode="binsearch"`` (3 steps per trial): it doubles from 2
  until the first out-of-memory, then bisects. Its default ``mode="power"`` is that first phase alone
  (``_run_power_scaling``: the last size that fit before the first out-of-memory), so its result, steps
  and seconds are read from the same run's trials rather than trained again;
- **accelerate**: ``find_executable_batch_size`` (default start 128, x0.9 per OOM) around a
  function that runs the same 2 optimizer steps.

The budget on CPU is a real allocation cap: each method runs in its own forked process which,
after one warm-up step at micro-batch 2 (thread pools, kernels), sets ``RLIMIT_AS`` to its
address space + the budget, with glibc's mmap threshold fixed at 64 KiB (``mallopt``) so every
tensor is its own mapping and a freed one is given back. An allocation over the cap fails in
torch's CPU allocator with ``DefaultCPUAllocator: can't allocate memory``, the error both
Lightning and Accelerate catch as an out-of-memory. Params, grads, optimizer state, activations,
temporaries and everything else the process maps count against the budget, as on a GPU. oneDNN's
primitive caches are off (they keep scratch memory per input shape after an out-of-memory, which
would make every in-process retry fail; a GPU's allocator gives such memory back). A capped process
that dies without a result (a crash, e.g. a library calling through a pointer it failed to load under
the cap, not an out-of-memory) is run once more in a new process; the first death is kept
(``retried``).

    python bench/batch_finders.py                    # every scenario -> bench/results/batch_finders.json
    python bench/batch_finders.py --scenario=cnn --budget=0.25 --override recipe.train_crop=32 --out=/tmp/x.json
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import functools
import gc
import json
import os
import pickle
import platform
import resource
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# oneDNN (torch's CPU convolutions) caches primitives with their scratch memory, per input shape: after an
# out-of-memory at a large batch that memory stays, and every smaller retry in the same process fails too.
# A GPU's caching allocator gives it back (torch.cuda.empty_cache, which both finders call); so no cache here.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")
os.environ.setdefault("LRU_CACHE_CAPACITY", "1")  # ideep's own cache of the same

import torch  # noqa: E402

from launcher.cli import load  # noqa: E402
from recipes import RECIPES  # noqa: E402

GB = 1024**3
SCENARIOS: dict[str, tuple[str, list[str], list[float], bool]] = {
    # name: (what it is, config overrides, budgets in GB, whether Lightning and Accelerate run by default)
    # sizes chosen so the whole table takes about 3 minutes on 2 cores (make bench). Lightning and Accelerate
    # add 1.5 minutes on ResNet-50 and 4 on BERT-base (their large trial batches): --finders-everywhere
    "cnn": ("small CNN: ResNet-18, 64 px, 10 classes, SGD", [
        "recipe=imagenet", "recipe.model=resnet18", "recipe.train_crop=64", "recipe.num_classes=10"], [0.5], True),
    "resnet50": ("ResNet-50, 96 px, 100 classes, SGD", [
        "recipe=imagenet", "recipe.model=resnet50", "recipe.train_crop=96", "recipe.num_classes=100"], [1.0], False),
    "bert-base": ("BERT-base encoder (L12 H768, vocab 30522), 32 tokens, AdamW", [
        "recipe=bert", "recipe.seq_len=32"], [2.5], False),
}
FINDERS = ("lightning_power", "lightning_binsearch", "accelerate")
NOT_RUN = {"not_run": "not run by default on this model (python bench/batch_finders.py --finders-everywhere)"}
PRECISION = 50  # the bisection stops when the bracket is within 1/50 (2%) of the largest size that fits
STEPS = 2  # optimizer steps per trial: the second runs with the optimizer state allocated


# ---------------------------------------------------------------- one capped process per method


class Setup:
    """Model, optimizer and synthetic batches of one scenario (the recipe's own model and input)."""

    def __init__(self, overrides: list[str]) -> None:
        self.overrides = overrides
        self.cfg = load(overrides)
        self.recipe = RECIPES[self.cfg.recipe.name]
        with torch.device("meta"):  # the model's libraries imported here, once, not in every child; no data, no
            self.recipe.build_model(self.cfg)  # kernel runs on the meta device, so no OpenMP pool exists at a fork

    @functools.cached_property
    def sample(self) -> dict[str, torch.Tensor]:
        """One synthetic sample, made on first use: in a child, as the parent runs no torch op."""
        return self.recipe.example_batch(self.cfg, 1)  # type: ignore[no-any-return]

    def model(self) -> torch.nn.Module:
        torch.manual_seed(0)
        return self.recipe.build_model(self.cfg)

    def optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        if self.cfg.recipe.reference.optimizer == "sgd":
            return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        return torch.optim.AdamW(model.parameters(), lr=1e-4)

    def batch(self, n: int) -> dict[str, torch.Tensor]:
        return {k: v.expand(n, *v.shape[1:]).clone() for k, v in self.sample.items()}

    def steps(self, model: torch.nn.Module, opt: torch.optim.Optimizer, n: int, count: list[int],
              steps: int = STEPS) -> None:  # fmt: skip
        for _ in range(steps):
            count[0] += 1
            with onednn_oom():
                out = model(self.batch(n))
                sum(out.values()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)


@contextlib.contextmanager
def onednn_oom() -> Iterator[None]:
    """oneDNN (torch's CPU convolutions) allocates its scratch memory itself; over the cap it fails with
    "could not create a primitive", which no batch finder reads as out-of-memory. Raised again as the
    allocator's error, the CPU counterpart of the cuDNN failure both libraries already recognize."""
    try:
        yield
    except RuntimeError as e:
        if "could not create a primitive" not in str(e):
            raise
        raise RuntimeError(f"DefaultCPUAllocator: can't allocate memory (oneDNN: {e})") from None


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _forked(body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``body()`` in a forked child, its result pickled back. The parent never runs torch ops, so
    no OpenMP pool exists at fork time (a child forked after one can hang)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns into the parent's stack
        try:
            os.close(read)
            try:
                result = body()
            except BaseException:  # noqa: BLE001 - reported to the parent
                result = {"error": traceback.format_exc()[-2000:]}
            os.write(write, pickle.dumps(result))
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if data:
        return pickle.loads(data)  # type: ignore[no-any-return]
    return {"error": f"the child died without a result (wait status {status})", "died": True}


def _capped(setup: Setup, budget_gb: float, body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """In a forked child: warm up, cap the address space at its current size + budget, run ``body``.

    A child that dies without a result (a crash outside torch, not an out-of-memory, which ``body`` catches)
    is run once more, in a new child; the first death is kept in the result under ``"retried"``."""
    result = _forked(_capped_child(setup, budget_gb, body))
    if result.get("died"):
        result = {**_forked(_capped_child(setup, budget_gb, body)), "retried": result["error"]}
    return result


def _capped_child(setup: Setup, budget_gb: float, body: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    def child() -> dict[str, Any]:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: fixed, so big blocks are mapped and unmapped
        libc.mallopt(-8, 1)  # M_ARENA_MAX: no per-thread arenas reserving address space
        torch.set_num_threads(2)
        model = setup.model()
        setup.steps(model, setup.optimizer(model), 2, [0], steps=1)  # warm-up: thread pools, kernels
        del model
        gc.collect()
        base, threads = _vm("VmSize"), _threads()
        resource.setrlimit(resource.RLIMIT_AS, (base + int(budget_gb * GB), resource.RLIM_INFINITY))
        started = time.perf_counter()
        result = body()
        result["seconds"] = time.perf_counter() - started
        result["peak_gb"] = (_vm("VmPeak") - base) / GB
        result["base_gb"] = base / GB
        result["threads"] = [threads, _threads()]  # at the cap and at the end: none started under the cap
        return result

    return child


def is_oom(e: BaseException) -> bool:
    return isinstance(e, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(e)


def trial(setup: Setup, budget_gb: float, n: int) -> dict[str, Any]:
    """STEPS optimizer steps at micro-batch ``n`` in a fresh capped process: fits or oom."""

    def body() -> dict[str, Any]:
        model = setup.model()
        try:
            setup.steps(model, setup.optimizer(model), n, [0])
        except RuntimeError as e:
            if not is_oom(e):
                raise
            return {"n": n, "fits": False, "oom": str(e).splitlines()[0][-160:]}
        return {"n": n, "fits": True}

    return _capped(setup, budget_gb, body)


def checked(setup: Setup, budget_gb: float, n: int) -> dict[str, Any]:
    """``trial`` at ``n``, run again where a failure may not be the size's: the budget paid for a thread started
    under the cap. A child that died (a crash outside torch) was run again by ``_capped``; dying twice, and an
    out-of-memory error in torch's allocator (a fresh process allocates the same each time), count as too big."""
    r = trial(setup, budget_gb, n)
    if not r.get("fits") and r.get("threads", [0, 0])[1] > r.get("threads", [0, 0])[0]:
        r = {**trial(setup, budget_gb, n), "threads_grew": r}
    if r.get("died"):
        return {"n": n, "fits": False, "died": r["error"]}
    return r


def exhaustive(
    setup: Setup, budget_gb: float, start: dict[str, Any] | None = None, over: int | None = None
) -> dict[str, Any]:
    """Growing steps, then bisection; every size in its own fresh process (no state left by an OOM).
    ``start``: a trial (``trial``'s result) that fitted, the search's lower end (None: from 2, doubling);
    from it the first step is the bisection's final width (1/PRECISION), each next one twice the last, so
    a start within 5% of the maximum costs two sizes, not a doubling and a bisection back down. ``over``:
    a size already seen to fail (the planner's checks), the search's upper end (None: not known)."""
    started, trials = time.perf_counter(), [] if start is None else [{**start, "from": "planner"}]
    if start is not None and over is not None and over <= start["n"]:
        over = None  # a size failed below one that fitted (the machine's state): the search finds its own end

    def fits(n: int) -> bool:
        r = checked(setup, budget_gb, n)
        if "error" in r and not r.get("died"):
            raise RuntimeError(r["error"])
        trials.append({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()})
        return bool(r["fits"])

    if start is None and not fits(2):  # from 2: BatchNorm refuses one sample per channel in training
        return {"max": 0, "trials": len(trials), "steps": STEPS, "seconds": time.perf_counter() - started}
    lo = 2 if start is None else start["n"]
    step = lo if start is None else max(1, lo // PRECISION)
    hi = lo + step
    while (over is None or hi < over) and fits(hi):
        lo, step = hi, 2 * step
        hi = lo + step
    hi = hi if over is None else min(hi, over)
    while hi - lo > max(1, lo // PRECISION):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    peak = max((t["peak_gb"] for t in trials if t["fits"] and t["n"] == lo), default=None)
    flaky = sorted({t["n"] for t in trials if not t["fits"]} & {t["n"] for t in trials if t["fits"]})
    return {"max": lo, "first_oom": hi, "start": trials[0]["n"] if start else 2, "trials": len(trials),
            "steps": STEPS * len(trials),
            "peak_gb_at_max": peak, "flaky_sizes": flaky, "seconds": time.perf_counter() - started, "sizes": trials}


def planner(setup: Setup, budget_gb: float) -> dict[str, Any]:
    """The launcher's bound: hardware = one CPU worker with ``budget_gb``; memory from the estimate; at the
    default ``planner.headroom`` and at 0, each size then run under the cap."""
    cfg = load([*setup.overrides, "cluster.num_workers=1", f"cluster.gpu_memory_gb={budget_gb}",
                "batch.global_batch=65536"])

    def child() -> dict[str, Any]:
        # imported here, not in the parent: with torch's fake-tensor modules imported before the fork,
        # Accelerate's in-process retries all failed after the first out-of-memory (ResNet-50 at 1 GB)
        from launcher import memory
        from launcher.planner import plan, request_from_config

        torch.set_num_threads(2)
        with tempfile.TemporaryDirectory() as cache:  # measure the estimate, not a cache read
            os.environ["LAUNCHER_CACHE"] = cache
            started = time.perf_counter()
            hw = memory.detect_hardware(cfg.cluster)
            mem = memory.memory_profile(cfg, setup.recipe, hw)
            request = request_from_config(cfg)
            p = plan(request, hw, mem)
            seconds = time.perf_counter() - started
            bare = plan(dataclasses.replace(request, headroom=0.0), hw, mem)
            return {"max": p.max_micro_batch, "headroom": request.headroom, "max_headroom_0": bare.max_micro_batch,
                    "steps": 0, "seconds": seconds, "per_sample_gb": mem.per_sample_gb,
                    "model_states_gb": mem.model_gb, "source": mem.source, "detail": mem.detail}

    result = _forked(child)
    if "error" in result:
        return result
    checks = {key: checked(setup, budget_gb, result[key]) for key in ("max", "max_headroom_0")}
    return {**result, "fits": checks["max"].get("fits"), "measured_peak_gb_at_max": checks["max"].get("peak_gb"),
            "fits_headroom_0": checks["max_headroom_0"].get("fits"), "check": checks["max"],
            "check_headroom_0": checks["max_headroom_0"]}


def lightning(setup: Setup, budget_gb: float) -> dict[str, Any]:
    """``Tuner(trainer).scale_batch_size(module, mode="binsearch")`` under the cap, its power phase beside it."""

    def body() -> dict[str, Any]:
        import logging

        import lightning.pytorch as pl
        from lightning.pytorch.tuner import Tuner
        from torch.utils.data import DataLoader

        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        count, steps = [0], []  # steps: (batch size, when it started), to read the power phase from

        class Module(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.net = setup.model()
                self.batch_size = 2

            def training_step(self, batch: dict[str, torch.Tensor], _: int) -> torch.Tensor:
                count[0] += 1
                steps.append((self.batch_size, time.perf_counter()))
                with onednn_oom():
                    return sum(self.net(batch).values())  # type: ignore[return-value]

            def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
                with onednn_oom():
                    loss.backward(*args, **kwargs)

            def configure_optimizers(self) -> torch.optim.Optimizer:
                return setup.optimizer(self.net)

            def train_dataloader(self) -> DataLoader:
                one = {k: v[0] for k, v in setup.sample.items()}
                return DataLoader(_Repeat(one, 1 << 16), batch_size=self.batch_size)

        with tempfile.TemporaryDirectory() as root:
            trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                 enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                                 max_epochs=1)
            restore = trainer._checkpoint_connector.restore

            def uncapped_restore(*a: Any, **k: Any) -> Any:
                # After the search Lightning reloads its pre-search checkpoint into host memory; on a GPU
                # that copy is not in the GPU's budget, so it is not in this one either.
                resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
                return restore(*a, **k)

            trainer._checkpoint_connector.restore = uncapped_restore  # type: ignore[method-assign]
            started = time.perf_counter()
            found = Tuner(trainer).scale_batch_size(Module(), mode="binsearch")
        return {"max": found, "steps": count[0], "power": power_phase(steps, started)}

    return _capped(setup, budget_gb, body)


def power_phase(steps: list[tuple[int, float]], started: float) -> dict[str, Any]:
    """Lightning's ``mode="power"`` read from a binsearch run's steps (batch size, start time): both double
    from the same size until the first out-of-memory, where power stops with the last size that fit. The
    first trial to fail is the first followed by a smaller one; power's time ends where the next trial starts."""
    sizes = [n for n, _ in steps]
    for i in range(1, len(steps)):
        if sizes[i] < sizes[i - 1]:  # the trial at sizes[i - 1] failed: bisection starts below it
            fit = [n for n in sizes[:i] if n < sizes[i - 1]]
            return {"max": max(fit, default=None), "steps": i, "seconds": steps[i][1] - started,
                    "read_from": "binsearch"}
    return {"max": sizes[-1] if sizes else None, "steps": len(sizes), "read_from": "binsearch",
            "seconds": steps[-1][1] - started if steps else 0.0}  # no out-of-memory: both end at the same size


def accelerate(setup: Setup, budget_gb: float) -> dict[str, Any]:
    """``find_executable_batch_size`` (start 128, x0.9 per OOM) around STEPS optimizer steps."""

    def body() -> dict[str, Any]:
        from accelerate.utils import find_executable_batch_size

        count, tried = [0], []
        model = setup.model()
        opt = setup.optimizer(model)

        @find_executable_batch_size(starting_batch_size=128)
        def run(batch_size: int) -> int:
            tried.append(batch_size)
            opt.zero_grad(set_to_none=True)
            setup.steps(model, opt, batch_size, count)
            return batch_size

        return {"max": run(), "steps": count[0], "trials": len(tried)}

    return _capped(setup, budget_gb, body)


class _Repeat(torch.utils.data.Dataset):
    def __init__(self, item: dict[str, torch.Tensor], length: int) -> None:
        self.item, self.length = item, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.item


# ---------------------------------------------------------------- driver

def run_scenario(name: str, overrides: list[str], budget_gb: float, finders: bool = True) -> dict[str, Any]:
    setup = Setup(overrides)
    row: dict[str, Any] = {"scenario": name, "overrides": overrides, "budget_gb": budget_gb}
    p = row["planner"] = planner(setup, budget_gb)
    fitted = [p[key] for key in ("check", "check_headroom_0") if p.get(key, {}).get("fits")]
    failed = [p[key]["n"] for key in ("check", "check_headroom_0") if p.get(key, {}).get("fits") is False]
    row["exhaustive"] = exhaustive(setup, budget_gb, start=max(fitted, key=lambda t: t["n"], default=None),
                                   over=min(failed, default=None))
    if finders:
        row["lightning_binsearch"] = lightning(setup, budget_gb)
        power = row["lightning_binsearch"].pop("power", None)
        row["lightning_power"] = power or {"error": row["lightning_binsearch"].get("error", "no binsearch run")}
        row["accelerate"] = accelerate(setup, budget_gb)
    else:
        row |= {method: dict(NOT_RUN) for method in FINDERS}
    true = row["exhaustive"]
    for method in ("planner", *FINDERS):
        found = row[method].get("max")
        row[method]["of_true_max"] = found / true["max"] if found and true["max"] else None
    if "error" not in p and true["max"] and true.get("peak_gb_at_max"):
        p["of_true_max_headroom_0"] = p["max_headroom_0"] / true["max"]
        p["predicted_gb_at_true_max"] = p["model_states_gb"] + true["max"] * p["per_sample_gb"]
        p["predicted_over_measured"] = p["predicted_gb_at_true_max"] / true["peak_gb_at_max"]
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as BENCHMARKS.md shows them (``bench/tables.py``, the one renderer of the table)."""
    from bench.tables import batch_finders_quality

    return "\n".join(batch_finders_quality({"rows": rows}))


def record(rows: list[dict[str, Any]], started: float) -> dict[str, Any]:
    import accelerate as acc
    import lightning as pl

    return {
        "date": time.strftime("%Y-%m-%d", time.gmtime(started)),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores); "
                  "budget = RLIMIT_AS cap per forked process",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "lightning": pl.__version__, "accelerate": acc.__version__},
        "wall_s": time.time() - started,
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS), help="default: all")
    ap.add_argument("--budget", type=float, action="append", help="GB; default: the scenario's budgets")
    ap.add_argument("--override", action="append", default=[], help="extra config override, e.g. recipe.train_crop=32")
    ap.add_argument("--finders-everywhere", action="store_true",
                    help="Lightning and Accelerate on every scenario (by default only on cnn: 5.5 more minutes)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "batch_finders.json")
    args = ap.parse_args()
    import accelerate.utils  # noqa: F401 - imported before any fork: the cap measures training, not imports
    import lightning.pytorch  # noqa: F401

    rows = []
    started = time.time()
    for name in args.scenario or list(SCENARIOS):
        what, overrides, budgets, finders = SCENARIOS[name]
        for budget in args.budget or budgets:
            print(f"[batch_finders] {name} ({what}) at {budget:g} GB ...", flush=True)
            row = run_scenario(name, overrides + args.override, budget, finders or args.finders_everywhere)
            rows.append({"what": what, **row})
            print(table(rows[-1:]).splitlines()[-1], flush=True)
            result = record(rows, started)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1))  # after each row: a long run keeps what it measured
    print(table(rows))
    print(json.dumps({"rows": len(rows), "out": str(args.out), "wall_s": time.time() - started}))


if __name__ == "__main__":
    main()
