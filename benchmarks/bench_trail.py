"""Audit-trail overhead: a digits training step with and without recording every step.

Both cases train the built-in digits task (memstate.tasks, default options: a small CNN,
AdamW, batch 64) with in-pass fingerprints on (``fingerprint=True``), so the parameter,
gradient and optimizer-state fingerprints come from the optimizer's own pass; the "trail" case
also calls ``Trail.record(step, loss=..., batch_ids=...)`` after every step (BatchNorm
buffers fingerprinted natively, RNG digests, batch-id hash, a commit every 50 steps with
synchronous=FULL). Blocks of steps of the two cases alternate round by round; printed: ms per
step (median of rounds), the ratio trail / plain, and the time spent inside ``record`` itself
(median and mean per step, commits included in the mean) with 1 + mean record / plain step, a
figure less exposed to the noise of a shared machine than the ratio of two step times.
Target (issue 13): <= 1.05 on CPU.

    python benchmarks/bench_trail.py [--device cpu|cuda|all] [--quick] [--rounds N] [--json out.json]
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402

from memstate import audit, tasks  # noqa: E402


def _runner(device: str, trail_path: str = None):
    """A closure running one training step of its own digits state (recording if asked)."""
    task = tasks.get("digits")
    state = task.build(0, device=device)
    state.optimizer.fingerprint = True  # in-pass fingerprints on in both cases
    trail = audit.Trail(trail_path, state.model, state.optimizer) if trail_path else None
    record_s = []  # seconds spent in Trail.record, per step

    def step():
        t = state.step
        ids = state.sampler.batch(t) if trail else None
        loss = task.train_step(state, t)
        if trail is not None:
            t0 = time.perf_counter()
            trail.record(t, loss=loss, batch_ids=ids)
            record_s.append(time.perf_counter() - t0)

    return step, trail, record_s


def main(argv=None):
    args = _timing.parse_args(__doc__, default_rounds=15, argv=argv)
    inner = 10 if args.quick else 40
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for device in args.devices:
            plain, _, _ = _runner(device)
            recorded, trail, record_s = _runner(device, os.path.join(tmp, f"{device}.trail"))
            med = _timing.interleaved({"plain": plain, "trail": recorded}, device, rounds=args.rounds, inner=inner)
            trail.close()
            with audit.TrailReader(trail.path) as r:
                n_steps, n_tensors = len(r.steps()), len(r.tensors)
            rows.append({"device": device, "plain_ms": med["plain"] * 1e3, "trail_ms": med["trail"] * 1e3,
                         "ratio": med["trail"] / med["plain"], "record_ms": statistics.median(record_s) * 1e3,
                         "record_mean_ms": statistics.fmean(record_s) * 1e3, "tensors": n_tensors, "steps_recorded": n_steps,
                         "rounds": args.rounds, "steps_per_round": inner})
    _timing.print_rows(
        rows, f"{'device':6} {'plain ms/step':>13} {'trail ms/step':>13} {'ratio':>7} {'record ms (median/mean)':>24} "
              f"{'1+mean/plain':>12} {'tensors':>7} {'steps':>6}",
        lambda r: f"{r['device']:6} {r['plain_ms']:13.3f} {r['trail_ms']:13.3f} {r['ratio']:7.3f} "
                  f"{r['record_ms']:11.3f} / {r['record_mean_ms']:10.3f} {1 + r['record_mean_ms'] / r['plain_ms']:12.3f} "
                  f"{r['tensors']:7d} {r['steps_recorded']:6d}",
        args.json)


if __name__ == "__main__":
    main()
