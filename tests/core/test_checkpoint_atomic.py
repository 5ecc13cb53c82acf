"""A writer killed in the middle of `emacore.save` leaves the previous checkpoint intact.

A child process saves a large checkpoint (version v: every leaf filled with v, count v) over
and over, printing ``saving v`` before each save and ``saved v`` after it returns; the test
SIGKILLs it at a uniformly random moment within the time a save takes. The file must then
load, be one complete version (every leaf and the count agree), and be the last version the
child reported saved or the one after it (killed between the rename and the print). Rounds
repeat until several kills have landed mid-write (a temporary file was left behind). A writer
that writes the file in place, in chunks, fails this test in its first rounds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import emacore

CHILD = r"""
import sys
import time
import numpy as np
import emacore

path, version = sys.argv[1], int(sys.argv[2])
while True:
    shadows = {f"w{i}": np.full(2_000_000, version, np.float32) for i in range(4)}
    print("saving", version, flush=True)
    start = time.perf_counter()
    emacore.save(emacore.EMAState(shadows, count=version), path)  # 32 MB
    print("saved", version, time.perf_counter() - start, flush=True)
    version += 1
"""

MID_WRITE_KILLS = 3
MAX_ROUNDS = 15


def _temporaries(directory: Path) -> list[Path]:
    return sorted(directory.glob(".ema.safetensors.*.tmp"))


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="SIGKILL is POSIX only")
def test_killed_writer_leaves_a_complete_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ema.safetensors"
    rng = np.random.default_rng(0)
    env = {**os.environ, "PYTHONPATH": str(Path(emacore.__file__).parents[1])}
    version, mid_write = 1, 0
    for _ in range(MAX_ROUNDS):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), str(version)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert child.stdout is not None
        lines = []
        while len(lines) < 5:  # two saves (the file exists; the second is timed), then saving
            line = child.stdout.readline()
            if not line:
                child.wait()
                err = child.stderr.read() if child.stderr else ""
                raise AssertionError(f"the writer failed: {err}")
            lines.append(line.split())
        duration = float(lines[3][2])
        try:  # somewhere inside the next save
            child.wait(timeout=rng.uniform(0.0, duration))
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGKILL)
            child.wait()
        out, _ = child.communicate()
        lines += [line.split() for line in out.splitlines()]
        reported = max(int(line[1]) for line in lines if line[0] == "saved")

        state = emacore.load_state(path)  # must not raise: the file is whole
        values = {nm: np.unique(x) for nm, x in state.shadow.items()}
        assert all(len(v) == 1 for v in values.values()), values
        saved = {int(v[0]) for v in values.values()}
        assert saved == {state.count}, (saved, state.count)
        assert reported <= state.count <= reported + 1

        leftovers = _temporaries(tmp_path)
        if leftovers:  # the kill landed inside a save
            mid_write += 1
            for tmp in leftovers:
                tmp.unlink()
        version = state.count + 1
        if mid_write >= MID_WRITE_KILLS:
            break
    assert mid_write >= MID_WRITE_KILLS, f"only {mid_write} of the kills landed mid-write"
