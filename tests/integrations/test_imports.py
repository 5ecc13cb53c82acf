"""The adapters import their framework when a callback is created, never at import (runs in
every session, with or without the frameworks installed)."""

from __future__ import annotations

import subprocess
import sys

FRAMEWORKS = ("numpy", "torch", "jax", "keras", "lightning", "pytorch_lightning", "optax")


def _run(code: str) -> str:
    env = {"EMACORE_DISABLE_PLUGIN_AUTOLOAD": "1", "PATH": ""}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_importing_the_adapters_imports_no_framework() -> None:
    code = (
        "import sys, emacore\n"
        "import emacore.integrations.lightning, emacore.integrations.keras\n"
        "from emacore.integrations.lightning import EMACallback as L\n"
        "from emacore.integrations.keras import EMACallback as K\n"
        f"print(','.join(m for m in {FRAMEWORKS!r} if m in sys.modules))\n"
    )
    assert _run(code) == ""


def test_a_callback_without_its_framework_says_what_to_install() -> None:
    # None in sys.modules makes the import fail, as if the package were not installed
    code = (
        "import sys\n"
        "for m in ('lightning', 'lightning.pytorch', 'pytorch_lightning', 'keras'):\n"
        "    sys.modules[m] = None\n"
        "from emacore.integrations import keras, lightning\n"
        "for module in (lightning, keras):\n"
        "    try:\n"
        "        module.EMACallback(0.9)\n"
        "    except ImportError as error:\n"
        "        print(error)\n"
    )
    lines = _run(code).splitlines()
    assert len(lines) == 2
    assert "pip install lightning" in lines[0]
    assert "pip install keras" in lines[1]
