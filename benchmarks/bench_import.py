"""How long ``import emacore`` takes, with bytecode caches warm (issue 13, item 9: under 60 ms).

Run ``python benchmarks/bench_import.py [--runs 10] [--src DIR ...]``; it prints a markdown
table. Each run is a fresh interpreter that times only the import::

    python -c "import time; t = time.perf_counter(); import emacore; print(...)"

Without ``--src`` it times the ``emacore`` this interpreter finds. Each ``--src DIR`` (a
``src`` folder, e.g. a copy of the tree before a change) is put first on ``PYTHONPATH``, and the
variants are run alternately, round after round, so that the load of this shared machine falls
on all of them alike: compare medians of one run only. One untimed import per variant first
writes its ``__pycache__``. The table also counts the modules the import loaded and says whether
``importlib.metadata`` was among them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CODE = (
    "import sys, time\n"
    "before = set(sys.modules)\n"
    "t = time.perf_counter()\n"
    "import emacore\n"
    "dt = time.perf_counter() - t\n"
    "new = set(sys.modules) - before\n"
    "print(json.dumps([dt, len(new), 'importlib.metadata' in new, emacore.__file__]))\n"
)
PRELUDE = "import json\n"  # imported before the clock starts, so it is not counted


def _once(src: str | None) -> tuple[float, int, bool, str]:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, "-c", PRELUDE + CODE],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=120,
    )
    dt, count, metadata, path = json.loads(out.stdout)
    return float(dt), int(count), bool(metadata), str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="timed imports per variant")
    parser.add_argument(
        "--src", action="append", default=None, help="a src folder to time (repeatable)"
    )
    args = parser.parse_args()
    variants: list[str | None] = list(args.src) if args.src else [None]
    for src in variants:  # warm the bytecode caches
        _once(src)
    times: dict[str | None, list[float]] = {src: [] for src in variants}
    info: dict[str | None, tuple[int, bool, str]] = {}
    for _ in range(args.runs):
        for src in variants:
            dt, count, metadata, path = _once(src)
            times[src].append(dt)
            info[src] = (count, metadata, path)
    print(f"`import emacore`, {args.runs} fresh interpreters per variant, run alternately\n")
    print("| emacore | median ms | min ms | max ms | modules loaded | importlib.metadata |")
    print("|---|---:|---:|---:|---:|---|")
    for src in variants:
        ts = [1e3 * t for t in times[src]]
        count, metadata, path = info[src]
        print(
            f"| `{path}` | {statistics.median(ts):.1f} | {min(ts):.1f} | {max(ts):.1f} "
            f"| {count} | {'loaded' if metadata else 'not loaded'} |"
        )


if __name__ == "__main__":
    main()
