"""Deterministic gradient clipping: memstate.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_
(foreach, torch's default), interleaved in the same run.

Cases: float32 gradients of 1M and 10M elements as 10, 100 and 1000 tensors, norm_type 2, a
max_norm that clips (so both scale every gradient). Prints the median time of each and the
ratio memstate / torch. Target (issue 11 item 8): ratio <= 1.0 on CPU. Each round restores the
gradients first (a copy, timed for both alike).

    python benchmarks/bench_clip.py [--device cpu|cuda|all] [--quick] [--stat median|min]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402

import memstate  # noqa: E402


def params(total: int, ntensors: int, device: str):
    g = torch.Generator().manual_seed(0)
    ps = []
    for _ in range(ntensors):
        p = torch.nn.Parameter(torch.empty(total // ntensors, device=device))
        p.grad = torch.randn(total // ntensors, generator=g).to(device)
        ps.append(p)
    return ps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "all"])
    ap.add_argument("--quick", action="store_true", help="1M elements only, fewer rounds")
    ap.add_argument("--stat", default="median", choices=["median", "min"])
    args = ap.parse_args(argv)
    print(f"machine: {_timing.machine()}")
    totals = [1_000_000] if args.quick else [1_000_000, 10_000_000]
    worst = 0.0
    for device in _timing.select_devices(args.device):
        for total in totals:
            for n in (10, 100, 1000):
                a, b = params(total, n, device), params(total, n, device)
                saved = [p.grad.clone() for p in a]

                def reset(ps):
                    torch._foreach_copy_([p.grad for p in ps], saved)

                def ours():
                    reset(a)
                    return memstate.clip_grad_norm_(a, 1.0)

                def theirs():
                    reset(b)
                    return torch.nn.utils.clip_grad_norm_(b, 1.0)

                t = _timing.interleaved({"memstate": ours, "torch": theirs}, device,
                                        rounds=5 if args.quick else 9, stat=args.stat)
                ratio = t["memstate"] / t["torch"]
                worst = max(worst, ratio)
                print(f"{device} {total / 1e6:g}M x {n:4d} tensors: memstate {t['memstate'] * 1e3:8.3f} ms  "
                      f"torch {t['torch'] * 1e3:8.3f} ms  ratio {ratio:.2f}")
    print(f"SUMMARY bench_clip: worst memstate/torch clip_grad_norm_ ratio {worst:.2f} (target <= 1.0)")


if __name__ == "__main__":
    main()
