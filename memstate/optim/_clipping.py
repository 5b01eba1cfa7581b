"""The fused optimizers' ``max_grad_norm=`` option: deterministic global-norm clipping at the
start of ``step()``.

The norm is the L2 norm of every gradient the step will use (all param groups, each gradient
once even if its parameter is listed twice), in the optimizer's parameter order, computed by
memstate's fixed reduction tree (``memstate.clip``; docs/optim.md): the same bits for any thread
count, chunk size or launch configuration, and on CPU and CUDA. The gradients are then scaled in
place exactly as ``memstate.clip_grad_norm_`` scales them (coefficient
``min(1, max_grad_norm / (norm + 1e-6))`` in the gradients' dtype), so

    opt = Adam(params, max_grad_norm=c); opt.step()

is bit for bit ``memstate.clip_grad_norm_(params, c); Adam(params).step()`` (params in the
optimizer's order). LAMB (``_clips_in_kernel``) instead divides the gradient inside its kernel
as Apex FusedLAMB does and leaves ``p.grad`` untouched.
"""
from __future__ import annotations

import numbers
from typing import List, Optional

import torch

from memstate import clip as _clip


def check_max_grad_norm(value) -> Optional[float]:
    """``None`` (off) or a number > 0 (inf: the norm is computed and reported, never clipped).
    Raises ValueError naming the argument otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value) > 0:
        raise ValueError(f"Invalid max_grad_norm value: {value!r}; expected None (no clipping) or a number > 0")
    return float(value)


def _stepped_params(opt, check_grads: bool) -> List[torch.Tensor]:
    """The parameters whose gradients the step will read, each once, in parameter order. Checks
    every group's hyperparameters and, with ``check_grads``, every gradient (dtype, shape,
    device, layout) as the step does, so such errors are raised before any gradient is scaled.
    (The state tensors are checked by the step itself, after the scaling: re-checking them here
    doubled the per-parameter host cost of a step.)"""
    from memstate.optim._base import FusedOptimizer  # (_base imports this module)

    out, seen = [], set()
    for gi, group in enumerate(opt.param_groups):
        params = opt._params_with_grad(group)
        opt._check_group(gi, group)
        for p in params:
            if check_grads:
                FusedOptimizer._check_param(opt, group, p)  # the gradient only, not the state
            if id(p) in seen:
                continue
            seen.add(id(p))
            if p.grad.layout != torch.strided:
                raise ValueError(f"memstate.optim.{opt._name}: max_grad_norm does not support sparse gradients "
                                 f"({opt._param_label(p)} has a {p.grad.layout} gradient); use "
                                 f"torch.nn.utils.clip_grad_norm_ before step()")
            out.append(p)
    return out


def _check_grads_alias_nothing(opt, params: List[torch.Tensor]) -> None:
    """Scaling writes every gradient: one that shares memory with a parameter or any tensor
    state of the step (any group) would change it before the step could refuse it. Checked
    across the whole step, in one native call, before anything is scaled."""
    opt._refuse_memory_problem(params, [p.grad for p in params], None, clipping=True)


def clip_before_step(opt) -> None:
    """Runs at the start of every ``FusedOptimizer.step``: nothing when ``max_grad_norm`` is None;
    else sets ``opt.last_grad_norm`` (the pre-clip norm, a 0-d tensor as clip_grad_norm_ returns)
    and scales the gradients in place (LAMB: records the float64 norm for its kernel instead).
    Group hyperparameters and gradients are checked first, and that no gradient shares memory
    with a parameter or state tensor of the step (a step refused for them has scaled nothing);
    the state tensors' dtypes and shapes are checked by the step, after the scaling.

    With ``skip_if_nonfinite`` the non-finite check comes first: if the step is going to be
    skipped, no norm is computed and nothing is scaled (``last_grad_norm`` stays None). On CUDA
    the norm and the scaling stay on the device (no host sync); LAMB reads the norm on the host
    (one sync) for its clipping divisor.
    """
    opt.last_grad_norm = None
    opt._grad_norm_f64 = None
    if opt.max_grad_norm is None:
        return
    in_kernel = getattr(opt, "_clips_in_kernel", False)
    params = _stepped_params(opt, check_grads=not in_kernel)
    if opt.skip_if_nonfinite and opt._any_nonfinite([params]):
        return  # the step will be skipped and modify nothing: the gradients neither
    if not params:
        opt.last_grad_norm, opt._grad_norm_f64 = torch.tensor(0.0), 0.0
        return
    grads = [p.grad for p in params]
    if not in_kernel:
        _check_grads_alias_nothing(opt, params)
    # memstate.clip_grad_norm_(params, max_grad_norm)'s norm and scaling, op for op
    norm64, dtype = _clip._total_norm_f64(grads, 2.0)
    opt.last_grad_norm = norm64.to(dtype)
    if in_kernel:
        opt._grad_norm_f64 = float(norm64)
        return
    _clip.clip_grads_with_norm_(params, opt.max_grad_norm, opt.last_grad_norm)
