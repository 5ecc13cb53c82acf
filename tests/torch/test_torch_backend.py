"""torch specifics: nn.Module tracking, buffer and frozen-parameter policies, swapping the
averages in for evaluation, fused calls per (device, dtype), no autograd graph.

Runs where ``EMACORE_TEST_BACKENDS`` names torch (``nox -s "tests(backend='torch')"``); there
an import failure is an error, not a skip.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

if "torch" not in os.environ.get("EMACORE_TEST_BACKENDS", ""):
    pytest.skip(
        "torch is not among EMACORE_TEST_BACKENDS (the torch nox session runs these)",
        allow_module_level=True,
    )

import torch
from torch import nn

import emacore
from emacore.integrations.flatten import flatten_parameters
from emacore_backends import torch as torch_backend

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: the shared helper
import recorded_streams


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _train(model: nn.Module, ema: emacore.EMA, steps: int = 6) -> list[dict[str, np.ndarray]]:
    """SGD steps; returns the float64 value of every parameter/buffer after each step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    device = next(model.parameters()).device
    seen = []
    ema.apply(model)
    seen.append({k: v.detach().double().cpu().numpy() for k, v in model.state_dict().items()})
    for _ in range(steps):
        x = torch.randn(16, 4, device=device)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.apply(model)
        seen.append({k: v.detach().double().cpu().numpy() for k, v in model.state_dict().items()})
    return seen


def _ref(seen: list[dict[str, np.ndarray]], name: str, decay: float) -> np.ndarray:
    s = seen[0][name]
    for step in seen[1:]:
        s = decay * s + (1 - decay) * step[name]
    return s


def test_module_parameters_averaged_buffers_copied() -> None:
    model = _model()
    ema = emacore.EMA(0.8)
    seen = _train(model, ema)
    avg = ema.average(model)
    assert list(avg) == list(model.state_dict())  # every parameter and buffer, module order
    for name, p in model.named_parameters():
        assert avg[name].dtype == p.dtype
        assert avg[name].requires_grad is False
        np.testing.assert_allclose(avg[name].double().numpy(), _ref(seen, name, 0.8), rtol=1e-5)
    # float buffers: copied by default (the current running statistics)
    torch.testing.assert_close(avg["1.running_mean"], model[1].running_mean, rtol=0, atol=0)
    # integer buffers: copied exactly, in their dtype
    assert avg["1.num_batches_tracked"].dtype == torch.int64
    assert int(avg["1.num_batches_tracked"]) == 6


def test_buffers_average_option_never_averages_integers() -> None:
    model = _model()
    ema = emacore.EMA(0.8, buffers="average")
    seen = _train(model, ema)
    avg = ema.average(model)
    np.testing.assert_allclose(
        avg["1.running_var"].double().numpy(), _ref(seen, "1.running_var", 0.8), rtol=1e-5
    )
    assert avg["1.num_batches_tracked"].dtype == torch.int64
    assert int(avg["1.num_batches_tracked"]) == 6
    assert "1.num_batches_tracked" not in ema.state_dict()["leaves"]
    assert "1.num_batches_tracked" in ema.state_dict()["copies"]


def test_buffers_skip_and_frozen_policies() -> None:
    model = _model()
    model[0].weight.requires_grad_(False)
    ema = emacore.EMA(0.8, buffers="skip", frozen="skip")
    _train(model, ema, steps=2)
    tracked = set(ema.average(model))
    assert "0.weight" not in tracked
    assert not any("running" in n or "num_batches" in n for n in tracked)
    copied = emacore.EMA(0.8)  # default: frozen parameters are copied
    model2 = _model()
    model2[0].weight.requires_grad_(False)
    _train(model2, copied, steps=2)
    assert "0.weight" in copied.state_dict()["copies"]
    torch.testing.assert_close(copied.average(model2)["0.weight"], model2[0].weight.detach())


def test_include_exclude_module_names() -> None:
    model = _model()
    ema = emacore.EMA(0.8, exclude=["0.*", "*.num_batches_tracked"])
    _train(model, ema, steps=1)
    names = set(ema.average(model))
    assert not any(n.startswith("0.") for n in names)
    assert "3.weight" in names
    assert "1.num_batches_tracked" not in names


def test_swapped_model_evaluates_with_averages_and_restores() -> None:
    model = _model()
    ema = emacore.EMA(0.8)
    _train(model, ema)
    model.eval()
    x = torch.randn(5, 4)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    reference = _model()
    reference.load_state_dict(ema.average(model))
    reference.eval()
    with torch.no_grad(), ema.swapped(model):
        torch.testing.assert_close(model(x), reference(x))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, live[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="inside"), ema.swapped(model):
        raise ValueError("inside")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, live[k], rtol=0, atol=0)
    # parameters stay the optimizer's objects, still trainable
    assert all(p.requires_grad for p in model.parameters())


def test_state_dict_round_trip_with_copies() -> None:
    model = _model()
    ema = emacore.EMA(0.8)
    _train(model, ema, steps=3)
    restored = emacore.EMA(0.8)
    assert restored.load_state_dict(ema.state_dict()) == emacore.LoadResult([], [])
    for k, v in ema.average(model).items():
        torch.testing.assert_close(restored.average(model)[k], v, rtol=0, atol=0)


def test_no_autograd_graph_and_in_place() -> None:
    w = nn.Parameter(torch.randn(3))
    ema = emacore.EMA(0.5)
    ema.apply([w])
    shadow = ema.average(w)
    (w * 2).sum().backward()
    with torch.no_grad():
        w.add_(1.0)
    ema.apply([w])
    assert ema.average(w) is shadow  # updated in place
    assert shadow.grad_fn is None
    assert not shadow.requires_grad
    torch.testing.assert_close(w.grad, torch.full((3,), 2.0))


def test_one_fused_call_per_device_dtype_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large tensors: one _foreach_lerp_ per (device, dtype). Small ones: packed into a flat
    buffer per group and updated by one lerp_, with no _foreach call at all."""
    calls: list[int] = []
    real = torch._foreach_lerp_

    def counting(selfs: list[torch.Tensor], others: list[torch.Tensor], w: float) -> None:
        calls.append(len(selfs))
        real(selfs, others, w)

    monkeypatch.setattr(torch, "_foreach_lerp_", counting)
    big = 70_000  # above the packing threshold
    params = [
        torch.randn(big),
        torch.randn(big, dtype=torch.float64),
        torch.randn(big),
        torch.randn(3),
        torch.randn(4, 5),
    ]
    ema = emacore.EMA(0.5)
    ema.apply(params)
    start = [ema.average(p).clone() for p in params]
    for p in params:
        p.add_(1.0)
    calls.clear()
    ema.apply(params)
    assert sorted(calls) == [1, 2]
    small_shadows = [ema.average(p) for p in params[3:]]
    assert small_shadows[0].untyped_storage().data_ptr() == (
        small_shadows[1].untyped_storage().data_ptr()
    )  # one buffer
    for p, s0 in zip(params, start):
        torch.testing.assert_close(ema.average(p), torch.lerp(s0, p, 0.5))


def test_packed_views_follow_a_parameter_whose_storage_changes() -> None:
    """The gather caches 1-d views of small parameters; `p.data = ...` must not leave them
    reading the old storage."""
    params = [nn.Parameter(torch.zeros(4)) for _ in range(3)]
    ema = emacore.EMA(0.5)
    ema.apply(params)
    ema.apply(params)
    params[1].data = torch.full((4,), 8.0)  # new storage, same Parameter object
    ema.apply(params)
    torch.testing.assert_close(ema.average(params[1]), torch.full((4,), 4.0))
    params[2].data = torch.zeros(5)  # a wrong shape behind the same object
    before = [ema.average(p).clone() for p in params[:2]]
    with pytest.raises(emacore.LeafMismatchError, match=r"shape \(5,\)"):
        ema.apply(params)
    for p, b in zip(params[:2], before):
        torch.testing.assert_close(ema.average(p), b, rtol=0, atol=0)


def _repointed_in_place(flatten: bool) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Square (2-d) and 1-d small parameters; with ``flatten``, in one buffer (tiled)."""
    torch.manual_seed(7)
    mats = [nn.Parameter(torch.randn(4, 4)) for _ in range(2)]
    vecs = [nn.Parameter(torch.randn(6)) for _ in range(2)]
    if flatten:
        flatten_parameters([*mats, *vecs])
    return mats, vecs


def _float64_ema(history: list[list[torch.Tensor]], decay: float) -> list[torch.Tensor]:
    avg = [h.double().clone() for h in history[0]]
    for values in history[1:]:
        avg = [a * decay + (1 - decay) * v.double() for a, v in zip(avg, values)]
    return avg


@pytest.mark.parametrize("flatten", [False, True], ids=["gathered", "tiled"])
@pytest.mark.parametrize("layout", ["auto", "flat"])
def test_a_parameter_given_other_strides_on_its_storage_is_read_as_it_now_is(
    flatten: bool, layout: str
) -> None:
    """``p.data = p.data.t()`` (or ``.expand``) keeps the tensor and its storage pointer: the
    cached views of the packed path would read the storage in its old order."""
    mats, vecs = _repointed_in_place(flatten)
    params = [*mats, *vecs]
    ema = emacore.EMA(0.5, layout=layout)
    history = []
    for step in range(4):
        if step == 2:
            mats[0].data = mats[0].data.t()  # same storage, same shape, other strides
            vecs[1].data = vecs[1].data[:1].expand(6)  # same pointer, stride 0
        with torch.no_grad():
            for p in params:
                if p.is_contiguous():
                    p.mul_(1.5).add_(0.25)
        history.append([p.detach().clone() for p in params])
        ema.apply(params)
    for p, want in zip(params, _float64_ema(history, 0.5)):
        torch.testing.assert_close(ema.average(p).double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("flatten", [False, True], ids=["gathered", "tiled"])
@pytest.mark.parametrize("change", ["reshape", "shrink", "1-d to 2-d"])
def test_a_parameter_reshaped_on_its_storage_is_refused_before_any_write(
    flatten: bool, change: str
) -> None:
    """Another shape on the same storage pointer (``.view``, a slice at the same start) is a
    shape mismatch, as with new storage: an error naming the leaf, and no shadow moved."""
    mats, vecs = _repointed_in_place(flatten)
    params = [*mats, *vecs]
    ema = emacore.EMA(0.5)
    ema.apply(params)
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    ema.apply(params)
    before = [ema.average(p).clone() for p in params]
    if change == "reshape":
        mats[1].data = mats[1].data.view(2, 8)
        match = r"leaf 'Variable_1': shape \(2, 8\)"
    elif change == "shrink":
        vecs[0].data = vecs[0].data[:3]
        match = r"leaf 'Variable_2': shape \(3,\)"
    else:
        vecs[0].data = vecs[0].data.view(2, 3)
        match = r"leaf 'Variable_2': shape \(2, 3\)"
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    with pytest.raises(emacore.LeafMismatchError, match=match):
        ema.apply(params)
    for p, b in zip(params, before):
        torch.testing.assert_close(ema.average(p), b, rtol=0, atol=0)


def test_copy_to_a_tensor_whose_elements_alias_is_refused_before_anything_is_written() -> None:
    """A parameter that is an expanded view cannot take an average in place (torch's copy_
    refuses it): refused naming it, before the parameters written first are touched."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    ema = emacore.EMA(0.5)
    ema.apply(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.apply(model)
    live = {name: p.detach().clone() for name, p in model.named_parameters()}
    model[1].bias.data = torch.tensor([7.0]).expand(2)
    with pytest.raises(emacore.ReadOnlyError, match=r"leaf '1.bias': elements of the tensor"):
        ema.copy_to(model)
    for name, p in model.named_parameters():
        if name != "1.bias":
            torch.testing.assert_close(p.detach(), live[name], rtol=0, atol=0)
    with pytest.raises(emacore.ReadOnlyError, match=r"leaf '1.bias'"), ema.swapped(model):
        pass
    for name, p in model.named_parameters():
        if name != "1.bias":
            torch.testing.assert_close(p.detach(), live[name], rtol=0, atol=0)


def test_copy_to_inference_tensors_is_refused_outside_inference_mode() -> None:
    with torch.inference_mode():
        model = nn.Linear(3, 2)  # its parameters are inference tensors
    ema = emacore.EMA(0.5)
    ema.apply(model)
    with pytest.raises(emacore.ReadOnlyError, match=r"leaf '(weight|bias)': an inference tensor"):
        ema.copy_to(model)
    with torch.inference_mode():
        ema.copy_to(model)  # allowed there, as torch allows the write


def test_a_state_dict_with_a_bad_copy_or_another_role_is_refused_and_changes_nothing() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    ema = emacore.EMA(0.5)  # buffers copied
    ema.apply(model)
    state = ema.state_dict()
    wrong_shape = {**state, "copies": {**state["copies"], "1.running_mean": torch.zeros(7)}}
    with pytest.raises(emacore.StateDictError, match=r"leaf '1.running_mean': .* copy shape"):
        ema.load_state_dict(wrong_shape)
    as_float = {**state, "copies": {**state["copies"], "1.num_batches_tracked": torch.zeros(())}}
    with pytest.raises(emacore.StateDictError, match=r"'1.num_batches_tracked': .* copy dtype"):
        ema.load_state_dict(as_float)
    averaging = emacore.EMA(0.5, buffers="average")
    averaging.apply(model)
    with pytest.raises(emacore.StateDictError, match=r"'1.running_mean' is averaged here"):
        averaging.load_state_dict(state)
    with pytest.raises(emacore.StateDictError, match=r"'1.running_mean' is copied here"):
        ema.load_state_dict(averaging.state_dict())
    ema.apply(model)  # both still work, as they were
    averaging.apply(model)
    torch.testing.assert_close(ema.average(model)["1.running_var"], model[1].running_var)


def test_an_offload_device_torch_lacks_is_a_value_error_and_records_nothing() -> None:
    devices = ["bogus"] + (["cuda"] if not torch.cuda.is_available() else [])
    devices += ["mps"] if not torch.backends.mps.is_available() else []
    for device in devices:
        ema = emacore.EMA(0.5, device=device)
        with pytest.raises(ValueError, match=f"torch backend: device='{device}'"):
            ema.apply({"w": torch.ones(3)})
        assert ema.state_dict()["leaves"] == {}


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_a_nan_in_a_copied_buffer_stops_the_whole_update(policy: str) -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    ema = emacore.EMA(0.5, nonfinite=policy)  # buffers copied
    ema.apply(model)
    before = {k: v.clone() for k, v in ema.average(model).items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_var[0] = float("nan")
    if policy == "raise":
        with pytest.raises(emacore.NonFiniteError, match=r"1.running_var"):
            ema.apply(model)
    else:
        with pytest.warns(emacore.EMAWarning, match="skipped an EMA update"):
            ema.apply(model)
        assert ema.skipped_updates == 1
    for name, value in ema.average(model).items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, equal_nan=False)


def test_a_state_dict_of_another_library_is_refused_and_changes_nothing() -> None:
    """numpy arrays loaded over torch shadows would make every later apply fail: refused,
    naming both libraries (emacore.load_into converts; load_state_dict does not)."""
    src = emacore.EMA(0.9)
    src.apply({"w": np.ones(3, np.float32)})
    dst = emacore.EMA(0.9)
    params = {"w": torch.zeros(3)}
    dst.apply(params)
    with pytest.raises(emacore.StateDictError, match=r"leaf 'w': .* numpy array, .* torch"):
        dst.load_state_dict(src.state_dict())
    assert isinstance(dst.average(params)["w"], torch.Tensor)
    dst.apply({"w": torch.full((3,), 10.0)})
    torch.testing.assert_close(dst.average(params)["w"], torch.full((3,), 1.0))


def test_layouts_agree() -> None:
    torch.manual_seed(4)
    params = [torch.randn(n) for n in (5, 70_000, 17, 3)]
    results = []
    for layout in ("auto", "flat", "separate"):
        backend = emacore.get_backend("torch")
        shadows = backend.create_shadows([p.clone() for p in params], zeros=False, layout=layout)
        new = [torch.randn_like(p) for p in params] if not results else results[-1][1]
        backend.update(shadows, new, 0.25, inplace=True, exact=True)
        results.append(([s.clone() for s in shadows], new))
    for shadows, _ in results[1:]:
        for a, b in zip(shadows, results[0][0]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="layout must be one of"):
        emacore.get_backend("torch").create_shadows(params, zeros=False, layout="packed")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_and_fused_modes(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    start, new = torch.randn(1000, dtype=dtype), torch.randn(1000, dtype=dtype)
    exact = emacore.EMA(0.99, compat="tensorflow")
    fused = emacore.EMA(0.99)
    a, b = start.clone(), start.clone()
    exact.apply([a])
    fused.apply([b])
    a.copy_(new)
    b.copy_(new)
    exact.apply([a])
    fused.apply([b])
    c32 = float(np.float32(1.0) - np.float32(0.99))  # TF: 1 - d in float32
    want_exact = start - (start - new) * c32
    torch.testing.assert_close(exact.average(a), want_exact, rtol=0, atol=0)
    want = start.double() - (start.double() - new.double()) * (1 - 0.99)
    torch.testing.assert_close(fused.average(b).double(), want, rtol=2e-7, atol=2e-7)


def test_module_parameter_shape_change_is_refused() -> None:
    model = nn.Linear(3, 2)
    ema = emacore.EMA(0.5)
    ema.apply(model)
    model.weight = nn.Parameter(torch.zeros(4, 3))
    with pytest.raises(emacore.LeafMismatchError, match=r"leaf 'weight': shape \(4, 3\)"):
        ema.apply(model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_parameters_keep_their_device() -> None:
    model = _model().cuda()
    ema = emacore.EMA(0.9)
    ema.apply(model)
    assert all(v.device.type == "cuda" for v in ema.average(model).values())


@pytest.mark.parametrize("compat", ["default", "tensorflow"])
def test_bfloat16_parameters(compat: str) -> None:
    """A bfloat16 shadow with decay 0.999 never moves toward a parameter 0.25 away (each
    increment is below half its spacing); emacore's default float32 shadow does."""
    w = nn.Parameter(torch.ones(16, dtype=torch.bfloat16))
    default = emacore.EMA(0.999, compat=compat)
    same = emacore.EMA(0.999, shadow_dtype="same")
    default.apply([w])
    same.apply([w])
    with torch.no_grad():
        w.fill_(1.25)
    for _ in range(300):
        default.apply([w])
        same.apply([w])
    if compat == "tensorflow":  # TF keeps the variable's dtype: the shadow is stuck too
        assert default.average(w).dtype == torch.bfloat16
        assert torch.all(default.average(w) == 1.0)
    else:
        assert default.average(w).dtype == torch.float32
        want = 1.25 - 0.25 * 0.999**300
        torch.testing.assert_close(
            default.average(w), torch.full((16,), want), rtol=1e-5, atol=1e-6
        )
    assert same.average(w).dtype == torch.bfloat16
    assert torch.all(same.average(w) == 1.0)


def test_float32_shadow_of_bfloat16_matches_reference_in_exact_order() -> None:
    torch.manual_seed(3)
    w = torch.randn(64).to(torch.bfloat16)
    ema = emacore.EMA(0.9, shadow_dtype="float32", compat="tensorflow")
    ema.apply([w])
    ref = w.float().clone()
    for _ in range(5):
        w.copy_(torch.randn(64).to(torch.bfloat16))
        ema.apply([w])
        c = float(np.float32(1.0) - np.float32(0.9))
        ref = ref - (ref - w.float()) * c
    torch.testing.assert_close(ema.average(w), ref, rtol=0, atol=0)


def test_functional_update_inside_torch_compile_without_graph_breaks() -> None:
    """fullgraph=True fails on any graph break; one graph must serve every step (counters
    are tensors with traceable=True, so no step recompiles)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    params = dict(model.named_parameters())
    state = emacore.functional.init(params, traceable=True, zero_debias=True)
    eager = emacore.functional.init(
        {k: v.detach().clone() for k, v in params.items()}, zero_debias=True
    )
    ramp = emacore.schedules.TFRamp(0.99)

    def apply_step(
        state: emacore.EMAState, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]
    ) -> emacore.EMAState:
        with torch.no_grad():
            for k, p in params.items():
                p.sub_(0.1 * grads[k])
        return emacore.functional.update(state, params, ramp, inplace=True)

    compiled = torch.compile(apply_step, fullgraph=True, backend="aot_eager")
    for _ in range(12):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
        state = compiled(state, params, grads)
        eager = emacore.functional.update(eager, {k: v.detach() for k, v in params.items()}, ramp)
    assert counters["stats"]["unique_graphs"] == 1
    assert int(state.count) == 12
    got, want = emacore.functional.average(state), emacore.functional.average(eager)
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_default_functional_update_compiles_without_graph_breaks(dtype: torch.dtype) -> None:
    """The defaults: ``inplace=False`` (a copy of packed shadows) and, for bfloat16
    parameters, float32 shadows (mixed dtypes); the numbers are the eager update's."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    params = {"w": torch.randn(3, 4, dtype=dtype), "b": torch.randn(5, dtype=dtype)}
    state = emacore.functional.init(params, traceable=True)
    eager = emacore.functional.init(params, traceable=True)
    ramp = emacore.schedules.TFRamp(0.99)
    step = torch.compile(
        lambda st, p: emacore.functional.update(st, p, ramp), fullgraph=True, backend="aot_eager"
    )
    graphs = []
    for k in range(6):
        params = {n: v + (k + 1) * 0.5 for n, v in params.items()}
        state = step(state, params)
        eager = emacore.functional.update(eager, params, ramp)
        graphs.append(counters["stats"]["unique_graphs"])
    # the first state holds init's packed shadows, later ones the update's: two graphs at most,
    # then none more (fullgraph=True: no graph break anywhere)
    assert graphs[1] <= 2 and graphs[-1] == graphs[1], graphs
    got, want = emacore.functional.average(state), emacore.functional.average(eager)
    for n in got:
        assert got[n].dtype == torch.float32
        torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-6)


def test_nonfinite_skip_inside_torch_compile_decides_on_the_device() -> None:
    """nonfinite="skip" under a trace cannot branch in Python: the update is computed and
    kept or dropped by a select on the device, with the counters, as eager skips it."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    params = {"w": torch.zeros(3), "b": torch.zeros(2)}
    state = emacore.functional.init(params, traceable=True)
    eager = emacore.functional.init(params)
    step = torch.compile(
        lambda st, p: emacore.functional.update(st, p, 0.5, nonfinite="skip"),
        fullgraph=True,
        backend="aot_eager",
    )
    for k in range(4):
        new = {"w": torch.full((3,), 2.0 * (k + 1)), "b": torch.full((2,), float(k))}
        if k == 2:
            new["b"][1] = float("nan")  # this whole update is skipped
        state = step(state, new)
        eager = emacore.functional.update(eager, new, 0.5, nonfinite="skip")
    assert int(state.count) == eager.count == 3
    got, want = emacore.functional.average(state), emacore.functional.average(eager)
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=0)
    torch.testing.assert_close(got["w"], torch.full((3,), 5.25))  # 0, 1, 2.5, (skipped), 5.25
    # and the stateful API, inside a trace, points to this one (dynamo wraps the TypeError)
    ema = emacore.EMA(0.5)
    refused = (TypeError, torch._dynamo.exc.Unsupported)
    with pytest.raises(refused, match="use emacore.functional"):
        torch.compile(lambda p: ema.apply(p), fullgraph=True, backend="aot_eager")(params)


def test_module_parameter_set_change_and_second_module_are_refused() -> None:
    model = _model()
    ema = emacore.EMA(0.5)
    ema.apply(model)
    before = {k: v.clone() for k, v in ema.average(model).items()}
    model.add_module("extra", nn.Linear(2, 2))
    with pytest.raises(emacore.StructureError, match=r"new \['extra.bias', 'extra.weight'\]"):
        ema.apply(model)
    for k, v in before.items():
        torch.testing.assert_close(ema.average(model)[k], v, rtol=0, atol=0)
    with pytest.raises(
        emacore.StructureError,
        match=r"tracks a Sequential object and was given another object \(Sequential\)",
    ):
        ema.apply(_model())


def test_unfreezing_a_copied_parameter_starts_averaging_it() -> None:
    """Gradual unfreezing: a frozen parameter is copied; once trainable it is averaged from
    its current value on, and state_dict/average report the average, not a stale copy."""
    model = nn.Linear(3, 2)
    model.weight.requires_grad_(False)
    ema = emacore.EMA(0.5)
    ema.apply(model)
    assert "weight" in ema.state_dict()["copies"]
    model.weight.requires_grad_(True)
    ema.apply(model)  # now averaged, starting from the current value
    with torch.no_grad():
        model.weight.add_(2.0)
    ema.apply(model)
    sd = ema.state_dict()
    assert "weight" in sd["leaves"]
    assert "weight" not in sd["copies"]
    torch.testing.assert_close(ema.average(model)["weight"], model.weight.detach() - 1.0)
    model.weight.requires_grad_(False)  # freezing again keeps the history
    ema.apply(model)
    torch.testing.assert_close(ema.average(model)["weight"], model.weight.detach() - 0.5)


def test_tied_weights_and_submodules() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(5, 3)
            self.head = nn.Linear(3, 5, bias=False)
            self.head.weight = self.embed.weight

    model = Tied()
    ema = emacore.EMA(0.5)
    ema.apply(model)
    assert list(ema.state_dict()["leaves"]) == ["embed.weight"]  # tracked once
    avg = ema.average(model)
    assert set(avg) == set(model.state_dict())  # every key, so load_state_dict works
    assert avg["head.weight"] is avg["embed.weight"]
    fresh = Tied()
    fresh.load_state_dict(avg)
    sub = ema.average(model.head)  # a submodule: found by its tensors
    assert list(sub) == ["weight"]
    with pytest.raises(KeyError, match="no moving average for any parameter"):
        ema.average(nn.Linear(2, 2))


def test_cpu_offload_option_on_cpu_parameters() -> None:
    model = _model()
    ema = emacore.EMA(0.8, device="cpu")
    seen = _train(model, ema, steps=3)
    for name, _ in model.named_parameters():
        np.testing.assert_allclose(
            ema.average(model)[name].double().numpy(), _ref(seen, name, 0.8), rtol=1e-5
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_parameters_offloaded_to_pinned_host_memory() -> None:
    model = _model().cuda()
    ema = emacore.EMA(0.8, device="cpu")
    seen = _train(model, ema, steps=3)
    avg = ema.average(model)
    assert all(v.device.type == "cpu" for v in avg.values())
    assert avg["0.weight"].is_pinned()
    for name, _ in model.named_parameters():
        np.testing.assert_allclose(avg[name].double().numpy(), _ref(seen, name, 0.8), rtol=1e-5)
    with torch.no_grad(), ema.swapped(model):
        torch.testing.assert_close(model[0].weight.cpu(), avg["0.weight"])


def _checked_on_cpu(checked: list[int]) -> Any:
    """A stand-in for `TorchBackend.check_side_stream` on CPU: the real check refuses CPU
    tensors, so this one asks the same thing of them with the device type left out (one
    device), and counts the tensors it was asked about."""

    def check(self: Any, params: Any) -> None:
        devices = {p.device for p in params}
        assert len(devices) == 1 and devices == {torch.device("cpu")}, devices
        checked.append(len(params))

    return check


def test_side_stream_orders_updates_reads_and_optimizer_steps(monkeypatch: Any) -> None:
    """The synchronisation protocol, on CPU with recorded streams: an update waits for the
    work queued before it, reads and optimizer steps wait for the update, and the numbers are
    those of an update without a stream.

    What this stand-in cannot check, and only the CUDA tests below do: that the real streams
    and events order the kernels (here every call runs at once, on one thread), so a missing
    wait shows only as a missing log entry, never as a wrong number; that ``record_stream``
    keeps a freed tensor's memory from being reused while the side stream reads it; that the
    real `check_side_stream` accepts the shadows of CUDA parameters (its CPU refusal is the
    stand-in's only change: test_side_stream_check_on_devices checks the real one's logic).
    """
    recorder = recorded_streams.Recorder()
    monkeypatch.setattr(torch_backend, "STREAMS", recorder)
    checked: list[int] = []
    monkeypatch.setattr(torch_backend.TorchBackend, "check_side_stream", _checked_on_cpu(checked))
    model = nn.Linear(300, 300)  # a large weight (90,000 elements) and a small bias
    plain = emacore.EMA(0.5)
    ema = emacore.EMA(0.5, side_stream=True)
    ema.apply(model)
    plain.apply(model)
    assert ("keep", (300, 300), "side") in recorder.log  # the large shadow, once
    recorder.log.clear()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 300)).sum().backward()
    opt.step()  # the first apply's update (after the copies) is waited for
    assert recorder.log == [("wait_event", "main", "side#1")]
    recorder.log.clear()
    ema.apply(model)
    plain.apply(model)
    log = recorder.log
    assert log[0] == ("wait_stream", "side", "main")
    assert log[1] == ("enter", "side") and ("exit", "side") in log
    assert ("keep", (300, 300), "side") in log  # the parameter read on the side stream
    assert log[-1] == ("record_event", "side#2")
    recorder.log.clear()
    opt.step()  # an optimizer step waits for the update (it writes what the update reads)
    assert recorder.log == [("wait_event", "main", "side#2")]
    ema.apply(model)
    recorder.log.clear()
    avg = ema.average(model)  # a read waits too
    assert recorder.log == [("wait_event", "main", "side#3")]
    ema.average(model)
    assert len(recorder.log) == 1  # once: the event was consumed
    plain.apply(model)
    for name, want in plain.average(model).items():
        torch.testing.assert_close(avg[name], want, rtol=0, atol=0)
    assert checked and checked[0] == 2  # the check saw both shadows (weight and bias)


def test_side_stream_check_on_devices() -> None:
    """The real check, on stand-ins that have only a ``device`` (CPU torch makes no CUDA
    tensor): one CUDA device is accepted; two, or CUDA beside CPU, are refused."""

    class On:
        def __init__(self, device: str) -> None:
            self.device = torch.device(device)

    check = torch_backend.TorchBackend().check_side_stream
    check([On("cuda:0"), On("cuda:0")])
    check([On("cuda:1")])
    for devices in (["cuda:0", "cuda:1"], ["cuda:0", "cpu"], ["cpu"], ["meta"]):
        with pytest.raises(ValueError, match="needs every parameter on one CUDA device"):
            check([On(d) for d in devices])


def test_side_stream_is_refused_where_there_are_no_streams() -> None:
    with pytest.raises(ValueError, match=r"side_stream=True needs every parameter on one CUDA"):
        emacore.EMA(0.9, side_stream=True).apply(_model())
    with pytest.raises(ValueError, match="one decay profile"):
        emacore.EMA((0.9, 0.99), side_stream=True)
    with pytest.raises(ValueError, match="no device"):
        emacore.EMA(0.9, side_stream=True, device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_side_stream_on_cuda_gives_the_numbers_of_the_plain_update() -> None:
    """For real: the real check accepts the CUDA shadows, the update runs on a CUDA stream of
    its own (not the current one), and the numbers equal the plain update's exactly."""
    torch.manual_seed(0)
    model = _model().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    side = emacore.EMA(0.9, side_stream=True)
    plain = emacore.EMA(0.9)
    assert torch_backend.STREAMS.__class__.__name__ == "_CudaStreams"  # no stand-in left over
    for step in range(20):
        model(torch.randn(8, model[0].in_features, device="cuda")).square().mean().backward()
        opt.step()
        opt.zero_grad()
        side.apply(model)
        plain.apply(model)
        if step == 0:
            (group,) = side._groups.values()
            stream = group.state.shadow.backend_data.side
            assert isinstance(stream, torch.cuda.Stream), stream
            assert stream != torch.cuda.current_stream(), "the update ran on the current stream"
    for name, want in plain.average(model).items():
        torch.testing.assert_close(side.average(model)[name], want, rtol=0, atol=0)
    with side.swapped(model):
        for name, p in model.state_dict().items():
            torch.testing.assert_close(p, plain.average(model)[name], rtol=0, atol=0)


def test_the_cached_module_path_sees_a_replaced_parameter() -> None:
    """After a step or two the model is recognised from a cheap snapshot; a parameter
    replaced by another tensor of the same shape must still be the one averaged."""
    model = nn.Linear(3, 2)
    start = model.weight.detach().clone()
    ema = emacore.EMA(0.5)
    ema.apply(model)
    ema.apply(model)  # cached from here on
    model.weight = nn.Parameter(start + 4.0)
    ema.apply(model)
    torch.testing.assert_close(ema.average(model)["weight"], start + 2.0)
    model.bias.requires_grad_(False)  # its role changes to "frozen": copied from now on
    ema.apply(model)
    assert "bias" in ema.state_dict()["leaves"]  # averaged once, averaged for good


def test_a_loaded_state_dict_keeps_small_tensors_packed() -> None:
    """Shadows made from a loaded state dict are laid out (packed) as any others."""
    from torch.profiler import ProfilerActivity, profile

    params = [nn.Parameter(torch.randn(16)) for _ in range(50)]
    source = emacore.EMA(0.5)
    source.apply(params)
    target = emacore.EMA(0.5)
    target.apply(params)
    target.load_state_dict(source.state_dict())
    target.apply(params)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        target.apply(params)
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("aten::_foreach_lerp_", 0) == 0  # not tensor by tensor
    assert counts["aten::lerp_"] == 1 and counts["aten::cat"] == 1


@pytest.mark.parametrize("inplace", [True, False])
def test_a_functional_dict_state_keeps_small_tensors_packed(inplace: bool) -> None:
    """state.shadow is a dict of views; the update still runs on the packed buffer."""
    from torch.profiler import ProfilerActivity, profile

    params = {f"p{i:02d}": torch.randn(16) for i in range(40)}
    state = emacore.functional.init(params)
    assert isinstance(state.shadow, dict)
    new = {k: v + 1.0 for k, v in params.items()}
    state = emacore.functional.update(state, new, 0.5, inplace=inplace)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        state = emacore.functional.update(state, new, 0.5, inplace=inplace)
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("aten::_foreach_lerp_", 0) == 0  # not tensor by tensor
    assert counts["aten::lerp_"] == 1 and counts["aten::cat"] == 1
    for k, p in params.items():
        torch.testing.assert_close(state.shadow[k], p + 0.75)
