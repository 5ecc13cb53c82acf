"""A writer killed in the middle of `emacore.save` leaves the previous checkpoint intact.

A child process saves a large checkpoint (version v: every leaf filled with v, count v) over
and over, printing ``saving v`` before each save and ``saved v`` after it returns; the test
SIGKILLs it at a uniformly random moment within the time a save takes. The file must then
load, be one complete version (every leaf and the count agree), and be the last version the
child reported saved or the one after it (killed between the rename and the print).

A kill "lands mid-write" when two witnesses agree that it struck inside a save, before the
rename: the child's last words are ``saving v`` (it never reported v saved), and the save's
temporary file is still there (the child is dead, so the directory is as the kill left it).
The file must then be exactly the previous version. Rounds repeat until several kills have
landed mid-write, and fail if too few did: a test whose kills all miss the write proves
nothing. Every read of the child's output and every wait has a timeout.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

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
START_TIMEOUT = 120.0  # seconds for the child to import numpy and emacore and save twice
EXIT_TIMEOUT = 30.0  # seconds for a killed child to be reaped and its output drained


class _Lines:
    """The lines a child writes to a pipe, read by a thread so that every read can time out."""

    def __init__(self, stream: IO[str]) -> None:
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)  # end of file

    def next(self, timeout: float) -> list[str] | None:
        """The next line, split; None at end of file. Fails after ``timeout`` seconds."""
        try:
            line = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the writer printed nothing for {timeout} s") from None
        return None if line is None else line.split()

    def rest(self, timeout: float) -> list[list[str]]:
        """Every line up to end of file (the child has exited)."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the writer's output did not end in {timeout} s"
        out = []
        while (line := self.next(timeout=0.0)) is not None:
            out.append(line)
        return out


def _temporaries(directory: Path) -> list[Path]:
    """What a save leaves beside the checkpoint while writing: its own temporary, and any
    temporary of the library it writes with (safetensors 0.8 writes through ``.tmpXXXXXX``)."""
    return sorted(p for p in directory.iterdir() if p.name.startswith(".") and p.is_file())


def _kill_and_reap(child: subprocess.Popen[str]) -> None:
    if child.poll() is None:
        child.send_signal(signal.SIGKILL)
    child.wait(timeout=EXIT_TIMEOUT)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="SIGKILL is POSIX only")
def test_killed_writer_leaves_a_complete_checkpoint(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    path = work / "ema.safetensors"
    ours = f".{path.name}."  # the prefix of `emacore.save`'s temporary file
    rng = np.random.default_rng(0)
    env = {**os.environ, "PYTHONPATH": str(Path(emacore.__file__).parents[1])}
    version, mid_write, rounds = 1, 0, []
    for _ in range(MAX_ROUNDS):
        with (tmp_path / "stderr.txt").open("w+") as stderr:
            child = subprocess.Popen(
                [sys.executable, "-c", CHILD, str(path), str(version)],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=env,
            )
            assert child.stdout is not None
            output = _Lines(child.stdout)
            try:
                lines: list[list[str]] = []
                while len(lines) < 5:  # two saves (the file exists; the second is timed), saving
                    line = output.next(timeout=START_TIMEOUT)
                    if line is None:
                        child.wait(timeout=EXIT_TIMEOUT)
                        stderr.seek(0)
                        raise AssertionError(f"the writer failed: {stderr.read()}")
                    lines.append(line)
                duration = float(lines[3][2])
                with contextlib.suppress(subprocess.TimeoutExpired):  # inside the next save
                    child.wait(timeout=rng.uniform(0.0, duration))
            finally:  # never leave a writer running, whatever failed
                try:
                    _kill_and_reap(child)
                    lines += output.rest(timeout=EXIT_TIMEOUT)
                finally:
                    child.stdout.close()
        reported = max(int(line[1]) for line in lines if line[0] == "saved")
        inside_save = lines[-1][0] == "saving"  # the child's word: it never finished this save
        leftovers = _temporaries(work)
        before_rename = any(p.name.startswith(ours) for p in leftovers)

        state = emacore.load_state(path)  # must not raise: the file is whole
        values = {nm: np.unique(x) for nm, x in state.shadow.items()}
        assert all(len(v) == 1 for v in values.values()), values
        saved = {int(v[0]) for v in values.values()}
        assert saved == {state.count}, (saved, state.count)
        assert reported <= state.count <= reported + 1
        # a save that returned leaves no temporary behind: one left means the kill struck
        # inside a save, as the child says
        assert inside_save or not leftovers, (lines[-1], leftovers)
        if inside_save and before_rename:  # the kill landed mid-write
            mid_write += 1
            assert state.count == reported, "killed before the rename, yet the file changed"
        rounds.append((inside_save, [p.name for p in leftovers]))
        for tmp in leftovers:
            tmp.unlink()
        version = state.count + 1
        if mid_write >= MID_WRITE_KILLS:
            break
    assert mid_write >= MID_WRITE_KILLS, (
        f"only {mid_write} of {len(rounds)} kills landed mid-write (inside a save, before its "
        f"rename); (inside a save, files left) per round: {rounds}"
    )
