"""``python -m launcher [group=choice ...] [key=value ...]``: compose, validate, dispatch.

The only module that imports Hydra. It composes ``conf/config.yaml`` with the command-line
overrides, checks every key before anything heavy is imported (no torch, no Ray), then
hands a typed ``Config`` to the action: ``plan`` prints the plan and exits, ``train`` and
``lr_find`` launch it, ``submit`` sends it to a Ray cluster as a job, ``status``, ``logs``
and ``stop`` ask about that job, and ``manifest`` prints a KubeRay RayJob that runs it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from launcher.config import Config, ConfigError, check_override_keys, unknown_choice, validate
from launcher.tracking import mask

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
HIDDEN_GROUPS = {"recipe_scale"}  # selected by interpolation, not by the user

USAGE = """usage: python -m launcher [group=choice ...] [key=value ...]

groups:   recipe={recipes}  scale={scales}  cluster={clusters}  tracking={trackings}  engine={engines}
actions:  action=train (default) | action=plan [plan.format=json] | action=lr_find [lr_find.steps=100]
          cluster=ray: action=submit | action=status|logs|stop [run.job_id=... or run.name=...]
          cluster=ray: action=manifest cluster.image=... run.name=...   # a KubeRay RayJob on stdout

examples:
  python -m launcher scale=smoke                         # BERT smoke run on 2 CPU workers
  python -m launcher action=plan cluster.nodes=8 cluster.gpus_per_node=8 cluster.gpu_memory_gb=80 \\
      batch.global_batch=8192                            # what 64 GPUs would do, without them
  python -m launcher train.max_steps=100 optim.lr=3e-4    # pin steps and lr

Every key is listed in conf/config.yaml and conf/<group>/*.yaml; see README.md.
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(
            USAGE.format(
                **{f"{g}s": "|".join(_choices(g)) for g in ("recipe", "scale", "cluster", "tracking", "engine")}
            )
        )
        return 0
    timings = {"launched_at": process_started()}  # wall-clock stamps for the start-up breakdown
    try:
        cfg = load(argv)
    except ConfigError as e:
        print(f"error: {mask(str(e))}", file=sys.stderr)
        return 2
    timings["config_done_at"] = time.time()
    try:
        if cfg.action == "plan":
            return _plan(cfg)
        if cfg.action in ("status", "logs", "stop"):
            from launcher.cluster import job

            return job(cfg)
        if cfg.action == "manifest":
            from launcher.manifest import run

            return run(cfg, argv)
        if cfg.action == "submit":
            from launcher.launch import submit

            return submit(cfg, argv)
        from launcher.launch import train

        return train(cfg, timings)
    except ConfigError as e:
        print(f"error: {mask(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def load(overrides: list[str], conf_dir: Path = CONF_DIR) -> Config:
    """Compose the config with Hydra (from ``conf_dir``, the shipped ``conf/`` unless a test gives a copy)
    and validate it; raise ConfigError with every problem."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    parsed = _check_overrides(overrides, conf_dir)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3", job_name="launcher"):
            composed = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    except HydraException as e:
        raise ConfigError([_composition_error(str(e), [(o.key_or_group, o.input_line) for o in parsed])]) from None
    choices = {k: v for k, v in composed.hydra.runtime.choices.items() if not k.startswith("hydra") and v}
    with open_dict(composed):
        del composed["hydra"]
    try:
        raw: Any = OmegaConf.to_container(composed, resolve=True)
    except OmegaConfBaseException as e:  # an interpolation in an override: ${oc.env:UNSET}, ${nope}, ${hydra:...}
        key = getattr(e, "full_key", None) or "the command line"
        why = str(e).splitlines()[0] if str(e) else type(e).__name__  # the lines after it restate the key
        raise ConfigError([f"{key}: cannot resolve its interpolation: {why}"]) from None
    raw["choices"] = {k: str(v) for k, v in choices.items() if k not in HIDDEN_GROUPS}
    return validate(raw)


def _check_overrides(overrides: list[str], conf_dir: Path) -> list[Any]:
    """Hydra's parsed overrides, each checked before composition: parseable, one value, a known group
    choice or key (ConfigError with every problem, each naming its argument or key)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    parser = OverridesParser.create()
    parsed = []
    errors: list[str] = []
    for text in overrides:  # one at a time, so that each error names its argument
        try:
            (o,) = parser.parse_overrides([text])
        except HydraException as e:
            errors.append(f"`{text}`: cannot parse this argument: {_one_line(str(e))}")
            continue
        if not o.key_or_group:
            errors.append(f"`{text}`: no key before '='")
        else:
            parsed.append(o)
    groups = {d.name for d in conf_dir.iterdir() if d.is_dir()} - HIDDEN_GROUPS
    recipe = "bert"
    keys = []
    for o in parsed:
        key = o.key_or_group
        if key in HIDDEN_GROUPS or key == "hydra" or key.startswith(("hydra.", "hydra/")):
            errors.append(f"{key}: set by the launcher itself; not an override")
        elif o.package is not None:
            errors.append(f"{key}@{o.package}: packages (`@`) are not supported; give `{key}=...` alone")
        elif o.is_sweep_override():
            errors.append(
                f"{key}: `{o.input_line}` is a sweep, and the launcher runs one config: give one value "
                "(a list is written [a,b]; a string with a comma is quoted: 'a,b')"
            )
        elif key in groups and o.is_delete():
            errors.append(f"{key}: a group cannot be deleted; choose one of {', '.join(_choices(key, conf_dir))}")
        elif key in groups:
            value = o.value()
            if not isinstance(value, str) or value not in _choices(key, conf_dir):
                errors.append(unknown_choice(key, str(value), _choices(key, conf_dir)))
            elif key == "recipe":
                recipe = str(OmegaConf.load(conf_dir / "recipe" / f"{value}.yaml").name)  # a variant names its recipe
        elif not o.is_add():
            keys.append(key)
    errors += check_override_keys(keys, recipe)
    if errors:
        raise ConfigError(errors)
    return parsed


def _one_line(text: str) -> str:
    """Hydra's and OmegaConf's multi-line messages as one line (without the caret under the argument)."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip() not in ("", "^"))


def _composition_error(message: str, overrides: list[tuple[str, str | None]]) -> str:
    """Hydra's composition error, led by the key of the override it names (the longest, if several match);
    ``overrides``: (key, the argument as given)."""
    named = [k for k, given in overrides if f"'{k}" in message or f" {k}=" in message or (given and given in message)]
    text = _one_line(message)
    return f"{max(named, key=len)}: {text}" if named else text


def _choices(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


def process_started() -> float:
    """When this process started, as a wall-clock time (interpreter start and imports count as
    start-up too): from /proc to 10 ms, where psutil's boot-time arithmetic can be a second off."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, IndexError, ValueError, AttributeError):  # not Linux
        import psutil

        return float(psutil.Process().create_time())


def _plan(cfg: Config) -> int:
    """``action=plan``: the plan for the described hardware, printed; Ray is never started."""
    from launcher.console import show_plan
    from launcher.launch import build_plan

    if cfg.cluster.kind == "ray" and not cfg.cluster.gpus_per_node:  # plan the cluster's real hardware
        from launcher import cluster

        cluster.connect(cfg.cluster)
        try:
            p = build_plan(cfg, None)
        finally:
            cluster.stop(Path())
    else:
        p = build_plan(cfg, None)
    if cfg.plan.format == "json":
        print(json.dumps(p.to_dict(), indent=2))
    else:
        show_plan(p)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
