"""timm's ``timm/utils/model_ema.py``, for the peer tests and the schedule fixture generator.

That file needs nothing but torch, but ``import timm`` also imports torchvision, and PyPI's
torchvision does not load beside this machine's CPU torch: then the file is loaded by its path.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from pathlib import Path
from types import ModuleType


@functools.cache
def load() -> ModuleType:
    """The ``timm.utils.model_ema`` module (``ModelEmaV3`` and its kin)."""
    try:
        return importlib.import_module("timm.utils.model_ema")
    except ImportError:
        pass
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("timm is not installed (nox -s peers installs it)")
    path = Path(next(iter(spec.submodule_search_locations)), "utils", "model_ema.py")
    file_spec = importlib.util.spec_from_file_location("_emacore_peer_timm_model_ema", path)
    if file_spec is None or file_spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module
