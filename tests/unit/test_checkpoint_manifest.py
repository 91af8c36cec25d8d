"""Checkpoint manifests (issue #22): a checkpoint is complete on the storage itself.

Pure local folders, no Ray: each rank's files are saved in a local folder, copied into the
storage's checkpoint folder (what Ray Train's upload does), then the rank's manifest is written
there last, as ``launcher/worker.py: _upload_then_manifest`` does.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from pyarrow import fs as pafs

from launcher import checkpoint

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint_v1"
DEEPSPEED = {"world_size": 2, "engine": "deepspeed"}


class Part:
    """A Stateful part with a tensor that depends on the step (stands in for a model or a ZeRO partition)."""

    def __init__(self, value: float) -> None:
        self.value = value

    def state_dict(self) -> dict[str, Any]:
        return {"w": torch.full((64,), self.value)}

    def load_state_dict(self, state: dict[str, Any], /) -> None:
        self.value = float(state["w"][0])


def publish(storage: Path, local: Path, step: int, plan: dict[str, Any]) -> Path:
    """The checkpoint of ``step`` as the workers leave it in the storage (``checkpoint_<step>``: names order by age)."""
    folder = storage / f"checkpoint_{step:06d}"
    world = plan.get("world_size", 1)
    for rank in range(world):
        shards = {"zero": Part(step + rank)} if plan.get("engine") == "deepspeed" else {}
        saver = checkpoint.Checkpointer({"model": Part(step)}, shards, recipe="tiny", plan=plan, rank=rank, world=world)
        mine = local / f"step{step}-rank{rank}"
        saver.save(mine, step)
        files = checkpoint.manifest(mine)
        shutil.copytree(mine, folder, dirs_exist_ok=True)  # Ray Train's copy to the storage
        checkpoint.write_manifest(pafs.LocalFileSystem(), str(folder), rank, files)  # then the manifest, last
    return folder


def flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))  # the same size: only the hash tells


def test_a_manifest_lists_each_file_with_its_size_and_sha256_and_verifies(tmp_path: Path) -> None:
    folder = publish(tmp_path / "run", tmp_path / "local", 10, DEEPSPEED)
    written = json.loads((folder / checkpoint.manifest_file(0)).read_text())
    assert written["rank"] == 0 and set(written["files"]) == {"state.pt", "meta.json", "zero_rank0.pt"}
    for name, entry in written["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert set(json.loads((folder / checkpoint.manifest_file(1)).read_text())["files"]) == {"zero_rank1.pt"}
    assert checkpoint.verify(pafs.LocalFileSystem(), str(folder), written["files"]) is None
    assert checkpoint.meta(folder)["manifest"] == checkpoint.MANIFEST  # type: ignore[index]
    assert not list(folder.glob("*.tmp"))  # state.pt and the shards only appear by rename


def test_a_byte_flipped_in_state_pt_skips_to_the_checkpoint_before(tmp_path: Path) -> None:
    run = tmp_path / "run"
    older = publish(run, tmp_path / "local", 10, {"world_size": 1})
    newer = publish(run, tmp_path / "local", 20, {"world_size": 1})
    assert checkpoint.candidates(str(run)) == [str(newer), str(older)]
    flip_one_byte(newer / checkpoint.FILE)
    warnings: list[str] = []
    assert checkpoint.candidates(str(run), warnings.append) == [str(older)]
    (warning,) = warnings
    assert f"checkpoint {newer} is incomplete or damaged (state.pt has SHA-256 " in warning
    assert "its manifest recorded" in warning and warning.endswith("skipping it")


def test_a_byte_flipped_in_a_zero_shard_skips_to_the_checkpoint_before(tmp_path: Path) -> None:
    run = tmp_path / "run"
    older = publish(run, tmp_path / "local", 10, DEEPSPEED)
    newer = publish(run, tmp_path / "local", 20, DEEPSPEED)
    flip_one_byte(newer / checkpoint.shard_file(1))
    warnings: list[str] = []
    assert checkpoint.candidates(str(run), warnings.append) == [str(older)]
    (warning,) = warnings
    assert f"checkpoint {newer} is incomplete or damaged (zero_rank1.pt has SHA-256 " in warning


def test_a_rank_whose_manifest_is_missing_skips_the_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    older = publish(run, tmp_path / "local", 10, DEEPSPEED)
    newer = publish(run, tmp_path / "local", 20, DEEPSPEED)
    (newer / checkpoint.manifest_file(1)).unlink()  # rank 1's upload was cut short: its manifest never came
    warnings: list[str] = []
    assert checkpoint.candidates(str(run), warnings.append) == [str(older)]
    assert warnings == [f"warning: checkpoint {newer} is incomplete or damaged (manifest_rank1.json is missing "
                        "or unreadable); skipping it"]


def test_a_new_checkpoint_without_its_manifest_or_meta_is_skipped(tmp_path: Path) -> None:
    run = tmp_path / "run"
    oldest = publish(run, tmp_path / "local", 10, {"world_size": 1})
    no_meta = publish(run, tmp_path / "local", 20, {"world_size": 1})
    no_manifest = publish(run, tmp_path / "local", 30, {"world_size": 1})
    (no_manifest / checkpoint.manifest_file(0)).unlink()
    (no_meta / checkpoint.META).unlink()
    warnings: list[str] = []
    assert checkpoint.candidates(str(run), warnings.append) == [str(oldest)]
    assert [w.split("(")[1].split(")")[0] for w in warnings] == [
        "manifest_rank0.json is missing or unreadable", "no readable meta.json"]
    assert str(no_manifest) in warnings[0] and str(no_meta) in warnings[1]


def test_a_torn_copy_is_caught_by_the_recorded_size(tmp_path: Path) -> None:
    run = tmp_path / "run"
    older = publish(run, tmp_path / "local", 10, {"world_size": 1})
    newer = publish(run, tmp_path / "local", 20, {"world_size": 1})
    state = newer / checkpoint.FILE
    size = state.stat().st_size
    state.write_bytes(state.read_bytes()[: size // 2])
    warnings: list[str] = []
    assert checkpoint.candidates(str(run), warnings.append) == [str(older)]
    assert f"state.pt has {size // 2} of its {size} bytes" in warnings[0]


def test_only_the_newest_complete_checkpoint_is_hashed(tmp_path: Path) -> None:
    """The older ones are fallbacks: they get the existence and size checks, not a read of every byte."""
    run = tmp_path / "run"
    older = publish(run, tmp_path / "local", 10, {"world_size": 1})
    newer = publish(run, tmp_path / "local", 20, {"world_size": 1})
    flip_one_byte(older / checkpoint.FILE)
    warnings: list[str] = []
    assert checkpoint.candidates(str(run), warnings.append) == [str(newer), str(older)] and warnings == []
    (older / checkpoint.FILE).write_bytes(b"short")
    assert checkpoint.candidates(str(run), warnings.append) == [str(newer)]
    assert "state.pt has 5 of its" in warnings[0]


def test_a_checkpoint_from_before_manifests_keeps_the_size_check(tmp_path: Path) -> None:
    """``tests/fixtures/checkpoint_v1`` (launcher 08cb4ac): meta.json has no ``manifest`` key."""
    run = tmp_path / "run"
    legacy = run / "checkpoint_000003"
    shutil.copytree(FIXTURE, legacy)
    assert "manifest" not in json.loads((legacy / checkpoint.META).read_text())
    assert checkpoint.candidates(str(run)) == [str(legacy)]
    torn = run / "checkpoint_000004"
    shutil.copytree(FIXTURE, torn)
    (torn / checkpoint.FILE).write_bytes((torn / checkpoint.FILE).read_bytes()[:100])
    warnings: list[str] = []
    assert checkpoint.candidates(str(run), warnings.append) == [str(legacy)]
    assert f"checkpoint {torn} is incomplete or damaged (state.pt has 100 of its 14645 bytes)" in warnings[0]
