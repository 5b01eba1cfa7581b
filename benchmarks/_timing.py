"""Timing helpers shared by the benchmarks: interleaved rounds, real timers, medians.

Machines here are shared and noisy, so every benchmark measures its anchor in the same run,
interleaving the cases round by round, and reports ratios of medians.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from typing import Callable, Dict, List

import torch


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_once(fn: Callable[[], object], device: str, inner: int = 1) -> float:
    """Seconds per call of fn, over `inner` back-to-back calls (CUDA events on GPU)."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def interleaved(cases: Dict[str, Callable[[], object]], device: str, rounds: int = 7,
                inner: int = 1, warmup: int = 2, stat: str = "median") -> Dict[str, float]:
    """Median (or minimum, stat="min") seconds per call of each case, measured round-robin so
    drift hits all alike. The minimum is the better estimate of the undisturbed time on a
    machine shared with other jobs; the median says what a typical call costs there."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    _sync(device)
    samples: Dict[str, List[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            samples[name].append(time_once(fn, device, inner))
    reduce = min if stat == "min" else statistics.median
    return {k: reduce(v) for k, v in samples.items()}


def select_devices(choice: str) -> List[str]:
    """Devices for --device cpu|cuda|all: 'all' drops cuda without a GPU, 'cuda' exits."""
    import sys

    devices = ["cpu", "cuda"] if choice == "all" else [choice]
    if "cuda" in devices and not torch.cuda.is_available():
        if choice == "cuda":
            sys.exit("no CUDA device")
        devices.remove("cuda")
    return devices


def machine() -> str:
    parts = [platform.processor() or platform.machine(), f"{torch.get_num_threads()} threads"]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    parts[0] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name(0))
    return ", ".join(parts) + f", torch {torch.__version__}"


def parse_args(doc: str, default_rounds: int, argv=None, extra=()):
    """The benchmarks' shared options: --device cpu|cuda|all, --quick, --rounds, --json, --stat;
    ``extra``: (flag, help) pairs of a benchmark's own store_true options."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, help_text in extra:
        ap.add_argument(flag, action="store_true", help=help_text)
    ap.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    ap.add_argument("--quick", action="store_true", help="small sizes, few rounds")
    ap.add_argument("--rounds", type=int, default=None,
                    help=f"rounds per case (default {default_rounds}; 3 with --quick)")
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--stat", default="median", choices=["median", "min"],
                    help="per-case statistic over the rounds (min: robust on a busy machine)")
    args = ap.parse_args(argv)
    args.devices = select_devices(args.device)
    if args.rounds is None:
        args.rounds = 3 if args.quick else default_rounds
    return args


def print_rows(rows: List[dict], header: str, fmt_row, json_path: str = None) -> None:
    """Prints the machine, a header and one formatted line per row; writes the JSON file."""
    print(f"machine: {machine()}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(fmt_row(r))
    if json_path:
        write_json(json_path, {"machine": machine(), "rows": rows})


def write_json(path: str, payload: dict):
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
