"""Exact, fast snapshots of the whole training state.

``Snapshot.capture(model, optimizer, ...)`` copies every tensor of the training state into one
preallocated arena per device with the native fused copy + fingerprint op (one pass over
memory), and records the non-tensor state (optimizer hyperparameters, scheduler, scaler and
sampler state, RNG states) as a JSON tree. ``restore()`` copies everything back into the same
live objects, in place, verifying every tensor's msfp1 fingerprint in the same pass.
``save(path)`` writes a directory: ``manifest.json`` plus one raw data file, with checksums,
atomically; ``Snapshot.load(path, model=..., ...)`` verifies every checksum before binding the
saved state to live objects. Nothing is ever pickled.

Tensor names (also those of ``fingerprint()``): ``model.{name}``, ``optimizer.state.{i}.{key}``,
``extra.{key}[.{name}]``; further tensors of the snapshot (RNG states, tensors inside
scheduler/scaler/sampler state) are named ``rng.*``, ``scheduler.*``, ... and are verified by
checksum but are not part of ``fingerprint()``.

Modules, each depending only on those above it: ``_common`` (error, entries, alignment),
``_tree`` (the JSON state tree), ``_rng`` (RNG capture and checks), ``_bind`` (optimizer
binding), ``_arena`` (collection, layout, fused copy), ``_format`` (the files), ``_dist``
(per-rank snapshots and their global manifest under a torch.distributed process group),
``_core`` (the Snapshot object).
"""
from memstate.snapshot._common import SnapshotError
from memstate.snapshot._core import Snapshot

__all__ = ["Snapshot", "SnapshotError"]
