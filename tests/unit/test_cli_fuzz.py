"""Fuzzing the command line (#22): whatever a user types ends in a plan or in a ConfigError naming its key.

Random overrides go through the path ``python -m launcher action=plan`` takes, in-process:
``cli.load`` (Hydra parse and compose from the shipped ``conf/``, read-only; validation), then
``launch.build_plan`` (hardware, memory profile, planner, DeepSpeed check). Keys are drawn from
the composed config and near-misses of them, values from a hostile list (wrong types, huge,
nan/inf, unicode, paths, interpolations, YAML tags, ``_target_``) and plausible ones, group
choices real and bogus. Every example must end in a plan that holds together or in a
``ConfigError`` each of whose lines starts with the key it is about; any other exception fails.

``planner.memory.*`` is pinned, so no model is built or traced; if an example unpins it, the
device-free estimate is a stub (a fixed profile), so the partial-override path still runs.
The noise-scale lookup (MLflow) runs for real against an absent SQLite store under a temporary
folder, the cwd of the test; a ``tracking.uri`` the fuzzer sets (a server, a path) is not
contacted. A ``cluster=ray`` without ``cluster.gpus_per_node`` plans a live cluster's hardware:
its config must validate, and its plan is not computed here.

Random search meets a given key at a given value rarely (Hypothesis also favours its first
choices), so every key the planner computes with is also tried at every extreme value, on the
composed config directly (cheap: no Hydra compose per pair). The bugs found have plain examples
below. A few of the nastiest inputs also go through ``python -m launcher``: exit code 2, the key
named, no traceback.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from launcher import launch, memory
from launcher.cli import CONF_DIR, HIDDEN_GROUPS, load, main
from launcher.config import RECIPE_SCHEMAS, Config, ConfigError, all_keys, to_dict, validate
from launcher.planner import MICRO_BATCH_LIMIT, MemoryProfile, Plan, describe

PINNED = ["action=plan", "planner.memory.model_gb=2", "planner.memory.per_sample_gb=0.01"]
GROUPS = sorted(d.name for d in CONF_DIR.iterdir() if d.is_dir() and d.name not in HIDDEN_GROUPS)
CHOICES = {g: sorted(p.stem for p in (CONF_DIR / g).glob("*.yaml")) for g in GROUPS}
SCHEMA_KEYS = {k for r in RECIPE_SCHEMAS for k in all_keys(Config, recipe=r)}
STUB_PROFILE = dataclasses.replace(  # with a FLOP count, so that the time to train is planned too
    MemoryProfile.from_total(1.0, 0.01, source="estimate", detail="a stub: no model is traced here"),
    flops_per_sample=1e9, flops_detail="a stub",
)


def walk(d: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every (dotted key, value) of a nested dict, branches and leaves, except Hydra's choices."""
    for k, v in d.items():
        if prefix + k != "choices":
            yield prefix + k, v
            if isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}.")


@functools.cache
def composed(recipe: str) -> list[tuple[str, Any]]:
    """The keys and values of the config Hydra composes for a recipe (what its YAML files hold)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="fuzz"):
        raw: Any = OmegaConf.to_container(compose(config_name="config", overrides=[f"recipe={recipe}"]), resolve=True)
    return list(walk(raw))


@functools.cache
def composed_keys() -> list[str]:
    """Every key a user may set: those of each recipe's composed config, and the schema's (with defaults)."""
    return sorted({k for r in CHOICES["recipe"] for k, _ in composed(r)} | SCHEMA_KEYS - {"choices"})


@functools.cache
def valid_overrides() -> list[str]:
    """``key=value`` that validate: each leaf's value in the default composed config, and numbers near it."""
    out = set()
    for key, v in composed("bert"):
        if isinstance(v, bool):
            out |= {f"{key}=true", f"{key}=false"}
        elif isinstance(v, int):
            out |= {f"{key}={n}" for n in (v, v + 1, 2 * v, max(1, v // 2))}
        elif isinstance(v, float):
            out |= {f"{key}={x!r}" for x in (v, v / 2, min(0.5, 2 * v))}
        elif isinstance(v, str) and re.fullmatch(r"[\w.-]+", v):
            out.add(f"{key}={v}")
    hardware = ["cluster.gpus_per_node=8 cluster.gpu_memory_gb=80", "cluster.gpus_per_node=8 cluster.gpu_type=h100 "
                "cluster.gpu_hour_usd=2.5", "cluster.nodes=4 cluster.gpus_per_node=8 "
                "cluster.gpu_memory_gb=40", "cluster.num_workers=3", "batch.global_batch=1000", "engine=deepspeed",
                "batch.micro_batch=4", "batch.scale_with_world=true", "planner.power_of_two=true"]  # fmt: skip
    return sorted(out) + hardware


# --- strategies --------------------------------------------------------------------------------------

real_keys = st.deferred(lambda: st.sampled_from(composed_keys()))
letters = st.sampled_from("abcdefghijklmnopqrstuvwxyz_.0AZ")


@st.composite
def near_miss_keys(draw: st.DrawFn) -> str:
    """A real key, slightly wrong: a typo, the wrong case, a dot too many, a Hydra prefix, another parent."""
    key = draw(real_keys)
    i = draw(st.integers(0, len(key) - 1))
    parent, _, leaf = key.rpartition(".")
    other = draw(st.sampled_from(sorted({k.split(".")[0] for k in composed_keys()})))
    return draw(
        st.sampled_from(
            [
                key[:i] + key[i + 1 :],  # a letter dropped
                key[:i] + draw(letters) + key[i:],  # a letter added
                key[:i] + key[i + 1 : i + 2] + key[i : i + 1] + key[i + 2 :],  # two swapped
                key.upper(),
                key.title(),
                key[:i] + key[i].swapcase() + key[i + 1 :],
                "." + key,
                key + ".",
                key.replace(".", "..", 1),
                "+" + key,
                "++" + key,
                f"{other}.{leaf}",  # under the wrong parent
                key + ".x",
                key + "._target_",
                key + "[0]",
                key + ".0",
                "hydra." + key,
                f"{key}@{other}",
                key.replace("a", "\u0430", 1),  # a Cyrillic a
                key.replace("_", "-"),
                key.replace(".", "/"),
                parent or key,  # a section, set to a scalar
            ]
        )
    )


HOSTILE = [
    # wrong types and YAML/Hydra specials
    "", "null", "~", "true", "False", "abc", "[]", "[1,2]", "[1,[2]]", "{}", "{a:1}", "{_target_:os.system}",
    "[{global_batch:256,lr:-1}]", "[{global_batch:0,lr:1}]", "[nan,0.9]", "[0.9,inf]", "'1'", '"2"', "'unterminated",
    "a,b", "a=b", "choice(1,2)", "range(1,3)", "interval(0,1)", "glob(*)", "int(nan)", "float(inf)", "str(3)",
    "sort(3,1)", "shuffle(1,2)", "tag(a,b)", "extend_list(1)",
    # numbers: huge, negative, tiny, not finite
    "nan", "-nan", "NaN", "inf", "-inf", "+inf", "1e308", "1e309", "-1e308", "1e-400", "5e-324", "-0.0", "-1",
    "0", "0x10", "1_000", "9" * 40, "-" + "9" * 25, str(2**63), str(2**63 - 1), str(-(2**63)), "9" * 400,
    # interpolations, including ones that cannot resolve
    "${oc.env:HOME}", "${oc.env:LAUNCHER_FUZZ_UNSET}", "${oc.env:LAUNCHER_FUZZ_UNSET,3}", "${nope}", "${optim.lr}",
    "${.lr}", "${..x}", "${hydra:runtime.cwd}", "${now:%Y}", "${oc.decode:'[1,2]'}", "${oc.create:'{a:1}'}",
    "${oc.dict.keys:optim}", "${oc.select:nope,1}", "${", "}", "'${x}'", "\\${x}",
    # YAML tags, import paths
    "!!python/object/apply:os.system ['true']", "!!python/name:os.system", "!!binary aGk=", "_target_",
    "os.system", "builtins.eval",
    # paths and URIs
    "/etc/passwd", "../../etc", "~/x", "C:\\x", "file:///etc", "s3://bucket/runs", "http://user:tok@127.0.0.1:9",
    "/dev/null", ".", "..",
    # unicode and control characters
    "ünïcödé", "日本語", "\u202eevil", "🙂", "a\x00b", "a\nb", "a\tb", " ", "'ünï'",
    # words that are valid somewhere
    "auto", "auto_noise_scale", "local", "ray", "ddp", "deepspeed", "lamb", "lars", "sqrt", "linear", "cosine",
    "json", "table", "plan", "train", "lr_find", "submit", "status", "fp32", "bf16", "ta_wide", "skip",
]  # fmt: skip
plausible = st.one_of(
    st.integers(0, 4096).map(str),
    st.integers(-(2**70), 2**70).map(str),
    st.floats(0, 1).map(repr),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["true", "false", "null", "1", "2", "8", "64", "0.5", "1e-3", "3e-4", "256", "8192"]),
)
values = st.one_of(st.sampled_from(HOSTILE), plausible, st.text(max_size=8))
BOGUS_GROUPS = ["recipes", "Recipe", "model", "optimizer", "recipe_scale", "hydra/launcher", "scale_", "cluster.kind"]
groups = st.sampled_from(GROUPS + BOGUS_GROUPS)


@st.composite
def group_choices(draw: st.DrawFn) -> str:
    group = draw(groups)
    real = CHOICES.get(group, ["bert"])
    bogus = ["", "null", "BERT", "bert.yaml", "../recipe/bert", "/etc/passwd", "${recipe}", "[bert]", "bert_smoke",
             real[0][:-1], real[0] + "s", "choice(bert,coco)", "smoke,full"]  # fmt: skip
    return f"{group}={draw(st.sampled_from(real + bogus))}"


PLAN_INPUTS = [  # the keys the hardware, the memory profile and the planner compute with
    "cluster.nodes", "cluster.gpus_per_node", "cluster.gpu_memory_gb", "cluster.num_workers", "batch.global_batch",
    "batch.micro_batch", "optim.lr", "optim.weight_decay", "planner.headroom", "planner.bn_min_group",
    "planner.memory.model_gb", "planner.memory.per_sample_gb", "train.max_steps", "train.max_epochs",
    "train.warmup_steps", "train.grad_clip", "engine.zero_stage", "recipe.reference.global_batch",
    "recipe.reference.lr", "recipe.reference.max_steps", "recipe.reference.warmup_steps", "recipe.reference.devices",
    "recipe.reference.epochs", "recipe.reference.large_batch_threshold", "planner.mfu", "cluster.gpu_hour_usd",
    "cluster.cpus_per_worker", "data.num_workers",
]  # fmt: skip
EXTREMES = ["nan", "inf", "-inf", "1e308", "5e-324", "0", "-1", "9" * 400, str(2**63), str(2**63 - 1), "[inf]"]
numbers = st.one_of(st.integers(-(2**70), 2**70).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr))
UNRESOLVABLE = ["${oc.env:LAUNCHER_FUZZ_UNSET}", "${nope}", "${optim.lr}", "${..x}", "${hydra:runtime.cwd}"]
valid = st.deferred(lambda: st.sampled_from(valid_overrides())).map(str.split)
probes = st.one_of(  # one argument that is likely wrong, by kind of wrong
    st.tuples(st.sampled_from(PLAN_INPUTS), st.sampled_from(EXTREMES)).map("=".join),  # what the planner computes with
    st.tuples(st.sampled_from(PLAN_INPUTS), numbers).map("=".join),
    st.tuples(real_keys, st.sampled_from(UNRESOLVABLE)).map("=".join),
    st.tuples(real_keys, st.sampled_from(HOSTILE)).map("=".join),
    st.tuples(real_keys, plausible).map("=".join),
    st.tuples(near_miss_keys(), values).map("=".join),
    st.tuples(near_miss_keys(), plausible).map("=".join),
    group_choices(),
    real_keys.map(lambda k: "~" + k),
    st.tuples(real_keys, values).map(lambda kv: f"~{kv[0]}={kv[1]}"),
    st.text(max_size=16),  # anything at all as an argument
)
command_lines = (
    st.tuples(st.lists(valid, max_size=3), st.lists(probes, max_size=2))
    .map(lambda t: [arg for args in t[0] for arg in args] + t[1])  # valid ones first: the probes get checked
    .filter(bool)
)


# --- the path and the checks -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The CLI's plan path made safe to run 300 times: an empty cwd, an absent tracking store, no model traced."""
    cwd = tmp_path_factory.mktemp("fuzz-cwd")
    real_noise = launch._noise_measurement

    def noise(cfg: Config) -> tuple[float, str] | None:  # the real lookup against the absent store only
        return real_noise(cfg) if cfg.tracking.uri is None else None

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{cwd / 'absent' / 'mlflow.db'}")
        mp.setattr(memory, "estimate", lambda cfg, recipe: STUB_PROFILE)
        mp.setattr(memory, "probe", lambda cfg, est: est)
        mp.setattr(launch, "_noise_measurement", noise)
        for warm in (["engine=deepspeed", "cluster.gpus_per_node=2", "cluster.gpu_memory_gb=80"], []):
            run(warm)  # torch and DeepSpeed imported once, before any example is timed
        yield cwd
    assert sorted(os.listdir(cwd)) == []  # nothing was written: no tracking store, no Hydra outputs


def run(args: list[str]) -> Plan | ConfigError | Config:
    """What ``python -m launcher action=plan ARGS`` computes: the plan, the config error, or (for a plan
    that needs a live Ray cluster's hardware) the validated config."""
    return plan_of(lambda: load([*PINNED, *args]))


def plan_of(config: Callable[[], Config]) -> Plan | ConfigError | Config:
    try:
        cfg = config()
        if cfg.cluster.kind == "ray" and not cfg.cluster.gpus_per_node:
            return cfg
        return launch.build_plan(cfg, None)
    except ConfigError as e:
        return e


# a line's subject: `key: `, `key=value: `, `key[i].x: `, `key (or other): `, `key and other ...`
NAME = re.compile(r"[^\s:=\[(`]+(?=: |=|\[| \(| and )")


def typed_key(arg: str) -> str:
    """The key of an argument as typed: before the first '=', without Hydra's +, ++ or ~."""
    return arg.split("=", 1)[0].lstrip("+~")


def names_a_key(line: str, args: list[str]) -> bool:
    """The line starts with what it is about: a config key or group, a key as typed, or `the argument`."""
    if any(line.startswith(f"`{a}`: ") for a in args):
        return True
    m = NAME.match(line)
    if m is None:
        return False
    name = m.group()
    return name in SCHEMA_KEYS | set(GROUPS) or any(f"{typed_key(a)}.".startswith(f"{name}.") for a in args)


def check_plan(p: Plan) -> None:
    assert p.world_size >= 1 and p.grad_accum >= 1
    assert 1 <= p.micro_batch <= p.max_micro_batch <= MICRO_BATCH_LIMIT
    assert p.global_batch >= p.world_size and p.target_global_batch >= p.world_size
    assert math.isfinite(p.lr) and p.lr > 0
    assert p.max_steps >= 1 and 0 <= p.warmup_steps <= p.max_steps
    assert all(1 <= m for m in p.milestones)
    assert p.cpus.cpus_per_worker >= 1 and p.cpus.loader_workers >= 0 and p.cpus.torch_threads >= 1
    assert p.reasons
    if p.time_to_train_h is not None:  # planned: every figure finite, positive and consistent
        assert p.step_time_s and p.gpu_hours and math.isclose(p.gpu_hours, p.time_to_train_h * p.world_size)
        assert p.cost_usd is None or p.cost_usd > 0
    else:
        assert any(r.startswith("time to train not estimated: ") for r in p.reasons)
    json.dumps(p.to_dict(), allow_nan=False)  # plan.format=json prints it
    assert describe(p).startswith("plan")


def check(args: list[str], out: Plan | ConfigError | Config | None = None) -> str:
    """One example (``out``: its outcome, if computed otherwise than by ``run``): its kind, after its checks."""
    out = run(args) if out is None else out
    if isinstance(out, ConfigError):
        assert out.errors, args
        for line in out.errors:
            assert names_a_key(line, args), (args, line)
        return "config error"
    if isinstance(out, Plan):
        check_plan(out)
        return "plan"
    assert isinstance(out, Config) and out.cluster.kind == "ray"
    return "valid, planned on the cluster"


def test_random_command_lines_end_in_a_plan_or_a_config_error_naming_its_key(plan_path: Path) -> None:
    outcomes: Counter[str] = Counter()
    seconds: list[float] = []

    @settings(
        max_examples=300, deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )  # fmt: skip
    @given(command_lines)
    def example(args: list[str]) -> None:
        start = time.perf_counter()
        kind = check(args)
        seconds.append(time.perf_counter() - start)
        event(kind)
        outcomes[kind] += 1

    example()
    median, slowest = statistics.median(seconds), max(seconds)
    print(f"\n{sum(outcomes.values())} examples: {dict(outcomes)}; {sum(seconds):.1f} s, median {median:.3f} s, "
          f"slowest {slowest:.3f} s")  # fmt: skip
    assert sum(outcomes.values()) >= 300
    assert outcomes["plan"] >= 30 and outcomes["config error"] >= 150  # both ends are reached, not just errors


@pytest.mark.parametrize("base", ["cpu workers", "8 GPUs, deepspeed"])
def test_every_planner_input_at_every_extreme(plan_path: Path, base: str) -> None:
    """Each key the planner computes with, at each extreme value (308 pairs per base): Hydra's parser reads
    the value as from the command line, it replaces the key's value in the composed config, and that
    is validated and planned as ``load`` and ``action=plan`` do."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    extra = [] if base == "cpu workers" else ["cluster.gpus_per_node=8", "cluster.gpu_memory_gb=80", "engine=deepspeed"]
    composed_config = to_dict(load([*PINNED, *extra]))
    parser = OverridesParser.create()
    kinds: Counter[str] = Counter()
    for key in PLAN_INPUTS:
        for text in EXTREMES:
            config = copy.deepcopy(composed_config)
            section, _, leaf = key.rpartition(".")
            functools.reduce(dict.__getitem__, section.split("."), config)[leaf] = parser.parse_override(
                f"{key}={text}"
            ).value()  # the value as Hydra parses it from the command line
            kinds[check([f"{key}={text}"], plan_of(lambda: validate(config)))] += 1  # noqa: B023 - called at once
    assert kinds["plan"] >= 20 and kinds["config error"] >= 150


# --- the bugs it found, as plain examples ------------------------------------------------------------


def errors_of(args: list[str]) -> list[str]:
    out = run(args)
    assert isinstance(out, ConfigError), out
    return out.errors


@pytest.mark.parametrize(
    ("arg", "key"),
    [
        ("optim.lr=${oc.env:LAUNCHER_FUZZ_UNSET}", "optim.lr"),  # was omegaconf's InterpolationResolutionError
        ("optim.lr=${nope}", "optim.lr"),  # InterpolationKeyError
        ("optim.lr=${optim.lr}", "optim.lr"),  # recursive
        ("run.output_dir=${hydra:runtime.cwd}", "run.output_dir"),  # the hydra resolver, after hydra is gone
    ],
)
def test_an_interpolation_that_cannot_resolve_names_its_key(plan_path: Path, arg: str, key: str) -> None:
    (err,) = errors_of([arg])
    assert err.startswith(f"{key}: cannot resolve its interpolation: ")


def test_a_resolvable_interpolation_still_works(plan_path: Path) -> None:
    out = run(["optim.lr=${oc.decode:'1e-3'}"])
    assert isinstance(out, Plan) and out.lr == 1e-3


@pytest.mark.parametrize(
    "arg",
    [
        "cluster.gpu_memory_gb=inf",  # was an OverflowError in the memory bound's floor()
        "optim.lr=inf",  # was a plan with lr inf
        "recipe.reference.lr=inf",
        "train.max_epochs=inf",
        "lr_find.max_lr=inf",
        "optim.lr=-inf",
        "train.grad_clip=nan",
        "+recipe.reference.milestones=[inf]",  # was an OverflowError from round(inf) in the milestones
        "batch.global_batch=" + "9" * 400,  # was an OverflowError: int / int beyond a float
        "recipe.reference.max_steps=" + "9" * 400,
        "optim.lr=" + "9" * 400,  # float() of it was an OverflowError in validation
        f"train.max_steps={2**63}",
    ],
)
def test_numbers_must_be_finite_and_integers_fit_in_64_bits(plan_path: Path, arg: str) -> None:
    (err,) = errors_of([arg])
    assert err.startswith(typed_key(arg) + ": got ")
    assert "no nan or inf" in err or "list of a number" in err


def test_the_largest_numbers_that_pass_still_plan(plan_path: Path) -> None:
    """Finite inputs whose arithmetic leaves a float: a capped memory bound, or a clean error naming the key."""
    p = run(["cluster.gpu_memory_gb=1e308"])  # (usable - states) / per_sample was inf
    assert isinstance(p, Plan) and p.max_micro_batch == MICRO_BATCH_LIMIT
    assert any("the planner's limit (memory would allow inf samples" in r for r in p.reasons)
    (err,) = errors_of(["recipe=imagenet", "recipe.reference.lr=1e300", f"batch.global_batch={2**62}"])
    assert err.startswith("recipe.reference.lr: ") and "beyond a float" in err  # was a plan with lr inf


def test_a_huge_global_batch_with_a_tiny_sample_plans_quickly(plan_path: Path) -> None:
    """The split searched every micro-batch up to the memory bound: 5e8 candidates here (hours, and memory)."""
    p = run(["planner.memory.per_sample_gb=1e-300", "batch.global_batch=1000000000"])
    assert isinstance(p, Plan) and p.global_batch == 10**9 and p.max_micro_batch == MICRO_BATCH_LIMIT  # the cap


def test_uneven_shares_on_a_huge_world_are_described_without_listing_every_rank(plan_path: Path) -> None:
    world = 10**12  # describe() built a list of one share per rank
    p = run([f"cluster.gpus_per_node={world}", "cluster.gpu_memory_gb=80", f"batch.global_batch={world + 3}"])
    assert isinstance(p, Plan) and p.world_size == world and p.global_batch == world + 3
    assert "shares of 2 or 1 samples" in describe(p)


def test_an_anchor_is_held_to_the_ranges_of_a_reference(plan_path: Path) -> None:
    errs = errors_of(["recipe.reference.anchors=[{global_batch:0,lr:-1,warmup_steps:-3}]"])  # lr -1 was planned
    assert [e.split(":")[0] for e in errs] == [
        "recipe.reference.anchors[0].global_batch",
        "recipe.reference.anchors[0].lr",
        "recipe.reference.anchors[0].warmup_steps",
    ]


@pytest.mark.parametrize(
    ("arg", "hint"),
    [
        ("optim.LR=1", "did you mean `optim.lr`?"),  # suggested `optim.optim`, a key that does not exist
        ("Optim.lr=1", "did you mean `optim.lr`?"),
        ("optim.global_batch=1", "did you mean `batch.global_batch`?"),  # under the wrong parent: the whole key
        ("train.max_stepz=1", "did you mean `train.max_steps`?"),
        ("batch.lr=1", None),  # suggested `batch.batch`; its own parent is no suggestion, and no key is close
    ],
)
def test_a_suggested_key_is_a_real_key(plan_path: Path, arg: str, hint: str | None) -> None:
    (err,) = errors_of([arg])
    assert hint in err if hint else "did you mean" not in err


@pytest.mark.parametrize(
    ("args", "starts"),
    [
        (["run.name=日本"], ["`run.name=日本`: cannot parse this argument: "]),
        (["optim..lr=1", "x=!!python/name:os.system"], ["`optim..lr=1`: cannot parse", "`x=!!python/name:os.system`:"]),
        (["=1"], ["`=1`: no key before '='"]),  # was ': unknown key'
        (["scale=smoke,full"], ["scale: `scale=smoke,full` is a sweep"]),  # was a ChoiceSweep(...) repr
        (["optim.lr=choice(1,2)"], ["optim.lr: `optim.lr=choice(1,2)` is a sweep"]),  # was 'requires --multirun'
        (["recipe@optim=coco"], ["recipe@optim: packages (`@`) are not supported"]),  # was "Could not override"
        (["~recipe"], ["recipe: a group cannot be deleted; choose one of bert, "]),  # was "unknown value 'None'"
        (["hydraulic=1"], ["hydraulic: unknown key"]),  # was 'set by the launcher itself'
        (["~optim.lr"], ["optim.lr: Could not delete from config."]),  # Hydra's message, led by its key
        (["recipe.reference.milestones=[0.5]"], ["recipe.reference.milestones: Could not override"]),
    ],
)
def test_hydra_level_errors_lead_with_their_argument_or_key(
    plan_path: Path, args: list[str], starts: list[str]
) -> None:
    errs = errors_of(args)
    assert len(errs) == len(starts)
    for err, start in zip(errs, starts, strict=True):
        assert err.startswith(start), err


# --- the same inputs as a user types them ----------------------------------------------------------------

NASTIEST = [
    (["optim.lr=${oc.env:LAUNCHER_FUZZ_UNSET}"], ["optim.lr"]),
    (["cluster.gpu_memory_gb=inf", "batch.global_batch=" + "9" * 400], ["cluster.gpu_memory_gb", "batch.global_batch"]),
    (["run.name=日本語", "optim.lr=!!python/object/apply:os.system ['true']"], ["run.name", "optim.lr"]),
    (["+optim._target_=os.system", "optim.lr=-1"], ["optim._target_: refused", "optim.lr: got -1.0"]),
    (["scale=smoke,full", "recipe@optim=coco", "~recipe"], ["scale", "recipe@optim", "recipe: a group"]),
]


@pytest.mark.parametrize(("args", "named"), NASTIEST, ids=lambda v: " ".join(v)[:40])
def test_the_command_line_exits_2_naming_the_key_without_a_traceback(
    tmp_path: Path, args: list[str], named: list[str]
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "launcher", "action=plan", *args],
        cwd=tmp_path,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.startswith("error: ")
    for key in named:
        assert key in done.stderr
    assert sorted(os.listdir(tmp_path)) == []


def test_main_in_process_returns_2_too(plan_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["action=plan", "optim.lr=${nope}"]) == 2
    assert capsys.readouterr().err.startswith("error: 1 config error:\n  - optim.lr: cannot resolve")
