"""Framework-independent part of the callbacks: open a trail, record steps, snapshot, close."""
from __future__ import annotations

from typing import Any, Optional

import torch

from memstate import audit


class Recorder:
    """Opens a Trail when training starts, records each optimizer step once, optionally saves a
    ``memstate.Snapshot`` right after step ``snapshot_step``, and closes the trail at the end.

    ``path``: the trail file; None means ``memstate.audit.auto()`` (``$MEMSTATE_TRAIL``, or no
    recording when it is unset). ``snapshot_step`` and ``snapshot_path`` go together."""

    def __init__(self, path: Optional[str], *, every: int = 1, snapshot_step: Optional[int] = None,
                 snapshot_path: Optional[str] = None, overwrite: bool = False, **trail_kwargs: Any):
        if (snapshot_step is None) != (snapshot_path is None):
            raise ValueError("snapshot_step and snapshot_path must be given together "
                             f"(got snapshot_step={snapshot_step!r}, snapshot_path={snapshot_path!r})")
        if snapshot_step is not None and (isinstance(snapshot_step, bool) or not isinstance(snapshot_step, int)
                                          or snapshot_step < 0):
            raise ValueError(f"snapshot_step must be an int >= 0, got {snapshot_step!r}")
        self.path, self.every, self.overwrite = path, every, overwrite
        self.snapshot_step, self.snapshot_path = snapshot_step, snapshot_path
        self.trail_kwargs = trail_kwargs
        self.trail: Any = None
        self.model: Optional[torch.nn.Module] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.last_step: Optional[int] = None

    def start(self, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], **extra: Any) -> None:
        # accelerate wraps the optimizer (AcceleratedOptimizer.optimizer): the trail wants the real one
        inner = getattr(optimizer, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            optimizer = inner
        self.model, self.optimizer = model, optimizer
        kwargs = {**self.trail_kwargs, **extra, "every": self.every}
        if self.path is None:
            self.trail = audit.auto(model, optimizer, **kwargs)
        else:
            self.trail = audit.Trail(self.path, model, optimizer, overwrite=self.overwrite, **kwargs)

    def step(self, step: int, *, loss: Any = None, batch_ids: Any = None) -> None:
        """Records optimizer step ``step`` unless already recorded (gradient accumulation)."""
        if self.trail is None or (self.last_step is not None and step <= self.last_step):
            return
        self.last_step = step
        if self.snapshot_step is not None and step == self.snapshot_step:
            from memstate.snapshot import Snapshot

            Snapshot.capture(self.model, self.optimizer).save(self.snapshot_path)
        self.trail.record(step, loss=loss, batch_ids=batch_ids)

    def close(self) -> None:
        if self.trail is not None:
            self.trail.close()
