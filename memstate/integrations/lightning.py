"""PyTorch Lightning: ``MemstateCallback`` records a memstate audit trail of a Trainer's run.

    trainer = lightning.Trainer(callbacks=[MemstateCallback("run.trail")], ...)

``lightning`` (``lightning.pytorch``) is imported on first use of ``MemstateCallback``;
``pytorch_lightning`` is used when only it is installed. ``callback_class(base)`` builds the
callback on another Callback base (e.g. ``pytorch_lightning.Callback`` when both packages are
installed and the Trainer is ``pytorch_lightning``'s).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from memstate.integrations._common import Recorder

__all__ = ["MemstateCallback", "callback_class"]

_INSTALL = "memstate.integrations.lightning needs Lightning: pip install 'memstate[lightning]'"


def _default_base():
    try:
        from lightning.pytorch import Callback
    except ImportError:
        try:
            from pytorch_lightning import Callback
        except ImportError as e:
            raise ImportError(f"{_INSTALL} ({e})") from e
    return Callback


def _loss_of(outputs: Any) -> Any:
    if isinstance(outputs, dict):
        return outputs.get("loss")
    return outputs


def callback_class(base: type) -> type:
    """The MemstateCallback class built on the Lightning ``Callback`` class ``base``."""

    class MemstateCallback(base):
        """Records a trail of every optimizer step (after ``optimizer.step()``): parameters,
        gradients, optimizer state, buffers, RNG digests and the loss ``training_step`` returned.

        - ``path``: the trail file (None: ``memstate.audit.auto()``, i.e. ``$MEMSTATE_TRAIL``);
        - ``every``: record steps divisible by it; ``batch_ids``: optional callable
          ``batch -> ids`` giving the sample ids of a batch;
        - ``snapshot_step``/``snapshot_path``: save a ``memstate.Snapshot`` of the module and
          optimizer right after that step;
        - other keyword arguments go to ``memstate.audit.Trail``.
        """

        def __init__(self, path: Optional[str] = None, *, every: int = 1,
                     batch_ids: Optional[Callable[[Any], Any]] = None, snapshot_step: Optional[int] = None,
                     snapshot_path: Optional[str] = None, **trail_kwargs: Any):
            super().__init__()
            self.recorder = Recorder(path, every=every, snapshot_step=snapshot_step, snapshot_path=snapshot_path,
                                     **trail_kwargs)
            self.batch_ids = batch_ids

        @property
        def trail(self):
            return self.recorder.trail

        def on_train_start(self, trainer, pl_module):
            optimizers = list(getattr(trainer, "optimizers", []) or [])
            if len(optimizers) > 1:
                raise ValueError(f"MemstateCallback records one optimizer; this Trainer has {len(optimizers)}")
            loader = getattr(trainer, "train_dataloader", None)
            self.recorder.start(pl_module, optimizers[0] if optimizers else None,
                                dataloader=loader if hasattr(loader, "num_workers") else None)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = int(trainer.global_step) - 1  # global_step counts optimizer steps taken
            if step < 0:
                return
            ids = self.batch_ids(batch) if self.batch_ids is not None else None
            self.recorder.step(step, loss=_loss_of(outputs), batch_ids=ids)

        def on_train_end(self, trainer, pl_module):
            self.recorder.close()

        def on_exception(self, trainer, pl_module, exception):
            self.recorder.close()

    return MemstateCallback


_CACHE = {}


def __getattr__(name: str):
    if name == "MemstateCallback":
        if name not in _CACHE:
            _CACHE[name] = callback_class(_default_base())
        return _CACHE[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
