"""The ``memstate`` command line.

    memstate info    versions, build, devices and determinism settings
    memstate demo    a short tour of msfp1 fingerprints
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memstate", description="Determinism and training-state audit for PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, build, devices, determinism settings").set_defaults(func=cmd_info)
    sub.add_parser("demo", help="a short tour of msfp1 fingerprints").set_defaults(func=cmd_demo)
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
