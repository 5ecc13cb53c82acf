"""Migrating a run from a peer library to emacore with `emacore.importers`.

Each test trains a small torch model with a peer for a few steps, imports the peer's state
dict, and checks three things against the peer itself and an independent emacore reference:

* the imported averages are the peer's shadows, bit for bit, under the model's names;
* the imported counters (count, last decay, decay product) are those of an emacore EMA that
  followed the same run from the start with the matching schedule (the reference run);
* an emacore EMA loaded with the import and the peer, both continued for more steps, agree:
  bit for bit where both run the same kernel, within `KERNEL_ULPS` where the peer rounds
  twice (see tests/peers/test_peers.py). Schedules that depend on the step continue at the
  right step, which a count off by one would show (thousands of ulps).

Only runs with ``EMACORE_TEST_PEERS=1`` (``nox -s peers``).
"""

from __future__ import annotations

import os
import sys

import pytest

if os.environ.get("EMACORE_TEST_PEERS") != "1":
    pytest.skip(
        "tests against the peer libraries run with EMACORE_TEST_PEERS=1 (nox -s peers "
        "installs them)",
        allow_module_level=True,
    )

import importlib
import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: the shared loader
import timm_model_ema

import emacore
from emacore import importers
from emacore.schedules import PowerWarmup, TFRamp

STEPS = 12  # with the peer
MORE = 8  # after the migration, with both
KERNEL_ULPS = 4  # as in test_peers.py: two roundings against lerp's one, shrinking by d a step


class _Run:
    """A model and its SGD steps; the data stream goes on across the migration."""

    def __init__(self, freeze: bool = False) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(
            nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)
        )
        if freeze:  # diffusers copies what does not require grad; emacore's frozen="copy"
            self.model[0].bias.requires_grad_(False)
        self.gen = torch.Generator().manual_seed(1)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(trainable, lr=0.1, momentum=0.9)
        self.model.train()
        self.k = 0

    def step(self) -> int:
        x = torch.randn(32, 4, generator=self.gen)
        y = torch.randn(32, 3, generator=self.gen)
        loss = nn.functional.mse_loss(self.model(x), y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        if self.k == STEPS // 2 and not self.model[0].bias.requires_grad:
            with torch.no_grad():
                self.model[0].bias.add_(0.5)  # a frozen parameter changed by hand
        self.k += 1
        return self.k


def _bits(t: Tensor) -> Tensor:
    t = t.detach()
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _assert_same(actual: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, want in expected.items():
        got = actual[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(_bits(got), _bits(want)), f"{name}: different bits"


def _assert_close_ulps(
    actual: Mapping[str, Tensor], expected: Mapping[str, Tensor], max_ulps: float
) -> None:
    assert sorted(actual) == sorted(expected)
    for name, want in expected.items():
        got = actual[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        scale = torch.maximum(got.abs().max(), want.abs().max()).detach()
        spacing = torch.nextafter(scale, scale.new_tensor(float("inf"))) - scale
        apart = float((got - want).abs().max() / spacing)
        assert apart <= max_ulps, f"{name}: {apart:.2f} ulps apart (at most {max_ulps})"


def _by_name(model: nn.Module, tensors: list[Tensor]) -> dict[str, Tensor]:
    return dict(zip([n for n, _ in model.named_parameters()], tensors))


def _counters(state: Mapping[str, Any]) -> dict[str, tuple[int, float, float]]:
    return {
        nm: (rec["count"], rec["decay_product"], rec["last_decay"])
        for nm, rec in state["leaves"].items()
    }


def _imported_averages(state: Mapping[str, Any]) -> dict[str, Tensor]:
    return {
        **{nm: rec["shadow"] for nm, rec in state["leaves"].items()},
        **dict(state["copies"]),
    }


# -- torch_ema ------------------------------------------------------------------------------


@pytest.mark.parametrize("use_num_updates", [True, False], ids=["num_updates", "constant"])
def test_torch_ema(use_num_updates: bool, tmp_path: Path) -> None:
    peer_cls = importlib.import_module("torch_ema").ExponentialMovingAverage
    decay = 0.7  # the num_updates ramp (k+1)/(k+10) gives way to it at k = 20: it spans both
    schedule = TFRamp(decay) if use_num_updates else decay
    run = _Run()
    peer = peer_cls(run.model.parameters(), decay=decay, use_num_updates=use_num_updates)
    reference = emacore.EMA(schedule, buffers="skip")
    reference.apply(run.model)
    for _ in range(STEPS):
        run.step()
        peer.update()
        reference.apply(run.model)

    updates = None if use_num_updates else STEPS  # without num_updates, torch_ema cannot say
    imported = importers.from_torch_ema(peer.state_dict(), run.model, updates=updates)
    _assert_same(_imported_averages(imported), _by_name(run.model, peer.shadow_params))
    assert _counters(imported) == _counters(reference.state_dict())

    # through a checkpoint file, as a migration script would do it
    emacore.save(imported, tmp_path / "migrated.safetensors")
    ema = emacore.EMA(schedule, buffers="skip")
    assert emacore.load_into(ema, tmp_path / "migrated.safetensors", xp=torch) == (
        emacore.LoadResult([], [])
    )
    for _ in range(MORE):
        run.step()
        peer.update()
        ema.apply(run.model)
    # torch_ema's kernel rounds twice, emacore's lerp once: see KERNEL_ULPS
    _assert_close_ulps(ema.average(run.model), _by_name(run.model, peer.shadow_params), KERNEL_ULPS)
    assert ema.state_dict()["leaves"]["0.weight"]["count"] == 1 + STEPS + MORE


# -- diffusers EMAModel ---------------------------------------------------------------------

DIFFUSERS_OPTIONS = {
    "default": {"decay": 0.8},
    "warmup": {
        "decay": 0.9,
        "min_decay": 0.3,
        "update_after_step": 3,
        "use_ema_warmup": True,
        "inv_gamma": 0.5,
        "power": 0.75,
    },
}


@pytest.mark.parametrize("options", list(DIFFUSERS_OPTIONS))
def test_diffusers_ema_model(options: str) -> None:
    peer_cls = importlib.import_module("diffusers.training_utils").EMAModel
    run = _Run(freeze=True)
    # foreach: _foreach_sub_(s, _foreach_sub(s, p), alpha=1 - d) is emacore's lerp bit for bit
    peer = peer_cls(run.model.parameters(), foreach=True, **DIFFUSERS_OPTIONS[options])
    schedule = importers.diffusers_schedule(peer.state_dict())
    assert [schedule(k) for k in range(60)] == [peer.get_decay(k) for k in range(60)]
    reference = emacore.EMA(peer.get_decay, buffers="skip")  # the peer's own formula
    reference.apply(run.model)
    for _ in range(STEPS):
        run.step()
        peer.step(run.model.parameters())
        reference.apply(run.model)

    imported = importers.from_diffusers(peer.state_dict(), run.model)
    assert set(imported["copies"]) == {"0.bias"}  # does not require grad: copied, not averaged
    _assert_same(_imported_averages(imported), _by_name(run.model, peer.shadow_params))
    ref_state = reference.state_dict()
    assert _counters(imported) == _counters(ref_state)

    assert imported["schedule"] == schedule.spec()
    ema = emacore.EMA(schedule, buffers="skip")
    ema.load_state_dict(imported)
    for _ in range(MORE):
        run.step()
        peer.step(run.model.parameters())
        ema.apply(run.model)
        assert ema.state_dict()["leaves"]["0.weight"]["last_decay"] == peer.cur_decay_value
    _assert_same(ema.average(run.model), _by_name(run.model, peer.shadow_params))


# -- timm ModelEmaV3 ------------------------------------------------------------------------


@pytest.mark.parametrize("warmup", [False, True], ids=["constant", "warmup"])
def test_timm_model_ema_v3(warmup: bool, tmp_path: Path) -> None:
    decay, min_decay, gamma, power = 0.9, 0.5, 0.5, 0.75
    run = _Run()
    options = (
        {"use_warmup": True, "min_decay": min_decay, "warmup_gamma": gamma, "warmup_power": power}
        if warmup
        else {}
    )
    peer = timm_model_ema.load().ModelEmaV3(run.model, decay=decay, **options)
    # what a migrating user writes: timm's settings as an emacore schedule
    schedule = (
        PowerWarmup(decay, min_decay=min_decay, inv_gamma=gamma, power=power) if warmup else decay
    )

    def update() -> None:
        # with a step, timm's get_decay(step) (its warmup); without, the constant decay
        peer.update(run.model, step=run.k) if warmup else peer.update(run.model)

    reference = emacore.EMA(  # timm's own decays; it averages floating buffers
        peer.get_decay if warmup else decay, buffers="average"
    )
    reference.apply(run.model)
    for _ in range(STEPS):
        run.step()
        update()
        reference.apply(run.model)

    # timm's saver writes the module's state dict; ModelEmaV3.state_dict() prefixes "module."
    imported = importers.from_timm(peer.module.state_dict(), decay=schedule, updates=STEPS)
    prefixed = importers.from_timm(peer.state_dict(), decay=schedule, updates=STEPS)
    assert sorted(prefixed["leaves"]) == sorted(imported["leaves"])
    assert set(imported["copies"]) == {"1.num_batches_tracked"}  # integer: copied
    _assert_same(_imported_averages(imported), dict(peer.module.state_dict()))
    assert _counters(imported) == _counters(reference.state_dict())

    path = tmp_path / "migrated.safetensors"
    emacore.save(imported, path)
    # the file is a plain safetensors state dict the model itself loads
    from safetensors.torch import load_file

    _assert_same(load_file(path), dict(peer.module.state_dict()))
    ema = emacore.EMA(schedule, buffers="average")
    emacore.load_into(ema, path, xp=torch)
    for _ in range(MORE):
        run.step()
        update()
        ema.apply(run.model)
    # timm's foreach path is torch._foreach_lerp_(ema, model, 1 - d): emacore's kernel
    _assert_same(ema.average(run.model), dict(peer.module.state_dict()))


def test_importers_say_what_is_wrong() -> None:
    run = _Run()
    peer = importlib.import_module("torch_ema").ExponentialMovingAverage(
        run.model.parameters(), decay=0.9
    )
    with pytest.raises(emacore.StateDictError, match="holds 6 shadows but 3 parameter names"):
        importers.from_torch_ema(peer.state_dict(), ["a", "b", "c"])
    with pytest.raises(emacore.StateDictError, match="not a torch_ema state dict"):
        importers.from_torch_ema({"decay": 0.9}, run.model)
    with pytest.raises(emacore.StateDictError, match="not a diffusers EMAModel state dict"):
        importers.from_diffusers(peer.state_dict(), run.model)
    with pytest.raises(emacore.StateDictError, match="copies names entries"):
        importers.from_timm(run.model.state_dict(), decay=0.9, copies=["nope"])
