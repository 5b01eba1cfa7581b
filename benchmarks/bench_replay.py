"""Replay at scale (issue 15): memstate's bitwise guarantees, repeated until a rare failure would show.

(a) branches: the digits task (SGD momentum 0.9) is trained to t0 and snapshotted; the snapshot
    is restored N times (default 100); each branch applies the experiment's treatment
    (``reset_momentum``, checked single-source) and trains through its hold window and 50 steps
    more. Every branch's outcome (the state digest and the loss bits after every step, the probe
    metrics at the end) is compared with the first branch's: the count of bitwise-identical
    outcomes is printed (target N/N).
(b) long restore: one run is trained to t0, saved to disk (``Snapshot.save``) and trained 1,000
    steps on uninterrupted; fresh live objects (the same seed built again and trained 7 steps past
    t0, so every tensor and the sampler position differ) load the saved snapshot and train the same 1,000 steps. The state
    digest and loss are compared at every step (target: identical at all 1,000).
(c) cards: ``memstate replay CARD`` (a subprocess, the CLI itself) on one card of each experiment
    (default: every examples/results/*/card.json): every one must exit 0.
(d) kernel paths: one card replayed in this process with memstate's CPU kernels forced to the
    scalar path (``memstate._C.set_cpu_isa("scalar")``, AVX2 otherwise), memstate's own native
    ops run with 2 threads (torch's kernels stay at the card's thread count: only the calls of
    ``torch.ops.memstate.*`` get the other count) and the smallest work items (fingerprint chunks
    of 64 bytes, optimizer chunks of 8 elements); must still match bitwise. The digits state is
    tiny (1,946 parameters), so memstate's ops run it on the calling thread whatever the count
    (work under 1 MiB is never split across threads, csrc/cpu/kernels.h); (d2) therefore also
    trains a 2.1M-parameter MLP with fused AdamW (in-pass fingerprints) and snapshot restores
    under avx2 / scalar, 1 / 2 memstate threads and default / smallest chunks, comparing every
    step's digest.

    python benchmarks/bench_replay.py [--quick] [--device cpu|cuda] [--branches N] [--steps N]
                                      [--cards GLOB] [--kernel-card CARD] [--kernel-seeds S,S]
                                      [--skip a,b,c,d] [--json out.json] [--cpu-capability avx2]

The example cards were made on an AVX2 machine: on an AVX-512 one, --cpu-capability avx2 runs
torch's CPU kernels as they did (docs/experiments.md); (c) and (d) fail without it there.

--quick: 10 branches, 200 restore steps, cards replayed for seeds 0 and 1 only (statistics check
skipped), the kernel-path replay of seed 0 only. On CUDA (``--device cuda``) (a) and (b) run on
the GPU; cards are CPU cards, so (c) and (d) are CPU-only (make and replay a CUDA card with
``memstate run ... --device cuda`` and ``memstate replay``). Exit code 0 only if every check passes.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402

import torch  # noqa: E402

from memstate import Snapshot, _ext, perturb, tasks  # noqa: E402
from memstate.experiment import _state_fp  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T0 = 30
AFTER_WINDOW = 50


def _loss_bits(x: float) -> str:
    return float(x).hex()


def _train(task, state, start: int, steps: int, plant_at: Optional[int] = None) -> List[str]:
    """Trains ``steps`` steps from ``start``; returns per-step 'digest:loss-bits' strings.
    ``plant_at``: a step after which the first parameter element is moved by one ulp (tests)."""
    out = []
    for step in range(start, start + steps):
        loss = task.train_step(state, step)
        if step == plant_at:
            with torch.no_grad():
                p = next(state.model.parameters()).view(-1)
                p[0] = torch.nextafter(p[0], p[0] + 1)
        out.append(f"{_state_fp(task, state).digest}:{_loss_bits(loss)}")
    return out


def _digits(device: str, **options):
    return tasks.get("digits", optimizer="sgd", momentum=0.9, **options)


def branches(n: int = 100, after: int = AFTER_WINDOW, device: str = "cpu", seed: int = 0,
             plant: Optional[tuple] = None, threads: int = 1) -> Dict[str, object]:
    """(a): restores one snapshot ``n`` times; each branch applies reset_momentum (its default
    window, two half-lives) and trains the window plus ``after`` steps. Returns the number of
    branches bitwise identical to the first (every step's state digest and loss, the final probe
    metrics) and the first differing branch and step. ``plant=(branch, step)`` nudges one
    parameter of that branch after that step (to prove a divergence is caught)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        task = _digits(device)
        state = task.build(seed, device=device)
        for step in range(T0):
            task.train_step(state, step)
        state.step = T0
        snap = Snapshot.capture(**task.snapshot_sources(state))
        ref, identical, first_diff, window = None, 0, None, None
        for b in range(n):
            snap.restore()
            state.step = T0
            applied = perturb.apply_checked("reset_momentum", state)
            window = applied.window[1]
            plant_at = T0 + plant[1] if plant and plant[0] == b else None
            trace = _train(task, state, T0, window + after, plant_at)
            trace.append(repr(sorted(task.evaluate(state).items())))
            if ref is None:
                ref = trace
            if trace == ref:
                identical += 1
            elif first_diff is None:
                i = next(i for i, (x, y) in enumerate(zip(ref, trace)) if x != y)
                first_diff = {"branch": b, "step": T0 + i + 1 if i < len(ref) - 1 else "probe"}
        return {"branches": n, "identical": identical, "window": window, "steps": window + after,
                "first_difference": first_diff}
    finally:
        torch.set_num_threads(before)


def long_restore(steps: int = 1000, device: str = "cpu", seed: int = 0, plant_at: Optional[int] = None,
                 threads: int = 1) -> Dict[str, object]:
    """(b): a saved snapshot loaded into fresh live objects and trained ``steps`` steps against
    the uninterrupted run; the per-step state digests and losses are compared at every step.
    ``plant_at``: step of the restored run after which one parameter is nudged (tests)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        import gc
        import uuid

        task = _digits(device)
        name = f"bench_replay/seed{seed}/{uuid.uuid4().hex[:8]}"  # the saved RNG contract is bound by name
        state = task.build(seed, device=device, name=name)
        for step in range(T0):
            task.train_step(state, step)
        state.step = T0
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "snap")
            Snapshot.capture(**task.snapshot_sources(state)).save(path)
            uninterrupted = _train(task, state, T0, steps)
            del state
            gc.collect()  # the first run's contract leaves the registry, so its name can be reused
            other = task.build(seed, device=device, name=name)  # fresh objects, trained on past t0: every tensor differs
            for step in range(T0 + 7):
                task.train_step(other, step)
            Snapshot.load(path, **task.snapshot_sources(other)).restore()
            other.step = T0
        restored = _train(task, other, T0, steps, plant_at)
        same = sum(a == b for a, b in zip(uninterrupted, restored))
        first = next((T0 + i + 1 for i, (a, b) in enumerate(zip(uninterrupted, restored)) if a != b), None)
        return {"steps": steps, "identical_steps": same, "first_difference_after_step": first}
    finally:
        torch.set_num_threads(before)


def replay_cli(card: str, seeds: Optional[Sequence[int]] = None, timeout: float = 3600) -> Dict[str, object]:
    """(c): ``python -m memstate replay CARD [--seeds ..]`` in a subprocess; returns rc, seconds
    and the last line of its output."""
    cmd = [sys.executable, "-m", "memstate", "replay", card, "--no-progress"]
    if seeds:
        cmd += ["--seeds", ",".join(map(str, seeds))]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    lines = (p.stdout + p.stderr).strip().splitlines()
    return {"card": os.path.relpath(card, ROOT), "rc": p.returncode, "seconds": round(time.perf_counter() - t, 1),
            "seeds": list(seeds) if seeds else "all", "output": lines[-1] if lines else "",
            "first_line": lines[0] if lines else ""}


class _OpsWithThreads:
    """torch.ops.memstate with every op call run at ``threads`` torch intra-op threads (the
    count at::parallel_for in memstate's kernels uses), restoring the caller's count after it:
    torch's own kernels keep theirs."""

    def __init__(self, ops, threads: int):
        self._ops, self._threads = ops, threads

    def __getattr__(self, name):
        op = getattr(self._ops, name)

        def call(*args, **kwargs):
            before = torch.get_num_threads()
            torch.set_num_threads(self._threads)
            try:
                return op(*args, **kwargs)
            finally:
                torch.set_num_threads(before)
        return call


@contextlib.contextmanager
def kernel_path(isa: str = "auto", op_threads: Optional[int] = None, small_chunks: bool = False):
    """Runs memstate's CPU kernels with ISA ``isa`` ("auto", "scalar", "avx2"), memstate's ops
    at ``op_threads`` threads (None: whatever torch has), and the smallest work items if
    ``small_chunks``; everything is put back afterwards."""
    C = _ext.load()
    old_isa, old_fp, old_opt, old_ops = "auto", C.fingerprint_chunk_bytes(), C.optim_chunk_elems(), _ext.ops
    C.set_cpu_isa(isa)
    if small_chunks:
        C.set_fingerprint_chunk_bytes(64)
        C.set_optim_chunk_elems(8)
    if op_threads is not None:
        wrapped = _OpsWithThreads(old_ops(), op_threads)
        _ext.ops = lambda: wrapped
    try:
        yield
    finally:
        _ext.ops = old_ops
        C.set_cpu_isa(old_isa)
        C.set_fingerprint_chunk_bytes(old_fp)
        C.set_optim_chunk_elems(old_opt)


def replay_kernel_path(card_path: str, isa: str = "scalar", op_threads: Optional[int] = 2,
                       small_chunks: bool = True, seeds: Optional[Sequence[int]] = None) -> Dict[str, object]:
    """(d): replays a card in this process under another kernel path; returns the first mismatch
    (None if every recorded value matched)."""
    from memstate.card import read_card, replay

    card = read_card(card_path)
    t = time.perf_counter()
    with kernel_path(isa, op_threads, small_chunks):
        problem = replay(card, seeds=seeds)
    return {"card": os.path.relpath(card_path, ROOT), "isa": isa, "memstate_threads": op_threads,
            "small_chunks": small_chunks, "torch_threads": card["config"]["threads"],
            "seeds": list(seeds) if seeds else "all", "seconds": round(time.perf_counter() - t, 1),
            "problem": problem}


def large_state_trace(steps: int = 8, width: int = 1024, device: str = "cpu", plant_at: Optional[int] = None) -> List[str]:
    """(d2): an MLP of 2 x width^2 + ... parameters (2.1M at 1024: 8 MiB, above the 1 MiB below
    which memstate's ops stay on one thread) trained with memstate's fused AdamW (in-pass
    fingerprints); a snapshot is captured after the first step and restored mid-way, then the
    run goes on. Returns per-step digests of the parameters and optimizer state. torch's own
    kernels run on one thread."""
    import memstate

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                                    torch.nn.ReLU(), torch.nn.Linear(width, 10)).to(device)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        opt = memstate.optim.AdamW(model.parameters(), lr=1e-3, fingerprint=True)
        xs = [torch.randn(32, width, generator=g).to(device) for _ in range(steps)]
        ys = [torch.randint(0, 10, (32,), generator=g).to(device) for _ in range(steps)]
        out, snap = [], None
        for i in range(steps):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(xs[i]), ys[i]).backward()
            opt.step()
            if i == plant_at:
                with torch.no_grad():
                    p = model[0].weight.view(-1)
                    p[0] = torch.nextafter(p[0], p[0] + 1)
            if i == 0:
                snap = Snapshot.capture(model, opt)
            if i == steps // 2:  # restore and replay from step 1: the trace must not notice
                snap.restore()
                for j in range(1, i + 1):
                    opt.zero_grad(set_to_none=True)
                    torch.nn.functional.cross_entropy(model(xs[j]), ys[j]).backward()
                    opt.step()
            out.append(opt.state_fingerprint().digest + ":" + memstate.fingerprint_state(model).digest)
        return out
    finally:
        torch.set_num_threads(before)


def large_state_paths(steps: int = 8, width: int = 1024) -> Dict[str, object]:
    """(d2): large_state_trace under every kernel path; all must equal the default one."""
    C = _ext.load()
    isas = C.build_info()["cpu_isas"].split(",")
    ref = large_state_trace(steps, width)
    rows = []
    for isa in isas:
        for threads in (1, 2):
            for small in (False, True):
                with kernel_path(isa, threads, small):
                    trace = large_state_trace(steps, width)
                rows.append({"isa": isa, "memstate_threads": threads, "small_chunks": small,
                             "identical_steps": sum(a == b for a, b in zip(ref, trace)), "steps": steps})
    return {"params": sum(w for w in (width * width + width, width * width + width, width * 10 + 10)),
            "rows": rows, "all_identical": all(r["identical_steps"] == steps for r in rows)}


def _cards(pattern: str) -> List[str]:
    return sorted(glob.glob(os.path.join(ROOT, pattern)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--branches", type=int, default=None, help="(a) branches (default 100, 10 with --quick)")
    ap.add_argument("--steps", type=int, default=None, help="(b) restored steps (default 1000, 200 with --quick)")
    ap.add_argument("--cards", default="examples/results/*/card.json", help="(c) cards to replay (a glob)")
    ap.add_argument("--kernel-card", default="examples/results/momentum_reset/card.json",
                    help="(d) the card replayed under the other kernel path")
    ap.add_argument("--kernel-seeds", help="(d) replay only these seeds, e.g. 0,1,2 (default all; 0 with --quick)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: a,b,c,d")
    ap.add_argument("--json", help="write the results to this file")
    ap.add_argument("--cpu-capability", type=str.upper, choices=["DEFAULT", "AVX2"], metavar="{default,avx2}",
                    help="run the whole benchmark with torch's CPU kernels at this capability (re-executes itself "
                         "with ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA and MKL_ENABLE_INSTRUCTIONS capped), e.g. "
                         "avx2 for the example cards "
                         "(made on an AVX2 machine) on an AVX-512 one")
    args = ap.parse_args(argv)
    if args.cpu_capability:
        from memstate.card import cpu_capability, cpu_capability_env

        env = cpu_capability_env(args.cpu_capability, cpu_capability())
        if env is None:
            print(f"bench_replay: torch's CPU kernels cannot run at {args.cpu_capability} here "
                  f"({cpu_capability()})", file=sys.stderr)
            return 2
        if any(os.environ.get(k) != v for k, v in env.items()):
            argv = sys.argv[1:] if argv is None else list(argv)
            os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv], dict(os.environ, **env))
    _timing.select_devices(args.device)
    skip = set(filter(None, args.skip.split(",")))
    n = args.branches or (10 if args.quick else 100)
    steps = args.steps or (200 if args.quick else 1000)
    print(f"machine: {_timing.machine()}; memstate ISA {_ext.load().cpu_isa()}; torch threads 1; torch CPU kernels "
          f"{torch.backends.cpu.get_cpu_capability()}")
    out, ok = {}, True
    if "a" not in skip:
        t = time.perf_counter()
        r = out["branches"] = branches(n, device=args.device)
        good = r["identical"] == r["branches"]
        ok &= good
        print(f"(a) {r['identical']}/{r['branches']} branches bitwise identical (reset_momentum, window "
              f"{r['window']} + {AFTER_WINDOW} steps, every step's digest and loss and the final probe) "
              f"{'PASS' if good else 'FAIL ' + str(r['first_difference'])} [{time.perf_counter() - t:.0f} s]")
    if "b" not in skip:
        t = time.perf_counter()
        r = out["long_restore"] = long_restore(steps, device=args.device)
        good = r["identical_steps"] == r["steps"]
        ok &= good
        print(f"(b) restored from disk into fresh objects: {r['identical_steps']}/{r['steps']} steps identical to "
              f"the uninterrupted run {'PASS' if good else 'FAIL after step ' + str(r['first_difference_after_step'])}"
              f" [{time.perf_counter() - t:.0f} s]")
    if "c" not in skip:
        cards = _cards(args.cards)
        if not cards:
            print(f"(c) no card matches {args.cards}: SKIPPED")
        out["cards"] = []
        for card in cards:
            r = replay_cli(card, seeds=[0, 1] if args.quick else None)
            out["cards"].append(r)
            ok &= r["rc"] == 0
            print(f"(c) memstate replay {r['card']} (seeds {r['seeds']}): rc {r['rc']} "
                  f"{'PASS' if r['rc'] == 0 else 'FAIL'} [{r['seconds']:.0f} s] {r['output']}")
    if "d" not in skip:
        card = os.path.join(ROOT, args.kernel_card)
        if args.device != "cpu":
            print("(d) CPU kernel paths: SKIPPED on --device cuda")
        elif not os.path.exists(card):
            print(f"(d) {args.kernel_card} missing: SKIPPED")
        else:
            kseeds = [int(x) for x in args.kernel_seeds.split(",")] if args.kernel_seeds else [0] if args.quick else None
            r = out["kernel_replay"] = replay_kernel_path(card, seeds=kseeds)
            ok &= r["problem"] is None
            print(f"(d) {r['card']} replayed with ISA {r['isa']}, memstate ops at {r['memstate_threads']} threads, "
                  f"64-byte / 8-element work items (torch at {r['torch_threads']} thread, seeds {r['seeds']}): "
                  f"{'PASS' if r['problem'] is None else 'FAIL: ' + r['problem']} [{r['seconds']:.0f} s]")
        if args.device == "cpu":
            t = time.perf_counter()
            r = out["large_state"] = large_state_paths(steps=6 if args.quick else 12)
            ok &= r["all_identical"]
            for row in r["rows"]:
                print(f"(d2) {r['params']:,}-param MLP, AdamW+fp, restore mid-run: ISA {row['isa']:6s} memstate "
                      f"threads {row['memstate_threads']} small chunks {str(row['small_chunks']):5s}: "
                      f"{row['identical_steps']}/{row['steps']} steps identical to the default path")
            print(f"(d2) {'PASS' if r['all_identical'] else 'FAIL'} [{time.perf_counter() - t:.0f} s]")
    print("bench_replay: " + ("PASS" if ok else "FAIL"))
    if args.json:
        _timing.write_json(args.json, {"machine": _timing.machine(), "results": out, "pass": ok})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
