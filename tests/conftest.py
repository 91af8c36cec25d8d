"""Shared test setup: real Ray, real MLflow, real Hydra; no downloads, no telemetry."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def launcher(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run ``python -m launcher ARGS`` as a user would, from ``cwd``."""
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def shared_outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One outputs dir (and so one tokenizer/pairs cache) for every training test."""
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture(autouse=True)
def _memory_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the memory-estimate cache inside the test session, never in ~/.cache."""
    monkeypatch.setenv("LAUNCHER_CACHE", str(tmp_path_factory.getbasetemp() / "launcher-cache"))
