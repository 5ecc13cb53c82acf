"""Raw weights vs their exponential moving average, on a small MLP trained with noisy SGD.

The demo trains a 64-64-10 tanh MLP on scikit-learn's bundled 8x8 digits data set (1,797
images, shipped with scikit-learn, so nothing is downloaded) with plain minibatch SGD: a high
learning rate, a small batch and a little L2 weight decay (so the per-example gradients never
vanish). Such SGD is noisy: the raw weights jitter around a good solution instead of settling
into it. An :class:`emacore.ExponentialMovingAverage` of the weights averages that jitter out,
and in later epochs its validation loss is lower than the raw weights' loss.

Each epoch the demo prints the validation loss and accuracy of the raw and the EMA weights, and at
the end writes ``<out>/demo.png`` with both curves.

The EMA is TensorFlow's: ``ExponentialMovingAverage(decay, num_updates=...)``. Passing
``num_updates`` (here a callable returning the step counter) gives TF's warm-up: the decay used
by each update is ``min(decay, (1 + n) / (10 + n))``, so the average follows the fast-moving
weights of the first steps closely and only reaches the full ``decay`` of 0.995 after about
1,800 steps (12 epochs here), instead of remembering the random initial weights for long.

The math is written once against the array API (through ``array_api_compat``) with hand-written
backpropagation, so the same code runs on numpy, torch or jax arrays with no autograd::

    python examples/demo.py                    # numpy
    python examples/demo.py --backend torch    # needs: pip install 'emacore[torch]'
    python examples/demo.py --backend jax      # needs: pip install 'emacore[jax]'
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from array_api_compat import array_namespace

import emacore

Array = Any
Params = dict[str, Array]

BACKENDS = ("numpy", "torch", "jax")
HIDDEN = 64
CLASSES = 10
LEARNING_RATE = 0.7
BATCH_SIZE = 8
WEIGHT_DECAY = 1e-3  # L2 on the weights keeps per-example gradients, hence SGD noise, alive
DECAY = 0.995
VALIDATION_FRACTION = 0.3


# -- data and arrays -------------------------------------------------------------------------


def converter(backend: str) -> Callable[[np.ndarray], Array]:
    """Return a function turning a numpy array into an array of ``backend`` (on the CPU)."""
    if backend == "numpy":
        return np.asarray
    if backend == "torch":
        try:
            import torch
        except ImportError:
            sys.exit("torch is not installed: pip install 'emacore[torch]'")
        return lambda a: torch.from_numpy(np.ascontiguousarray(a))
    if backend == "jax":
        try:
            import jax.numpy as jnp
        except ImportError:
            sys.exit("jax is not installed: pip install 'emacore[jax]'")
        return lambda a: jnp.asarray(a)
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


def load_digits_split(
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``x_train, y_train, x_val, y_val``: pixels scaled to [0, 1], labels as int64."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("scikit-learn is not installed: pip install scikit-learn")
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = rng.permutation(len(y))
    n_val = int(len(y) * VALIDATION_FRACTION)
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


def init_params(rng: np.random.Generator, to_array: Callable[[np.ndarray], Array]) -> Params:
    """Return Glorot-uniform weights and zero biases for the 64-64-10 MLP."""

    def glorot(fan_in: int, fan_out: int) -> np.ndarray:
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, (fan_in, fan_out)).astype(np.float32)

    n_in = 64
    return {
        "W1": to_array(glorot(n_in, HIDDEN)),
        "b1": to_array(np.zeros(HIDDEN, np.float32)),
        "W2": to_array(glorot(HIDDEN, CLASSES)),
        "b2": to_array(np.zeros(CLASSES, np.float32)),
    }


# -- the model, written against the array API ------------------------------------------------


def forward(params: Params, x: Array) -> tuple[Array, Array]:
    """Return the hidden activations and the class probabilities for the batch ``x``."""
    xp = array_namespace(x)
    h = xp.tanh(x @ params["W1"] + params["b1"])
    logits = h @ params["W2"] + params["b2"]
    logits = logits - xp.max(logits, axis=1, keepdims=True)
    e = xp.exp(logits)
    return h, e / xp.sum(e, axis=1, keepdims=True)


def one_hot(y: Array, xp: Any, dtype: Any) -> Array:
    """Return the ``(n, CLASSES)`` one-hot encoding of the integer labels ``y``."""
    return xp.astype(y[:, None] == xp.arange(CLASSES)[None, :], dtype)


def loss_and_grads(params: Params, x: Array, y: Array) -> tuple[float, Params]:
    """Return the batch's mean cross-entropy and the gradient of it plus the L2 penalty.

    The gradient is written out by hand (backpropagation through softmax, the output layer and
    tanh), so no autograd framework is needed. The penalty is ``WEIGHT_DECAY / 2 * |W|²`` on
    both weight matrices, not on the biases; the returned loss is the cross-entropy alone.
    """
    xp = array_namespace(x)
    h, probs = forward(params, x)
    target = one_hot(y, xp, probs.dtype)
    loss = -xp.mean(xp.sum(target * xp.log(probs + 1e-12), axis=1))
    dlogits = (probs - target) / x.shape[0]
    dh = (dlogits @ xp.matrix_transpose(params["W2"])) * (1.0 - h * h)
    grads = {
        "W2": xp.matrix_transpose(h) @ dlogits + WEIGHT_DECAY * params["W2"],
        "b2": xp.sum(dlogits, axis=0),
        "W1": xp.matrix_transpose(x) @ dh + WEIGHT_DECAY * params["W1"],
        "b1": xp.sum(dh, axis=0),
    }
    return float(loss), grads


def evaluate(params: Params, x: Array, y: Array) -> tuple[float, float]:
    """Return the mean cross-entropy and the accuracy of ``params`` on ``(x, y)``."""
    xp = array_namespace(x)
    _, probs = forward(params, x)
    target = one_hot(y, xp, probs.dtype)
    loss = -xp.mean(xp.sum(target * xp.log(probs + 1e-12), axis=1))
    accuracy = xp.mean(xp.astype(xp.argmax(probs, axis=1) == y, probs.dtype))
    return float(loss), float(accuracy)


# -- training --------------------------------------------------------------------------------


def train(backend: str, epochs: int, seed: int) -> dict[str, list[float]]:
    """Train with SGD while keeping an EMA; print one row per epoch and return the curves."""
    to_array = converter(backend)
    rng = np.random.default_rng(seed)
    x_train, y_train, x_val_np, y_val_np = load_digits_split(rng)
    x_val, y_val = to_array(x_val_np), to_array(y_val_np)
    params = init_params(rng, to_array)

    step = 0
    ema = emacore.ExponentialMovingAverage(decay=DECAY, num_updates=lambda: step)
    ema.apply(params)  # creates the shadows: copies of the initial weights

    print(
        f"digits: {len(y_train)} train / {len(y_val_np)} validation images; "
        f"MLP 64-{HIDDEN}-{CLASSES} (tanh)\nSGD lr={LEARNING_RATE}, batch={BATCH_SIZE}, "
        f"weight decay={WEIGHT_DECAY}; EMA decay={DECAY} with TF warm-up; "
        f"backend={backend}, seed={seed}\n"
    )
    header = (
        f"{'epoch':>5}  {'step':>5}  {'train loss':>10}  |  {'raw loss':>8}  {'EMA loss':>8}  |  "
        f"{'raw acc':>7}  {'EMA acc':>7}"
    )
    print(f"{'':29}{'validation loss':^18}{'':5}{'validation acc.':^16}".rstrip())
    print(header)
    print("-" * len(header))

    curves: dict[str, list[float]] = {k: [] for k in ("raw_loss", "ema_loss", "raw_acc", "ema_acc")}
    n_train = len(y_train)
    for epoch in range(1, epochs + 1):
        order = rng.permutation(n_train)
        train_losses: list[float] = []
        for start in range(0, n_train - BATCH_SIZE + 1, BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            xb, yb = to_array(x_train[batch]), to_array(y_train[batch])
            loss, grads = loss_and_grads(params, xb, yb)
            train_losses.append(loss)
            for k in params:
                params[k] = params[k] - LEARNING_RATE * grads[k]
            step += 1
            ema.apply(params)

        raw_loss, raw_acc = evaluate(params, x_val, y_val)
        ema_loss, ema_acc = evaluate(ema.average(params), x_val, y_val)
        for key, value in zip(curves, (raw_loss, ema_loss, raw_acc, ema_acc), strict=True):
            curves[key].append(value)
        print(
            f"{epoch:>5}  {step:>5}  {np.mean(train_losses):>10.4f}  |  "
            f"{raw_loss:>8.4f}  {ema_loss:>8.4f}  |  {raw_acc:>7.2%}  {ema_acc:>7.2%}"
        )
    return curves


def plot(curves: dict[str, list[float]], path: Path, backend: str) -> None:
    """Write a two-panel PNG: validation loss and accuracy per epoch, raw vs EMA."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = range(1, len(curves["raw_loss"]) + 1)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    styles: dict[str, dict[str, Any]] = {
        "raw": {"color": "tab:gray", "marker": "o", "ms": 3, "lw": 1.2, "alpha": 0.8},
        "ema": {"color": "tab:blue", "marker": "s", "ms": 3, "lw": 2.0},
    }
    labels = {"raw": "raw weights", "ema": f"EMA of the weights (decay {DECAY})"}
    for kind in ("raw", "ema"):
        ax_loss.plot(epochs, curves[f"{kind}_loss"], label=labels[kind], **styles[kind])
        acc = [100 * a for a in curves[f"{kind}_acc"]]
        ax_acc.plot(epochs, acc, label=labels[kind], **styles[kind])
    ax_loss.set(title="Validation loss (lower is better)", xlabel="epoch", ylabel="cross-entropy")
    ax_acc.set(
        title="Validation accuracy (higher is better)", xlabel="epoch", ylabel="accuracy (%)"
    )
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"Digits, 64-{HIDDEN}-{CLASSES} tanh MLP, noisy SGD (lr {LEARNING_RATE}, batch "
        f"{BATCH_SIZE}, weight decay {WEIGHT_DECAY}): raw vs EMA weights [{backend}]"
    )
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS, default="numpy", help="array library")
    parser.add_argument("--epochs", type=int, default=25, help="training epochs (default 25)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--out", type=Path, default=Path("demo-output"), help="output folder (default demo-output)"
    )
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    try:
        import matplotlib  # noqa: F401  (fail before training, not after)
    except ImportError:
        sys.exit("matplotlib is not installed: pip install matplotlib")

    t0 = time.perf_counter()
    curves = train(args.backend, args.epochs, args.seed)
    os.makedirs(args.out, exist_ok=True)
    png = args.out / "demo.png"
    plot(curves, png, args.backend)
    print(
        f"final (epoch {args.epochs}): val loss raw {curves['raw_loss'][-1]:.4f} vs EMA "
        f"{curves['ema_loss'][-1]:.4f}; val acc raw {curves['raw_acc'][-1]:.2%} vs EMA "
        f"{curves['ema_acc'][-1]:.2%}; plot: {png} ({time.perf_counter() - t0:.1f} s)"
    )


if __name__ == "__main__":
    main()
