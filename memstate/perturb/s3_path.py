"""S3, parameter path: two consecutive batches applied in the other order."""
from __future__ import annotations

from typing import Tuple

from memstate.perturb._core import Primitive
from memstate.perturb._rules import _check_within_epoch, _need, _sampler_check_factory, _window_batches


def _commute_apply(state, p, start, length):
    s = state.sampler
    a, b = _window_batches(s, start, 2)
    s.override_window(start, [b, a])


class _CommutePair(Primitive):
    def _check_window(self, state, p, start, length):
        _need(length == 2, self.name, f"swaps exactly two consecutive batches: window must be 2, got {length}")
        _check_within_epoch(state, self.name, start, length)  # else the two epochs would trade a batch


PRIMITIVES: Tuple[Primitive, ...] = (
    _CommutePair("commute_pair", "S3", ("sampler.window",),
                 check_fn=_sampler_check_factory("commute_pair"), window_fn=lambda st, p: 2,
                 apply_fn=_commute_apply,
                 description="the batches of steps t and t+1 applied as BA instead of AB (both in one "
                             "epoch: t may not be the last step of an epoch)",
                 window_rule="2 steps (always)"),
)
