"""S2, data order: the window's batches permuted, reversed, or drawn under another policy.

Order only, never coverage: global step s is batch ``s % batches_per_epoch`` of epoch
``s // batches_per_epoch``, and ``order_window_swap`` / ``reverse_window`` keep the ids of every
epoch (as a multiset) by moving ids only inside one epoch: their default window is the rest of
t0's epoch (``batches_per_epoch - t0 % batches_per_epoch`` steps, a whole epoch when t0 starts
one) and an explicit window that crosses an epoch boundary is refused (PerturbationError naming
t0, the window and the boundaries). ``policy_switch`` has the same default window; it changes
which ids an epoch contains only where the policies themselves differ in that (a switch to or
from ``wr``, declared by ``changes_epoch_ids``); a switch from ``so``/``fixed`` to ``rr``
reshuffles each epoch's part of the window among itself, so any window keeps every epoch's ids.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from memstate.perturb._core import ESTIMAND_NAMES, Estimand, Primitive, TrainState
from memstate.perturb._rules import (_batches_per_epoch, _check_perturb_stream, _check_within_epoch,
                                     _epoch_segments, _generator, _need, _recut, _sampler, _sampler_check_factory,
                                     _window_batches)


REST_OF_EPOCH = "the rest of t0's epoch: batches_per_epoch - t0 % batches_per_epoch (a whole epoch from its start)"


def _epoch_window(name):
    def window(state, p):
        bpe = _batches_per_epoch(state, name)
        return bpe - int(state.step) % bpe
    return window


def _swap_window_check(state, p, start, length):
    _check_within_epoch(state, "order_window_swap", start, length)


def _reverse_window_check(state, p, start, length):
    _check_within_epoch(state, "reverse_window", start, length)
    bpe = _batches_per_epoch(state, "reverse_window")
    _need(length >= 2, "reverse_window",
          f"a 1-step window at t0={start} reverses nothing (step {start} is the last of epoch {start // bpe}, "
          f"steps {start // bpe * bpe}..{start // bpe * bpe + bpe - 1}); choose a t0 at least 2 steps before an "
          f"epoch boundary")


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


def _policy_changes_epoch_ids(p: Dict[str, Any], state: Optional[TrainState]) -> bool:
    """A switch to or from wr changes which ids an epoch contains (wr draws with replacement);
    between the permutation policies (so/fixed -> rr) every epoch keeps its ids."""
    e = _policy_estimand(p, state)
    return "wr" in (e.control, e.treatment) or e.control == "carry"  # unknown source: assume it may


def _policy_check(state, p):
    _policy_target(state, p)
    _check_perturb_stream(state, p, "policy_switch")
    n = getattr(state.sampler, "n", None)
    _need(isinstance(n, int) and n >= 1, "policy_switch", f"state.sampler has no usable dataset size n ({n!r})")


def _policy_apply(state, p, start, length):
    """Batch sizes kept. To wr: independent uniform draws. To rr, each epoch's part of the window
    separately: from wr, fresh permutations of the dataset (drawn without replacement within the
    epoch's part); from so/fixed, the part's own ids reshuffled, so the epoch keeps its ids (the
    distribution of rr's order for the rest of an epoch given its start)."""
    s = state.sampler
    cur, to = _policy_target(state, p)
    p["from"], p["to"] = cur, to
    batches = _window_batches(s, start, length)
    sizes = [len(b) for b in batches]
    g = _generator(state, "policy_switch", start, p)
    n = int(s.n)
    if to == "wr":
        ids = torch.randint(0, n, (sum(sizes),), generator=g).tolist()
    else:
        ids = []
        for off, count in _epoch_segments(start, length, _batches_per_epoch(state, "policy_switch")):
            if cur == "wr":
                total, drawn = sum(sizes[off:off + count]), []
                while len(drawn) < total:
                    drawn += torch.randperm(n, generator=g).tolist()
                ids += drawn[:total]
            else:
                own = [i for b in batches[off:off + count] for i in b]
                ids += [own[j] for j in torch.randperm(len(own), generator=g).tolist()]
    s.override_window(start, _recut(ids, sizes))


PRIMITIVES: Tuple[Primitive, ...] = (
    Primitive("order_window_swap", "S2", ("sampler.window",),
              check_fn=_sampler_check_factory("order_window_swap"), window_fn=_epoch_window("order_window_swap"),
              window_check_fn=_swap_window_check, apply_fn=_swap_apply, params={"seed": None},
              description="the same multiset of batch ids in the window under a fresh permutation, "
                          "re-cut into batches of the same sizes; the window must lie inside one epoch",
              window_rule=REST_OF_EPOCH),
    Primitive("reverse_window", "S2", ("sampler.window",),
              check_fn=_sampler_check_factory("reverse_window"), window_fn=_epoch_window("reverse_window"),
              window_check_fn=_reverse_window_check, apply_fn=_reverse_apply,
              description="the window's batches in reverse order; the window must lie inside one epoch "
                          "and span at least 2 steps",
              window_rule=REST_OF_EPOCH),
    Primitive("policy_switch", "S2", ("sampler.window",),
              check_fn=_policy_check, window_fn=_epoch_window("policy_switch"), apply_fn=_policy_apply,
              estimand_fn=_policy_estimand, changes_epoch_ids_fn=_policy_changes_epoch_ids,
              params={"to": None, "seed": None},
              description="rr (or so/fixed) -> with-replacement uniform draws for the window; to rr, per "
                          "epoch: wr -> fresh permutations of the dataset, so/fixed -> the epoch's ids in "
                          "the window reshuffled (kept); batch sizes kept",
              window_rule=REST_OF_EPOCH),
)
