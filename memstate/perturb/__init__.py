"""Single-source perturbation primitives for branch-and-hold experiments.

The package has one module per memory source, plus the shared parts::

    memstate/perturb/
        _core.py          sources, errors, Estimand, half-lives, TrainState, Primitive, Applied
        _rules.py         rule helpers shared by several sources (sampler window, perturb stream)
        registry.py       names / get / register / unregister, check_single_source, apply_checked
        null.py           none  the A/A control
        s1_optimizer.py   S1    optimizer state
        s2_order.py       S2    data order
        s3_path.py        S3    parameter path
        s4_aux.py         S4    auxiliary state
        s5_teacher.py     S5    teacher/meta state
        phase.py          S1+S4 ``reset_all``: the RESET arm at a phase boundary

Everything public is re-exported here: use ``memstate.perturb.<name>``.

A *primitive* changes one memory source of a training state (SEED.md, sources S1-S5) and
declares exactly which state entries it may touch. ``apply_checked`` fingerprints the state
before and after and raises ``SingleSourceViolation`` naming every entry that changed without
being declared (DESIGN.md, contract 4). The registry::

    memstate.perturb.names()               # ('null', 'reset_momentum', ...)
    memstate.perturb.get("reset_momentum") # a Primitive
    memstate.perturb.apply_checked("reset_momentum", state)          # -> Applied
    memstate.perturb.get("order_window_swap").check_window(state, 22, start=30)  # refuse early
    memstate.perturb.get("reset_momentum").estimand({}).text
    # 'ATE_opt = E[M(carry) - M(reset_momentum)]'

Sources, primitives and default windows (``window=None``); ``h(beta)`` is the half-life
``log 0.5 / log beta`` and ``2h`` is rounded up to whole steps (beta = 0.9 gives 14):

====  ========================  ==================================================================
S1    optimizer state           ``reset_momentum`` (2h of the largest SGD ``momentum``),
                                ``reset_adam_m`` (2h of beta1), ``reset_adam_v`` (2h of beta2),
                                ``reset_adam`` (2h of max(beta1, beta2): the longer memory it
                                erases, i.e. beta2 for the usual betas), ``scale_state`` (2h of the
                                largest beta of the scaled buffers), ``reset_ema`` (2h of
                                ``ema_decay``)
S2    data order                ``order_window_swap``, ``reverse_window``, ``policy_switch``
                                (the rest of t0's epoch: ``batches_per_epoch - t0 % batches_per_epoch``
                                steps, a whole epoch when t0 starts one); order only: a window
                                crossing an epoch boundary is refused, except by ``policy_switch``
                                (see ``s2_order``)
S3    parameter path            ``commute_pair`` (always 2 steps, inside one epoch)
S4    auxiliary state           ``reset_bn_stats``, ``freeze_bn_stats`` (2h of the BatchNorm decay
                                ``1 - momentum``: torch's BN ``momentum`` is the weight of the NEW
                                batch statistic, so momentum 0.1 is decay 0.9 and gives 14;
                                the smallest momentum of the model's BN layers is used);
                                ``flush_queue``, ``shuffle_queue`` (a FIFO queue has no half-life:
                                its lifetime is one full turnover, ceil(K / enqueue_size) steps,
                                with ``enqueue_size`` defaulting to ``sampler.batch_size``)
S5    teacher/meta state        ``reset_teacher``, ``freeze_teacher`` (2h of ``teacher_decay``)
none  control                   ``null`` (1 step, or the default window of ``like=<primitive>``)
====  ========================  ==================================================================

Where the decays live: ``ema_decay`` / ``teacher_decay`` are taken from the primitive's
parameter of that name, else from ``state.extra["ema_decay"]`` / ``state.extra["teacher_decay"]``
(a float or a 0-d tensor; keep them as tensors if the state is also snapshotted).

Every primitive works in place under ``torch.no_grad()`` and keeps tensor identity (optimizers
and training loops hold references to the tensors). Every precondition is checked before
anything is modified: a primitive that does not apply raises ``PerturbationError`` and the
state is untouched (contract 6).

Window-limited effects and what a training loop must honour (``Applied.finish(state)`` ends
them; the runner calls it at step ``start + length``):

- ``freeze_bn_stats`` sets ``momentum = 0.0`` on every BatchNorm layer, so a training-mode
  forward computes ``running = 0 * batch_stat + 1 * running``, i.e. leaves running_mean /
  running_var unchanged (exactly, for finite batch statistics, up to a -0.0 becoming +0.0;
  a NaN/Inf batch statistic would still propagate), while normalisation still uses the batch
  statistics as in ordinary training. ``num_batches_tracked`` still counts in torch's forward; ``finish``
  restores each layer's momentum (``None`` included) and, with ``restore_count=True`` (the
  default), puts ``num_batches_tracked`` back to its value at the freeze, so that a cumulative
  average (``momentum=None``) is as if the frozen batches had never been seen.
- ``freeze_teacher`` sets the 0-d bool tensor ``state.extra["teacher_frozen"]`` (created if
  absent, filled in place otherwise) to True; the training loop must skip its teacher update
  while ``teacher_frozen(state)`` is True. ``finish`` sets it back to False.
- The order primitives (S2, S3) write ``sampler.override_window(start, batches)`` for the
  window steps only; nothing is left to undo. They change the order of ids, never which ids an
  epoch contains, unless ``Primitive.changes_epoch_ids(params)`` declares it (``policy_switch``
  to or from ``wr``, by definition of that policy).

Estimands (SEED.md, section 6.1). Every primitive declares the seed-paired estimand it measures,
``Primitive.estimand(params) -> Estimand``, with the sign convention of the seed::

    memory effect = E_s[ M(control: memory kept) - M(treatment: memory perturbed) ]

e.g. ``ATE_opt = E[M(carry) - M(reset_momentum)]`` and ``ATE_order = E[M(rr) - M(wr)]``.
A positive effect therefore means the kept memory *raises* the metric M. Names by source:
S1 ``ATE_opt``, S2 ``ATE_order``, S3 ``ATE_path``, S4 ``ATE_aux``, S5 ``ATE_teacher``, control
``null``. The control arm is labelled ``carry`` (it carries the memory on), the treatment arm by
the primitive's name, except ``policy_switch``: control = the sampler's policy (``rr`` when not
known), treatment = the target policy. ``Applied.estimand`` records it for each application.

Randomness (``order_window_swap``, ``policy_switch``, ``shuffle_queue``) comes from one
generator per application, in this order of preference: the ``seed`` parameter
(``torch.Generator().manual_seed(seed)``); ``state.contract.generator("perturb",
primitive=crc32(name), step=start)`` (logged in the contract's consumption log, so the
treatment arm differs from the control only in the ``perturb`` stream); else (no contract)
``torch.Generator().manual_seed(s)`` with ``s`` the low 63 bits of
``xxh3_64("memstate.perturb|{name}|{start}")``. ``Applied.params["rng"]`` records which.
"""
from __future__ import annotations

from memstate.perturb._core import (ApplyFn, CheckFn, CoverageFn, DeclaredFn, EstimandFn,  # noqa: F401 (rule types)
                                    WindowCheckFn, WindowFn)
from memstate.perturb._core import (ESTIMAND_NAMES, REQUIRED, SOURCES, Applied, Estimand, PerturbationError, Primitive,
                                    SingleSourceViolation, TrainState, UnknownPrimitiveError, beta_for_halflife,
                                    halflife, teacher_frozen, windows_for_halflives)
from memstate.perturb.registry import apply_checked, check_single_source, get, names, register, unregister
from memstate.perturb import null, phase, s1_optimizer, s2_order, s3_path, s4_aux, s5_teacher

__all__ = [
    "halflife",
    "beta_for_halflife",
    "windows_for_halflives",
    "TrainState",
    "Primitive",
    "Applied",
    "PerturbationError",
    "UnknownPrimitiveError",
    "SingleSourceViolation",
    "REQUIRED",
    "names",
    "get",
    "register",
    "unregister",
    "apply_checked",
    "check_single_source",
    "teacher_frozen",
    "SOURCES",
    "ESTIMAND_NAMES",
    "Estimand",
]


# registration order is the order of names(): null, then S1..S5, then reset_all
for _module in (null, s1_optimizer, s2_order, s3_path, s4_aux, s5_teacher, phase):
    for _p in _module.PRIMITIVES:
        register(_p)
del _module, _p
