"""GPU throughput, MFU and memory: ``python bench/gpu.py`` (``make bench-gpu``) -> ``bench/results/gpu.json``.

Three workloads, each the recipe's own model (``recipes/``) on its synthetic batch (``example_batch``:
the input the memory profile is traced and probed on), random weights, nothing downloaded:

- ``resnet50``: ResNet-50 at 224 px, 1000 classes, SGD with momentum: images/s;
- ``bert_large``: BERT-large (L24, H1024, A16, FFN 4096, vocabulary 30522; transformers'
  ``BertConfig``) at 128 tokens, AdamW: sequences/s and MFU;
- ``maskrcnn``: torchvision's Mask R-CNN R50-FPN (``weights=None, weights_backbone=None``) at 800 px,
  80 classes, one box and mask per image, SGD with momentum: images/s.

For each, on one GPU in this one process (no process group: a world of 1), at ``train.precision=auto``
(bf16 autocast on CUDA) and the recipe's ``train.grad_clip``:

1. **Memory.** The launcher's memory profile, as the planner gets it (``launcher.memory.memory_profile``:
   on a local GPU its probe, else the device-free estimate; a fresh cache, so it is really computed),
   predicts the peak at the benchmark's micro-batch: ``model_gb + micro_batch x per_sample_gb``. The
   device-free estimate alone is recorded too. Then one model alone takes ``--memory-steps`` steps
   through the launcher's step (``launcher/step.py: DDPStep``), and the peak is read from
   ``torch.cuda.max_memory_allocated`` (reset before the model is built).
2. **Throughput**, the way ``bench/step_overhead.py`` compares two steps: a second model from the same
   seed; at every step the same micro-batch (pinned host memory, copied to the device each step, as
   the launcher's DataLoader hands it over) goes through the launcher's ``DDPStep`` and through a
   plain loop (autocast, forward, per-term mean loss, backward, clipping, optimizer step; as
   ``bench/plain_ddp.py``), in alternating order. This is ``bench/ranks.py: time_paired`` in one
   process: no barrier, a device synchronize around each side's step instead. Samples/s = micro-batch /
   median step time, per side; launcher / plain = the median of the per-step ratios (plain time /
   launcher time: above 1, the launcher is faster).
3. **MFU** = achieved FLOP/s / the GPU's dense bf16 peak (``launcher/devices.py: GPUS``, the planner's
   datasheet table; ``--peak-tflops`` for a GPU that is not in it). For BERT, 6 x parameters FLOPs per
   token (forward 2, backward 4; embeddings included, attention scores left out); for every model
   also the FLOPs the memory estimate counted (``FlopCounterMode``, backward = 2 x forward, frozen
   layers counted as trained).

``--dry-run`` runs all of it on CPU with tiny sizes (ResNet-50 at 32 px, a 2-layer BERT at 32 tokens,
Mask R-CNN at 64 px; a few steps; fp32), to check the script where there is no GPU. The CUDA calls are
replaced there: the measured peak is the growth of the process's peak resident memory (VmHWM, reset
through /proc/self/clear_refs), the peak FLOP/s a nominal CPU figure (``CPU_FLOPS_PER_THREAD``). Its
numbers mean nothing; it writes ``bench/work/gpu_dry_run.json`` unless ``--out`` says otherwise.

    python bench/gpu.py                                  # on a GPU (not run on one yet: sized for a few minutes)
    python bench/gpu.py --workload bert_large --micro bert_large=64
    python bench/gpu.py --dry-run --out /tmp/gpu.json    # anywhere: under a minute on 2 cores
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from configs; nothing is fetched

import torch  # noqa: E402
from tables import gpu_memory, gpu_throughput  # noqa: E402 - bench/tables.py (the script's folder is on sys.path)
from torch import nn  # noqa: E402

from launcher import memory  # noqa: E402
from launcher.cli import load  # noqa: E402
from launcher.config import Config  # noqa: E402
from launcher.devices import GPUS, gpu_type_of  # noqa: E402
from launcher.step import Batch, DDPStep, StepScalars  # noqa: E402
from recipes import RECIPES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GB = 1024**3
# --dry-run's stand-in for a datasheet peak, so that the MFU code runs on CPU: an upper bound of one x86 core's
# fp32 peak (4 GHz x 2 AVX-512 FMA units x 16 lanes x 2 FLOPs a cycle), so an MFU on any CPU stays below 1.
# Nominal, not a figure of this machine.
CPU_FLOPS_PER_THREAD = 4.0e9 * 64


@dataclass(frozen=True, kw_only=True)
class Workload:
    overrides: tuple[str, ...]  # config overrides: the recipe's model at this size
    micro_batch: int
    tiny: tuple[str, ...]  # --dry-run: overrides on top (CPU sizes)
    tiny_micro_batch: int
    unit: str  # what one sample is
    transformer: bool = False  # FLOPs per token = 6 x parameters applies


WORKLOADS = {
    "resnet50": Workload(
        overrides=("recipe=imagenet", "recipe.model=resnet50", "recipe.num_classes=1000", "recipe.train_crop=224"),
        micro_batch=256, tiny=("recipe.train_crop=32", "recipe.num_classes=10"), tiny_micro_batch=4, unit="images",
    ),
    "bert_large": Workload(
        overrides=("recipe=bert", "recipe.seq_len=128", "recipe.model.hidden_size=1024", "recipe.model.num_layers=24",
                   "recipe.model.num_heads=16", "recipe.model.intermediate_size=4096"),
        micro_batch=128, unit="sequences", transformer=True,
        tiny=("recipe.seq_len=32", "recipe.model.hidden_size=128", "recipe.model.num_layers=2",
              "recipe.model.num_heads=2", "recipe.model.intermediate_size=512", "recipe.model.vocab_size=4000"),
        tiny_micro_batch=4,
    ),
    "maskrcnn": Workload(
        overrides=("recipe=coco", "recipe.model=maskrcnn_resnet50_fpn", "recipe.min_size=800", "recipe.max_size=1333"),
        micro_batch=8, tiny=("recipe.min_size=64", "recipe.max_size=64"), tiny_micro_batch=1, unit="images",
    ),
}  # fmt: skip


def describe(cfg: Config) -> str:
    """The workload as the table names it, from the config it ran with."""
    r: Any = cfg.recipe
    if r.name == "imagenet":
        return f"{r.model}, {r.train_crop} px"
    if r.name == "bert":
        m = r.model
        return f"BERT L{m.num_layers} H{m.hidden_size}, {r.seq_len} tokens"
    return f"{r.model}, {r.min_size} px"


# ---------------------------------------------------------------- the device: CUDA, or its CPU stand-ins


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _vm_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """The peak bytes allocated inside the block, above what was allocated at its start, in ``["gb"]``.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU (--dry-run): the growth of the peak resident set
    (VmHWM, reset by writing 5 to /proc/self/clear_refs), a stand-in that only exercises the path."""
    result: dict[str, float] = {}
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield result
        sync(device)
        result["gb"] = (torch.cuda.max_memory_allocated(device) - base) / GB
        return
    gc.collect()
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = _vm_kb("VmRSS")
    yield result
    result["gb"] = (_vm_kb("VmHWM") - base) * 1024 / GB


def peak_flops(device: torch.device, override_tflops: float | None) -> tuple[float | None, str]:
    """(FLOP/s, where the figure comes from): the dense bf16 datasheet peak of this GPU."""
    if override_tflops:
        return override_tflops * 1e12, f"--peak-tflops {override_tflops:g}"
    if device.type != "cuda":
        threads = torch.get_num_threads()
        each = CPU_FLOPS_PER_THREAD / 1e9
        return threads * CPU_FLOPS_PER_THREAD, f"nominal CPU peak, {threads} thread(s) x {each:g} GFLOP/s (--dry-run)"
    name = torch.cuda.get_device_name(device)
    key = gpu_type_of(name, torch.cuda.get_device_properties(device).total_memory / GB)
    if key is None:
        return None, f"{name} is not in launcher/devices.py: GPUS; give its dense bf16 peak as --peak-tflops"
    gpu = GPUS[key]
    return gpu.bf16_tflops * 1e12, f"{gpu.name}: {gpu.bf16_tflops:g} TFLOP/s dense bf16 ({gpu.source})"


def _return_freed_memory() -> None:
    """--dry-run: every block of 64 KiB or more its own mapping, given back when freed (as
    bench/batch_finders.py does), so the resident-set stand-in follows the tensors alive."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD, fixed
        libc.mallopt(-8, 1)  # M_ARENA_MAX


# ---------------------------------------------------------------- the two steps, paired


def optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """The recipe's optimizer kind, as the memory probe builds it (launcher/memory.py: _probe_here)."""
    if memory.OPTIMIZER_STATES[cfg.recipe.reference.optimizer] == 2:
        return torch.optim.AdamW(model.parameters(), lr=1e-4)
    return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)


def plain_step(
    model: nn.Module, opt: torch.optim.Optimizer, count: Callable[[Batch], dict[str, int]], device: torch.device,
    grad_clip: float | None,
) -> Callable[[list[Batch], int, list[Batch] | None], None]:
    """A hand-written step as a plain script has it (bench/plain_ddp.py): per micro-batch mean losses."""

    def step(micro: list[Batch], _step: int, _upcoming: list[Batch] | None) -> None:
        for batch in micro:
            counts = count(batch)
            amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
            with amp:
                out = model({k: v.to(device, non_blocking=True) for k, v in batch.items()})
                loss: torch.Tensor = sum(out[k] / counts[k] for k in out) / len(micro)  # type: ignore[assignment]
            loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def time_paired(
    sides: dict[str, Callable[[list[Batch], int, list[Batch] | None], Any]], batch: Batch, warmup: int, steps: int,
    device: torch.device,
) -> tuple[dict[str, float], float]:
    """bench/ranks.py: time_paired in one process: the same micro-batch through both ``sides`` (a, b) at every
    step, in alternating order so neither always goes first; after ``warmup`` steps, (median seconds per
    side, median of the per-step ratios b's time / a's). A device synchronize before and after each side's
    step takes the place of the barrier."""
    (a, run_a), (b, run_b) = sides.items()
    times: dict[str, list[float]] = {a: [], b: []}
    for step in range(warmup + steps):
        for name, run in ((a, run_a), (b, run_b)) if step % 2 == 0 else ((b, run_b), (a, run_a)):
            sync(device)
            started = time.perf_counter()
            run([batch], step, [batch])  # the next step's batch too, as the Trainer passes it
            sync(device)
            if step >= warmup:
                times[name].append(time.perf_counter() - started)
    ratio = statistics.median(y / x for x, y in zip(times[a], times[b], strict=True))
    return {k: statistics.median(v) for k, v in times.items()}, ratio


# ---------------------------------------------------------------- one workload


def measure(name: str, overrides: list[str], micro: int, args: argparse.Namespace, device: torch.device,
            peak: float | None) -> dict[str, Any]:
    """Memory (predicted, measured), then the paired throughput and MFU, for one workload."""
    cfg = load(overrides)
    recipe = RECIPES[cfg.recipe.name]
    w = WORKLOADS[name]
    result: dict[str, Any] = {"what": describe(cfg), "overrides": overrides, "micro_batch": micro, "unit": w.unit,
                              "precision": "bf16 autocast" if device.type == "cuda" else "fp32"}

    # 1. memory: the profile first (the GPU probe runs in a child: nothing of ours is on the device yet)
    started = time.perf_counter()
    profile = memory.memory_profile(cfg, recipe, memory.detect_hardware(cfg.cluster))
    profile_s = time.perf_counter() - started
    est = memory.estimate(cfg, recipe)  # cached by the call above
    batch = {k: v.pin_memory() if device.type == "cuda" else v for k, v in recipe.example_batch(cfg, micro).items()}
    with peak_memory(device) as measured:
        torch.manual_seed(0)
        model = recipe.build_model(cfg).to(device)
        opt = optimizer(cfg, model)
        ours = DDPStep(model, opt, recipe.count, StepScalars(), device=device, precision=cfg.train.precision,
                       grad_clip=cfg.train.grad_clip)
        for i in range(args.memory_steps):
            ours([batch], i)
    predicted = profile.model_gb + micro * profile.per_sample_gb
    result["memory"] = {
        "predicted_gb": predicted, "predicted_source": profile.source, "predicted_detail": profile.detail,
        "profile_s": profile_s, "model_gb": profile.model_gb, "per_sample_gb": profile.per_sample_gb,
        "estimate_gb": est.model_gb + micro * est.per_sample_gb, "measured_gb": measured["gb"],
        "measured_how": "torch.cuda.max_memory_allocated" if device.type == "cuda"
        else "peak resident set growth (VmHWM; --dry-run's stand-in)",
        "steps": args.memory_steps, "predicted_over_measured": predicted / measured["gb"] if measured["gb"] else None,
    }  # fmt: skip

    # 2. throughput: the launcher's step against a plain one, paired
    torch.manual_seed(0)
    plain_model = recipe.build_model(cfg).to(device)
    plain = plain_step(plain_model, optimizer(cfg, plain_model), recipe.count, device, cfg.train.grad_clip)
    step_s, ratio = time_paired({"launcher": ours, "plain": plain}, batch, args.warmup, args.steps, device)
    for side in ("plain", "launcher"):
        result[side] = {"step_ms": 1000 * step_s[side], "samples_per_s": micro / step_s[side]}
    result.update(launcher_vs_plain=ratio, steps=args.steps, warmup=args.warmup)

    # 3. FLOPs and MFU
    params = sum(p.numel() for p in model.parameters())
    seq_len = getattr(cfg.recipe, "seq_len", None) if w.transformer else None
    per_sample_6n = 6 * params * seq_len if seq_len else None
    result["params"] = params
    result["flops_per_sample"] = {"6n": per_sample_6n, "counted": profile.flops_per_sample,
                                  "counted_detail": profile.flops_detail}
    for key, flops in (("mfu_6n", per_sample_6n), ("mfu_counted", profile.flops_per_sample)):
        result[key] = None if not (flops and peak) else {
            side: flops * result[side]["samples_per_s"] / peak for side in ("plain", "launcher")}
    if seq_len:
        result["tokens_per_s"] = {side: seq_len * result[side]["samples_per_s"] for side in ("plain", "launcher")}
    del model, plain_model, ours, plain, opt
    return result


# ---------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="on CPU, tiny sizes, a few steps: checks the script")
    ap.add_argument("--out", type=Path, help="default: bench/results/gpu.json (--dry-run: bench/work/gpu_dry_run.json)")
    ap.add_argument("--workload", action="append", choices=sorted(WORKLOADS), help="default: all")
    ap.add_argument("--micro", action="append", default=[], metavar="NAME=N", help="a workload's micro-batch")
    ap.add_argument("--steps", type=int, help="timed paired steps (default 20; --dry-run 2)")
    ap.add_argument("--warmup", type=int, help="paired steps before timing (default 5; --dry-run 1)")
    ap.add_argument("--memory-steps", type=int, help="steps of the memory measurement (default 3; --dry-run 2)")
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, where launcher/devices.py lacks it")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("bench/gpu.py: needs a CUDA GPU and torch sees none here; use --dry-run to run it end to end on CPU "
              "with tiny sizes", file=sys.stderr)
        return 2
    micro = {}
    for item in args.micro:
        key, _, value = item.partition("=")
        if key not in WORKLOADS or not value.isdigit() or int(value) < 1:
            ap.error(f"--micro {item!r}: expected NAME=N with NAME one of {', '.join(WORKLOADS)} and N >= 1")
        micro[key] = int(value)
    dry = args.dry_run
    args.steps = args.steps or (2 if dry else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if dry else 5)
    args.memory_steps = args.memory_steps or (2 if dry else 3)
    out = args.out or (ROOT / "bench" / "work" / "gpu_dry_run.json" if dry else ROOT / "bench" / "results" / "gpu.json")
    device = torch.device("cpu") if dry else torch.device("cuda", 0)
    if dry:
        _return_freed_memory()
        # one thread: two OpenMP threads on 2 cores that other work shares wait on each other, 10 to 20x slower
        torch.set_num_threads(1)
    else:
        torch.cuda.set_device(device)
    peak, peak_source = peak_flops(device, args.peak_tflops)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = f"{torch.cuda.get_device_name(device)}, {props.total_memory / GB:.0f} GiB"
    else:
        where = f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s) (--dry-run)"
    import torchvision
    import transformers

    record: dict[str, Any] = {
        "name": "gpu", "dry_run": dry, "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python bench/gpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": where, "peak_flops": peak, "peak_source": peak_source,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "transformers": transformers.__version__,
                     "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if not dry else None},
        "method": "one process, one device; the recipe's model on its example_batch; the launcher's DDPStep and a "
                  "plain step paired on the same micro-batch in alternating order (medians); peak memory from "
                  "memory.memory_profile vs measured over the launcher's steps",
        "workloads": {},
    }  # fmt: skip
    started = time.perf_counter()
    failed = False
    with tempfile.TemporaryDirectory(prefix="gpu-bench-cache-") as cache:
        os.environ["LAUNCHER_CACHE"] = cache  # the profile computed now, not read from an earlier run
        for name in args.workload or list(WORKLOADS):
            w = WORKLOADS[name]
            overrides = [*w.overrides, *(w.tiny if dry else ()), *(["cluster.use_gpu=false"] if dry else [])]
            n = micro.get(name, w.tiny_micro_batch if dry else w.micro_batch)
            print(f"[bench/gpu.py] {name}: micro-batch {n} ...", flush=True)
            try:
                record["workloads"][name] = measure(name, overrides, n, args, device, peak)
            except Exception:  # noqa: BLE001 - recorded; the other workloads still run
                failed = True
                record["workloads"][name] = {"micro_batch": n, "overrides": overrides,
                                             "error": traceback.format_exc()[-3000:]}
                print(record["workloads"][name]["error"], file=sys.stderr)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            record["wall_s"] = time.perf_counter() - started
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(record, indent=1) + "\n")  # after each workload: a cut-off run keeps the rest
    print(f"\n{where}; peak: {peak_source}\n")
    print("\n".join(gpu_throughput(record)) + "\n\n" + "\n".join(gpu_memory(record)))
    print(f"\n{out} ({record['wall_s']:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
