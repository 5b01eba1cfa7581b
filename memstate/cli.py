"""The ``memstate`` command line.

    memstate run [CONFIG.toml] [...]   the default experiment: a seed-paired branch-and-hold
                                       measurement; writes card.json, results.csv, report.html
    memstate replay card.json          re-run a protocol card and verify every fingerprint
    memstate report card.json          regenerate report.html from a card
    memstate verify [--device]         RNG isolation / A-A check on this hardware (+ CPU == CUDA)
    memstate info                      versions, build, devices and determinism settings
    memstate demo                      a short tour of fingerprints, optimizers and snapshots
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import List, Optional


def _info_lines() -> List[str]:
    import torch

    from memstate import __version__, _ext

    info = _ext.build_info()
    lines = [
        f"memstate        {__version__}",
        f"python          {platform.python_version()} ({platform.machine()})",
        f"torch           {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
    ]
    if info.get("built"):
        lines += [
            f"native build    memstate._C {info['version']}, sources {info['source_hash']}, "
            f"built against torch {info['torch_version']}",
            f"CUDA kernels    {'compiled' if info['cuda'] else 'not compiled (CPU-only build)'}",
            f"CPU kernels     ISA {info['cpu_isa']} (supported: {info['cpu_isas']}), "
            f"{torch.get_num_threads()} threads",
        ]
    else:
        lines.append(f"native build    NOT AVAILABLE: {info['error']}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(
                f"device cuda:{i}   {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}"
            )
    else:
        lines.append("devices         cpu only (no CUDA device visible)")
    det = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    lines += [
        f"determinism     torch.use_deterministic_algorithms={det}"
        + (" (warn only)" if det and warn_only else ""),
        f"                cudnn.deterministic={torch.backends.cudnn.deterministic} "
        f"cudnn.benchmark={torch.backends.cudnn.benchmark} "
        f"CUBLAS_WORKSPACE_CONFIG={os.environ.get('CUBLAS_WORKSPACE_CONFIG', '(unset)')}",
        f"                matmul TF32={torch.backends.cuda.matmul.allow_tf32} "
        f"cudnn TF32={torch.backends.cudnn.allow_tf32}",
    ]
    return lines


def cmd_info(args) -> int:
    print("\n".join(_info_lines()))
    return 0


def cmd_demo(args) -> int:
    import torch

    import memstate
    from memstate import reference

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32), torch.nn.Linear(32, 10))
    w = net[0].weight
    print("msfp1 fingerprints (128-bit, position-keyed, order-free to compute)")
    f = memstate.fingerprint(w)
    print(f"  weight {tuple(w.shape)}              {f.hex()}")
    print(f"  numpy reference agrees            {reference.fingerprint_hex(w) == f.hex()}")
    u = w.detach().clone()
    u.view(-1)[7] = torch.nextafter(u.view(-1)[7], torch.tensor(1e9))
    print(f"  one element moved by one ulp      {memstate.fingerprint(u).hex()}")
    s = w.detach().clone().view(-1)
    s[[0, 1]] = s[[1, 0]]
    print(f"  two elements swapped              {memstate.fingerprint(s).hex()}")
    before = memstate.fingerprint_state(net)
    net.train()
    net(torch.randn(16, 64))  # a forward pass in train mode updates BatchNorm statistics only
    after = memstate.fingerprint_state(net)
    print(f"state digest before a forward pass  {before.digest}")
    print(f"state digest after                  {after.digest}")
    print(f"entries that changed                {', '.join(after.diff(before))}")

    # fused optimizer with in-pass fingerprints, and a snapshot that replays bit for bit
    opt = memstate.optim.AdamW(net.parameters(), lr=1e-2, fingerprint=True)
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))

    def train(steps):
        digests = []
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x + 0.1 * torch.randn_like(x)), y).backward()
            opt.step()
            digests.append(opt.state_fingerprint().digest)
        return digests

    train(3)
    print(f"AdamW step, in-pass fingerprints   {len(opt.state_fingerprint())} tensors, digest {opt.state_fingerprint().digest}")
    snap = memstate.Snapshot.capture(net, opt)
    first = train(4)
    snap.restore()
    second = train(4)
    print(f"snapshot {snap.nbytes / 1024:.0f} KiB: 4 steps after restore replay bit for bit: {first == second}")
    return 0 if first == second else 1


RUN_DEFAULTS = {"task": "digits", "perturbation": "reset_momentum", "seeds": 5, "t0": 30, "window": None,
                "horizon": 120, "device": "cpu", "metrics": None, "perturbation_params": {}, "task_options": {},
                "estimand": "treatment"}
QUICK = {"seeds": 3, "t0": 8, "horizon": 30}


def _run_config(args) -> dict:
    cfg = dict(RUN_DEFAULTS)
    if args.config:
        import tomllib

        with open(args.config, "rb") as f:
            loaded = tomllib.load(f)
        unknown = sorted(set(loaded) - set(RUN_DEFAULTS))
        if unknown:
            raise SystemExit(f"memstate run: unknown key(s) {unknown} in {args.config}; valid: {', '.join(RUN_DEFAULTS)}")
        cfg.update(loaded)
    if args.quick:
        cfg.update(QUICK)
    for key in ("task", "perturbation", "seeds", "t0", "window", "horizon", "device", "estimand"):
        v = getattr(args, key, None)
        if v is not None:
            cfg[key] = v
    return cfg


def cmd_run(args) -> int:
    import json

    from memstate.card import make_card, write_card
    from memstate.experiment import ConfigError, Experiment
    from memstate.report import write_report

    cfg = _run_config(args)
    out = args.resume or args.out or os.path.join("runs", f"{cfg['task']}-{cfg['perturbation']}")
    try:
        exp = Experiment(cfg["task"], cfg["perturbation"], t0=cfg["t0"], window=cfg["window"], horizon=cfg["horizon"],
                         seeds=cfg["seeds"], metrics=cfg["metrics"], perturbation_params=cfg["perturbation_params"],
                         task_options=cfg["task_options"], device=cfg["device"], estimand=cfg["estimand"],
                         progress=not args.no_progress)
    except ConfigError as e:
        print(f"memstate run: {e}", file=sys.stderr)
        return 2
    os.makedirs(out, exist_ok=True)
    print(f"memstate run: {cfg['task']} / {cfg['perturbation']}, t0={cfg['t0']}, window={cfg['window'] or 'default'}, "
          f"horizon={cfg['horizon']}, seeds={exp.seeds} -> {out}")
    try:
        result = exp.run(out_dir=out, resume=bool(args.resume))
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished seeds are in {out}/seeds; continue with --resume {out}", file=sys.stderr)
        return 130
    print(result.table())
    print("A/A check: " + ("bitwise identical at every step" if result.aa_identical else
                           json.dumps([r["aa"] for r in result.records if not r["aa"]["identical"]])))
    if result.violations:
        print("contract violations:\n  " + "\n  ".join(result.violations))
    card = make_card(result)
    write_card(card, os.path.join(out, "card.json"))
    report = write_report(card, out)
    print(f"wrote {out}/card.json, {out}/results.csv, {report}")
    return 0 if (result.aa_identical is not False and not result.violations) else 1


def cmd_replay(args) -> int:
    from memstate.card import CardError, read_card, replay

    try:
        card = read_card(args.card)
    except CardError as e:
        print(f"memstate replay: {e}", file=sys.stderr)
        return 2
    problem = replay(card, progress=not args.no_progress)
    if problem:
        print(f"memstate replay: MISMATCH: {problem}")
        return 1
    n = sum(len(r["arms"]) for r in card["seeds"])
    print(f"memstate replay: all recorded fingerprints match ({len(card['seeds'])} seeds, {n} arms)")
    return 0


def cmd_report(args) -> int:
    from memstate.card import CardError, read_card
    from memstate.report import write_report

    try:
        card = read_card(args.card)
    except CardError as e:
        print(f"memstate report: {e}", file=sys.stderr)
        return 2
    print(f"wrote {write_report(card, args.out or os.path.dirname(os.path.abspath(args.card)))}")
    return 0


def cmd_verify(args) -> int:
    import torch

    from memstate.experiment import Experiment

    ok = True
    exp = Experiment("digits", "null", t0=4, window=6, horizon=14, seeds=2, aa_check=True, device=args.device)
    result = exp.run()
    for r in result.records:
        c, t = r["arms"]["control"], r["arms"]["treatment"]
        same_ids = c["window_hash"] == t["window_hash"] == r["arms"]["aa"]["window_hash"]
        zero_div = max(r["divergence"]["param_l2"]) == 0.0 and c["digests"] == t["digests"]
        print(f"seed {r['seed']}: hold-window batch ids identical: {same_ids}; A/A arms bitwise identical at "
              f"every step: {r['aa']['identical'] and zero_div}; RNG streams identical: {not r['contract_violations']}")
        ok &= same_ids and zero_div and r["aa"]["identical"] and not r["contract_violations"]
    if torch.cuda.is_available():
        import memstate

        g = torch.Generator().manual_seed(0)
        ps = [torch.randn(n, generator=g) for n in (1, 1000, 70_001)]
        grads = [[torch.randn(p.shape, generator=g) for p in ps] for _ in range(20)]
        for name in ("SGD", "Adam", "AdamW"):
            res = []
            for dev in ("cpu", "cuda"):
                params = [torch.nn.Parameter(p.clone().to(dev)) for p in ps]
                kw = {"momentum": 0.9} if name == "SGD" else {}
                opt = getattr(memstate.optim, name)(params, lr=1e-2, **kw)
                for gs in grads:
                    for p, gr in zip(params, gs):
                        p.grad = gr.to(dev)
                    opt.step()
                res.append(memstate.fingerprint_state(opt).digest + memstate.fingerprint_state({"p": {str(i): p for i, p in enumerate(params)}}).digest)
            same = res[0] == res[1]
            print(f"{name}: CPU == CUDA bitwise over 20 steps: {same}")
            ok &= same
    print("verify: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memstate", description="Determinism and training-state audit for PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, build, devices, determinism settings").set_defaults(func=cmd_info)
    sub.add_parser("demo", help="a short tour of fingerprints, optimizers and snapshots").set_defaults(func=cmd_demo)
    r = sub.add_parser("run", help="run a seed-paired branch-and-hold experiment (default: digits, momentum reset, 5 seeds)")
    r.add_argument("config", nargs="?", help="a TOML file with any of: " + ", ".join(RUN_DEFAULTS))
    r.add_argument("--task")
    r.add_argument("--perturbation", help="a primitive, or A+B for a 2x2 factorial design")
    r.add_argument("--estimand", choices=["treatment", "order"],
                   help="order: ATE_order = E[M(rr) - M(wr)] (perturbation policy_switch, t0 0, window = horizon)")
    r.add_argument("--seeds", type=int)
    r.add_argument("--t0", type=int)
    r.add_argument("--window", type=int)
    r.add_argument("--horizon", type=int)
    r.add_argument("--device", choices=["cpu", "cuda"])
    r.add_argument("--out", help="output directory (default runs/TASK-PERTURBATION)")
    r.add_argument("--quick", action="store_true", help="3 seeds, short horizon (well under 30 s)")
    r.add_argument("--resume", metavar="DIR", help="continue an interrupted run in DIR")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=cmd_run)
    rp = sub.add_parser("replay", help="re-run a protocol card and verify every recorded fingerprint")
    rp.add_argument("card")
    rp.add_argument("--no-progress", action="store_true")
    rp.set_defaults(func=cmd_replay)
    rr = sub.add_parser("report", help="regenerate report.html from a protocol card")
    rr.add_argument("card")
    rr.add_argument("--out")
    rr.set_defaults(func=cmd_report)
    v = sub.add_parser("verify", help="RNG isolation / A-A check on this hardware (and CPU == CUDA)")
    v.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    v.set_defaults(func=cmd_verify)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ImportError as e:
        print(f"memstate: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
