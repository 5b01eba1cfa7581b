"""Branch-and-hold experiments: a seed-paired causal measurement of one memory source.

For each seed the root run is trained to ``t0`` once and snapshotted. Every arm starts from
that snapshot:

- **control** (memory kept): restore, hold the window, resume to the horizon;
- **treatment** (memory perturbed): restore, apply the perturbation (checked to be
  single-source), hold the same window on the same batch ids and random draws, resume;
- with 2 or 3 perturbations, a 2^k factorial design: one arm per subset of the factors
  (``A``, ``B``, ``AB``, ... ``ABC``), each factor held for its own window;
- **aa** (A/A, on by default): restore, apply ``null``; every step must be bitwise identical
  to the control, otherwise the residual nondeterminism is reported (first step, tensors);
- **butterfly** (optional chaos baseline, ``baseline="butterfly"``): restore, scale one state
  tensor (the model's first parameter) by ``1 - 2^-20`` at t0, so the treatment's divergence
  and disagreement can be read against what a negligible perturbation does.

Per arm it records the loss and the state digest of every step, fingerprints at t0, at the
end of the window and at the horizon, the hold window's batch-id hash and RNG consumption
hash, and the probe metrics at the end of the window ("early"), at the horizon ("final") and
every ``probe_every`` steps; against the control, for every other arm, the parameter L2
distance per step and the probe prediction disagreement at each probe step.

Sign convention (SEED.md 6.1): every effect is **memory kept minus memory perturbed**,
``E_s[M(control) - M(treatment)]`` with the arms labelled by the primitive's estimand
(``ATE_opt = E[M(carry) - M(reset_momentum)]``, ``ATE_order = E[M(rr) - M(wr)]``).
``ExperimentResult`` holds the per-seed records and, for the early and the final probe, the
paired ATE of every effect and metric (``memstate.stats.paired_ate``) with the paired t
p-values Holm-adjusted over all the tests of that table; it turns into a protocol card
(``memstate.card``).
"""
from __future__ import annotations

import itertools
import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from memstate import perturb as _perturb
from memstate.fingerprint import StateFingerprint, fingerprint_state
from memstate.snapshot import Snapshot

__all__ = ["Experiment", "ExperimentResult", "ArmRecord", "ConfigError", "MAX_FACTORS", "BUTTERFLY_FACTOR",
           "BASELINES"]

#: At most this many perturbations in one factorial design (2^3 = 8 arms).
MAX_FACTORS = 3
#: The chaos baseline scales one state tensor by this factor at t0 (exact in every float format).
BUTTERFLY_FACTOR = 1.0 - 2.0 ** -20
#: Optional baseline arms.
BASELINES = ("butterfly",)
#: Power used for the "seeds needed" note when a CI includes 0.
PLANNING_POWER = 0.8
#: Keys of Applied.to_json() that differ between identical runs (see _run_arm).
_UNREPLAYABLE = ("digest_before", "digest_after")


class ConfigError(ValueError):
    """An invalid experiment configuration (raised before any training)."""


@dataclass
class ArmRecord:
    arm: str
    label: str                              # display label (the estimand's arm label)
    losses: List[float]
    digests: List[str]                      # state digest after each step t0 .. horizon-1
    checkpoints: Dict[str, Dict[str, Any]]  # "t0", "window_end", "end" -> StateFingerprint.to_json()
    checkpoint_digests: Dict[str, str]
    metrics: Dict[str, float]               # probe metrics at the horizon
    probes: Dict[str, Dict[str, float]]     # str(step) -> probe metrics after `step` steps
    window_hash: str                        # batch ids of the hold window
    rng_window_hash: str                    # RNG consumption during the hold window
    rng_window_log: List[Any]
    perturbation: Optional[List[Dict[str, Any]]] = None  # what was applied at t0

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


def _disagreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of probe predictions that differ (class labels), or the mean squared difference
    of the outputs (regression tasks)."""
    if a.dtype in (torch.int64, torch.int32):
        return float((a != b).float().mean())
    return float((a.double() - b.double()).pow(2).mean())


def _factor_arms(k: int) -> Dict[str, Tuple[int, ...]]:
    """Arm name -> indices of the factors it perturbs: control, A, B, C, AB, AC, BC, ABC."""
    if k == 1:
        return {"control": (), "treatment": (0,)}
    arms = {"control": ()}
    for size in range(1, k + 1):
        for combo in itertools.combinations(range(k), size):
            arms["".join("ABC"[i] for i in combo)] = combo
    return arms


class Experiment:
    """A seed-paired branch-and-hold experiment (see the module docstring).

    Args:
        task: a built-in task name (``memstate.tasks.names()``), an import path
            ``"package.module:Class"`` of a ``memstate.Task`` subclass (docs/tasks.md), or a Task
            object (recorded by its class's import path, so its card replays when that module
            is importable).
        perturbation: a primitive name (``memstate.perturb.names()``), or 2-3 distinct names
            ("a+b+c" or a list) for a 2^k factorial design.
        t0: the branch step (0 <= t0 < horizon), or "boundary": the task's first phase boundary.
        window: hold-window length in steps for every factor; a dict name -> steps (or None)
            per factor; None for each primitive's own default window rule.
        horizon: total steps; every window must end by then.
        seeds: a count (seeds 0..n-1) or a list of distinct seeds; at least 2.
        metrics: probe metrics to report (default: all of the task's).
        aa_check: also run the A/A arm and require bitwise identity with the control.
        perturbation_params: keyword parameters of the primitive (factorial: a dict per name).
        estimand: "treatment" (each primitive's own estimand, memory kept minus perturbed) or
            "order": ATE_order = E[M(rr) - M(wr)], ``policy_switch`` over the whole run (t0 = 0,
            window = horizon) of a task sampling with random reshuffling.
        task_options: keyword options of the task (``memstate.tasks.get(name, **options)``).
        device, threads: where to train, and torch's CPU thread count (part of the config:
            torch's CPU kernels are bitwise reproducible only for a fixed count). Under torchrun
            a CUDA device means each rank's own, cuda:LOCAL_RANK.
        probe_every: also evaluate the probe every K steps after t0 (the end of the window
            and the horizon are always probed).
        baseline: None or "butterfly" (the chaos-baseline arm).

    Raises:
        ConfigError: naming the offending item, before anything is trained or written.
    """

    def __init__(self, task, perturbation, *, t0: int, window=None, horizon: int,
                 seeds=5, metrics: Optional[Sequence[str]] = None, aa_check: bool = True,
                 perturbation_params: Optional[dict] = None, task_options: Optional[dict] = None,
                 device: str = "cpu", threads: int = 1, estimand: str = "treatment",
                 probe_every: Optional[int] = None, baseline: Optional[str] = None, progress: bool = False):
        from memstate import tasks as _tasks

        if task_options is not None and not isinstance(task_options, dict):
            raise ConfigError(f"task_options must be a table of task options, got {task_options!r}")
        self.task_options = dict(task_options or {})
        if isinstance(task, str):
            if task not in _tasks.names() and ":" not in task:
                raise ConfigError(f"unknown task {task!r}; valid: {', '.join(_tasks.names())}, or an import path "
                                  f"'package.module:Class' of a memstate.Task subclass")
            try:
                task = _tasks.get(task, **self.task_options)
            except _tasks.TaskImportError as e:
                raise ConfigError(str(e)) from None
            except (ValueError, TypeError) as e:
                raise ConfigError(f"task_options: {e}") from None
        elif not isinstance(task, _tasks.Task):
            raise ConfigError(f"task must be a name, an import path 'package.module:Class' or a memstate.Task, "
                              f"got {type(task).__name__}")
        elif _tasks.import_path(task) is not None and not task_options:
            self.task_options = dict(task.options)  # so a card of a Task object replays it
        self.task = task
        #: the card's "task": the built-in name, or the import path of a user task
        self.task_spec = _tasks.import_path(task) or task.name
        src = _tasks.task_source(task)
        #: the module file of a user task (None for a built-in one), named in replay messages
        self.task_file = src and src.pop("file")
        #: what the card records of a user task: import path, resolved options, xxh3 of its file
        self.task_source = src
        if t0 == "boundary":
            bounds = task.boundaries()
            if not bounds:
                raise ConfigError(f"t0='boundary': task {self.task_spec} declares no phases (e.g. digits with "
                                  f"task_options phases='split')")
            t0 = bounds[0]
        if isinstance(perturbation, str):
            names = perturbation.split("+")
        elif isinstance(perturbation, (list, tuple)) and all(isinstance(n, str) for n in perturbation):
            names = list(perturbation)
        else:
            raise ConfigError(f"perturbation must be a name or 'a+b', got {perturbation!r}")
        for n in names:
            if n not in _perturb.names():
                raise ConfigError(f"unknown perturbation {n!r}; valid: {', '.join(_perturb.names())}")
        if not 1 <= len(names) <= MAX_FACTORS or len(set(names)) != len(names):
            raise ConfigError(f"give one perturbation, or 2-{MAX_FACTORS} distinct ones for a factorial design; "
                              f"got {names}")
        self.primitives = names
        self.perturbation = "+".join(names)
        self.factorial = len(names) > 1
        if perturbation_params is not None and not isinstance(perturbation_params, dict):
            raise ConfigError(f"perturbation_params must be a table, got {perturbation_params!r}")
        params = dict(perturbation_params or {})
        if self.factorial:
            bad = sorted(set(params) - set(names))
            if bad or not all(isinstance(v, dict) for v in params.values()):
                raise ConfigError(f"factorial perturbation_params must be tables keyed by primitive name {names}; "
                                  f"got {sorted(params)}")
            self.params_by_name = {n: dict(params.get(n, {})) for n in names}
        else:
            self.params_by_name = {names[0]: params}
        self.perturbation_params = params
        self.estimands = {}
        for n in names:
            prim = _perturb.get(n)
            try:
                prim.resolve(self.params_by_name[n])
                self.estimands[n] = prim.estimand(self.params_by_name[n])
            except _perturb.PerturbationError as e:
                raise ConfigError(f"perturbation_params: {e}") from None
        if estimand not in ("treatment", "order"):
            raise ConfigError(f"unknown estimand {estimand!r}; valid: treatment, order")
        if not isinstance(t0, int) or isinstance(t0, bool) or not isinstance(horizon, int) \
                or isinstance(horizon, bool) or t0 < 0 or t0 >= horizon:
            raise ConfigError(f"need integers 0 <= t0 < horizon, got t0={t0!r}, horizon={horizon!r}")
        if estimand == "order":
            if names != ["policy_switch"] or t0 != 0 or window not in (None, horizon):
                raise ConfigError("the order estimand uses perturbation='policy_switch' with t0=0 and window=horizon")
            if self.estimands["policy_switch"].control != "rr" or self.estimands["policy_switch"].treatment != "wr":
                raise ConfigError("the order estimand compares rr (control) with wr (treatment); "
                                  f"policy_switch here gives {self.estimands['policy_switch'].text}")
            window = horizon
        self.estimand = estimand
        self.windows = self._check_windows(window, t0, horizon)
        self.window = window
        self.arm_factors = _factor_arms(len(names))
        self.arms = {arm: [names[i] for i in idx] for arm, idx in self.arm_factors.items()}
        self.arm_labels = self._labels()
        self.metrics = tuple(metrics) if metrics else tuple(task.metrics)
        bad = [m for m in self.metrics if m not in task.metrics]
        if bad or (metrics is not None and len(set(self.metrics)) != len(self.metrics)):
            raise ConfigError(f"unknown or repeated metric(s) {bad or list(self.metrics)} for task {task.name}; "
                              f"valid: {', '.join(task.metrics)}")
        if isinstance(seeds, bool) or not isinstance(seeds, (int, list, tuple)):
            raise ConfigError(f"seeds must be a count or a list of integers, got {seeds!r}")
        if isinstance(seeds, int):
            self.seeds = list(range(seeds))
        else:
            if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
                raise ConfigError(f"seeds must be non-negative integers, got {list(seeds)!r}")
            self.seeds = list(seeds)
        if len(self.seeds) < 2:
            raise ConfigError(f"a paired design needs at least 2 seeds, got {len(self.seeds)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be distinct, got {self.seeds}")
        self.t0, self.horizon = t0, horizon
        if probe_every is not None and (isinstance(probe_every, bool) or not isinstance(probe_every, int)
                                        or probe_every < 1):
            raise ConfigError(f"probe_every must be a positive number of steps, got {probe_every!r}")
        self.probe_every = probe_every
        if baseline is not None and baseline not in BASELINES:
            raise ConfigError(f"unknown baseline {baseline!r}; valid: {', '.join(BASELINES)}")
        self.baseline = baseline
        if not isinstance(aa_check, bool):
            raise ConfigError(f"aa_check must be true or false, got {aa_check!r}")
        self.aa_check = aa_check
        if not isinstance(device, str) or not (device == "cpu" or device.startswith("cuda")):
            raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for, but this torch ({torch.__version__}) sees no CUDA "
                              f"device; use device 'cpu'")
        self.device = device
        from memstate.distributed.launch import rank_device

        #: where this process trains: ``device``, except under torchrun, where a CUDA device
        #: means cuda:LOCAL_RANK (each rank its own GPU; the card records ``device`` as given)
        self.build_device = rank_device(device)
        # torch's own CPU kernels (matmul, convolution, reductions) are bitwise reproducible only
        # for a fixed thread count, so the count is part of the configuration (and the card).
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads must be a positive integer, got {threads!r}")
        self.threads = threads
        self.progress = progress

    @staticmethod
    def _check_windows_value(name, w, t0, horizon):
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1 or t0 + w > horizon):
            raise ConfigError(f"the window of {name} ({w!r} steps from t0={t0}) must be an integer >= 1 that ends "
                              f"by the horizon {horizon}")
        return w

    def _check_windows(self, window, t0, horizon) -> Dict[str, Optional[int]]:
        if isinstance(window, dict):
            bad = sorted(set(window) - set(self.primitives))
            if bad:
                raise ConfigError(f"window is keyed by perturbation name {self.primitives}; got {bad}")
            return {n: self._check_windows_value(n, window.get(n), t0, horizon) for n in self.primitives}
        return {n: self._check_windows_value(n, window, t0, horizon) for n in self.primitives}

    def _labels(self) -> Dict[str, str]:
        if not self.factorial:
            e = self.estimands[self.primitives[0]]
            return {"control": e.control, "treatment": e.treatment}
        labels = {"control": "carry"}
        for arm, names in self.arms.items():
            if names:
                labels[arm] = "+".join(names)
        return labels

    def config(self) -> dict:
        return {"task": self.task_spec, "task_options": self.task_options, "task_source": self.task_source, "perturbation": self.perturbation,
                "perturbation_params": self.perturbation_params, "t0": self.t0, "window": self.window,
                "horizon": self.horizon, "seeds": self.seeds, "metrics": list(self.metrics),
                "aa_check": self.aa_check, "device": self.device, "threads": self.threads,
                "estimand": self.estimand, "probe_every": self.probe_every, "baseline": self.baseline,
                "arms": self.arms, "arm_labels": self.arm_labels,
                "estimands": {n: e.to_json() for n, e in self.estimands.items()},
                "higher_is_better": {m: bool(self.task.higher_is_better.get(m, False)) for m in self.metrics}}

    def config_hash(self) -> str:
        """xxh3-128 of the canonical configuration: seed files carry it, so a resumed run never
        mixes seeds of two configurations (the seed list itself is left out: adding seeds to a
        finished run is allowed)."""
        import xxhash

        cfg = {k: v for k, v in self.config().items() if k != "seeds"}
        return xxhash.xxh3_128_hexdigest(json.dumps(cfg, sort_keys=True).encode())

    # ---------------------------------------------------------------------------- preflight
    def preflight(self) -> None:
        """Trains the first seed to t0 and checks that every primitive applies there (e.g. a
        teacher exists for reset_teacher) and every window fits, so that a bad configuration
        fails with ConfigError before a directory or a seed file is created."""
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            state = self.task.build(self.seeds[0], device=self.build_device)
            for step in range(self.t0):
                self.task.train_step(state, step)
            state.step = self.t0
            self._resolve_windows(state)
        finally:
            torch.set_num_threads(before)

    def _resolve_windows(self, state) -> Dict[str, int]:
        out = {}
        for n in self.primitives:
            p = self.params_by_name[n]
            try:  # every check apply() makes (e.g. order windows that would change an epoch's ids)
                w = _perturb.get(n).check_window(state, self.windows[n], **p)
            except _perturb.PerturbationError as e:
                raise ConfigError(f"perturbation {n} cannot be applied to task {self.task.name} at t0={self.t0}: {e}") from None
            if self.t0 + w > self.horizon:
                raise ConfigError(f"the default window of {n} ({w} steps from t0={self.t0}) ends after the horizon "
                                  f"{self.horizon}; give a shorter window or a later horizon")
            out[n] = int(w)
        return out

    def probe_steps(self, hold: int) -> List[int]:
        """Steps (number of training steps done) after which the probe is evaluated: the end of
        the hold window (``t0 + hold``), the horizon, and every ``probe_every`` steps after t0."""
        steps = {self.t0 + hold, self.horizon}
        if self.probe_every:
            steps.update(range(self.t0 + self.probe_every, self.horizon + 1, self.probe_every))
        return sorted(steps)

    # ---------------------------------------------------------------------------- one arm
    def _run_arm(self, arm: str, state, snap: Snapshot, windows: Dict[str, int], hold: int, probe_steps,
                 ref: Optional[dict] = None):
        """Runs one arm from the snapshot. ``ref`` is None for the control (whose parameter
        vectors and predictions are then collected into the returned dict), else the control's
        dict, against which this arm's divergence is measured."""
        task = self.task
        snap.restore()
        state.step = self.t0  # a plain attribute of the TrainState: not part of the snapshot
        if arm == "aa":
            names = ["null"]
        elif arm == "butterfly":
            names = []
        else:
            names = self.arms[arm]
        applied = [_perturb.apply_checked(n, state, window=windows.get(n, hold), **self.params_by_name.get(n, {}))
                   for n in names]
        # Applied.digest_before/after fingerprint TrainState, whose sampler entry includes the
        # contract's per-process name (a random suffix): not reproducible, so not recorded
        # (the "t0" checkpoint below fingerprints the perturbed state reproducibly).
        record_perturbation = [{k: v for k, v in a.to_json().items() if k not in _UNREPLAYABLE}
                               for a in applied] or None
        if arm == "butterfly":
            record_perturbation = [_butterfly(state)]
        checkpoints, cdigests = {}, {}
        fp = _state_fp(task, state)
        checkpoints["t0"], cdigests["t0"] = fp.to_json(), fp.digest
        log_start = len(state.contract.log)
        window_hash = state.sampler.window_hash(self.t0, hold)
        finish_at = {self.t0 + a.window[1] - 1: [] for a in applied}
        for a in applied:
            finish_at[self.t0 + a.window[1] - 1].append(a)
        collect = {"params": [], "preds": {}} if ref is None else None
        losses, digests, param_l2, disagreement, probes = [], [], [], {}, {}
        rng_window = None
        for step in range(self.t0, self.horizon):
            losses.append(float(task.train_step(state, step)))
            for a in finish_at.get(step, ()):
                a.finish(state)
            if step == self.t0 + hold - 1:
                rng_window = [list(map(_jsonable, e)) for e in state.contract.log[log_start:]]
                fp = _state_fp(task, state)
                checkpoints["window_end"], cdigests["window_end"] = fp.to_json(), fp.digest
            digests.append(_state_fp(task, state).digest)
            vec = _params_vector(state)
            if ref is None:
                collect["params"].append(vec)
            else:
                param_l2.append(float((vec - ref["params"][step - self.t0]).norm()))
            done = step + 1
            if done in probe_steps:
                probes[str(done)] = {k: float(v) for k, v in task.evaluate(state).items() if k in self.metrics}
                preds = task.predictions(state)
                if ref is None:
                    collect["preds"][done] = preds
                else:
                    disagreement[str(done)] = _disagreement(ref["preds"][done], preds)
        fp = _state_fp(task, state)
        checkpoints["end"], cdigests["end"] = fp.to_json(), fp.digest
        rec = ArmRecord(arm, self.arm_labels.get(arm, arm), losses, digests, checkpoints, cdigests,
                        dict(probes[str(self.horizon)]), probes, window_hash, _log_hash(rng_window), rng_window,
                        record_perturbation)
        div = {"param_l2": param_l2, "prediction_disagreement": disagreement}
        return rec, (collect if ref is None else div)

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
        state = task.build(seed, device=self.build_device)
        for step in range(self.t0):
            task.train_step(state, step)
        state.step = self.t0
        windows = self._resolve_windows(state)
        hold = max(windows.values())
        probe_steps = self.probe_steps(hold)
        snap = Snapshot.capture(**task.snapshot_sources(state))
        records, divergence = {}, {}
        control, ref = self._run_arm("control", state, snap, windows, hold, probe_steps)
        records["control"] = control
        others = [a for a in self.arms if a != "control"]
        if self.baseline:
            others.append(self.baseline)
        if self.aa_check:
            others.append("aa")
        for arm in others:
            records[arm], divergence[arm] = self._run_arm(arm, state, snap, windows, hold, probe_steps, ref)
        out = {"seed": seed, "config_hash": self.config_hash(), "window": hold, "windows": windows,
               "probe_points": {"early": self.t0 + hold, "final": self.horizon},
               "arms": {a: r.to_json() for a, r in records.items()}, "divergence": divergence}
        out["order_hashes"] = {str(e): state.sampler.order_hash(e)
                               for e in range(self.horizon // max(1, state.sampler.batches_per_epoch) + 1)}
        # identical hold window: same batch ids unless a data-order primitive is applied;
        # same random draws except the declared "perturb" stream
        from memstate.rng import ContractViolation, RngContract

        violations = []
        for arm in others:
            rec = records[arm]
            order_arm = any(_perturb.get(n).source in ("S2", "S3") for n in self.arms.get(arm, ()))
            if not order_arm and control.window_hash != rec.window_hash:
                violations.append(f"{arm}: hold-window batch ids differ ({control.window_hash} vs {rec.window_hash})")
            try:
                RngContract.check(control.rng_window_log, rec.rng_window_log, may_change=("perturb",))
            except ContractViolation as e:
                violations.append(f"{arm}: {e}")
        out["contract_violations"] = violations
        if self.aa_check:
            out["aa"] = _aa_report(control, records["aa"])
        snap.restore()
        return out

    def seed_file(self, out_dir: str, seed: int) -> str:
        """Where ``run`` writes the record of ``seed``: ``out_dir/seeds/seed_{seed}.json``."""
        return os.path.join(out_dir, "seeds", f"seed_{seed}.json")

    def finished_seed(self, out_dir: str, seed: int) -> Optional[dict]:
        """The record of ``seed`` that a run left in ``out_dir`` (None if there is none);
        ConfigError, naming the file, if it is unreadable or belongs to another configuration."""
        path = self.seed_file(out_dir, seed)
        if not os.path.isfile(path):
            return None
        rec = _read_seed_file(path)
        want = self.config_hash()
        if rec.get("config_hash") != want or rec.get("seed") != seed:
            raise ConfigError(f"{path} belongs to a different configuration (config hash "
                              f"{rec.get('config_hash')!r}, this run's is {want!r}); not mixing it in")
        recorded = rec.pop(SEED_ENVIRONMENT, None)  # files written before it was recorded have none
        if recorded is not None:
            from memstate.card import RESUME_ENVIRONMENT, environment_differences

            diff = environment_differences(recorded, source="seed file", keys=RESUME_ENVIRONMENT) \
                if isinstance(recorded, dict) else ["unreadable"]
            if diff:
                raise ConfigError(f"{path} was computed in another environment ({'; '.join(diff)}); a card mixing "
                                  "environments could not be replayed bitwise anywhere: resume where the run "
                                  "started, or start a new run")
        return rec

    def run_seeds(self, seeds: Sequence[int], out_dir: Optional[str] = None, resume: bool = False,
                  on_seed=None) -> List[dict]:
        """The records of ``seeds`` (in that order): each seed is run, and written to
        ``seed_file(out_dir, seed)`` as soon as it finishes, so an interrupted run keeps it;
        with ``resume=True`` a seed already there (``finished_seed``) is reused instead."""
        records = []
        if out_dir:
            os.makedirs(os.path.join(out_dir, "seeds"), exist_ok=True)
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(seeds), desc=f"{self.task.name}/{self.perturbation}", unit="seed")
        for seed in seeds:
            rec = self.finished_seed(out_dir, seed) if resume and out_dir else None
            if rec is None:
                rec = self.run_seed(seed)
                if out_dir:
                    _atomic_json(self.seed_file(out_dir, seed), dict(rec, **{SEED_ENVIRONMENT: replay_environment()}))
            records.append(rec)
            if on_seed:
                on_seed(rec)
            if bar:
                bar.update(1)
        if bar:
            bar.close()
        return records

    def run(self, out_dir: Optional[str] = None, resume: bool = False, on_seed=None) -> "ExperimentResult":
        """Runs every seed (finished seeds are written to out_dir/seeds/ as they finish, so an
        interrupted run keeps them; resume=True reuses those whose config hash matches this
        experiment's and raises ConfigError, naming the file, for one that does not). Under
        torchrun, ``memstate.distributed.launch.run_experiment`` splits the seeds across ranks."""
        return ExperimentResult(self.config(), self.run_seeds(self.seeds, out_dir, resume, on_seed))


def _butterfly(state) -> Dict[str, Any]:
    """Scales the model's first floating-point parameter by BUTTERFLY_FACTOR, in place."""
    for name, p in state.model.named_parameters():
        if p.is_floating_point() and p.numel():
            with torch.no_grad():
                p.mul_(BUTTERFLY_FACTOR)
            return {"primitive": "butterfly", "tensor": f"model.{name}", "factor": BUTTERFLY_FACTOR,
                    "factor_text": "1 - 2^-20"}
    raise ConfigError("the butterfly baseline needs a model with a floating-point parameter")


#: The key under which a seed file (not the record in the card) keeps the environment that
#: computed it (replay_environment): a resumed run refuses to mix in seeds from another one.
SEED_ENVIRONMENT = "environment"


def replay_environment() -> dict:
    """This process's environment as far as bitwise results depend on it, and the memstate
    code computing them (the card's RESUME_ENVIRONMENT keys)."""
    from memstate.card import RESUME_ENVIRONMENT, environment

    env = environment()
    return {k: env[k] for k in RESUME_ENVIRONMENT}


def _read_seed_file(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            rec = json.loads(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ConfigError(f"{path}: unreadable seed file ({e}); remove it or start a new run") from None
    if not isinstance(rec, dict):
        raise ConfigError(f"{path}: not a seed record")
    return rec


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
    if control.losses != aa.losses or control.window_hash != aa.window_hash or control.probes != aa.probes:
        return {"identical": False, "first_step": None, "detail": "losses, probes or window hash differ"}
    return {"identical": True, "steps": len(control.digests)}


def _atomic_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


SIGN_TEXT = "memory kept minus memory perturbed, E[M(control) - M(treatment)]"


def effect_contrasts(config: dict) -> Dict[str, dict]:
    """Effect name -> {"text", "plus", "minus", "scale"}: the effect's per-seed value is
    ``scale * (sum of M(plus arms) - sum of M(minus arms))``. One perturbation: its estimand
    (M(control) - M(treatment)). A 2^k factorial design, with every factor coded +1 where its
    memory is kept: for a set S of factors, the contrast ``prod_{f in S} x_f`` averaged over
    the other factors (scale ``1 / 2^(k - |S|)``): main effects (kept minus perturbed,
    averaged over the other factors), interactions (difference of differences), and the
    joint effect M(control) - M(all factors perturbed)."""
    arms, labels = config["arms"], config["arm_labels"]
    names = config["perturbation"].split("+")
    if len(names) == 1:
        e = config["estimands"][names[0]]
        return {e["name"]: {"text": e["text"], "plus": ["control"], "minus": ["treatment"], "scale": 1.0}}
    k = len(names)
    out = {}
    for size in range(1, k + 1):
        for combo in itertools.combinations(range(k), size):
            plus, minus = [], []
            for arm, perturbed in arms.items():
                sign = 1
                for i in combo:
                    sign *= -1 if names[i] in perturbed else 1
                (plus if sign > 0 else minus).append(arm)
            scale = 1.0 / 2 ** (k - size)
            title = ("main " if size == 1 else "interaction ") + " x ".join(names[i] for i in combo)
            out[title] = {"plus": plus, "minus": minus, "scale": scale,
                          "text": _contrast_text(plus, minus, scale, labels)}
    joint = max(arms, key=lambda a: len(arms[a]))
    out["joint " + "+".join(names)] = {"plus": ["control"], "minus": [joint], "scale": 1.0,
                                       "text": _contrast_text(["control"], [joint], 1.0, labels)}
    return out


def _contrast_text(plus, minus, scale, labels) -> str:
    def side(arms):
        terms = " + ".join(f"M({labels.get(a, a)})" for a in arms)
        return terms if len(arms) == 1 else f"({terms})"

    body = f"{side(plus)} - {side(minus)}"
    return f"E[{body}]" if scale == 1.0 else f"E[{body}] / {int(round(1 / scale))}"


class ExperimentResult:
    """Per-seed records and, for the early and the final probe, the paired ATE of every effect
    and metric, sign: memory kept minus memory perturbed (see ``effect_contrasts``).

    ``tables[point]`` (point "final", and "early" when the window ends before the horizon):
    ``effects`` (effect -> metric -> PairedATE), ``holm`` (key -> Holm-adjusted p_t or None),
    ``keys`` (key -> (effect, metric)). ``ate`` / ``holm`` / ``effects`` are the final table's.
    A key is the metric for a single perturbation, ``"effect: metric"`` otherwise.
    """

    def __init__(self, config: dict, records: List[dict]):
        from memstate.stats import holm_family, paired_ate

        self.config = config
        self.records = records
        self.contrasts = effect_contrasts(config)
        points = {"final": [r["probe_points"]["final"] for r in records],
                  "early": [r["probe_points"]["early"] for r in records]}
        if points["early"] == points["final"]:
            del points["early"]
        self.points = points
        self.tables: Dict[str, dict] = {}
        for point, steps in points.items():
            def values(arm, m):
                return [r["arms"][arm]["probes"][str(s)][m] for r, s in zip(records, steps)]

            effects: Dict[str, Dict[str, Any]] = {}
            for name, c in self.contrasts.items():
                effects[name] = {}
                for m in config["metrics"]:
                    plus = [c["scale"] * sum(v) for v in zip(*(values(a, m) for a in c["plus"]))]
                    minus = [c["scale"] * sum(v) for v in zip(*(values(a, m) for a in c["minus"]))]
                    effects[name][m] = paired_ate(plus, minus)
            keys = {self._key(e, m): (e, m) for e in effects for m in effects[e]}
            adjusted = holm_family([effects[e][m] for e, m in keys.values()])
            self.tables[point] = {"effects": effects, "keys": keys, "holm": dict(zip(keys, adjusted)),
                                  "steps": steps}
        final = self.tables["final"]
        self.effects = final["effects"]
        self.holm = final["holm"]
        self.ate = {k: final["effects"][e][m] for k, (e, m) in final["keys"].items()}

    def _key(self, effect: str, metric: str) -> str:
        return metric if len(self.contrasts) == 1 else f"{effect}: {metric}"

    @property
    def aa_identical(self) -> Optional[bool]:
        if not self.config.get("aa_check"):
            return None
        return all(r["aa"]["identical"] for r in self.records)

    @property
    def violations(self) -> List[str]:
        return [f"seed {r['seed']}: {v}" for r in self.records for v in r["contract_violations"]]

    def results_json(self) -> dict:
        """The card's ``results``: sign convention, effect definitions, and per probe point the
        rows (PairedATE.to_dict() and Holm-adjusted p_t), the number of tests Holm covered, and
        the notes (sign-flip floor after Holm, seeds needed where a CI includes 0)."""
        from memstate.stats import seeds_needed, signflip_seeds_needed

        out = {"sign": SIGN_TEXT, "effects": self.contrasts, "tables": {}}
        for point, t in self.tables.items():
            rows, notes = {}, []
            for key, (e, m) in t["keys"].items():
                a = t["effects"][e][m]
                rows[key] = {"effect": e, "metric": m, "ate": a.to_dict(), "p_holm": t["holm"][key]}
                if not a.degenerate and a.ci[0] <= 0.0 <= a.ci[1]:
                    need = seeds_needed(a.sd, a.ate, a.level, PLANNING_POWER)
                    notes.append(f"{key}: the CI includes 0; a true effect of the observed size "
                                 f"({abs(a.ate):.2g}, sd {a.sd:.2g}) would need "
                                 + (f"n = {need} seeds" if need else "more seeds than can be planned")
                                 + f" for {PLANNING_POWER:.0%} power")
            m = len(rows)
            first = next(iter(t["keys"].values()))
            a0 = t["effects"][first[0]][first[1]]
            alpha = 1.0 - a0.level
            if m * a0.p_signflip_floor > alpha:
                notes.insert(0, f"the sign-flip robustness p cannot reach {alpha:.2g} after Holm over {m} tests at "
                                f"n = {a0.n} (floor {a0.p_signflip_floor:.4g} x {m} = "
                                f"{min(1.0, m * a0.p_signflip_floor):.3g}); that needs n >= "
                                f"{signflip_seeds_needed(m, alpha)} seeds")
            out["tables"][point] = {"steps": t["steps"], "tests": m, "level": a0.level, "method": a0.method,
                                    "rows": rows, "notes": notes}
        return out

    def table(self, point: str = "final") -> str:
        from memstate.report import text_table

        return text_table(self.config, self.results_json(), point)
