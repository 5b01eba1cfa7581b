"""Protocol cards: a versioned JSON record of an experiment that anyone can audit and replay.

Schema ``memstate.card`` version 1 (every key always present)::

    card_format         "memstate.card"
    card_version        1
    created             ISO 8601 UTC time
    environment         memstate, torch, CUDA and Python versions, device names, CPU ISA,
                        thread count, determinism settings
    config              task, task_options, perturbation, perturbation_params, t0, window
                        (as given; null = the primitive's default rule), horizon, seeds,
                        metrics, aa_check, device
    seeds               one record per seed:
        seed, window    the seed and the window length actually used
        order_hashes    epoch -> xxh3 of that epoch's batch ids (int64 LE)
        arms            control / treatment / aa:
            losses, digests              per step t0 .. horizon-1 (state digest after the step)
            checkpoints                  "t0" (after the perturbation), "window_end", "end":
                                         per-tensor msfp1 fingerprints, dtype and shape
            checkpoint_digests           digest of each checkpoint
            metrics                      probe metrics at the horizon
            window_hash                  batch ids of the hold window
            rng_window_hash, rng_window_log   RNG consumption during the hold window
            perturbation                 what was applied (name, params, window, changed entries)
        divergence      param_l2 per step (treatment vs control), prediction_disagreement
        aa              A/A report: identical, or the first step / tensors that differ
        contract_violations   hold-window or RNG-contract differences (empty when clean)
    results             per metric: the paired ATE (memstate.stats.PairedATE.to_dict()) and
                        its Holm-adjusted sign-flip p-value
    card_xxh3_128       xxh3-128 over the canonical JSON (sorted keys) of everything else

``replay(card)`` re-runs the experiment from ``config`` and compares every recorded per-step
digest and checkpoint fingerprint, naming the first mismatch (seed, arm, step, tensor).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
from typing import List, Optional

import torch
import xxhash

CARD_FORMAT = "memstate.card"
CARD_VERSION = 1


class CardError(ValueError):
    """An unreadable, tampered or unsupported protocol card."""


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def environment() -> dict:
    from memstate import __version__, _ext

    info = _ext.build_info()
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "memstate": __version__, "torch": torch.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "machine": platform.machine(), "devices": devices,
        "cpu_isa": info.get("cpu_isa"), "cuda_kernels": info.get("cuda"), "threads": torch.get_num_threads(),
        "determinism": {
            "use_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        },
    }


def make_card(result) -> dict:
    card = {
        "card_format": CARD_FORMAT,
        "card_version": CARD_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "environment": environment(),
        "config": result.config,
        "seeds": result.records,
        "results": {m: {"ate": a.to_dict(), "p_holm": result.holm[m]} for m, a in result.ate.items()},
    }
    card["card_xxh3_128"] = xxhash.xxh3_128_hexdigest(_canonical(card))
    return card


def write_card(card: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(card, f, indent=1, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_card(path: str) -> dict:
    try:
        with open(path) as f:
            card = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CardError(f"{path}: cannot read a protocol card ({e})") from None
    if not isinstance(card, dict) or card.get("card_format") != CARD_FORMAT:
        raise CardError(f"{path}: not a {CARD_FORMAT} file")
    if card.get("card_version") != CARD_VERSION:
        raise CardError(f"{path}: card version {card.get('card_version')}, this memstate reads {CARD_VERSION}")
    claimed = card.pop("card_xxh3_128", None)
    if claimed != xxhash.xxh3_128_hexdigest(_canonical(card)):
        raise CardError(f"{path}: card checksum mismatch (the card was modified after it was written)")
    card["card_xxh3_128"] = claimed
    return card


def experiment_from_card(card: dict, progress: bool = False):
    from memstate.experiment import Experiment

    c = card["config"]
    return Experiment(c["task"], c["perturbation"], t0=c["t0"], window=c["window"], horizon=c["horizon"],
                      seeds=c["seeds"], metrics=c["metrics"], aa_check=c["aa_check"],
                      perturbation_params=c["perturbation_params"], task_options=c["task_options"],
                      device=c["device"], threads=c.get("threads", 1), estimand=c.get("estimand", "treatment"),
                      progress=progress)


def compare_seed(recorded: dict, fresh: dict) -> Optional[str]:
    """The first mismatch between a recorded and a re-run seed record, or None."""
    seed = recorded["seed"]
    if recorded["window"] != fresh["window"]:
        return f"seed {seed}: window {fresh['window']} != recorded {recorded['window']}"
    for arm, rec in recorded["arms"].items():
        new = fresh["arms"].get(arm)
        if new is None:
            return f"seed {seed}, arm {arm}: missing in the replay"
        cps, new_cps = rec["checkpoints"], new["checkpoints"]
        d = _differing(cps["t0"], new_cps["t0"])  # the branch point precedes every step
        if d:
            return f"seed {seed}, arm {arm}, at t0 (before any step): tensor(s) {', '.join(d[:5])}"
        for i, (a, b) in enumerate(zip(rec["digests"], new["digests"])):
            if a != b:
                # name tensors from the first checkpoint after the step that differs
                tensors = _differing(cps.get("window_end", {}), new_cps.get("window_end", {})) or \
                    _differing(cps.get("end", {}), new_cps.get("end", {}))
                return (f"seed {seed}, arm {arm}, step {i} after t0: state digest differs"
                        + (f"; differing tensor(s): {', '.join(tensors[:5])}" if tensors else ""))
        for name in ("t0", "window_end", "end"):
            d = _differing(cps.get(name, {}), new["checkpoints"].get(name, {}))
            if d:
                return f"seed {seed}, arm {arm}, checkpoint {name}: tensor(s) {', '.join(d[:5])}"
        if rec["window_hash"] != new["window_hash"]:
            return f"seed {seed}, arm {arm}: hold-window batch ids differ"
        if rec["rng_window_hash"] != new["rng_window_hash"]:
            return f"seed {seed}, arm {arm}: hold-window RNG consumption differs"
    return None


def _differing(a: dict, b: dict) -> List[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def replay(card: dict, progress: bool = False) -> Optional[str]:
    """Re-runs the card's experiment and returns the first mismatch, or None if every recorded
    fingerprint matched."""
    exp = experiment_from_card(card, progress=progress)
    recorded = {r["seed"]: r for r in card["seeds"]}
    for seed in exp.seeds:
        fresh = exp.run_seed(seed)
        problem = compare_seed(recorded[seed], fresh)
        if problem:
            return problem
    return None
