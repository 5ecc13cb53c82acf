"""Record the decays the real peer libraries use, for emacore's schedule tests.

Run with an environment that has ``torch==2.13.0``, ``timm==1.0.31``, ``torch-ema==0.3``,
``ema-pytorch==0.8.3`` and ``diffusers==0.42.1`` installed::

    python tests/parity/generate_schedule_fixtures.py --out tests/fixtures/schedule_fixtures.json

(``nox -s schedule_fixtures`` does exactly this, then runs tests/core/test_schedules.py.) The
output is deterministic: the same peer versions give the same file, byte for byte.

Every decay comes out of the peer's own code, driven the way a training loop drives it:

``torch_ema``
    ``ExponentialMovingAverage(params, decay, use_num_updates=True)``: ``update()`` increments
    ``num_updates`` and then uses ``min(decay, (1 + n) / (10 + n))``, but never exposes that
    decay. Its update is ``s -= (s - p) * (1.0 - decay)``, so with a float64 shadow set to 0
    and a parameter of 1 the shadow becomes ``1.0 - decay`` exactly (``-1 * c`` and ``0 - (-c)``
    are exact): the case records that, ``one_minus_decay``. Steps are ``num_updates`` after
    the increment (1 at the first update); the large ones are reached by setting
    ``num_updates = n - 1`` before an ``update()``.
``diffusers``
    ``EMAModel(params, **options)``: ``step()`` the first ``DRIVEN`` times, recording
    ``cur_decay_value`` after each (steps are ``optimization_step`` after its increment, 1 at
    the first ``step()``); then ``get_decay(n)``, the function ``step()`` calls, at ``LARGE``.
``timm``
    ``ModelEmaV3(model, **options)``: ``get_decay(step)``, the function ``update(model,
    step=step)`` calls, at steps ``0 .. DRIVEN`` and ``LARGE``. ``timm/utils/model_ema.py`` is
    loaded by its path when ``import timm`` fails (torchvision missing beside this torch).
``ema_pytorch``
    ``EMA(model, update_every=1, **options)``: ``update()`` ``DRIVEN`` times, recording
    ``get_current_decay()`` after each (what the update's lerp used, where it lerped); steps
    are ``self.step`` after the increment. Then ``self.step`` set to each of ``LARGE``.
    ema-pytorch computes the decay on a float32 tensor: its decays are float32 numbers.
``ema_pytorch_karras``
    ``KarrasEMA(model, update_every=1, gamma=... | sigma_rel=...)``: ``update()`` ``DRIVEN``
    times, recording ``beta`` (the decay ``update_moving_average`` uses) after each; steps
    are ``self.step`` after the increment. Then ``self.step`` set to each of ``LARGE``.
    Records ``gamma`` too (from ema-pytorch's ``sigma_rel_to_gamma`` where ``sigma_rel`` is
    given).

Output format (JSON; every float is a ``float.hex()`` string, so ``float.fromhex`` gives the
peer's Python float bit for bit)::

    {
      "generated_by": "tests/parity/generate_schedule_fixtures.py",
      "versions": {"python": ..., "numpy": ..., "torch": ..., "torch_ema": ..., "diffusers": ...,
                   "timm": ..., "ema_pytorch": ...},
      "cases": [
        {"id": "diffusers-default",       # unique
         "peer": "torch_ema" | "diffusers" | "timm" | "ema_pytorch" | "ema_pytorch_karras",
         "options": {...},                # the peer's constructor arguments (JSON values)
         "records": "decay" | "one_minus_decay",
         "steps": [1, 2, ...],            # the peer's own step numbers (see above)
         "values": [hex, ...],            # one per step
         "gamma": hex},                   # ema_pytorch_karras only
        ...
      ]
    }
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parents[1] / "peers"))  # the shared timm loader
import timm_model_ema

GENERATED_BY = "tests/parity/generate_schedule_fixtures.py"
DRIVEN = 60  # updates driven through the peer's own update path
LARGE = [100, 1000, 12345, 100_000, 1_000_000, 10_000_000]

# (id, peer options): each setting exercises the clamps, the delay, or the peer's defaults
TORCH_EMA = [("torch_ema-d0.6", {"decay": 0.6}), ("torch_ema-d0.9999", {"decay": 0.9999})]
DIFFUSERS = [
    ("diffusers-default", {}),
    ("diffusers-ramp-clamped", {"decay": 0.6, "min_decay": 0.3, "update_after_step": 3}),
    ("diffusers-warmup-default", {"use_ema_warmup": True}),
    (
        "diffusers-warmup-clamped",
        {
            "use_ema_warmup": True,
            "decay": 0.9,
            "min_decay": 0.6,
            "update_after_step": 3,
            "inv_gamma": 0.5,
            "power": 0.75,
        },
    ),
    ("diffusers-warmup-p0.75", {"use_ema_warmup": True, "power": 0.75, "decay": 0.999}),
]
TIMM = [
    ("timm-warmup-default", {"use_warmup": True}),
    (
        "timm-warmup-clamped",
        {
            "use_warmup": True,
            "decay": 0.9,
            "min_decay": 0.6,
            "update_after_step": 3,
            "warmup_gamma": 0.5,
            "warmup_power": 0.75,
        },
    ),
    (
        "timm-warmup-delayed",
        {"use_warmup": True, "decay": 0.999, "update_after_step": 10, "warmup_power": 0.75},
    ),
]
EMA_PYTORCH = [
    ("ema_pytorch-default", {"update_after_step": 100}),
    ("ema_pytorch-beta0.8", {"beta": 0.8, "update_after_step": 3}),
    (
        "ema_pytorch-clamped",
        {"beta": 0.9, "min_value": 0.6, "update_after_step": 3, "inv_gamma": 0.5, "power": 0.75},
    ),
]
KARRAS = [
    ("karras-gamma6.94", {"gamma": 6.94}),
    ("karras-gamma0", {"gamma": 0.0}),
    ("karras-sigma0.05", {"sigma_rel": 0.05}),
    ("karras-sigma0.1", {"sigma_rel": 0.1}),
    ("karras-sigma0.2", {"sigma_rel": 0.2}),
]


def _hex(values: list[float]) -> list[str]:
    return [float(v).hex() for v in values]


def _model(torch: Any) -> Any:
    torch.manual_seed(0)
    return torch.nn.Linear(2, 1)


def torch_ema_cases(torch: Any) -> list[dict[str, Any]]:
    ema_cls = importlib.import_module("torch_ema").ExponentialMovingAverage
    cases = []
    for cid, options in TORCH_EMA:
        param = torch.nn.Parameter(torch.ones((), dtype=torch.float64))
        peer = ema_cls([param], use_num_updates=True, **options)

        def probe(peer: Any = peer) -> float:
            peer.shadow_params[0].zero_()
            peer.update()
            return float(peer.shadow_params[0])  # 0 - (0 - 1) * (1.0 - decay) = 1.0 - decay

        steps, values = [], []
        for _ in range(DRIVEN):
            values.append(probe())
            steps.append(peer.num_updates)
        for n in LARGE:
            peer.num_updates = n - 1
            values.append(probe())
            steps.append(peer.num_updates)
        assert steps == list(range(1, DRIVEN + 1)) + LARGE
        cases.append(_case(cid, "torch_ema", options, "one_minus_decay", steps, values))
    return cases


def diffusers_cases(torch: Any) -> list[dict[str, Any]]:
    ema_cls = importlib.import_module("diffusers.training_utils").EMAModel
    cases = []
    for cid, options in DIFFUSERS:
        model = _model(torch)
        peer = ema_cls(model.parameters(), **options)
        steps, values = [], []
        for _ in range(DRIVEN):
            peer.step(model.parameters())
            steps.append(peer.optimization_step)
            values.append(float(peer.cur_decay_value))
        for n in LARGE:
            steps.append(n)
            values.append(float(peer.get_decay(n)))
        assert steps == list(range(1, DRIVEN + 1)) + LARGE
        cases.append(_case(cid, "diffusers", options, "decay", steps, values))
    return cases


def timm_cases(torch: Any) -> list[dict[str, Any]]:
    model_ema_v3 = timm_model_ema.load().ModelEmaV3
    cases = []
    for cid, options in TIMM:
        peer = model_ema_v3(_model(torch), **options)
        steps = list(range(DRIVEN + 1)) + LARGE
        values = [float(peer.get_decay(n)) for n in steps]
        cases.append(_case(cid, "timm", options, "decay", steps, values))
    return cases


def _drive(peer: Any, read: Callable[[], float]) -> tuple[list[int], list[float]]:
    """``update()`` DRIVEN times, then ``self.step`` set to each of LARGE; read after each."""
    steps, values = [], []
    for _ in range(DRIVEN):
        peer.update()
        steps.append(int(peer.step))
        values.append(float(read()))
    for n in LARGE:
        peer.step.fill_(n)
        steps.append(int(peer.step))
        values.append(float(read()))
    assert steps == list(range(1, DRIVEN + 1)) + LARGE
    return steps, values


def ema_pytorch_cases(torch: Any) -> list[dict[str, Any]]:
    ema_cls = importlib.import_module("ema_pytorch").EMA
    cases = []
    for cid, options in EMA_PYTORCH:
        peer = ema_cls(_model(torch), update_every=1, **options)
        steps, values = _drive(peer, peer.get_current_decay)
        cases.append(_case(cid, "ema_pytorch", options, "decay", steps, values))
    return cases


def karras_cases(torch: Any) -> list[dict[str, Any]]:
    karras_cls = importlib.import_module("ema_pytorch").KarrasEMA
    cases = []
    for cid, options in KARRAS:
        peer = karras_cls(_model(torch), update_every=1, **options)
        steps, values = _drive(peer, lambda peer=peer: peer.beta)
        case = _case(cid, "ema_pytorch_karras", options, "decay", steps, values)
        case["gamma"] = float(peer.gamma).hex()
        cases.append(case)
    return cases


def _case(
    cid: str,
    peer: str,
    options: dict[str, Any],
    records: str,
    steps: list[int],
    values: list[float],
) -> dict[str, Any]:
    assert len(steps) == len(values)
    return {
        "id": cid,
        "peer": peer,
        "options": options,
        "records": records,
        "steps": steps,
        "values": _hex(values),
    }


def build_cases() -> list[dict[str, Any]]:
    """Return every case record, in a fixed order."""
    torch = importlib.import_module("torch")
    torch.set_default_dtype(torch.float32)  # ema-pytorch's decay dtype follows it
    cases = [
        *torch_ema_cases(torch),
        *diffusers_cases(torch),
        *timm_cases(torch),
        *ema_pytorch_cases(torch),
        *karras_cases(torch),
    ]
    ids = [c["id"] for c in cases]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    return cases


def versions() -> dict[str, str]:
    dists = {
        "numpy": "numpy",
        "torch": "torch",
        "torch_ema": "torch-ema",
        "diffusers": "diffusers",
        "timm": "timm",
        "ema_pytorch": "ema-pytorch",
    }
    out = {"python": platform.python_version()}
    out.update({key: importlib.metadata.version(dist) for key, dist in dists.items()})
    return out


def dump(header: dict[str, Any], cases: list[dict[str, Any]]) -> str:
    """Serialise as JSON with one case per line (small, and readable in diffs)."""
    head = json.dumps(header, separators=(",", ": "))[:-1]
    body = ",\n".join(json.dumps(c, separators=(",", ":")) for c in cases)
    return f'{head}, "cases": [\n{body}\n]}}\n'


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the peers and write the fixture file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON")
    args = parser.parse_args(argv)
    cases = build_cases()
    header = {"generated_by": GENERATED_BY, "versions": versions()}
    text = dump(header, cases)
    json.loads(text)  # sanity: valid JSON
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {len(cases)} cases ({len(text.encode())} bytes) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
