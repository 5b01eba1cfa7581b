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
                inner: int = 1, warmup: int = 2) -> Dict[str, float]:
    """Median seconds per call of each case, measured round-robin so drift hits all alike."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    _sync(device)
    samples: Dict[str, List[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            samples[name].append(time_once(fn, device, inner))
    return {k: statistics.median(v) for k, v in samples.items()}


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


def write_json(path: str, payload: dict):
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
