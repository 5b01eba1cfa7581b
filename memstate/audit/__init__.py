"""Audit trails for any training loop: record, diff, verify.

    trail = memstate.audit.Trail("run.trail", model=model, optimizer=opt)
    for t, (x, y, ids) in enumerate(loader):
        ...; opt.step()
        trail.record(t, loss=loss, batch_ids=ids)
    trail.close()

    memstate.audit.diff("a.trail", "b.trail")       # first step and tensors where runs part
    memstate.audit.verify_script("train.py")        # run twice (script calls auto()), diff

See docs/audit.md.
"""
from memstate.audit.trail import (
    ABSENT,
    FORMAT,
    KINDS,
    SCHEMA_VERSION,
    NullTrail,
    StepRecord,
    Trail,
    TrailError,
    TrailReader,
)
from memstate.audit.diff import TrailDiff, diff, main_diff
from memstate.audit.verify import ENV_STEPS, ENV_TRAIL, VerifyResult, auto, main_verify_script, verify_script

__all__ = [
    "Trail",
    "TrailReader",
    "TrailError",
    "NullTrail",
    "StepRecord",
    "TrailDiff",
    "diff",
    "main_diff",
    "auto",
    "verify_script",
    "VerifyResult",
    "main_verify_script",
    "ENV_TRAIL",
    "ENV_STEPS",
    "KINDS",
    "FORMAT",
    "SCHEMA_VERSION",
    "ABSENT",
]
