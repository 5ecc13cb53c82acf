"""Every option of the Lightning and Keras callbacks changes the numbers it should.

Each test sets one option and compares what the callback averaged (and what the model ran
with) against a float64 EMA computed here from the weights recorded after each optimizer step,
so that a callback dropping the option fails. Lightning runs here (``nox -s integrations``);
the Keras checks run once per Keras backend in a process of their own
(callback_option_checks.py), as test_keras.py runs keras_checks.py.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: the shared reference
from ema_reference import Snapshot, ema_reference

REQUIRED = os.environ.get("EMACORE_TEST_INTEGRATIONS", "")

# -- Keras: the checks run in subprocesses, one per Keras backend ------------------------------

CHECKS = Path(__file__).with_name("callback_option_checks.py")
KERAS_BACKENDS = {"jax": "jax", "torch": "torch", "numpy": "numpy"}  # Keras backend -> module
KERAS_CHECKS = [
    "schedule_decay",
    "decay_profiles",
    "zero_debias",
    "update_every",
    "num_updates",
    "shadow_dtype_same",
    "shadow_dtype_float64",
    "nonfinite_skip",
    "nonfinite_raise",
    "include_exclude",
    "swap_for_evaluate_only",
    "swap_for_predict_only",
    "copy_at_end",
]
# as in test_keras.py: warnings are errors there too, but one Keras raises on torch itself
WARNING_FLAGS = [
    "-W",
    "error",
    "-W",
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning",
]


@cache
def _keras_results(backend: str) -> dict[str, str]:
    env = {**os.environ, "KERAS_BACKEND": backend}
    proc = subprocess.run(
        [sys.executable, *WARNING_FLAGS, str(CHECKS), backend],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if proc.returncode != 0:  # every check fails with it, the process run once
        crash = f"keras option checks on {backend} crashed:\n{proc.stdout}\n{proc.stderr}"
        return dict.fromkeys(KERAS_CHECKS, crash)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["backend"] == backend, report["backend"]
    results: dict[str, str] = report["results"]
    return results


# jax without x64 has no float64 (callback_option_checks.BACKENDS_OF)
KERAS_CASES = [
    (backend, name)
    for name in KERAS_CHECKS
    for backend in KERAS_BACKENDS
    if (backend, name) != ("jax", "shadow_dtype_float64")
]


@pytest.mark.parametrize(
    ("backend", "check"), KERAS_CASES, ids=[f"{b}-{c}" for b, c in KERAS_CASES]
)
def test_keras_callback_option(backend: str, check: str) -> None:
    for module in ("keras", KERAS_BACKENDS[backend]):
        if importlib.util.find_spec(module) is None:
            if "keras" in REQUIRED:  # the integrations session installs them
                raise AssertionError(f"{module} is not installed, but the keras tests are required")
            pytest.skip(f"{module} is not installed; `nox -s integrations` runs the keras tests")
    results = _keras_results(backend)
    assert check in results, f"{check} did not run on {backend}: {sorted(results)}"
    assert results[check] == "ok", results[check]


def test_every_keras_check_is_reported() -> None:
    lines = CHECKS.read_text().splitlines()
    defined = {
        line.split("def ", 1)[1].split("(", 1)[0]
        for previous, line in itertools.pairwise(lines)
        if previous == "@check"
    }
    assert defined == set(KERAS_CHECKS)


# -- Lightning: in this process ------------------------------------------------------------------

try:
    import lightning.pytorch as L
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from emacore.errors import EMAWarning, NonFiniteError
    from emacore.integrations.lightning import EMACallback
except ImportError as error:
    if "lightning" in REQUIRED:  # the integrations session installs it: a broken install fails
        raise
    L = None
    LIGHTNING_MISSING = (
        f"PyTorch Lightning is not installed ({error}); `nox -s integrations` runs these"
    )
else:
    LIGHTNING_MISSING = ""

lightning = pytest.mark.skipif(bool(LIGHTNING_MISSING), reason=LIGHTNING_MISSING)
# Lightning 2.6 on torch 2.13 calls a torch pytree API that torch deprecates: not our code
lightning_warnings = pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated:FutureWarning")

DECAY = 0.6
STEPS = 8  # two epochs of four optimizer steps (8 samples in batches of 2)
PARAMS = ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias")


def snapshot(module: Any) -> Snapshot:
    return {k: v.detach().double().numpy().copy() for k, v in module.state_dict().items()}


def assert_snapshot_close(actual: Snapshot, expected: Snapshot, rtol: float = 1e-6) -> None:
    assert actual.keys() == expected.keys(), (sorted(actual), sorted(expected))
    for k in expected:
        np.testing.assert_allclose(actual[k], expected[k], rtol=rtol, atol=rtol / 10, err_msg=k)


if L is not None:

    class Net(L.LightningModule):
        """A small regression model with a frozen parameter that training changes by hand
        (``offset``), optionally a BatchNorm (floating buffers), that records the weights its
        validation, test and predict steps run with."""

        def __init__(self, batchnorm: bool = False) -> None:
            super().__init__()
            torch.manual_seed(0)
            layers = [nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)]  # net.0 and net.2: PARAMS
            if batchnorm:  # net.0, net.1 (BatchNorm) and net.3: BN_PARAMS
                layers.insert(1, nn.BatchNorm1d(4))
            self.net = nn.Sequential(*layers)
            self.offset = nn.Parameter(torch.zeros(2), requires_grad=False)
            self.seen: dict[str, list[Snapshot]] = {"validate": [], "test": [], "predict": []}

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            with torch.no_grad():
                self.offset.add_(torch.tensor([0.5, -1.0]))  # a frozen value that moves
            x, y = batch
            return ((self.net(x) - y) ** 2).mean()

        def _record(self, stage: str, batch_idx: int) -> None:
            if batch_idx == 0 and not self.trainer.sanity_checking:
                self.seen[stage].append(snapshot(self))

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self._record("validate", batch_idx)

        def test_step(self, batch: Any, batch_idx: int) -> None:
            self._record("test", batch_idx)

        def predict_step(self, batch: Any, batch_idx: int) -> Any:
            self._record("predict", batch_idx)
            return self.net(batch[0])

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.net.parameters(), lr=0.3)

    class Recorder(L.Callback):
        """The weights (every state-dict entry) after each optimizer step."""

        def __init__(self) -> None:
            self.stepped: list[Snapshot] = []
            self._last = 0

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            if trainer.global_step > self._last:
                self._last = trainer.global_step
                self.stepped.append(snapshot(pl_module))

    class PoisonStep(L.Callback):
        """Puts NaN into a weight after optimizer step ``step`` (before the EMA callback sees
        it; list it before the callback), and its value back in ``Heal`` (listed after)."""

        def __init__(self, step: int) -> None:
            self.step = step
            self.saved: torch.Tensor | None = None

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            if trainer.global_step == self.step and self.saved is None:
                weight = pl_module.net[0].weight
                self.saved = weight.detach().clone()
                with torch.no_grad():
                    weight[0, 0] = float("nan")

    class Heal(L.Callback):
        def __init__(self, poison: PoisonStep) -> None:
            self.poison = poison

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            if trainer.global_step == self.poison.step and self.poison.saved is not None:
                with torch.no_grad():
                    pl_module.net[0].weight.copy_(self.poison.saved)


def loaders() -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(123)
    data = TensorDataset(torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g))
    return DataLoader(data, batch_size=2), DataLoader(data, batch_size=4)


def make_trainer(callbacks: list[Any], epochs: int = 2) -> Any:
    return L.Trainer(
        callbacks=callbacks,
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def fit(
    callback: Any, model: Any = None, *, before: Sequence[Any] = (), after: Sequence[Any] = ()
) -> tuple[Any, Any, Any]:
    """Two epochs of ``model`` (a fresh `Net`) with ``callback``; the model, the recorder (its
    ``stepped`` weights) and the trainer."""
    model = Net() if model is None else model
    recorder = Recorder()
    train, val = loaders()
    run = make_trainer([recorder, *before, callback, *after])
    run.fit(model, train, val)
    return model, recorder, run


def averaged(callback: Any, model: Any) -> Snapshot:
    return {k: v.detach().double().numpy() for k, v in callback.ema.average(model).items()}


def running_mean(step: Any) -> float:
    """d = n / (n + 1) at update n = 0, 1, ...: the average is the mean of every update."""
    return float(step) / (float(step) + 1)


@lightning
@lightning_warnings
def test_lightning_schedule_decay() -> None:
    callback = EMACallback(running_mean)
    model, recorder, _ = fit(callback)
    assert len(recorder.stepped) == STEPS
    mean = dict(recorder.stepped[-1])
    for k in PARAMS:
        mean[k] = np.mean([w[k] for w in recorder.stepped], axis=0)  # numpy's own mean
    assert_snapshot_close(averaged(callback, model), mean)
    decays = [running_mean(n) for n in range(STEPS)]
    assert_snapshot_close(
        averaged(callback, model), ema_reference(recorder.stepped, decays, PARAMS)
    )
    assert_snapshot_close(model.seen["validate"][-1], mean)  # validated with them


@lightning
@lightning_warnings
@pytest.mark.parametrize(
    ("decay", "other"),
    [({"fast": DECAY, "slow": 0.9}, "slow"), ((DECAY, 0.9), "0.9")],
    ids=["dict", "tuple"],
)
def test_lightning_decay_profiles(decay: Any, other: str) -> None:
    """Several decays: one average each; the first is the one read and swapped in."""
    callback = EMACallback(decay)
    model, recorder, _ = fit(callback)
    fast = ema_reference(recorder.stepped, [DECAY] * STEPS, PARAMS)
    slow = ema_reference(recorder.stepped, [0.9] * STEPS, PARAMS)
    assert_snapshot_close(averaged(callback, model), fast)
    profile = callback.ema.profile(other)
    assert_snapshot_close(
        {k: v.detach().double().numpy() for k, v in profile.average(model).items()}, slow
    )
    assert_snapshot_close(model.seen["validate"][-1], fast)


@lightning
@lightning_warnings
@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_lightning_swap_for_one_stage(stage: str) -> None:
    """Only the stage named runs with the averages; the others with the trained weights."""
    callback = EMACallback(DECAY, swap_for=stage)
    model, recorder, run = fit(callback)
    _, val = loaders()
    run.test(model, val, verbose=False)
    run.predict(model, val)
    live = recorder.stepped[-1]
    expected = ema_reference(recorder.stepped, [DECAY] * STEPS, PARAMS)
    assert not np.allclose(expected["net.0.weight"], live["net.0.weight"])
    for name, seen in model.seen.items():
        assert len(seen) >= 1, name
        assert_snapshot_close(seen[-1], expected if name == stage else live)
    assert_snapshot_close(snapshot(model), live)


@lightning
@lightning_warnings
def test_lightning_zero_debias() -> None:
    callback = EMACallback(0.9, zero_debias=True)
    model, recorder, _ = fit(callback)
    expected = ema_reference(recorder.stepped, [0.9] * STEPS, PARAMS, zero_debias=True)
    assert_snapshot_close(averaged(callback, model), expected)
    assert_snapshot_close(model.seen["validate"][-1], expected)


@lightning
@lightning_warnings
def test_lightning_update_every() -> None:
    """update_every=3: updates at the 1st, 4th and 7th optimizer steps, with the decay
    raised to the 3rd power (as if every step had been applied)."""
    callback = EMACallback(DECAY, update_every=3)
    model, recorder, _ = fit(callback)
    updated = [recorder.stepped[i] for i in (0, 3, 6)]
    # the frozen parameter's copy is taken at updates too: its value after step 7
    expected = ema_reference(updated, [DECAY**3] * 3, PARAMS)
    assert_snapshot_close(averaged(callback, model), expected)


@lightning
@lightning_warnings
def test_lightning_num_updates() -> None:
    """TF's num_updates: the decay at each update is min(decay, (1 + n) / (10 + n)) with n
    the counter's value then (here the Trainer's optimizer step)."""
    trainers: list[Any] = []
    callback = EMACallback(0.99, num_updates=lambda: trainers[0].global_step)
    model, recorder = Net(), Recorder()
    train, val = loaders()
    trainers.append(make_trainer([recorder, callback]))
    trainers[0].fit(model, train, val)
    decays = [min(0.99, (1 + n) / (10 + n)) for n in range(1, STEPS + 1)]
    assert_snapshot_close(
        averaged(callback, model), ema_reference(recorder.stepped, decays, PARAMS)
    )


@lightning
@lightning_warnings
def test_lightning_shadow_dtype() -> None:
    """float64 shadows of float32 weights: the averages are the float64 reference to
    float64 rounding (float32 shadows would be ~1e-7 off), and the model validates with
    them rounded to its float32."""
    callback = EMACallback(DECAY, shadow_dtype=torch.float64)
    model, recorder, _ = fit(callback)
    averages = callback.ema.average(model)
    assert {averages[k].dtype for k in PARAMS} == {torch.float64}
    expected = ema_reference(recorder.stepped, [DECAY] * STEPS, PARAMS)
    got = {k: averages[k].numpy() for k in PARAMS}
    for k in PARAMS:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-13, atol=1e-15, err_msg=k)
    assert {v.dtype for v in model.parameters()} == {torch.float32}
    assert_snapshot_close(model.seen["validate"][-1], expected)


@lightning
@lightning_warnings
def test_lightning_nonfinite_skip() -> None:
    """A step whose weights hold NaN is left out of the average (step 3 here)."""
    poison = PoisonStep(step=3)
    callback = EMACallback(DECAY, nonfinite="skip")
    with pytest.warns(EMAWarning, match="NaN or infinity"):
        model, recorder, _ = fit(callback, before=[poison], after=[Heal(poison)])
    assert callback.ema.skipped_updates == 1
    kept = recorder.stepped[:2] + recorder.stepped[3:]
    assert_snapshot_close(
        averaged(callback, model), ema_reference(kept, [DECAY] * (STEPS - 1), PARAMS)
    )


@lightning
@lightning_warnings
def test_lightning_nonfinite_raise() -> None:
    poison = PoisonStep(step=3)
    with pytest.raises(NonFiniteError, match=r"net\.0\.weight"):
        fit(EMACallback(DECAY, nonfinite="raise"), before=[poison], after=[Heal(poison)])


@lightning
@lightning_warnings
@pytest.mark.parametrize("option", [{"exclude": "net.0.*"}, {"include": ["net.2.*"]}])
def test_lightning_include_exclude(option: dict[str, Any]) -> None:
    """Only the selected leaves are tracked: the averaged state dict holds them alone (and,
    with ``exclude``, the frozen parameter's copy), and validation runs with the live values
    of the others."""
    callback = EMACallback(DECAY, **option)
    model, recorder, _ = fit(callback)
    selected = ("net.2.weight", "net.2.bias")
    expected = ema_reference(recorder.stepped, [DECAY] * STEPS, selected)
    tracked = (*selected, "offset") if "exclude" in option else selected
    assert_snapshot_close(averaged(callback, model), {k: expected[k] for k in tracked})
    assert not np.allclose(  # the averages of net.0 would differ from its live weights
        ema_reference(recorder.stepped, [DECAY] * STEPS, PARAMS)["net.0.weight"],
        recorder.stepped[-1]["net.0.weight"],
    )
    assert_snapshot_close(model.seen["validate"][-1], expected)


BN_PARAMS = (
    "net.0.weight",
    "net.0.bias",
    "net.1.weight",
    "net.1.bias",
    "net.3.weight",
    "net.3.bias",
)
BN_STATS = ("net.1.running_mean", "net.1.running_var")


@lightning
@lightning_warnings
@pytest.mark.parametrize("buffers", ["copy", "average", "skip"])
def test_lightning_buffers(buffers: str) -> None:
    """BatchNorm's running statistics: copied as they are, averaged like the parameters, or
    left out of the averaged state dict; the integer counter is never averaged."""
    callback = EMACallback(DECAY, buffers=buffers)
    model, recorder, _ = fit(callback, Net(batchnorm=True))
    averaged_keys = BN_PARAMS + (BN_STATS if buffers == "average" else ())
    expected = ema_reference(recorder.stepped, [DECAY] * STEPS, averaged_keys)
    if buffers == "skip":
        expected = {
            k: v for k, v in expected.items() if k not in BN_STATS and "num_batches" not in k
        }
    assert_snapshot_close(averaged(callback, model), expected)
    stats = ema_reference(recorder.stepped, [DECAY] * STEPS, BN_STATS)
    assert not np.allclose(stats["net.1.running_mean"], recorder.stepped[-1]["net.1.running_mean"])


@lightning
@lightning_warnings
@pytest.mark.parametrize("frozen", ["copy", "average", "skip"])
def test_lightning_frozen(frozen: str) -> None:
    """A parameter that does not require grad (``offset``, which training moves by hand)."""
    callback = EMACallback(DECAY, frozen=frozen)
    model, recorder, _ = fit(callback)
    keys = PARAMS + (("offset",) if frozen == "average" else ())
    expected = ema_reference(recorder.stepped, [DECAY] * STEPS, keys)
    if frozen == "skip":
        del expected["offset"]
    assert_snapshot_close(averaged(callback, model), expected)
    assert not np.allclose(
        ema_reference(recorder.stepped, [DECAY] * STEPS, ("offset",))["offset"],
        recorder.stepped[-1]["offset"],
    )


@lightning
@lightning_warnings
def test_lightning_name_keys_the_checkpoint(tmp_path: Path) -> None:
    """``name`` keys the state in the checkpoint, and the state holds the averages."""
    callback = EMACallback(DECAY, name="slow")
    _, recorder, run = fit(callback)
    path = tmp_path / "named.ckpt"
    run.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert list(checkpoint["callbacks"]) == ["EMACallback[slow]"]
    leaves = checkpoint["callbacks"]["EMACallback[slow]"]["ema"]["leaves"]
    expected = ema_reference(recorder.stepped, [DECAY] * STEPS, PARAMS)
    for k in PARAMS:
        np.testing.assert_allclose(
            leaves[k]["shadow"].double().numpy(), expected[k], rtol=1e-6, atol=1e-7
        )

    restored = EMACallback(DECAY, name="slow")
    fresh = Net()
    _, val = loaders()
    make_trainer([restored]).validate(fresh, val, ckpt_path=path, weights_only=True)
    assert_snapshot_close(fresh.seen["validate"][-1], expected)


@lightning
@lightning_warnings
@pytest.mark.parametrize("copy_at_end", [True, False])
def test_lightning_copy_at_end(copy_at_end: bool) -> None:
    callback = EMACallback(DECAY, copy_at_end=copy_at_end)
    model, recorder, _ = fit(callback)
    expected = ema_reference(recorder.stepped, [DECAY] * STEPS, PARAMS)
    assert_snapshot_close(snapshot(model), expected if copy_at_end else recorder.stepped[-1])
