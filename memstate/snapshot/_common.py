"""Names shared by every module of the snapshot package: the error type, the arena alignment,
the file format's identity, and one captured tensor's entry (name, dtype, shape, device, offset
and byte count in its arena)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

FORMAT = "memstate-snapshot"
FORMAT_VERSION = 1
DIST_FORMAT = "memstate-distributed-snapshot"  # the global manifest of per-rank snapshots (_dist)
DIST_FORMAT_VERSION = 1
ALIGN = 64  # bytes: every tensor starts on a 64-byte boundary of its arena


class SnapshotError(ValueError):
    """A snapshot file or binding is invalid: corrupt, truncated, tampered or mismatched."""


@dataclass
class _Entry:
    name: str
    dtype: torch.dtype
    shape: Tuple[int, ...]
    device: torch.device
    offset: int  # in the arena of its device
    nbytes: int
    in_state: bool = True  # part of fingerprint() / fingerprint_state of the live objects


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_from_name(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise SnapshotError(f"unknown dtype {name!r} in snapshot")
    return dt


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _bytes_view(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's bytes."""
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8, device=t.device)


def _check_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.layout != torch.strided or t.is_meta or t.is_nested or t.is_quantized:
        raise TypeError(f"{name}: only dense strided tensors can be snapshotted (got layout {t.layout})")
    return t.detach()


def _typed(raw: torch.Tensor, e: _Entry) -> torch.Tensor:
    if e.nbytes == 0:
        return torch.empty(e.shape, dtype=e.dtype, device=raw.device)
    return raw.view(e.dtype).reshape(e.shape)

