"""Fused optimizer step time: memstate (fingerprint off / on) against torch.optim foreach and
fused=True, interleaved in the same run, plus effective bandwidth against a plain copy.

Cases: 1M, 10M and 100M float32 parameters spread over 10 to 1000 tensors. For each case and
optimizer (AdamW, SGD with momentum; RMSprop, Adagrad, Lion and LAMB up to 10M) it prints the median
step time of every contender, the ratios memstate/torch-fused and memstate/torch-foreach, and
the effective bandwidth (bytes the step must move, divided by its time) as a fraction of a plain
device copy of the same number of bytes. Targets (issue 3):
CPU: fingerprint off <= 1.0x torch fused AdamW, fingerprint on <= 1.5x; CUDA: <= 1.0x fused,
fingerprint costing <= 5%, >= 0.85 of copy bandwidth.

Host overhead (issue 12): each optimizer (AdamW, SGD with momentum, RMSprop, Adagrad, Lion;
"+fp": fingerprint=True; torch fused AdamW for reference) over 1M parameters as 10,000 tensors of
100 elements against 100 tensors of 10,000, one thread, in the same run; prints the time per
tensor of the many-tensor case and its ratio to the few-tensor case. Target (AdamW): ratio <= 2
(host overhead <= 1 us per tensor), fingerprint off and on.

    python benchmarks/bench_optim.py [--device cpu|cuda|all] [--quick] [--stat median|min] [--json out.json]
                                     [--host-only]   (only the host-overhead section)
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402

import memstate.optim as mo  # noqa: E402

# bytes moved per parameter per step (fp32): reads + writes of every role
# LAMB (Apex's passes): global grad norm (read g), stage 1 (read g, p, m, v; write u, m, v), per-tensor
# norms (read p, u), stage 2 (read p, u; write p)
MOVED = {"adamw": (4 + 3) * 4, "sgd": (3 + 2) * 4, "rmsprop": (3 + 2) * 4, "adagrad": (3 + 2) * 4,
         "lion": (3 + 2) * 4, "lamb": (1 + 7 + 2 + 3) * 4}
HASHED = {"adamw": 4 * 4, "sgd": 3 * 4, "rmsprop": 3 * 4, "adagrad": 3 * 4, "lion": 3 * 4,
          "lamb": 4 * 4}  # param, grad, state(s)
# issue 11 item 7: RMSprop, Adagrad, Lion (one state buffer each; torch has no Lion, no fused RMSprop and
# a fused Adagrad on CPU only), benchmarked up to 10M parameters
MORE = {
    "rmsprop": (lambda ps, **kw: mo.RMSprop(ps, lr=1e-3, **kw), lambda ps, **kw: torch.optim.RMSprop(ps, lr=1e-3, **kw)),
    "adagrad": (lambda ps, **kw: mo.Adagrad(ps, lr=1e-3, **kw), lambda ps, **kw: torch.optim.Adagrad(ps, lr=1e-3, **kw)),
    "lion": (lambda ps, **kw: mo.Lion(ps, lr=1e-4, **kw), None),
    # LAMB: torch has none and Apex is not installable here; the anchor is TorchLAMB below (plain
    # torch foreach ops, the same algorithm), shown in the "torch foreach" column
    "lamb": (lambda ps, **kw: mo.LAMB(ps, lr=1e-3, **kw), lambda ps, **kw: TorchLAMB(ps, lr=1e-3, **kw)),
}


class TorchLAMB(torch.optim.Optimizer):
    """Apex FusedLAMB's algorithm (global clipping, adam_w_mode, grad averaging, bias correction,
    trust ratio) in plain torch ``_foreach`` ops: the benchmark's anchor for memstate.optim.LAMB."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, max_grad_norm=1.0,
                 foreach=True, fused=None):
        if fused or not foreach:
            raise ValueError("TorchLAMB is foreach only")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.max_grad_norm = max_grad_norm

    @torch.no_grad()
    def step(self):
        groups = [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for _, ps in groups for p in ps])))
        divisor = torch.where(norm > self.max_grad_norm, norm / self.max_grad_norm, torch.ones_like(norm))
        for group, ps in groups:
            beta1, beta2 = group["betas"]
            for p in ps:
                if not self.state[p]:
                    self.state[p].update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            states = [self.state[p] for p in ps]
            step = states[0]["step"] = states[0]["step"] + 1
            for st in states[1:]:
                st["step"] = step
            ms, vs = [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]
            g = torch._foreach_div([p.grad for p in ps], divisor)
            torch._foreach_mul_(ms, beta1)
            torch._foreach_add_(ms, g, alpha=1 - beta1)
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, g, g, value=1 - beta2)
            u = torch._foreach_div(ms, 1 - beta1 ** step)
            d = torch._foreach_div(vs, 1 - beta2 ** step)
            torch._foreach_sqrt_(d)
            torch._foreach_add_(d, group["eps"])
            torch._foreach_div_(u, d)
            torch._foreach_add_(u, ps, alpha=group["weight_decay"])
            pn, un = torch.stack(torch._foreach_norm(ps)), torch.stack(torch._foreach_norm(u))
            ratio = torch.where((pn > 0) & (un > 0), pn / un, torch.ones_like(pn)) * -group["lr"]
            torch._foreach_mul_(u, list(ratio.unbind()))
            torch._foreach_add_(ps, u)


def make_params(total: int, ntensors: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = total // ntensors
    sizes = [base + (1 if i < total - base * ntensors else 0) for i in range(ntensors)]
    ps = []
    for s in sizes:
        p = torch.randn(s, generator=g).to(device).requires_grad_()
        p.grad = torch.randn(s, generator=g).to(device) * 1e-3
        ps.append(p)
    return ps


def contenders(kind: str, device: str, total: int, ntensors: int):
    def clone_params():
        return make_params(total, ntensors, device)

    if kind == "adamw":
        mk = {
            "memstate": lambda ps: mo.AdamW(ps, lr=1e-3),
            "memstate+fp": lambda ps: mo.AdamW(ps, lr=1e-3, fingerprint=True),
            "torch foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
            "torch fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        }
    elif kind in MORE:
        ms, tc = MORE[kind]
        mk = {"memstate": ms, "memstate+fp": lambda ps: ms(ps, fingerprint=True)}
        if tc is not None:
            mk["torch foreach"] = lambda ps: tc(ps, foreach=True)
            mk["torch fused"] = lambda ps: tc(ps, fused=True)
    else:
        mk = {
            "memstate": lambda ps: mo.SGD(ps, lr=1e-3, momentum=0.9),
            "memstate+fp": lambda ps: mo.SGD(ps, lr=1e-3, momentum=0.9, fingerprint=True),
            "torch foreach": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, foreach=True),
            "torch fused": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, fused=True),
        }
    out = {}
    for name, make in mk.items():
        try:
            opt = make(clone_params())
            opt.step()  # creates state
            out[name] = opt.step
        except (RuntimeError, TypeError, ValueError) as e:  # e.g. no fused kernel for this device
            print(f"  ({name} unavailable on {device}: {str(e).splitlines()[0]})")
    return out


def bench(device: str, quick: bool, rounds: int, stat: str = "median"):
    rows = []
    if quick:
        grid = [(1_000_000, 10), (1_000_000, 1000)]
    else:
        grid = [(1_000_000, 10), (1_000_000, 1000), (10_000_000, 10), (10_000_000, 100),
                (10_000_000, 1000), (100_000_000, 10), (100_000_000, 1000)]
    for total, ntensors in grid:
        # anchor: a plain copy moving the same bytes as the AdamW step (half read, half written)
        src = torch.empty(MOVED["adamw"] * total // 8, dtype=torch.float32, device=device).normal_()
        dst = torch.empty_like(src)
        for kind in ("adamw", "sgd") + (tuple(MORE) if total <= 10_000_000 else ()):
            cases = contenders(kind, device, total, ntensors)
            cases["copy (anchor)"] = lambda: dst.copy_(src)
            r = rounds if total < 100_000_000 else max(3, rounds // 2)
            t = _timing.interleaved(cases, device, rounds=r, inner=1 if device == "cpu" or total >= 10_000_000 else 5,
                                    stat=stat)
            copy_gbs = src.numel() * 4 * 2 / t["copy (anchor)"] / 1e9
            fused, foreach = t.get("torch fused"), t.get("torch foreach")
            for name, sec in t.items():
                if name == "copy (anchor)":
                    continue
                moved = MOVED[kind] * total
                row = {
                    "device": device, "opt": kind, "params": total, "tensors": ntensors, "case": name,
                    "ms": round(sec * 1e3, 3),
                    "vs_fused": round(sec / fused, 3) if fused else None,
                    "vs_foreach": round(sec / foreach, 3) if foreach else None,
                    "GB/s": round(moved / sec / 1e9, 2),
                    "of_copy": round(moved / sec / 1e9 / copy_gbs, 3),
                }
                if name == "memstate+fp":
                    row["hashed GB/s"] = round(HASHED[kind] * total / sec / 1e9, 2)
                    row["fp_cost"] = round(sec / t["memstate"] - 1, 3)
                rows.append(row)
            rows.append({"device": device, "opt": kind, "params": total, "tensors": ntensors,
                         "case": "copy (anchor)", "ms": round(t["copy (anchor)"] * 1e3, 3),
                         "GB/s": round(copy_gbs, 2)})
            del cases
        del src, dst
    return rows


HOST_OPTS = {  # every fused optimizer's host overhead (issue 12: AdamW is the target case)
    "AdamW": lambda ps, **kw: mo.AdamW(ps, lr=1e-3, **kw),
    "SGD": lambda ps, **kw: mo.SGD(ps, lr=1e-3, momentum=0.9, **kw),
    "RMSprop": lambda ps, **kw: mo.RMSprop(ps, lr=1e-3, **kw),
    "Adagrad": lambda ps, **kw: mo.Adagrad(ps, lr=1e-3, **kw),
    "Lion": lambda ps, **kw: mo.Lion(ps, lr=1e-4, **kw),
}


def host_overhead(device: str, rounds: int, stat: str = "median"):
    """Each optimizer's step of 1M parameters as 10,000 x 100 vs 100 x 10,000 elements (one CPU
    thread), fingerprints off and on; torch fused AdamW for reference."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = []
        makers = {}
        for opt, make in HOST_OPTS.items():
            makers[f"{opt}"] = make
            makers[f"{opt}+fp"] = lambda ps, make=make: make(ps, fingerprint=True)
        makers["torch fused AdamW"] = lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)
        for name, make in makers.items():
            cases = {}
            for ntensors in (100, 10_000):
                opt = make(make_params(1_000_000, ntensors, device))
                opt.step()
                cases[ntensors] = opt.step
            t = _timing.interleaved(cases, device, rounds=rounds, inner=1, stat=stat)
            rows.append({"device": device, "case": name, "ms_100": round(t[100] * 1e3, 3),
                         "ms_10000": round(t[10_000] * 1e3, 3),
                         "us_per_tensor": round(t[10_000] / 10_000 * 1e6, 3),
                         "ratio": round(t[10_000] / t[100], 2)})
        return rows
    finally:
        torch.set_num_threads(threads)


def main(argv=None):
    args = _timing.parse_args(__doc__, default_rounds=7, argv=argv,
                              extra=[("--host-only", "only the host-overhead section")])
    host_only = args.host_only
    rows = []
    over = []
    for dev in args.devices:
        over += host_overhead(dev, args.rounds, args.stat)
    _timing.print_rows(
        over,
        f"{'dev':4} {'1M params, 1 thread':27} {'100x10k ms':>10} {'10kx100 ms':>10} {'us/tensor':>9} {'ratio':>6}",
        lambda r: (f"{r['device']:4} {r['case']:27} {r['ms_100']:>10.3f} {r['ms_10000']:>10.3f} "
                   f"{r['us_per_tensor']:>9.3f} {r['ratio']:>6.2f}"),
        args.json if host_only else None)
    if host_only:
        return
    print()
    for dev in args.devices:
        rows += bench(dev, args.quick, args.rounds, args.stat)
    fmt = lambda v, spec: format(v, spec) if v is not None else "-"
    _timing.print_rows(
        rows,
        (f"{'dev':4} {'opt':7} {'params':>9} {'tensors':>7}  {'case':14} {'ms':>9} {'vs fused':>8} {'vs fore':>7} "
         f"{'GB/s':>7} {'of copy':>7} {'fp cost':>7} {'hash GB/s':>9}"),
        lambda r: (f"{r['device']:4} {r['opt']:7} {r['params']:>9} {r['tensors']:>7}  {r['case']:14} {r['ms']:>9.3f} "
                   f"{fmt(r.get('vs_fused'), '>8.3f'):>8} {fmt(r.get('vs_foreach'), '>7.3f'):>7} {r['GB/s']:>7.2f} {fmt(r.get('of_copy'), '>7.3f'):>7} "
                   f"{fmt(r.get('fp_cost'), '>+7.1%'):>7} {fmt(r.get('hashed GB/s'), '>9.2f'):>9}"),
        args.json)


if __name__ == "__main__":
    main()
