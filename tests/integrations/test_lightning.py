"""The Lightning callback, in real training runs on CPU (``nox -s integrations``).

Every check compares the callback's average with a float64 EMA computed here from the weights
recorded after each optimizer step.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REQUIRED = "lightning" in os.environ.get("EMACORE_TEST_INTEGRATIONS", "")
try:
    import lightning.pytorch as L
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from emacore.errors import StateDictError
    from emacore.integrations.lightning import EMACallback
except ImportError as error:
    if REQUIRED:  # the integrations session installs it: a broken install must fail
        raise
    pytest.skip(
        f"PyTorch Lightning is not installed ({error}); `nox -s integrations` runs these",
        allow_module_level=True,
    )

# Lightning 2.6 on torch 2.13 calls a torch pytree API that torch deprecates: not our code
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated:FutureWarning")

DECAY = 0.6
Snapshot = dict[str, np.ndarray]


def snapshot(module: nn.Module) -> Snapshot:
    return {k: v.detach().double().numpy().copy() for k, v in module.state_dict().items()}


class Tiny(L.LightningModule):
    """A two-layer regression model that records the weights its validation steps see."""

    def __init__(self, seed: int = 0, fail_validation_at: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        self.validated: list[tuple[int, bool, Snapshot]] = []
        self.fail_validation_at = fail_validation_at

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        return ((self.net(x) - y) ** 2).mean()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            step = self.trainer.global_step
            self.validated.append((step, self.trainer.sanity_checking, snapshot(self)))
            if step == self.fail_validation_at:
                raise RuntimeError("validation failed on purpose")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.3)


class Recorder(L.Callback):
    """Records the weights after each optimizer step, and at the start of each batch."""

    def __init__(self) -> None:
        self.stepped: list[Snapshot] = []
        self.batch_start: list[tuple[int, Snapshot]] = []
        self.initial: Snapshot | None = None
        self._last = 0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.initial = snapshot(pl_module)
        self._last = trainer.global_step

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        self.batch_start.append((trainer.global_step, snapshot(pl_module)))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, out: Any, b: Any, i: int) -> None:
        if trainer.global_step > self._last:
            self._last = trainer.global_step
            self.stepped.append(snapshot(pl_module))


def reference(stepped: list[Snapshot], decay: float = DECAY) -> list[Snapshot]:
    """The float64 EMA after each step: the first step's weights, then d*s + (1-d)*w."""
    out: list[Snapshot] = []
    for weights in stepped:
        if not out:
            out.append(dict(weights))
        else:
            out.append({k: decay * out[-1][k] + (1 - decay) * w for k, w in weights.items()})
    return out


def loaders(n: int = 8) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n, 3, generator=g)
    y = torch.randn(n, 1, generator=g)
    data = TensorDataset(x, y)
    return DataLoader(data, batch_size=2), DataLoader(data, batch_size=4)


def trainer(callbacks: list[Any], **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accumulate_grad_batches": 2,
    }
    options.update(kwargs)
    return L.Trainer(callbacks=callbacks, **options)


def assert_snapshot_close(actual: Snapshot, expected: Snapshot) -> None:
    assert actual.keys() == expected.keys()
    for k in expected:
        np.testing.assert_allclose(actual[k], expected[k], rtol=1e-6, atol=1e-7, err_msg=k)


def averages(callback: EMACallback, model: nn.Module) -> Snapshot:
    return {k: v.detach().double().numpy() for k, v in callback.ema.average(model).items()}


def test_is_a_lightning_callback() -> None:
    callback = EMACallback(0.9)
    assert isinstance(callback, L.Callback)
    assert isinstance(callback, EMACallback)
    assert callback.state_key == "EMACallback[ExponentialMovingAverage]"
    assert EMACallback(0.9, name="slow").state_key == "EMACallback[slow]"


def test_averages_after_each_optimizer_step_with_accumulation() -> None:
    model, recorder, ema_callback = Tiny(), Recorder(), EMACallback(DECAY)
    train, val = loaders()
    run = trainer([recorder, ema_callback], max_epochs=2, val_check_interval=2)
    run.fit(model, train, val)

    # 8 samples in batches of 2, two batches per step: 2 steps per epoch
    assert run.global_step == 4
    assert len(recorder.stepped) == 4
    state = ema_callback.ema.state_dict()
    assert {leaf["count"] for leaf in state["leaves"].values()} == {4}
    expected = reference(recorder.stepped)
    assert_snapshot_close(averages(ema_callback, model), expected[-1])
    # the live weights are the trained ones, not the averages
    assert_snapshot_close(snapshot(model), recorder.stepped[-1])


def test_validation_sees_the_averages_and_training_resumes_with_live_weights() -> None:
    model, recorder, ema_callback = Tiny(), Recorder(), EMACallback(DECAY)
    train, val = loaders()
    # validation every 2 batches: in the middle of each epoch and at its end
    run = trainer([recorder, ema_callback], max_epochs=2, val_check_interval=2)
    run.fit(model, train, val)

    expected = reference(recorder.stepped)
    sanity = [seen for step, checking, seen in model.validated if checking]
    assert len(sanity) == 1  # before any step: no averages yet, the initial weights
    assert recorder.initial is not None
    assert_snapshot_close(sanity[0], recorder.initial)
    during_fit = [(step, seen) for step, checking, seen in model.validated if not checking]
    assert [step for step, _ in during_fit] == [1, 2, 3, 4]
    for step, seen in during_fit:
        assert_snapshot_close(seen, expected[step - 1])
        if step > 1:  # after the first step the average is the weights themselves
            live = recorder.stepped[step - 1]["net.0.weight"]
            assert not np.allclose(seen["net.0.weight"], live)
    # every batch starts from the live weights of the last optimizer step
    assert len(recorder.batch_start) == 8
    for step, weights in recorder.batch_start:
        assert_snapshot_close(weights, recorder.stepped[step - 1] if step else recorder.initial)


def test_swap_for_none_validates_with_the_live_weights() -> None:
    model, recorder, ema_callback = Tiny(), Recorder(), EMACallback(DECAY, swap_for=())
    train, val = loaders()
    trainer([recorder, ema_callback], max_epochs=1).fit(model, train, val)
    step, _, seen = model.validated[-1]
    assert_snapshot_close(seen, recorder.stepped[step - 1])


def test_live_weights_come_back_when_validation_raises() -> None:
    model = Tiny(fail_validation_at=2)
    recorder, ema_callback = Recorder(), EMACallback(DECAY)
    train, val = loaders()
    with pytest.raises(RuntimeError, match="on purpose"):
        trainer([recorder, ema_callback], max_epochs=2).fit(model, train, val)
    assert len(recorder.stepped) == 2
    assert_snapshot_close(model.validated[-1][2], reference(recorder.stepped)[-1])
    assert_snapshot_close(snapshot(model), recorder.stepped[-1])


def test_copy_at_end_leaves_the_averages_in_the_model() -> None:
    model, recorder, ema_callback = Tiny(), Recorder(), EMACallback(DECAY, copy_at_end=True)
    train, val = loaders()
    trainer([recorder, ema_callback], max_epochs=1).fit(model, train, val)
    assert_snapshot_close(snapshot(model), reference(recorder.stepped)[-1])


def _plain(tree: Any) -> bool:
    """Only dicts, lists, strings, numbers, None and tensors: loadable without pickle."""
    if isinstance(tree, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in tree.items())
    if isinstance(tree, list):
        return all(_plain(v) for v in tree)
    return tree is None or isinstance(tree, (str, int, float, bool, torch.Tensor))


def _state_close(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["leaves"].keys() == b["leaves"].keys()
    for name, leaf in a["leaves"].items():
        other = b["leaves"][name]
        assert (leaf["count"], leaf["keyed_by"]) == (other["count"], other["keyed_by"]), name
        np.testing.assert_allclose(leaf["decay_product"], other["decay_product"], rtol=1e-12)
        torch.testing.assert_close(leaf["shadow"], other["shadow"], rtol=1e-6, atol=1e-7)


def test_checkpoint_round_trip_and_resume(tmp_path: Path) -> None:
    train, val = loaders()
    first, recorder = EMACallback(DECAY), Recorder()
    model = Tiny()
    run = trainer([recorder, first], max_epochs=2)
    run.fit(model, train, val)
    path = tmp_path / "ema.ckpt"
    run.save_checkpoint(path)
    saved = first.ema.state_dict()  # the shadows themselves: `first` trains no more

    checkpoint = torch.load(path, weights_only=True)  # no pickled objects in it
    stored = checkpoint["callbacks"][first.state_key]
    assert _plain(stored)
    _state_close(stored["ema"], saved)

    # a fresh callback validating from the checkpoint gets the same state, and uses it
    restored, fresh = EMACallback(DECAY), Tiny(seed=1)
    trainer([restored], max_epochs=2).validate(fresh, val, ckpt_path=path, weights_only=True)
    _state_close(restored.ema.state_dict(), saved)
    assert_snapshot_close(fresh.validated[-1][2], reference(recorder.stepped)[-1])
    assert_snapshot_close(snapshot(fresh), recorder.stepped[-1])  # live weights back

    # resuming fit continues the same average: as if training had not stopped
    resumed_cb, resumed_rec, resumed = EMACallback(DECAY), Recorder(), Tiny(seed=1)
    trainer([resumed_rec, resumed_cb], max_epochs=4).fit(
        resumed, train, val, ckpt_path=path, weights_only=True
    )
    straight_cb, straight_rec, straight = EMACallback(DECAY), Recorder(), Tiny()
    trainer([straight_rec, straight_cb], max_epochs=4).fit(straight, train, val)
    assert len(resumed_rec.stepped) == 4 and len(straight_rec.stepped) == 8
    _state_close(resumed_cb.ema.state_dict(), straight_cb.ema.state_dict())
    assert_snapshot_close(averages(resumed_cb, resumed), reference(straight_rec.stepped)[-1])


class SaveDuringValidation(L.Callback):
    """Writes a checkpoint in the middle of validation, while the averages are swapped in,
    and records the weights the next validation batch runs with."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.next_batch: Snapshot | None = None

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if not trainer.sanity_checking and args[-1] == 0:  # batch_idx
            trainer.save_checkpoint(self.path)

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if not trainer.sanity_checking and args[-1] == 1:
            self.next_batch = snapshot(pl_module)


def test_a_checkpoint_written_during_validation_holds_the_live_weights(tmp_path: Path) -> None:
    model, recorder, ema_callback = Tiny(), Recorder(), EMACallback(DECAY)
    saver = SaveDuringValidation(tmp_path / "mid.ckpt")
    train, val = loaders()
    trainer([recorder, ema_callback, saver], max_epochs=1).fit(model, train, val)
    checkpoint = torch.load(saver.path, weights_only=True)
    weights = {k: v.double().numpy() for k, v in checkpoint["state_dict"].items()}
    assert_snapshot_close(weights, recorder.stepped[-1])
    # and validation went on with the averages
    assert saver.next_batch is not None
    assert_snapshot_close(saver.next_batch, reference(recorder.stepped)[-1])
    assert_snapshot_close(snapshot(model), recorder.stepped[-1])


def test_test_stage_uses_the_averages() -> None:
    model, recorder, ema_callback = Tiny(), Recorder(), EMACallback(DECAY)
    train, val = loaders()
    run = trainer([recorder, ema_callback], max_epochs=1)
    run.fit(model, train, val)
    run.test(model, val, verbose=False)
    assert_snapshot_close(model.validated[-1][2], reference(recorder.stepped)[-1])
    assert_snapshot_close(snapshot(model), recorder.stepped[-1])


def test_two_callbacks_need_distinct_names() -> None:
    train, val = loaders()
    with pytest.raises(RuntimeError, match="state_key` must be unique"):
        trainer([EMACallback(0.9), EMACallback(0.99)], max_epochs=1).fit(Tiny(), train, val)
    slow, fast = EMACallback(0.9, name="slow"), EMACallback(0.99, name="fast")
    trainer([slow, fast], max_epochs=1).fit(Tiny(), train, val)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown stages"):
        EMACallback(0.9, swap_for=("validation",))
    with pytest.raises(ValueError, match="update_every"):
        EMACallback(0.9, update_every=0)
    with pytest.raises(StateDictError, match="'ema'"):
        EMACallback(0.9).load_state_dict({"shadow": 1})


PL_ONLY = textwrap.dedent(
    """
    import sys
    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from emacore.integrations.lightning import EMACallback

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(3, 1)
        def training_step(self, batch, idx):
            return ((self.net(batch[0]) - batch[1]) ** 2).mean()
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    callback = EMACallback(0.9)
    assert isinstance(callback, pl.Callback), type(callback).__mro__
    assert "lightning.pytorch" not in sys.modules
    data = TensorDataset(torch.randn(8, 3), torch.randn(8, 1))
    trainer = pl.Trainer(max_epochs=1, accumulate_grad_batches=2, callbacks=[callback],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(Tiny(), DataLoader(data, batch_size=2))
    counts = {leaf["count"] for leaf in callback.ema.state_dict()["leaves"].values()}
    assert counts == {2}, counts
    print("ok")
    """
)


def test_works_with_the_pytorch_lightning_package() -> None:
    """The standalone ``pytorch_lightning`` package: its Trainer takes only its own Callback."""
    if importlib.util.find_spec("pytorch_lightning") is None:
        if REQUIRED:
            raise AssertionError("pytorch_lightning is not installed, but the tests are required")
        pytest.skip("pytorch_lightning is not installed; `nox -s integrations` installs it")
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", PL_ONLY], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
