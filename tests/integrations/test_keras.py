"""The Keras callback on the jax, torch and numpy Keras backends (``nox -s integrations``).

Keras reads ``KERAS_BACKEND`` once, at import, so each backend's checks (keras_checks.py) run
in a process of their own; this module reports each check as a test. jax and torch train a
tiny model with ``model.fit``; numpy, which cannot train, calls the callback's hooks with
weights assigned by hand (the training backends run that check too).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

CHECKS = Path(__file__).with_name("keras_checks.py")
REQUIRED = "keras" in os.environ.get("EMACORE_TEST_INTEGRATIONS", "")
BACKENDS = {"jax": "jax", "torch": "torch", "numpy": "numpy"}  # Keras backend -> module
TRAINING_CHECKS = [
    "fit_matches_float64_reference",
    "gradient_accumulation_updates_per_optimizer_step",
    "validation_inside_fit_sees_the_averages",
    "evaluate_and_predict_after_fit_use_the_averages",
    "swap_for_none_evaluates_the_live_weights",
    "copy_at_end_leaves_the_averages_in_the_model",
    "zero_debias_and_update_every",
]
EVERY_BACKEND_CHECKS = ["clear_errors", "hooks_called_directly_with_weights_set_by_hand"]
CASES = [
    (backend, name)
    for backend in BACKENDS
    for name in (TRAINING_CHECKS if backend != "numpy" else []) + EVERY_BACKEND_CHECKS
]
# Warnings are errors in the checks' processes too, as in this one (pyproject.toml), except
# one Keras raises itself on torch under numpy 2 (keras' convert_to_numpy on a tensor).
WARNING_FLAGS = [
    "-W",
    "error",
    "-W",
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning",
]


def _missing(backend: str) -> str | None:
    for module in ("keras", BACKENDS[backend]):
        if importlib.util.find_spec(module) is None:
            return module
    return None


@cache
def _run(backend: str) -> dict[str, str]:
    env = {**os.environ, "KERAS_BACKEND": backend}
    proc = subprocess.run(
        [sys.executable, *WARNING_FLAGS, str(CHECKS), backend],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if proc.returncode != 0:
        raise AssertionError(f"keras checks on {backend} crashed:\n{proc.stdout}\n{proc.stderr}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["backend"] == backend, report["backend"]
    results: dict[str, str] = report["results"]
    return results


@pytest.mark.parametrize(("backend", "check"), CASES, ids=[f"{b}-{c}" for b, c in CASES])
def test_keras_callback(backend: str, check: str) -> None:
    missing = _missing(backend)
    if missing is not None:
        if REQUIRED:  # the integrations session installs them: a broken install must fail
            raise AssertionError(f"{missing} is not installed, but the keras tests are required")
        pytest.skip(f"{missing} is not installed; `nox -s integrations` runs the keras tests")
    results = _run(backend)
    assert check in results, f"{check} did not run on {backend}: {sorted(results)}"
    assert results[check] == "ok", results[check]


def test_every_check_is_reported() -> None:
    source = CHECKS.read_text()
    defined = {
        line.split("def ", 1)[1].split("(", 1)[0]
        for previous, line in zip(source.splitlines(), source.splitlines()[1:])
        if previous == "@check"
    }
    assert defined == set(TRAINING_CHECKS) | set(EVERY_BACKEND_CHECKS)
