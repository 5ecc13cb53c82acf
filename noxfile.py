"""Automation: plain ``nox`` (the default sessions) is what CI runs (see README and .ci/run)."""

from __future__ import annotations

import os
import shutil
import subprocess

import nox

nox.options.default_venv_backend = "venv"
# `nox` with no arguments is the test command (README, .ci/run)
nox.options.sessions = ["tests", "peers", "integrations", "lint", "typecheck", "docs"]
nox.options.error_on_missing_interpreters = True

PY = "3.11"  # torch==2.13.0 (the CPU build on this machine's disk) exists for 3.11 only
TORCH = "torch==2.13.0"
PLUGIN_PKG = "tests/plugins/emacore_toy_plugin"

TEST_DEPS = [
    "pytest>=8",
    "hypothesis>=6.100",
    "numpy>=1.26",
    "array-api-strict>=2.3",
    "pandas>=2.2",  # the reference for ewm-style averages (times=, adjust=)
    "dask[array]>=2024.12",  # tests/core/test_dask.py: dask through the portable backend
]
BACKEND_DEPS = {
    "numpy": [],
    "array_api_strict": [],
    "torch": [TORCH],
    "jax": ["jax", "optax", "orbax-checkpoint"],  # plain jax from PyPI is the CPU build
}


def _has_gpu() -> bool:
    """Whether nvidia-smi lists a GPU (a hint only: the gpu session's tests ask torch itself)."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


@nox.session(python=PY)
@nox.parametrize("backend", [*BACKEND_DEPS, "jax_x32"])
def tests(session: nox.Session, backend: str) -> None:
    """The test suite, with the conformance suite run on one backend per session.

    ``jax_x32`` runs jax's conformance again in a process without ``jax_enable_x64`` (as most
    users run it; the ``jax`` session turns it on for the float64 cases): every case that needs
    no 64-bit dtype runs there in float32.
    """
    env = {"EMACORE_TEST_BACKENDS": backend, "EMACORE_REQUIRE_PLUGIN": "1"}
    paths: list[str] = []
    if backend == "jax_x32":
        backend, paths = "jax", ["tests/conformance"]
        env.update(EMACORE_TEST_BACKENDS="jax", EMACORE_JAX_X64="0")
    session.install("-e", ".", *TEST_DEPS, *BACKEND_DEPS[backend])
    session.install(PLUGIN_PKG)
    session.run("pytest", *paths, *session.posargs, env=env)


@nox.session(python=PY)
def fuzz_long(session: nox.Session) -> None:
    """The checkpoint fuzzers at length: 5,000 random examples each under the "fuzz-long"
    hypothesis profile (not a default session: run it before a release). A failure prints the
    blob that reproduces it."""
    session.install("-e", ".", *TEST_DEPS)
    session.run(
        "pytest",
        "tests/core/test_checkpoint_fuzz.py",
        *session.posargs,
        env={"HYPOTHESIS_PROFILE": "fuzz-long", "EMACORE_TEST_BACKENDS": "numpy"},
    )


@nox.session(python=PY)
def mutate(session: nox.Session) -> None:
    """Mutation testing (tools/mutate.py): plant mutants in the core modules and run the fast
    tests (numpy) against each; writes build/mutation-report.md. Not a default session: every
    mutant takes an hour or more, so pass e.g. ``-- --sample 12 --seed 1`` or ``--modules``."""
    session.install("-e", ".", *TEST_DEPS)
    session.install(PLUGIN_PKG)
    session.run(
        "python",
        "tools/mutate.py",
        *session.posargs,
        env={"EMACORE_TEST_BACKENDS": "numpy", "EMACORE_REQUIRE_PLUGIN": "1"},
    )


# The Lightning packages and torchmetrics require torch: installed without their dependencies so
# pip never replaces the pinned CPU build (a resolver free to satisfy `torch>=2.1` may fetch a
# multi-GB CUDA one). Their other requirements are installed explicitly (fsspec without its
# [http] extra: checkpoints are local files here). pytorch-lightning is the standalone package
# `lightning` declares; the tests run the callback on both.
LIGHTNING_NO_DEPS = ["lightning==2.6.6", "pytorch-lightning==2.6.6", "torchmetrics==1.9.0"]
LIGHTNING_DEPS = [
    "lightning-utilities>=0.10",
    "fsspec>=2022.5",
    "pyyaml>5.4",
    "tqdm>=4.57",
    "packaging>=23",
    "typing-extensions>4.5",
]


@nox.session(python=PY)
def integrations(session: nox.Session) -> None:
    """The Lightning and Keras 3 callbacks with the real libraries (Keras on jax, torch, numpy)."""
    session.install("-e", ".", "pytest>=8", "hypothesis>=6.100", "numpy>=1.26", TORCH)
    session.install(TORCH, "jax", "keras>=3")  # keras requires no framework; the pin holds torch
    session.install("--no-deps", *LIGHTNING_NO_DEPS)
    session.install(TORCH, *LIGHTNING_DEPS)
    session.run(
        "pytest",
        "tests/integrations",
        *session.posargs,
        # a framework that cannot import fails these tests instead of skipping them
        env={"EMACORE_TEST_INTEGRATIONS": "lightning,keras"},
    )


@nox.session(python=PY)
def lint(session: nox.Session) -> None:
    """ruff check, ruff format --check, and the import contracts of ARCHITECTURE.md §4
    (lint-imports reads [tool.importlinter] in pyproject.toml; it imports the package, hence
    the editable install)."""
    session.install("-e", ".", "ruff>=0.6", "import-linter>=2.17")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("lint-imports", "--no-cache")


@nox.session(python=PY)
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package."""
    session.install("-e", ".", "mypy>=1.11", "numpy>=1.26", "pytest>=8", "hypothesis>=6.100")
    session.run("mypy")


@nox.session(python=PY)
def docs(session: nox.Session) -> None:
    """Build the documentation site strictly (warnings are errors)."""
    session.install("-e", ".", "numpy>=1.26", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26")
    session.run(
        "mkdocs", "build", "--strict", "--site-dir", "site", env={"NO_MKDOCS_2_WARNING": "1"}
    )


DEMO_DEPS = ["-e", ".", "numpy>=1.26", "matplotlib>=3.8", "scikit-learn>=1.3"]


def _demo(session: nox.Session, backend: str, *extra: str) -> None:
    session.install(*DEMO_DEPS, *extra)
    out = f"demo-output/{backend}" if backend != "numpy" else "demo-output"
    session.run("python", "examples/demo.py", "--backend", backend, "--out", out, *session.posargs)


@nox.session(python=PY)
def demo(session: nox.Session) -> None:
    """Train a small model with noisy SGD on numpy, keep an EMA, print and plot raw vs EMA."""
    _demo(session, "numpy")


@nox.session(python=PY)
def demo_torch(session: nox.Session) -> None:
    """The same demo, same code, on PyTorch (CPU)."""
    _demo(session, "torch", TORCH)


@nox.session(python=PY)
def demo_jax(session: nox.Session) -> None:
    """The same demo, same code, on JAX (CPU)."""
    _demo(session, "jax", "jax")


@nox.session(python=PY)
def bench(session: nox.Session) -> None:
    """The benchmark report: numpy, torch (with its peers) and jax (with optax) benchmarks,
    their markdown tables (benchmarks/results) and plots of time against model size
    (docs/benchmarks), which the docs' benchmark page shows."""
    session.install("-e", ".", "numpy>=1.26", TORCH, "matplotlib", *BACKEND_DEPS["jax"])
    session.install("--no-deps", *BENCH_TORCH_PEERS_NO_DEPS)
    session.install(*BENCH_TORCH_PEERS, TORCH)
    session.run("python", "benchmarks/report.py", *session.posargs)


@nox.session(python=PY)
def bench_numpy(session: nox.Session) -> None:
    """Benchmark the numpy backend against hand-written loops and the bandwidth floor."""
    session.install("-e", ".", "numpy>=1.26")
    session.run("python", "benchmarks/bench_update.py", *session.posargs)


@nox.session(python=PY)
def parity(session: nox.Session) -> None:
    """Regenerate the TensorFlow reference fixtures with real TensorFlow (not run in CI)."""
    session.install("tensorflow-cpu", "numpy")
    session.run(
        "python",
        "tests/parity/generate_tf_fixtures.py",
        "--out",
        "src/emacore_testing/data/tf_parity.json",
    )
    # the docs' TensorFlow blocks, run with TensorFlow (their printed numbers are checked in
    # every session by test_the_seed_example_prints_the_same_numbers_everywhere)
    session.install("-e", ".", *TEST_DEPS)
    session.run("pytest", "tests/core/test_docs.py", env={"EMACORE_TEST_TF": "1"})


@nox.session(python=PY)
def gpu(session: nox.Session) -> None:
    """Tests marked ``gpu`` (torch on CUDA). Skipped where nvidia-smi lists no GPU, unless
    EMACORE_FORCE_GPU_SESSION is set: a requested run fails there instead of skipping."""
    forced = os.environ.get("EMACORE_FORCE_GPU_SESSION", "") not in ("", "0")
    if not forced and not _has_gpu():
        session.skip("no CUDA device (nvidia-smi -L failed or is absent)")
    session.install("-e", ".", *TEST_DEPS, TORCH)
    # EMACORE_REQUIRE_GPU: a gpu-marked test that would skip (no CUDA device, a CPU build of
    # torch) fails instead, as does a run in which no gpu-marked test passed (tests/conftest.py).
    # EMACORE_TEST_BACKENDS: the torch test modules skip themselves unless torch is named.
    # benchmarks/gpu_check.sh runs the jax gpu tests too, with the CUDA jax of a GPU machine.
    session.run(
        "pytest",
        "-m",
        "gpu",
        "tests/torch",
        *session.posargs,
        env={"EMACORE_TEST_BACKENDS": "torch", "EMACORE_REQUIRE_GPU": "1"},
    )


# The peers of the torch benchmark, at the versions it was written against. Those that require
# torch (timm also torchvision) are installed without their dependencies so pip never replaces
# the pinned CPU build; timm's model_ema.py needs nothing else (the script imports it by path
# when `import timm` fails for want of torchvision). diffusers requires no torch: its light
# dependencies come with it.
BENCH_TORCH_PEERS_NO_DEPS = ["timm==1.0.31", "torch-ema==0.3", "ema-pytorch==0.8.3"]
BENCH_TORCH_PEERS = ["diffusers==0.42.1"]


@nox.session(python=PY)
def bench_torch(session: nox.Session) -> None:
    """Benchmark the torch backend (CPU) against timm, AveragedModel, torch_ema, ema-pytorch,
    diffusers, a hand-written _foreach_lerp_ and a flat lerp_ floor; prints a markdown report."""
    session.install("-e", ".", "numpy>=1.26", TORCH)
    session.install("--no-deps", *BENCH_TORCH_PEERS_NO_DEPS)
    session.install(*BENCH_TORCH_PEERS, TORCH)
    session.run("python", "benchmarks/bench_torch.py", *session.posargs)


# The peers' decay sequences in tests/peers were read from these versions' source.
PEERS = ["torch-ema==0.3", "ema-pytorch==0.8.3", "timm==1.0.31"]
PEER_DIFFUSERS = "diffusers==0.42.1"


@nox.session(python=PY)
def peers(session: nox.Session) -> None:
    """Differential tests against AveragedModel, timm, torch_ema, diffusers and ema-pytorch."""
    session.install("-e", ".", *TEST_DEPS, TORCH)
    # diffusers' own requirements name no torch; the pin keeps the resolver off it anyway
    session.install(TORCH, PEER_DIFFUSERS)
    # --no-deps: they require torch (timm torchvision too), and a resolver free to satisfy that
    # could replace the local CPU torch with a multi-GB CUDA build. Their EMA code needs only
    # torch; timm's model_ema.py is loaded by its path where `import timm` fails on torchvision.
    session.install("--no-deps", *PEERS)
    session.run(
        "pytest",
        "tests/peers",
        *session.posargs,
        env={"EMACORE_TEST_PEERS": "1", "EMACORE_TEST_BACKENDS": "torch"},
    )


@nox.session(python=PY)
def schedule_fixtures(session: nox.Session) -> None:
    """Regenerate tests/fixtures/schedule_fixtures.json from the real peers (torch_ema,
    diffusers, timm, ema-pytorch), then run the schedule tests with pandas (not run in CI)."""
    session.install("-e", ".", *TEST_DEPS, TORCH)  # TEST_DEPS brings pandas, the tests use it
    session.install(TORCH, PEER_DIFFUSERS)
    # --no-deps, as in `peers`: never let pip resolve torch (a CUDA build would replace it)
    session.install("--no-deps", *PEERS)
    session.run(
        "python",
        "tests/parity/generate_schedule_fixtures.py",
        "--out",
        "tests/fixtures/schedule_fixtures.json",
    )
    session.run(
        "pytest",
        "tests/core/test_schedules.py",
        *session.posargs,
        env={"EMACORE_TEST_BACKENDS": "torch"},
    )


@nox.session(python=PY)
def bench_profiles(session: nox.Session) -> None:
    """One EMA with K decay profiles vs K separate EMAs (numpy, torch, jax; CPU); prints a table."""
    session.install("-e", ".", "numpy>=1.26", TORCH, *BACKEND_DEPS["jax"])
    session.run("python", "benchmarks/bench_profiles.py", *session.posargs)


@nox.session(python=PY)
def bench_distributed(session: nox.Session) -> None:
    """Shard-local EMA vs gather-then-update on a DTensor model, 2 gloo processes (CPU)."""
    session.install("-e", ".", "numpy>=1.26", TORCH)
    session.run("python", "benchmarks/bench_distributed.py", *session.posargs)


@nox.session(python=PY)
def bench_jax(session: nox.Session) -> None:
    """Benchmark the jax backend (CPU) against optax.ema, a hand-written jitted tree_map lerp and
    a flat floor, all jitted with the state donated; prints a markdown report."""
    session.install("-e", ".", "numpy>=1.26", *BACKEND_DEPS["jax"])
    session.run("python", "benchmarks/bench_jax.py", *session.posargs)


@nox.session(python=PY)
def bench_floor(session: nox.Session) -> None:
    """Whether the benchmarks' floor is the machine's: torch's flat lerp_ beside a C OpenMP loop
    (built with gcc at run time), timm and emacore on the large sets; prints a table."""
    session.install("-e", ".", "numpy>=1.26", TORCH)
    session.install("--no-deps", "timm==1.0.31")
    session.run("python", "benchmarks/bench_floor.py", *session.posargs)
