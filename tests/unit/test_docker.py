"""The Docker image installs what ``make setup`` installs, without a Docker engine (none is available to tests).

"The same" means: the same ``pip install`` steps in the same order (torch + torchvision first, as a
pair, then the package), each under ``-c constraints.txt``, and the package with the same extras as
``make setup``'s except ``dev`` (the test and lint tools) and ``bench`` (``make bench``'s
comparison libraries), which the image does not need. Options that do not change what is installed
(``-q``, ``--no-cache-dir``) are ignored. Then pip resolves the image's install lines for real, as a
dry run, against constraints.txt (``test_the_image_install_lines_resolve_under_the_pins``).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

NOT_IN_IMAGE = {"dev", "bench"}  # make setup's extras the image leaves out (see the docstring)
NO_EFFECT = {"-q", "--quiet", "--no-cache-dir"}  # pip options that do not change what is installed


def pip_steps(lines: list[str]) -> list[list[str]]:
    """Each ``pip install`` command in ``lines`` (shell lines, ``\\`` continuations joined, ``&&`` split):
    its arguments after ``install``, without the options in ``NO_EFFECT``."""
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    steps = []
    for line in text.splitlines():
        for command in line.split("&&"):
            words = shlex.split(command)
            for i, word in enumerate(words[:-1]):
                if word.endswith("pip") and words[i + 1] == "install":
                    steps.append([w for w in words[i + 2 :] if w not in NO_EFFECT])
    return steps


def dockerfile_steps() -> list[list[str]]:
    return pip_steps([line for line in (ROOT / "Dockerfile").read_text().splitlines() if not line.startswith("#")])


def setup_steps() -> list[list[str]]:
    """The pip commands of the Makefile's recipe that ``make setup`` runs (the install stamp's)."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("$(STAMP):"))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return pip_steps(recipe)


def split_extras(step: list[str]) -> tuple[list[str], set[str]]:
    """(the step with ``.[a,b]`` written as ``.``, {a, b})."""
    extras: set[str] = set()
    plain = []
    for word in step:
        found = re.fullmatch(r"\.\[([\w,\s-]*)\]", word)
        if found:
            extras |= {e.strip() for e in found.group(1).split(",")}
            word = "."
        plain.append(word)
    return plain, extras


def test_the_image_installs_the_pins_and_extras_of_make_setup() -> None:
    docker, setup = dockerfile_steps(), setup_steps()
    assert len(setup) == 2 and docker, (setup, docker)  # the parsers found both
    assert [split_extras(s)[0] for s in docker] == [split_extras(s)[0] for s in setup], (docker, setup)
    for step in docker:
        assert step[step.index("-c") + 1] == "constraints.txt", f"a Dockerfile pip install without the pins: {step}"
    wanted = set().union(*(split_extras(s)[1] for s in setup)) - NOT_IN_IMAGE
    assert wanted == {"deepspeed"}  # the engines; if make setup gains an extra, decide whether the image needs it
    assert set().union(*(split_extras(s)[1] for s in docker)) == wanted
    copied = " ".join(line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("COPY"))
    assert "constraints.txt" in copied and "pyproject.toml" in copied


def test_the_parsers_see_a_difference() -> None:
    """A Dockerfile line without the pins, or with another extra, is told apart (the check above is not vacuous)."""
    assert split_extras(pip_steps(["RUN pip install --no-cache-dir -e '.[deepspeed,bench]'"])[0]) == (
        ["-e", "."], {"deepspeed", "bench"}
    )
    assert pip_steps(["RUN pip install torch \\", " && pip install -c constraints.txt -e ."]) == [
        ["torch"], ["-c", "constraints.txt", "-e", "."]
    ]


def test_the_image_install_lines_resolve_under_the_pins(tmp_path: Path) -> None:
    """Each of the Dockerfile's ``pip install`` lines, as ``pip install --dry-run --report``, from the repo
    (the files the image copies), resolves against constraints.txt to the pinned versions.

    The candidates are this venv's packages (``--no-index``; ``make setup`` installed them under the same
    pins): a resolve of every package from PyPI (``--ignore-installed``) took 100-160 s here, as this pip
    downloads whole wheels to read their metadata. What this shows: the pins are complete and consistent
    for the image's requirements (every dependency's range holds at the pinned and installed versions);
    that nothing but the launcher itself is left to install, with the image's extras. What it does not
    show: that the wheels exist for the image's platform, the base image, its apt packages, the build.
    """
    for i, step in enumerate(dockerfile_steps()):
        report = tmp_path / f"step{i}.json"
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation",
             "--report", str(report), "-q", *step],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, (
            f"pip could not resolve the Dockerfile's `pip install {' '.join(step)}` against constraints.txt from "
            f"this venv's packages (run `make setup` after changing the pins):\n{done.stderr[-3000:]}"
        )
        install = {d["metadata"]["name"]: d for d in json.loads(report.read_text())["install"]}
        if "-e" in step:  # the package itself: the only thing a venv made by `make setup` still lacks
            assert set(install) == {"launcher"}, sorted(install)
            assert set(install["launcher"].get("requested_extras") or []) == split_extras(step)[1]
        else:
            assert install == {}, sorted(install)  # torch + torchvision: installed, at their pins
