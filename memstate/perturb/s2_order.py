"""S2, data order: the window's batches permuted, reversed, or drawn under another policy."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from memstate.perturb._core import ESTIMAND_NAMES, Estimand, Primitive, TrainState
from memstate.perturb._rules import (_check_perturb_stream, _generator, _need, _recut, _sampler,
                                     _sampler_check_factory, _window_batches)


def _epoch_window(name):
    def window(state, p):
        s = _sampler(state, name)
        bpe = getattr(s, "batches_per_epoch", None)
        _need(isinstance(bpe, int) and bpe >= 1, name, f"state.sampler has no usable batches_per_epoch ({bpe!r})")
        return bpe
    return window


def _swap_apply(state, p, start, length):
    s = state.sampler
    batches = _window_batches(s, start, length)
    ids = [i for b in batches for i in b]
    perm = torch.randperm(len(ids), generator=_generator(state, "order_window_swap", start, p)).tolist()
    s.override_window(start, _recut([ids[j] for j in perm], [len(b) for b in batches]))


def _reverse_apply(state, p, start, length):
    s = state.sampler
    s.override_window(start, _window_batches(s, start, length)[::-1])


_POLICIES = ("rr", "wr", "so", "fixed")  # memstate.data.POLICIES; switch targets: rr, wr


def _policy_target(state, p) -> Tuple[str, str]:
    s = _sampler(state, "policy_switch")
    cur = getattr(s, "policy", None)
    _need(cur in _POLICIES, "policy_switch", f"sampler policy {cur!r} is not one of {', '.join(_POLICIES)}")
    to = p.get("to")
    if to is None:
        to = "rr" if cur == "wr" else "wr"
    _need(to in ("rr", "wr"), "policy_switch", f"to={to!r}; valid: rr, wr")
    _need(to != cur, "policy_switch", f"the sampler already uses policy {cur!r}")
    return cur, to


def _policy_estimand(p: Dict[str, Any], state: Optional[TrainState]) -> Estimand:
    """ATE_order = E[M(current policy) - M(target policy)]; the current policy is the recorded
    ``from``, else ``state.sampler.policy``, else "rr" (the usual sampler); the target is ``to``,
    else the default switch (wr -> rr, anything else -> wr)."""
    cur = p.get("from")
    if cur is None and state is not None and state.sampler is not None:
        cur = getattr(state.sampler, "policy", None)
    to = p.get("to")
    _need(to is None or to in ("rr", "wr"), "policy_switch", f"to={to!r}; valid: rr, wr")
    if cur is None:
        cur = "carry" if to == "rr" else "rr"  # a switch to rr comes from a policy we do not know
    if to is None:
        to = "rr" if cur == "wr" else "wr"
    _need(to != cur, "policy_switch", f"the sampler already uses policy {cur!r}")
    return Estimand(ESTIMAND_NAMES["S2"], str(cur), to)


def _policy_check(state, p):
    _policy_target(state, p)
    _check_perturb_stream(state, p, "policy_switch")
    n = getattr(state.sampler, "n", None)
    _need(isinstance(n, int) and n >= 1, "policy_switch", f"state.sampler has no usable dataset size n ({n!r})")


def _policy_apply(state, p, start, length):
    s = state.sampler
    _, to = _policy_target(state, p)
    p["from"], p["to"] = s.policy, to
    sizes = [len(b) for b in _window_batches(s, start, length)]
    g = _generator(state, "policy_switch", start, p)
    total, n = sum(sizes), int(s.n)
    if to == "wr":  # independent uniform draws with replacement
        ids = torch.randint(0, n, (total,), generator=g).tolist()
    else:  # random reshuffling: fresh permutations of the dataset, as many as the window needs
        ids = []
        while len(ids) < total:
            ids += torch.randperm(n, generator=g).tolist()
        ids = ids[:total]
    s.override_window(start, _recut(ids, sizes))


PRIMITIVES: Tuple[Primitive, ...] = (
    Primitive("order_window_swap", "S2", ("sampler.window",),
              check_fn=_sampler_check_factory("order_window_swap"), window_fn=_epoch_window("order_window_swap"),
              apply_fn=_swap_apply, params={"seed": None},
              description="the same multiset of batch ids in the window under a fresh permutation, "
                          "re-cut into batches of the same sizes",
              window_rule="one epoch (sampler.batches_per_epoch)"),
    Primitive("reverse_window", "S2", ("sampler.window",),
              check_fn=_sampler_check_factory("reverse_window"), window_fn=_epoch_window("reverse_window"),
              apply_fn=_reverse_apply,
              description="the window's batches in reverse order",
              window_rule="one epoch (sampler.batches_per_epoch)"),
    Primitive("policy_switch", "S2", ("sampler.window",),
              check_fn=_policy_check, window_fn=_epoch_window("policy_switch"), apply_fn=_policy_apply,
              estimand_fn=_policy_estimand,
              params={"to": None, "seed": None},
              description="rr (or so/fixed) -> with-replacement uniform draws "
                          "(wr -> fresh permutations of the dataset) for the window, batch sizes kept",
              window_rule="one epoch (sampler.batches_per_epoch)"),
)
