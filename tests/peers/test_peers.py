"""Differential tests against the moving averages PyTorch users run today.

Each peer and an `emacore.ExponentialMovingAverage` configured to match it follow one training
run (same model, seeds and SGD steps). Both update after every step, and then the averages
must agree: bit for bit where both run the same kernel, within a stated number of float32 ulps
where the kernels differ (the test says why). The peers, as read from the source of the
versions ``nox -s peers`` pins:

* torch's ``AveragedModel`` with ``get_ema_multi_avg_fn``,
* timm's ``ModelEmaV3`` (``timm/utils/model_ema.py``),
* ``torch_ema.ExponentialMovingAverage``,
* diffusers' ``EMAModel`` (``diffusers.training_utils``),
* ``ema_pytorch.EMA``.

The kernels: emacore's default torch update is ``torch._foreach_lerp_(shadows, params, 1 - d)``
with ``1 - d`` computed in Python (float64); with ``compat="tensorflow"`` it is
``s - (s - p) * (1 - d)`` in that order, with ``d`` and ``1 - d`` rounded to float32 as TF
rounds them.

The step convention: emacore applies the model once where the peer is built (its step 0:
shadows start as copies, as every peer's do) and once after every optimizer step, so the k-th
update is emacore's step ``k``, the value its schedule is called with. (One AveragedModel
variant shows the other way: emacore's first apply at the first update.)

Only runs with ``EMACORE_TEST_PEERS=1`` (``nox -s peers``); there a peer that does not import
is an error, never a skip.
"""

from __future__ import annotations

import os
import sys

import pytest

if os.environ.get("EMACORE_TEST_PEERS") != "1":
    pytest.skip(
        "differential tests against the peer libraries run with EMACORE_TEST_PEERS=1 "
        "(nox -s peers installs them)",
        allow_module_level=True,
    )

import importlib
import importlib.util
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: the shared loader
import timm_model_ema

import emacore
from emacore.schedules import Schedule, TFRamp

STEPS = 20


# -- peers: imported where a test needs them, so a missing one fails that test ---------------


@pytest.fixture(scope="module")
def model_ema_v3() -> Any:
    return timm_model_ema.load().ModelEmaV3


@pytest.fixture(scope="module")
def torch_ema() -> Any:
    return importlib.import_module("torch_ema").ExponentialMovingAverage


@pytest.fixture(scope="module")
def ema_model() -> Any:
    return importlib.import_module("diffusers.training_utils").EMAModel


@pytest.fixture(scope="module")
def ema_pytorch() -> Any:
    return importlib.import_module("ema_pytorch").EMA


# -- the training run ---------------------------------------------------------------------


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def _train(model: nn.Module, steps: int = STEPS) -> Iterator[int]:
    """Yield ``k`` after the k-th SGD step (in train mode: BatchNorm's statistics move too)."""
    gen = torch.Generator().manual_seed(1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1, momentum=0.9)
    model.train()
    for k in range(1, steps + 1):
        x = torch.randn(32, 4, generator=gen)
        y = torch.randn(32, 3, generator=gen)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        yield k


def _eval_input() -> Tensor:
    return torch.randn(64, 4, generator=torch.Generator().manual_seed(2))


def _eval_with_averages(model: nn.Module, ema: emacore.EMA) -> Tensor:
    """The model's eval output with emacore's averages swapped in (and the live values back)."""
    live = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad(), ema.swapped(model):
        out = model(_eval_input())
    _assert_same(dict(model.state_dict()), live)
    return out


def _by_name(model: nn.Module, tensors: list[Tensor]) -> dict[str, Tensor]:
    """A parameter-list peer's shadows, under the model's parameter names."""
    names = [name for name, _ in model.named_parameters()]
    assert len(names) == len(tensors)
    return dict(zip(names, tensors))


# -- comparisons ----------------------------------------------------------------------------


def _bits(t: Tensor) -> Tensor:
    t = t.detach()
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _assert_same(actual: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> None:
    """Equal bit for bit: same names, dtypes, shapes and float32 bit patterns."""
    assert sorted(actual) == sorted(expected)
    for name, want in expected.items():
        got = actual[name]
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
        assert torch.equal(_bits(got), _bits(want)), f"{name}: same values, different bits"


def _ulps(a: Tensor, b: Tensor) -> float:
    """The largest ``|a - b|``, in float32 spacings at the largest magnitude in ``a`` or ``b``.

    Not per element: a small element is the difference of larger operands (shadow and
    parameter) and carries their rounding, so its own spacing would overstate the error.
    """
    scale = torch.maximum(a.abs().max(), b.abs().max()).detach()
    spacing = torch.nextafter(scale, scale.new_tensor(float("inf"))) - scale
    return float((a - b).abs().max() / spacing)


def _assert_close_ulps(
    actual: Mapping[str, Tensor], expected: Mapping[str, Tensor], max_ulps: float
) -> None:
    assert sorted(actual) == sorted(expected)
    for name, want in expected.items():
        got = actual[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        apart = _ulps(got, want)
        assert apart <= max_ulps, f"{name}: {apart:.2f} ulps apart (at most {max_ulps})"


# Both sides use the same float64 decays, so only the kernels differ: the peer rounds twice,
# ``t = RN(RN(s - p) * c)`` then ``RN(s - t)``, while torch's CPU lerp (emacore's default)
# forms ``s + c * RN(p - s)`` with one fused multiply-add. Each update may leave the shadows
# about an ulp (at the tensor's magnitude) apart, and earlier differences shrink by ``d`` per
# step: over these 20 steps at most 1 ulp was seen. 4 leaves room and still catches a wrong
# decay: one step late is thousands of ulps, every decay off by one part in a million is 10+.
KERNEL_ULPS = 4


# -- torch.optim.swa_utils.AveragedModel + get_ema_multi_avg_fn -------------------------------


def _averaged_model(
    decay: float, use_buffers: bool, eager: bool
) -> tuple[nn.Module, Any, emacore.EMA]:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = _model()
    peer = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=use_buffers)
    buffers = "average" if use_buffers else "copy"
    if eager:
        # update_parameters copies at its first call (n_averaged == 0) and lerps with weight
        # 1 - decay after: decay 0 at emacore's step 1, then the constant decay.
        ema = emacore.EMA(lambda step: 0.0 if step <= 1 else decay, buffers=buffers)
        ema.apply(model)
    else:
        # or: start emacore at the first update too; its first apply copies the same way
        ema = emacore.EMA(decay, buffers=buffers)
    for _ in _train(model):
        peer.update_parameters(model)
        ema.apply(model)
    return model, peer, ema


def _truncated_ema(values: list[int], decay: float) -> int:
    """AveragedModel's EMA of an integer buffer: ``e * d + v * (1 - d)`` in float32, truncated
    by ``copy_`` into the int64 buffer at every update."""
    e = torch.tensor(values[0])
    for v in values[1:]:
        e.copy_(e * decay + torch.tensor(v) * (1 - decay))
    return int(e)


@pytest.mark.parametrize("eager", [True, False], ids=["apply-at-start", "apply-from-step-1"])
@pytest.mark.parametrize("use_buffers", [False, True], ids=["params", "params+buffers"])
def test_averaged_model(use_buffers: bool, eager: bool) -> None:
    decay = 0.9
    model, peer, ema = _averaged_model(decay, use_buffers, eager)
    got = ema.average(model)
    want = dict(peer.module.state_dict())
    if use_buffers:
        # use_buffers=True: float buffers are averaged with the parameters (emacore's
        # buffers="average"), but so is num_batches_tracked, in float32 and truncated back
        # into int64; emacore copies integer buffers, never averages or truncates them.
        name = "1.num_batches_tracked"
        assert int(want.pop(name)) == _truncated_ema(list(range(1, STEPS + 1)), decay) < STEPS
        assert int(got.pop(name)) == STEPS
    # Same kernel (_foreach_lerp_ with the Python float 1 - decay), same decays: bitwise.
    # use_buffers=False copies every buffer at every update, as emacore's default "copy".
    _assert_same(got, want)


@pytest.mark.parametrize("use_buffers", [False, True], ids=["params", "params+buffers"])
def test_averaged_model_eval_output(use_buffers: bool) -> None:
    model, peer, ema = _averaged_model(0.9, use_buffers, eager=True)
    peer.eval()
    with torch.no_grad():
        want = peer(_eval_input())
    _assert_same({"out": _eval_with_averages(model, ema)}, {"out": want})


# -- timm ModelEmaV3 ------------------------------------------------------------------------


@pytest.mark.parametrize("exclude_buffers", [False, True], ids=["buffers", "exclude_buffers"])
def test_timm_model_ema_v3(model_ema_v3: Any, exclude_buffers: bool) -> None:
    decay = 0.9
    model = _model()
    peer = model_ema_v3(model, decay=decay, exclude_buffers=exclude_buffers)
    # update(model) without a step: the constant decay from the first update on. It lerps
    # every floating state_dict entry (BatchNorm's statistics too) and copies integer ones:
    # emacore's buffers="average"; with exclude_buffers every buffer is copied: "copy".
    ema = emacore.EMA(decay, buffers="copy" if exclude_buffers else "average")
    ema.apply(model)
    for _ in _train(model):
        peer.update(model)
        ema.apply(model)
    # timm's foreach path is torch._foreach_lerp_(ema, model, 1. - decay): emacore's kernel.
    _assert_same(ema.average(model), dict(peer.module.state_dict()))
    with torch.no_grad():
        want = peer(_eval_input())  # its module is in eval mode since construction
    _assert_same({"out": _eval_with_averages(model, ema)}, {"out": want})


def test_timm_model_ema_v3_warmup(model_ema_v3: Any) -> None:
    decay, min_decay, after, gamma, power = 0.9, 0.6, 3, 0.5, 0.75
    model = _model()
    peer = model_ema_v3(
        model,
        decay=decay,
        min_decay=min_decay,
        update_after_step=after,
        use_warmup=True,
        warmup_gamma=gamma,
        warmup_power=power,
    )

    def schedule(step: int) -> float:
        # get_decay(step): 0 (a copy) until s = step - update_after_step - 1 is positive, then
        # 1 - (1 + s / gamma) ** -power clipped to [min_decay, decay], in Python floats. With
        # these settings both clips act within 20 steps (s = 1 and s >= 11).
        s = step - after - 1
        if s <= 0:
            return 0.0
        return max(min(1 - float((1 + s / gamma) ** -power), decay), min_decay)

    assert [schedule(k) for k in range(STEPS + 1)] == [peer.get_decay(k) for k in range(STEPS + 1)]
    ema = emacore.EMA(schedule, buffers="average")
    ema.apply(model)
    for k in _train(model):
        peer.update(model, step=k)
        ema.apply(model)
    _assert_same(ema.average(model), dict(peer.module.state_dict()))


# -- torch_ema ------------------------------------------------------------------------------


def _torch_ema_run(
    torch_ema: Any, decay: float, use_num_updates: bool, make: Callable[[Tensor], emacore.EMA]
) -> tuple[nn.Module, Any, emacore.EMA]:
    model = _model()
    peer = torch_ema(model.parameters(), decay=decay, use_num_updates=use_num_updates)
    counter = torch.zeros((), dtype=torch.int64)
    ema = make(counter)
    ema.apply(model)
    for k in _train(model):
        peer.update()
        counter.fill_(k)
        ema.apply(model)
    return model, peer, ema


@pytest.mark.parametrize("form", ["tensor", "callable", "schedule"])
def test_torch_ema_num_updates(torch_ema: Any, form: str) -> None:
    # update() increments num_updates *before* using it: the k-th update uses
    # min(decay, (1 + k) / (10 + k)), TF's num_updates rule at num_updates = k, which is
    # emacore's TFRamp at step k. With decay 0.6 the ramp gives way to it from k = 13 on.
    decay = 0.6
    makers: dict[str, Callable[[Tensor], emacore.EMA]] = {
        "tensor": lambda n: emacore.EMA(decay, num_updates=n, buffers="skip"),
        "callable": lambda n: emacore.EMA(decay, num_updates=lambda: int(n), buffers="skip"),
        "schedule": lambda n: emacore.EMA(TFRamp(decay), buffers="skip"),
    }
    model, peer, ema = _torch_ema_run(torch_ema, decay, True, makers[form])
    # torch_ema tracks the parameters only: emacore's buffers="skip". Its kernel is
    # s -= (s - p) * (1 - d), emacore's default a lerp: see KERNEL_ULPS. (emacore's exact
    # mode has torch_ema's order, but rounds the decays to float32 first, as TF does, so its
    # 1 - d differs from torch_ema's by an ulp here at k = 9 and from k = 11 on.)
    _assert_close_ulps(ema.average(model), _by_name(model, peer.shadow_params), KERNEL_ULPS)


def test_torch_ema_same_kernel_bitwise(torch_ema: Any) -> None:
    # Constant decay (use_num_updates=False), and one that float32 holds exactly, so emacore's
    # TF-mode coefficient float32(1 - float32(d)) is torch_ema's 1 - d as its float32 kernel
    # rounds it; compat="tensorflow" then runs torch_ema's operations in torch_ema's order.
    # 1 - d = 3/32 is no power of two, so the product rounds and the order matters: emacore's
    # default lerp differs here in the last bit (a power of two would hide that).
    decay = 0.90625
    model, peer, ema = _torch_ema_run(
        torch_ema,
        decay,
        False,
        lambda _: emacore.EMA(decay, compat="tensorflow", buffers="skip"),
    )
    _assert_same(ema.average(model), _by_name(model, peer.shadow_params))
    model.eval()
    with torch.no_grad(), peer.average_parameters():
        want = model(_eval_input())
    _assert_same({"out": _eval_with_averages(model, ema)}, {"out": want})


# -- diffusers EMAModel ---------------------------------------------------------------------


def _diffusers_run(
    ema_model: Any, ema: emacore.EMA, **peer_options: Any
) -> tuple[nn.Module, Any, emacore.EMA]:
    model = _model()
    # a frozen parameter, changed by hand mid-run: diffusers copies parameters that do not
    # require grad at every step, as emacore's default frozen="copy" does
    model[0].bias.requires_grad_(False)
    peer = ema_model(model.parameters(), **peer_options)
    ema.apply(model)
    for k in _train(model):
        if k == STEPS // 2:
            with torch.no_grad():
                model[0].bias.add_(0.5)
        peer.step(model.parameters())
        ema.apply(model)
        assert ema.state_dict()["leaves"]["0.weight"]["last_decay"] == peer.cur_decay_value
    return model, peer, ema


def _diffusers_schedule(decay: float) -> Schedule:
    # step() increments optimization_step, then get_decay(k): 0 (a copy) at k = 1, then
    # min(decay, (1 + s) / (10 + s)) with s = k - 1: emacore's TFRamp one step late.
    ramp = TFRamp(decay)
    return lambda step: 0.0 if step <= 1 else ramp(step - 1)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per-tensor"])
def test_diffusers_ema_model(ema_model: Any, foreach: bool) -> None:
    decay = 0.6
    ema = emacore.EMA(_diffusers_schedule(decay), buffers="skip")  # parameters only
    model, peer, ema = _diffusers_run(ema_model, ema, decay=decay, foreach=foreach)
    got, want = ema.average(model), _by_name(model, peer.shadow_params)
    if foreach:
        # _foreach_sub_(s, _foreach_sub(s, p), alpha=1 - d): torch's CPU add/sub with alpha is
        # one fused multiply-add, s + (-c) * RN(s - p), the same number as lerp's
        # s + c * RN(p - s): bitwise.
        _assert_same(got, want)
    else:
        # s.sub_((1 - d) * (s - p)): torch_ema's two roundings; see KERNEL_ULPS.
        _assert_close_ulps(got, want, KERNEL_ULPS)


def test_diffusers_ema_model_same_kernel_bitwise(ema_model: Any) -> None:
    # min_decay == decay: after the first step's copy the decay is constant, and float32
    # holds 0.90625 exactly, so compat="tensorflow" (the peer's s - c * (s - p) order, TF's
    # float32 coefficient) gives its numbers bit for bit, the copy included (c = 1). As for
    # torch_ema above, 1 - d = 3/32 makes the kernel order matter.
    decay = 0.90625
    ema = emacore.EMA(lambda step: 0.0 if step <= 1 else decay, compat="tensorflow", buffers="skip")
    model, peer, ema = _diffusers_run(ema_model, ema, decay=decay, min_decay=decay)
    _assert_same(ema.average(model), _by_name(model, peer.shadow_params))
    model.eval()
    peer.store(model.parameters())
    peer.copy_to(model.parameters())
    with torch.no_grad():
        want = model(_eval_input())
    peer.restore(model.parameters())
    _assert_same({"out": _eval_with_averages(model, ema)}, {"out": want})


# -- ema-pytorch ----------------------------------------------------------------------------


@pytest.mark.parametrize("use_foreach", [False, True], ids=["lerp_", "foreach"])
def test_ema_pytorch(ema_pytorch: Any, use_foreach: bool) -> None:
    beta, after, inv_gamma, power = 0.8, 3, 1.0, 2 / 3
    model = _model()
    peer = ema_pytorch(
        model,
        beta=beta,
        update_after_step=after,
        update_every=1,
        inv_gamma=inv_gamma,
        power=power,
        use_foreach=use_foreach,
    )

    def schedule(step: int) -> float:
        # update() number k (emacore's step k) copies at k = 1 (its initialisation) and while
        # k - 1 <= update_after_step; after that it lerps with weight 1 - decay, decay =
        # 1 - (1 + e / inv_gamma) ** -power with e = k - 1 - update_after_step, computed on a
        # float32 tensor and clamped to [min_value, beta] there: the cap is float32(0.8), not
        # 0.8, and every decay is a float32 number. Mirror that arithmetic to be bitwise.
        e = step - 1 - after
        if e <= 0:
            return 0.0
        value = 1 - (1 + torch.tensor(float(e)) / inv_gamma) ** -power
        return float(value.clamp(min=0.0, max=beta))

    # It lerps parameters and floating buffers; integer buffers are neither averaged nor
    # copied (num_batches_tracked keeps its value from construction): emacore's
    # buffers="average" with num_batches_tracked left out.
    ema = emacore.EMA(schedule, buffers="average", exclude="*.num_batches_tracked")
    ema.apply(model)
    for k in _train(model):
        peer.update()
        ema.apply(model)
        if k - 1 > after:  # a lerp: the decay it used, from its own code
            assert peer.get_current_decay() == schedule(k)
    assert schedule(STEPS) == float(torch.tensor(beta, dtype=torch.float32))  # the cap acts
    want = dict(peer.ema_model.state_dict())
    assert int(want.pop("1.num_batches_tracked")) == 0
    # tensor.lerp_ per leaf, or _foreach_lerp_: emacore's kernel, elementwise the same.
    _assert_same(ema.average(model), want)
    peer.eval()
    with torch.no_grad():
        want_out = peer(_eval_input())
    _assert_same({"out": _eval_with_averages(model, ema)}, {"out": want_out})
