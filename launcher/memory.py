"""What the planner needs to know about memory: the hardware and the memory profile.

The profile comes from, in order of preference:

1. the user's override (``planner.memory.model_gb`` / ``planner.memory.per_sample_gb``);
2. a probe on the real device, when training runs on local CUDA GPUs: a few optimizer
   steps at two micro-batch sizes in a child process (so the driver never holds a CUDA
   context), peak memory fitted linearly; an OOM stays in the child. Cached per model,
   device and torch version, and shipped to every rank inside the plan, so all agree;
3. a device-free estimate: the peak of one training step's memory timeline (parameters, optimizer state,
   activations, gradients and temporaries, each alive from the op that makes it until it is freed), traced
   under ``FakeTensorMode`` (shapes, no data, no compute: seconds even for Mask R-CNN at 800 px) at two
   micro-batch sizes and fitted linearly; cached.

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
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
    unset_fake_temporarily,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from launcher.config import Cluster, Config, to_dict, validate
from launcher.devices import GPUS, gpu_type_of
from launcher.planner import MICRO_BATCH_LIMIT, Hardware, MemoryProfile
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


CACHE_VERSION = 9  # bumped when the estimate or probe method changes, so no stale profile is read

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
    model = recipe.trace_model(cfg)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    states = OPTIMIZER_STATES[optimizer] * trainable
    try:
        peaks, flops, flops_detail = _trace(model, recipe, cfg, params + trainable + states)
    except (DynamicOutputShapeException, DataDependentOutputException) as e:
        raise ValueError(
            f"planner.memory.model_gb and planner.memory.per_sample_gb: the memory estimate traces recipe "
            f"{cfg.recipe.name}'s model under fake tensors (shapes, no values), and it picks a size from a value "
            f"only a real run has ({e.func}); give both keys (a measured profile), or give the recipe a "
            "trace_model that takes the largest such size (as recipes/coco.py does)"
        ) from None
    (a, pa), (b, pb) = sorted(peaks.items())
    per_sample = max(pb - pa, 1) / (b - a)
    fixed = max(pa - a * per_sample, 1)
    counted = MemoryProfile(params_gb=params / GB, grads_gb=trainable / GB, optimizer_gb=states / GB,
                            per_sample_gb=per_sample / GB, source="estimate")  # fmt: skip
    profile = _scaled(
        counted,
        fixed / GB,
        per_sample / GB,
        source="estimate",
        detail=(
            f"device-free: the peak of one training step's memory timeline (forward, backward, {optimizer} step "
            f"with its state allocated; {_optimizer_name(optimizer)} as torch runs it on CPU), traced in fp32 under "
            f"fake tensors at micro-batch {a} ({pa / GB:.3g} GB) and {b} ({pb / GB:.3g} GB), fitted linearly: "
            f"{fixed / GB:.3g} GB fixed (split as the counted {params / GB:.3g} GB params : {trainable / GB:.3g} GB "
            f"grads : {states / GB:.3g} GB {optimizer} state), {per_sample / GB:.3g} GB per sample, CPU convolutions' "
            "scratch included; DDP's gradient buckets, gradients kept across accumulation micro-steps and other "
            "kernels' workspaces (cuDNN's) not traced: planner.headroom covers them"
        ),
    )
    profile = dataclasses.replace(profile, flops_per_sample=flops, flops_detail=flops_detail)
    _write(cache, profile)
    return profile


def _optimizer_name(optimizer: str) -> str:
    return "AdamW" if OPTIMIZER_STATES[optimizer] == 2 else "SGD with momentum"


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


class Timeline(TorchDispatchMode):
    """The bytes of live tensor storages after every op, and their peak: a training step's memory timeline.

    Above a ``FakeTensorMode``: an op whose tensors are all real (the batch and what is computed from it
    alone: masks, image sizes, box targets; constants) runs for real, so code that branches on the batch's
    values traces; an op touching a fake tensor (a parameter, an activation) runs fake: shapes, no data, no
    compute. A boolean mask from the batch indexing a fake tensor is turned into its (real) indices first,
    so the result's size is known. Each storage counts once (a view adds nothing), real or fake, from the
    op that made it until it is freed (``track`` adds tensors made before the step: parameters, optimizer
    state, the batch). A convolution adds the scratch it makes and frees inside itself on CPU (``_SCRATCH``)
    to the peak. ``torch.distributed._tools.mem_tracker.MemTracker`` keeps the same timeline of tensors and
    more (per-module snapshots): the same peaks without the scratch, 6 to 7 times slower, and it stops on
    frozen parameters (docs/planner.md, "The memory estimate").
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage in self._seen:
            return
        self._seen[storage] = True
        nbytes = storage.nbytes()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, nbytes)

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if not any(isinstance(t, FakeTensor) for t in tree_leaves((args, kwargs))):
            with unset_fake_temporarily():
                out = func(*args, **kwargs)
        else:
            if func in _INDEXING:
                args = (args[0], _indices(args[1]), *args[2:])
            out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        if func in _SCRATCH:  # memory an op makes and frees inside itself: no tensor of the timeline shows it
            self.peak = max(self.peak, self.live + _SCRATCH[func](args, out))
        return out


def _nbytes(t: Any) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _convolution_scratch(args: tuple[Any, ...], out: Any) -> int:
    """``aten.convolution``'s scratch on CPU (oneDNN): the weight and the larger of input and output copied into
    oneDNN's blocked layout; a transposed convolution (a convolution's backward pass): the output and the larger
    of input and output."""
    x, w, transposed = args[0], args[1], args[6]
    if transposed:
        return _nbytes(out) + max(_nbytes(x), _nbytes(out))
    return _nbytes(w) + max(_nbytes(x), _nbytes(out))


def _convolution_backward_scratch(args: tuple[Any, ...], out: Any) -> int:
    """``aten.convolution_backward``'s scratch on CPU (oneDNN): the weight's copy, or the blocked copies of the
    input's gradient and the output's gradient (a strided convolution: of the input's gradient twice, when
    larger), whichever is more. Without an input gradient (a first layer, or the first after frozen ones) the
    weight's gradient reads blocked copies of the input and the output's gradient, the input as it is when it
    has 3 channels or fewer (an image). An output's gradient not laid out as the input (a view: a ``sum``'s
    expand, a patch embedding's transpose) is copied once more."""
    grad_out, x, w, stride, grad_in_wanted = args[0], args[1], args[2], args[4], args[-1][0]
    g = _nbytes(grad_out)
    relayout = 0 if grad_out.is_contiguous(memory_format=_layout(x)) else g
    if not grad_in_wanted:
        return relayout + max(_nbytes(w), g + (_nbytes(x) if x.shape[1] > 3 else 0))
    grad_in = _nbytes(x)
    return relayout + max(_nbytes(w), grad_in + max(g, grad_in if max(stride) > 1 else 0))


def _layout(x: torch.Tensor) -> torch.memory_format:
    """The memory format oneDNN keeps for a convolution's input: channels-last when the input is (and is not also
    contiguous, as a 1x1 image is), else contiguous."""
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


# Measured with torch's profiler (profile_memory=True: it sees allocations inside an op) on torch 2.14's CPU
# kernels, 1 and 2 threads, 19 ResNet-shaped convolutions and 6 others (two transposed, depthwise, 1-D, 3-D,
# Mask R-CNN's mask head): the forward's scratch within 4% in all of them, the backward's within 5% in 21 (at
# most 4.6% under), 9 to 58% over in 4 strided ones; 11 without an input gradient within 0.3 MB; whole steps
# with a sum's expanded or a transposed gradient within 0.5%; docs/planner.md, "Kernel scratch". A GPU's cuDNN
# workspaces differ: the GPU probe measures them, the headroom covers the rest.
_SCRATCH: dict[Any, Callable[[tuple[Any, ...], Any], int]] = {
    torch.ops.aten.convolution.default: _convolution_scratch,
    torch.ops.aten.convolution_backward.default: _convolution_backward_scratch,
}
_INDEXING = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default,
             torch.ops.aten._index_put_impl_.default}  # fmt: skip


def _indices(index: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """``index`` with each real boolean mask replaced by its indices (one tensor per masked dimension)."""
    out: list[torch.Tensor | None] = []
    for i in index:
        if i is not None and i.dtype == torch.bool and not isinstance(i, FakeTensor):
            with unset_fake_temporarily():
                out.extend(i.nonzero().unbind(1))
        else:
            out.append(i)
    return out


def _fake(model: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """``model`` with fake parameters and buffers (same shapes, no data), a tied parameter still tied."""
    fakes: dict[nn.Parameter, nn.Parameter] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                if p not in fakes:
                    fakes[p] = nn.Parameter(mode.from_tensor(p), requires_grad=p.requires_grad)
                module._parameters[name] = fakes[p]
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = mode.from_tensor(b)
    return model


def _cpu_sdpa_flops(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of the CPU kernel of ``scaled_dot_product_attention``, which torch's counter does not list."""
    from torch.utils.flop_counter import sdpa_flop_count

    return int(sdpa_flop_count(q, k, v))


def _stepped_optimizer(model: nn.Module, cfg: Config, mode: FakeTensorMode) -> tuple[Any, list[torch.Tensor]]:
    """The recipe's kind of optimizer on ``model``'s trained (fake) parameters with its state allocated, as
    after the first step; and every tensor that lives through a step (parameters, buffers, that state)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    states_per_param = OPTIMIZER_STATES[cfg.recipe.reference.optimizer]
    opt = torch.optim.AdamW(trained) if states_per_param == 2 else torch.optim.SGD(trained, lr=0.1, momentum=0.9)
    with mode:
        for p in trained:
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
    before = [*model.parameters(), *model.buffers()]
    before += [v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return opt, before


def _trace(model: nn.Module, recipe: Any, cfg: Config, states: int) -> tuple[dict[int, float], float | None, str]:
    """The peak bytes of one training step at two micro-batch sizes, traced under ``FakeTensorMode``
    (``Timeline``); the forward + backward FLOPs of one sample; and how they were counted (or why not: None).

    The step is the launcher's after its first: forward and backward with no gradients allocated yet (the
    previous step set them to None), then the optimizer step with its state already there. Sizes: first
    1 (2 for a model that refuses one sample, as BatchNorm on one value per channel does), which gives the
    bytes the forward keeps per sample; then the sizes where the forward keeps half and four times ``states``
    (the model states' bytes; at least twice the first): the range where a memory bound lands when the
    activations, not the optimizer step, set the peak. The peak is a maximum over the step's events, so
    it bends up where one event takes over from another; a line through two sizes is exact inside that
    range and a little low outside it (0.5% on the CPU benchmarks, docs/planner.md). FLOPs:
    ``FlopCounterMode`` on the forwards of the two fitted sizes, the growth per sample; backward = 2x forward.
    """
    from torch.utils.flop_counter import FlopCounterMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = _fake(model, mode)
    model.train()
    opt, before = _stepped_optimizer(model, cfg, mode)
    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops})  # fmt: skip

    def step(n: int) -> tuple[int, int, int]:
        """(peak bytes, bytes the forward keeps, forward FLOPs) at micro-batch ``n``."""
        batch = recipe.example_batch(cfg, n)
        timeline = Timeline()
        for t in [*before, *batch.values()]:
            timeline.track(t)
        start = timeline.live
        with mode, timeline:
            with counter:
                out = model(batch)
            kept = timeline.live - start
            sum(out.values()).backward()
            del out
            opt.step()
            opt.zero_grad(set_to_none=True)
        return timeline.peak, kept, counter.get_total_flops()

    try:
        first = 1, step(1)
    except ValueError:  # one sample refused (BatchNorm in training)
        first = 2, step(2)
    base, (_, kept, _) = first
    per_sample = max(kept, 1) / base  # bytes the forward keeps per sample
    a = max(base, min(MICRO_BATCH_LIMIT, math.ceil(states / per_sample / 2)))
    b = max(2 * a, min(MICRO_BATCH_LIMIT, math.ceil(4 * states / per_sample)))
    small = first if a == base else (a, step(a))
    big = b, step(b)
    peaks = {size: float(peak) for size, (peak, _, _) in (small, big)}
    (a, (_, _, fa)), (b, (_, _, fb)) = small, big
    return (peaks, *_flops(a, fa, b, fb))


def _flops(a: int, fa: int, b: int, fb: int) -> tuple[float | None, str]:
    """Training FLOPs per sample from the forward FLOPs ``fa``, ``fb`` at micro-batches ``a`` < ``b``, and
    how they were counted (or why not: None)."""
    forward = max((fb - fa) / (b - a), fb / (2 * b))
    if forward <= 0:
        return None, "the FLOP counter found no matmul or convolution in the model's forward"
    return 3 * forward, (
        f"{3 * forward / 1e9:.4g} GFLOP/sample = 3 x {forward / 1e9:.4g} GFLOP forward (FlopCounterMode on the "
        f"memory trace's forwards at micro-batch {a} and {b}, the recipe's full input size; backward = 2x "
        "forward, frozen layers counted as trained)"
    )


if __name__ == "__main__":  # the probe's child process: config JSON in, {size: peak bytes} JSON out
    print(json.dumps(_probe_here(validate(json.loads(sys.stdin.read())))))
