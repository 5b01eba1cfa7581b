"""Step-counter state shared by the optimizers that keep torch's ``step`` entry without a
cached plan (RMSprop, Adagrad): a CPU 0-d float32/float64 tensor per parameter, advanced by one
native ``increment_steps`` call per bucket, fingerprinted with the other state (key ``step``)."""
from __future__ import annotations

import torch

from memstate.optim._base import FusedOptimizer, _scalar_dtype
from memstate.optim.adam import Adam, _check_step


class StepCounted(FusedOptimizer):
    """FusedOptimizer whose state has torch's ``step`` counter next to its tensor buffers."""

    # Adam's step-counter fingerprinting (no super() calls inside, so shared as they are)
    _after_fingerprinted_step = Adam._after_fingerprinted_step
    _watch = Adam._watch
    _refingerprint = Adam._refingerprint

    def _check_step_state(self, p: torch.Tensor) -> None:
        """p's ``step`` must be what ``increment_steps`` takes (as load_state_dict leaves it)."""
        step = self.state[p].get("step")
        _check_step(step, lambda: self._param_label(p))
        if not (isinstance(step, torch.Tensor) and step.device.type == "cpu"
                and step.dtype in (torch.float32, torch.float64)):
            raise ValueError(f"memstate.optim.{self._name}: state 'step' of {self._param_label(p)} must be a "
                             f"float32 or float64 CPU tensor (as load_state_dict leaves it), got {step!r}")

    def _check_loaded_entry(self, p, key, v):
        if key == "step":
            _check_step(v, lambda: self._param_label(p))
        else:
            super()._check_loaded_entry(p, key, v)

    def _normalise_loaded_state(self):
        # as Adam: `step` lives on the CPU as a float32/float64 0-d tensor (torch's fused
        # optimizers keep it on the device; a plain number becomes one of torch's scalar dtype)
        super()._normalise_loaded_state()
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if not st or "step" not in st:
                    continue
                s = st["step"]
                if isinstance(s, torch.Tensor):
                    dtype = s.dtype if s.dtype in (torch.float32, torch.float64) else torch.float32
                    st["step"] = s.detach().to("cpu", dtype).reshape(())
                else:
                    st["step"] = torch.tensor(float(s), dtype=_scalar_dtype())
