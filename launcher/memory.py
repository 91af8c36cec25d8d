"""What the planner needs to know about memory: the hardware and the memory profile.

The profile comes from, in order of preference:

1. the user's override (``planner.memory.model_gb`` / ``planner.memory.per_sample_gb``);
2. a probe on the real device, when training runs on local CUDA GPUs: a few optimizer
   steps at two micro-batch sizes in a child process (so the driver never holds a CUDA
   context), peak memory fitted linearly; an OOM stays in the child. Cached per model,
   device and torch version, and shipped to every rank inside the plan, so all agree;
3. a device-free estimate: parameter, gradient and optimizer-state bytes counted from the
   model, activation bytes per sample from the tensors autograd saves during a CPU forward
   pass at micro-batch 1 and 2 (``torch.autograd.graph.saved_tensors_hooks``), cached.

The same forward passes count the step's FLOPs (``torch.utils.flop_counter.FlopCounterMode``;
backward = 2x forward), and the GPU probe times its steps: the planner's step time and time to
train come from them (``Plan.step_time_s``; the probe's measurement wins).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from launcher.config import Cluster, Config, to_dict, validate
from launcher.devices import GPUS, gpu_type_of
from launcher.planner import Hardware, MemoryProfile
from launcher.weights import without_weights

GB = 1024**3
DEFAULT_CPU_WORKERS = 2
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" in microseconds, or "max <period>"


def detect_hardware(cluster: Cluster) -> Hardware:
    """The devices training runs (or is planned) on.

    ``cluster.gpus_per_node`` set: hardware described, not detected (planning a cluster from
    a laptop). ``cluster=ray``: read from the connected cluster. Otherwise the local GPUs, or
    CPU workers when there are none; with the CPUs this process may use (``local_cpus``).
    """
    if cluster.kind == "ray" and not cluster.gpus_per_node:
        from launcher.cluster import hardware

        return dataclasses.replace(hardware(cluster), gpu_type=cluster.gpu_type)
    if cluster.gpus_per_node:
        return _described(cluster)
    want_gpu = cluster.use_gpu is True or (cluster.use_gpu == "auto" and torch.cuda.is_available())
    if want_gpu:
        if not torch.cuda.is_available():
            raise ValueError("cluster.use_gpu: true, but torch sees no CUDA device here (use auto or false)")
        count = cluster.num_workers or torch.cuda.device_count()
        memory = cluster.gpu_memory_gb or torch.cuda.get_device_properties(0).total_memory / GB
        name = torch.cuda.get_device_name(0)
        return Hardware(nodes=cluster.nodes, devices_per_node=count, device_memory_gb=memory, gpu_name=name,
                        gpu_type=cluster.gpu_type or gpu_type_of(name, memory), cpus_per_node=local_cpus())  # fmt: skip
    workers = cluster.num_workers or DEFAULT_CPU_WORKERS
    host_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    share = cluster.gpu_memory_gb or host_gb / workers
    return Hardware(nodes=cluster.nodes, devices_per_node=workers, device_memory_gb=share, device="cpu",
                    cpus_per_node=local_cpus())  # fmt: skip


def _described(cluster: Cluster) -> Hardware:
    """``cluster.gpus_per_node`` GPUs per node of ``cluster.gpu_memory_gb`` (or ``gpu_type``'s, or the local
    GPU's); their CPUs are known where they are here: this machine when it has that many GPUs, the
    connected Ray cluster's (a RayJob from ``action=manifest`` runs so); else not (planning from a laptop)."""
    gpus = cluster.gpus_per_node or 0
    memory = cluster.gpu_memory_gb
    if memory is None and cluster.gpu_type is not None:
        memory = GPUS[cluster.gpu_type].memory_gb
    if memory is None and torch.cuda.is_available():
        memory = torch.cuda.get_device_properties(0).total_memory / GB
    if memory is None:
        raise ValueError(
            "cluster.gpu_memory_gb: required when cluster.gpus_per_node describes GPUs that are not "
            "on this machine (e.g. cluster.gpu_memory_gb=80, or cluster.gpu_type=h100)"
        )
    cpus = None
    if cluster.kind == "local" and torch.cuda.device_count() >= gpus:
        cpus = local_cpus()
    elif cluster.kind == "ray" and "ray" in sys.modules and sys.modules["ray"].is_initialized():
        from launcher.cluster import cpus_per_node

        cpus = cpus_per_node(gpus, gpu=True)
    return Hardware(nodes=cluster.nodes, devices_per_node=gpus, device_memory_gb=memory, gpu_type=cluster.gpu_type,
                    cpus_per_node=cpus)  # fmt: skip


def local_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (taskset, cpusets; ``os.cpu_count()`` where
    there is none, as on macOS), within a cgroup v2 CPU quota (a container's ``--cpus``), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, int(quota) // int(period))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def memory_profile(cfg: Config, recipe: Any, hw: Hardware | None = None) -> MemoryProfile:
    """The override where given (both keys may mix with a measurement), else probe, else estimate."""
    override = cfg.planner.memory
    if override.model_gb is not None and override.per_sample_gb is not None:
        return MemoryProfile.from_total(
            override.model_gb,
            override.per_sample_gb,
            source="override",
            detail="planner.memory.model_gb/per_sample_gb; split as fp32 Adam: params 1/4, grads 1/4, moments 1/2",
        )
    measured = estimate(cfg, recipe)
    here = cfg.cluster.kind == "local" and not cfg.cluster.gpus_per_node
    if hw is not None and hw.device == "cuda" and here and torch.cuda.is_available():
        measured = probe(cfg, measured)  # GPUs here, not described: measure them
    if override.model_gb is None and override.per_sample_gb is None:
        return measured
    return _scaled(
        measured,
        override.model_gb or measured.model_gb,
        override.per_sample_gb or measured.per_sample_gb,
        source=f"override+{measured.source}",
        detail=f"planner.memory.{'model_gb' if override.model_gb else 'per_sample_gb'} overridden; "
        f"the rest from the {measured.source} ({measured.detail})",
    )


def _scaled(base: MemoryProfile, model_gb: float, per_sample_gb: float, *, source: str, detail: str) -> MemoryProfile:
    """``base`` with its model states scaled to ``model_gb`` (keeping the params/grads/optimizer split)."""
    k = model_gb / base.model_gb
    return dataclasses.replace(  # the FLOP count and step timing kept
        base,
        params_gb=base.params_gb * k,
        grads_gb=base.grads_gb * k,
        optimizer_gb=base.optimizer_gb * k,
        per_sample_gb=per_sample_gb,
        source=source,
        detail=detail,
    )


PROBE_SIZES = (2, 8)  # micro-batches measured; fit peak = model + n * per_sample


def probe(cfg: Config, est: MemoryProfile) -> MemoryProfile:
    """Peak CUDA memory at two micro-batch sizes, in a child process; the estimate if that fails.

    Cached like the estimate, keyed also by the device name.
    """
    cfg = without_weights(cfg)  # the same shapes and memory whichever file a run starts from
    name = torch.cuda.get_device_name(0)
    cache = _cache_path(cfg, "probe", name)
    if cache.exists():
        return MemoryProfile(**json.loads(cache.read_text()))
    try:
        child = subprocess.run(
            [sys.executable, "-m", "launcher.memory"],
            input=json.dumps(to_dict(cfg)),
            capture_output=True,
            text=True,
            timeout=600,
        )
    except subprocess.TimeoutExpired:
        return _with_note(est, "the GPU probe timed out after 600 s")
    if child.returncode != 0:
        return _with_note(est, f"the GPU probe failed: {child.stderr.strip().splitlines()[-1:]}")
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    peaks = {int(n): v for n, v in measured["peak"].items()}
    if "oom" in peaks.values() or len(peaks) < 2:
        return _with_note(est, f"the GPU probe ran out of memory ({peaks})")
    (a, pa), (b, pb) = sorted(peaks.items())
    per_sample = max(pb - pa, 1) / (b - a)
    fixed = max(pa - a * per_sample, 1)
    profile = _scaled(
        est,
        fixed / GB,
        per_sample / GB,
        source="probe",
        detail=f"peak CUDA memory on {name} over 2 optimizer steps at micro-batch {a} ({pa / GB:.3g} GB) and "
        f"{b} ({pb / GB:.3g} GB), fitted linearly; params/grads/optimizer split as counted",
    )
    profile = dataclasses.replace(profile, **_step_fit({int(n): t for n, t in measured["step_s"].items()}, name))
    _write(cache, profile)
    return profile


def _step_fit(step_s: dict[int, float], name: str) -> dict[str, Any]:
    """``MemoryProfile``'s step-time fields from the probe's timed steps: t(n) = fixed + n x per_sample."""
    (a, ta), (b, tb) = sorted(step_s.items())
    per_sample = max(tb - ta, 0.0) / (b - a)
    fixed = max(ta - a * per_sample, 0.0)
    if per_sample <= 0:
        return {"step_detail": f"the probe's step times on {name} did not grow with the micro-batch ({step_s})"}
    return {
        "step_s_fixed": fixed,
        "step_s_per_sample": per_sample,
        "step_detail": f"the second optimizer step on {name} took {ta:.3g} s at micro-batch {a} and {tb:.3g} s "
        f"at {b}, fitted linearly",
    }


def _with_note(est: MemoryProfile, note: str) -> MemoryProfile:
    return dataclasses.replace(est, detail=f"{est.detail}; {note}")


def _probe_here(cfg: Config) -> dict[str, dict[int, float | str]]:
    """In the child: a few real optimizer steps per size on cuda:0; peak bytes, or "oom", and the seconds
    of the second step (the first allocates the optimizer state and warms the kernels up)."""
    from launcher.step import autocast
    from recipes import RECIPES

    recipe = RECIPES[cfg.recipe.name]
    device = torch.device("cuda", 0)
    model = recipe.build_model(cfg).to(device)
    states = OPTIMIZER_STATES[cfg.recipe.reference.optimizer]
    opt = torch.optim.AdamW(model.parameters()) if states == 2 else torch.optim.SGD(model.parameters(), momentum=0.9)
    peaks: dict[int, float | str] = {}
    step_s: dict[int, float | str] = {}
    for n in PROBE_SIZES:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            for _ in range(2):  # the second step runs with optimizer state allocated
                batch = {k: v.to(device) for k, v in recipe.example_batch(cfg, n).items()}
                torch.cuda.synchronize(device)
                start = time.perf_counter()
                with autocast(device, cfg.train.precision):
                    out = model(batch)
                sum(out.values()).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                torch.cuda.synchronize(device)
                step_s[n] = time.perf_counter() - start
            peaks[n] = float(torch.cuda.max_memory_allocated(device))
        except torch.OutOfMemoryError:
            peaks[n] = "oom"
            break
    return {"peak": peaks, "step_s": step_s}


CACHE_VERSION = 5  # bumped when the estimate or probe method changes, so no stale profile is read

OPTIMIZER_STATES = {"sgd": 1, "adamw": 2, "lamb": 2, "lars": 1}  # fp32 tensors per parameter


def estimate(cfg: Config, recipe: Any) -> MemoryProfile:
    """Device-free estimate from the recipe's model and a synthetic batch, cached per model.

    The cache (``$LAUNCHER_CACHE`` or ``~/.cache/launcher``) is keyed by the recipe section
    of the config, ``train.precision`` and the torch version, so a rerun or a different cluster shape is instant.
    """
    cfg = without_weights(cfg)  # the same shapes and memory whichever file a run starts from; no file read
    cache = _cache_path(cfg, "memory")
    if cache.exists():
        return MemoryProfile(**json.loads(cache.read_text()))
    optimizer = cfg.recipe.reference.optimizer
    model = recipe.build_model(cfg)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    states = OPTIMIZER_STATES[optimizer] * trainable
    per_sample, flops, flops_detail = _trace(model, recipe, cfg)
    profile = MemoryProfile(
        params_gb=params / GB,
        grads_gb=trainable / GB,
        optimizer_gb=states / GB,
        per_sample_gb=max(per_sample, 1) / GB,
        source="estimate",
        detail=(
            f"device-free: {params / GB:.3g} GB params, {trainable / GB:.3g} GB grads, {states / GB:.3g} GB "
            f"{optimizer} state (fp32); activations autograd saves per sample, traced on CPU at the recipe's "
            "full input size in fp32 (temporaries not counted: planner.headroom covers them)"
        ),
        flops_per_sample=flops,
        flops_detail=flops_detail,
    )
    _write(cache, profile)
    return profile


def _cache_path(cfg: Config, kind: str, *extra: str) -> Path:
    """``$LAUNCHER_CACHE`` (or ~/.cache/launcher) / kind-<hash of the recipe section (its reference optimizer
    too), train.precision, torch, extra>.json."""
    key = hashlib.sha256(
        json.dumps(
            [CACHE_VERSION, cfg.recipe.name, dataclasses.asdict(cfg.recipe), cfg.train.precision,
             torch.__version__, *extra],
            sort_keys=True,
            default=str,
        ).encode()
    ).hexdigest()[:16]
    return Path(os.environ.get("LAUNCHER_CACHE", Path.home() / ".cache" / "launcher")) / f"{kind}-{key}.json"


def _write(cache: Path, profile: MemoryProfile) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(profile)))
    tmp.replace(cache)


class SavedBytes:
    """Bytes autograd saves for backward (a ``saved_tensors_hooks`` pack hook), each tensor once:
    a ReLU output that the next layer also saves counts once; a view counts the bytes it spans;
    parameters (``skip``) do not count."""

    def __init__(self, skip: Iterable[torch.Tensor] = ()) -> None:
        self.skip = {p.data_ptr() for p in skip}
        self.seen: set[tuple[int, ...]] = set()
        self.total = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            ptr = t.data_ptr()
        except RuntimeError:  # sparse or storage-less: no address to share
            ptr = 0
        if ptr and ptr in self.skip:
            return t
        key = (ptr, t.numel(), t.element_size()) if ptr else (id(t),)
        if key not in self.seen:
            self.seen.add(key)
            self.total += t.numel() * t.element_size()
        return t


def _activations_per_sample(model: nn.Module, recipe: Any, cfg: Config) -> float:
    """Bytes autograd saves for backward, per sample (``_trace``'s first figure)."""
    return _trace(model, recipe, cfg)[0]


def _cpu_sdpa_flops(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of the CPU kernel of ``scaled_dot_product_attention``, which torch's counter does not list."""
    from torch.utils.flop_counter import sdpa_flop_count

    return int(sdpa_flop_count(q, k, v))


def _trace(model: nn.Module, recipe: Any, cfg: Config) -> tuple[float, float | None, str]:
    """Per sample, from a training-mode CPU forward at micro-batch 1 and 2 (2 and 4 for a model that refuses
    one sample): the bytes autograd saves for backward, ``f(2) - f(1)``, at least ``f(2) / 2``; the FLOPs
    of forward + backward, counted alike with ``FlopCounterMode`` (backward = 2x forward: a gradient for
    the input and one for the weight per matmul); and how they were counted (or why not: then None).

    Each saved tensor counted once (``SavedBytes``): a ReLU output that the next layer also
    saves is one tensor, not two.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops})  # fmt: skip

    def saved_bytes(n: int) -> tuple[int, int]:
        saved = SavedBytes(model.parameters())
        batch = recipe.example_batch(cfg, n)
        model.train()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t), counter:
            out = model(batch)  # kept until counted, so no saved tensor's address is reused meanwhile
        del out
        return saved.total, counter.get_total_flops()

    # micro-batch 1 and 2 (half the work of 2 and 4 at the same answer: the bytes grow linearly);
    # 2 and 4 when the model refuses a single sample (BatchNorm on one value per channel)
    try:
        n, (small, f_small), (big, f_big) = 1, saved_bytes(1), saved_bytes(2)
    except ValueError:
        n, (small, f_small), (big, f_big) = 2, saved_bytes(2), saved_bytes(4)
    forward = max((f_big - f_small) / n, f_big / (2 * n))
    bytes_per_sample = float(max((big - small) / n, math.ceil(big / (2 * n))))
    if forward <= 0:
        return bytes_per_sample, None, "the FLOP counter found no matmul or convolution in the model's forward"
    detail = (
        f"{3 * forward / 1e9:.4g} GFLOP/sample = 3 x {forward / 1e9:.4g} GFLOP forward (FlopCounterMode on a CPU "
        "forward at the recipe's full input size; backward = 2x forward, frozen layers counted as trained)"
    )
    return bytes_per_sample, 3 * forward, detail


if __name__ == "__main__":  # the probe's child process: config JSON in, {size: peak bytes} JSON out
    print(json.dumps(_probe_here(validate(json.loads(sys.stdin.read())))))
