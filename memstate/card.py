"""Protocol cards: a versioned JSON record of an experiment that anyone can audit and replay.

Schema ``memstate.card`` version 2 (every key always present)::

    card_format         "memstate.card"
    card_version        2
    created             ISO 8601 UTC time
    environment         memstate, torch, CUDA and Python versions, device names, CPU ISA,
                        thread count, determinism settings; the CPU model and torch's CPU
                        kernel capability (cards from 2026-12-01 on: torch's CPU kernels,
                        oneDNN and MKL pick per-CPU code paths, so bitwise replay needs the
                        same CPU kind)
    config              task (built-in name or import path "pkg.mod:Class"), task_options,
                        task_source (user tasks: import_path, resolved options, xxh3-128 of
                        the module's source file; null for built-in tasks), perturbation, perturbation_params, t0, window
                        (as given; null = each primitive's default rule), horizon, seeds,
                        metrics, aa_check, device, threads, estimand, probe_every, baseline,
                        and what follows from them: arms, arm_labels, estimands (name,
                        control and treatment labels, text), higher_is_better per metric
    seeds               one record per seed, in config order:
        seed, config_hash          the seed, and the hash of the configuration that made it
        window, windows            the hold window (longest factor window) and each factor's
        probe_points               {"early": t0 + window, "final": horizon}
        order_hashes               epoch -> xxh3 of that epoch's batch ids (int64 LE)
        arms                       control, treatment (or A, B, AB, ...), butterfly, aa:
            label                        the estimand's label of the arm (e.g. carry, rr)
            losses, digests              per step t0 .. horizon-1 (state digest after the step)
            checkpoints                  "t0" (after the perturbation), "window_end", "end":
                                         per-tensor msfp1 fingerprints, dtype and shape
            checkpoint_digests           digest of each checkpoint
            metrics, probes              probe metrics at the horizon; str(step) -> metrics
                                         at every probe step (early, final, every K)
            window_hash                  batch ids of the hold window
            rng_window_hash, rng_window_log   RNG consumption during the hold window
            perturbation                 what was applied (name, params, window, changed
                                         entries; the butterfly arm names its tensor)
        divergence                 per arm other than control: param_l2 per step, and the
                                   probe prediction disagreement per probe step
        aa                         A/A report: identical, or the first step / tensors
        contract_violations        hold-window or RNG-contract differences (empty when clean)
    results             sign convention, effect definitions, and per probe point ("final",
                        "early" when the window ends before the horizon): every effect x
                        metric row (memstate.stats.PairedATE.to_dict() and the Holm-adjusted
                        paired t p-value), the number of tests Holm covered, notes
    card_xxh3_128       xxh3-128 over the canonical JSON (sorted keys) of everything else

The checksum detects accidents (a truncated copy, an edit by mistake), not forgery: it is
unkeyed, so anyone can recompute it. ``replay`` is the verification: it re-runs the
experiment and compares, exactly, every fingerprint, per-step loss, probe metric,
divergence and disagreement value of every seed, then recomputes the statistics from the
replayed values and compares them with the card's tables, naming the first mismatch.

``read_card`` raises ``CardError`` (one line, naming the problem) for anything that is not a
valid card: unreadable or non-UTF-8 bytes, malformed or too deeply nested JSON, NaN
constants, a checksum mismatch, a missing or extra key, a wrong type, seeds that do not match
the configuration, or a configuration this memstate refuses.
"""
from __future__ import annotations

import datetime
import functools
import json
import math
import os
import platform
import re
from typing import Any, Iterable, List, Optional, Sequence

import torch
import xxhash

CARD_FORMAT = "memstate.card"
CARD_VERSION = 2
#: Deepest JSON nesting a card may have (a real card is about 10 deep).
MAX_DEPTH = 32
#: Largest card file read (bytes).
MAX_BYTES = 512 * 2 ** 20

__all__ = ["CardError", "TaskChangedError", "make_card", "write_card", "read_card", "loads_card", "validate_card", "checksum", "replay", "compare_seed",
           "experiment_from_card", "CARD_FORMAT", "CARD_VERSION"]


class CardError(ValueError):
    """An unreadable, tampered, invalid or unsupported protocol card."""


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def checksum(card: dict) -> str:
    """The card's xxh3-128 over everything but ``card_xxh3_128`` (unkeyed: detects accidents)."""
    return xxhash.xxh3_128_hexdigest(_canonical({k: v for k, v in card.items() if k != "card_xxh3_128"}))


@functools.lru_cache(maxsize=None)
def memstate_code() -> dict:
    """Which memstate code computes here: the native build's source hash (baked in at build
    time, None when unbuilt) and the same hash over the package's own ``.py`` files. Seed
    files and torchrun ranks compare it (RESUME_ENVIRONMENT): results of different code are
    never mixed into one card. Cards record it but a replay does not require it (other code
    that gives the same bits replays the card)."""
    from memstate import _ext
    from memstate._build_hash import source_hash

    return {"native": _ext.build_info().get("source_hash"),
            "python": source_hash(os.path.dirname(os.path.abspath(__file__)), (".py",))}


def cpu_model() -> Optional[str]:
    """The CPU's model name (Linux: /proc/cpuinfo), else what platform reports, else None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def cpu_capability() -> Optional[str]:
    """torch's CPU kernel capability in this process (torch.backends.cpu.get_cpu_capability():
    "DEFAULT", "AVX2", "AVX512", ...), None if this torch cannot say."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return None


# Environment variables that choose the code paths of torch's CPU kernels (ATen's dispatch,
# oneDNN, MKL): a card records the ones that were set (``cpu_kernel_env``).
CPU_KERNEL_ENV_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                       "MKL_CBWR")

# x86 capabilities as torch.backends.cpu.get_cpu_capability() names them, lowest first, and the
# variables that make torch run at a lower one than the machine's: ATen's vectorised kernels and
# oneDNN's (convolutions, linear layers) must both be capped, and MKL's (matrix products) as
# well. Measured 2026-12-01 on an AVX-512 AMD EPYC: every example card made on an AVX2 AMD EPYC
# replays bitwise with the AVX2 row, and fails with the ATen or the oneDNN variable alone (MKL
# runs the same code there either way; docs/experiments.md).
X86_CPU_CAPABILITIES = ("DEFAULT", "AVX2", "AVX512")
_LOWER_CPU_CAPABILITY = {
    "DEFAULT": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "AVX2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}
_KERNEL_ENV_VALUE = re.compile(r"[A-Za-z0-9_.,]{1,32}")


def cpu_capability_env(target: str, here: Optional[str], machine: Optional[str] = None) -> Optional[dict]:
    """The environment variables that make a new process run torch's CPU kernels at capability
    ``target`` on a machine whose processes now run at ``here`` (both as
    torch.backends.cpu.get_cpu_capability() names them): {} when they are the same, None when it
    cannot be done (not x86, an unknown name, or a target above ``here``: a capability can only
    be lowered)."""
    machine = platform.machine() if machine is None else machine
    if target == here:
        return {}
    if machine.lower() not in ("x86_64", "amd64") or here not in X86_CPU_CAPABILITIES:
        return None
    if target not in _LOWER_CPU_CAPABILITY or X86_CPU_CAPABILITIES.index(target) > X86_CPU_CAPABILITIES.index(here):
        return None
    return dict(_LOWER_CPU_CAPABILITY[target])


def cpu_kernel_env() -> dict:
    """The CPU_KERNEL_ENV_VARS set in this process's environment, as cards and trails record them."""
    return {k: os.environ[k] for k in CPU_KERNEL_ENV_VARS if k in os.environ}


def card_kernel_env(recorded: dict, here: Optional[str]) -> dict:
    """The CPU kernel variables a replay of a card whose environment is ``recorded`` runs with:
    those the card records as set (``cpu_kernel_env``; only CPU_KERNEL_ENV_VARS names with short
    plain values: a card never sets anything else), and, when the card's capability is lower
    than ``here`` (this process's), cpu_capability_env's for the ones it does not record."""
    kept = recorded.get("cpu_kernel_env")
    env = {k: v for k, v in kept.items() if k in CPU_KERNEL_ENV_VARS and isinstance(v, str)
           and _KERNEL_ENV_VALUE.fullmatch(v)} if isinstance(kept, dict) else {}
    target = recorded.get("torch_cpu_capability")
    if isinstance(target, str) and here:
        for k, v in (cpu_capability_env(target, here) or {}).items():
            env.setdefault(k, v)
    return env


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
        "cpu": cpu_model(), "torch_cpu_capability": cpu_capability(),
        "cpu_kernel_env": cpu_kernel_env(), "memstate_code": memstate_code(),
        "determinism": {
            "use_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        },
    }


# Environment keys that decide whether a replay can be bitwise (the memstate version and the
# card's creation-time thread count do not: replay runs the config's thread count).
REPLAY_ENVIRONMENT = ("torch", "cuda", "python", "machine", "devices", "cpu", "torch_cpu_capability", "cpu_isa",
                      "cuda_kernels", "determinism")
# ... and what must also match to add seeds to a run (a resumed run's seed files, torchrun's
# ranks): the same memstate code, so that one card never mixes results of two versions.
RESUME_ENVIRONMENT = REPLAY_ENVIRONMENT + ("memstate_code",)


def environment_differences(recorded: dict, here: Optional[dict] = None, source: str = "card",
                            here_name: str = "here", keys: Sequence[str] = REPLAY_ENVIRONMENT) -> List[str]:
    """What differs between a recorded environment (a card's; ``source`` names it) and this
    machine's (or ``here``), as "key: card X, here Y" lines (``keys``: REPLAY_ENVIRONMENT, or
    RESUME_ENVIRONMENT; a key the record lacks, as in cards written before it was added, is
    "not recorded")."""
    here = environment() if here is None else here
    out = []
    for k in keys:
        if k not in here:
            continue
        if k not in recorded:
            out.append(f"{k}: not recorded in the {source}, {here_name} {here[k]!r}")
        elif recorded[k] != here[k]:
            out.append(f"{k}: {source} {recorded[k]!r}, {here_name} {here[k]!r}")
    return out


def make_card(result) -> dict:
    card = {
        "card_format": CARD_FORMAT,
        "card_version": CARD_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "environment": environment(),
        "config": result.config,
        "seeds": result.records,
        "results": result.results_json(),
    }
    card["card_xxh3_128"] = checksum(card)
    return card


def write_card(card: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(card, f, indent=1, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _reject_constant(name):
    raise ValueError(f"the JSON constant {name} is not allowed in a card")


def read_card(path: str, allow_changed_task: bool = False, import_task: bool = False) -> dict:
    """Reads, checks the checksum of, and validates a card (``CardError`` otherwise).

    Reading a card never runs code it names: a user task (``"pkg.mod:Class"``) is not imported
    unless ``import_task`` (then its configuration is derived from the imported task and
    compared too, and ``TaskChangedError`` is raised if its source file changed, unless
    ``allow_changed_task``). ``replay`` always imports and checks."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise CardError(f"{path}: cannot read ({e.strerror or e})") from None
    return loads_card(raw, path, allow_changed_task, import_task)


def loads_card(raw: bytes, where: str = "card", allow_changed_task: bool = False, import_task: bool = False) -> dict:
    """``read_card`` for bytes already in memory."""
    if len(raw) > MAX_BYTES:
        raise CardError(f"{where}: larger than {MAX_BYTES} bytes, not a card")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CardError(f"{where}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
    try:
        card = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise CardError(f"{where}: JSON nested too deeply") from None
    except ValueError as e:
        raise CardError(f"{where}: malformed JSON ({e})") from None
    return validate_card(card, where, allow_changed_task, import_task)


# ----------------------------------------------------------------------------------------------
# validation


class _V:
    """Small schema checker: every failure is a CardError naming the JSON path."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, path: str, what: str):
        raise CardError(f"{self.where}: {path}: {what}")

    def obj(self, v, path, keys: Iterable[str] = None, optional: Iterable[str] = ()) -> dict:
        if not isinstance(v, dict):
            self.fail(path, f"expected an object, got {_tname(v)}")
        if keys is not None:
            keys, optional = set(keys), set(optional)
            missing = sorted(keys - set(v))
            if missing:
                self.fail(path, f"missing key(s) {', '.join(missing)}")
            extra = sorted(set(v) - keys - optional)
            if extra:
                self.fail(path, f"unexpected key(s) {', '.join(map(str, extra))}")
        return v

    def lst(self, v, path, n: Optional[int] = None) -> list:
        if not isinstance(v, list):
            self.fail(path, f"expected a list, got {_tname(v)}")
        if n is not None and len(v) != n:
            self.fail(path, f"expected {n} entries, got {len(v)}")
        return v

    def num(self, v, path, none_ok=False):
        if v is None and none_ok:
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            self.fail(path, f"expected a number, got {v!r}"[:200])
        return v

    def int_(self, v, path, none_ok=False):
        if v is None and none_ok:
            return v
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(path, f"expected an integer, got {v!r}"[:200])
        return v

    def str_(self, v, path, none_ok=False):
        if v is None and none_ok:
            return v
        if not isinstance(v, str):
            self.fail(path, f"expected a string, got {v!r}"[:200])
        return v

    def nums(self, v, path, n=None):
        for i, x in enumerate(self.lst(v, path, n)):
            self.num(x, f"{path}[{i}]")

    def strs(self, v, path, n=None):
        for i, x in enumerate(self.lst(v, path, n)):
            self.str_(x, f"{path}[{i}]")

    def metrics(self, v, path, names):
        self.obj(v, path, names)
        for m in names:
            self.num(v[m], f"{path}.{m}")


def _tname(v) -> str:
    return "null" if v is None else {dict: "object", list: "list", str: "string", bool: "boolean"}.get(
        type(v), type(v).__name__)


def _depth(obj) -> int:
    """Nesting depth, iteratively (no recursion on hostile input)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > MAX_DEPTH:
            return deepest
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)
    return deepest


TOP_KEYS = ("card_format", "card_version", "created", "environment", "config", "seeds", "results", "card_xxh3_128")
ARM_KEYS = ("arm", "label", "losses", "digests", "checkpoints", "checkpoint_digests", "metrics", "probes",
            "window_hash", "rng_window_hash", "rng_window_log", "perturbation")
SEED_KEYS = ("seed", "config_hash", "window", "windows", "probe_points", "order_hashes", "arms", "divergence",
             "contract_violations")


def validate_card(card: Any, where: str = "card", allow_changed_task: bool = False,
                  import_task: bool = False) -> dict:
    """Checks a parsed card: format, version, checksum, then every key and type that memstate
    reads (``CardError`` naming the first problem). Returns the card. A user task is imported
    only with ``import_task`` (see ``read_card``)."""
    v = _V(where)
    if not isinstance(card, dict) or card.get("card_format") != CARD_FORMAT:
        raise CardError(f"{where}: not a {CARD_FORMAT} file")
    if card.get("card_version") != CARD_VERSION:
        raise CardError(f"{where}: card version {card.get('card_version')!r}, this memstate reads {CARD_VERSION}")
    if _depth(card) > MAX_DEPTH:
        raise CardError(f"{where}: JSON nested deeper than {MAX_DEPTH} levels, not a card")
    v.obj(card, "card", TOP_KEYS)
    if card["card_xxh3_128"] != checksum(card):
        raise CardError(f"{where}: card checksum mismatch (the card was modified after it was written)")
    v.str_(card["created"], "created")
    v.obj(card["environment"], "environment")
    exp = _validate_config(v, card["config"], allow_changed_task, import_task)
    _validate_seeds(v, card["seeds"], exp)
    _validate_results(v, card["results"], exp)
    return card


CONFIG_KEYS = ("task", "task_options", "task_source", "perturbation", "perturbation_params", "t0", "window", "horizon", "seeds",
               "metrics", "aa_check", "device", "threads", "estimand", "probe_every", "baseline", "arms",
               "arm_labels", "estimands", "higher_is_better")


class TaskChangedError(CardError):
    """The source file of the card's user task differs from the one the card was made with."""


def is_user_task(config: dict) -> bool:
    """Whether a card's configuration names a user task by import path (``"pkg.mod:Class"``)."""
    return isinstance(config.get("task"), str) and ":" in config["task"]


def _validate_config(v: _V, c, allow_changed_task: bool = False, import_task: bool = False):
    from memstate.experiment import ConfigError

    v.obj(c, "config", CONFIG_KEYS)
    try:
        if is_user_task(c) and not import_task:
            exp = _experiment_without_import(v, c)
        elif not import_task and isinstance(c["device"], str) and c["device"].startswith("cuda") \
                and not torch.cuda.is_available():  # reading a CUDA card needs no GPU
            exp = experiment_from_card({"config": dict(c, device="cpu")}, where=v.where)
            exp.device = c["device"]
        else:
            exp = experiment_from_card({"config": c}, allow_changed_task=allow_changed_task, where=v.where)
    except ConfigError as e:
        v.fail("config", str(e))
    except (TypeError, ValueError, KeyError) as e:  # a value of a type the constructor never expects
        if isinstance(e, CardError):
            raise
        v.fail("config", f"invalid ({type(e).__name__}: {e})")
    _compare_config(v.where, c, exp)
    return exp


def _compare_config(where: str, c: dict, exp) -> None:
    """Every configuration key the card records equals what its configuration gives (CardError
    naming the first that does not)."""
    derived = exp.config()
    for key in CONFIG_KEYS:
        if _canonical(derived[key]) != _canonical(c[key]):
            raise CardError(f"{where}: config.{key}: " + f"{c[key]!r} does not match what this configuration "
                            f"gives ({derived[key]!r})"[:300])


def _experiment_without_import(v: _V, c: dict):
    """The Experiment of a user-task card built WITHOUT importing the task's module: reading,
    validating or reporting a card never runs code the card names. The task's name, options,
    source identity, metrics and their directions are taken from the card (only ``replay``,
    which runs the task, imports it and checks them)."""
    from memstate.experiment import Experiment
    from memstate.tasks import Task

    v.strs(c["metrics"], "config.metrics")
    metrics, hib = c["metrics"], c["higher_is_better"]
    v.obj(hib, "config.higher_is_better", metrics)
    if not all(isinstance(x, bool) for x in hib.values()):
        v.fail("config.higher_is_better", "expected true or false per metric")
    v.obj(c["task_options"], "config.task_options")
    if c["task_source"] is not None:
        v.obj(c["task_source"], "config.task_source")

    class RecordedTask(Task):
        """A user task known only from a card: it declares the recorded metrics and options,
        and refuses to train."""

        def __init__(self):
            self.options = dict(c["task_options"])
            self.name = c["task"]
            self.metrics, self.higher_is_better = tuple(metrics), dict(hib)

        def build(self, seed, *, device="cpu", name=None):
            raise RuntimeError(f"task {c['task']!r} was not imported (cards are read without running the code "
                               f"they name); memstate.card.replay imports it")

    exp = Experiment(RecordedTask(), c["perturbation"], t0=c["t0"], window=c["window"], horizon=c["horizon"],
                     seeds=c["seeds"], metrics=c["metrics"], aa_check=c["aa_check"],
                     perturbation_params=c["perturbation_params"], task_options=c["task_options"],
                     device="cpu", threads=c["threads"], estimand=c["estimand"],
                     probe_every=c["probe_every"], baseline=c["baseline"])
    exp.task_spec, exp.task_source, exp.task_file = c["task"], c["task_source"], None
    if not isinstance(c["device"], str) or not (c["device"] == "cpu" or c["device"].startswith("cuda")):
        v.fail("config.device", f"expected 'cpu' or 'cuda[:N]', got {c['device']!r}")
    exp.device = c["device"]  # a report of a CUDA card needs no GPU
    return exp


def expected_arms(exp) -> List[str]:
    return list(exp.arms) + ([exp.baseline] if exp.baseline else []) + (["aa"] if exp.aa_check else [])


def _validate_seeds(v: _V, seeds, exp) -> None:
    v.lst(seeds, "seeds")
    got = [s.get("seed") if isinstance(s, dict) else None for s in seeds]
    for s in exp.seeds:
        if s not in got:
            v.fail("seeds", f"no record for seed {s} of the configuration's seeds {exp.seeds}")
    if got != exp.seeds:
        v.fail("seeds", f"records for seeds {got}, the configuration lists {exp.seeds}")
    steps = exp.horizon - exp.t0
    arms = expected_arms(exp)
    for i, r in enumerate(seeds):
        p = f"seeds[{i}]"
        v.obj(r, p, SEED_KEYS + (("aa",) if exp.aa_check else ()))
        if exp.aa_check:
            v.obj(r.get("aa"), f"{p}.aa")
            if not isinstance(r["aa"].get("identical"), bool):
                v.fail(f"{p}.aa.identical", "expected true or false")
        v.str_(r["config_hash"], f"{p}.config_hash")
        v.int_(r["window"], f"{p}.window")
        v.obj(r["windows"], f"{p}.windows", exp.primitives)
        for n in exp.primitives:
            v.int_(r["windows"][n], f"{p}.windows.{n}")
        pp = v.obj(r["probe_points"], f"{p}.probe_points", ("early", "final"))
        v.int_(pp["early"], f"{p}.probe_points.early")
        v.int_(pp["final"], f"{p}.probe_points.final")
        v.obj(r["order_hashes"], f"{p}.order_hashes")
        v.strs(r["contract_violations"], f"{p}.contract_violations")
        v.obj(r["arms"], f"{p}.arms", arms)
        for arm in arms:
            a = v.obj(r["arms"][arm], f"{p}.arms.{arm}", ARM_KEYS)
            ap = f"{p}.arms.{arm}"
            v.str_(a["label"], f"{ap}.label")
            v.nums(a["losses"], f"{ap}.losses", steps)
            v.strs(a["digests"], f"{ap}.digests", steps)
            cps = v.obj(a["checkpoints"], f"{ap}.checkpoints", ("t0", "window_end", "end"))
            for name, cp in cps.items():
                v.obj(cp, f"{ap}.checkpoints.{name}")
            cds = v.obj(a["checkpoint_digests"], f"{ap}.checkpoint_digests", ("t0", "window_end", "end"))
            for name, d in cds.items():
                v.str_(d, f"{ap}.checkpoint_digests.{name}")
            v.metrics(a["metrics"], f"{ap}.metrics", exp.metrics)
            probes = v.obj(a["probes"], f"{ap}.probes")
            for step in (pp["early"], pp["final"]):
                if str(step) not in probes:
                    v.fail(f"{ap}.probes", f"no probe at step {step}")
            for step, m in probes.items():
                v.metrics(m, f"{ap}.probes.{step}", exp.metrics)
            v.str_(a["window_hash"], f"{ap}.window_hash")
            v.str_(a["rng_window_hash"], f"{ap}.rng_window_hash")
            v.lst(a["rng_window_log"], f"{ap}.rng_window_log")
            if a["perturbation"] is not None:
                v.lst(a["perturbation"], f"{ap}.perturbation")
        v.obj(r["divergence"], f"{p}.divergence", [a for a in arms if a != "control"])
        for arm, d in r["divergence"].items():
            dp = f"{p}.divergence.{arm}"
            v.obj(d, dp, ("param_l2", "prediction_disagreement"))
            v.nums(d["param_l2"], f"{dp}.param_l2", steps)
            dis = v.obj(d["prediction_disagreement"], f"{dp}.prediction_disagreement")
            for step, x in dis.items():
                v.num(x, f"{dp}.prediction_disagreement.{step}")


def _validate_results(v: _V, res, exp) -> None:
    from memstate.stats import PairedATE

    v.obj(res, "results", ("sign", "effects", "tables"))
    v.str_(res["sign"], "results.sign")
    effects = v.obj(res["effects"], "results.effects")
    for name, e in effects.items():
        v.obj(e, f"results.effects.{name}", ("text", "plus", "minus", "scale"))
        v.str_(e["text"], f"results.effects.{name}.text")
    tables = v.obj(res["tables"], "results.tables")
    if "final" not in tables or not set(tables) <= {"early", "final"}:
        v.fail("results.tables", f"expected 'final' (and 'early'), got {sorted(tables)}")
    for point, t in tables.items():
        tp = f"results.tables.{point}"
        v.obj(t, tp, ("steps", "tests", "level", "method", "rows", "notes"))
        v.lst(t["steps"], f"{tp}.steps")
        v.int_(t["tests"], f"{tp}.tests")
        v.num(t["level"], f"{tp}.level")
        v.str_(t["method"], f"{tp}.method")
        v.strs(t["notes"], f"{tp}.notes")
        rows = v.obj(t["rows"], f"{tp}.rows")
        if not rows:
            v.fail(f"{tp}.rows", "no rows")
        for key, row in rows.items():
            rp = f"{tp}.rows.{key}"
            v.obj(row, rp, ("effect", "metric", "ate", "p_holm"))
            v.str_(row["effect"], f"{rp}.effect")
            if row["metric"] not in exp.metrics:
                v.fail(f"{rp}.metric", f"{row['metric']!r} is not one of the configured metrics")
            v.num(row["p_holm"], f"{rp}.p_holm", none_ok=True)
            try:
                PairedATE.from_dict(row["ate"])
            except ValueError as e:
                v.fail(f"{rp}.ate", str(e))


# ----------------------------------------------------------------------------------------------
# replay


def experiment_from_card(card: dict, progress: bool = False, allow_changed_task: bool = False,
                         where: str = "card"):
    """The card's Experiment. A user task is IMPORTED by its recorded import path (this runs
    the module's code: only ``replay`` and ``validate_card(import_task=True)`` call this for a
    user-task card). Its source identity is then checked against the card's: a different
    import path or options is a ``CardError``; a changed source file (xxh3) is a
    ``TaskChangedError`` unless ``allow_changed_task``, in which case the card's identity is
    kept so that seed records keep the card's config hash and every recorded value is
    compared."""
    from memstate.experiment import Experiment

    c = card["config"]
    exp = Experiment(c["task"], c["perturbation"], t0=c["t0"], window=c["window"], horizon=c["horizon"],
                     seeds=c["seeds"], metrics=c["metrics"], aa_check=c["aa_check"],
                     perturbation_params=c["perturbation_params"], task_options=c["task_options"],
                     device=c["device"], threads=c["threads"], estimand=c["estimand"],
                     probe_every=c["probe_every"], baseline=c["baseline"], progress=progress)
    recorded, fresh = c.get("task_source"), exp.task_source
    if isinstance(recorded, dict) and isinstance(fresh, dict) and _canonical(recorded) != _canonical(fresh):
        # compared as JSON, as the card holds them (a tuple option is a list there)
        same_but_hash = _canonical({k: x for k, x in recorded.items() if k != "xxh3"}) == \
            _canonical({k: x for k, x in fresh.items() if k != "xxh3"})
        if not same_but_hash:
            raise CardError(f"{where}: config.task_source: {recorded!r} does not match the imported task "
                            f"({fresh!r})"[:300])
        if not allow_changed_task:
            raise TaskChangedError(
                f"{where}: the task's source file {exp.task_file} has changed since the card was written "
                f"(xxh3 {recorded.get('xxh3')} recorded, {fresh.get('xxh3')} now)")
        exp.task_source = recorded
    return exp


def compare_seed(recorded: dict, fresh: dict, t0: int = 0) -> Optional[str]:
    """The first mismatch between a recorded and a re-run seed record, or None.

    Fingerprints first (naming seed, arm, step and tensor), then every other recorded value
    exactly (losses, probe metrics, divergence, disagreement, hashes, ...), naming its path.
    ``t0`` turns per-step list positions into step numbers in the message."""
    seed = recorded["seed"]
    for arm, rec in recorded["arms"].items():
        new = fresh["arms"].get(arm)
        if new is None:
            return f"seed {seed}, arm {arm}: missing in the replay"
        cps, new_cps = rec["checkpoints"], new["checkpoints"]
        d = _differing(cps["t0"], new_cps["t0"])  # the branch point precedes every step
        if d:
            return (f"seed {seed}, arm {arm}, at the branch point (step {t0}, after the shared prefix, before the "
                    f"arm's first step): tensor(s) {', '.join(d[:5])}")
        for i, (a, b) in enumerate(zip(rec["digests"], new["digests"])):
            if a != b:
                # name tensors from the first checkpoint after the step that differs
                tensors = _differing(cps.get("window_end", {}), new_cps.get("window_end", {})) or \
                    _differing(cps.get("end", {}), new_cps.get("end", {}))
                return (f"seed {seed}, arm {arm}, step {t0 + i} ({i} after t0): state digest differs"
                        + (f"; differing tensor(s): {', '.join(tensors[:5])}" if tensors else ""))
        for name in ("t0", "window_end", "end"):
            d = _differing(cps.get(name, {}), new["checkpoints"].get(name, {}))
            if d:
                return f"seed {seed}, arm {arm}, checkpoint {name}: tensor(s) {', '.join(d[:5])}"
    diff = first_difference(recorded, fresh)
    if diff:
        return f"seed {seed}, {_describe(diff, t0)}"
    return None


def first_difference(recorded, fresh, path: Sequence = ()) -> Optional[tuple]:
    """(path, recorded value, fresh value) of the first difference, depth first; exact."""
    if isinstance(recorded, dict) and isinstance(fresh, dict):
        for k in list(recorded) + [k for k in fresh if k not in recorded]:
            if k not in fresh or k not in recorded:
                return (tuple(path) + (k,), recorded.get(k, "<absent>"), fresh.get(k, "<absent>"))
            d = first_difference(recorded[k], fresh[k], tuple(path) + (k,))
            if d:
                return d
        return None
    if isinstance(recorded, list) and isinstance(fresh, list):
        for i, (a, b) in enumerate(zip(recorded, fresh)):
            d = first_difference(a, b, tuple(path) + (i,))
            if d:
                return d
        if len(recorded) != len(fresh):
            return (tuple(path) + ("length",), len(recorded), len(fresh))
        return None
    if type(recorded) is not type(fresh) and not (isinstance(recorded, (int, float)) and isinstance(
            fresh, (int, float)) and not isinstance(recorded, bool) and not isinstance(fresh, bool)):
        return (tuple(path), recorded, fresh)
    return None if recorded == fresh else (tuple(path), recorded, fresh)


_STEP_LISTS = ("losses", "digests", "param_l2")


def _describe(diff: tuple, t0: int) -> str:
    path, old, new = diff
    parts = list(path)
    where = []
    if len(parts) >= 2 and parts[0] in ("arms", "divergence"):
        where.append(f"arm {parts[1]}" if parts[0] == "arms" else f"divergence of arm {parts[1]}")
        parts = parts[2:]
    if len(parts) == 2 and parts[0] in _STEP_LISTS and isinstance(parts[1], int):
        where.append(f"step {t0 + parts[1]}")
    if len(parts) == 3 and parts[0] in ("probes", "prediction_disagreement") or \
            (len(parts) == 2 and parts[0] in ("probes", "prediction_disagreement")):
        where.append(f"probe after step {parts[1]}")
    name = ".".join(str(p) for p in parts)
    if parts and parts[0] in ("metrics", "probes"):
        name = f"metric {parts[-1]}"
    return (", ".join(where + [name]) + f": recorded {_short(old)}, replay gives {_short(new)}")


def _short(x) -> str:
    s = repr(x)
    return s if len(s) <= 80 else s[:77] + "..."


def _differing(a: dict, b: dict) -> List[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def replay_experiment(card: dict, progress: bool = False, allow_changed_task: bool = False):
    """The Experiment that replays ``card``: its task imported, the source hash checked
    (``TaskChangedError`` unless ``allow_changed_task``) and every configuration key compared
    with what the imported task gives (``CardError``), before anything trains."""
    exp = experiment_from_card(card, progress=progress, allow_changed_task=allow_changed_task)
    _compare_config("card", card["config"], exp)
    return exp


def replay(card: dict, progress: bool = False, seeds: Optional[Sequence[int]] = None,
           allow_changed_task: bool = False) -> Optional[str]:
    """Re-runs the card's experiment and returns the first mismatch, or None if everything the
    card records matched: every seed record (fingerprints, losses, probe metrics, divergence,
    disagreement, hashes), then the statistics recomputed from the replayed records against
    the card's ``results``. ``seeds``: replay only these (the statistics check, which needs
    every seed, is then skipped; the CLI says so).

    A user task is imported here (replaying runs the card's code, like running a training
    script) and the card's configuration is checked against it before anything trains:
    ``TaskChangedError`` if its source file changed (unless ``allow_changed_task``),
    ``CardError`` if the task gives a different configuration."""
    exp = replay_experiment(card, progress=progress, allow_changed_task=allow_changed_task)
    recorded = {r["seed"]: r for r in card["seeds"]}
    chosen = list(exp.seeds) if seeds is None else list(seeds)
    for s in chosen:
        if s not in recorded:
            raise CardError(f"seed {s} is not in the card (its seeds: {exp.seeds})")
    fresh = []
    for seed in chosen:
        rec = exp.run_seed(seed)
        problem = compare_seed(recorded[seed], rec, exp.t0)
        if problem:
            return problem
        fresh.append(rec)
    return statistics_mismatch(card, exp, fresh) if seeds is None else None


def statistics_mismatch(card: dict, exp, fresh: List[dict]) -> Optional[str]:
    """The first difference between the card's ``results`` and the statistics recomputed from
    ``fresh``, the replayed records of every seed in config order (None if they are equal)."""
    from memstate.experiment import ExperimentResult

    recomputed = json.loads(json.dumps(ExperimentResult(exp.config(), fresh).results_json()))
    diff = first_difference(card["results"], recomputed)
    if diff:
        path, old, new = diff
        return (f"statistics: results.{'.'.join(str(p) for p in path)}: card says {_short(old)}, "
                f"recomputed from the replayed seeds {_short(new)}")
    return None
