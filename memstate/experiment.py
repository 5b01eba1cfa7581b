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
from dataclasses import asdict, dataclass
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
        perturbation: a primitive name (``memstate.perturb.names()``), or two names ("a+b" or
            a pair) for a 2x2 factorial design: arms control, A, B and AB, reporting both main
            effects and the interaction.
        t0: the branch step (0 <= t0 < horizon).
        window: hold-window length in steps; None for the primitive's default window rule.
        horizon: total steps; the window must end by then.
        seeds: a count (seeds 0..n-1) or a list of seeds; at least 2.
        metrics: probe metrics to report (default: all of the task's).
        aa_check: also run the A/A arm and require bitwise identity with the control.
        perturbation_params: keyword parameters of the primitive (factorial: a dict per name).
        estimand: "treatment" (ATE = E[M(treatment) - M(control)], the default) or "order":
            the order estimand ATE_order = E[M(rr) - M(wr)], with ``policy_switch`` as the
            treatment over the whole run (t0 = 0, window = horizon) of a task sampling with
            random reshuffling.
        task_options: keyword options of the task (``memstate.tasks.get(name, **options)``).
    """

    def __init__(self, task, perturbation: str, *, t0: int, window: Optional[int] = None, horizon: int,
                 seeds=5, metrics: Optional[Sequence[str]] = None, aa_check: bool = True,
                 perturbation_params: Optional[dict] = None, task_options: Optional[dict] = None,
                 device: str = "cpu", threads: int = 1, estimand: str = "treatment", progress: bool = False):
        from memstate import tasks as _tasks

        self.task_options = dict(task_options or {})
        if isinstance(task, str):
            if task not in _tasks.names():
                raise ConfigError(f"unknown task {task!r}; valid: {', '.join(_tasks.names())}")
            task = _tasks.get(task, **self.task_options)
        self.task = task
        names = perturbation.split("+") if isinstance(perturbation, str) else list(perturbation)
        for n in names:
            if n not in _perturb.names():
                raise ConfigError(f"unknown perturbation {n!r}; valid: {', '.join(_perturb.names())}")
        if len(names) not in (1, 2) or len(set(names)) != len(names):
            raise ConfigError(f"give one perturbation, or two distinct ones for a factorial design; got {names}")
        self.primitives = names
        self.perturbation = "+".join(names)
        self.factorial = len(names) == 2
        params = dict(perturbation_params or {})
        if self.factorial:
            bad = sorted(set(params) - set(names))
            if bad:
                raise ConfigError(f"factorial perturbation_params must be keyed by primitive name {names}; got {bad}")
            self.params_by_name = {n: dict(params.get(n, {})) for n in names}
        else:
            self.params_by_name = {names[0]: params}
        self.perturbation_params = params
        if estimand not in ("treatment", "order"):
            raise ConfigError(f"unknown estimand {estimand!r}; valid: treatment, order")
        if estimand == "order" and (names != ["policy_switch"] or t0 != 0 or (window not in (None, horizon))):
            raise ConfigError("the order estimand uses perturbation='policy_switch' with t0=0 and window=horizon")
        if estimand == "order":
            window = horizon
        self.estimand = estimand
        # arms: name -> the primitives applied at t0 (control applies none)
        if self.factorial:
            self.arms = {"control": [], "A": [names[0]], "B": [names[1]], "AB": names}
        else:
            self.arms = {"control": [], "treatment": names}
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
                "aa_check": self.aa_check, "device": self.device, "threads": self.threads,
                "estimand": self.estimand, "arms": self.arms}

    # ---------------------------------------------------------------------------- one arm
    def _run_arm(self, arm: str, state, snap: Snapshot, window: int, names: List[str],
                 keep_params: List[torch.Tensor] = None):
        task = self.task
        snap.restore()
        state.step = self.t0  # a plain attribute of the TrainState: not part of the snapshot
        applied = [_perturb.apply_checked(n, state, window=window, **self.params_by_name.get(n, {})) for n in names]
        checkpoints, cdigests = {}, {}
        fp = _state_fp(task, state)
        checkpoints["t0"], cdigests["t0"] = fp.to_json(), fp.digest
        log_start = len(state.contract.log)
        window_hash = state.sampler.window_hash(self.t0, window)
        losses, digests, params_per_step = [], [], []
        rng_window = None
        for step in range(self.t0, self.horizon):
            losses.append(float(task.train_step(state, step)))
            if step == self.t0 + window - 1:
                for a in applied:
                    a.finish(state)
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
                        rng_window, [a.to_json() for a in applied] or None)
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
        window = self.window or max(_perturb.get(n).default_window(state, **self.params_by_name[n])
                                    for n in self.primitives)
        window = min(int(window), self.horizon - self.t0)
        snap = Snapshot.capture(**task.snapshot_sources(state))
        records, params, preds = {}, {}, {}
        for arm, names in self.arms.items():
            params[arm] = []
            records[arm], preds[arm] = self._run_arm(arm, state, snap, window, names, params[arm])
        last = list(self.arms)[-1]  # the treatment, or AB in a factorial design
        c_preds, t_preds = preds["control"], preds[last]
        out = {"seed": seed, "window": window, "arms": {a: r.to_json() for a, r in records.items()},
               "divergence": {
                   "arm": last,
                   "param_l2": [float((a - b).norm()) for a, b in zip(params["control"], params[last])],
                   "prediction_disagreement": float((c_preds != t_preds).float().mean())
                   if c_preds.dtype in (torch.int64, torch.int32) else float((c_preds - t_preds).pow(2).mean()),
               }}
        out["order_hashes"] = {str(e): state.sampler.order_hash(e)
                               for e in range(self.horizon // max(1, state.sampler.batches_per_epoch) + 1)}
        # identical hold window: same batch ids unless a data-order primitive is applied;
        # same random draws except the declared "perturb" stream
        from memstate.rng import ContractViolation, RngContract

        violations = []
        control = records["control"]
        for arm, names in self.arms.items():
            if arm == "control":
                continue
            rec = records[arm]
            order_arm = any(_perturb.get(n).source in ("S2", "S3") for n in names)
            if not order_arm and control.window_hash != rec.window_hash:
                violations.append(f"{arm}: hold-window batch ids differ ({control.window_hash} vs {rec.window_hash})")
            try:
                RngContract.check(control.rng_window_log, rec.rng_window_log, may_change=("perturb",))
            except ContractViolation as e:
                violations.append(f"{arm}: {e}")
        out["contract_violations"] = violations
        if self.aa_check:
            aa, _ = self._run_arm("aa", state, snap, window, ["null"])
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
        metrics = config["metrics"]

        def values(arm, m):
            return [r["arms"][arm]["metrics"][m] for r in records]

        # effect name -> metric -> PairedATE
        self.effects: Dict[str, Dict[str, Any]] = {}
        if config.get("estimand") == "order":  # ATE_order = E[M(rr) - M(wr)]: control is rr
            self.effects["order (rr - wr)"] = {m: paired_ate(values("control", m), values("treatment", m)) for m in metrics}
        elif "AB" in config.get("arms", {}):
            a, b = config["arms"]["A"][0], config["arms"]["B"][0]
            avg = lambda x, y: [(u + v) / 2 for u, v in zip(x, y)]
            sub = lambda x, y: [u - v for u, v in zip(x, y)]
            self.effects[f"main {a}"] = {m: paired_ate(avg(values("A", m), values("AB", m)),
                                                       avg(values("control", m), values("B", m))) for m in metrics}
            self.effects[f"main {b}"] = {m: paired_ate(avg(values("B", m), values("AB", m)),
                                                       avg(values("control", m), values("A", m))) for m in metrics}
            self.effects[f"interaction {a} x {b}"] = {
                m: paired_ate(sub(values("AB", m), values("B", m)), sub(values("A", m), values("control", m)))
                for m in metrics}
        else:
            self.effects["treatment"] = {m: paired_ate(values("treatment", m), values("control", m)) for m in metrics}
        keys = [(e, m) for e, per in self.effects.items() for m in per]
        adjusted = holm([self.effects[e][m].p_signflip for e, m in keys])
        self.holm = {self._key(e, m): p for (e, m), p in zip(keys, adjusted)}
        self.ate = {self._key(e, m): self.effects[e][m] for e, m in keys}

    def _key(self, effect: str, metric: str) -> str:
        return metric if len(self.effects) == 1 and effect in ("treatment",) else f"{effect}: {metric}"

    @property
    def aa_identical(self) -> Optional[bool]:
        if not self.config.get("aa_check"):
            return None
        return all(r["aa"]["identical"] for r in self.records)

    @property
    def violations(self) -> List[str]:
        return [f"seed {r['seed']}: {v}" for r in self.records for v in r["contract_violations"]]

    def table(self) -> str:
        w = max(10, max(len(k) for k in self.ate))
        head = f"{'effect':{w}} {'ATE':>10} {'CI':>24} {'p_signflip':>10} {'p_holm':>8} {'p_t':>8} {'d_z':>6} {'n+':>4}"
        lines = [head, "-" * len(head)]
        for m, a in self.ate.items():
            ci = f"[{a.ci[0]:+.4f}, {a.ci[1]:+.4f}]"
            lines.append(f"{m:{w}} {a.ate:>+10.4f} {ci:>24} {a.p_signflip:>10.4f} {self.holm[m]:>8.4f} "
                         f"{a.p_t:>8.4f} {a.dz:>6.2f} {a.n_positive:>2}/{a.n}")
        sign = "rr - wr" if self.config.get("estimand") == "order" else "treatment - control"
        lines.append(f"({sign}; {self.ate[next(iter(self.ate))].method} CI at "
                     f"{self.ate[next(iter(self.ate))].level:.0%}; p_signflip exact, floor "
                     f"{self.ate[next(iter(self.ate))].p_signflip_floor:.4f}; Holm across metrics)")
        return "\n".join(lines)
