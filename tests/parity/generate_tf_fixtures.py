"""Generate bit-exact reference numbers from real TensorFlow for emacore's parity tests.

Run with an environment that has ``tensorflow-cpu`` (2.x) and ``numpy`` installed::

    python tests/parity/generate_tf_fixtures.py --out src/emacore_testing/data/tf_parity.json

(``nox -s parity`` does exactly this.) The output is deterministic: every input comes from
``np.random.default_rng(SEED)`` and the case list is a fixed product of the factors below.

Output format (JSON; every float is a ``float.hex()`` string so that it round-trips bit
exactly through ``float.fromhex``; float32 numbers are widened with ``float(np.float32(x))``
first, which is exact)::

    {
      "tensorflow_version": "2.x.y", "numpy_version": "...",
      "generated_by": "tests/parity/generate_tf_fixtures.py",
      "seed": 20240611,
      "cases": [
        {"id": "f32-s7-d0.99-n1000-zdb",   # readable, unique
         "dtype": "float32" | "float64",
         "shape": [7],
         "decay": 0.9 | 0.99 | 0.999,      # the Python float handed to TF
         "num_updates_start": null | 0 | 1000,
         "zero_debias": false | true,
         "values":   [[hex, ...], ...],    # one list per step k: the input, flattened C-order
         "averages": [[hex, ...], ...]},   # one list per step k: ema.average(...) after apply
        ...
      ]
    }

Semantics of one case, for step ``k = 0 .. K-1``:

1. the input (a ``tf.Variable`` of ``dtype``) is set to ``values[k]``;
2. if ``num_updates_start`` is not null, the ``num_updates`` variable (an int64
   ``tf.Variable`` passed as ``num_updates=``) is set to ``num_updates_start + k``;
3. ``apply`` runs once, and ``averages[k]`` is the average read right after it.

Optional per-step field: a case may carry ``"num_updates": [n_0, n_1, ...]`` (one int per
step); then it is the value of the ``num_updates`` variable at step ``k`` and
``num_updates_start`` is null. Only the ``"seed_example"`` case uses it (the classic TF
docstring example: values 0, 5, 10, 10 with num_updates 0, 0, 10000, 10000).

How each kind of case is produced:

* ``zero_debias: false``: TF2 eager. ``v = tf.Variable(values[0])``,
  ``ema = tf.train.ExponentialMovingAverage(decay, num_updates=n_var or None)``; at each step
  ``v.assign(values[k])``, ``n_var.assign(...)``, ``ema.apply([v])``, read
  ``ema.average(v)``. For a Variable TF creates the shadow as a copy of the variable at the
  first ``apply``, so ``averages[0] == values[0]`` exactly.
* ``zero_debias: true``: TF only zero-debiases non-Variable *tensors* (whose shadow starts
  at zeros), and tensors are refused in eager mode, so this uses a TF1-style graph and
  session: ``t = tf.identity(v)``, ``ema = ExponentialMovingAverage(decay, num_updates=...,
  zero_debias=True)``, ``update = ema.apply([t])``; at each step ``v`` (and ``num_updates``)
  are assigned, ``update`` is run, then ``ema.average(t)`` is read. The script asserts that
  TF created the ``.../biased`` and ``.../local_step`` debias variables, i.e. that the
  zero-debias path really ran.

Steps per case depend on the shape (long runs on small shapes, a few steps on big ones) to
keep the file small; see ``STEPS``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

SEED = 20240611
GENERATED_BY = "tests/parity/generate_tf_fixtures.py"

DTYPES: tuple[str, ...] = ("float32", "float64")
SHAPES: tuple[tuple[int, ...], ...] = ((), (7,), (4, 5), (2, 3, 4))
DECAYS: tuple[float, ...] = (0.9, 0.99, 0.999)
NUM_UPDATES_STARTS: tuple[int | None, ...] = (None, 0, 1000)
ZERO_DEBIAS: tuple[bool, ...] = (False, True)

# Number of steps K for each shape.
STEPS: dict[tuple[int, ...], int] = {(): 40, (7,): 25, (4, 5): 10, (2, 3, 4): 8}

# Per-case magnitude classes, cycled over the cases: (scale of the noise, scale of the offset).
MAGNITUDES: tuple[float, ...] = (1.0, 1e3, 1e-3)


def to_hex(x: Any) -> str:
    """Return the bit-exact hex string of a NumPy float32/float64 scalar."""
    return float(x).hex()


def hex_rows(arr: np.ndarray) -> list[list[str]]:
    """Flatten each step of ``arr`` (shape ``(K, *shape)``) in C order into hex strings."""
    return [[to_hex(x) for x in step.reshape(-1)] for step in arr]


def make_values(
    rng: np.random.Generator, dtype: str, shape: tuple[int, ...], steps: int, magnitude: float
) -> np.ndarray:
    """Draw ``steps`` inputs of ``shape``: normal noise around a random per-case offset."""
    offset = rng.normal() * 3.0 * magnitude
    scale = magnitude * rng.uniform(0.5, 2.0)
    raw = offset + scale * rng.standard_normal((steps, *shape))
    return raw.astype(dtype)


def case_id(
    dtype: str, shape: tuple[int, ...], decay: float, start: int | None, zero_debias: bool
) -> str:
    """Return a readable unique id such as ``f32-s4x5-d0.99-n1000-zdb``."""
    dt = {"float32": "f32", "float64": "f64"}[dtype]
    sh = "x".join(str(d) for d in shape) if shape else "scalar"
    nu = "nNone" if start is None else f"n{start}"
    zd = "zdb" if zero_debias else "nozdb"
    return f"{dt}-s{sh}-d{decay}-{nu}-{zd}"


def run_eager(
    tf: Any, values: np.ndarray, decay: float, num_updates: list[int] | None
) -> np.ndarray:
    """Run the Variable (no zero-debias) path in TF2 eager mode; return the averages."""
    v = tf.Variable(values[0])
    n_var = None if num_updates is None else tf.Variable(num_updates[0], dtype=tf.int64)
    ema = tf.train.ExponentialMovingAverage(decay, num_updates=n_var)
    out = []
    for k in range(values.shape[0]):
        v.assign(values[k])
        if n_var is not None and num_updates is not None:
            n_var.assign(num_updates[k])
        ema.apply([v])
        out.append(ema.average(v).numpy())
    result = np.stack(out)
    assert result.dtype == values.dtype, (result.dtype, values.dtype)
    return result


def run_graph_zero_debias(
    tf: Any, values: np.ndarray, decay: float, num_updates: list[int] | None
) -> np.ndarray:
    """Run the zero-debiased tensor path in a TF1-style graph; return the averages."""
    tf1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        v = tf.Variable(values[0])
        v_in = tf1.placeholder(v.dtype, shape=values.shape[1:])
        assign_v = v.assign(v_in)
        n_var = None if num_updates is None else tf.Variable(num_updates[0], dtype=tf.int64)
        n_in = tf1.placeholder(tf.int64, shape=())
        assign_n = None if n_var is None else n_var.assign(n_in)
        t = tf.identity(v)
        ema = tf.train.ExponentialMovingAverage(decay, num_updates=n_var, zero_debias=True)
        update = ema.apply([t])
        avg = ema.average(t)
        # The zero-debias path creates these two extra variables next to the shadow; if TF
        # had taken the plain path they would be missing.
        names = {x.op.name for x in tf1.global_variables()}
        shadow = avg.op.name
        assert f"{shadow}/biased" in names, names
        assert f"{shadow}/local_step" in names, names
        init = tf1.global_variables_initializer()
    out = []
    with tf1.Session(graph=graph) as sess:
        sess.run(init)
        for k in range(values.shape[0]):
            sess.run(assign_v, {v_in: values[k]})
            if assign_n is not None and num_updates is not None:
                sess.run(assign_n, {n_in: num_updates[k]})
            sess.run(update)
            out.append(sess.run(avg))
    result = np.stack(out)
    assert result.dtype == values.dtype, (result.dtype, values.dtype)
    return result


def make_case(
    tf: Any,
    case: str,
    values: np.ndarray,
    decay: float,
    zero_debias: bool,
    start: int | None,
    num_updates: list[int] | None,
) -> dict[str, Any]:
    """Run one case through TF and return its JSON record."""
    runner = run_graph_zero_debias if zero_debias else run_eager
    averages = runner(tf, values, decay, num_updates)
    record: dict[str, Any] = {
        "id": case,
        "dtype": str(values.dtype),
        "shape": list(values.shape[1:]),
        "decay": decay,
        "num_updates_start": start,
        "zero_debias": zero_debias,
    }
    if num_updates is not None and start is None:
        record["num_updates"] = num_updates
    record["values"] = hex_rows(values)
    record["averages"] = hex_rows(averages)
    return record


def build_cases(tf: Any) -> list[dict[str, Any]]:
    """Return every case record, in a fixed order."""
    rng = np.random.default_rng(SEED)
    cases: list[dict[str, Any]] = []

    # The classic TF docstring example.
    seed_values = np.array([0.0, 5.0, 10.0, 10.0], dtype=np.float32)
    seed_n = [0, 0, 10000, 10000]
    cases.append(make_case(tf, "seed_example", seed_values, 0.99, False, None, seed_n))

    product = itertools.product(DTYPES, SHAPES, DECAYS, NUM_UPDATES_STARTS, ZERO_DEBIAS)
    for i, (dtype, shape, decay, start, zero_debias) in enumerate(product):
        steps = STEPS[shape]
        values = make_values(rng, dtype, shape, steps, MAGNITUDES[i % len(MAGNITUDES)])
        num_updates = None if start is None else [start + k for k in range(steps)]
        cid = case_id(dtype, shape, decay, start, zero_debias)
        cases.append(make_case(tf, cid, values, decay, zero_debias, start, num_updates))

    ids = [c["id"] for c in cases]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    return cases


def dump(header: dict[str, Any], cases: list[dict[str, Any]]) -> str:
    """Serialise as JSON with one case per line (small, and readable in diffs)."""
    head = json.dumps(header, separators=(",", ": "))[:-1]
    body = ",\n".join(json.dumps(c, separators=(",", ":")) for c in cases)
    return f'{head}, "cases": [\n{body}\n]}}\n'


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run TensorFlow and write the fixture file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON")
    args = parser.parse_args(argv)

    # Quiet logs, and keep oneDNN's reordered kernels out of the reference numbers.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import tensorflow as tf  # imported late so that the environment above applies

    tf.config.set_visible_devices([], "GPU")
    cases = build_cases(tf)
    header = {
        "tensorflow_version": tf.__version__,
        "numpy_version": np.__version__,
        "generated_by": GENERATED_BY,
        "seed": SEED,
    }
    text = dump(header, cases)
    json.loads(text)  # sanity: valid JSON
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {len(cases)} cases ({len(text.encode())} bytes) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
