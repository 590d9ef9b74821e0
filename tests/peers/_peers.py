"""Importing a peer library for a test module: skip the module when the peer does not import
(the main CI venv has none; a torchvision wheel built for another torch raises RuntimeError,
not ImportError, so ``pytest.importorskip`` is not enough), or fail the run when
``FASTSSL_REQUIRE_PEERS=1`` (the peer stage of ``.ci/run``), so that a broken install
cannot pass as a run of skipped tests."""
import importlib
import os

import pytest

REQUIRED = os.environ.get("FASTSSL_REQUIRE_PEERS") == "1"


def need(*names):
    """The modules ``names``, imported; skips the calling test module when one fails."""
    mods = []
    for name in names:
        try:
            mods.append(importlib.import_module(name))
        except Exception as e:  # ImportError, or a wheel that does not load (RuntimeError)
            if REQUIRED:
                raise RuntimeError(f"FASTSSL_REQUIRE_PEERS=1 but {name} does not import: "
                                   f"{type(e).__name__}: {e}") from e
            pytest.skip(f"{name} does not import ({type(e).__name__}: {str(e)[:100]})",
                        allow_module_level=True)
    return mods[0] if len(mods) == 1 else mods


def rel(x, ref):
    """||x - ref|| / ||ref||, in float64 (the norm of ref at least the smallest normal)."""
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm() / ref.norm().clamp_min(2.2e-308))
