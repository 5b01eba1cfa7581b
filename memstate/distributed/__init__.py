"""memstate on torch.distributed (docs/distributed.md).

- ``ReplicaCheck(model, optimizer, group=None, every=1, on_mismatch="raise", rng=False)``:
  data-parallel replicas compared by msfp1 fingerprint after every optimizer step.
- ``fingerprint(dtensor_or_shard, ...)`` and ``fingerprint_state(model_or_state, group=None)``:
  fingerprints of sharded tensors (DTensor ``Shard(0)`` / ``Replicate``, or ``LocalShard``)
  that equal those of the unsharded tensors bit for bit.

Everything here is a collective over a torch.distributed process group (gloo on CPU, NCCL on
GPU): every rank of the group must make the same calls in the same order.
"""
from memstate.distributed.replica import Mismatch, ReplicaCheck, ReplicaMismatch, ReplicaMismatchWarning
from memstate.distributed.sharded import LocalShard, fingerprint, fingerprint_state

__all__ = [
    "ReplicaCheck",
    "ReplicaMismatch",
    "ReplicaMismatchWarning",
    "Mismatch",
    "LocalShard",
    "fingerprint",
    "fingerprint_state",
]
