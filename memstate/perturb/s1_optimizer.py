"""S1, optimizer state: momentum and Adam moments, their scaling, the weight-average shadow.

Default windows: two half-lives of the decay whose memory is erased (see the package docstring)."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence, Tuple

import torch

from memstate.perturb._core import PerturbationError, Primitive, REQUIRED, TrainState, windows_for_halflives
from memstate.perturb._rules import _copy_from_model_rule, _need, _stateful_decay


def _optimizer(state: TrainState, name: str) -> torch.optim.Optimizer:
    opt = state.optimizer
    _need(isinstance(opt, torch.optim.Optimizer), name,
          f"needs state.optimizer (a torch.optim.Optimizer), got {type(opt).__name__}")
    return opt


def _opt_param_states(opt: torch.optim.Optimizer):
    """(group, param, state dict) for every parameter, in state_dict index order."""
    for group in opt.param_groups:
        for p in group["params"]:
            yield group, p, opt.state.get(p, {})


def _momenta(opt) -> List[float]:
    return [float(g["momentum"]) for g in opt.param_groups if g.get("momentum") is not None]


def _betas(opt, i: int) -> List[float]:
    return [float(g["betas"][i]) for g in opt.param_groups if g.get("betas") is not None]


def _require_momentum(opt, name: str) -> None:
    moms = _momenta(opt)
    _need(bool(moms), name, f"{type(opt).__name__} has no 'momentum' hyperparameter, so no momentum buffers "
                            f"(for Adam-family optimizers use reset_adam_m)")
    _need(any(m > 0 for m in moms), name,
          f"{type(opt).__name__} runs without momentum (momentum=0 in every param group): there is no "
          f"momentum buffer to perturb")


def _require_adam(opt, name: str) -> None:
    _need(bool(_betas(opt, 0)), name, f"needs an Adam-family optimizer (param groups with 'betas', state "
                                      f"exp_avg / exp_avg_sq), got {type(opt).__name__}")


_OPT_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _opt_patterns(keys: Sequence[str]) -> Tuple[str, ...]:
    return tuple(f"optimizer.state.*.{k}" for k in keys)


def _zero_keys(opt, keys: Sequence[str]) -> None:
    for _, _, st in _opt_param_states(opt):
        for k in keys:
            v = st.get(k)
            if isinstance(v, torch.Tensor):
                v.zero_()


def _momentum_check(state, p):
    _require_momentum(_optimizer(state, "reset_momentum"), "reset_momentum")


def _momentum_window(state, p):
    opt = _optimizer(state, "reset_momentum")
    _require_momentum(opt, "reset_momentum")
    return windows_for_halflives(max(m for m in _momenta(opt) if m > 0))


def _momentum_apply(state, p, start, length):
    _zero_keys(state.optimizer, ("momentum_buffer",))


def _adam_check_factory(name):
    def check(state, p):
        _require_adam(_optimizer(state, name), name)
    return check


def _adam_window_factory(name, which: Sequence[int]):
    def window(state, p):
        opt = _optimizer(state, name)
        _require_adam(opt, name)
        return windows_for_halflives(max(b for i in which for b in _betas(opt, i)))
    return window


def _adam_v_keys(p) -> Tuple[str, ...]:
    return ("exp_avg_sq", "max_exp_avg_sq") if p.get("include_max", True) else ("exp_avg_sq",)


def _adam_all_keys(p) -> Tuple[str, ...]:
    return ("exp_avg",) + _adam_v_keys(p) + (("step",) if p.get("reset_step") else ())


def _adam_apply(state, p, start, length):
    opt = state.optimizer
    _zero_keys(opt, [k for k in _adam_all_keys(p) if k != "step"])
    if p.get("reset_step"):
        for _, _, st in _opt_param_states(opt):
            s = st.get("step")
            if isinstance(s, torch.Tensor):
                s.zero_()
            elif s is not None:
                st["step"] = type(s)(0)


def _scale_keys(state: TrainState, p: Dict[str, Any]) -> Tuple[str, ...]:
    opt = _optimizer(state, "scale_state")
    has_mom = any(m > 0 for m in _momenta(opt))
    has_adam = bool(_betas(opt, 0))
    has_ams = any(g.get("amsgrad") for g in opt.param_groups)
    keys = p.get("keys")
    if keys is None:
        keys = (("momentum_buffer",) if has_mom else ()) + (("exp_avg", "exp_avg_sq") if has_adam else ()) \
            + (("max_exp_avg_sq",) if has_ams else ())
        _need(bool(keys), "scale_state", f"{type(opt).__name__} has no moment buffers (no momentum, no betas)")
        return keys
    keys = (keys,) if isinstance(keys, str) else tuple(keys)
    unknown = [k for k in keys if k not in _OPT_KEYS]
    _need(not unknown, "scale_state",
          f"unknown state key(s) {', '.join(map(str, unknown))}; valid: {', '.join(_OPT_KEYS)}")
    _need(bool(keys), "scale_state", "keys is empty")
    if "momentum_buffer" in keys:
        _require_momentum(opt, "scale_state")
    if any(k in keys for k in ("exp_avg", "exp_avg_sq")):
        _require_adam(opt, "scale_state")
    _need("max_exp_avg_sq" not in keys or has_ams, "scale_state",
          "max_exp_avg_sq exists only with amsgrad=True")
    return keys


def _scale_check(state, p):
    keys = _scale_keys(state, p)
    try:
        alpha = float(p["alpha"])
    except (TypeError, ValueError):
        raise PerturbationError(f"scale_state: alpha must be a number, got {p['alpha']!r}") from None
    _need(math.isfinite(alpha), "scale_state", f"alpha must be finite, got {alpha}")
    _need(alpha >= 0 or not any(k in keys for k in ("exp_avg_sq", "max_exp_avg_sq")), "scale_state",
          f"alpha={alpha} < 0 would make the second moments negative")


def _scale_window(state, p):
    keys = _scale_keys(state, p)
    opt = state.optimizer
    betas = []
    for k in keys:
        betas += [m for m in _momenta(opt) if m > 0] if k == "momentum_buffer" else \
            _betas(opt, 0) if k == "exp_avg" else _betas(opt, 1)
    return windows_for_halflives(max(betas))


def _scale_apply(state, p, start, length):
    keys = _scale_keys(state, p)
    p["keys"] = list(keys)
    alpha = float(p["alpha"])
    for _, _, st in _opt_param_states(state.optimizer):
        for k in keys:
            v = st.get(k)
            if isinstance(v, torch.Tensor):
                v.mul_(alpha)


_ema_check, _ema_apply = _copy_from_model_rule("reset_ema")


def _ema_declared(state, p):
    return (f"extra.{p['key']}.*",)


S1_ADAM_WIN = "two half-lives of beta1"

PRIMITIVES: Tuple[Primitive, ...] = (
    Primitive("reset_momentum", "S1", _opt_patterns(("momentum_buffer",)),
              check_fn=_momentum_check, window_fn=_momentum_window, apply_fn=_momentum_apply,
              description="zero every SGD momentum buffer (with dampening 0 the next step then "
                          "equals a first step, buf = grad)",
              window_rule="two half-lives of the largest momentum"),
    Primitive("reset_adam_m", "S1", _opt_patterns(("exp_avg",)),
              check_fn=_adam_check_factory("reset_adam_m"), window_fn=_adam_window_factory("reset_adam_m", (0,)),
              apply_fn=lambda st, p, a, b: _zero_keys(st.optimizer, ("exp_avg",)),
              description="zero Adam's first moments exp_avg", window_rule=S1_ADAM_WIN),
    Primitive("reset_adam_v", "S1", _opt_patterns(("exp_avg_sq", "max_exp_avg_sq")),
              check_fn=_adam_check_factory("reset_adam_v"), window_fn=_adam_window_factory("reset_adam_v", (1,)),
              apply_fn=lambda st, p, a, b: _zero_keys(st.optimizer, _adam_v_keys(p)),
              declared_fn=lambda st, p: _opt_patterns(_adam_v_keys(p)),
              params={"include_max": True},
              description="zero Adam's second moments exp_avg_sq (and amsgrad's max_exp_avg_sq "
                          "unless include_max=False); without a step reset the next updates are large",
              window_rule="two half-lives of beta2"),
    Primitive("reset_adam", "S1", _opt_patterns(("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step")),
              check_fn=_adam_check_factory("reset_adam"), window_fn=_adam_window_factory("reset_adam", (0, 1)),
              apply_fn=_adam_apply, declared_fn=lambda st, p: _opt_patterns(_adam_all_keys(p)),
              params={"reset_step": False, "include_max": True},
              description="zero both Adam moments; reset_step=True also sets step to 0 so bias "
                          "correction restarts as for a fresh optimizer",
              window_rule="two half-lives of max(beta1, beta2)"),
    Primitive("scale_state", "S1", _opt_patterns(_OPT_KEYS),
              check_fn=_scale_check, window_fn=_scale_window, apply_fn=_scale_apply,
              declared_fn=lambda st, p: _opt_patterns(_scale_keys(st, p)),
              params={"alpha": REQUIRED, "keys": None},
              description="multiply moment buffers by alpha (dose-response); keys=None scales every "
                          "moment buffer the optimizer has (momentum_buffer, exp_avg, exp_avg_sq, "
                          "max_exp_avg_sq); note v scaled by alpha scales Adam's denominator by sqrt(alpha)",
              window_rule="two half-lives of the largest beta of the scaled buffers "
                          "(momentum, beta1 for exp_avg, beta2 for exp_avg_sq)"),
    Primitive("reset_ema", "S1", ("extra.ema.*",),
              check_fn=_ema_check, apply_fn=_ema_apply, declared_fn=_ema_declared,
              window_fn=lambda st, p: windows_for_halflives(
                  _stateful_decay(st, p, "ema_decay", "reset_ema", "EMA")),
              params={"key": "ema", "ema_decay": None},
              description="weight-average shadow extra[key] := current model parameters and buffers "
                          "(an AveragedModel's n_averaged is left alone)",
              window_rule="two half-lives of ema_decay"),
)
