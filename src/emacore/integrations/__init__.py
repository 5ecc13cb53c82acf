"""Thin adapters between emacore and the libraries training loops are built on.

Import each module explicitly (``from emacore.integrations.lightning import EMACallback``):
``optax`` (a ``GradientTransformation``), ``lightning`` (a PyTorch Lightning callback) and
``keras`` (a Keras 3 callback). Each imports its framework on first use, so importing them,
like ``import emacore``, loads no framework.
"""
