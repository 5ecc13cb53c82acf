"""Shard-local EMA on FSDP2 (issue 6, item 1): two processes on gloo/CPU.

Runs where ``EMACORE_TEST_BACKENDS`` names torch (``nox -s "tests(backend='torch')"``). The
worker asserts that no collective runs during an update (``CommDebugMode``), checks the
averages against float64 math and ``swapped``, and saves the EMA state through
``torch.distributed.checkpoint``; a second launch with one process loads it resharded.
"""

from __future__ import annotations

import os
import re
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
    out = _run(2, "train", tmp_path)
    # the two processes share one stdout: their lines may interleave
    assert sorted(re.findall(r"ok train \d", out)) == ["ok train 0", "ok train 1"], out
    out = _run(1, "reload", tmp_path)  # saved by two processes, loaded by one
    assert "ok reload 0 1" in out


def test_the_fsdp2_example_runs() -> None:
    example = Path(__file__).parents[2] / "examples" / "fsdp2_ema.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc_per_node=2", str(example)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "DTensor (Shard(dim=0),) (16, 16)" in done.stdout
