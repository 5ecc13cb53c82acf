"""The parts of benchmarks/gpu_check.sh that are not pytest or the benchmark scripts.

``python benchmarks/gpu_check.py PART --device cpu|cuda`` prints a markdown section and exits 1
when a check fails (numbers that differ, an offloaded shadow that is not pinned), 0 otherwise.
Parts:

- ``device``: the device's name, the libraries' versions, and the device-to-device copy
  bandwidth (a large ``b.copy_(a)``, bytes read plus bytes written over the median time);
- ``side-stream``: ``EMA(side_stream=True)`` against the plain EMA on the same training steps
  (the averages must be equal, bit for bit), then the time of an update followed by a forward
  pass, with and without the side stream: what the side stream saves is the update time hidden
  behind the forward pass. On CPU (no streams) the protocol runs on the recorded streams of
  tests/torch/recorded_streams.py: the numbers are checked, the times overlap nothing;
- ``offload``: ``EMA(device="cpu")`` over parameters on the device against the EMA kept on the
  device and against float64 math (within float32 rounding: the offloaded update runs on the
  CPU), the shadows in pinned memory (CUDA), and the time per step of each;
- ``cupy``: CuPy arrays through emacore's portable array-API backend against the numpy backend
  on the same values. Without CuPy it says so and exits 0; with ``--device cpu`` it then runs
  the same comparison with array_api_strict, to check the part itself.

Run from the repository root with ``PYTHONPATH=src:benchmarks`` (gpu_check.sh sets it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import emacore

DECAY = 0.9


def _sync(device: str) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _median_time(fn: Callable[[], Any], sync: Callable[[], None], inner: int, repeat: int) -> float:
    """Median over ``repeat`` samples of the mean time of ``inner`` calls (device waited for)."""
    samples = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def device_part(device: str, repeat: int) -> int:
    import torch

    lines = ["## Device", ""]
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        lines.append(
            f"- torch {torch.__version__} (CUDA {torch.version.cuda}): {props.name}, "
            f"{props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs"
        )
        nbytes = 1 << 30
    else:
        lines.append(f"- torch {torch.__version__}: CPU ({torch.get_num_threads()} threads)")
        nbytes = 64 << 20
    try:
        import jax

        lines.append(f"- jax {jax.__version__}: {', '.join(map(str, jax.devices()))}")
    except Exception as exc:  # reported, not fatal: the jax parts fail on their own
        lines.append(f"- jax: not importable ({exc!r})")
    try:
        import cupy

        lines.append(f"- cupy {cupy.__version__}")
    except Exception as exc:
        lines.append(f"- cupy: not importable ({type(exc).__name__}: {exc})")
    a = torch.rand(nbytes // 4, device=device)
    b = torch.empty_like(a)
    sync = _sync(device)
    for _ in range(3):
        b.copy_(a)
    t = _median_time(lambda: b.copy_(a), sync, inner=10, repeat=max(repeat, 3))
    assert torch.equal(a, b)
    lines.append(
        f"- device-to-device copy: {nbytes / 2**20:.0f} MiB in {t * 1e3:.3f} ms, "
        f"**{2 * nbytes / t / 1e9:.0f} GB/s** counting bytes read and written (median of "
        f"{max(repeat, 3)} samples of 10 copies); the benchmarks' `x copy` columns use their "
        "own copy baseline, of each set's size, measured beside the methods"
    )
    print("\n".join(lines) + "\n")
    return 0


def _linear_stack(device: str, width: int, depth: int) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers).to(device)


def _train_both(model: Any, emas: list[emacore.EMA], device: str, steps: int, width: int) -> None:
    import torch

    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    gen = torch.Generator(device=device).manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, width, device=device, generator=gen)
        model(x).square().mean().backward()
        opt.step()  # emacore's pre-hook makes it wait for a side-stream update in flight
        opt.zero_grad()
        for ema in emas:
            ema.apply(model)


def _stand_in_streams() -> str:
    """On CPU: the recorded streams of the tests, and a check that asks for one device."""
    import torch

    from emacore_backends import torch as torch_backend

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "torch"))
    import recorded_streams

    def check(self: Any, params: Any) -> None:
        devices = {p.device for p in params}
        if devices != {torch.device("cpu")}:
            raise ValueError(f"stand-in: one CPU device expected, got {devices}")

    torch_backend.STREAMS = recorded_streams.Recorder()
    torch_backend.TorchBackend.check_side_stream = check  # type: ignore[method-assign]
    return (
        "CPU stand-in: tests/torch/recorded_streams.py records the stream calls and runs "
        "everything at once on one thread; the numbers are checked, the times hide nothing"
    )


def side_stream_part(device: str, repeat: int) -> int:
    import torch

    width, depth, batch = (4096, 8, 512) if device == "cuda" else (256, 4, 64)
    note = _stand_in_streams() if device == "cpu" else "real CUDA streams"
    model = _linear_stack(device, width, depth)
    n_params = sum(p.numel() for p in model.parameters())
    side, plain = emacore.EMA(DECAY, side_stream=True), emacore.EMA(DECAY)
    _train_both(model, [side, plain], device, steps=10, width=width)
    want, got = plain.average(model), side.average(model)
    diff = max(float((got[k] - want[k]).abs().max()) for k in want)
    equal = all(torch.equal(got[k], want[k]) for k in want)

    sync = _sync(device)
    x = torch.randn(batch, width, device=device)

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def update_plain() -> None:
        plain.apply(model)

    def plain_then_forward() -> None:
        plain.apply(model)
        forward()

    def side_then_forward() -> None:
        side.apply(model)
        forward()

    contenders = {
        "update alone (plain)": update_plain,
        "forward alone": forward,
        "plain update, then forward": plain_then_forward,
        "side-stream update, then forward": side_then_forward,
    }
    for fn in contenders.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(repeat):  # interleaved
        for label, fn in contenders.items():
            times[label].append(_median_time(fn, sync, inner=5, repeat=1))
    med = {k: statistics.median(v) for k, v in times.items()}
    update = med["update alone (plain)"]
    hidden = med["plain update, then forward"] - med["side-stream update, then forward"]
    lines = [
        "## side_stream=True",
        "",
        f"- {note}; model: {depth} x Linear({width}, {width}), {n_params:,} float32 "
        f"parameters; forward on a batch of {batch}",
        f"- averages after 10 SGD steps, side stream vs plain: "
        f"{'**equal, bit for bit**' if equal else f'**DIFFER** (max abs diff {diff:.3g})'}",
        "",
        "| step | median ms |",
        "|---|---:|",
        *(f"| {k} | {v * 1e3:.3f} |" for k, v in med.items()),
        "",
        (
            f"- update time hidden behind the forward pass: {hidden * 1e3:.3f} ms of "
            f"{update * 1e3:.3f} ms ({hidden / update:.0%})"
            if device == "cuda"
            else "- update time hidden behind the forward pass: n/a (nothing overlaps on CPU)"
        )
        + f"; median of {repeat} interleaved samples of 5 steps each",
        "",
    ]
    print("\n".join(lines))
    return 0 if equal else 1


def offload_part(device: str, repeat: int) -> int:
    import torch

    width, depth = (4096, 4) if device == "cuda" else (256, 4)
    model = _linear_stack(device, width, depth)
    start = {k: v.detach().double().cpu() for k, v in model.state_dict().items()}
    n_params = sum(p.numel() for p in model.parameters())
    on_device, offloaded = emacore.EMA(DECAY), emacore.EMA(DECAY, device="cpu")
    seen = [start]
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    gen = torch.Generator(device=device).manual_seed(2)
    on_device.apply(model)
    offloaded.apply(model)
    for _ in range(5):
        model(torch.randn(32, width, device=device, generator=gen)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        on_device.apply(model)
        offloaded.apply(model)
        seen.append({k: v.detach().double().cpu() for k, v in model.state_dict().items()})
    ref = seen[0]
    for step in seen[1:]:
        ref = {k: DECAY * ref[k] + (1 - DECAY) * step[k] for k in ref}
    got, dev = offloaded.average(model), on_device.average(model)
    where = {v.device.type for v in got.values()}
    pinned = all(v.is_pinned() for v in got.values()) if device == "cuda" else None
    vs_ref = max(
        float(((got[k].double() - ref[k]).abs() / ref[k].abs().clamp_min(1e-3)).max()) for k in ref
    )
    vs_dev = max(float((got[k] - dev[k].cpu()).abs().max()) for k in ref)
    close = all(torch.allclose(got[k].double(), ref[k], rtol=1e-5, atol=1e-6) for k in ref) and all(
        torch.allclose(got[k], dev[k].cpu(), rtol=1e-6, atol=1e-7) for k in ref
    )
    ok = close and where == {"cpu"} and pinned is not False

    sync = _sync(device)
    steps = {
        "EMA on the device": lambda: on_device.apply(model),
        'EMA(device="cpu"), offloaded': lambda: offloaded.apply(model),
    }
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeat):
        for label, fn in steps.items():
            times[label].append(_median_time(fn, sync, inner=3, repeat=1))
    lines = [
        "## Offload to CPU memory",
        "",
        f"- model: {depth} x Linear({width}, {width}) on {device}, {n_params:,} float32 "
        "parameters; 5 SGD steps",
        f"- offloaded averages on {sorted(where)}; pinned: "
        f"{'n/a on CPU' if pinned is None else pinned}",
        f"- against float64 math: max relative error {vs_ref:.2g}; against the EMA kept on the "
        f"device: max abs diff {vs_dev:.2g} (float32 arithmetic on another processor); "
        f"{'**within float32 rounding**' if close else '**NOT within float32 rounding**'}",
        "",
        "| update | median ms per step |",
        "|---|---:|",
        *(f"| {k} | {statistics.median(v) * 1e3:.3f} |" for k, v in times.items()),
        "",
    ]
    print("\n".join(lines))
    return 0 if ok else 1


def cupy_part(device: str, repeat: int) -> int:
    try:
        import cupy as xp

        name = f"cupy {xp.__version__}"
        to_numpy: Callable[[Any], np.ndarray] = xp.asnumpy
    except Exception as exc:
        skipped = f"cupy is not importable here ({type(exc).__name__}: {exc}): part skipped"
        if device != "cpu":
            print(f"## CuPy through the array-API backend\n\n- {skipped}\n")
            return 0
        import array_api_strict as xp

        name = f"array_api_strict {xp.__version__}, standing in on CPU ({skipped})"
        cpu = xp.__array_namespace_info__().default_device()

        def to_numpy(x: Any) -> np.ndarray:
            return np.asarray(x.to_device(cpu))

    from emacore import _plugins  # private: which backend handles an array

    rng = np.random.default_rng(3)
    shapes = {"w": (512, 300), "b": (300,), "small": (7,)}
    steps = [
        {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(6)
    ]
    portable, numpy_ema = emacore.EMA(DECAY), emacore.EMA(DECAY)
    for step in steps:
        arrays = {k: xp.asarray(v) for k, v in step.items()}
        portable.apply(arrays)
        numpy_ema.apply(step)
    backend = _plugins.resolve(arrays["w"]).name
    got, want = portable.average(arrays), numpy_ema.average(steps[-1])
    kinds = {type(v).__module__.split(".")[0] for v in got.values()}
    diff = max(float(np.abs(to_numpy(got[k]) - want[k]).max()) for k in want)
    exact = all(np.array_equal(to_numpy(got[k]), want[k]) for k in want)
    close = all(np.allclose(to_numpy(got[k]), want[k], rtol=1e-6, atol=1e-7) for k in want)
    ok = close and backend == "array_api" and kinds == {xp.__name__.split(".")[0]}
    verdict = "equal, bit for bit" if exact else f"within float32 rounding (max {diff:.2g})"
    print(
        "\n".join(
            [
                "## CuPy through the array-API backend",
                "",
                f"- {name}: backend {backend!r}; averages are {sorted(kinds)} arrays",
                f"- against the numpy backend on the same values (6 steps, decay {DECAY}): "
                f"{'**' + verdict + '**' if close else f'**DIFFER** (max abs diff {diff:.3g})'}",
                "",
            ]
        )
    )
    return 0 if ok else 1


PARTS = {
    "device": device_part,
    "side-stream": side_stream_part,
    "offload": offload_part,
    "cupy": cupy_part,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("part", choices=list(PARTS))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--repeat", type=int, default=15, help="timed samples per contender")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print(f"## {args.part}\n\n- **FAILED**: --device cuda, but torch sees no CUDA device\n")
            return 1
    return PARTS[args.part](args.device, args.repeat)


if __name__ == "__main__":
    sys.exit(main())
