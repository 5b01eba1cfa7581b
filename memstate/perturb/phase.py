"""Phase boundaries (SEED.md experiment 3): ``reset_all``, the RESET arm of CARRY vs RESET.

At a phase boundary (new data, loss or learning rate) the question is what the whole
accumulated training state beyond the weights is worth: ``reset_all`` zeroes every optimizer
buffer and step counter (every tensor in ``optimizer.state``, a Python-number ``step`` set to
0) and reinitialises the running statistics of every BatchNorm layer (mean 0, variance 1,
``num_batches_tracked`` 0). It declares exactly that: ``optimizer.state.*`` and the BatchNorm
buffers of the model, so the single-source check still proves that nothing else (weights,
sampler, RNG, ``extra``) changed. Estimand ``ATE_phase = E[M(carry) - M(reset_all)]``: memory
kept minus memory reset at the boundary.

Default window: two half-lives of the longest decay it erases (the largest SGD momentum or Adam
beta, and the BatchNorm decay ``1 - momentum``), 1 step if there is none.
"""
from __future__ import annotations

from typing import Tuple

import torch

from memstate.perturb._core import Estimand, Primitive, TrainState, windows_for_halflives
from memstate.perturb._rules import _need


def _optimizer(state: TrainState) -> torch.optim.Optimizer:
    opt = state.optimizer
    _need(isinstance(opt, torch.optim.Optimizer), "reset_all",
          f"needs state.optimizer (a torch.optim.Optimizer), got {type(opt).__name__}")
    return opt


def _batchnorms(state: TrainState):
    model = state.model
    _need(isinstance(model, torch.nn.Module), "reset_all", f"needs state.model, got {type(model).__name__}")
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.running_mean is not None]


def _declared(state, p) -> Tuple[str, ...]:
    out = ["optimizer.state.*"]
    for n, m in _batchnorms(state):
        prefix = f"model.{n}." if n else "model."
        out += [prefix + b for b in ("running_mean", "running_var", "num_batches_tracked")
                if getattr(m, b, None) is not None]
    return tuple(out)


def _check(state, p):
    _optimizer(state)
    _batchnorms(state)


def _window(state, p):
    opt = _optimizer(state)
    decays = []
    for g in opt.param_groups:
        if g.get("momentum"):
            decays.append(float(g["momentum"]))
        if g.get("betas") is not None:
            decays += [float(b) for b in g["betas"]]
    decays += [1.0 - float(m.momentum) for _, m in _batchnorms(state) if m.momentum is not None]
    decays = [d for d in decays if 0.0 < d < 1.0]
    return windows_for_halflives(max(decays)) if decays else 1


def _apply(state, p, start, length):
    opt = _optimizer(state)
    for group in opt.param_groups:
        for param in group["params"]:
            st = opt.state.get(param, {})
            for k, v in list(st.items()):
                if isinstance(v, torch.Tensor):
                    v.zero_()
                elif k == "step" and isinstance(v, (int, float)):
                    st[k] = type(v)(0)
    for _, m in _batchnorms(state):
        m.reset_running_stats()  # in place: running_mean 0, running_var 1, num_batches_tracked 0


PRIMITIVES: Tuple[Primitive, ...] = (
    Primitive("reset_all", "S1", ("optimizer.state.*", "model.*.running_mean", "model.*.running_var",
                                  "model.*.num_batches_tracked"),
              check_fn=_check, window_fn=_window, apply_fn=_apply, declared_fn=_declared,
              estimand_fn=lambda p, state: Estimand("ATE_phase", "carry", "reset_all"),
              description="zero every optimizer buffer and step counter and reinitialise every BatchNorm "
                          "layer's running statistics (CARRY vs RESET at a phase boundary)",
              window_rule="two half-lives of the longest decay erased (momentum, Adam betas, BatchNorm)"),
)
