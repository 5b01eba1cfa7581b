"""Pure numpy references of the msfp1 fingerprint (docs/fingerprint.md) and of the
deterministic norm sums (docs/optim.md).

Written straight from the spec, with no shared code with the native kernels, so that tests
comparing the two check the spec rather than one implementation against itself. Vectorised
with numpy's wrapping uint32/uint64 arithmetic; slow only in the sense of making temporaries.
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np

_M64 = (1 << 64) - 1

LANE_KEYS = (
    # (u multiplier, u addend, v multiplier, v addend) for lanes 0 and 1
    (0x9E3779B1, 0x7F4A7C15, 0x85EBCA77, 0x165667B1),
    (0xC2B2AE3D, 0x27D4EB2F, 0x27D4EB2D, 0x61C88647),
)
LEN_KEYS = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F)


def mix64(z: int) -> int:
    """SplitMix64 finaliser on a Python int (mod 2^64)."""
    z &= _M64
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & _M64
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & _M64
    z ^= z >> 31
    return z


def tensor_bytes(t) -> bytes:
    """The logical row-major bytes of a torch tensor or numpy array (little-endian)."""
    if isinstance(t, (bytes, bytearray, memoryview)):
        return bytes(t)
    if isinstance(t, np.ndarray):
        return np.ascontiguousarray(t).tobytes()
    import torch

    t = t.detach().resolve_conj().resolve_neg().contiguous().cpu()
    if not t.numel():
        return b""
    flat = t.reshape(-1)
    if flat.stride(0) != 1:  # a one-element tensor is contiguous whatever its stride; view() wants 1
        flat = flat.clone(memory_format=torch.contiguous_format)
    return flat.view(torch.uint8).numpy().tobytes()


def sums(data: bytes, first_pair: int = 0) -> Tuple[int, int]:
    """(S_0, S_1) of `data`, whose first pair has global index `first_pair`."""
    buf = bytes(data)
    pad = (-len(buf)) % 8
    words = np.frombuffer(buf + b"\0" * pad, dtype="<u4").astype(np.uint32)
    x, y = words[0::2], words[1::2]
    p = (np.arange(x.size, dtype=np.uint64) + np.uint64(first_pair % (1 << 64))) & np.uint64(0xFFFFFFFF)
    P = p.astype(np.uint32)
    out = []
    for um, ua, vm, va in LANE_KEYS:
        with np.errstate(over="ignore"):
            u = (x + P * np.uint32(um) + np.uint32(ua)).astype(np.uint64)
            v = (y + P * np.uint32(vm) + np.uint32(va)).astype(np.uint64)
            terms = u * v  # < 2^64: exact
        out.append(int(np.sum(terms, dtype=np.uint64)) & _M64)
    return out[0], out[1]


def finalize(s0: int, s1: int, total_bytes: int) -> Tuple[int, int]:
    """(F_0, F_1) from the lanes' sums and the whole tensor's byte length L."""
    return (
        mix64((s0 & _M64) ^ mix64(total_bytes + LEN_KEYS[0])),
        mix64((s1 & _M64) ^ mix64(total_bytes + LEN_KEYS[1])),
    )


def fingerprint_lanes(t) -> Tuple[int, int]:
    """msfp1 lanes (F_0, F_1) of a tensor, array or bytes."""
    data = tensor_bytes(t)
    return finalize(*sums(data), len(data))


def fingerprint_hex(t) -> str:
    """msfp1 as 32 lowercase hex digits: F_0 then F_1."""
    f0, f1 = fingerprint_lanes(t)
    return f"{f0:016x}{f1:016x}"


# ----------------------------------------------------------------------------------------------
# Deterministic norm sums (docs/optim.md "Deterministic gradient norms"), from the spec.


def _tree_np(v: np.ndarray, p: float) -> float:
    """The strided pairwise tree over a float64 vector: v[i] (+) v[i + s] for i a multiple of 2s."""
    v = np.array(v, dtype=np.float64)
    n, s = v.shape[0], 1
    while s < n:
        i = np.arange(0, n - s, 2 * s)
        a, b = v[i], v[i + s]
        v[i] = np.maximum(a, b) if np.isinf(p) else a + b  # np.maximum propagates NaN
        s *= 2
    return float(v[0]) if n else 0.0


# The spec's term for a general p is the C library's pow(), which the native kernels call. numpy's
# np.power is not that function everywhere: on CPUs with AVX-512 numpy evaluates it with its own
# SIMD code, whose last bit differs from glibc's for some inputs (found by the clip fuzz test:
# 9 of 146 terms one ulp apart). math.pow calls the C library's pow.
_LIBM_POW = np.frompyfunc(math.pow, 2, 1)


def _libm_pow(x: np.ndarray, p: float) -> np.ndarray:
    """pow(x, p) of the C library, element-wise (float64)."""
    return _LIBM_POW(x, float(p)).astype(np.float64)


def norm_sums(arrays, p: float = 2.0) -> np.ndarray:
    """float64 [N + 1]: per array the sum of |x|^p (max |x| for inf) by the leaf / lane / tree
    order of the spec, then the tree over the N values. ``arrays``: numpy arrays or tensors
    (float32/float64/bfloat16/float16; bfloat16 tensors are widened exactly)."""
    out = []
    for a in arrays:
        if hasattr(a, "detach"):  # a torch tensor: widen exactly to float64
            a = a.detach().to("cpu").double().contiguous().numpy()
        x = np.asarray(a, dtype=np.float64).reshape(-1)
        nleaves = -(-x.shape[0] // 1024)
        leaves = np.zeros(nleaves * 1024, dtype=np.float64)
        leaves[: x.shape[0]] = x
        m = np.abs(leaves)
        terms = leaves * leaves if p == 2.0 else m if (p == 1.0 or np.isinf(p)) else _libm_pow(m, p)
        terms = terms.reshape(nleaves, 32, 32)  # [leaf, k, lane j]: element k*32 + j
        lane = np.zeros((nleaves, 32), dtype=np.float64)
        for k in range(32):  # lane j adds k = 0..31 in order
            t = terms[:, k, :]
            lane = np.maximum(lane, t) if np.isinf(p) else lane + t
        s = 16
        while s >= 1:  # halving fold
            a_, b_ = lane[:, :s], lane[:, s:2 * s]
            lane[:, :s] = np.maximum(a_, b_) if np.isinf(p) else a_ + b_
            s //= 2
        out.append(_tree_np(lane[:, 0], p))
    return np.array(out + [_tree_np(np.array(out, dtype=np.float64), p)], dtype=np.float64)
