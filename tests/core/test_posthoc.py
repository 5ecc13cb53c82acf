"""Post-hoc EMA (emacore.posthoc) against the closed forms of Karras et al. 2024 (EDM2),
numerical integration, exact sums over the discrete EMA's weights, and a float64
reimplementation of training with power-function EMAs. numpy only: runs in every session.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import emacore
from emacore import posthoc
from emacore._state_dict import STATE_FORMAT
from emacore.errors import LeafDTypeError, LeafMismatchError, StructureError
from emacore.schedules import PowerFunction, gamma_to_sigma_rel, sigma_rel_to_gamma

G05 = sigma_rel_to_gamma(0.05)  # EDM2's two default widths
G10 = sigma_rel_to_gamma(0.10)


def trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    # np.trapezoid is numpy >= 2 only, and np.trapz warns there
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0)


def step_weights(gamma: float, n: int) -> np.ndarray:
    """The weight of step i = 1..n in the discrete EMA's average at step n, exactly.

    β_i = (1 − 1/i)^(γ+1) gives step i the weight (1 − β_i) Π_{j>i} β_j = (1 − β_i)(i/n)^(γ+1)
    (the product telescopes); β_1 = 0, so the weights sum to 1.
    """
    i = np.arange(1, n + 1, dtype=np.float64)
    beta = (1.0 - 1.0 / i) ** (gamma + 1.0)
    return (1.0 - beta) * (i / n) ** (gamma + 1.0)


# -- (a) the closed forms against numerical integration and exact discrete sums ----------------


def test_import_pulls_in_no_array_library() -> None:
    code = (
        "import sys, emacore.posthoc\n"
        "bad = [m for m in ('numpy', 'torch', 'jax', 'array_api_compat') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    env = {"EMACORE_DISABLE_PLUGIN_AUTOLOAD": "1", "PATH": ""}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=120,
    )
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("gamma", [0.0, 0.5, G10, G05, 60.0])
@pytest.mark.parametrize("t", [1.0, 37.5, 1e6])
def test_response_integrates_to_one_and_has_width_sigma_rel(gamma: float, t: float) -> None:
    tau = np.linspace(0.0, t, 400_001)
    p = posthoc.response(tau, gamma, t)
    assert p.dtype == np.float64 and p.shape == tau.shape
    assert trapezoid(p, tau) == pytest.approx(1.0, rel=1e-7)
    # the paper's sigma_rel is the profile's standard deviation relative to t (Eq. 123)
    mean = trapezoid(tau * p, tau)
    std = np.sqrt(trapezoid((tau - mean) ** 2 * p, tau))
    assert std / t == pytest.approx(gamma_to_sigma_rel(gamma), rel=1e-6)


def test_response_formula_and_support() -> None:
    tau = np.array([-1.0, 0.0, 25.0, 100.0, 100.5, 1e9])
    got = posthoc.response(tau, 2.0, 100.0)
    want = [0.0, 0.0, 3.0 / 100.0 * 0.25**2, 3.0 / 100.0, 0.0, 0.0]
    np.testing.assert_allclose(got, want, rtol=1e-15)
    assert posthoc.response(0.0, 0.0, 4.0) == 0.25  # gamma 0: the running mean, 1/t everywhere
    assert posthoc.response(np.zeros((2, 3)), [0.0, 1.0, 2.0], 1.0).shape == (2, 3)


CASES = [
    (G05, 1000.0, G10, 1000.0),
    (G05, 400.0, G10, 1000.0),
    (G10, 1000.0, G05, 400.0),
    (0.0, 3.0, 2.5, 7.0),
    (G05, 1e5, G05, 2e5),
    (30.0, 1.0, 0.0, 1.0),
]


@pytest.mark.parametrize(("ga", "ta", "gb", "tb"), CASES)
def test_correlation_matches_numerical_integration(
    ga: float, ta: float, gb: float, tb: float
) -> None:
    # the product vanishes beyond min(ta, tb): integrate [0, m] on a fine grid, kink-free
    tau = np.linspace(0.0, min(ta, tb), 400_001)
    numeric = trapezoid(posthoc.response(tau, ga, ta) * posthoc.response(tau, gb, tb), tau)
    closed = posthoc.correlation(ga, ta, gb, tb)
    assert closed.dtype == np.float64 and closed.shape == ()
    assert float(closed) == pytest.approx(numeric, rel=1e-7)
    assert float(closed) == float(posthoc.correlation(gb, tb, ga, ta))  # symmetric


@pytest.mark.parametrize(("ga", "ta", "gb", "tb"), CASES[:4])
def test_correlation_matches_exact_sums_over_the_discrete_emas_steps(
    ga: float, ta: float, gb: float, tb: float
) -> None:
    # Σ_i w_a(i) w_b(i) over the steps, with the discrete EMA's exact weights at steps ta, tb:
    # the continuous profile is what the discrete EMA realises, to O(1/n²) here
    scale = 3
    na, nb = int(ta) * scale, int(tb) * scale
    m = min(na, nb)
    discrete = float(np.sum(step_weights(ga, na)[:m] * step_weights(gb, nb)[:m]))
    closed = float(posthoc.correlation(ga, na, gb, nb))
    assert discrete == pytest.approx(closed, rel=1e-5)


def test_correlation_closed_forms() -> None:
    for g in (0.0, 1.0, G05):
        for t in (1.0, 250.0):
            assert float(posthoc.correlation(g, t, g, t)) == pytest.approx(
                (g + 1) ** 2 / ((2 * g + 1) * t), rel=1e-14
            )
    # scaling every time by c scales every inner product by 1/c
    base = posthoc.correlation(G05, 300.0, G10, 700.0)
    assert float(posthoc.correlation(G05, 3e5, G10, 7e5)) == pytest.approx(base / 1e3, rel=1e-13)
    # no overflow at large times and exponents (ratios <= 1 are raised, never the times)
    big = posthoc.correlation(200.0, 1e300, 200.0, 1e300)
    assert np.isfinite(big) and big > 0
    gram = posthoc.correlation(np.array([G05, G10])[:, None], 10.0, np.array([G05, G10]), 10.0)
    assert gram.shape == (2, 2) and np.all(np.linalg.eigvalsh(gram) > 0)


# -- (b) the paper's closed forms ----------------------------------------------------------


def test_sigma_rel_gamma_round_trip_and_the_papers_values() -> None:
    for s in np.linspace(0.005, np.sqrt(1 / 12), 60):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(float(s))) == pytest.approx(s, rel=1e-12)
    for g in (0.0, 0.25, 1.0, 6.94, 16.97, 100.0, 1e4):
        assert sigma_rel_to_gamma(gamma_to_sigma_rel(g)) == pytest.approx(g, rel=1e-9, abs=1e-12)
    # EDM2: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94
    assert round(G05, 2) == 16.97 and round(G10, 2) == 6.94


def test_a_target_among_the_snapshots_gets_all_the_weight() -> None:
    snaps = [(s, t) for t in range(500, 5001, 500) for s in (0.05, 0.10)]
    for k, (s, t) in enumerate(snaps):
        x = posthoc.solve_weights(snaps, s, t_eval=t)
        want = np.zeros(len(snaps))
        want[k] = 1.0
        np.testing.assert_allclose(x, want, atol=1e-8)
        assert posthoc.profile_error(snaps, x, s, t_eval=t) < 1e-6
    # and by gamma, through a PowerFunction
    x = posthoc.solve_weights([(PowerFunction(gamma=3.0), 10.0)], gamma=3.0)
    np.testing.assert_allclose(x, [1.0], rtol=1e-12)


def edm2_weights(gammas: np.ndarray, times: np.ndarray, g_out: float, t_out: float) -> np.ndarray:
    """EDM2's Algorithm 3, written independently: its correlation in its own form, solve, sum."""

    def corr(ga: Any, ta: Any, gb: Any, tb: Any) -> Any:
        ratio = ta / tb
        exponent = np.where(ta < tb, gb, -ga)
        return (ga + 1) * (gb + 1) * ratio**exponent / ((ga + gb + 1) * np.maximum(ta, tb))

    a = corr(gammas[:, None], times[:, None], gammas[None, :], times[None, :])
    b = corr(gammas, times, g_out, t_out)
    x = np.linalg.solve(a, b)
    return np.asarray(x / x.sum())


@pytest.mark.parametrize("target", [0.02, 0.075, 0.15, 0.25])
def test_weights_are_edm2s(target: float) -> None:
    snaps = [(s, float(t)) for t in range(1000, 20_001, 1000) for s in (0.05, 0.10)]
    gammas = np.array([sigma_rel_to_gamma(s) for s, _ in snaps])
    times = np.array([t for _, t in snaps])
    x = posthoc.solve_weights(snaps, target)
    want = edm2_weights(gammas, times, sigma_rel_to_gamma(target), 20_000.0)
    np.testing.assert_allclose(x, want, rtol=1e-7, atol=1e-9 * np.abs(want).max())
    assert x.sum() == pytest.approx(1.0, rel=1e-13)
    # only ratios of times matter: images instead of steps (batch 256) give the same weights
    in_images = [(s, t * 256) for s, t in snaps]
    np.testing.assert_allclose(posthoc.solve_weights(in_images, target), x, rtol=1e-9, atol=1e-12)


def test_t_eval_and_later_snapshots() -> None:
    snaps = [(s, float(t)) for t in (100, 200, 300, 400) for s in (0.05, 0.10)]
    x = posthoc.solve_weights(snaps, 0.08, t_eval=250.0)
    assert np.all(x[4:] == 0.0)  # taken after t_eval: weight 0, as EDM2 drops them
    assert x.sum() == pytest.approx(1.0)
    x_cut = posthoc.solve_weights(snaps[:4], 0.08, t_eval=250.0)
    np.testing.assert_allclose(x[:4], x_cut, rtol=1e-12)
    assert posthoc.solve_weights(snaps, 0.08).shape == (8,)  # default t_eval: 400


def test_duplicate_snapshots_split_the_weight_instead_of_failing() -> None:
    # A is exactly singular: solve() would fail or explode; lstsq gives the minimum norm split
    snaps = [(0.10, 100.0), (0.10, 100.0), (0.05, 50.0)]
    x = posthoc.solve_weights(snaps, 0.10)
    np.testing.assert_allclose(x, [0.5, 0.5, 0.0], atol=1e-9)
    raw = posthoc.solve_weights(snaps, 0.10, normalize=False)
    assert raw.sum() == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize("target", [0.03, 0.2])
def test_profile_error_matches_numerical_l2_distance(target: float) -> None:
    snaps = [(s, float(t)) for t in range(100, 1001, 100) for s in (0.05, 0.10)]
    x = posthoc.solve_weights(snaps, target)
    tau = np.linspace(0.0, 1000.0, 400_001)
    mix = sum(w * posthoc.response(tau, sigma_rel_to_gamma(s), t) for w, (s, t) in zip(x, snaps))
    star = posthoc.response(tau, sigma_rel_to_gamma(target), 1000.0)
    numeric = np.sqrt(trapezoid((mix - star) ** 2, tau) / trapezoid(star**2, tau))
    assert posthoc.profile_error(snaps, x, target) == pytest.approx(numeric, rel=1e-4)
    # least squares: any other weights do worse
    assert posthoc.profile_error(snaps, x * 1.01, target) > posthoc.profile_error(snaps, x, target)


# -- (c) a float64 reimplementation of training, against direct averaging -------------------


def run_power_ema(theta: np.ndarray, gamma: float, every: int) -> tuple[np.ndarray, list[Any]]:
    """The discrete power-function EMA over ``theta`` (steps 1..T in rows), in float64.

    Returns the final average and the snapshots (average, step) taken every ``every`` steps.
    """
    shadow = np.zeros(theta.shape[1])
    snaps = []
    for n in range(1, theta.shape[0] + 1):
        beta = (1.0 - 1.0 / n) ** (gamma + 1.0)  # β_1 = 0: the first step copies
        shadow = beta * shadow + (1.0 - beta) * theta[n - 1]
        if n % every == 0:
            snaps.append((shadow.copy(), n))
    return shadow, snaps


@pytest.mark.parametrize("target", [0.03, 0.075, 0.15, 0.2])
def test_reconstruction_matches_running_the_ema_directly(target: float) -> None:
    steps, every, size = 4000, 100, 64
    rng = np.random.default_rng(5)
    theta = np.cumsum(rng.standard_normal((steps, size)), axis=0)  # random-walk parameters
    snaps, averages = [], []
    for s in (0.05, 0.10):
        _, taken = run_power_ema(theta, sigma_rel_to_gamma(s), every)
        snaps += [(s, float(n)) for _, n in taken]
        averages += [avg for avg, _ in taken]
    direct, _ = run_power_ema(theta, sigma_rel_to_gamma(target), steps)
    x = posthoc.solve_weights(snaps, target)
    rebuilt = posthoc.synthesize(averages, x)
    # The tolerance, exactly: the two averages weigh step i by W(i) = sum_k x_k w_k(i) and by
    # w*(i) (`step_weights`); both sum to 1 (the x_k do, and each w_k does), so the error is
    # sum_i (W - w*)(i) (theta_i - c) for any c: at most |W - w*|_1 * (max - min theta) / 2.
    mixed = np.zeros(steps)
    for w, (s, t) in zip(x, snaps):
        mixed[: int(t)] += w * step_weights(sigma_rel_to_gamma(s), int(t))
    l1 = float(np.abs(mixed - step_weights(sigma_rel_to_gamma(target), steps)).sum())
    spread = theta.max(axis=0) - theta.min(axis=0)
    error = np.abs(rebuilt - direct)
    assert np.all(error <= l1 / 2 * spread + 1e-9)
    # and the weights are that good: |W - w*|_1 is 5e-4 (0.075, inside the snapshots'
    # widths) to 7e-3 (0.03, extrapolated), so the error is under 0.5% of the parameters'
    # range for any parameter trajectory (measured here: far less)
    assert l1 < 0.01
    assert np.max(error / spread) < 5e-3
    assert posthoc.profile_error(snaps, x, target) < 0.01


def test_reconstruction_through_snapshot_files(tmp_path: Path) -> None:
    """The user's workflow: two power-function EMAs, snapshots every N steps, reconstruct."""
    steps, every = 400, 20
    rng = np.random.default_rng(0)
    params = {"w": np.zeros((3, 4)), "b": np.zeros(4, np.float32)}
    widths = (0.05, 0.10)
    emas = [emacore.ExponentialMovingAverage(PowerFunction(sigma_rel=s)) for s in widths]
    direct = emacore.ExponentialMovingAverage(PowerFunction(sigma_rel=0.13))
    trajectory, trajectory_b = [], []
    for ema in [*emas, direct]:
        ema.apply(params)  # once where the model is built: step k's update then sees step k
    files = []
    for step in range(1, steps + 1):
        params["w"] += rng.standard_normal(params["w"].shape)
        params["b"] += rng.standard_normal(4).astype(np.float32)
        trajectory.append(params["w"].copy())
        trajectory_b.append(params["b"].astype(np.float64))
        for ema in [*emas, direct]:
            ema.apply(params)
        if step % every == 0:
            for s, ema in zip(widths, emas):
                path = tmp_path / f"ema-{s:.3f}-{step:06d}.safetensors"
                posthoc.save_snapshot(ema, path, t=step)
                files.append(path)
    # the emacore EMA is the discrete power-function EMA, step for step
    want = np.tensordot(step_weights(direct.decay.gamma, steps), np.array(trajectory), axes=1)
    np.testing.assert_allclose(direct.average(params)["w"], want, rtol=1e-12, atol=1e-12)

    snaps = posthoc.read_snapshots(files)
    assert [t for _, t in snaps[:4]] == [20.0, 20.0, 40.0, 40.0]
    assert snaps[1][0].sigma_rel == pytest.approx(0.10)
    out = posthoc.reconstruct(files, sigma_rel=0.13, like=params)
    assert set(out) == {"w", "b"}
    assert out["w"].dtype == np.float64 and out["b"].dtype == np.float32
    x = posthoc.solve_weights(snaps, 0.13)
    mixed = np.zeros(steps)
    for wk, (pf, t) in zip(x, snaps):
        mixed[: int(t)] += wk * step_weights(pf.gamma, int(t))
    l1 = float(np.abs(mixed - step_weights(direct.decay.gamma, steps)).sum())
    spread = np.ptp(np.array(trajectory), axis=0)
    assert l1 < 0.01
    assert np.all(np.abs(out["w"] - direct.average(params)["w"]) <= l1 / 2 * spread + 1e-9)
    # float32 leaves: the same bound, plus float32 rounding in both averages (a few ulps of
    # the largest value, times the sum of |weights| for the synthesised one)
    err_b = np.abs(out["b"] - direct.average(params)["b"])
    spread_b = np.ptp(np.array(trajectory_b), axis=0)
    rounding = 1e-5 * np.abs(np.array(trajectory_b)).max() * np.abs(x).sum()
    assert np.all(err_b <= l1 / 2 * spread_b + rounding)
    # the same through synthesize on the loaded state dicts, and an earlier t_eval
    states = [emacore.checkpoint.load(f) for f in files]
    same = posthoc.synthesize(states, x)
    np.testing.assert_allclose(same["w"], out["w"], rtol=1e-12, atol=1e-12)
    # files[19] is sigma_rel 0.10 at step 200: an earlier time, and a width among the snapshots
    early = posthoc.reconstruct(files, sigma_rel=0.10, t_eval=200)
    np.testing.assert_allclose(early["w"], states[19]["leaves"]["w"]["shadow"], rtol=1e-9)


def test_multi_profile_snapshots_are_single_profile_ones_in_one_file(tmp_path: Path) -> None:
    """One EMA keeping both widths (one file per time) reconstructs what two EMAs do."""
    widths = (0.05, 0.10)
    pfs = [PowerFunction(sigma_rel=s) for s in widths]
    both = emacore.ExponentialMovingAverage(tuple(pfs))
    named = emacore.ExponentialMovingAverage({"fast": pfs[0], "slow": pfs[1]})
    singles = [emacore.ExponentialMovingAverage(pf) for pf in pfs]
    rng = np.random.default_rng(1)
    params = {"w": np.zeros(5), "b": np.zeros(2)}
    for ema in [both, named, *singles]:
        ema.apply(params)
    files_both, files_named, files_single = [], [], []
    for step in range(1, 201):
        params["w"] += rng.standard_normal(5)
        params["b"] += rng.standard_normal(2)
        for ema in [both, named, *singles]:
            ema.apply(params)
        if step % 20 == 0:
            files_both.append(tmp_path / f"both-{step}.safetensors")
            posthoc.save_snapshot(both, files_both[-1], t=step)
            files_named.append(tmp_path / f"named-{step}.safetensors")
            posthoc.save_snapshot(named, files_named[-1], t=step)
            for s, ema in zip(widths, singles):
                files_single.append(tmp_path / f"single-{s}-{step}.safetensors")
                posthoc.save_snapshot(ema, files_single[-1], t=step)
    snaps = posthoc.read_snapshots(files_both)
    assert [(round(p.sigma_rel, 2), t) for p, t in snaps[:3]] == [
        (0.05, 20.0),
        (0.1, 20.0),
        (0.05, 40.0),
    ]
    assert snaps == posthoc.read_snapshots(files_single)
    for target, t_eval in ((0.13, None), (0.07, 100)):
        want = posthoc.reconstruct(files_single, target, t_eval=t_eval)
        for files in (files_both, files_named):
            got = posthoc.reconstruct(files, target, t_eval=t_eval)
            for name in ("w", "b"):
                np.testing.assert_allclose(got[name], want[name], rtol=1e-13, atol=1e-13)
    # a target among the snapshots: that profile's averages, read from the second slot
    got = posthoc.reconstruct(files_both, 0.10, t_eval=100)
    state = emacore.checkpoint.load(files_both[4])
    np.testing.assert_allclose(got["w"], state["leaves"]["w"]["profiles"]["profile_1"]["shadow"])


def test_multi_profile_files_need_their_widths(tmp_path: Path) -> None:
    params = {"w": np.ones(2)}
    ema = emacore.ExponentialMovingAverage((PowerFunction(sigma_rel=0.05), 0.99))
    ema.apply(params)
    with pytest.raises(ValueError, match=r"decay of its profile '0.99' is 0.99, not a"):
        posthoc.save_snapshot(ema, tmp_path / "x.safetensors", t=1)
    with pytest.raises(ValueError, match="give profile= a mapping"):
        posthoc.save_snapshot(ema, tmp_path / "x.safetensors", t=1, profile=0.05)
    with pytest.raises(ValueError, match=r"names the profiles \['a'\]"):
        posthoc.save_snapshot(ema, tmp_path / "x.safetensors", t=1, profile={"a": 0.05})
    # the second profile's decay was a constant: say what it is, and it is read as such
    posthoc.save_snapshot(
        ema, tmp_path / "given.safetensors", t=1, profile={"profile_0": 0.05, "0.99": 0.2}
    )
    widths = [p.sigma_rel for p, _ in posthoc.read_snapshots([tmp_path / "given.safetensors"])]
    assert widths == pytest.approx([0.05, 0.2])
    emacore.save(ema, tmp_path / "plain.safetensors")  # records profile_0's schedule only
    with pytest.raises(ValueError, match="no record of their widths"):
        posthoc.read_snapshots([tmp_path / "plain.safetensors"], times=[1])
    with pytest.raises(ValueError, match=r"averages of 2 decay profiles"):
        posthoc.synthesize([ema.state_dict()], [1.0])


def test_reconstruct_with_times_given_for_plain_checkpoints(tmp_path: Path) -> None:
    params = {"w": np.ones(2)}
    files = []
    for s in (0.05, 0.10):
        ema = emacore.ExponentialMovingAverage(PowerFunction(sigma_rel=s))
        ema.apply(params)
        ema.apply(params)
        files.append(tmp_path / f"{s}.safetensors")
        emacore.save(ema, files[-1])  # no post-hoc metadata: gamma from the schedule, t given
    out = posthoc.reconstruct(files, sigma_rel=0.07, times=[1, 1])
    np.testing.assert_allclose(out["w"], [1.0, 1.0], rtol=1e-12)
    with pytest.raises(ValueError, match="records no snapshot time"):
        posthoc.reconstruct(files, sigma_rel=0.07)


def test_synthesize_pytrees_state_dicts_and_dtypes() -> None:
    a = {"w": np.array([1.0, 2.0], np.float16), "n": np.array(3), "x": [np.ones(1)]}
    b = {"w": np.array([3.0, 4.0], np.float16), "n": np.array(7), "x": [np.zeros(1)]}
    out = posthoc.synthesize([a, b], [0.5, 0.5])
    assert out["w"].dtype == np.float16 and out["w"].tolist() == [2.0, 3.0]
    assert int(out["n"]) == 7  # integer leaves: the last snapshot's, never averaged
    assert out["x"][0].tolist() == [0.5]
    wide = posthoc.synthesize([a, b], [0.5, 0.5], dtype="float64")
    assert wide["w"].dtype == np.float64
    assert posthoc.synthesize((a, b), np.array([0.0, 1.0]))["w"].tolist() == [3.0, 4.0]

    def state(w: float, running: float) -> dict[str, Any]:
        leaf = {"shadow": np.full(2, w), "count": 5, "decay_product": 0.0, "last_decay": 0.9}
        return {
            "format": STATE_FORMAT,
            "zero_debias": False,
            "leaves": {"layer.weight": leaf},
            "copies": {"layer.running_mean": np.full(2, running)},
        }

    out = posthoc.synthesize([state(1.0, 10.0), state(3.0, 20.0)], [0.25, 0.75])
    assert list(out) == ["layer.weight", "layer.running_mean"]  # load_state_dict's format
    assert out["layer.weight"].tolist() == [2.5, 2.5]
    assert out["layer.running_mean"].tolist() == [20.0, 20.0]  # copied, not averaged


# -- (d) bad input -------------------------------------------------------------------------


SNAPS = [(0.05, 100.0), (0.10, 100.0)]
METADATA = posthoc.METADATA_KEY


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: posthoc.solve_weights([], 0.1), ValueError, "no snapshots"),
        (lambda: posthoc.solve_weights(SNAPS, -0.1), ValueError, "sigma_rel must be in"),
        (lambda: posthoc.solve_weights(SNAPS, 0.3), ValueError, r"sqrt\(1/12\)"),
        (lambda: posthoc.solve_weights(SNAPS, gamma=-1.0), ValueError, "gamma must be >= 0"),
        (lambda: posthoc.solve_weights(SNAPS), ValueError, "exactly one"),
        (lambda: posthoc.solve_weights(SNAPS, 0.1, gamma=7.0), ValueError, "exactly one"),
        (lambda: posthoc.solve_weights([(-0.05, 10.0)], 0.1), ValueError, "snapshot #0"),
        (lambda: posthoc.solve_weights([(0.05, 0.0)], 0.1), ValueError, "snapshot #0's time"),
        (lambda: posthoc.solve_weights([(0.05, float("nan"))], 0.1), ValueError, "finite"),
        (lambda: posthoc.solve_weights([0.05], 0.1), TypeError, r"\(profile, t\) pair"),
        (lambda: posthoc.solve_weights([("x", 1.0)], 0.1), TypeError, "PowerFunction or a"),
        (lambda: posthoc.solve_weights(SNAPS, 0.1, t_eval=50.0), ValueError, "at or before"),
        (lambda: posthoc.solve_weights(SNAPS, 0.1, t_eval=-1), ValueError, "t_eval"),
        (lambda: posthoc.profile_error(SNAPS, [1.0], 0.1), ValueError, "one entry per snapshot"),
        (lambda: posthoc.response(1.0, -0.5, 1.0), ValueError, "gamma must be finite and >= 0"),
        (lambda: posthoc.correlation(1.0, 0.0, 1.0, 1.0), ValueError, "t_a must be finite"),
        (lambda: posthoc.synthesize([], []), ValueError, "no snapshots"),
        (lambda: posthoc.synthesize([{"w": np.ones(1)}], [1.0, 2.0]), ValueError, "2 weights"),
        (lambda: posthoc.synthesize([{"w": np.ones(1)}], [0.0]), ValueError, "every weight"),
        (lambda: posthoc.synthesize([{"w": np.ones(1)}], [np.nan]), ValueError, "finite"),
        (lambda: posthoc.synthesize({"w": np.ones(1)}, [1.0]), TypeError, "one entry per"),
        (lambda: posthoc.synthesize([{"w": 1.0}], [1.0]), LeafDTypeError, "'w' is a float"),
    ],
)
def test_bad_input_says_what_is_wrong(call: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()


def test_mismatched_snapshots_name_the_leaves() -> None:
    a = {"w": np.ones(2), "b": np.ones(1)}
    with pytest.raises(StructureError, match=r"snapshot #1.*missing leaves \['b'\].*\['c'\]"):
        posthoc.synthesize([a, {"w": np.ones(2), "c": np.ones(1)}], [0.5, 0.5])
    with pytest.raises(LeafMismatchError, match=r"'w' has shape \(3,\) in snapshot #1, \(2,\)"):
        posthoc.synthesize([a, {"w": np.ones(3), "b": np.ones(1)}], [0.5, 0.5])
    with pytest.raises(LeafMismatchError, match="'b' is float32 in snapshot #1, float64"):
        posthoc.synthesize([a, {"w": np.ones(2), "b": np.ones(1, np.float32)}], [0.5, 0.5])
    with pytest.raises(StructureError, match="different containers"):
        posthoc.synthesize([[np.ones(1)], (np.ones(1),)], [0.5, 0.5])
    debiased = {
        "format": STATE_FORMAT,
        "zero_debias": True,
        "leaves": {"w": {"shadow": np.ones(1), "decay_product": 0.5}},
        "copies": {},
    }
    with pytest.raises(ValueError, match="zero-debiased"):
        posthoc.synthesize([debiased], [1.0])


def test_bad_snapshot_files(tmp_path: Path) -> None:
    params = {"w": np.ones(2)}
    plain = emacore.ExponentialMovingAverage(0.99)
    plain.apply(params)
    with pytest.raises(ValueError, match="not a PowerFunction"):
        posthoc.save_snapshot(plain, tmp_path / "x.safetensors", t=1)
    emacore.save(plain, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not saved from a power-function EMA"):
        posthoc.read_snapshots([tmp_path / "plain.safetensors"], times=[1])
    ema = emacore.ExponentialMovingAverage(PowerFunction(sigma_rel=0.1))
    ema.apply(params)
    with pytest.raises(ValueError, match="t must be finite and > 0"):
        posthoc.save_snapshot(ema, tmp_path / "x.safetensors", t=0)
    with pytest.raises(ValueError, match="reserved"):
        posthoc.save_snapshot(ema, tmp_path / "x.safetensors", t=1, metadata={METADATA: ""})
    posthoc.save_snapshot(ema, tmp_path / "a.safetensors", t=1)
    other = emacore.ExponentialMovingAverage(PowerFunction(sigma_rel=0.05))
    other.apply({"v": np.ones(2)})
    posthoc.save_snapshot(other, tmp_path / "b.safetensors", t=1)
    with pytest.raises(StructureError, match="does not hold the leaves"):
        posthoc.reconstruct([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], 0.07)
    with pytest.raises(StructureError, match="like= does not name"):
        posthoc.reconstruct([tmp_path / "a.safetensors"], 0.1, like={"v": np.ones(2)})
    with pytest.raises(ValueError, match="no snapshot files"):
        posthoc.reconstruct([], 0.1)
    with pytest.raises(ValueError, match="1 times for 2 files"):
        posthoc.read_snapshots([tmp_path / "a.safetensors"] * 2, times=[1])
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(emacore.checkpoint.CheckpointError):
        posthoc.read_snapshots([tmp_path / "junk.safetensors"])
