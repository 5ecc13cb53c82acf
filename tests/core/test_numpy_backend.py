"""The numpy backend's fused path against the reference kernel, bit for bit, and its
memory and safety promises."""

from __future__ import annotations

import itertools
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import emacore
from emacore import functional as F
from emacore._kernel import reference_update
from emacore_backends import numpy as npb

SIZES = [0, 1, 7, 255, npb.BLOCK - 1, npb.BLOCK + 3, npb.SMALL - 1, npb.SMALL, 3 * npb.BLOCK + 5]


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.sampled_from(SIZES), min_size=1, max_size=30),
    dtype=st.sampled_from(["float16", "float32", "float64"]),
    c=st.floats(0.0, 1.0),
    threads=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**32 - 1),
)
def test_fused_update_is_bitwise_reference(
    sizes: list[int], dtype: str, c: float, threads: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    backend = npb.NumpyBackend()
    backend._threads = threads
    params = [rng.standard_normal(n).astype(dtype) for n in sizes]
    new = [rng.standard_normal(n).astype(dtype) for n in sizes]
    packed = backend.create_shadows(params, zeros=False)
    loose = [p.copy() for p in params]
    want = [reference_update(s.copy(), p, c) for s, p in zip(packed, new)]
    got_packed = backend.update(packed, new, c, inplace=True)
    got_loose = backend.update(loose, new, c, inplace=True)
    for w, a, b in zip(want, got_packed, got_loose):
        assert a.dtype == w.dtype and b.dtype == w.dtype
        np.testing.assert_array_equal(a, w)
        np.testing.assert_array_equal(b, w)


def test_many_threads_cover_large_tensors_exactly_once() -> None:
    backend = npb.NumpyBackend()
    backend._threads = 4
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(n).astype(np.float32) for n in (1_000_003, 5, 300_001)]
    new = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
    shadows = backend.create_shadows(params, zeros=False)
    want = [reference_update(s.copy(), p, 0.25) for s, p in zip(shadows, new)]
    for got, w in zip(backend.update(shadows, new, 0.25, inplace=True), want):
        np.testing.assert_array_equal(got, w)


def test_non_contiguous_parameters_and_shadows() -> None:
    rng = np.random.default_rng(1)
    base = rng.standard_normal((64, 64)).astype(np.float32)
    param = base[::2, 1::3]  # a strided view
    state = F.init([param])
    new = rng.standard_normal((64, 64)).astype(np.float32)[::2, 1::3]
    out = F.update(state, [new], 0.9, inplace=True)
    np.testing.assert_array_equal(
        out.shadow[0], reference_update(param.copy(), new, np.float32(0.1))
    )
    loose = [np.asfortranarray(rng.standard_normal((5, 7)))]  # a non-C-contiguous shadow
    want = reference_update(loose[0].copy(), new[:5, :7].astype(np.float64), 0.3)
    npb.BACKEND.update(loose, [new[:5, :7].astype(np.float64)], 0.3, inplace=True)
    np.testing.assert_array_equal(loose[0], want)


def test_no_allocation_per_step_after_the_first() -> None:
    rng = np.random.default_rng(2)
    params = [rng.standard_normal(n).astype(np.float32) for n in [400_000] * 4 + [256] * 500]
    ema = emacore.EMA(0.999)
    ema.apply(params)
    ema.apply(params)  # the first update allocates the gather scratch
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        for _ in range(3):
            ema.apply(params)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    model_bytes = sum(p.nbytes for p in params)
    # Python objects (lists, views) only: far below one parameter tensor (1.6 MB)
    assert peak - base < 200_000, (peak - base, model_bytes)


def test_read_only_shadow_is_refused_and_nothing_changes() -> None:
    # separate shadows: packed ones are written through their common (writable) buffer
    state = F.init({"w": np.zeros(3, np.float32), "v": np.zeros(2, np.float32)}, layout="separate")
    state.shadow["v"].flags.writeable = False
    before = state.shadow["w"].copy()
    with pytest.raises(emacore.ReadOnlyError, match="leaf 'v': its shadow is a read-only"):
        F.update(
            state, {"w": np.ones(3, np.float32), "v": np.ones(2, np.float32)}, 0.5, inplace=True
        )
    np.testing.assert_array_equal(state.shadow["w"], before)
    out = F.update(state, {"w": np.ones(3, np.float32), "v": np.ones(2, np.float32)}, 0.5)
    np.testing.assert_array_equal(out.shadow["v"], [0.5, 0.5])


def test_copy_to_a_read_only_array_is_refused_before_anything_is_written() -> None:
    params = {"a": np.zeros(3), "z": np.zeros(2)}
    ema = emacore.EMA(0.5)
    ema.apply(params)
    params["a"][...] = 4.0
    params["z"][...] = 2.0
    ema.apply(params)
    params["z"].flags.writeable = False
    with pytest.raises(emacore.ReadOnlyError, match="leaf 'z': the array is read-only"):
        ema.copy_to(params)
    np.testing.assert_array_equal(params["a"], np.full(3, 4.0))  # not written either


def test_functional_not_inplace_leaves_packed_state_untouched() -> None:
    params = [np.zeros(10, np.float32), np.zeros(3, np.float32)]
    state = F.init(params)
    new = F.update(state, [np.ones(10, np.float32), np.ones(3, np.float32)], 0.5)
    np.testing.assert_array_equal(state.shadow[0], np.zeros(10))
    np.testing.assert_array_equal(new.shadow[1], np.full(3, 0.5))
    again = F.update(new, [np.ones(10, np.float32), np.ones(3, np.float32)], 0.5, inplace=True)
    assert again.shadow[0] is new.shadow[0]
    np.testing.assert_array_equal(again.shadow[0], np.full(10, 0.75))


def test_numpy_scalars_are_zero_d_leaves() -> None:
    """``v - lr * g`` on a 0-d array gives a numpy scalar; it must stay a tracked leaf."""
    ema = emacore.EMA(0.5)
    params = {"b": np.zeros((), np.float32)}
    ema.apply(params)
    for value in (2.0, 4.0):
        params = {"b": params["b"] * 0 + np.float32(value)}
        assert isinstance(params["b"], np.float32)
        ema.apply(params)
    avg = ema.average(params)["b"]
    assert isinstance(avg, np.ndarray)
    assert avg.shape == ()
    assert avg.dtype == np.float32
    assert float(avg) == 0.5 * (0.5 * 0 + 0.5 * 2.0) + 0.5 * 4.0


@pytest.mark.parametrize("size", [256, npb.SMALL + 1])
def test_same_array_changed_in_place_is_still_refused_whole(size: int) -> None:
    """The id-cached fast path trusts the backend's own pre-write checks: an array whose
    dtype is changed in place (a view cast) must still be refused, naming it, with no write."""
    params = [np.zeros(size, np.float32) for _ in range(3)]
    ema = emacore.EMA(0.5)
    ema.apply(params)
    ema.apply(params)  # now on the fast path
    params[0][...] = 1.0
    params[2].dtype = np.int32  # same object, same bytes, another dtype
    before = [np.array(ema.average(p), copy=True) for p in params[:2]]
    with pytest.raises(emacore.LeafMismatchError, match=r"leaf 'Variable_2': dtype int32"):
        ema.apply(params)
    for p, b in zip(params[:2], before):
        np.testing.assert_array_equal(ema.average(p), b)


def test_half_parameters_get_float32_shadows_by_default() -> None:
    """A float16 shadow with decay 0.999 cannot follow a parameter 0.25 away: each step's
    increment, 0.00025, is below half its spacing at 1.0. The default float32 shadow does."""
    params = {"w": np.ones(8, np.float16)}
    default, same = emacore.EMA(0.999), emacore.EMA(0.999, shadow_dtype="same")
    tf_like = emacore.EMA(0.999, compat="tensorflow")
    for ema in (default, same, tf_like):
        ema.apply(params)
    params["w"] = np.full(8, 1.25, np.float16)
    for _ in range(200):
        for ema in (default, same, tf_like):
            ema.apply(params)
    assert default.average(params)["w"].dtype == np.float32
    np.testing.assert_allclose(default.average(params)["w"], 1.25 - 0.25 * 0.999**200, rtol=1e-5)
    assert same.average(params)["w"].dtype == np.float16
    assert tf_like.average(params)["w"].dtype == np.float16  # TF keeps the variable's dtype
    np.testing.assert_array_equal(same.average(params)["w"], 1.0)  # stuck


def test_a_functional_dict_state_keeps_its_packed_buffer() -> None:
    """state.shadow is a dict of views of one buffer; updates keep using that buffer."""
    from emacore_backends.numpy import _Packing

    params = {f"p{i:02d}": np.full(5, float(i), np.float32) for i in range(30)}
    state = F.init(params)
    base = state.shadow["p00"].base
    for k in range(1, 4):
        values = {n: v + k for n, v in params.items()}
        state = F.update(state, values, 0.5, inplace=True)
    assert isinstance(state.backend_list.backend_data, _Packing)
    assert all(state.shadow[n].base is base for n in params)
    for n, v in params.items():  # s = v, then toward v+1, v+2, v+3 by halves
        np.testing.assert_allclose(state.shadow[n], v + 2.125)
    out = F.update(state, params, 0.5)  # not in place: a new packed buffer, the old one kept
    assert out.shadow["p00"].base is not base
    np.testing.assert_allclose(state.shadow["p03"], np.full(5, 5.125))
    np.testing.assert_allclose(out.shadow["p03"], np.full(5, 4.0625))


def test_a_replaced_leaf_of_a_flat_list_state_is_checked_as_it_is() -> None:
    """The notes the core keeps on a list state (shapes, the backend's layout) describe its
    arrays; a leaf replaced by the user is checked, and updated, as itself."""
    params = [np.ones(3, np.float32), np.ones(4, np.float32)]
    state = F.update(F.init(params), params, 0.5, inplace=True)
    state.shadow[1] = np.zeros(5, np.float32)
    with pytest.raises(emacore.LeafMismatchError, match=r"leaf '1': shape \(4,\)"):
        F.update(state, params, 0.5, inplace=True)
    state.shadow[1] = np.zeros(4, np.float32)  # the right shape: it is the one updated
    state = F.update(state, params, 0.5, inplace=True)
    np.testing.assert_array_equal(state.shadow[1], np.full(4, 0.5))
    np.testing.assert_array_equal(state.shadow[0], np.ones(3))


def _lane_sizes(lanes: list[list[tuple[int, ...]]]) -> list[int]:
    return [sum(hi - lo for _, _, lo, hi in lane) for lane in lanes]


@pytest.mark.parametrize("threads", [2, 3, 4])
def test_lanes_share_the_elements_evenly_and_cover_each_once(threads: int) -> None:
    """The threaded cut: every element of every item in exactly one lane, lanes within a cache
    block of an equal share (an unbalanced cut gives the right numbers, slowly)."""
    backend = npb.NumpyBackend()
    backend._threads = threads
    sizes = [900_001, 5, 300_007, npb.BLOCK * 3 + 1]
    items = [("tensor", i, 0, n) for i, n in enumerate(sizes)]
    lanes = backend._balance(items, sum(sizes))
    assert len(lanes) == threads
    covered: dict[int, list[tuple[int, int]]] = {}
    for lane in lanes:
        for kind, i, lo, hi in lane:
            assert kind == "tensor"
            covered.setdefault(i, []).append((lo, hi))
    for i, n in enumerate(sizes):
        spans = sorted(covered[i])
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans)), spans  # no gap or overlap
    share = -(-sum(sizes) // threads)
    for size in _lane_sizes(lanes)[:-1]:
        assert share - npb.BLOCK <= size <= share + npb.BLOCK, (size, share)


def test_non_contiguous_shadows_are_spread_over_the_lanes() -> None:
    """Shadows updated whole (not C-contiguous) go one lane after another, every one updated."""
    backend = npb.NumpyBackend()
    backend._threads = 4
    rng = np.random.default_rng(3)
    shadows = [np.asfortranarray(rng.standard_normal((600, 700)), np.float32) for _ in range(4)]
    params = [rng.standard_normal((600, 700)).astype(np.float32) for _ in range(4)]
    lanes = backend._loose_lanes(shadows)
    assert [[item[:2] for item in lane] for lane in lanes] == [[("whole", i)] for i in range(4)]
    want = [reference_update(s.copy(), p, np.float32(0.3)) for s, p in zip(shadows, params)]
    backend.update(shadows, params, 0.3, inplace=True)
    for got, w in zip(shadows, want):
        np.testing.assert_array_equal(got, w)


def test_packed_shadows_take_the_fused_path() -> None:
    """Packed shadows are updated through their plan and one scratch gather (the fast path);
    falling back to the per-array loop gives the same numbers, so only this tells."""
    backend = npb.NumpyBackend()
    params = [np.full(n, 1.0, np.float32) for n in (3, 5, 7)]
    shadows = backend.create_shadows(params, zeros=True)
    assert shadows.backend_data.plan is None
    backend.update(shadows, params, 0.5, inplace=True)
    assert shadows.backend_data.plan is not None
    assert shadows.backend_data.scratch is not None
    np.testing.assert_array_equal(np.concatenate(shadows), np.full(15, 0.5, np.float32))
