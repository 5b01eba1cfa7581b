"""The control primitive ``null``: changes nothing (the A/A arm)."""
from __future__ import annotations

from typing import Tuple

from memstate.perturb._core import Primitive
from memstate.perturb._rules import _need
from memstate.perturb.registry import get


def _null_window(state, p):
    like = p.get("like")
    if like is None:
        return 1
    _need(like != "null", "null", "like='null' is circular")
    return get(like).default_window(state)


PRIMITIVES: Tuple[Primitive, ...] = (
    Primitive("null", "none", (), window_fn=_null_window, params={"like": None},
              description="changes nothing: the A/A control; must leave the state digest unchanged",
              window_rule="1 step, or the default window of like=<primitive>"),
)
