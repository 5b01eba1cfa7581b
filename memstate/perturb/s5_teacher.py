"""S5, teacher/meta state: the EMA teacher reset to the student, or frozen for the window."""
from __future__ import annotations

from typing import Tuple

import torch

from memstate.perturb._core import Primitive, windows_for_halflives
from memstate.perturb._rules import _copy_from_model_rule, _need, _stateful_decay


_teacher_check, _teacher_apply = _copy_from_model_rule("reset_teacher")


def _freeze_teacher_check(state, p):
    key, flag_key = p["key"], p["flag_key"]
    _need((state.extra or {}).get(key) is not None, "freeze_teacher",
          f"state.extra has no {key!r} (present: {sorted(state.extra or {}) or 'nothing'})")
    flag = state.extra.get(flag_key)
    if flag is not None:
        _need(isinstance(flag, torch.Tensor) and flag.numel() == 1, "freeze_teacher",
              f"state.extra[{flag_key!r}] must be a one-element tensor flag, got {type(flag).__name__}")
        _need(not bool(flag.item()), "freeze_teacher", "the teacher is already frozen")


def _freeze_teacher_apply(state, p, start, length):
    flag_key = p["flag_key"]
    flag = state.extra.get(flag_key)
    if flag is None:
        state.extra[flag_key] = torch.tensor(True)
    else:
        flag.fill_(True)

    def finish(state_):
        state.extra[flag_key].fill_(False)
    return finish


PRIMITIVES: Tuple[Primitive, ...] = (
    Primitive("reset_teacher", "S5", ("extra.teacher.*",),
              check_fn=_teacher_check, apply_fn=_teacher_apply,
              declared_fn=lambda st, p: (f"extra.{p['key']}.*",),
              window_fn=lambda st, p: windows_for_halflives(
                  _stateful_decay(st, p, "teacher_decay", "reset_teacher", "teacher EMA")),
              params={"key": "teacher", "teacher_decay": None},
              description="teacher parameters and buffers := the student's",
              window_rule="two half-lives of teacher_decay"),
    Primitive("freeze_teacher", "S5", ("extra.teacher_frozen",),
              check_fn=_freeze_teacher_check, apply_fn=_freeze_teacher_apply,
              declared_fn=lambda st, p: (f"extra.{p['flag_key']}",),
              window_fn=lambda st, p: windows_for_halflives(
                  _stateful_decay(st, p, "teacher_decay", "freeze_teacher", "teacher EMA")),
              params={"key": "teacher", "flag_key": "teacher_frozen", "teacher_decay": None},
              description="extra[flag_key] := True for the window (the loop skips teacher updates "
                          "while teacher_frozen(state)); finish sets it to False",
              window_rule="two half-lives of teacher_decay"),
)
