"""Shard-local EMA on FSDP2 (issue 6, item 1): two processes on gloo/CPU.

Runs where ``EMACORE_TEST_BACKENDS`` names torch (``nox -s "tests(backend='torch')"``). The
worker asserts that no collective runs during an update (``CommDebugMode``), checks the
averages against float64 math and ``swapped``, and saves the EMA state through
``torch.distributed.checkpoint``; a second launch with one process loads it resharded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

if "torch" not in os.environ.get("EMACORE_TEST_BACKENDS", ""):
    pytest.skip(
        "torch is not among EMACORE_TEST_BACKENDS (the torch nox session runs these)",
        allow_module_level=True,
    )

WORKER = Path(__file__).with_name("torch_sharded_worker.py")


def _run(nproc: int, mode: str, out: Path) -> str:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(WORKER),
        mode,
        str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def test_fsdp2_updates_are_shard_local_and_checkpoints_reshard(tmp_path: Path) -> None:
    _run(2, "train", tmp_path)
    # each process leaves a file when its checks passed (their shared stdout interleaves)
    assert _done(tmp_path) == ["ok train 0", "ok train 1"]
    _run(1, "reload", tmp_path)  # saved by two processes, loaded by one
    assert _done(tmp_path) == ["ok reload 0 1", "ok train 0", "ok train 1"]


def _done(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("ok *"))


def test_the_fsdp2_example_runs() -> None:
    example = Path(__file__).parents[2] / "examples" / "fsdp2_ema.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc_per_node=2", str(example)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "DTensor (Shard(dim=0),) (16, 16)" in done.stdout
