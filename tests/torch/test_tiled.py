"""Parameters that tile one storage: one ``lerp_`` between two buffers, nothing gathered.

`emacore.integrations.flatten.flatten_parameters` puts a model's parameters in one buffer per
(device, dtype); the torch backend then lays the shadows out the same way. These tests check the
numbers against float64 math and against an EMA of the same parameters allocated one by one,
that the update really is one kernel, and every way the tiling can break (a re-pointed
parameter, overlapping views, holes, bfloat16, profiles, the functional API, NaN guard).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

if "torch" not in os.environ.get("EMACORE_TEST_BACKENDS", ""):
    pytest.skip(
        "torch is not among EMACORE_TEST_BACKENDS (the torch nox session runs these)",
        allow_module_level=True,
    )

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import emacore
from emacore import functional as F
from emacore.integrations.flatten import ALIGN_BYTES, flatten_parameters
from emacore_backends import torch as torch_backend

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: the shared helper
import recorded_streams


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10), nn.Linear(10, 3)
    )


def _kernels(fn: Callable[[], Any]) -> dict[str, int]:
    """How many times each aten op ran during ``fn()``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: e.count for e in prof.key_averages()}


def _steps(
    model: nn.Module, ema: emacore.EMA, steps: int = 5, seed: int = 1
) -> list[list[torch.Tensor]]:
    """SGD steps with an EMA update after each; the float64 parameters before and after each."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    seen = [[p.detach().double().clone() for p in model.parameters()]]
    ema.apply(model)
    for _ in range(steps):
        x = torch.randn(8, 3, 8, 8, generator=gen).to(next(model.parameters()).device)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        ema.apply(model)
        seen.append([p.detach().double().clone() for p in model.parameters()])
    return seen


def _reference(seen: list[list[torch.Tensor]], decay: float) -> list[torch.Tensor]:
    shadows = seen[0]
    for values in seen[1:]:
        shadows = [decay * s + (1 - decay) * v for s, v in zip(shadows, values)]
    return shadows


def _groups(ema: emacore.EMA) -> list[Any]:
    """The torch backend's shadow groups of the EMA's (single) leaf group."""
    (group,) = ema._groups.values()
    return list(group.state.shadow.backend_data.groups)


@pytest.mark.parametrize("compat", ["default", "tensorflow"])
def test_flattened_model_is_one_lerp_with_the_numbers_of_float64_math(compat: str) -> None:
    model = _model()
    buffers = flatten_parameters(model)
    assert len(buffers) == 1
    ema = emacore.EMA(0.8, compat=compat)
    seen = _steps(model, ema)
    assert [g.offsets is not None for g in _groups(ema)] == [True]
    for got, want in zip(ema.average(list(model.parameters())), _reference(seen, 0.8)):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)

    counts = _kernels(lambda: ema.apply(model))
    assert counts.get("aten::cat", 0) == 0  # nothing gathered
    assert counts.get("aten::_foreach_lerp_", 0) == 0
    assert counts.get("aten::_foreach_sub", 0) == 0
    if compat == "default":
        assert counts["aten::lerp_"] == 1
    else:  # the reference kernel's order: s - (s - p) * c over the whole span
        assert counts["aten::sub_"] == 1 and counts["aten::mul_"] == 1


def test_flattened_and_separate_parameters_give_the_same_bits() -> None:
    """The exact mode runs the same IEEE operations per element on one span as per tensor."""
    tiled, apart = _model(), _model()
    flatten_parameters(tiled)
    a, b = emacore.EMA(0.9, compat="tensorflow"), emacore.EMA(0.9, compat="tensorflow")
    _steps(tiled, a)
    _steps(apart, b)
    assert _groups(b)[0].offsets is None
    for x, y in zip(a.average(list(tiled.parameters())), b.average(list(apart.parameters()))):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_zero_debias_on_a_flattened_model() -> None:
    tiled, apart = _model(), _model()
    flatten_parameters(tiled)
    a, b = emacore.EMA(0.9, zero_debias=True), emacore.EMA(0.9, zero_debias=True)
    _steps(tiled, a)
    _steps(apart, b)
    for x, y in zip(a.average(list(tiled.parameters())), b.average(list(apart.parameters()))):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    assert _groups(a)[0].flat.abs().sum() > 0


def test_a_repointed_parameter_falls_back_and_a_reflattened_model_tiles_again() -> None:
    model = _model()
    flatten_parameters(model)
    ema = emacore.EMA(0.5)
    ema.apply(model)
    params = list(model.parameters())
    expected = [ema.average(p).double().clone() for p in params]

    params[1].data = params[1].detach().clone() + 1.0  # its own storage now
    ema.apply(model)
    expected = [0.5 * e + 0.5 * p.detach().double() for e, p in zip(expected, params)]
    for p, e in zip(params, expected):
        torch.testing.assert_close(ema.average(p).double(), e, rtol=1e-6, atol=1e-7)

    flatten_parameters(model)  # a new buffer, laid out as before
    with torch.no_grad():
        for p in params:
            p.mul_(-1.0)
    counts = _kernels(lambda: ema.apply(model))
    assert counts.get("aten::cat", 0) == 0 and counts.get("aten::_foreach_lerp_", 0) == 0
    expected = [0.5 * e + 0.5 * p.detach().double() for e, p in zip(expected, params)]
    for p, e in zip(params, expected):
        torch.testing.assert_close(ema.average(p).double(), e, rtol=1e-6, atol=1e-7)


def test_overlapping_views_and_far_apart_pieces_are_not_tiled() -> None:
    storage = torch.zeros(100_000)
    overlapping = [storage[0:40].view(4, 10), storage[20:60]]
    far_apart = [storage[0:10], storage[50_000:50_010]]
    for params in (overlapping, far_apart):
        storage.zero_()
        ema = emacore.EMA(0.5)
        ema.apply(params)
        assert all(g.offsets is None for g in _groups(ema))
        storage.fill_(2.0)
        ema.apply(params)
        storage.fill_(4.0)
        ema.apply(params)
        for p in params:
            torch.testing.assert_close(ema.average(p), torch.full(p.shape, 2.5))


def test_padding_between_pieces_is_mirrored_and_never_read() -> None:
    storage = torch.full((3 * 16,), float("nan"))
    params = [storage[0:5], storage[16:32].view(4, 4), storage[32:40]]
    with torch.no_grad():
        for p in params:
            p.copy_(torch.arange(p.numel(), dtype=torch.float32).view(p.shape))
    ema = emacore.EMA(0.5, nonfinite="raise")
    ema.apply(params)
    (group,) = _groups(ema)
    assert group.offsets == [0, 16, 32] and group.flat.numel() == 40
    for _ in range(3):
        with torch.no_grad():
            for p in params:
                p.add_(2.0)
        ema.apply(params)
    for p in params:
        want = (
            torch.arange(p.numel(), dtype=torch.float64).view(p.shape)
            + 6.0
            - 2.0 * 0.5 * (1 + 0.5 + 0.25)
        )
        torch.testing.assert_close(ema.average(p).double(), want)
        assert torch.isfinite(ema.average(p)).all()


def test_profiles_on_a_flattened_model_equal_separate_emas() -> None:
    models = [_model() for _ in range(3)]
    for m in models:
        flatten_parameters(m)
    multi = emacore.EMA({"fast": 0.5, "slow": 0.9})
    singles = {"fast": emacore.EMA(0.5), "slow": emacore.EMA(0.9)}
    _steps(models[0], multi)
    _steps(models[1], singles["fast"])
    _steps(models[2], singles["slow"])
    for name, single in singles.items():
        got = multi.profile(name).average(list(models[0].parameters()))
        idx = 1 if name == "fast" else 2
        for x, y in zip(got, single.average(list(models[idx].parameters()))):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_functional_update_of_flattened_parameters() -> None:
    model = _model()
    flatten_parameters(model)
    params = list(model.parameters())
    state = F.init(params)
    seen = [[p.detach().double().clone() for p in params]]
    for k in range(3):
        with torch.no_grad():
            for p in params:
                p.add_(float(k + 1))
        state = F.update(state, params, decay=0.75)
        seen.append([p.detach().double().clone() for p in params])
    for got, want in zip(F.average(state), _reference(seen, 0.75)):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    # not in place: the new state's shadows are a copy laid out as the old, still one kernel
    counts = _kernels(lambda: F.update(state, params, decay=0.75))
    assert counts.get("aten::cat", 0) == 0 and counts["aten::lerp_"] == 1
    before = [s.clone() for s in state.shadow]
    F.update(state, params, decay=0.75)
    for s, b in zip(state.shadow, before):  # the old state is left as it was
        torch.testing.assert_close(s, b, rtol=0, atol=0)


def test_a_nan_in_a_flattened_parameter_skips_the_whole_update() -> None:
    model = _model()
    flatten_parameters(model)
    ema = emacore.EMA(0.5, nonfinite="skip")
    ema.apply(model)
    params = list(model.parameters())
    before = [ema.average(p).clone() for p in params]
    with torch.no_grad():
        params[2][0] = float("nan")
        params[0].add_(1.0)
    with pytest.warns(emacore.EMAWarning, match=r"\['3.weight'\]"):
        ema.apply(model)
    assert ema.skipped_updates == 1
    for p, b in zip(params, before):
        torch.testing.assert_close(ema.average(p), b, rtol=0, atol=0)


def test_bfloat16_parameters_in_one_buffer_keep_float32_shadows() -> None:
    model = _model().to(torch.bfloat16)
    flatten_parameters(model)
    ema = emacore.EMA(0.5)
    ema.apply(model)
    params = list(model.parameters())
    start = [p.detach().double().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    ema.apply(model)
    for p, s in zip(params, start):
        avg = ema.average(p)
        assert avg.dtype == torch.float32
        torch.testing.assert_close(avg.double(), 0.5 * s + 0.5 * p.detach().double())


# -- flatten_parameters ---------------------------------------------------------------------


def test_flatten_parameters_keeps_objects_values_and_training() -> None:
    model, twin = _model(), _model()
    params = list(model.parameters())
    ids = [id(p) for p in params]
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    (buffer,) = flatten_parameters(model)
    assert [id(p) for p in model.parameters()] == ids
    step = ALIGN_BYTES // 4
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        assert p.requires_grad and p.is_contiguous()
        assert p.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        assert p.storage_offset() % step == 0
    opt2 = torch.optim.Adam(twin.parameters(), lr=0.01)
    x = torch.randn(4, 3, 8, 8)
    for m, o in ((model, opt), (twin, opt2)):
        o.zero_grad()
        m(x).sum().backward()
        o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        assert p.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()


def test_flatten_parameters_one_buffer_per_dtype() -> None:
    params = [torch.randn(3), torch.randn(5, dtype=torch.float64), torch.randn(7)]
    values = [p.clone() for p in params]
    buffers = flatten_parameters(params, align_bytes=8)
    assert [b.dtype for b in buffers] == [torch.float32, torch.float64]
    assert [b.numel() for b in buffers] == [4 + 8, 5]  # 3 floats padded to 4, 7 to 8
    for p, v in zip(params, values):
        torch.testing.assert_close(p, v, rtol=0, atol=0)


def test_flatten_parameters_refusals() -> None:
    shared = torch.randn(10)
    with pytest.raises(ValueError, match=r"tensor #0 and tensor #1 overlap in memory"):
        flatten_parameters([shared[:6], shared[5:]])
    flatten_parameters([shared[:5], shared[5:]])  # pieces of one buffer move
    with pytest.raises(ValueError, match=r"tensor #0 .*strides \(1, 4\).* not contiguous"):
        flatten_parameters([torch.randn(3, 4).t()])
    with pytest.raises(TypeError, match=r"item #1 is a float"):
        flatten_parameters([torch.randn(2), 1.0])
    with pytest.raises(TypeError, match="an nn.Module or an iterable of tensors"):
        flatten_parameters(torch.randn(2))
    with pytest.raises(ValueError, match="align_bytes must be positive"):
        flatten_parameters([torch.randn(2)], align_bytes=0)
    with pytest.raises(TypeError, match="sparse_coo"):
        flatten_parameters([torch.randn(2, 2).to_sparse()])


def test_flatten_parameters_keeps_tied_weights_tied() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    model[1].weight = model[0].weight  # one Parameter in two modules
    value = model[0].weight.detach().clone()
    (buffer,) = flatten_parameters(model)
    assert model[1].weight is model[0].weight
    torch.testing.assert_close(model[0].weight, value, rtol=0, atol=0)
    assert buffer.numel() == 48 + 16 + 16  # the weight once (36 padded to 48), two biases


def test_side_stream_reads_the_span_and_keeps_it(monkeypatch: Any) -> None:
    """With a side stream (recorded streams on CPU, as in test_torch_backend), a tiled group is
    read on the side stream: nothing is gathered first, and the span is kept for it."""
    recorder = recorded_streams.Recorder()
    monkeypatch.setattr(torch_backend, "STREAMS", recorder)
    monkeypatch.setattr(torch_backend.TorchBackend, "check_side_stream", lambda self, p: None)
    model, twin = _model(), _model()
    flatten_parameters(model)
    for compat in ("default", "tensorflow"):
        ema = emacore.EMA(0.5, side_stream=True, compat=compat)
        plain = emacore.EMA(0.5, compat=compat)
        ema.apply(model)
        plain.apply(twin)
        with torch.no_grad():
            for p, q in zip(model.parameters(), twin.parameters()):
                p.add_(1.0)
                q.add_(1.0)
        recorder.log.clear()
        counts = _kernels(lambda: ema.apply(model))  # noqa: B023 (called at once)
        plain.apply(twin)
        assert counts.get("aten::cat", 0) == 0
        span = _groups(ema)[0].flat.numel()
        assert [e for e in recorder.log if e[0] == "keep"] == [("keep", (span,), "side")]
        for x, y in zip(
            ema.average(list(model.parameters())), plain.average(list(twin.parameters()))
        ):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("side_stream", [False, True])
def test_flattened_model_on_cuda(side_stream: bool) -> None:
    model, twin = _model().cuda(), _model().cuda()
    flatten_parameters(model)
    ema, plain = emacore.EMA(0.8, side_stream=side_stream), emacore.EMA(0.8)
    seen = _steps(model, ema)
    _steps(twin, plain)
    assert _groups(ema)[0].offsets is not None and _groups(plain)[0].offsets is None
    for got, want in zip(ema.average(list(model.parameters())), _reference(seen, 0.8)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


# -- shadows laid out for other arrays than the parameters ----------------------------------


def _is_tiled(ema: emacore.EMA) -> list[bool]:
    return [g.offsets is not None for g in _groups(ema)]


def test_flattening_after_the_shadows_exist_lays_them_out_anew_in_place() -> None:
    model = _model()
    ema = emacore.EMA(0.5)
    ema.apply(model)
    params = list(model.parameters())
    held = [ema.average(p) for p in params]  # the shadow tensors themselves (torch semantics)
    expected = [h.double().clone() for h in held]
    assert _is_tiled(ema) == [False]
    flatten_parameters(model)
    with torch.no_grad():
        for p in params:
            p.add_(2.0)
    ema.apply(model)
    assert _is_tiled(ema) == [True]
    expected = [0.5 * e + 0.5 * p.detach().double() for e, p in zip(expected, params)]
    for h, p, e in zip(held, params, expected):
        assert ema.average(p) is h  # the same objects, now views of the tiled buffer
        torch.testing.assert_close(h.double(), e, rtol=1e-6, atol=1e-7)
    counts = _kernels(lambda: ema.apply(model))
    assert counts.get("aten::cat", 0) == 0 and counts["aten::lerp_"] == 1


def test_a_state_dict_of_a_flattened_model_loads_into_a_plain_one() -> None:
    tiled, plain = _model(), _model()
    flatten_parameters(tiled)
    source = emacore.EMA(0.5)
    _steps(tiled, source, steps=2)
    target = emacore.EMA(0.5)
    target.apply(plain)
    target.load_state_dict(source.state_dict())  # views of one buffer, laid out for `tiled`
    start = [s.double().clone() for s in source.average(list(tiled.parameters()))]
    with torch.no_grad():
        for p in plain.parameters():
            p.fill_(1.0)
    target.apply(plain)
    assert _is_tiled(target) == [False]  # laid out for the parameters it updates
    for got, s in zip(target.average(list(plain.parameters())), start):
        torch.testing.assert_close(got.double(), 0.5 * s + 0.5, rtol=1e-6, atol=1e-7)
    counts = _kernels(lambda: target.apply(plain))
    assert counts.get("aten::_foreach_lerp_", 0) <= 1  # packed again, not tensor by tensor


def test_a_portable_checkpoint_loads_into_a_flattened_model_and_tiles(tmp_path: Any) -> None:
    from emacore import checkpoint

    plain, tiled = _model(), _model()
    source = emacore.EMA(0.5)
    _steps(plain, source, steps=2)
    checkpoint.save(source, tmp_path / "ema.safetensors")
    flatten_parameters(tiled)
    target = emacore.EMA(0.5)
    target.apply(tiled)
    checkpoint.load_into(target, tmp_path / "ema.safetensors")
    start = [s.double().clone() for s in source.average(list(plain.parameters()))]
    with torch.no_grad():
        for p in tiled.parameters():
            p.fill_(3.0)
    target.apply(tiled)
    assert _is_tiled(target) == [True]
    for got, s in zip(target.average(list(tiled.parameters())), start):
        torch.testing.assert_close(got.double(), 0.5 * s + 1.5, rtol=1e-6, atol=1e-7)


# -- what a review of this layout found ---------------------------------------------------


def test_laying_shadows_out_anew_frees_the_old_buffer() -> None:
    import gc
    import weakref

    model = _model()
    flatten_parameters(model)
    ema = emacore.EMA(0.5)
    ema.apply(model)
    old = weakref.ref(_groups(ema)[0].flat)
    params = list(model.parameters())
    params[0].data = params[0].detach().clone()  # the others tile a part of the buffer
    ema.apply(model)
    assert _is_tiled(ema) == [True, False]
    gc.collect()
    assert old() is None  # the shadows are aliases of the buffer, not autograd views of it


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copied_state_updates_from_the_live_parameters(how: str, tmp_path: Any) -> None:
    """A copy must not keep the views of the parameters it was updated from: theirs would be
    copies that pass for the live parameters and never change."""
    import copy

    model = _model()
    flatten_parameters(model)
    params = dict(model.named_parameters())
    state = F.update(F.init(params), params, 0.5, inplace=True)
    if how == "deepcopy":
        state = copy.deepcopy(state)
    else:
        torch.save(state, tmp_path / "state.pt")
        state = torch.load(tmp_path / "state.pt", weights_only=False)
    expected = {k: s.double().clone() for k, s in state.shadow.items()}
    with torch.no_grad():
        for p in params.values():
            p.add_(100.0)
    state = F.update(state, params, 0.5, inplace=True)
    for k, p in params.items():
        want = 0.5 * expected[k] + 0.5 * p.detach().double()
        torch.testing.assert_close(state.shadow[k].double(), want, rtol=1e-6, atol=1e-5)


def test_wrapper_subclass_parameters_are_averaged_as_tensors_of_their_own() -> None:
    from torch.testing._internal.two_tensor import TwoTensor

    model = nn.Linear(300, 300)
    weight = torch.randn(300, 300)
    model.weight = nn.Parameter(TwoTensor(weight, weight.clone()))
    ema = emacore.EMA(0.5)
    ema.apply(model)
    moved = weight + 2.0
    model.weight = nn.Parameter(TwoTensor(moved, moved.clone()))  # tracked by name
    ema.apply(model)
    avg = ema.average(model)["weight"]
    assert isinstance(avg, TwoTensor)
    torch.testing.assert_close(avg.a, weight + 1.0)
    torch.testing.assert_close(avg.b, weight + 1.0)


def test_the_layout_is_looked_at_only_when_the_parameters_change(monkeypatch: Any) -> None:
    calls = []
    settle = torch_backend.TorchBackend._settle

    def counting(self: Any, *args: Any) -> bool:
        calls.append(1)
        return bool(settle(self, *args))

    monkeypatch.setattr(torch_backend.TorchBackend, "_settle", counting)
    params = [torch.randn(10, dtype=torch.bfloat16) for _ in range(20)]  # never gathered
    ema = emacore.EMA(0.9)
    ema.apply(params)
    for _ in range(5):
        ema.apply(params)
    assert len(calls) == 1  # the first update's look, not one per step
    params[3].data = params[3].detach().clone()
    ema.apply(params)
    assert len(calls) == 2


def test_flatten_parameters_on_the_meta_device() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    (buffer,) = flatten_parameters(model)
    assert buffer.device.type == "meta" and buffer.numel() == 16 + 16 + 16 + 16
