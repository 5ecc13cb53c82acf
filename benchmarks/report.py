"""The benchmark report: run the numpy, torch and jax benchmarks, write their tables and plots.

``nox -s bench`` runs this: ``python benchmarks/report.py``. It runs ``bench_update.py``
(numpy), ``bench_torch.py`` (torch and its EMA libraries) and ``bench_jax.py`` (jax and
optax), one after the other, each writing its markdown report to ``<tables>/<backend>.md``
(default ``benchmarks/results``), then draws one plot per backend, ``<out>/<backend>.png``
(default ``docs/benchmarks``): the median
time of one update step against the number of parameters of each set of ``bench_shapes.json``
(log-log), one line per method, the bandwidth floor dashed. ``--skip-run`` redraws from the
markdown already there. The docs' benchmark page includes the tables and the plots.

Only ratios measured side by side in one run mean anything on a shared, noisy machine: the
plots compare methods within one backend's run, never across backends.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
SCRIPTS = {"numpy": "bench_update.py", "torch": "bench_torch.py", "jax": "bench_jax.py"}
ROW = re.compile(r"^\| (?P<set>[\w-]+) \| (?P<method>[^|]+) \| (?P<median>[0-9.]+) \|")


def parse(markdown: str) -> dict[str, dict[str, float]]:
    """``{method: {set: median ms}}`` from a report's main table (the first ``| set |`` one)."""
    out: dict[str, dict[str, float]] = {}
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| set | method | median"))
    for line in lines[start + 2 :]:
        match = ROW.match(line)
        if match is None:
            break
        method = match["method"].replace("**", "").replace("`", "").strip()
        out.setdefault(method, {})[match["set"]] = float(match["median"])
    return out


def sizes() -> dict[str, int]:
    """Parameters per set."""
    import math

    sets = json.loads((HERE / "bench_shapes.json").read_text())["sets"]
    return {name: sum(math.prod(s) for s in shapes) for name, shapes in sets.items()}


def plot(backend: str, table: dict[str, dict[str, float]], path: Path) -> None:
    """Time per update against model size, one line per method, the floor dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = sizes()
    fig, ax = plt.subplots(figsize=(8, 5))
    for method, by_set in sorted(table.items()):
        names = sorted(by_set, key=n.__getitem__)
        xs = [n[s] for s in names]
        ys = [by_set[s] for s in names]
        floor = method.startswith("floor")
        style = {"linestyle": "--", "color": "black"} if floor else {"marker": "o"}
        if method.startswith("emacore"):
            style["linewidth"] = 2.5
        ax.plot(xs, ys, label=method, **style)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (float32)")
    ax.set_ylabel("one update step, median ms")
    ax.set_title(f"{backend}: time per EMA update vs model size (CPU)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmarks (unless ``--skip-run``) and draw the plots."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"), help="plots")
    parser.add_argument("--tables", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--backends", nargs="+", default=list(SCRIPTS), choices=list(SCRIPTS))
    parser.add_argument("--repeat", type=int, default=None, help="passed on to the scripts")
    parser.add_argument("--skip-run", action="store_true", help="redraw from existing tables")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.tables.mkdir(parents=True, exist_ok=True)
    for backend in args.backends:
        md = args.tables / f"{backend}.md"
        if not args.skip_run:
            cmd = [sys.executable, str(HERE / SCRIPTS[backend]), "--markdown", str(md)]
            if args.repeat is not None:
                cmd += ["--repeat", str(args.repeat)]
            subprocess.run(cmd, check=True)
        plot(backend, parse(md.read_text()), args.out / f"{backend}.png")
        print(f"wrote {md} and {args.out / f'{backend}.png'}")


if __name__ == "__main__":
    main()
