"""ReplicaCheck overhead per DDP step on the digits task, 2 gloo ranks (CPU), interleaved in one run.

Each rank trains the digits CNN (memstate.tasks.DigitsNet, 1400 training images) under DDP,
batch 64 per rank, in several otherwise identical loops, timed round by round in the same
processes (tests/dist_helper.run_ranks):

  memstate             memstate.optim.AdamW, fingerprint=False, no ReplicaCheck
  memstate+fp          memstate.optim.AdamW, fingerprint=True, no ReplicaCheck (anchor)
  memstate+fp+check    the same with ReplicaCheck(every=1): in-pass fingerprints all-gathered
  memstate+fp+check(defer)  ReplicaCheck(defer=True): compared at the next step, the
                       all_gather overlapping the next forward/backward
  torch                torch.optim.AdamW (foreach), no ReplicaCheck (anchor of the next)
  torch+check          the same with ReplicaCheck(every=1): fingerprint_many fallback pass

It prints the time per step of each loop on rank 0 (minimum over rounds by default: the best
estimate of the undisturbed time on a shared machine; --stat median for the typical one), the
ratios check / anchor, and the bytes ReplicaCheck sends and receives per rank per step next to
DDP's gradient all-reduce payload. Target (issue 14): overhead ~0, i.e. a ratio close to 1.

    python benchmarks/bench_replica.py [--steps 10] [--rounds 15] [--stat min|median] [--arch cnn|mlp]
                                       [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE, os.path.join(ROOT, "tests")]  # this checkout's memstate, _timing, dist_helper

from dist_helper import run_ranks  # noqa: E402

BATCH = 64
LOOPS = ("memstate", "memstate+fp", "memstate+fp+check", "memstate+fp+check(defer)", "torch", "torch+check")


def _loop(name, arch):
    """(step function, ReplicaCheck or None) for one contender; same init on every loop."""
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    import memstate.optim as mo
    from memstate.distributed import ReplicaCheck
    from memstate.tasks import DigitsNet, _digits_cpu

    rank = torch.distributed.get_rank()
    data = _digits_cpu()
    x, y = data["x_train"], data["y_train"]
    torch.manual_seed(0)
    model = DDP(DigitsNet(arch=arch))
    if name.startswith("memstate"):
        opt = mo.AdamW(model.parameters(), lr=3e-3, fingerprint="+fp" in name)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, foreach=True)
    check = ReplicaCheck(model, opt, defer="defer" in name) if "+check" in name else None
    order = torch.Generator().manual_seed(rank)
    state = {"i": 0}

    def step():
        idx = torch.randint(0, x.shape[0], (BATCH,), generator=order)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        state["i"] += 1

    return step, check, model


def rank_main(rank, world, steps, rounds, arch, stat):
    import _timing
    import torch

    loops = {name: _loop(name, arch) for name in LOOPS}

    def run(fn):
        return lambda: [fn() for _ in range(steps)]

    times = _timing.interleaved({k: run(fn) for k, (fn, _, _) in loops.items()}, "cpu", rounds=rounds, warmup=1,
                                 stat=stat)
    check = loops["memstate+fp+check"][1]
    model = loops["memstate"][2]
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "per_step_s": {k: v / steps for k, v in times.items()},
        "check_bytes_sent": check.bytes_per_check,
        "check_bytes_received": check.bytes_per_check * world,
        "check_tensors": check.bytes_per_check // 16 - 1,
        "torch_check_bytes_sent": loops["torch+check"][1].bytes_per_check,
        "ddp_grad_bytes": grad_bytes,
        "params": sum(p.numel() for p in model.parameters()),
        "mismatches": sum(len(c.history) for _, c, _ in loops.values() if c is not None),
        "threads": torch.get_num_threads(),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="steps per timed sample")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--stat", choices=("min", "median"), default="min")
    ap.add_argument("--arch", choices=("cnn", "mlp"), default="cnn")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    import _timing

    world = 2
    results = run_ranks(rank_main, world, args.steps, args.rounds, args.arch, args.stat, timeout=1800)
    r0 = results[0]
    t = r0["per_step_s"]
    print(f"ReplicaCheck on DDP digits ({args.arch}, {r0['params']} parameters), {world} gloo ranks, "
          f"batch {BATCH}/rank, {r0['threads']} thread/rank, {args.stat} of {args.rounds} rounds x {args.steps} steps")
    for name in LOOPS:
        print(f"  {name:<26s} {t[name] * 1e3:8.3f} ms/step")
    ratio_fp = t["memstate+fp+check"] / t["memstate+fp"]
    ratio_all = t["memstate+fp+check"] / t["memstate"]
    ratio_torch = t["torch+check"] / t["torch"]
    ratio_defer = t["memstate+fp+check(defer)"] / t["memstate+fp"]
    print(f"  ratio memstate+fp+check / memstate+fp : {ratio_fp:.3f}  (the check itself)")
    print(f"  ratio memstate+fp+check / memstate    : {ratio_all:.3f}  (check + in-pass fingerprints)")
    print(f"  ratio memstate+fp+check(defer) / memstate+fp : {ratio_defer:.3f}  (deferred comparison)")
    print(f"  ratio torch+check / torch             : {ratio_torch:.3f}  (check with fingerprint_many fallback)")
    print(f"  bytes per step per rank: ReplicaCheck sends {r0['check_bytes_sent']} and receives "
          f"{r0['check_bytes_received']} ({r0['check_tensors']} tensors x 16 + 16 header, one all_gather); "
          f"DDP all-reduces {r0['ddp_grad_bytes']} bytes of gradients")
    print(f"  mismatches reported: {sum(r['mismatches'] for r in results)} (a clean run must report 0)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": _timing.machine(),
                       "arch": args.arch, "stat": args.stat, "ranks": results, "ratios": {
                           "check_vs_fp": ratio_fp, "defer_vs_fp": ratio_defer, "check_vs_nofp": ratio_all,
                           "torch_check_vs_torch": ratio_torch}},
                      f, indent=2)


if __name__ == "__main__":
    main()
