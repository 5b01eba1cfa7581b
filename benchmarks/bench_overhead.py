"""The cost of auditing (issue 15): one experiment arm against the same training with plain torch.optim.

Every case trains the built-in digits task (a small CNN, SGD momentum 0.9, lr 0.05, batch 64, one
torch thread) for one arm of the default experiment: steps t0 = 30 .. 120 (90 steps), calling
the task's own ``train_step`` (batch, augmentation noise, forward/backward, optimizer step).

    plain      torch.optim.SGD (foreach), no fingerprints, no snapshot, no trail  <- the anchor
    memstate   memstate.optim.SGD, fingerprints off
    +fp        memstate.optim.SGD with in-pass fingerprints (every step)
    +snapshot  ... and the arm starts with ``Snapshot.restore()`` of the branch point (the
               experiment restores one snapshot per branch)
    arm        ... and an audit trail (``memstate.audit.Trail``) recording every step, opened
               for the arm and closed (committed) at its end: the full experiment arm

The cases alternate round by round (``_timing.interleaved``); printed: seconds per arm (median
of rounds), the ratio to plain, and each step of the ladder's share. The snapshot's cost per
branch is also timed apart: one ``Snapshot.capture`` (once per seed, shared by every arm) and one
``restore`` (once per arm), as fractions of an arm's time. Targets (issue 15): arm / plain
<= 1.15 on CPU; <= 1.05 on GPU (``--device cuda``, gpu_check.sh).

    python benchmarks/bench_overhead.py [--device cpu|cuda|all] [--quick] [--rounds N] [--stat min] [--json out.json]
"""
from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402

import torch  # noqa: E402

from memstate import Snapshot, audit, tasks  # noqa: E402

T0, HORIZON = 30, 120
CASES = ("plain", "memstate", "+fp", "+snapshot", "arm")


def _state(device: str, case: str):
    """A digits TrainState trained to T0 with the case's optimizer."""
    task = tasks.get("digits", optimizer="sgd", momentum=0.9)
    state = task.build(0, device=device)
    if case == "plain":
        g = state.optimizer.param_groups[0]
        state.optimizer = torch.optim.SGD(state.model.parameters(), lr=g["lr"], momentum=g["momentum"],
                                          weight_decay=g["weight_decay"])
    else:
        state.optimizer.fingerprint = case != "memstate"
    for step in range(T0):
        task.train_step(state, step)
    state.step = T0
    return task, state


def _arm_runner(device: str, case: str, tmp: str, steps: int):
    """A closure running one arm (``steps`` steps from T0) of the case."""
    task, state = _state(device, case)
    snap = Snapshot.capture(**task.snapshot_sources(state)) if case in ("+snapshot", "arm") else None
    trail_path = os.path.join(tmp, f"{device}-arm.trail")
    counter = [0]  # trail steps must increase across arms of the same file: a global step count

    def run():
        if snap is not None:
            snap.restore()
        state.step = T0
        trail = audit.Trail(trail_path, state.model, state.optimizer, overwrite=True) if case == "arm" else None
        for step in range(T0, T0 + steps):
            ids = state.sampler.batch(step) if trail else None
            loss = task.train_step(state, step)
            if trail is not None:
                counter[0] += 1
                trail.record(counter[0], loss=loss, batch_ids=ids)
        if trail is not None:
            trail.close()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return run, task, state


def main(argv=None):
    args = _timing.parse_args(__doc__, default_rounds=7, argv=argv)
    steps = 20 if args.quick else HORIZON - T0
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for device in args.devices:
            runners = {c: _arm_runner(device, c, tmp, steps) for c in CASES}
            med = _timing.interleaved({c: r[0] for c, r in runners.items()}, device, rounds=args.rounds,
                                      warmup=1, stat=args.stat)
            _, task, state = runners["arm"]
            snap_cases = {"capture": lambda: Snapshot.capture(**task.snapshot_sources(state))}
            snap = Snapshot.capture(**task.snapshot_sources(state))
            snap_cases["restore"] = snap.restore
            snap_cases["recapture"] = snap.recapture
            snap_t = _timing.interleaved(snap_cases, device, rounds=args.rounds, inner=20, stat=args.stat)
            arm = med["arm"]
            for c in CASES:
                rows.append({"device": device, "case": c, "arm_s": med[c], "ms_per_step": med[c] / steps * 1e3,
                             "ratio": med[c] / med["plain"], "steps": steps, "rounds": args.rounds})
            rows.append({"device": device, "case": "snapshot per branch", "arm_s": None, "ms_per_step": None,
                         "ratio": None, "capture_ms": snap_t["capture"] * 1e3, "restore_ms": snap_t["restore"] * 1e3,
                         "recapture_ms": snap_t["recapture"] * 1e3, "capture_of_arm": snap_t["capture"] / arm,
                         "restore_of_arm": snap_t["restore"] / arm, "snapshot_bytes": snap.nbytes,
                         "steps": steps, "rounds": args.rounds})

    def fmt(r):
        if r["arm_s"] is None:
            return (f"{r['device']:6} {r['case']:20} capture {r['capture_ms']:.3f} ms ({100 * r['capture_of_arm']:.2f}% "
                    f"of an arm, once per seed), restore {r['restore_ms']:.3f} ms ({100 * r['restore_of_arm']:.2f}% "
                    f"of an arm, once per branch), recapture {r['recapture_ms']:.3f} ms; {r['snapshot_bytes']:,} bytes")
        return f"{r['device']:6} {r['case']:20} {r['arm_s']:10.4f} {r['ms_per_step']:12.3f} {r['ratio']:9.3f}"

    _timing.print_rows(rows, f"{'device':6} {'case':20} {'s per arm':>10} {'ms per step':>12} {'vs plain':>9}", fmt,
                       args.json)
    print(f"({steps} steps per arm, {args.rounds} rounds, {args.stat} of rounds; target: arm <= 1.15 x plain on "
          f"CPU, <= 1.05 on GPU)")


if __name__ == "__main__":
    main()
