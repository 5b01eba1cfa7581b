"""Deterministic gradient norms and clipping: drop-ins for ``torch.nn.utils.clip_grad_norm_``
and ``torch.nn.utils.get_total_norm``.

torch's clipping computes the global norm with reductions whose summation order depends on
the thread count, the vector width and (on CUDA) the launch configuration, so the clip factor,
and every clipped gradient after it, can differ in the last bit between two runs of the same
training on different machines. memstate computes the norm with ONE fixed reduction tree in
float64 (``torch.ops.memstate.norm_sums``; the tree is given in docs/optim.md and
``csrc/include/memstate/norm_math.h``): it is a pure function of the gradients' values,
identical for any thread count and launch configuration, and on CPU and CUDA for norm orders
1, 2 and inf (other orders use ``pow``, whose last bit may differ between the host libm and
CUDA). The clip factor and the scaling then follow torch's own arithmetic exactly, so the only
difference from torch is the (more accurate) norm.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Sequence, Union

import torch

from memstate import _ext

__all__ = ["clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_", "norm_sums"]

_Tensors = Union[torch.Tensor, Iterable[torch.Tensor]]


def _norm_order(norm_type) -> float:
    try:
        p = float(norm_type)
    except (TypeError, ValueError):
        raise ValueError(f"norm_type must be a number > 0 or inf, got {norm_type!r}") from None
    if not p > 0:  # also NaN
        raise ValueError(f"norm_type must be > 0 or inf, got {norm_type!r} (memstate does not implement the "
                         f"0 'norm' or negative orders)")
    return p


def _real_views(tensors: Sequence[torch.Tensor], p: float, what: str) -> List[torch.Tensor]:
    out = []
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}[{i}]: expected a tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise TypeError(f"{what}[{i}] has layout {t.layout}; memstate's deterministic norm takes dense "
                            f"tensors only (use torch.nn.utils.clip_grad_norm_ for sparse gradients)")
        t = t.detach()
        if t.is_complex():
            if p != 2.0:
                raise ValueError(f"{what}[{i}] is complex: memstate's norm of complex tensors is implemented "
                                 f"for norm_type=2 only (|z|^2 = re^2 + im^2), got {p}")
            t = torch.view_as_real(t.resolve_conj())
        out.append(t)
    return out


def norm_sums(tensors: Sequence[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """float64 ``[N + 1]`` on the tensors' device: per tensor the sum of ``|x|^p`` (the max of
    ``|x|`` for inf), then their combination, by memstate's fixed reduction tree. All tensors
    must be on one device."""
    p = _norm_order(norm_type)
    ts = _real_views(list(tensors), p, "tensors")
    return _ext.ops().norm_sums(ts, p)


def _finish(total: torch.Tensor, p: float) -> torch.Tensor:
    if p == 2.0:
        return total.sqrt()
    if p == 1.0 or math.isinf(p):
        return total
    return total.pow(1.0 / p)


def _tree(values: List[float], p: float) -> float:
    """The strided pairwise tree of norm_math.h over per-tensor values (host floats)."""
    v = list(values)
    n, s = len(v), 1
    while s < n:
        for i in range(0, n - s, 2 * s):
            a, b = v[i], v[i + s]
            v[i] = (a if a != a else b if b != b else max(a, b)) if math.isinf(p) else a + b
        s *= 2
    return v[0] if v else 0.0


def _total_sum(tensors: List[torch.Tensor], p: float) -> torch.Tensor:
    """0-d float64 on the first tensor's device: the combination of every tensor's sum."""
    first = tensors[0].device
    by_device = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    if len(by_device) == 1:
        return norm_sums(tensors, p)[-1]
    # Several devices: each device's per-tensor values, then the same tree over all of them in
    # list order, so the result equals a one-device call's (one host sync per device).
    per = [0.0] * len(tensors)
    for idx in by_device.values():
        for i, x in zip(idx, norm_sums([tensors[i] for i in idx], p)[:-1].tolist()):
            per[i] = x
    return torch.tensor(_tree(per, p), dtype=torch.float64, device=first)


def _total_norm_f64(tensors: List[torch.Tensor], p: float):
    """(the norm as a float64 0-d tensor, the dtype get_total_norm returns it in) for a non-empty
    list (the optimizers' ``max_grad_norm`` reads both)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if dtype.is_complex:
        dtype = dtype.to_real()
    return _finish(_total_sum(tensors, p), p), dtype


def get_total_norm(tensors: _Tensors, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                   foreach=None) -> torch.Tensor:
    """The norm of all ``tensors`` together, as ``torch.nn.utils.get_total_norm`` returns it (a
    0-d tensor of the tensors' promoted real dtype on the first tensor's device), computed with
    memstate's deterministic reduction. ``foreach`` is accepted and ignored (memstate always
    fuses). Tensors on several devices give the same value as if they were on one."""
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    tensors = list(tensors)
    p = _norm_order(norm_type)
    if not tensors:
        return torch.tensor(0.0)
    norm64, dtype = _total_norm_f64(tensors, p)
    total_norm = norm64.to(dtype)
    if error_if_nonfinite and torch.logical_or(total_norm.isnan(), total_norm.isinf()):
        raise RuntimeError(
            f"The total norm of order {float(norm_type)} for gradients from `parameters` is non-finite, so it "
            f"cannot be clipped. To disable this error and scale the gradients by the non-finite norm anyway, "
            f"set `error_if_nonfinite=False`")
    return total_norm


def clip_grads_with_norm_(parameters: _Tensors, max_norm: float, total_norm: torch.Tensor, foreach=None) -> None:
    """Scales the gradients of ``parameters`` by ``max_norm / (total_norm + 1e-6)`` when that is
    below 1, exactly as ``torch.nn.utils.clip_grads_with_norm_`` (the same ops in the same
    dtypes, so the same bits for the same ``total_norm``)."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    clip_coef = float(max_norm) / (total_norm + 1e-6)
    clip_coef_clamped = torch.clamp(clip_coef, max=1.0)
    groups = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    for (device, _), gs in groups.items():
        torch._foreach_mul_(gs, clip_coef_clamped.to(device))


def clip_grad_norm_(parameters: _Tensors, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach=None) -> torch.Tensor:
    """Drop-in for ``torch.nn.utils.clip_grad_norm_`` with a deterministic global norm.

    Computes the norm of all gradients of ``parameters`` together (as if concatenated) with
    memstate's fixed reduction tree, then scales every gradient in place by
    ``min(1, max_norm / (total_norm + 1e-6))``. Returns the total norm (0-d tensor). The norm
    is bitwise identical for any thread count and launch configuration, and on CPU and CUDA for
    ``norm_type`` in 1, 2, inf. ``foreach`` is accepted and ignored. Sparse gradients are refused
    (torch's function handles them); complex gradients are supported for ``norm_type=2``."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    for i, p in enumerate(parameters):
        if p.grad is not None and p.grad.layout != torch.strided:
            raise TypeError(f"memstate.clip_grad_norm_: parameters[{i}].grad has layout {p.grad.layout}; only "
                            f"dense gradients (use torch.nn.utils.clip_grad_norm_ for sparse ones)")
    total_norm = get_total_norm(grads, norm_type, error_if_nonfinite)
    clip_grads_with_norm_(parameters, max_norm, total_norm)
    return total_norm
