"""Two JAX processes (``jax.distributed`` with gloo CPU collectives, issue 6 item 2): a
parameter sharded across processes keeps its sharding in the EMA, and the compiled update
contains no collective.

Runs where ``EMACORE_TEST_BACKENDS`` names jax (``nox -s "tests(backend='jax')"``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

if "jax" not in os.environ.get("EMACORE_TEST_BACKENDS", ""):
    pytest.skip(
        "jax is not among EMACORE_TEST_BACKENDS (the jax nox session runs these)",
        allow_module_level=True,
    )

WORKER = Path(__file__).with_name("jax_multiprocess_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_two_processes_keep_shardings_and_communicate_nothing(tmp_path: Path) -> None:
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device each
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), port, str(i), str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=240)
            outs.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            proc.kill()
    for i, (code, out, err) in enumerate(outs):
        assert code == 0, f"process {i}:\n{out}\n{err[-4000:]}"
        assert out.strip().splitlines()[-1] == f"ok {i}"


def test_the_jax_sharding_example_runs() -> None:
    example = Path(__file__).parents[2] / "examples" / "jax_sharded_ema.py"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    done = subprocess.run(
        [sys.executable, str(example)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.startswith("P('data', 'model')")
