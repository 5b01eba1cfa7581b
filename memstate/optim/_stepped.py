"""Step-counter state shared by the optimizers that keep torch's ``step`` entry (Adam, AdamW,
RMSprop, Adagrad): a CPU 0-d float32/float64 tensor per parameter, advanced by one native
``increment_steps`` call per bucket, fingerprinted with the other state (key ``step``)."""
from __future__ import annotations

import math

import torch

from memstate import _ext
from memstate.optim._base import _VERSION, FusedOptimizer, _scalar_dtype


def _check_step(step, label) -> None:
    """A ``step`` state must be a finite count >= 0: a number or a one-element real tensor
    (torch keeps it as a 0-d float32 tensor). ``label()`` names the parameter in the ValueError."""
    ok = isinstance(step, (int, float)) and not isinstance(step, bool)
    if isinstance(step, torch.Tensor):
        ok = step.numel() == 1 and not step.is_complex() and step.dtype != torch.bool and not step.is_meta
    if ok:
        value = float(step)
        ok = math.isfinite(value) and value >= 0
    if not ok:
        desc = (f"a {step.dtype} tensor of shape {tuple(step.shape)}" if isinstance(step, torch.Tensor)
                else repr(step))
        raise ValueError(f"state 'step' of {label()} is {desc}; expected a finite count >= 0 "
                         f"(a number or a one-element tensor)")


class StepCounted(FusedOptimizer):
    """FusedOptimizer whose state has torch's ``step`` counter next to its tensor buffers."""

    def _check_step_state(self, p: torch.Tensor) -> None:
        """p's ``step`` must be what ``increment_steps`` takes (as load_state_dict leaves it)."""
        step = self.state[p].get("step")
        _check_step(step, lambda: self._param_label(p))
        if not (isinstance(step, torch.Tensor) and step.device.type == "cpu"
                and step.dtype in (torch.float32, torch.float64)):
            raise ValueError(f"memstate.optim.{self._name}: state 'step' of {self._param_label(p)} must be a "
                             f"float32 or float64 CPU tensor (as load_state_dict leaves it), got {step!r}")

    _plan_counted = True  # cached plans hold, increment and fingerprint the step counters natively

    def _plan_watch(self, stepped):
        return self._watch(stepped)

    def _increment_steps(self, states):
        """Advances the ``step`` counters of ``states`` by one (one native call) and returns the new
        values for the kernel. The kernel checks its arguments (e.g. a gradient that is the
        parameter's memory) only after this; if it refuses, ``_run_kernel`` puts the counters back,
        so a refused step leaves them as they were."""
        counters = [st["step"] for st in states]
        self._advanced = (counters, [c.clone() for c in counters])
        return _ext.ops().increment_steps(counters)

    def _run_kernel(self, op, bucket, roles, *args):
        advanced, self._advanced = getattr(self, "_advanced", None), None
        try:
            return super()._run_kernel(op, bucket, roles, *args)
        except BaseException:
            for counter, old in zip(*advanced) if advanced else ():
                counter.copy_(old)
            raise

    def _after_fingerprinted_step(self):
        # The step counters are tensor state too: fingerprint them in one native call, kept
        # pending like the kernel's rows until someone asks (a cached plan's step returns them).
        params = [p for bucket, _, _ in self._pending for p in bucket]
        if not params:  # no parameter had a gradient: nothing stepped, nothing to fingerprint
            return
        rows = _ext.ops().fingerprint([self.state[p]["step"] for p in params])
        self._pending.append((params, ("step",), rows.unsqueeze(1)))
        # versions of what was fingerprinted: a later write (Snapshot.restore) makes them stale
        self._fp_watch = self._watch(params)
        self._fp_versions = list(map(_VERSION, self._fp_watch))

    def _watch(self, params):
        """``params`` and their tensor state: the tensors whose later writes make fingerprints stale."""
        return params + [t for st in map(self.state.__getitem__, params) for t in st.values()
                         if isinstance(t, torch.Tensor)]

    def _refingerprint(self):
        # the tensors of the last step were overwritten: fingerprint what they hold now
        params = list({id(p): p for bucket, _, _ in self._pending for p in bucket}.values()) or [
            p for g in self.param_groups for p in g["params"] if id(p) in self._fingerprints]
        self._pending, self._fingerprints, self._fp_watch = [], {}, []
        live = [p for p in params if self.state.get(p)]
        if not live:
            return
        for p in live:
            st = self.state[p]
            named = [("param", p)] + ([("grad", p.grad)] if p.grad is not None else []) + [
                (k, v) for k, v in st.items() if isinstance(v, torch.Tensor)]
            rows = _ext.ops().fingerprint([t.contiguous() for _, t in named])
            self._pending.append(([p], tuple(k for k, _ in named), rows.unsqueeze(0)))
        self._fp_watch = self._watch(live)
        self._fp_versions = list(map(_VERSION, self._fp_watch))

    def _check_loaded_entry(self, p, key, v):
        if key == "step":
            _check_step(v, lambda: self._param_label(p))
        else:
            super()._check_loaded_entry(p, key, v)

    def _normalise_loaded_state(self):
        # torch's fused/capturable optimizers keep `step` on the device; ours lives on the CPU, as a
        # float32 or float64 0-d tensor (a plain number becomes one of torch's scalar dtype)
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
