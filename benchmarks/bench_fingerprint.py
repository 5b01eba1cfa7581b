"""msfp1 fingerprint throughput against a plain read of the same bytes, in the same run.

For each device and size: GB/s of memstate.fingerprint, of torch's sum over the same tensor
(the read anchor), and their ratio; also the multi-tensor path (many tensors, one call). CPU
cases are run for every ISA the CPU kernels support. Targets (issue 2): ratio >= 0.7 on CPU,
>= 0.8 on an H200. `of x1` (issue 12): bandwidth of the ~1000-tensor call over the single-tensor
call of the same bytes, target >= 0.8: the raw op (`fingerprint x1000 tensors`) and the public
call that builds the Fingerprint objects too (`fingerprint_many x1000`). The last lines give the serial host cost per tensor that
the many-tensor call pays (best of the rounds).

    python benchmarks/bench_fingerprint.py [--device cpu|cuda|all] [--json out.json] [--quick]
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402

import memstate  # noqa: E402
from memstate import _ext  # noqa: E402


def bench_device(device: str, sizes_mb, rounds: int):
    ops = _ext.ops()
    C = _ext.load()
    rows = []
    isas = C.build_info()["cpu_isas"].split(",") if device == "cpu" else ["-"]
    for mb in sizes_mb:
        n = mb * 2**20 // 4
        x = torch.randn(n, device=device)
        nbytes = x.numel() * 4
        many = list(torch.randn(n, device=device).split(max(1, n // 1000)))  # ~1000 tensors
        for isa in isas:
            if device == "cpu":
                C.set_cpu_isa(isa)
            cases = {
                "read (sum)": lambda: x.sum(),
                "fingerprint": lambda: ops.fingerprint([x]),
                "fingerprint x1000 tensors": lambda: ops.fingerprint(many),
                "fingerprint_many x1000": lambda: memstate.fingerprint_many(many),
            }
            inner = 1 if mb >= 64 or device == "cpu" else 10
            t = _timing.interleaved(cases, device, rounds=rounds, inner=inner)
            read = nbytes / t["read (sum)"] / 1e9
            for name in ("fingerprint", "fingerprint x1000 tensors", "fingerprint_many x1000"):
                gbs = nbytes / t[name] / 1e9
                rows.append({
                    "device": device, "isa": isa, "MB": mb, "case": name,
                    "GB/s": round(gbs, 2), "read GB/s": round(read, 2), "ratio": round(gbs / read, 3),
                    "of_x1": round(t["fingerprint"] / t[name], 3),
                })
        if device == "cpu":
            C.set_cpu_isa("auto")
        del x, many
    # sanity: what was timed is right
    y = torch.randn(12345, device=device)
    assert memstate.fingerprint(y) == memstate.Fingerprint(*memstate.reference.fingerprint_lanes(y.cpu()))
    return rows


def main(argv=None):
    args = _timing.parse_args(__doc__, default_rounds=9, argv=argv)
    import memstate.reference  # noqa: F401

    rows = []
    for dev in args.devices:
        big = [256] if dev == "cpu" else [256, 2048]
        rows += bench_device(dev, [16] if args.quick else [16] + big, rounds=args.rounds)
    _timing.print_rows(
        rows, f"{'device':6} {'isa':6} {'MB':>5}  {'case':26} {'GB/s':>8} {'read GB/s':>10} {'ratio':>6} {'of x1':>6}",
        lambda r: (f"{r['device']:6} {r['isa']:6} {r['MB']:>5}  {r['case']:26} {r['GB/s']:>8.2f} "
                   f"{r['read GB/s']:>10.2f} {r['ratio']:>6.3f} {r['of_x1']:>6.3f}"),
        args.json)
    for dev in args.devices:
        host = host_cost(dev, rounds=args.rounds)
        print(f"{dev} host cost per tensor (1,000 one-element tensors): "
              + ", ".join(f"{k} {v:.3f} us" for k, v in host.items()))


def host_cost(device: str, rounds: int, n: int = 1000):
    """Microseconds per tensor of a call over n one-element tensors: the serial per-tensor cost
    that `of x1` pays on top of the data work (the raw op, and the Python wrapper around it)."""
    ops = _ext.ops()
    tiny = list(torch.randn(n, device=device).split(1))
    cases = {"op": lambda: ops.fingerprint(tiny), "fingerprint_many": lambda: memstate.fingerprint_many(tiny)}
    t = _timing.interleaved(cases, device, rounds=max(rounds, 5), inner=10, stat="min")
    return {k: v / n * 1e6 for k, v in t.items()}


if __name__ == "__main__":
    main()
