"""BENCHMARKS.md's tables, generated from ``bench/results/*.json``: ``python bench/tables.py`` (run by ``make bench``).

Each generated table sits between two markers in BENCHMARKS.md::

    <!-- table:cpu_smoke:throughput -->

    | ... |

    <!-- /table -->

``cpu_smoke`` names the results file (``bench/results/cpu_smoke.json``), ``throughput`` the table
(a key of ``TABLES``). The script rewrites only the text between the markers: the row labels live
here, every number comes from the JSON; the prose around them is left as it is. Running it twice
changes nothing. Tables without markers (hand-measured sections that no JSON backs) are not touched.

    python bench/tables.py            # rewrite BENCHMARKS.md's generated tables
    python bench/tables.py --check    # exit 1 when BENCHMARKS.md is out of date (prints the diff)
    python bench/tables.py --print gpu:throughput   # one table on stdout, no markers

No third-party imports: ``bench/gpu.py`` prints its tables with this module.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "BENCHMARKS.md"
RESULTS = ROOT / "bench" / "results"
MARKED = re.compile(
    r"(?P<open><!-- table:(?P<file>[\w-]+):(?P<table>[\w-]+) -->\n)(?P<body>.*?)(?P<close><!-- /table -->)", re.DOTALL
)

Json = dict[str, Any]


def _row(*cells: object) -> str:
    return "|" + "|".join(f" {c} " if c != "" else " " for c in cells) + "|"


def _head(*cells: str) -> list[str]:
    return [_row(*cells), "|" + "---|" * len(cells)]


# ---------------------------------------------------------------- cpu_smoke.json (bench/run.py)


def cpu_smoke_throughput(d: Json) -> list[str]:
    """The launcher against torchrun + a plain DDP loop: start, steady throughput, wall."""
    ours, plain = d["launcher"], d["torchrun_plain_ddp"]

    def repeats(r: Json, key: str) -> str:
        return ", ".join(f"{x[key]:.1f}" for x in r.get("repeats", []))

    start = ours["time_to_first_step_s"] / plain["time_to_first_step_s"]
    slower = f"{start:.1f}x slower start" if start >= 1 else f"{1 / start:.1f}x faster start"
    return [
        *_head("", "time to first optimizer step (s)", "steady samples/s", "wall (s)"),
        _row("launcher (Ray Train, MLflow logging every 10 steps)",
             f"{ours['time_to_first_step_s']:.1f} ({repeats(ours, 'time_to_first_step_s')})",
             f"{ours['samples_per_s']:.1f} ({repeats(ours, 'samples_per_s')})", f"{ours['wall_s']:.1f}"),
        _row("torchrun + plain DDP", f"{plain['time_to_first_step_s']:.1f}", f"{plain['samples_per_s']:.1f}",
             f"{plain['wall_s']:.1f}"),
        _row("launcher / plain", slower, f"**{d['throughput_ratio']:.3f}**", ""),
    ]  # fmt: skip


STARTUP = [  # (phase, the launcher's cell, the plain script's cell): {key} is that side's startup_<key>_s
    ("process start to `main()`: interpreter, imports, Hydra composition, validation", "{config} (config)",
     "{process} (torchrun's agent forks the ranks) + {imports} (imports)"),
    ("data: build or read the tokenizer/pairs cache (driver)", "{data}", "{data} (in each rank)"),
    ("plan: hardware, memory profile (cached), planner", "{plan}", "-"),
    ("the MLflow run (import, store, the run with its config and plan) and the embedded Ray's start, side by "
     "side, until both are done", "{tracking_and_ray}", "-"),
    ("workers: Ray Train controller, worker group, process group (gloo)", "{workers}",
     "{process_group} (process group)"),
    ("worker data: the rank's dataset from the cache", "{worker_data}", "(above)"),
    ("model: build, DDP wrap, optimizer, checkpoint lookup, DataLoader", "{worker_model}", "{model}"),
    ("first step: first batches, forward, backward, optimizer step", "{first_step}", "{first_step}"),
]  # fmt: skip


def cpu_smoke_startup(d: Json) -> list[str]:
    """Start-up phase by phase, both sides (medians of the runs)."""
    ours, plain = d["launcher"], d["torchrun_plain_ddp"]

    def phases(r: Json) -> dict[str, str]:
        return {k.removeprefix("startup_").removesuffix("_s"): f"{v:.2f}" for k, v in r["startup"].items()
                if k.startswith("startup_")}  # fmt: skip

    mine, theirs = phases(ours), phases(plain)
    own = sum(float(v) for k, v in mine.items() if k != "workers")
    # the two overlap, and each is stamped when it is done: one row for both (whichever ends first gets the
    # time since the phase before, the other the rest)
    mine["tracking_and_ray"] = f"{float(mine.get('tracking', 0)) + float(mine.get('ray', 0)):.2f}"
    return [
        *_head("phase", "launcher", "torchrun + plain DDP"),
        *(_row(name, a.format(**mine), b.format(**theirs)) for name, a, b in STARTUP),
        _row("the launcher's own phases (all but Ray Train's worker group) against torchrun's whole start-up",
             f"{own:.2f}",
             f"{plain['time_to_first_step_s']:.2f}"),
        _row("**command to first optimizer step**", f"**{ours['time_to_first_step_s']:.1f}**",
             f"**{plain['time_to_first_step_s']:.1f}**"),
    ]


def cpu_smoke_step(d: Json) -> list[str]:
    """Step against step in one process group (bench/step_overhead.py), the whole runs' ratio beside it."""
    s, ours, plain = d["step_vs_step"], d["launcher"], d["torchrun_plain_ddp"]
    runs = len(ours.get("repeats", [])) or 1
    return [
        *_head("", "plain DDP", "launcher", "launcher / plain throughput"),
        _row(f"step against step: median step time (ms), {s['steps']} paired steps",
             f"{s['step_ms_plain']:.1f}", f"{s['step_ms_launcher']:.1f}",
             f"**{s['ratio']:.3f}** (median of the per-step ratios; goal: at least 0.98)"),
        _row(f"whole runs: steady samples/s, median of {runs} runs each", f"{plain['samples_per_s']:.1f}",
             f"{ours['samples_per_s']:.1f}", f"**{d['throughput_ratio']:.3f}**"),
    ]  # fmt: skip


PARTS = {"warm_up": "warm-up: the data cache and the memory estimate", "whole_runs": "whole runs, both sides",
         "step_vs_step": "step against step (`bench/step_overhead.py`)",
         "noise_overhead": "the noise scale's cost (`bench/noise_overhead.py`)",
         "batch_finders": "batch-size finders (`bench/batch_finders.py`)",
         "resize": "node-loss recovery (`bench/resize.py`)",
         "bert_data": "BERT data preparation (`bench/bert_data.py`)"}  # fmt: skip


def cpu_smoke_parts(d: Json) -> list[str]:
    """``make bench``'s wall time, part by part (bench/run.py)."""
    walls = d["wall_s"]
    lines = _head("part", "wall (s)")
    lines += [_row(name, f"{walls[k]:.0f}") for k, name in PARTS.items() if k in walls]
    if "total" not in walls:  # bench/run.py: cpu_smoke() run alone
        return [*lines, _row("**`make bench` in all**", "not measured: only the parts above ran")]
    return [*lines, _row("**`make bench` in all**", f"**{walls['total']:.0f}** ({walls['total'] / 60:.1f} min)")]


def about(d: Json) -> list[str]:
    """When, where and with what a results file was measured: whichever of those it records."""
    versions = d.get("versions") or ({"python": d["python"]} if "python" in d else {})
    load = d.get("load_average_at_start", d.get("load_average"))
    if isinstance(load, dict):
        load = f"{load['at_start']:.1f} at the start, {load['at_end']:.1f} at the end"
    elif load is not None:
        load = f"{load:.1f} at the start"
    cells = {"date": d.get("date"), "device": d.get("device"), "load average (1 min)": load,
             "versions": ", ".join(f"{k} {v}" for k, v in versions.items()) or None,
             "command": d.get("command")}  # fmt: skip
    return [*_head("", ""), *(_row(k, f"`{v}`" if k == "command" else v) for k, v in cells.items() if v)]


def cpu_smoke_noise(d: Json) -> list[str]:
    """``train.measure_noise_scale``'s cost, paired steps (bench/noise_overhead.py)."""
    n = d["noise_scale_overhead"]
    return [
        *_head("", "step time (median, ms)"),
        _row("`DDPStep` without the noise scale", f"{n['step_ms_without']:.1f}"),
        _row("with it (per-bucket squared norm before DDP's all-reduce, the global norm, the estimator)",
             f"{n['step_ms_with']:.1f}"),
        _row("overhead", f"**{100 * n['overhead']:.2f}%** (target: under 3%)"),
    ]


# ---------------------------------------------------------------- batch_finders.json (bench/batch_finders.py)


def _share(r: Json) -> str:
    return f"{r['of_true_max']:.0%}" if r.get("of_true_max") is not None else "-"


def batch_finders_quality(d: Json) -> list[str]:
    """The largest micro-batch under a budget: the true maximum, the planner, Lightning, Accelerate."""

    def found(r: Json) -> str:
        if "error" in r:
            return "error"
        if "not_run" in r:
            return "not run"
        return f"{r['max']}, {_share(r)}, {r['steps']} steps, {r['seconds']:.1f} s"

    def fits(ok: Any) -> str:
        return "fits" if ok else "OOM"

    lines = _head("model", "budget", "true max (trials)", "planner: bound, share of max, steps, fits",
                  "planner at `planner.headroom=0`", "Lightning `power`: found, share, steps, time",
                  "Lightning `binsearch`", "Accelerate")
    for row in d["rows"]:
        p, true = row["planner"], row["exhaustive"]
        planner = bare = "error"
        if "error" not in p:
            planner = f"{p['max']}, {_share(p)}, {p['steps']} steps ({p['seconds']:.1f} s), {fits(p.get('fits'))}"
            share = p.get("of_true_max_headroom_0")
            bare = f"{p['max_headroom_0']}, {f'{share:.0%}' if share else '-'}, {fits(p.get('fits_headroom_0'))}"
        lines.append(_row(row["scenario"], f"{row['budget_gb']:g} GB", f"{true['max']} ({true['trials']})", planner,
                          bare, found(row["lightning_power"]), found(row["lightning_binsearch"]),
                          found(row["accelerate"])))
    return lines


FINDER_MODELS = {"cnn": "ResNet-18, 64 px", "resnet50": "ResNet-50, 96 px", "bert-base": "BERT-base, 32 tokens"}


def measured_fit(row: Json) -> tuple[float, float] | None:
    """(per-sample GB, fixed GB) fitted through the capped peaks at the planner's size and the true maximum."""
    p, true = row["planner"], row["exhaustive"]
    a, b = p.get("max"), true.get("max")
    pa, pb = p.get("measured_peak_gb_at_max"), true.get("peak_gb_at_max")
    if not (a and b and pa and pb) or a == b:
        return None
    slope = (pb - pa) / (b - a)
    return slope, pa - a * slope


def batch_finders_estimate(d: Json) -> list[str]:
    """The device-free estimate against the capped peaks, per model."""
    lines = _head("model", "peak at the true max: predicted / measured", "bytes per sample: estimate / measured",
                  "fixed part: estimate / measured")
    for row in d["rows"]:
        p, true, fit = row["planner"], row["exhaustive"], measured_fit(row)
        name = FINDER_MODELS.get(row["scenario"], row["scenario"])
        if "error" in p or fit is None or not p.get("predicted_gb_at_true_max"):
            lines.append(_row(name, "-", "-", "-"))
            continue
        slope, fixed = fit
        lines.append(_row(
            name,
            f"{p['predicted_gb_at_true_max']:.3f} / {true['peak_gb_at_max']:.3f} GB "
            f"({p['predicted_over_measured'] - 1:+.1%})",
            f"{1024 * p['per_sample_gb']:.1f} / {1024 * slope:.1f} MB ({p['per_sample_gb'] / slope - 1:+.0%})",
            f"{p['model_states_gb']:.3f} / {fixed:.3f} GB ({p['model_states_gb'] / fixed - 1:+.0%})",
        ))
    return lines


# ---------------------------------------------------------------- memory_trackers.json (bench/memory_trackers.py)


def memory_trackers_compare(d: Json) -> list[str]:
    """Three accountings of the step's memory against the capped peak, at the measured true maximum."""

    def gb(r: Json, key: str) -> str:
        if r.get(key) is None:
            return "-"
        off = f" ({r[key] / r['measured_gb'] - 1:+.1%})" if r.get("measured_gb") else ""
        return f"{r[key]:.3f}{off}"

    lines = _head("model", "micro-batch", "measured peak (GB)", "states + saved (the old estimate)",
                  "MemTracker, one step (s)", "`Timeline`, one step (s)", "the estimate (fitted line)")
    for r in d["rows"]:
        name = FINDER_MODELS.get(r["scenario"], "Mask R-CNN, 800 px" if r["scenario"] == "coco" else r["scenario"])
        mt = ("fails: " + r["memtracker_error"]) if r.get("memtracker_error") else (
            f"{gb(r, 'memtracker_gb')}, {r['memtracker_step_s']:.2f} s")
        lines.append(_row(name, r["true_max"], f"{r['measured_gb']:.3f}" if r.get("measured_gb") else "-",
                          gb(r, "states_plus_saved_gb"), mt, f"{gb(r, 'timeline_gb')}, {r['timeline_step_s']:.2f} s",
                          gb(r, "estimate_gb")))
    return lines


# ---------------------------------------------------------------- resize.json (bench/resize.py)

RESIZE_PHASES = {"detection_s": "detection", "restart_s": "restart", "replan_s": "re-plan", "data_s": "data",
                 "restore_s": "restore", "first_step_s": "first step", "total_s": "total"}  # fmt: skip
RESIZE_RUNS = {"fixed": "fixed, node replaced at once"}  # the JSON's run names -> the table's, where they differ


def resize_recovery(d: Json) -> list[str]:
    """From a node's loss to the first step after it, phase by phase."""
    lines = _head("run", "worlds (step, size)", *(f"{v} (s)" for v in RESIZE_PHASES.values()))
    for r in d["rows"]:
        worlds = ", ".join(f"({step}, {size})" for step, size in r["worlds"])
        lines.append(_row(RESIZE_RUNS.get(r["name"], r["name"]), worlds, *(f"{r[k]:.1f}" for k in RESIZE_PHASES)))
    return lines


# ---------------------------------------------------------------- bert_data.json (bench/bert_data.py)

BERT_PHASES = {"reading": "reading, the tokenizer counting words", "tokenizer": "the tokenizer's vocabulary",
               "encoding": "encoding (the sentences spooled to disk)", "pairs": "sentence pairs"}  # fmt: skip


def bert_data_phases(d: Json) -> list[str]:
    """The streamed preparation at ``scale=full`` on the large corpus, phase by phase."""
    full = d["full"]
    lines = _head("phase", "time (s)", "counts (rate)")
    for key, name in BERT_PHASES.items():
        phase = full["phases"][key]
        lines.append(_row(name, f"{phase['s']:.1f}", phase["counts"]))
    lines.append(_row(f"**total, {full['corpus_mb']:g} MiB corpus**", f"**{full['wall_s']:.1f}**",
                      f"peak memory {full['peak_rss_mb']:,.0f} MB"))
    return lines


def bert_data_compare(d: Json) -> list[str]:
    """The original preparation against the streamed one, same corpus and settings."""
    lines = _head("settings", "corpus", "pairs", "original (s)", "streamed (s)", "speed-up", "same pairs",
                  "peak memory, original / streamed (MB)")  # fmt: skip
    for r in d["compare"]:
        settings = f"{r['setting']}" + (f" (`{' '.join(r['overrides'])}`)" if r["overrides"] else "")
        pairs = r["new"]["phases"]["pairs"]["counts"].rsplit("pairs ", 1)[-1]
        lines.append(_row(settings, f"{r['corpus_mb']:g} MiB", pairs, f"{r['baseline']['wall_s']:.1f}",
                          f"{r['new']['wall_s']:.1f}", f"**{r['speedup']:.1f}x**", "yes" if r["same_pairs"] else "no",
                          f"{r['baseline']['peak_rss_mb']:,.0f} / {r['new']['peak_rss_mb']:,.0f}"))  # fmt: skip
    return lines


# ---------------------------------------------------------------- full_scale.json (make test-full)

FULL_MODELS = {"bert": "BERT-base, 512-token pairs", "imagenet": "ResNet-50, 224 px crops",
               "coco": "Mask R-CNN R50-FPN, 800-1333 px"}  # fmt: skip
FULL_PHASES = {"data": "data", "plan": "plan", "workers": "workers", "worker_model": "model",
               "first_step": "first step"}  # the start-up phases shown (startup_<key>_s)  # fmt: skip
FULL_UNPINNED = {"recipe", "scale", "data.path", "train.log_every", "cluster"}  # overrides not shown as pinned


def full_scale_runs(d: Json) -> list[str]:
    """Each recipe at ``scale=full`` on its generated tree: time to first step by phase, wall, and
    the evaluation against the val split (tests/integration/test_full_scale.py)."""
    lines = [f"- **Command / date / device**: `{d['command']}`, {d['date'][:16].replace('T', ' ')} UTC, {d['device']} "
             f"(load average {d['load_average']:.1f} at the end); **{d['wall_s'] / 60:.1f} min** for the tier "
             "(the trees built, the three runs)", "",
             *_head("recipe", "model, input", "data (generated)", "train / val", "pinned", "tree built (s)",
                    "time to first step (s), by phase", "command wall (s)", "evaluated")]  # fmt: skip
    for name, r in d["runs"].items():
        phases = ", ".join(f"{label} {r['startup'][k]:.1f}" for k, label in FULL_PHASES.items() if k in r["startup"])
        pinned = " ".join(f"`{o}`" for o in r["overrides"] if o.split("=")[0] not in FULL_UNPINNED)
        lines.append(_row(name, FULL_MODELS.get(name, "-"), r["data"], f"{r['train']:,} / {r['val']:,}", pinned,
                          f"{r['tree_s']:.1f}", f"**{r['time_to_first_step_s']:.1f}** ({phases})",
                          f"**{r['wall_s']:.1f}**", f"{r['eval_samples']:,.0f} of {r['val']:,}"))  # fmt: skip
    return lines


# ---------------------------------------------------------------- gpu.json (bench/gpu.py)


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def gpu_throughput(d: Json) -> list[str]:
    """Samples/s of the plain loop and of the launcher's step, paired; MFU."""
    lines = _head("workload", "micro-batch", "plain loop (samples/s)", "launcher `DDPStep` (samples/s)",
                  "launcher / plain", "MFU, 6 x params per token (launcher)", "MFU, counted FLOPs (launcher)")
    for name, w in d["workloads"].items():
        if "error" in w:
            lines.append(_row(name, w.get("micro_batch", "-"), "error", "error", "-", "-", "-"))
            continue
        mfu_6n, counted = w.get("mfu_6n") or {}, w.get("mfu_counted") or {}
        lines.append(_row(w["what"], w["micro_batch"], f"{w['plain']['samples_per_s']:.1f}",
                          f"{w['launcher']['samples_per_s']:.1f}", f"**{w['launcher_vs_plain']:.3f}**",
                          _num(mfu_6n.get("launcher"), ".1%"), _num(counted.get("launcher"), ".1%")))
    return lines


def gpu_memory(d: Json) -> list[str]:
    """The memory profile's predicted peak against the measured one, at the benchmark's micro-batch."""
    lines = _head("workload", "micro-batch", "predicted peak (GB, source)", "device-free estimate (GB)",
                  "measured peak (GB)", "predicted / measured")
    for name, w in d["workloads"].items():
        m = w.get("memory")
        if not m:
            lines.append(_row(name, w.get("micro_batch", "-"), "error", "-", "-", "-"))
            continue
        lines.append(_row(w.get("what", name), w["micro_batch"], f"{m['predicted_gb']:.2f} ({m['predicted_source']})",
                          f"{m['estimate_gb']:.2f}", f"{m['measured_gb']:.2f}", f"{m['predicted_over_measured']:.2f}"))
    return lines


TABLES: dict[str, Callable[[Json], list[str]]] = {
    "cpu_smoke:parts": cpu_smoke_parts,
    "cpu_smoke:about": about,
    "cpu_smoke:throughput": cpu_smoke_throughput,
    "cpu_smoke:step": cpu_smoke_step,
    "cpu_smoke:startup": cpu_smoke_startup,
    "cpu_smoke:noise": cpu_smoke_noise,
    "batch_finders:about": about,
    "batch_finders:quality": batch_finders_quality,
    "batch_finders:estimate": batch_finders_estimate,
    "memory_trackers:compare": memory_trackers_compare,
    "resize:about": about,
    "resize:recovery": resize_recovery,
    "bert_data:about": about,
    "bert_data:phases": bert_data_phases,
    "bert_data:compare": bert_data_compare,
    "full_scale:runs": full_scale_runs,
    "gpu:throughput": gpu_throughput,
    "gpu:memory": gpu_memory,
}


# ---------------------------------------------------------------- the document


def render_table(key: str, results: Path) -> str:
    """Table ``key`` (``<file>:<table>``) from ``results/<file>.json``, as markdown lines."""
    if key not in TABLES:
        raise SystemExit(f"bench/tables.py: no table {key!r}; the tables: {', '.join(TABLES)}")
    path = results / f"{key.split(':')[0]}.json"
    if not path.exists():
        raise SystemExit(f"bench/tables.py: {key} needs {path}, which does not exist (run its benchmark first)")
    data = json.loads(path.read_text())
    if data.get("dry_run"):
        raise SystemExit(f"bench/tables.py: {path} is a --dry-run's output (tiny sizes on CPU), not a measurement")
    return "\n".join(TABLES[key](data))


def render(doc: str, results: Path) -> str:
    """``doc`` with every marked table regenerated from ``results``; the rest unchanged."""

    def one(m: re.Match[str]) -> str:
        return f"{m['open']}\n{render_table(m['file'] + ':' + m['table'], results)}\n\n{m['close']}"

    return MARKED.sub(one, doc)


def unmarked(doc: str, results: Path) -> list[str]:
    """Tables of results files present in ``results`` that ``doc`` has no markers for."""
    marked = {f"{m['file']}:{m['table']}" for m in MARKED.finditer(doc)}
    present = {p.stem for p in results.glob("*.json")}
    return [k for k in TABLES if k.split(":")[0] in present and k not in marked]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 when the document is out of date")
    ap.add_argument("--print", dest="table", metavar="FILE:TABLE", help="print one table, e.g. gpu:throughput")
    ap.add_argument("--doc", type=Path, default=DOC, help="default: BENCHMARKS.md")
    ap.add_argument("--results", type=Path, default=RESULTS, help="default: bench/results")
    args = ap.parse_args(argv)
    if args.table:
        print(render_table(args.table, args.results))
        return 0
    before = args.doc.read_text()
    after = render(before, args.results)
    missing = unmarked(before, args.results)
    if missing:
        print(f"bench/tables.py: {args.doc.name} has no markers for {', '.join(missing)}; add "
              f"'<!-- table:FILE:TABLE -->' and '<!-- /table -->' lines where each belongs", file=sys.stderr)
    if args.check:
        if after != before:
            sys.stdout.writelines(difflib.unified_diff(before.splitlines(True), after.splitlines(True),
                                                       str(args.doc), f"{args.doc} (from {args.results})"))
            print(f"bench/tables.py: {args.doc} is out of date; run python bench/tables.py", file=sys.stderr)
        return 1 if after != before or missing else 0
    if after != before:
        args.doc.write_text(after)
        print(f"bench/tables.py: rewrote the generated tables in {args.doc}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
