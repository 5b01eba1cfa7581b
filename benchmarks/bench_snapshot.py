"""Snapshot capture and restore time against the usual ways of copying a training state, and
against one raw copy of the same number of bytes (the physical limit), interleaved in one run.

Contenders per case (states of 10, 200 and 2000 tensors, 10 MB to 500 MB):
  capture      Snapshot.recapture(): fused copy + msfp1 fingerprint into the reused arena
  restore      Snapshot.restore(): fused copy back + fingerprint verification
  clone        {k: v.clone() for k, v in model.state_dict().items()}
  deepcopy     copy.deepcopy(model.state_dict())
  torch.save   torch.save(model.state_dict(), BytesIO())
  raw copy     one dst.copy_(src) of the same number of bytes
Printed: ms per call, raw-copy time / time (fraction of the raw bandwidth), and the speed-up of
capture over clone. Targets (issue 4): GPU capture >= 0.85 of raw device copy bandwidth and
>= 3x faster than clone at 2000 tensors; CPU capture >= 0.7 of raw memcpy.

    python benchmarks/bench_snapshot.py [--device cpu|cuda|all] [--quick] [--json out.json]
"""
from __future__ import annotations

import copy
import io
import os
import sys

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


def bench(device: str, quick: bool, rounds: int):
    rows = []
    sizes = [10, 100] if quick else [10, 100, 500]
    counts = [10, 2000] if quick else [10, 200, 2000]
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
            if device == "cpu" or mb <= 100:
                cases["torch.save"] = lambda: torch.save(model.state_dict(), io.BytesIO())
            t = _timing.interleaved(cases, device, rounds=rounds, warmup=1)
            for name, sec in t.items():
                rows.append({
                    "device": device, "MB": mb, "tensors": n, "case": name, "ms": round(sec * 1e3, 3),
                    "of_raw": round(t["raw copy"] / sec, 3),
                    "GB/s": round(nbytes / sec / 1e9, 2),
                    "capture_speedup": round(sec / t["capture"], 2),
                })
            del model, src, dst, snap, cases
    return rows


def main(argv=None):
    args = _timing.parse_args(__doc__, default_rounds=5, argv=argv)
    rows = []
    for dev in args.devices:
        rows += bench(dev, args.quick, args.rounds)
    _timing.print_rows(
        rows, f"{'dev':4} {'MB':>4} {'tensors':>7}  {'case':11} {'ms':>9} {'GB/s':>7} {'of raw':>7} {'capture x faster':>16}",
        lambda r: (f"{r['device']:4} {r['MB']:>4} {r['tensors']:>7}  {r['case']:11} {r['ms']:>9.3f} {r['GB/s']:>7.2f} "
                   f"{r['of_raw']:>7.3f} {r['capture_speedup']:>16.2f}"),
        args.json)


if __name__ == "__main__":
    main()
