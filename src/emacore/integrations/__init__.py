"""Thin adapters between emacore and the libraries training loops are built on.

Each module imports its library at module level, so import it explicitly
(``from emacore.integrations import optax as ema_optax``); ``import emacore`` loads none.
"""
