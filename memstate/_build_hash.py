"""Hash of the native sources, shared by setup.py (baked into the build) and memstate._ext
(compared at import, so a stale build is detected in a source checkout).

Pure Python with no imports from the package: setup.py loads this file by path.
"""
from __future__ import annotations

import hashlib
import os

SOURCE_SUFFIXES = (".h", ".cpp", ".cu", ".cuh")


def source_hash(csrc_dir: str, suffixes=SOURCE_SUFFIXES) -> str:
    """sha256 (first 16 hex digits) over the relative paths and bytes of every source file
    under ``csrc_dir`` whose name ends with one of ``suffixes`` (default: the native sources;
    memstate.card hashes the package's own ``.py`` files the same way)."""
    h = hashlib.sha256()
    paths = []
    for root, _dirs, files in os.walk(csrc_dir):
        for name in files:
            if name.endswith(tuple(suffixes)):
                paths.append(os.path.join(root, name))
    for path in sorted(paths, key=lambda p: os.path.relpath(p, csrc_dir).replace(os.sep, "/")):
        rel = os.path.relpath(path, csrc_dir).replace(os.sep, "/")
        h.update(rel.encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
        h.update(b"\0")
    return h.hexdigest()[:16]
