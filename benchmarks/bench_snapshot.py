"""Snapshot capture and restore time against the usual ways of copying a training state, and
against one raw copy of the same number of bytes (the physical limit), interleaved in one run.

Contenders per case (states of 10, 200, 2000 and 10000 tensors, 10 MB to 500 MB; --quick:
10, 2000 and 10000 tensors of 10 and 100 MB):
  capture      Snapshot.recapture(): fused copy + msfp1 fingerprint into the reused arena
  restore      Snapshot.restore(): fused copy back + fingerprint verification
  clone        {k: v.clone() for k, v in model.state_dict().items()}
  deepcopy     copy.deepcopy(model.state_dict())
  torch.save   torch.save(model.state_dict(), BytesIO())
  raw copy     one dst.copy_(src) of the same number of bytes
Printed: ms per call, raw-copy time / time (fraction of the raw bandwidth), the speed-up of
capture over clone, and the host overhead per tensor of the case's tensor count (below).
deepcopy and torch.save run up to 2000 tensors (seconds beyond).

Host overhead: capture, restore and clone of N tensors of 16 bytes each (the copy itself is
negligible), in us per call and per tensor, and a line fitted through the smallest and
largest N: fixed us + us per tensor.

Targets (issues 4 and 12): GPU capture >= 0.85 of raw device copy bandwidth (1 GB in 2000
tensors, a CUDA-only case) and host time <= 1 ms for 2000 tensors (host-only column); CPU capture and restore >= 0.7 of raw memcpy at 100 MB in 2000
tensors and >= 3x faster than clone at 10 MB in 2000 tensors; capture host cost <= 50 us +
0.3 us per tensor.

    python benchmarks/bench_snapshot.py [--device cpu|cuda|all] [--quick] [--json out.json]
"""
from __future__ import annotations

import copy
import io
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402

from memstate import Snapshot  # noqa: E402


class Params(torch.nn.Module):
    def __init__(self, ntensors: int, nbytes: int, device: str):
        super().__init__()
        per = max(1, nbytes // 4 // ntensors)
        g = torch.Generator().manual_seed(0)
        self.ps = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(per, generator=g).to(device)) for _ in range(ntensors)])


def host_only(fn, reps: int = 20) -> float:
    """CUDA: seconds of host time per call, the device work left queued (synchronised once at
    the end). restore() synchronises itself (it compares fingerprints on the host)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sec = (time.perf_counter() - t0) / reps
    torch.cuda.synchronize()
    return sec


def host_overhead(device: str, counts, rounds: int):
    """Rows of per-call and per-tensor host time of N tiny tensors, and the fitted line per case."""
    rows, per_call = [], {}
    for n in counts:
        model = Params(n, n * 16, device)
        snap = Snapshot.capture(model, rng=False)
        cases = {"capture": snap.recapture, "restore": snap.restore,
                 "clone": lambda: {k: v.clone() for k, v in model.state_dict().items()}}
        t = _timing.interleaved(cases, device, rounds=rounds, warmup=1, inner=3)
        for name, sec in t.items():
            per_call[(n, name)] = sec
            rows.append({"device": device, "tensors": n, "case": name, "us": round(sec * 1e6, 1),
                         "us_per_tensor": round(sec * 1e6 / n, 3),
                         "host_only_us": round(host_only(cases[name]) * 1e6, 1) if device == "cuda" else None})
        del model, snap, cases
    lo, hi = min(counts), max(counts)
    fits = {}
    for name in ("capture", "restore", "clone"):
        slope = (per_call[(hi, name)] - per_call[(lo, name)]) / (hi - lo)
        fits[name] = (max(0.0, per_call[(lo, name)] - lo * slope) * 1e6, slope * 1e6)
    return rows, fits


def bench(device: str, quick: bool, rounds: int, host_us):
    rows = []
    sizes = [10, 100] if quick else [10, 100, 500]
    if device == "cuda":
        sizes.append(1024)  # the GPU target: >= 0.85 of a device-to-device copy at 1 GB in 2000 tensors
    counts = [10, 2000, 10000] if quick else [10, 200, 2000, 10000]
    for mb in sizes:
        for n in counts:
            model = Params(n, mb * 2**20, device)
            nbytes = sum(p.numel() * 4 for p in model.parameters())
            src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
            dst = torch.empty_like(src)
            snap = Snapshot.capture(model, rng=False)
            cases = {
                "raw copy": lambda: dst.copy_(src),
                "capture": snap.recapture,
                "restore": snap.restore,
                "clone": lambda: {k: v.clone() for k, v in model.state_dict().items()},
                "deepcopy": lambda: copy.deepcopy(model.state_dict()),
            }
            if n > 2000 or mb > 500:
                del cases["deepcopy"]
            elif device == "cpu" or mb <= 100:
                cases["torch.save"] = lambda: torch.save(model.state_dict(), io.BytesIO())
            t = _timing.interleaved(cases, device, rounds=rounds, warmup=1)
            for name, sec in t.items():
                rows.append({
                    "device": device, "MB": mb, "tensors": n, "case": name, "ms": round(sec * 1e3, 3),
                    "of_raw": round(t["raw copy"] / sec, 3),
                    "GB/s": round(nbytes / sec / 1e9, 2),
                    "capture_speedup": round(sec / t["capture"], 2),
                    "host_us_per_tensor": host_us.get((n, name)),
                })
            del model, src, dst, snap, cases
    return rows


def target_lines(rows, host_rows):
    """The issue-12 targets against this run's anchors."""
    out = []
    of_raw = {(r["device"], r["MB"], r["tensors"], r["case"]): r for r in rows}
    for dev in sorted({r["device"] for r in rows}):
        if dev == "cpu":
            for case in ("capture", "restore"):
                r = of_raw.get((dev, 100, 2000, case))
                if r:
                    out.append(f"target cpu  {case:8} 100 MB / 2000 tensors: {r['of_raw']:.3f} of raw (>= 0.7)")
            r = of_raw.get((dev, 10, 2000, "clone"))
            if r:
                out.append(f"target cpu  capture   10 MB / 2000 tensors: {r['capture_speedup']:.2f}x faster than clone"
                           f" (>= 3)")
        else:
            for case in ("capture", "restore"):
                r = of_raw.get((dev, 1024, 2000, case))
                if r:
                    out.append(f"target {dev} {case:8} 1 GB / 2000 tensors: {r['of_raw']:.3f} of a device copy"
                               f" (>= 0.85)")
            for r in host_rows:
                if r["device"] == dev and r["tensors"] == 2000 and r["case"] == "capture":
                    out.append(f"target {dev} capture host time, 2000 tensors: {r['host_only_us']:.1f} us (<= 1000)")
    return out


def main(argv=None):
    args = _timing.parse_args(__doc__, default_rounds=5, argv=argv)
    rows, host_rows, fit_lines = [], [], []
    for dev in args.devices:
        counts = [10, 2000, 10000] if args.quick else [10, 200, 2000, 10000]
        hrows, fits = host_overhead(dev, counts, max(args.rounds, 5))
        host_rows += hrows
        host_us = {(r["tensors"], r["case"]): r["us_per_tensor"] for r in hrows}
        rows += bench(dev, args.quick, args.rounds, host_us)
        fit_lines += [f"{dev:4} {name:8} host cost {fixed:8.1f} us + {per:6.3f} us per tensor"
                      + ("   (target: 50 us + 0.3 us)" if name == "capture" else "")
                      for name, (fixed, per) in fits.items()]
    _timing.print_rows(
        rows, f"{'dev':4} {'MB':>4} {'tensors':>7}  {'case':11} {'ms':>9} {'GB/s':>7} {'of raw':>7} {'capture x faster':>16}"
              f" {'host us/tensor':>14}",
        lambda r: (f"{r['device']:4} {r['MB']:>4} {r['tensors']:>7}  {r['case']:11} {r['ms']:>9.3f} {r['GB/s']:>7.2f} "
                   f"{r['of_raw']:>7.3f} {r['capture_speedup']:>16.2f} "
                   + (f"{r['host_us_per_tensor']:>14.3f}" if r["host_us_per_tensor"] is not None else f"{'':>14}")))
    print()
    header = (f"{'dev':4} {'tensors':>7}  {'case':8} {'us/call':>10} {'us/tensor':>9} {'host-only us':>12}"
              f"   (tensors of 16 bytes: host overhead; host-only: CUDA, without waiting for the device)")
    print(header)
    print("-" * len(header))
    for r in host_rows:
        print(f"{r['device']:4} {r['tensors']:>7}  {r['case']:8} {r['us']:>10.1f} {r['us_per_tensor']:>9.3f} "
              + (f"{r['host_only_us']:>12.1f}" if r["host_only_us"] is not None else f"{'':>12}"))
    print("\n".join(target_lines(rows, host_rows)))
    print("\n".join(fit_lines))
    if args.json:
        _timing.write_json(args.json, {"machine": _timing.machine(), "rows": rows, "host_overhead": host_rows,
                                       "fits": fit_lines})


if __name__ == "__main__":
    main()
