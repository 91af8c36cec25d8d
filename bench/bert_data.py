"""BERT data preparation (tokenizer, sentence pairs) on a generated corpus, phase by phase; and the
streamed, linear-time preparation against the original one (``recipes/bert.py`` at ``--baseline``).

The corpus is ``tests/conftest.py: write_corpus``: documents of made-up words drawn Zipf-like, the
same text for a seed. Each preparation runs in its own process (``--one``), so its peak memory is
its own. Writes ``bench/results/bert_data.json`` and prints the table. Run from the repository root:

    python bench/bert_data.py                       # 32 MiB at scale=full; 12 MiB against the original
    python bench/bert_data.py --mb 64 --compare-mb 6 24 --settings full "smoke sizes"
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WORK = ROOT / "bench" / "work" / "bert_data"
RESULTS = ROOT / "bench" / "results"
BASELINE = "cfa1940"  # the last commit with the per-document preparation
SETTINGS = {  # overrides on top of recipe=bert scale=full (BERT-base: 512 tokens, 30,522 WordPieces)
    "full": [],
    "smoke sizes": ["recipe.seq_len=64", "recipe.model.vocab_size=4000"],  # many short pairs
}
PHASE = re.compile(r"^bert data: (?P<phase>\w+)[^:]* done: (?P<counts>.*) in (?P<s>[\d.]+) s$")


class Tee(io.StringIO):
    def write(self, s: str) -> int:
        sys.__stdout__.write(s)
        return super().write(s)


def one(which: str, corpus: Path, setting: str, where: Path) -> dict[str, Any]:
    """One preparation in this process: ``new`` (recipes/bert.py) or ``baseline`` (at BASELINE)."""
    from launcher.cli import load

    cfg = load(["recipe=bert", f"data.path={corpus}", *SETTINGS[setting]])
    if which == "new":
        from recipes import bert
    else:
        source = WORK / f"bert_{BASELINE}.py"
        source.write_text(subprocess.run(["git", "show", f"{BASELINE}:recipes/bert.py"], cwd=ROOT, check=True,
                                         capture_output=True, text=True).stdout)  # fmt: skip
        spec = importlib.util.spec_from_file_location("bert_baseline", source)
        assert spec is not None and spec.loader is not None
        bert = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bert)
    out = Tee()
    started = time.perf_counter()
    with contextlib.redirect_stdout(out):
        bert._prepare(cfg, where)
    wall = time.perf_counter() - started
    phases = {m["phase"]: {"s": float(m["s"]), "counts": m["counts"]}
              for m in map(PHASE.match, out.getvalue().splitlines()) if m}  # fmt: skip
    return {"wall_s": wall, "phases": phases, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_one(which: str, corpus: Path, setting: str, where: Path) -> dict[str, Any]:
    where.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--one", which, f"--corpus={corpus}", f"--setting={setting}", f"--where={where}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, env=env)
    print(out.stdout, end="")
    return json.loads(out.stdout.splitlines()[-1])


def same_pairs(a: Path, b: Path) -> bool:
    """The same pairs of the same tokens (the original numbered its vocabulary in hash-map order)."""
    import torch
    from tokenizers import Tokenizer

    pa, pb = (torch.load(d / "pairs.pt", weights_only=True) for d in (a, b))
    ta, tb = (Tokenizer.from_file(str(d / "tokenizer.json")) for d in (a, b))
    if any(not torch.equal(pa[k], pb[k]) for k in ("offsets", "len_a", "label")):
        return False
    to_b = torch.tensor([tb.token_to_id(ta.id_to_token(i)) or -1 for i in range(ta.get_vocab_size())])
    return bool(torch.equal(to_b[pa["tokens"].long()], pb["tokens"].long()))


def corpus_of(mb: float) -> tuple[Path, float]:
    from tests.conftest import write_corpus

    path = WORK / f"corpus-{mb:g}mb" / "corpus.txt"
    started = time.perf_counter()
    write_corpus(path, mb, seed=0)
    return path, time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=32, help="the corpus the new preparation is timed on")
    ap.add_argument("--compare-mb", type=float, nargs="+", default=[12], help="the corpora both preparations run on")
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=["full"],
                    help="the settings both preparations run at (make bench: full sizes only)")
    ap.add_argument("--one", choices=["new", "baseline"], help=argparse.SUPPRESS)
    ap.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--setting", default="full", help=argparse.SUPPRESS)
    ap.add_argument("--where", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.corpus, args.setting, args.where)))
        return
    WORK.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    big, made_s = corpus_of(args.mb)
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        full = {"corpus_mb": args.mb, "corpus_s": made_s, **run_one("new", big, "full", Path(tmp) / "full")}
        rows = []
        for mb in args.compare_mb:
            small, _ = corpus_of(mb)
            for setting in args.settings:
                new, old = (run_one(w, small, setting, Path(tmp) / f"{mb}-{setting}-{w}") for w in ("new", "baseline"))
                same = same_pairs(Path(tmp) / f"{mb}-{setting}-new", Path(tmp) / f"{mb}-{setting}-baseline")
                rows.append({"setting": setting, "overrides": SETTINGS[setting], "corpus_mb": mb, "new": new,
                             "baseline": old, "speedup": old["wall_s"] / new["wall_s"],
                             "same_pairs": same})  # fmt: skip
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    record = {
        "name": "bert_data",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python bench/bert_data.py", *sys.argv[1:]]),
        "device": f"CPU: {cpu}, {os.cpu_count()} cores",
        "load_average": {"at_start": load, "at_end": os.getloadavg()[0]},  # the machine is shared
        "versions": {"python": platform.python_version(), "tokenizers": __import__("tokenizers").__version__},
        "corpus": "tests/conftest.py write_corpus(seed=0): 2-12 sentences of 5-24 made-up words (Zipf over 20,000)",
        "workload": "recipe=bert scale=full data.path=<corpus>: BERT-base sizes, 512-token pairs, 30,522 WordPieces",
        "baseline": f"recipes/bert.py at {BASELINE} (per-document lists; a list of every other document per random B)",
        "full": full,
        "compare": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bert_data.json").write_text(json.dumps(record, indent=2) + "\n")
    from bench.tables import bert_data_compare, bert_data_phases

    print("\n".join(["", *bert_data_phases(record), "", *bert_data_compare(record)]))


if __name__ == "__main__":
    main()
