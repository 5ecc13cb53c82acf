"""What `variables_to_restore` maps to, and post-hoc snapshots saved from a state dict.

`variables_to_restore` follows TensorFlow: each averaged variable under its average's name,
each variable kept without an average (a copied buffer) under its own name, and in both cases
the value is the live variable itself, whose numbers a restore then overwrites with the
average. `posthoc.save_snapshot` given an `ExponentialMovingAverage.state_dict` records the
width (``gamma``, ``sigma_rel``) and time next to the averages; both, and the reconstruction
from such files, are checked against float64 math written here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import emacore
from emacore import posthoc
from emacore.schedules import PowerFunction

SUFFIX = "/ExponentialMovingAverage"


def ref_ema(values: list[np.ndarray], decay: float) -> np.ndarray:
    """The shadow after one apply per value (the first copies), in float64."""
    s = values[0].astype(np.float64)
    for v in values[1:]:
        s = decay * s + (1.0 - decay) * v.astype(np.float64)
    return s


# -- variables_to_restore ------------------------------------------------------------------------


def test_variables_to_restore_maps_average_names_to_the_live_variables(lib: Any) -> None:
    """Two leaves of one shape (a swap of keys would still type-check), named in a pytree."""
    rng = np.random.default_rng(0)
    history = [{nm: rng.standard_normal(3) for nm in ("a", "b")} for _ in range(4)]
    params = {"layer": {nm: lib.make(v) for nm, v in history[0].items()}}
    ema = emacore.EMA(0.75)
    ema.apply(params)
    for values in history[1:]:
        layer = params["layer"]
        params = {"layer": {nm: lib.set_value(layer[nm], values[nm]) for nm in layer}}
        ema.apply(params)
    restore = ema.variables_to_restore()
    assert sorted(restore) == [f"layer/a{SUFFIX}", f"layer/b{SUFFIX}"]
    shadows = ema.state_dict()["leaves"]
    for key, var in restore.items():
        leaf = key.removesuffix(SUFFIX)
        assert var is params["layer"][leaf[len("layer/") :]], key  # the variable itself
        assert ema.average_name(var) == key
        np.testing.assert_array_equal(lib.read(var), history[-1][leaf[len("layer/") :]])
        # restoring the average of `key` into `var` gives the variable's own average
        want = ref_ema([h[leaf[len("layer/") :]] for h in history], 0.75)
        np.testing.assert_allclose(lib.read(shadows[leaf]["shadow"]), want, rtol=1e-12)
        np.testing.assert_allclose(lib.read(ema.average(var)), want, rtol=1e-12)


def test_variables_to_restore_of_a_plain_list_and_of_a_profile(lib: Any) -> None:
    if not lib.mutable:
        pytest.skip(f"{lib.name} arrays are immutable: a plain list is tracked by position")
    rng = np.random.default_rng(1)
    values = [rng.standard_normal(2) for _ in range(6)]
    a, b = lib.make(values[0]), lib.make(values[1])
    ema = emacore.EMA({"fast": 0.5, "slow": 0.9}, name="avg")
    ema.apply([a, b])
    a, b = lib.set_value(a, values[2]), lib.set_value(b, values[3])
    ema.apply([a, b])
    for profile, decay in (("fast", 0.5), ("slow", 0.9)):
        restore = ema.profile(profile).variables_to_restore()
        assert list(restore) == [f"Variable/avg/{profile}", f"Variable_1/avg/{profile}"]
        assert restore[f"Variable/avg/{profile}"] is a
        assert restore[f"Variable_1/avg/{profile}"] is b
        got = lib.read(ema.profile(profile).average(restore[f"Variable_1/avg/{profile}"]))
        np.testing.assert_allclose(got, ref_ema([values[1], values[3]], decay), rtol=1e-12)


def test_variables_to_restore_keeps_copied_buffers_under_their_own_names(lib: Any) -> None:
    """TF restores a variable without a moving average under its own name: a module's
    copied buffers (BatchNorm's statistics, its integer counter) are such variables."""
    if lib.name != "torch":
        pytest.skip("modules with buffers are torch's (the only container backend here)")
    import torch

    torch.manual_seed(0)
    bn = torch.nn.BatchNorm1d(3)
    ema = emacore.EMA(0.5)
    weights = []
    for _ in range(3):
        bn.train()
        bn(torch.randn(8, 3))  # moves the running statistics and the batch counter
        with torch.no_grad():
            bn.weight.add_(torch.randn(3))
        weights.append(bn.weight.detach().numpy().astype(np.float64).copy())
        ema.apply(bn)
    restore = ema.variables_to_restore()
    assert sorted(restore) == sorted(
        [
            f"weight{SUFFIX}",
            f"bias{SUFFIX}",
            "running_mean",
            "running_var",
            "num_batches_tracked",
        ]
    )
    for key, var in restore.items():
        assert var is getattr(bn, key.removesuffix(SUFFIX)), key
    np.testing.assert_allclose(
        ema.average(restore[f"weight{SUFFIX}"]).numpy(), ref_ema(weights, 0.5), rtol=1e-6
    )
    assert int(restore["num_batches_tracked"]) == 3


# -- posthoc.save_snapshot from a state dict ------------------------------------------------------


def gamma_of(sigma_rel: float) -> float:
    """EDM2's γ for σ_rel: the largest real root of (γ+2)²(γ+3)σ² = γ+1, in float64."""
    k = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - k, 12.0 - k])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def power_ema(values: list[np.ndarray], gamma: float) -> list[np.ndarray]:
    """The power-function EMA's average after each value, in float64: the first value is the
    model as built (step 0), the k-th after it is step k, decay (1 - 1/k)^(γ+1)."""
    s = values[0].astype(np.float64)
    out = [s]
    for k, v in enumerate(values[1:], start=1):
        beta = (1.0 - 1.0 / k) ** (gamma + 1.0)
        s = beta * s + (1.0 - beta) * v.astype(np.float64)
        out.append(s)
    return out


def posthoc_reference(
    snaps: list[tuple[float, float, np.ndarray]], gamma: float, t_eval: float
) -> np.ndarray:
    """EDM2's least-squares synthesis, written out: Gram matrix of the profiles
    p(τ; γ, t) = (γ+1)/t (τ/t)^γ on [0, t], weights normalised to sum 1."""

    def inner(ga: float, ta: float, gb: float, tb: float) -> float:
        m = min(ta, tb)
        return (
            (ga + 1)
            * (gb + 1)
            * m ** (ga + gb + 1)
            / ((ga + gb + 1) * ta ** (ga + 1) * tb ** (gb + 1))
        )

    used = [s for s in snaps if s[1] <= t_eval]
    gram = np.array([[inner(g, t, h, u) for h, u, _ in used] for g, t, _ in used])
    rhs = np.array([inner(g, t, gamma, t_eval) for g, t, _ in used])
    x = np.linalg.lstsq(gram, rhs, rcond=None)[0]
    x /= x.sum()
    return sum(w * avg for w, (_, _, avg) in zip(x, used))


WIDTHS = (0.05, 0.10)


def _train_and_snapshot(tmp_path: Path) -> tuple[list[Path], dict[tuple[float, int], np.ndarray]]:
    """Two power-function EMAs over a random walk; every 10 steps each one's state dict is
    saved with save_snapshot. Returns the files and the float64 averages at each snapshot."""
    rng = np.random.default_rng(7)
    steps = 40
    values = [np.zeros(5)]
    for _ in range(steps):
        values.append(values[-1] + rng.standard_normal(5))
    emas = {s: emacore.EMA(PowerFunction(sigma_rel=s)) for s in WIDTHS}
    files, want = [], {}
    refs = {s: power_ema(values, gamma_of(s)) for s in WIDTHS}
    params = {"w": values[0].copy()}
    for ema in emas.values():
        ema.apply(params)  # where the model is built
    for step in range(1, steps + 1):
        params["w"][...] = values[step]
        for s, ema in emas.items():
            ema.apply(params)
            if step % 10 == 0:
                path = tmp_path / f"ema-{s}-{step:04d}.safetensors"
                posthoc.save_snapshot(ema.state_dict(), path, t=step)
                files.append(path)
                want[s, step] = refs[s][step]
    return files, want


def test_save_snapshot_of_a_state_dict_records_its_width_time_and_averages(
    tmp_path: Path,
) -> None:
    files, want = _train_and_snapshot(tmp_path)
    for path in files:
        width, step = float(path.stem.split("-")[1]), int(path.stem.split("-")[2])
        record = json.loads(emacore.checkpoint.describe(path)["metadata"][posthoc.METADATA_KEY])
        assert record["t"] == step
        assert record["sigma_rel"] == pytest.approx(width, rel=1e-12)
        assert record["gamma"] == pytest.approx(gamma_of(width), rel=1e-10)
        # and the gamma recorded is the one that sigma_rel implies, by EDM2's formula
        g = record["gamma"]
        assert math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) == pytest.approx(width, rel=1e-12)
        shadow = emacore.load(path)["leaves"]["w"]["shadow"]
        np.testing.assert_allclose(shadow, want[width, step], rtol=1e-12, atol=1e-12)
    assert [(round(p.sigma_rel, 12), t) for p, t in posthoc.read_snapshots(files[:2])] == [
        (0.05, 10.0),
        (0.10, 10.0),
    ]


def test_snapshots_of_state_dicts_reconstruct_the_averages(tmp_path: Path) -> None:
    files, want = _train_and_snapshot(tmp_path)
    # a width that one snapshot has: its average, whatever the others
    for width, step in ((0.05, 30), (0.10, 40), (0.05, 10)):
        got = posthoc.reconstruct(files, gamma=gamma_of(width), t_eval=step)["w"]
        np.testing.assert_allclose(got, want[width, step], rtol=1e-7, atol=1e-7)
    # any other: EDM2's least squares over the snapshots, computed here
    snaps = [(gamma_of(s), float(t), avg) for (s, t), avg in sorted(want.items(), key=str)]
    for sigma_rel, t_eval in ((0.13, 40.0), (0.07, 35.0)):
        got = posthoc.reconstruct(files, sigma_rel=sigma_rel, t_eval=t_eval)["w"]
        ref = posthoc_reference(snaps, gamma_of(sigma_rel), t_eval)
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_save_snapshot_of_a_state_dict_with_a_profile_given(tmp_path: Path) -> None:
    """A state dict whose schedule is no PowerFunction records the profile= given."""
    ema = emacore.EMA(0.9)
    ema.apply({"w": np.ones(2)})
    path = tmp_path / "given.safetensors"
    posthoc.save_snapshot(ema.state_dict(), path, t=3, profile=0.08)
    record = json.loads(emacore.checkpoint.describe(path)["metadata"][posthoc.METADATA_KEY])
    assert record["gamma"] == pytest.approx(gamma_of(0.08), rel=1e-10)
    assert record["sigma_rel"] == pytest.approx(0.08, rel=1e-12)
    assert record["t"] == 3
    with pytest.raises(ValueError, match="cannot tell the power-function profile"):
        posthoc.save_snapshot(ema.state_dict(), tmp_path / "no.safetensors", t=3)
