"""memstate: determinism and training-state audit for PyTorch.

Training is not memoryless: optimizer moments, data order, the path taken and auxiliary state
carry history. memstate measures that causally and makes the measurement trustworthy.

The native ops (``torch.ops.memstate.*``) load on first use; ``memstate.reference`` is a pure
numpy implementation of the msfp1 spec that needs no build.
"""
from memstate._version import __version__
from memstate import optim
from memstate.fingerprint import (
    Fingerprint,
    StateFingerprint,
    finalize_partial,
    fingerprint,
    fingerprint_many,
    fingerprint_partial,
    fingerprint_state,
)
from memstate.snapshot import Snapshot, SnapshotError
from memstate.clip import clip_grad_norm_, clip_grads_with_norm_, get_total_norm
from memstate import data, perturb, rng, stats
from memstate.perturb import beta_for_halflife, halflife
from memstate.experiment import Experiment, ExperimentResult
from memstate.tasks import Task
from memstate import audit  # noqa: E402 (memstate.audit.auto() etc. without a separate import)
from memstate.data import OrderSampler
from memstate.rng import ContractViolation, RngContract

__all__ = [
    "Task",
    "__version__",
    "optim",
    "Fingerprint",
    "StateFingerprint",
    "fingerprint",
    "fingerprint_many",
    "fingerprint_partial",
    "finalize_partial",
    "fingerprint_state",
    "Snapshot",
    "SnapshotError",
    "clip_grad_norm_",
    "clip_grads_with_norm_",
    "get_total_norm",
    "data",
    "rng",
    "perturb",
    "stats",
    "Experiment",
    "ExperimentResult",
    "halflife",
    "beta_for_halflife",
    "OrderSampler",
    "RngContract",
    "ContractViolation",
]
