"""The commands shown in README.md and docs/*.md work: every ``action=plan`` one is run; every other
one says, in a comment, why it is not run here.

A command is a line of a fenced code block (not ``text``, ``yaml`` or ``json``) that starts, after an
optional ``$ ``, with a program a user types (``python``, ``make``, ``ray``, ``kubectl``, ...); ``\\``
continuations are joined. An ``action=plan`` command (``make plan`` too) is run from a temporary folder
and must exit 0 and print the plan. Any other command, or a plan command that needs a Ray cluster,
needs a comment, its own (``# ...`` after it) or the nearest comment line above it in the block, that
gives a reason from ``WHY_NOT_RUN`` or names an existing test file (``tests/...py``) that covers it.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROGRAMS = {"python", "make", "ray", "kubectl", "docker", "export", "pip", "mlflow", "torchrun", "curl"}
NOT_COMMANDS = {"text", "yaml", "json"}  # fences whose lines are output, diagrams or data
WHY_NOT_RUN = ("trains", "installs", "runs the tests", "needs a Ray cluster", "on a cluster's node", "needs Kubernetes",
               "needs Docker", "needs the dataset", "fails on purpose")  # fmt: skip


def commands(doc: Path) -> list[tuple[int, str, str]]:
    """(line, command, the comment that goes with it) for each command in ``doc``'s code blocks."""
    found: list[tuple[int, str, str]] = []
    fence: str | None = None
    above = ""  # the nearest comment line above, in this block
    lines = doc.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if line.startswith("```"):
            fence, above = (None, "") if fence is not None else (line[3:].strip(), "")
            continue
        if fence is None or fence in NOT_COMMANDS:
            continue
        if line.startswith("#"):  # consecutive comment lines are one comment
            above = f"{above} {line.lstrip('# ')}" if lines[i - 2].strip().startswith("#") else line.lstrip("# ")
            continue
        start = i
        text = line.removeprefix("$ ")
        while text.endswith("\\") and i < len(lines):
            text = text[:-1] + " " + lines[i].strip()
            i += 1
        if text.split(" ", 1)[0] not in PROGRAMS:
            continue
        command, _, comment = text.partition(" #")
        found.append((start, " ".join(command.split()), f"{comment.strip()} {above}".strip()))
    return found


ALL = [(doc.relative_to(ROOT).as_posix(), line, cmd, why) for doc in DOCS for line, cmd, why in commands(doc)]


def is_plan(command: str) -> bool:
    return command == "make plan" or (command.startswith("python -m launcher") and "action=plan" in command.split())


def needs_cluster(command: str) -> bool:
    return "cluster=ray" in command.split()


def reason(comment: str) -> str | None:
    """What in ``comment`` says why its command is not run here; None if nothing does."""
    for test in re.findall(r"tests/[\w/]+\.py", comment):
        if (ROOT / test).exists():
            return test
    return next((why for why in WHY_NOT_RUN if why in comment), None)


def test_the_docs_show_commands_of_both_kinds() -> None:
    """The parser finds them (a change of fence style would otherwise pass every test below unnoticed)."""
    assert sum(is_plan(c) and not needs_cluster(c) for _, _, c, _ in ALL) >= 3
    assert sum(not is_plan(c) for _, _, c, _ in ALL) >= 15
    assert reason("# trains on 2 CPU workers") == "trains" and reason("# see tests/unit/test_docs.py") is not None
    assert reason("# prints the job id") is None and reason("# tests/unit/nothing_here.py") is None


@pytest.mark.parametrize(
    ("doc", "line", "command", "comment"), [c for c in ALL if not is_plan(c[2]) or needs_cluster(c[2])]
)
def test_a_command_not_run_here_says_why(doc: str, line: int, command: str, comment: str) -> None:
    assert reason(comment), (
        f"{doc}:{line}: `{command}` is not run by the tests; give it a comment saying why "
        f"(one of {', '.join(WHY_NOT_RUN)}, or the tests/...py file that covers it)"
        + (f"; its comment is `{comment}`" if comment else "")
    )


@pytest.mark.parametrize(("doc", "line", "command"), [c[:3] for c in ALL if is_plan(c[2]) and not needs_cluster(c[2])])
def test_a_plan_command_shown_works(doc: str, line: int, command: str, tmp_path: Path) -> None:
    words = shlex.split(command)
    if words[:2] == ["make", "plan"]:  # its recipe, with this venv's python
        recipe = next(r for r in (ROOT / "Makefile").read_text().splitlines() if "-m launcher action=plan" in r)
        words = ["python", *shlex.split(recipe.strip())[1:]]
    assert words[:3] == ["python", "-m", "launcher"], f"{doc}:{line}: {command}"
    out = subprocess.run(
        [sys.executable, *words[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )  # LAUNCHER_CACHE: the session's memory-estimate cache (conftest), so a repeated estimate is cheap
    said = out.stdout[-2000:] + out.stderr[-2000:]
    assert out.returncode == 0, f"{doc}:{line}: `{command}` exited {out.returncode}:\n{said}"
    assert "micro-batch / device" in out.stdout and "why:" in out.stdout, f"{doc}:{line}: no plan in:\n{out.stdout}"
