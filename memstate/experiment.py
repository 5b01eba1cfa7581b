"""Branch-and-hold experiments: a seed-paired causal measurement of one memory source.

For each seed the root run is trained to ``t0`` once and snapshotted. Every arm starts from
that snapshot:

- **control**: restore, hold the window, resume to the horizon, evaluate;
- **treatment**: restore, apply the perturbation (checked to be single-source), hold the same
  window on the same batch ids and random draws, resume, evaluate;
- **aa** (A/A, on by default): restore, apply ``null``; every step must be bitwise identical
  to the control, otherwise the residual nondeterminism is reported (first step, tensors).

Per arm it records the loss and the state digest of every step, fingerprints at t0, at the
end of the window and at the horizon, the hold window's batch-id hash and RNG consumption
hash, probe metrics and predictions; between arms, the parameter L2 distance per step and the
probe prediction disagreement. ``ExperimentResult`` holds the per-seed records and the paired
ATE of every metric (``memstate.stats.paired_ate``), Holm-adjusted across metrics, and turns
into a protocol card (``memstate.card``).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from memstate import perturb as _perturb
from memstate.fingerprint import StateFingerprint, fingerprint_state
from memstate.snapshot import Snapshot

__all__ = ["Experiment", "ExperimentResult", "ArmRecord", "ConfigError"]


class ConfigError(ValueError):
    """An invalid experiment configuration (raised before any training)."""


@dataclass
class ArmRecord:
    arm: str
    losses: List[float]
    digests: List[str]                      # state digest after each step t0 .. horizon-1
    checkpoints: Dict[str, Dict[str, Any]]  # "t0", "window_end", "end" -> StateFingerprint.to_json()
    checkpoint_digests: Dict[str, str]
    metrics: Dict[str, float]
    window_hash: str                        # batch ids of the hold window
    rng_window_hash: str                    # RNG consumption during the hold window
    rng_window_log: List[Any]
    perturbation: Optional[Dict[str, Any]] = None  # Applied.to_json() for treatment / aa

    def to_json(self) -> dict:
        return asdict(self)


def _state_fp(task, state) -> StateFingerprint:
    src = task.snapshot_sources(state)
    return fingerprint_state({k: v for k, v in (("model", src.get("model")), ("optimizer", src.get("optimizer")),
                                                ("extra", src.get("extra"))) if v})


def _params_vector(state) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double().cpu() for p in state.model.parameters()])


def _log_hash(entries) -> str:
    import xxhash

    return xxhash.xxh3_128_hexdigest(json.dumps(entries, sort_keys=True).encode())


class Experiment:
    """A seed-paired branch-and-hold experiment (see the module docstring).

    Args:
        task: a task name (``memstate.tasks.names()``) or a Task object.
        perturbation: a primitive name (``memstate.perturb.names()``).
        t0: the branch step (0 <= t0 < horizon).
        window: hold-window length in steps; None for the primitive's default window rule.
        horizon: total steps; the window must end by then.
        seeds: a count (seeds 0..n-1) or a list of seeds; at least 2.
        metrics: probe metrics to report (default: all of the task's).
        aa_check: also run the A/A arm and require bitwise identity with the control.
        perturbation_params: keyword parameters of the primitive.
        task_options: keyword options of the task (``memstate.tasks.get(name, **options)``).
    """

    def __init__(self, task, perturbation: str, *, t0: int, window: Optional[int] = None, horizon: int,
                 seeds=5, metrics: Optional[Sequence[str]] = None, aa_check: bool = True,
                 perturbation_params: Optional[dict] = None, task_options: Optional[dict] = None,
                 device: str = "cpu", threads: int = 1, progress: bool = False):
        from memstate import tasks as _tasks

        self.task_options = dict(task_options or {})
        if isinstance(task, str):
            if task not in _tasks.names():
                raise ConfigError(f"unknown task {task!r}; valid: {', '.join(_tasks.names())}")
            task = _tasks.get(task, **self.task_options)
        self.task = task
        if perturbation not in _perturb.names():
            raise ConfigError(f"unknown perturbation {perturbation!r}; valid: {', '.join(_perturb.names())}")
        self.perturbation = perturbation
        self.perturbation_params = dict(perturbation_params or {})
        self.metrics = tuple(metrics) if metrics else tuple(task.metrics)
        bad = [m for m in self.metrics if m not in task.metrics]
        if bad:
            raise ConfigError(f"unknown metric(s) {bad} for task {task.name}; valid: {', '.join(task.metrics)}")
        if not isinstance(t0, int) or not isinstance(horizon, int) or t0 < 0 or t0 >= horizon:
            raise ConfigError(f"need 0 <= t0 < horizon, got t0={t0}, horizon={horizon}")
        if window is not None and (not isinstance(window, int) or window < 1 or t0 + window > horizon):
            raise ConfigError(f"the window ({window} steps from t0={t0}) must be >= 1 and end by the horizon {horizon}")
        self.seeds = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
        if len(self.seeds) < 2:
            raise ConfigError(f"a paired design needs at least 2 seeds, got {len(self.seeds)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be distinct, got {self.seeds}")
        self.t0, self.window, self.horizon = t0, window, horizon
        self.aa_check = aa_check
        self.device = device
        # torch's own CPU kernels (matmul, convolution, reductions) are bitwise reproducible only
        # for a fixed thread count, so the count is part of the configuration (and the card).
        self.threads = int(threads)
        self.progress = progress

    def config(self) -> dict:
        return {"task": self.task.name, "task_options": self.task_options, "perturbation": self.perturbation,
                "perturbation_params": self.perturbation_params, "t0": self.t0, "window": self.window,
                "horizon": self.horizon, "seeds": self.seeds, "metrics": list(self.metrics),
                "aa_check": self.aa_check, "device": self.device, "threads": self.threads}

    # ---------------------------------------------------------------------------- one arm
    def _run_arm(self, arm: str, state, snap: Snapshot, window: int, keep_params: List[torch.Tensor] = None):
        task = self.task
        snap.restore()
        state.step = self.t0  # a plain attribute of the TrainState: not part of the snapshot
        applied = None
        checkpoints, cdigests = {}, {}
        if arm != "control":
            name = self.perturbation if arm == "treatment" else "null"
            params = self.perturbation_params if arm == "treatment" else {}
            applied = _perturb.apply_checked(name, state, window=window, **params)
        fp = _state_fp(task, state)
        checkpoints["t0"], cdigests["t0"] = fp.to_json(), fp.digest
        log_start = len(state.contract.log)
        window_hash = state.sampler.window_hash(self.t0, window)
        losses, digests, params_per_step = [], [], []
        rng_window = None
        for step in range(self.t0, self.horizon):
            losses.append(float(task.train_step(state, step)))
            if step == self.t0 + window - 1:
                if applied is not None:
                    applied.finish(state)
                rng_window = [list(map(_jsonable, e)) for e in state.contract.log[log_start:]]
                fp = _state_fp(task, state)
                checkpoints["window_end"], cdigests["window_end"] = fp.to_json(), fp.digest
            digests.append(_state_fp(task, state).digest)
            if keep_params is not None:
                params_per_step.append(_params_vector(state))
        fp = _state_fp(task, state)
        checkpoints["end"], cdigests["end"] = fp.to_json(), fp.digest
        metrics = {k: float(v) for k, v in task.evaluate(state).items() if k in self.metrics}
        preds = task.predictions(state)
        if keep_params is not None:
            keep_params.extend(params_per_step)
        rec = ArmRecord(arm, losses, digests, checkpoints, cdigests, metrics, window_hash, _log_hash(rng_window),
                        rng_window, applied.to_json() if applied is not None else None)
        return rec, preds

    # ---------------------------------------------------------------------------- one seed
    def run_seed(self, seed: int) -> dict:
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self._run_seed(seed)
        finally:
            torch.set_num_threads(before)

    def _run_seed(self, seed: int) -> dict:
        import gc

        gc.collect()  # free earlier seeds' states: snapshots record every live RngContract
        task = self.task
        state = task.build(seed, device=self.device)
        for step in range(self.t0):
            task.train_step(state, step)
        window = self.window or _perturb.get(self.perturbation).default_window(state, **self.perturbation_params)
        window = min(int(window), self.horizon - self.t0)
        snap = Snapshot.capture(**task.snapshot_sources(state))
        ctrl_params: List[torch.Tensor] = []
        treat_params: List[torch.Tensor] = []
        control, ctrl_preds = self._run_arm("control", state, snap, window, ctrl_params)
        treatment, treat_preds = self._run_arm("treatment", state, snap, window, treat_params)
        out = {"seed": seed, "window": window, "arms": {"control": control.to_json(), "treatment": treatment.to_json()},
               "divergence": {
                   "param_l2": [float((a - b).norm()) for a, b in zip(ctrl_params, treat_params)],
                   "prediction_disagreement": float((ctrl_preds != treat_preds).float().mean())
                   if ctrl_preds.dtype in (torch.int64, torch.int32) else float((ctrl_preds - treat_preds).pow(2).mean()),
               }}
        out["order_hashes"] = {str(e): state.sampler.order_hash(e)
                               for e in range(self.horizon // max(1, state.sampler.batches_per_epoch) + 1)}
        # identical hold window: same batch ids unless the perturbation is a data-order one;
        # same random draws except the declared "perturb" stream
        src = _perturb.get(self.perturbation).source
        from memstate.rng import ContractViolation, RngContract

        violations = []
        if src not in ("S2", "S3") and control.window_hash != treatment.window_hash:
            violations.append(f"hold-window batch ids differ ({control.window_hash} vs {treatment.window_hash})")
        try:
            RngContract.check(control.rng_window_log, treatment.rng_window_log, may_change=("perturb",))
        except ContractViolation as e:
            violations.append(str(e))
        out["contract_violations"] = violations
        if self.aa_check:
            aa, _ = self._run_arm("aa", state, snap, window)
            out["arms"]["aa"] = aa.to_json()
            out["aa"] = _aa_report(control, aa)
        snap.restore()
        return out

    def run(self, out_dir: Optional[str] = None, resume: bool = False, on_seed=None) -> "ExperimentResult":
        """Runs every seed (finished seeds are written to out_dir/seeds/ as they finish, so an
        interrupted run keeps them; resume=True reuses them)."""
        records = []
        seeds_dir = os.path.join(out_dir, "seeds") if out_dir else None
        if seeds_dir:
            os.makedirs(seeds_dir, exist_ok=True)
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(self.seeds), desc=f"{self.task.name}/{self.perturbation}", unit="seed")
        for seed in self.seeds:
            path = os.path.join(seeds_dir, f"seed_{seed}.json") if seeds_dir else None
            if resume and path and os.path.isfile(path):
                with open(path) as f:
                    rec = json.load(f)
            else:
                rec = self.run_seed(seed)
                if path:
                    _atomic_json(path, rec)
            records.append(rec)
            if on_seed:
                on_seed(rec)
            if bar:
                bar.update(1)
        if bar:
            bar.close()
        return ExperimentResult(self.config(), records)


def _jsonable(x):
    if isinstance(x, tuple):
        return [_jsonable(v) for v in x]
    return x


def _aa_report(control: ArmRecord, aa: ArmRecord) -> dict:
    for i, (a, b) in enumerate(zip(control.digests, aa.digests)):
        if a != b:
            return {"identical": False, "first_step": i, "detail": "state digests differ"}
    for name in ("t0", "window_end", "end"):
        if control.checkpoint_digests.get(name) != aa.checkpoint_digests.get(name):
            diff = sorted(k for k in control.checkpoints[name] if control.checkpoints[name][k] != aa.checkpoints[name].get(k))
            return {"identical": False, "first_step": None, "checkpoint": name, "tensors": diff}
    if control.losses != aa.losses or control.window_hash != aa.window_hash:
        return {"identical": False, "first_step": None, "detail": "losses or window hash differ"}
    return {"identical": True, "steps": len(control.digests)}


def _atomic_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ExperimentResult:
    """Per-seed records and the paired ATE of every metric (treatment - control)."""

    def __init__(self, config: dict, records: List[dict]):
        from memstate.stats import holm, paired_ate

        self.config = config
        self.records = records
        self.ate = {}
        for m in config["metrics"]:
            t = [r["arms"]["treatment"]["metrics"][m] for r in records]
            c = [r["arms"]["control"]["metrics"][m] for r in records]
            self.ate[m] = paired_ate(t, c)
        pvals = [self.ate[m].p_signflip for m in config["metrics"]]
        self.holm = dict(zip(config["metrics"], holm(pvals)))

    @property
    def aa_identical(self) -> Optional[bool]:
        if not self.config.get("aa_check"):
            return None
        return all(r["aa"]["identical"] for r in self.records)

    @property
    def violations(self) -> List[str]:
        return [f"seed {r['seed']}: {v}" for r in self.records for v in r["contract_violations"]]

    def table(self) -> str:
        head = f"{'metric':10} {'ATE':>10} {'CI':>24} {'p_signflip':>10} {'p_holm':>8} {'p_t':>8} {'d_z':>6} {'n+':>4}"
        lines = [head, "-" * len(head)]
        for m, a in self.ate.items():
            ci = f"[{a.ci[0]:+.4f}, {a.ci[1]:+.4f}]"
            lines.append(f"{m:10} {a.ate:>+10.4f} {ci:>24} {a.p_signflip:>10.4f} {self.holm[m]:>8.4f} "
                         f"{a.p_t:>8.4f} {a.dz:>6.2f} {a.n_positive:>2}/{a.n}")
        lines.append(f"(treatment - control; {self.ate[next(iter(self.ate))].method} CI at "
                     f"{self.ate[next(iter(self.ate))].level:.0%}; p_signflip exact, floor "
                     f"{self.ate[next(iter(self.ate))].p_signflip_floor:.4f}; Holm across metrics)")
        return "\n".join(lines)
