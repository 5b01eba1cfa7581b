"""Loads the native extension memstate._C on first use, with errors that say how to build it.

The ops live in ``torch.ops.memstate`` once ``memstate._C`` is imported. In a source checkout
the build is also checked against the sources: a build of other sources is "stale".
"""
from __future__ import annotations

import os
from typing import Any, Optional

_BUILD_HINT = (
    "build it from the repository root with:\n"
    "    pip install -r requirements.txt && pip install --no-build-isolation -e .\n"
    "(torch must be installed first; --no-build-isolation builds against that torch)"
)

_C: Optional[Any] = None


def _csrc_dir() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")


def load():
    """Returns the imported ``memstate._C`` module, raising ImportError if missing or stale."""
    global _C
    if _C is not None:
        return _C
    try:
        from memstate import _C as mod  # noqa: F401  (registers torch.ops.memstate.*)
    except ImportError as e:
        raise ImportError(f"memstate._C is not built ({e}); {_BUILD_HINT}") from e
    csrc = _csrc_dir()
    if os.path.isdir(csrc) and os.environ.get("MEMSTATE_SKIP_STALE_CHECK") != "1":
        from memstate._build_hash import source_hash

        built = mod.build_info().get("source_hash")
        current = source_hash(csrc)
        if built != current:
            raise ImportError(
                f"memstate._C is stale: it was built from sources {built}, but csrc/ is now "
                f"{current}; re{_BUILD_HINT}"
            )
    from memstate import _fake

    _fake.register()  # shapes for torch.compile / FakeTensor tracing
    _C = mod
    return mod


def ops():
    """``torch.ops.memstate`` with the native library loaded."""
    import torch

    load()
    return torch.ops.memstate


def build_info() -> dict:
    """The extension's build information, or {'built': False, 'error': ...} when unavailable."""
    try:
        info = dict(load().build_info())
        info["built"] = True
        return info
    except ImportError as e:
        return {"built": False, "error": str(e)}
