"""Pure planning: memory -> micro-batch/accumulation -> lr/warmup/steps -> optimizer/norm/ZeRO.

No torch, Ray, MLflow, Hydra, files or clocks: a ``Request`` (what the task asks for), a
``Hardware`` (what it runs on) and a ``MemoryProfile`` (what one sample and the model cost)
go in, a ``Plan`` with one human reason per decision comes out. ``docs/planner.md``
tabulates every rule with its source.

The arithmetic, in one place:

    usable     = device_memory * (1 - headroom)
    state      = model states per device (params + grads + optimizer; ZeRO shards some)
    max_micro  = floor((usable - state) / per_sample)        [2^k below it if power_of_two; <= 2^16]
    global     = micro * accum * world                        [exact whenever possible]
    shares     = ceil(G / world) or floor(G / world) per rank [ddp, when no split is exact: G kept]
    lr         = lr_ref * (global / global_ref)               [linear; sqrt: ** 0.5; none: 1]
    max_steps  = ceil(max_steps_ref * global_ref / global)    [same samples seen]
    warmup     = round(warmup_ref * global_ref / global)      [same warmup samples]
    step_time  = ceil(global / world) * flops_per_sample / (peak * mfu)   [or the GPU probe's measured step]
    time_h     = max_steps * step_time / 3600;  gpu_hours = time_h * world;  cost = gpu_hours * gpu_hour_usd
    cpus       = node_cpus // workers_on_node;  loaders = cpus - 1 (GPU) or 0 (CPU);  threads = cpus - loaders
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from launcher.config import Anchor as Anchor  # re-exported: the planner's input types are the config's
from launcher.config import Config, schema_field
from launcher.config import Reference as Reference
from launcher.devices import GPUS

EPS = 1e-9  # guards floor() against binary fractions: (8 - 1) / 0.07 is 99.99999999999999
MICRO_BATCH_LIMIT = 1 << 16  # the largest micro-batch considered: the split's search is linear in it


class PlanError(ValueError):
    """A request that cannot be planned; each line names the config key to change."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("cannot plan:\n" + "\n".join(f"  - {e}" for e in errors))


def _default(key: str) -> Any:
    """A config key's default, read from the schema in launcher/config.py (never restated here)."""
    return schema_field(key).default


@dataclass(frozen=True, kw_only=True)
class Request:
    """What the task asks for. Each field names its config key; a field with a config default
    takes it from the schema (``request_from_config`` fills all of them from a config). ``None``
    means "not pinned": the planner decides (``auto`` or ``null`` in the config)."""

    reference: Reference
    global_batch: int | None = None  # batch.global_batch (None: the reference's)
    micro_batch: int | None = None  # batch.micro_batch (None = auto)
    scale_with_world: bool = _default("batch.scale_with_world")
    lr: float | None = _default("optim.lr")  # pins
    lr_rule: str = _default("planner.lr_rule")
    warmup_steps: int | None = _default("train.warmup_steps")  # pins
    max_steps: int | None = _default("train.max_steps")  # pins
    max_epochs: float | None = _default("train.max_epochs")  # needs dataset_size
    dataset_size: int | None = None  # training samples per epoch, when known
    weight_decay: float | None = _default("optim.weight_decay")
    headroom: float = _default("planner.headroom")
    power_of_two: bool = _default("planner.power_of_two")
    bn_min_group: int = _default("planner.bn_min_group")
    engine: str = _default("engine.name")
    zero_stage: int | None = None  # engine.zero_stage (None = auto)
    grad_clip: float | None = _default("train.grad_clip")  # for the DeepSpeed config
    precision: str = _default("train.precision")  # auto (bf16 on CUDA) | fp32 | bf16
    auto_noise_scale: bool = False  # batch.global_batch=auto_noise_scale: the measured critical batch
    advise: bool = _default("planner.advise")
    noise_scale: float | None = None  # the last measured B_simple of this recipe (MLflow), if any
    noise_source: str = ""  # where it was measured (run, step)
    mfu: float = _default("planner.mfu")  # assumed share of the peak FLOP/s a step reaches
    gpu_hour_usd: float | None = _default("cluster.gpu_hour_usd")  # set: the plan shows the cost
    cpus_per_worker: int | None = None  # cluster.cpus_per_worker (None = auto)
    loader_workers: int | None = None  # data.num_workers (None = auto)


@dataclass(frozen=True, kw_only=True)
class Hardware:
    nodes: int
    devices_per_node: int
    device_memory_gb: float
    device: str = "cuda"  # cuda | cpu
    gpu_type: str | None = None  # a key of launcher/devices.py GPUS (cluster.gpu_type, or the GPU's own name)
    gpu_name: str = ""  # the local GPU's own name (torch.cuda.get_device_name), when one is here
    # CPUs of a node for its workers (a cluster's: a node of this shape at the fewest CPUs per device
    # among its nodes); None: not known (hardware described, not detected)
    cpus_per_node: int | None = None

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    def with_world(self, world: int) -> Hardware:
        """The same devices, ``world`` of them: whole nodes where it fills them, else one row of ``world``
        with those devices' CPUs (so each device keeps its share: the CPU budget does not change)."""
        if world % self.devices_per_node == 0:
            return replace(self, nodes=world // self.devices_per_node)
        cpus = None if self.cpus_per_node is None else max(1, self.cpus_per_node * world // self.devices_per_node)
        return replace(self, nodes=1, devices_per_node=world, cpus_per_node=cpus)


@dataclass(frozen=True, kw_only=True)
class MemoryProfile:
    """Bytes one device needs, in GB: model states split three ways, and one sample."""

    params_gb: float
    grads_gb: float
    optimizer_gb: float
    per_sample_gb: float
    source: str  # override | probe | estimate
    detail: str = ""
    # what a training step costs in compute, where it was counted or measured (None: not known)
    flops_per_sample: float | None = None  # forward + backward FLOPs of one sample (the estimate counts them)
    flops_detail: str = ""  # how they were counted, or why they were not
    step_s_fixed: float | None = None  # the GPU probe: seconds of one optimizer step at micro-batch 0 (fitted)
    step_s_per_sample: float | None = None  # the GPU probe: seconds each sample adds to a step (fitted)
    step_detail: str = ""  # where and how the step was timed

    @property
    def model_gb(self) -> float:
        return self.params_gb + self.grads_gb + self.optimizer_gb

    @classmethod
    def from_total(cls, model_gb: float, per_sample_gb: float, source: str, detail: str = "") -> MemoryProfile:
        """Split a total the way fp32 Adam does (params 1 : grads 1 : two moments 2)."""
        return cls(
            params_gb=model_gb / 4,
            grads_gb=model_gb / 4,
            optimizer_gb=model_gb / 2,
            per_sample_gb=per_sample_gb,
            source=source,
            detail=detail or "total split as fp32 Adam: params 1/4, grads 1/4, moments 1/2",
        )


@dataclass(frozen=True, kw_only=True)
class CpuBudget:
    """The CPUs of one training worker and how it spends them (``cpu_budget``)."""

    cpus_per_worker: int  # reserved from Ray for each training worker (ScalingConfig's resources_per_worker)
    loader_workers: int  # DataLoader worker processes of each training worker
    torch_threads: int  # torch.set_num_threads in each training process
    node_cpus: int | None  # the node's CPUs it was planned from (None: not known here, hardware described)
    reason: str


def cpu_budget(
    node_cpus: int | None,
    workers_on_node: int,
    device: str,
    *,
    cpus_per_worker: int | None = None,
    loader_workers: int | None = None,
) -> CpuBudget:
    """Each training worker's CPUs: how many Ray reserves for it, how many DataLoader processes it
    starts, how many threads torch uses in it. ``None`` for a setting is ``auto``.

        share   = cluster.cpus_per_worker, or node_cpus // workers_on_node (at least 1; 1 when the
                  node's CPUs are not known, i.e. described hardware: planned again where it trains)
        loaders = data.num_workers, or on GPUs share - 1: one CPU for the training process, the rest
                  decode and augment so the GPU does not wait; on CPUs 0: the training process is the
                  compute, and loading in it costs the step less than a CPU taken from its threads
        threads = share - loaders, at least 1 (a DataLoader process runs 1 thread: torch's default there)

    16 CPUs, 1 GPU: 16, 15 loaders, 1 thread. 64 CPUs, 8 GPUs: 8, 7, 1. 2 CPUs, 2 CPU workers: 1, 0, 1.
    16 CPUs, 2 CPU workers: 8, 0, 8.
    """
    auto = "(cluster.cpus_per_worker=auto)"
    if cpus_per_worker is not None:
        share, why = cpus_per_worker, f"{cpus_per_worker} (cluster.cpus_per_worker)"
    elif node_cpus is None:
        share, why = 1, "1 (cluster.cpus_per_worker=auto; the hardware is described: its CPUs are read where it trains)"
    else:
        share = max(1, node_cpus // workers_on_node)
        why = f"{share} = {node_cpus} CPUs of a node // {workers_on_node} worker(s) on it {auto}"
    if loader_workers is not None:
        loaders, how = loader_workers, f"{loader_workers} (data.num_workers)"
    elif device == "cuda":
        loaders = share - 1
        how = f"{loaders} = {share} - 1 for the training process: the rest decode for the GPU (data.num_workers=auto)"
    else:
        loaders, how = 0, "0: the CPU workers compute, and load between steps (data.num_workers=auto)"
    threads = max(1, share - loaders)
    reason = (
        f"CPUs per worker {why}, reserved from Ray; DataLoader processes {how}; torch threads {threads} = "
        f"{share} - {loaders} loader(s), at least 1"
    )
    if node_cpus is not None and share * workers_on_node > node_cpus:
        reason += (
            f"; warning: {workers_on_node} workers x {share} CPU(s) > the node's {node_cpus} CPUs: oversubscribed "
            "(a Ray cluster may not place them all on one node)"
        )
    if loaders + 1 > share:
        reason += f"; warning: {loaders} loader process(es) and the training process on {share} CPU(s)"
    return CpuBudget(cpus_per_worker=share, loader_workers=loaders, torch_threads=threads, node_cpus=node_cpus,
                     reason=reason)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Plan:
    """The planner's answer, frozen: a later note makes a new plan (``with_reasons``, ``with_notes``)."""

    world_size: int
    device: str  # cuda | cpu: what the workers train on
    micro_batch: int
    grad_accum: int
    global_batch: int
    target_global_batch: int
    max_micro_batch: int
    lr: float
    lr_rule: str
    warmup_steps: int
    max_steps: int
    schedule: str
    milestones: list[int]
    optimizer: str
    weight_decay: float
    norm: str
    zero_stage: int
    engine: str
    memory: dict[str, Any]
    cpus: CpuBudget  # each worker's CPUs: reserved from Ray, DataLoader processes, torch threads
    reasons: tuple[str, ...] = ()  # one per decision, in the order the rules ran
    deepspeed: dict[str, Any] | None = None
    notes: tuple[str, ...] = ()  # added by the driver after planning (a resume); printed after the reasons
    step_time_s: float | None = None  # one optimizer step (None: not estimated; the reasons say why)
    time_to_train_h: float | None = None  # max_steps x step_time_s
    gpu_hours: float | None = None  # time_to_train_h x world_size
    cost_usd: float | None = None  # gpu_hours x cluster.gpu_hour_usd, when a price is given
    time_basis: str = ""  # the figure the step time comes from, in a few words

    def with_reasons(self, *reasons: str) -> Plan:
        """This plan with more reasons (e.g. the DeepSpeed config check)."""
        return replace(self, reasons=(*self.reasons, *reasons))

    def with_notes(self, *notes: str) -> Plan:
        """This plan with more notes (e.g. what a resume keeps and changes)."""
        return replace(self, notes=(*self.notes, *notes))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, not tuples): what workers, MLflow and ``plan.format=json`` get."""
        d = asdict(self)
        d["reasons"], d["notes"] = list(self.reasons), list(self.notes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        """The inverse of ``to_dict``, also after JSON; lists or tuples; no ``notes``: none."""
        return cls(
            **{
                **d,
                "milestones": list(d["milestones"]),
                "cpus": CpuBudget(**d["cpus"]),
                "reasons": tuple(d.get("reasons", ())),
                "notes": tuple(d.get("notes", ())),
            }
        )


# ---------------------------------------------------------------------------------------


def check(req: Request, hw: Hardware) -> None:
    """The planner's errors that need neither a memory profile nor the dataset size, all at once.

    Both take a while to get (a model traced, a tokenizer trained), so the driver calls this
    first: the inputs, and the target global batch against the world size (when its own inputs
    are valid, and unless it is ``auto_noise_scale`` without its measurement yet). ``plan`` runs
    the same checks.
    """
    errors = _request_errors(req, hw)
    target_known = (
        hw.nodes > 0 and hw.devices_per_node > 0 and req.reference.global_batch > 0
        and (req.global_batch is None or req.global_batch >= 1)
        and not (req.auto_noise_scale and req.noise_scale is None)
    )
    if target_known:
        try:
            _target_global(req, hw.world_size, [])
        except PlanError as e:
            errors += e.errors
    if errors:
        raise PlanError(errors)


def plan(req: Request, hw: Hardware, mem: MemoryProfile) -> Plan:
    """Plan a task on hardware; every number in the result has a reason.

    The dataset size (``req.dataset_size``) only sets ``max_steps`` (epochs -> steps) and what
    follows from it (warmup, milestones), and no error depends on it: a request without it fails
    exactly where one with it would. So the driver plans once without it, before building any
    data, and again with the size it counted.
    """
    _check_inputs(req, hw, mem)
    ref = req.reference
    world = hw.world_size
    reasons = [f"world size {world} = {hw.nodes} node(s) x {hw.devices_per_node} {hw.device} device(s)"]

    target = _target_global(req, world, reasons)
    zero = _zero_stage(req, hw, mem, reasons)
    state_gb = _state_per_device(mem, zero, world)
    usable = hw.device_memory_gb * (1 - req.headroom)
    max_micro = _max_micro(req, hw, mem, state_gb, usable, reasons)
    micro, accum, global_batch = _split(req, target, world, max_micro, reasons)
    lr, rule = _lr(req, global_batch, reasons)
    max_steps = _max_steps(req, global_batch, reasons)
    warmup = _warmup(req, global_batch, max_steps, lr, rule, reasons)
    optimizer = _optimizer(req, global_batch, reasons)
    norm = _norm(req, micro, world, hw.device, reasons)
    _advice(req, global_batch, reasons)
    milestones = _milestones(req, max_steps, reasons)
    timing = _time(req, hw, mem, global_batch, accum, max_steps, reasons)
    cpus = cpu_budget(hw.cpus_per_node, hw.devices_per_node, hw.device, cpus_per_worker=req.cpus_per_worker,
                      loader_workers=req.loader_workers)  # fmt: skip
    reasons.append(cpus.reason)
    return Plan(
        world_size=world,
        device=hw.device,
        micro_batch=micro,
        grad_accum=accum,
        global_batch=global_batch,
        target_global_batch=target,
        max_micro_batch=max_micro,
        lr=lr,
        lr_rule=rule,
        warmup_steps=warmup,
        max_steps=max_steps,
        schedule=ref.schedule,
        milestones=milestones,
        optimizer=optimizer,
        weight_decay=_weight_decay(req),
        norm=norm,
        zero_stage=zero,
        engine=req.engine,
        memory=_memory_record(req, hw, mem, usable, state_gb),
        cpus=cpus,
        reasons=tuple(reasons),
        deepspeed=_deepspeed(req, hw, global_batch, micro, accum, zero) if req.engine == "deepspeed" else None,
        **timing,
    )


def advice(global_batch: int, noise_scale: float) -> str:
    """What the measured critical batch B_noise means for a global batch B (McCandlish et al. 2018, eq. 2.11).

    Steps to a given loss S = S_min (1 + B_noise / B); samples to it E = E_min (1 + B / B_noise).
    """
    ratio = global_batch / noise_scale
    head = (
        f"global batch {global_batch} is {ratio:.2g}x the measured critical batch {noise_scale:.0f}: "
        f"about {1 + 1 / ratio:.2f}x the fewest possible steps and {1 + ratio:.2f}x the fewest samples "
        "to the same loss"
    )
    if ratio >= 2:
        return head + (
            "; well above it, a bigger batch (more devices) barely cuts the steps and mostly spends compute, "
            f"a batch near {noise_scale:.0f} needs far fewer samples"
        )
    if ratio <= 0.5:
        return head + (
            f"; well below it, a bigger batch (more devices, up to about {noise_scale:.0f}) would cut the steps "
            "almost in proportion at little extra compute"
        )
    return head + "; near it, the time/compute balance the paper recommends"


def deepspeed_config(p: Plan, req: Request, hw: Hardware) -> dict[str, Any]:
    """The DeepSpeed config implied by a plan: batch sizes are the plan's, never re-typed."""
    return _deepspeed(req, hw, p.global_batch, p.micro_batch, p.grad_accum, p.zero_stage)


def _deepspeed(req: Request, hw: Hardware, global_batch: int, micro: int, accum: int, zero: int) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "zero_optimization": {"stage": zero},
        "bf16": {"enabled": req.precision == "bf16" or (req.precision == "auto" and hw.device == "cuda")},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if req.grad_clip:
        cfg["gradient_clipping"] = req.grad_clip
    return cfg


def _memory_record(req: Request, hw: Hardware, mem: MemoryProfile, usable: float, state_gb: float) -> dict[str, Any]:
    """``Plan.memory``: where the profile came from and what the bound was computed from."""
    return {
        "source": mem.source,
        "detail": mem.detail,
        "device_memory_gb": hw.device_memory_gb,
        "usable_gb": round(usable, 4),
        "model_gb": round(mem.model_gb, 4),
        "model_state_per_device_gb": round(state_gb, 4),
        "per_sample_gb": mem.per_sample_gb,
        "headroom": req.headroom,
    }


# --- the rules, each small and each appending its reason ------------------------------


def _time(
    req: Request, hw: Hardware, mem: MemoryProfile, global_batch: int, accum: int, max_steps: int, reasons: list[str]
) -> dict[str, Any]:
    """``Plan``'s time fields: step time, ``max_steps`` of them, x world in GPU-hours, x price; or none, and why."""
    step, basis, detail = _step_time(req, hw, mem, global_batch, accum)
    if step is None:
        reasons.append(f"time to train not estimated: {detail}")
        return {}
    hours = max_steps * step / 3600
    gpu_hours = hours * hw.world_size
    cost = None if req.gpu_hour_usd is None else gpu_hours * req.gpu_hour_usd
    if not all(math.isfinite(v) and v > 0 for v in (step, hours, gpu_hours, cost or 1.0)):
        reasons.append(
            f"time to train not estimated: the step time ({step:.3g} s) is beyond a float or zero; "
            "check planner.mfu and cluster.gpu_hour_usd"
        )
        return {}
    reasons.append(f"step time {_num(step)} s {detail}")
    reasons.append(
        f"time to train {_num(hours)} h = {max_steps} steps x {_num(step)} s; GPU-hours {_num(gpu_hours)} = "
        f"{_num(hours)} h x {hw.world_size} GPUs"
    )
    if cost is not None:
        reasons.append(
            f"cost ${_num(cost)} = {_num(gpu_hours)} GPU-hours x ${req.gpu_hour_usd:g} (cluster.gpu_hour_usd)"
        )
    return {"step_time_s": step, "time_to_train_h": hours, "gpu_hours": gpu_hours, "cost_usd": cost,
            "time_basis": basis}  # fmt: skip


def _step_time(
    req: Request, hw: Hardware, mem: MemoryProfile, global_batch: int, accum: int
) -> tuple[float | None, str, str]:
    """(seconds per optimizer step, the figure in a few words, the arithmetic and its sources), or (None, "", why).

    The GPU probe's measured step wins over a FLOP count at an assumed share of the datasheet peak.
    """
    share = -(-global_batch // hw.world_size)  # the largest rank's samples: the slowest rank sets the step
    unseen = "the gradient all-reduce and data loading are not counted"
    if hw.device != "cuda":
        return None, "", (
            "the workers are CPUs, which have no datasheet peak here; to plan GPUs that are not on this machine, "
            "describe them: cluster.gpus_per_node=8 cluster.gpu_memory_gb=80 cluster.gpu_type=h100"
        )
    if mem.step_s_fixed is not None and mem.step_s_per_sample is not None:
        step = accum * mem.step_s_fixed + share * mem.step_s_per_sample
        return step, f"measured by the GPU probe on {hw.gpu_name or 'this GPU'}", (
            f"= {accum} micro-step(s) x {mem.step_s_fixed:.3g} s + {share} samples per rank x "
            f"{mem.step_s_per_sample:.3g} s/sample, measured by the GPU probe ({mem.step_detail}); {unseen}"
        )
    gpu = GPUS.get(hw.gpu_type or "")
    if gpu is None:
        here = f"the GPU here, {hw.gpu_name!r}, is not in the table; " if hw.gpu_name else ""
        return None, "", (
            f"no gpu_type: {here}set cluster.gpu_type to one of {', '.join(GPUS)} (launcher/devices.py) "
            f"to estimate it from the GPU's peak FLOP/s ({hw.device_memory_gb:g} GB could be an H100 or an A100)"
        )
    if mem.flops_per_sample is None:
        why = mem.flops_detail or (
            "planner.memory.model_gb and per_sample_gb override the memory profile, so the model is not traced"
            if mem.source == "override" else "the memory profile carries none"
        )
        return None, "", f"no FLOP count of the model's step: {why}"
    fp32 = req.precision == "fp32"
    peak, precision = (gpu.fp32_tflops, "fp32") if fp32 else (gpu.bf16_tflops, "bf16 dense")
    step = share * mem.flops_per_sample / (peak * 1e12 * req.mfu)
    basis = f"estimated at {req.mfu:.0%} of the {gpu.name}'s {peak:g} TFLOP/s {precision}"
    return step, basis, (
        f"= {share} samples per rank x {mem.flops_per_sample / 1e9:.4g} GFLOP/sample / ({req.mfu:.0%} x {peak:g} "
        f"TFLOP/s): {basis} (planner.mfu; {gpu.source}; train.precision={req.precision}); "
        f"FLOPs {mem.flops_detail}; {unseen}"
    )


def _check_inputs(req: Request, hw: Hardware, mem: MemoryProfile) -> None:
    errors = _request_errors(req, hw)
    if not mem.per_sample_gb > 0:
        errors.append(f"planner.memory.per_sample_gb: got {mem.per_sample_gb!r}, expected a number > 0")
    if mem.model_gb <= 0:
        errors.append(f"planner.memory.model_gb: got {mem.model_gb!r}, expected a number > 0")
    if errors:
        raise PlanError(errors)


def _request_errors(req: Request, hw: Hardware) -> list[str]:
    """The input checks that need no memory profile (``check``, and the first of ``plan``'s)."""
    errors = []
    positive = {
        "cluster.nodes": hw.nodes,
        "cluster.gpus_per_node (or cluster.num_workers)": hw.devices_per_node,
        "cluster.gpu_memory_gb": hw.device_memory_gb,
        "recipe.reference.global_batch": req.reference.global_batch,
        "recipe.reference.lr": req.reference.lr,
        "recipe.reference.max_steps": req.reference.max_steps,
    }
    for key, value in positive.items():
        if not value > 0:
            errors.append(f"{key}: got {value!r}, expected a number > 0")
    if not 0 < req.mfu <= 1:
        errors.append(f"planner.mfu: got {req.mfu!r}, expected a fraction in (0, 1]")
    if req.gpu_hour_usd is not None and not req.gpu_hour_usd > 0:
        errors.append(f"cluster.gpu_hour_usd: got {req.gpu_hour_usd!r}, expected a number > 0")
    if not 0 <= req.headroom < 1:
        errors.append(f"planner.headroom: got {req.headroom!r}, expected a fraction in [0, 1)")
    for key, count in {"batch.global_batch": req.global_batch, "batch.micro_batch": req.micro_batch}.items():
        if count is not None and count < 1:
            errors.append(f"{key}: got {count!r}, expected an integer >= 1")
    if req.max_epochs is not None and req.max_steps is not None:
        errors.append("train.max_epochs and train.max_steps are both set: keep one")
    return errors


def _target_global(req: Request, world: int, reasons: list[str]) -> int:
    ref = req.reference
    base = req.global_batch or ref.global_batch
    origin = "batch.global_batch" if req.global_batch else f"the reference ({ref.source or 'recipe'})"
    if req.auto_noise_scale:
        if req.noise_scale is None:
            raise PlanError(
                [
                    "batch.global_batch: auto_noise_scale needs a noise-scale measurement of this recipe and scale; "
                    "train once with train.measure_noise_scale=true (it is looked up in tracking.experiment)"
                ]
            )
        base = max(1, round(req.noise_scale))
        origin = f"the measured critical batch B_simple {req.noise_scale:.1f} ({req.noise_source})"
    if req.scale_with_world:
        target = max(1, round(base * world / ref.devices))
        reasons.append(
            f"target global batch {target} = {base} x {world}/{ref.devices} devices "
            "(batch.scale_with_world=true: batch grows with the world, as detectron2's auto_scale_workers)"
        )
    else:
        target = base
        reasons.append(
            f"target global batch {target} from {origin}; it does not depend on the device count "
            "(batch.scale_with_world=false)"
        )
    if target < world:
        raise PlanError(
            [
                f"batch.global_batch: global batch {target} is smaller than the world size {world}: "
                f"every device needs at least one sample; use >= {world} or fewer workers "
                "(cluster.num_workers / cluster.gpus_per_node)"
            ]
        )
    return target


def _state_per_device(mem: MemoryProfile, stage: int, world: int) -> float:
    """Model-state memory on one device under ZeRO stage 0-3 (Rajbhandari et al. 2020)."""
    p, g, o = mem.params_gb, mem.grads_gb, mem.optimizer_gb
    if stage == 0:
        return p + g + o
    if stage == 1:
        return p + g + o / world
    if stage == 2:
        return p + (g + o) / world
    return (p + g + o) / world


def _zero_stage(req: Request, hw: Hardware, mem: MemoryProfile, reasons: list[str]) -> int:
    usable = hw.device_memory_gb * (1 - req.headroom)
    world = hw.world_size
    fits = [s for s in range(4) if _state_per_device(mem, s, world) + mem.per_sample_gb <= usable + EPS]
    need = (
        f"model states {mem.model_gb:.3g} GB + one sample {mem.per_sample_gb:.3g} GB "
        f"vs {usable:.3g} GB usable ({hw.device_memory_gb:g} GB x (1 - headroom {req.headroom:g}))"
    )
    if req.engine == "ddp":
        if 0 in fits:
            return 0
        hint = (
            f"engine=deepspeed would fit with ZeRO stage {fits[0]} over {world} devices"
            if fits
            else "no ZeRO stage fits either: add devices or use a smaller model"
        )
        raise PlanError([f"planner.memory.model_gb: does not fit one device: {need}; {hint}"])
    if req.zero_stage is not None:
        if req.zero_stage not in fits:
            raise PlanError([f"engine.zero_stage: stage {req.zero_stage} does not fit: {need}"])
        reasons.append(f"ZeRO stage {req.zero_stage} pinned by engine.zero_stage")
        return req.zero_stage
    if not fits:
        raise PlanError([f"planner.memory.model_gb: does not fit even with ZeRO stage 3: {need}"])
    stage = fits[0]
    if stage == 0:
        reasons.append(f"ZeRO stage 0: model states fit one device ({need})")
    else:
        reasons.append(
            f"ZeRO stage {stage}: the lowest stage whose sharded model states "
            f"({_state_per_device(mem, stage, world):.3g} GB/device) fit; unsharded they need {need}"
        )
    return stage


def _max_micro(
    req: Request, hw: Hardware, mem: MemoryProfile, state_gb: float, usable: float, reasons: list[str]
) -> int:
    room = (usable - state_gb) / mem.per_sample_gb  # samples that fit; inf when per_sample_gb is tiny
    raw = math.floor(room + EPS) if room < MICRO_BATCH_LIMIT else MICRO_BATCH_LIMIT
    text = (
        f"max micro-batch {raw} = floor(({hw.device_memory_gb:g} GB x (1 - {req.headroom:g}) - "
        f"{state_gb:.4g} GB model states) / {mem.per_sample_gb:.4g} GB per sample), memory from {mem.source}"
    )
    if room >= MICRO_BATCH_LIMIT:
        text = (
            f"max micro-batch {raw}: the planner's limit (memory would allow {room:.3g} samples: "
            f"{hw.device_memory_gb:g} GB x (1 - {req.headroom:g}) - {state_gb:.4g} GB model states, "
            f"{mem.per_sample_gb:.4g} GB per sample, memory from {mem.source})"
        )
    if raw < 1:
        raise PlanError([f"planner.memory.per_sample_gb: not one sample fits beside the model states: {text}"])
    bound = raw
    if req.power_of_two:
        bound = 1 << (raw.bit_length() - 1)
        text += f", rounded down to the power of two {bound} (planner.power_of_two)"
    reasons.append(text)
    return bound


def shares(global_batch: int, world: int) -> list[int]:
    """Each rank's samples of one step: ``global_batch`` split into ``world`` shares that differ by at most
    one (the first ``global_batch % world`` ranks take the extra sample). ``launcher/data.py`` reads them."""
    base, extra = divmod(global_batch, world)
    return [base + (r < extra) for r in range(world)]


def _split(req: Request, target: int, world: int, max_micro: int, reasons: list[str]) -> tuple[int, int, int]:
    """micro x accum x world == target when possible; else uneven shares (ddp) or the nearest (deepspeed).

    Returns micro, accum and the global batch. With uneven shares, micro and accum describe the
    largest rank's share (``ceil(target / world)`` in ``accum`` micro-batches of at most ``micro``).
    """
    if req.micro_batch is not None:
        if req.micro_batch > max_micro:
            raise PlanError(
                [
                    f"batch.micro_batch: pinned to {req.micro_batch}, above the memory bound "
                    f"{max_micro}; use batch.micro_batch=auto or <= {max_micro}"
                ]
            )
        candidates = [req.micro_batch]
    else:  # a micro-batch above the per-device share of the target is never useful
        cap = min(max_micro, math.ceil(target / world))
        step = [1 << k for k in range(cap.bit_length())] if req.power_of_two else range(1, cap + 1)
        candidates = list(step)

    def cost(micro: int) -> tuple[int, int, int]:
        accum = max(1, round(target / (micro * world)))
        return (abs(micro * accum * world - target), accum, -micro)

    best = min(candidates, key=cost)
    accum = max(1, round(target / (best * world)))
    got = best * accum * world
    pinned = " (pinned by batch.micro_batch)" if req.micro_batch is not None else ""
    if got == target:
        reasons.append(
            f"micro-batch {best}{pinned} x accumulation {accum} x world {world} = global {got}, exactly the target"
        )
        if req.micro_batch is None and best * 4 <= max_micro and accum > 1:
            reasons.append(
                f"note: the only exact split uses micro {best}, well below the memory bound {max_micro}; "
                f"a global batch divisible by {world} x {max_micro} would run faster"
            )
        return best, accum, got
    if req.engine != "deepspeed":
        return _uneven(req, target, world, max_micro, reasons)
    reasons.append(
        f"no split of {target} into micro <= {max_micro} x accumulation x world {world} is exact; "
        f"nearest is micro {best}{pinned} x accumulation {accum} x {world} = {got} "
        f"({(got - target) / target:+.1%} vs target); engine=deepspeed requires micro x accumulation x world = "
        "train_batch_size, so it cannot take uneven shares (engine=ddp keeps the target exactly)"
    )
    return best, accum, got


def _uneven(req: Request, target: int, world: int, max_micro: int, reasons: list[str]) -> tuple[int, int, int]:
    """The target exactly: shares differing by at most one, each in the same number of micro-batches."""
    big, small = -(-target // world), target // world
    bound = req.micro_batch if req.micro_batch is not None else max_micro
    accum = -(-big // bound)  # the fewest micro-batches the largest share fits in
    if accum > small:  # only with micro-batches of 1 sample: the smaller shares cannot fill as many micro-steps
        raise PlanError(
            [
                f"batch.global_batch: {target} on {world} workers gives shares of {big} and {small} samples; with "
                f"micro-batches of at most 1 sample the larger need {big} micro-steps and the smaller have only "
                f"{small}, and every rank must run the same number: use a global batch divisible by {world} "
                f"(e.g. {small * world} or {big * world}) or another world size"
                + (" or batch.micro_batch >= 2" if max_micro > 1 else "")
            ]
        )
    micro = -(-big // accum)
    extra = target - small * world
    which = f"the pinned micro {bound} (batch.micro_batch)" if req.micro_batch is not None else f"any micro <= {bound}"
    split = f"{extra} rank(s) take {big} samples and {world - extra} take {small}" if extra else f"{small} per rank"
    reasons.append(
        f"uneven shares: global {target} on world {world} is not micro x accumulation x world for {which}, "
        f"so the target is kept exactly: {split} (shares differ by at most one), each share in "
        f"{accum} micro-batch(es) of at most {micro}; the loss is normalized by the global batch's unit counts, "
        f"so the gradient is the full-batch mean, and every rank runs {accum} micro-step(s)"
    )
    return micro, accum, target


def _lr(req: Request, global_batch: int, reasons: list[str]) -> tuple[float, str]:
    ref = req.reference
    if req.lr is not None:
        reasons.append(f"lr {req.lr:g} pinned by optim.lr (no scaling applied)")
        return req.lr, "pinned"
    for a in ref.anchors:
        if a.global_batch == global_batch and req.lr_rule == "auto":
            reasons.append(f"lr {a.lr:g} from the published anchor at global batch {global_batch} ({a.source})")
            return a.lr, "anchor"
    rule = ref.lr_rule if req.lr_rule == "auto" else req.lr_rule
    k = global_batch / ref.global_batch
    factor = {"linear": k, "sqrt": math.sqrt(k), "none": 1.0}[rule]
    lr = ref.lr * factor
    if not math.isfinite(lr):
        raise PlanError(
            [
                f"recipe.reference.lr: {ref.lr:g} x {factor:.4g} (global {global_batch} vs reference "
                f"{ref.global_batch}, {rule} rule) is beyond a float; pin optim.lr or use a smaller batch.global_batch"
            ]
        )
    why = {
        "linear": "linear scaling rule (Goyal et al. 2017)",
        "sqrt": "square-root scaling for adaptive optimizers (Krizhevsky 2014; You et al. 2019)",
        "none": "no scaling",
    }[rule]
    origin = "recipe default" if req.lr_rule == "auto" else "planner.lr_rule"
    reasons.append(
        f"lr {lr:.6g} = {ref.lr:g} x {factor:.4g} for global {global_batch} vs reference {ref.global_batch}: "
        f"{why} ({origin})"
    )
    return lr, rule


def _max_steps(req: Request, global_batch: int, reasons: list[str]) -> int:
    """Pinned, else epochs on a known dataset (asked or the reference's), else the reference's samples."""
    ref = req.reference
    if req.max_steps is not None:
        reasons.append(f"max_steps {req.max_steps} pinned by train.max_steps")
        return req.max_steps
    if req.max_epochs is not None and req.dataset_size:
        max_steps = max(1, math.ceil(req.max_epochs * req.dataset_size / global_batch))
        reasons.append(
            f"max_steps {max_steps} = ceil({req.max_epochs:g} epochs x {req.dataset_size} samples / {global_batch})"
        )
        return max_steps
    if ref.epochs is not None and req.dataset_size:
        max_steps = max(1, math.ceil(ref.epochs * req.dataset_size / global_batch))
        reasons.append(
            f"max_steps {max_steps} = ceil({ref.epochs:g} epochs (the reference's) x {req.dataset_size} samples / "
            f"{global_batch}): the reference's epochs stay the same on this dataset"
        )
        return max_steps
    max_steps = _reference_steps(ref, global_batch)
    reasons.append(
        f"max_steps {max_steps} = ceil({ref.max_steps} x {ref.global_batch}/{global_batch}): "
        "the reference's samples seen stay the same"
    )
    if req.max_epochs is not None:
        reasons.append(
            "train.max_epochs needs the dataset size: action=train counts it once the data is built, and plans again"
        )
    return max_steps


def _reference_steps(ref: Reference, global_batch: int) -> int:
    """Steps that see the reference's samples at this global batch."""
    return max(1, math.ceil(ref.max_steps * ref.global_batch / global_batch))


def _warmup(req: Request, global_batch: int, max_steps: int, lr: float, lr_rule: str, reasons: list[str]) -> int:
    """Pinned, the anchor's (with the anchor's lr), the reference's share or samples; added for a 2x lr."""
    ref = req.reference
    k = ref.global_batch / global_batch
    warmup_fraction = ref.warmup_steps / ref.max_steps
    # steps on this dataset per step the reference's sample count would give (1 on the reference's data)
    stretch = max_steps / _reference_steps(ref, global_batch)
    anchor = next((a for a in ref.anchors if a.global_batch == global_batch and a.warmup_steps is not None), None)
    if lr_rule != "anchor":  # the anchor's warmup belongs with the anchor's lr, not another
        anchor = None
    if req.warmup_steps is not None:
        warmup = req.warmup_steps
        reasons.append(f"warmup {warmup} steps pinned by train.warmup_steps")
    elif anchor is not None and req.lr is None and req.max_steps is None and req.max_epochs is None:
        warmup = round((anchor.warmup_steps or 0) * stretch)
        scaled = "" if warmup == anchor.warmup_steps else f" x {stretch:.3g} (this dataset's epoch length)"
        reasons.append(f"warmup {warmup} steps from the published anchor{scaled} ({anchor.source})")
    elif req.max_steps is not None or req.max_epochs is not None or stretch != 1:
        warmup = round(warmup_fraction * max_steps)
        reasons.append(
            f"warmup {warmup} steps = {warmup_fraction:.3g} of max_steps, the reference's warmup share "
            f"({ref.warmup_steps}/{ref.max_steps})"
        )
    else:
        warmup = round(ref.warmup_steps * k)
        reasons.append(
            f"warmup {warmup} steps = {ref.warmup_steps} x {ref.global_batch}/{global_batch}: same warmup samples"
        )
    if warmup == 0 and lr >= 2 * ref.lr and req.warmup_steps is None and req.lr is None:
        warmup = max(1, math.ceil(max_steps * 5 / 90))
        reasons.append(
            f"warmup {warmup} steps added (5/90 of the run): the lr grew >= 2x over the reference, "
            "and large-batch training diverges without gradual warmup (Goyal et al. 2017: 5 of 90 epochs)"
        )
    return min(warmup, max_steps)


def _optimizer(req: Request, global_batch: int, reasons: list[str]) -> str:
    ref = req.reference
    big = ref.large_batch_optimizer
    if big and ref.large_batch_threshold and global_batch >= ref.large_batch_threshold:
        paper = {"lamb": "You et al. 2019, LAMB: BERT at 32k-64k", "lars": "You et al. 2017, LARS"}[big]
        reasons.append(
            f"optimizer {big.upper()} instead of {ref.optimizer}: global batch {global_batch} >= "
            f"{ref.large_batch_threshold}, where {ref.optimizer} is known to lose accuracy ({paper})"
        )
        return big
    limit = (
        f" (< {ref.large_batch_threshold}, the {big.upper()} threshold)" if big and ref.large_batch_threshold else ""
    )
    reasons.append(f"optimizer {ref.optimizer}: the reference's, global batch {global_batch}{limit}")
    return ref.optimizer


def _norm(req: Request, micro: int, world: int, device: str, reasons: list[str]) -> str:
    ref = req.reference
    if not ref.uses_batchnorm:
        reasons.append("norm unchanged: the model has no BatchNorm")
        return "unchanged"
    if micro >= req.bn_min_group:
        reasons.append(f"BatchNorm kept: {micro} samples per device >= {req.bn_min_group} per statistics group")
        return "batch_norm"
    policy = ref.norm_policy
    if policy == "sync_bn" and device == "cpu" and world > 1:
        reasons.append(
            f"BatchNorm kept (per device) although {micro} samples per device < {req.bn_min_group}: the recipe "
            "asks for SyncBatchNorm, which torch runs on GPUs only"
        )
        return "batch_norm"
    detail = {
        "sync_bn": f"SyncBatchNorm pools statistics over {micro} x {world} = {micro * world} samples",
        "group_norm": "GroupNorm does not depend on the batch",
        "frozen_bn": "frozen BN uses fixed statistics and affine weights (detectron2's default for backbones)",
    }[policy]
    reasons.append(
        f"norm {policy}: {micro} samples per device < {req.bn_min_group} needed for stable BatchNorm "
        f"statistics (Wu & He 2018); recipe policy: {detail}"
    )
    if policy == "sync_bn" and micro * world < req.bn_min_group:
        reasons.append(
            f"warning: even synced, {micro * world} samples per statistics group is below {req.bn_min_group}"
        )
    return policy


def _advice(req: Request, global_batch: int, reasons: list[str]) -> None:
    """What a measured noise scale says about the global batch; never changes the plan."""
    if req.noise_scale is not None:
        reasons.append(f"advice: {advice(global_batch, req.noise_scale)} (measured in {req.noise_source})")
    elif req.advise:
        reasons.append(
            "advice: no noise-scale measurement of this recipe and scale yet; "
            "train once with train.measure_noise_scale=true to measure the critical batch"
        )


def _weight_decay(req: Request) -> float:
    """``optim.weight_decay`` if set, else the reference's."""
    return req.reference.weight_decay if req.weight_decay is None else req.weight_decay


def _milestones(req: Request, max_steps: int, reasons: list[str]) -> list[int]:
    """The reference's milestone fractions as steps of this run (lr x0.1 at each under schedule: step)."""
    ref = req.reference
    milestones = [max(1, round(f * max_steps)) for f in ref.milestones]
    if ref.schedule == "step" and milestones:
        reasons.append(f"lr steps x0.1 at {milestones} (reference fractions {list(ref.milestones)} of max_steps)")
    return milestones


def request_from_config(
    cfg: Config, dataset_size: int | None = None, noise: tuple[float, str] | None = None
) -> Request:
    """The planner's request for a validated config (the key each field comes from is beside it in ``Request``)."""
    micro = cfg.batch.micro_batch
    auto_noise = cfg.batch.global_batch == "auto_noise_scale"
    return Request(
        reference=cfg.recipe.reference,
        global_batch=None if auto_noise else cfg.batch.global_batch,  # type: ignore[arg-type]
        auto_noise_scale=auto_noise,
        advise=cfg.planner.advise,
        noise_scale=noise[0] if noise else None,
        noise_source=noise[1] if noise else "",
        micro_batch=None if micro == "auto" else int(micro),
        scale_with_world=cfg.batch.scale_with_world,
        lr=cfg.optim.lr,
        lr_rule=cfg.planner.lr_rule,
        warmup_steps=cfg.train.warmup_steps,
        max_steps=cfg.train.max_steps,
        max_epochs=cfg.train.max_epochs,
        dataset_size=dataset_size,
        weight_decay=cfg.optim.weight_decay,
        headroom=cfg.planner.headroom,
        power_of_two=cfg.planner.power_of_two,
        bn_min_group=cfg.planner.bn_min_group,
        engine=cfg.engine.name,
        zero_stage=None if cfg.engine.zero_stage == "auto" else int(cfg.engine.zero_stage),
        grad_clip=cfg.train.grad_clip,
        precision=cfg.train.precision,
        mfu=cfg.planner.mfu,
        gpu_hour_usd=cfg.cluster.gpu_hour_usd,
        cpus_per_worker=None if cfg.cluster.cpus_per_worker == "auto" else int(cfg.cluster.cpus_per_worker),
        loader_workers=None if cfg.data.num_workers == "auto" else int(cfg.data.num_workers),
    )


def describe(p: Plan) -> str:
    """The plan as a readable table followed by its reasons and notes (what ``action=plan`` prints;
    on a terminal ``launcher/console.py`` draws the same rows, reasons and notes with rich)."""
    rows = plan_rows(p)
    width = max(len(k) for k, _ in rows)
    lines = ["plan", "-" * 60] + [f"{k:<{width}}  {v}" for k, v in rows] + ["", "why:"]
    lines += [f"  {i + 1:>2}. {r}" for i, r in enumerate(p.reasons)]
    if p.notes:
        lines += ["", "notes:"] + [f"  - {n}" for n in p.notes]
    return "\n".join(lines)


def plan_rows(p: Plan) -> list[tuple[str, str]]:
    """The plan's table: (what, value) rows, the value as shown."""
    rows: list[tuple[str, Any]] = [
        ("world size", p.world_size),
        (
            "global batch",
            f"{p.global_batch}"
            + ("" if p.global_batch == p.target_global_batch else f" (target {p.target_global_batch})"),
        ),
        ("micro-batch / device", f"{_per_device(p)} (memory bound {p.max_micro_batch})"),
        ("grad accumulation", p.grad_accum),
        ("lr", f"{p.lr:.6g} ({p.lr_rule})"),
        ("warmup steps", p.warmup_steps),
        ("max steps", p.max_steps),
        ("schedule", p.schedule + (f" {p.milestones}" if p.milestones else "")),
        ("optimizer", f"{p.optimizer} (weight decay {p.weight_decay:g}, none on norm/bias)"),
        ("norm", p.norm),
        ("engine", p.engine + (f" ZeRO-{p.zero_stage}" if p.engine == "deepspeed" else "")),
        (
            "memory",
            f"{p.memory['source']}: {p.memory['model_state_per_device_gb']:.3g} GB states/device, "
            f"{p.memory['per_sample_gb']:.3g} GB/sample, {p.memory['usable_gb']:.3g} GB usable",
        ),
        (
            "CPUs / worker",
            f"{p.cpus.cpus_per_worker}: {p.cpus.loader_workers} DataLoader process(es), "
            f"{p.cpus.torch_threads} torch thread(s)"
            + ("" if p.cpus.node_cpus is not None else " (the nodes' CPUs are not known here: see why)"),
        ),
        *_time_rows(p),
    ]
    return [(k, str(v)) for k, v in rows]


def _time_rows(p: Plan) -> list[tuple[str, Any]]:
    """The time rows of ``describe``: step time, time to train, GPU-hours, cost (or why there are none)."""
    if p.step_time_s is None or p.time_to_train_h is None or p.gpu_hours is None:
        return [("time to train", "not estimated (see why)")]
    days = f" ({_num(p.time_to_train_h / 24)} days)" if p.time_to_train_h >= 48 else ""
    rows: list[tuple[str, Any]] = [
        ("step time", f"{_num(p.step_time_s)} s ({p.time_basis})"),
        ("time to train", f"{_num(p.time_to_train_h)} h{days} for {p.max_steps} steps"),
        ("GPU-hours", f"{_num(p.gpu_hours)} ({p.world_size} GPUs)"),
    ]
    if p.cost_usd is not None:
        rows.append(("cost", f"${_num(p.cost_usd)} ({_num(p.gpu_hours)} GPU-hours x cluster.gpu_hour_usd)"))
    return rows


def _num(x: float) -> str:
    """3 significant digits, thousands separated: 0.412, 70.5, 4,512."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _per_device(p: Plan) -> str:
    """The micro-batch row of ``describe``: with uneven shares, the largest micro-batch and the shares."""
    if p.micro_batch * p.grad_accum * p.world_size == p.global_batch:
        return str(p.micro_batch)
    base, extra = divmod(p.global_batch, p.world_size)  # the sizes of shares(), without listing every rank
    sizes = [base + 1, base] if extra else [base]
    return f"up to {p.micro_batch}, shares of {' or '.join(map(str, sizes))} samples"
