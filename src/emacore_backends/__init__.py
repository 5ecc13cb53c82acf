"""emacore's built-in framework backends: numpy, torch and jax.

Each lives in a module of the same name, and the three mirror each other name for name, so
``diff numpy.py torch.py`` shows only what truly differs. None is imported until an array of
its library is first seen (see `emacore_backends._builtin`).
"""
