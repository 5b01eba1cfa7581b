"""Hugging Face transformers: ``MemstateTrainerCallback`` records a memstate audit trail.

    trainer = transformers.Trainer(..., callbacks=[MemstateTrainerCallback("run.trail")])

``transformers`` is imported on first use of ``MemstateTrainerCallback``.
"""
from __future__ import annotations

from typing import Any, Optional

from memstate.integrations._common import Recorder

__all__ = ["MemstateTrainerCallback"]

_INSTALL = "memstate.integrations.hf needs transformers: pip install 'memstate[hf]'"


def _build():
    try:
        from transformers import TrainerCallback
    except ImportError as e:
        raise ImportError(f"{_INSTALL} ({e})") from e

    class MemstateTrainerCallback(TrainerCallback):
        """Records a trail of every optimizer step of a ``transformers.Trainer``: parameters,
        gradients where still present (the Trainer zeroes them right after the step, so they
        come from a memstate optimizer's in-pass fingerprints or are absent), optimizer state,
        buffers and RNG digests. No loss is recorded (the Trainer does not hand it to callbacks
        at the end of a step).

        - ``path``: the trail file (None: ``memstate.audit.auto()``, i.e. ``$MEMSTATE_TRAIL``);
        - ``every``: record steps divisible by it;
        - ``snapshot_step``/``snapshot_path``: save a ``memstate.Snapshot`` of the model and
          optimizer right after that step;
        - other keyword arguments go to ``memstate.audit.Trail``.
        """

        def __init__(self, path: Optional[str] = None, *, every: int = 1, snapshot_step: Optional[int] = None,
                     snapshot_path: Optional[str] = None, **trail_kwargs: Any):
            self.recorder = Recorder(path, every=every, snapshot_step=snapshot_step, snapshot_path=snapshot_path,
                                     **trail_kwargs)

        @property
        def trail(self):
            return self.recorder.trail

        def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kw):
            self.recorder.start(model, optimizer, dataloader=train_dataloader)

        def on_step_end(self, args, state, control, **kw):
            self.recorder.step(int(state.global_step) - 1)

        def on_train_end(self, args, state, control, **kw):
            self.recorder.close()

    return MemstateTrainerCallback


_CACHE = {}


def __getattr__(name: str):
    if name == "MemstateTrainerCallback":
        if name not in _CACHE:
            _CACHE[name] = _build()
        return _CACHE[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
