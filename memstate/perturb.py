"""Single-source perturbation primitives for branch-and-hold experiments.

A *primitive* changes one memory source of a training state (SEED.md, sources S1-S5) and
declares exactly which state entries it may touch. ``apply_checked`` fingerprints the state
before and after and raises ``SingleSourceViolation`` naming every entry that changed without
being declared (DESIGN.md, contract 4). The registry::

    memstate.perturb.names()               # ('null', 'reset_momentum', ...)
    memstate.perturb.get("reset_momentum") # a Primitive
    memstate.perturb.apply_checked("reset_momentum", state)          # -> Applied

Sources, primitives and default windows (``window=None``); ``h(beta)`` is the half-life
``log 0.5 / log beta`` and ``2h`` is rounded up to whole steps (beta = 0.9 gives 14):

====  ========================  ==================================================================
S1    optimizer state           ``reset_momentum`` (2h of the largest SGD ``momentum``),
                                ``reset_adam_m`` (2h of beta1), ``reset_adam_v`` (2h of beta2),
                                ``reset_adam`` (2h of max(beta1, beta2): the longer memory it
                                erases, i.e. beta2 for the usual betas), ``scale_state`` (2h of the
                                largest beta of the scaled buffers), ``reset_ema`` (2h of
                                ``ema_decay``)
S2    data order                ``order_window_swap``, ``reverse_window``, ``policy_switch``
                                (one epoch: ``sampler.batches_per_epoch``)
S3    parameter path            ``commute_pair`` (always 2 steps)
S4    auxiliary state           ``reset_bn_stats``, ``freeze_bn_stats`` (2h of the BatchNorm decay
                                ``1 - momentum``: torch's BN ``momentum`` is the weight of the NEW
                                batch statistic, so momentum 0.1 is decay 0.9 and gives 14;
                                the smallest momentum of the model's BN layers is used);
                                ``flush_queue``, ``shuffle_queue`` (a FIFO queue has no half-life:
                                its lifetime is one full turnover, ceil(K / enqueue_size) steps,
                                with ``enqueue_size`` defaulting to ``sampler.batch_size``)
S5    teacher/meta state        ``reset_teacher``, ``freeze_teacher`` (2h of ``teacher_decay``)
none  control                   ``null`` (1 step, or the default window of ``like=<primitive>``)
====  ========================  ==================================================================

Where the decays live: ``ema_decay`` / ``teacher_decay`` are taken from the primitive's
parameter of that name, else from ``state.extra["ema_decay"]`` / ``state.extra["teacher_decay"]``
(a float or a 0-d tensor; keep them as tensors if the state is also snapshotted).

Every primitive works in place under ``torch.no_grad()`` and keeps tensor identity (optimizers
and training loops hold references to the tensors). Every precondition is checked before
anything is modified: a primitive that does not apply raises ``PerturbationError`` and the
state is untouched (contract 6).

Window-limited effects and what a training loop must honour (``Applied.finish(state)`` ends
them; the runner calls it at step ``start + length``):

- ``freeze_bn_stats`` sets ``momentum = 0.0`` on every BatchNorm layer, so a training-mode
  forward computes ``running = 0 * batch_stat + 1 * running``, i.e. leaves running_mean /
  running_var unchanged (exactly, for finite batch statistics, up to a -0.0 becoming +0.0;
  a NaN/Inf batch statistic would still propagate), while normalisation still uses the batch
  statistics as in ordinary training. ``num_batches_tracked`` still counts in torch's forward; ``finish``
  restores each layer's momentum (``None`` included) and, with ``restore_count=True`` (the
  default), puts ``num_batches_tracked`` back to its value at the freeze, so that a cumulative
  average (``momentum=None``) is as if the frozen batches had never been seen.
- ``freeze_teacher`` sets the 0-d bool tensor ``state.extra["teacher_frozen"]`` (created if
  absent, filled in place otherwise) to True; the training loop must skip its teacher update
  while ``teacher_frozen(state)`` is True. ``finish`` sets it back to False.
- The order primitives (S2, S3) write ``sampler.override_window(start, batches)`` for the
  window steps only; nothing is left to undo.

Estimands (SEED.md, section 6.1). Every primitive declares the seed-paired estimand it measures,
``Primitive.estimand(params) -> Estimand``, with the sign convention of the seed::

    memory effect = E_s[ M(control: memory kept) - M(treatment: memory perturbed) ]

e.g. ``ATE_opt = E[M(carry) - M(reset_momentum)]`` and ``ATE_order = E[M(rr) - M(wr)]``.
A positive effect therefore means the kept memory *raises* the metric M. Names by source:
S1 ``ATE_opt``, S2 ``ATE_order``, S3 ``ATE_path``, S4 ``ATE_aux``, S5 ``ATE_teacher``, control
``null``. The control arm is labelled ``carry`` (it carries the memory on), the treatment arm by
the primitive's name, except ``policy_switch``: control = the sampler's policy (``rr`` when not
known), treatment = the target policy. ``Applied.estimand`` records it for each application.

Randomness (``order_window_swap``, ``policy_switch``, ``shuffle_queue``) comes from one
generator per application, in this order of preference: the ``seed`` parameter
(``torch.Generator().manual_seed(seed)``); ``state.contract.generator("perturb",
primitive=crc32(name), step=start)`` (logged in the contract's consumption log, so the
treatment arm differs from the control only in the ``perturb`` stream); else (no contract)
``torch.Generator().manual_seed(s)`` with ``s`` the low 63 bits of
``xxh3_64("memstate.perturb|{name}|{start}")``. ``Applied.params["rng"]`` records which.
"""
from __future__ import annotations

import fnmatch
import json
import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from memstate.fingerprint import StateFingerprint, fingerprint, fingerprint_state, named_state_tensors

__all__ = [
    "halflife",
    "beta_for_halflife",
    "windows_for_halflives",
    "TrainState",
    "Primitive",
    "Applied",
    "PerturbationError",
    "UnknownPrimitiveError",
    "SingleSourceViolation",
    "REQUIRED",
    "names",
    "get",
    "register",
    "unregister",
    "apply_checked",
    "check_single_source",
    "teacher_frozen",
    "SOURCES",
    "ESTIMAND_NAMES",
    "Estimand",
]

SOURCES: Dict[str, str] = {
    "S1": "optimizer state",
    "S2": "data order",
    "S3": "parameter path",
    "S4": "auxiliary state",
    "S5": "teacher/meta state",
    "none": "control (no perturbation)",
}

ESTIMAND_NAMES: Dict[str, str] = {
    "S1": "ATE_opt",
    "S2": "ATE_order",
    "S3": "ATE_path",
    "S4": "ATE_aux",
    "S5": "ATE_teacher",
    "none": "null",
}
"""Estimand name of each source (SEED.md 6.1 names ATE_opt and ATE_order; the rest follow suit)."""


# ----------------------------------------------------------------------------------- errors
class PerturbationError(ValueError):
    """A primitive does not apply to this state or got bad parameters; nothing was changed."""


class UnknownPrimitiveError(PerturbationError, KeyError):
    """No primitive of that name; the message lists the valid names."""

    def __str__(self):  # KeyError would repr-quote the message
        return str(self.args[0]) if self.args else ""


class SingleSourceViolation(RuntimeError):
    """A primitive changed state entries it did not declare (DESIGN.md contract 4).

    ``undeclared``: the sorted names that changed without matching a declared pattern;
    ``changed``: every name that changed. The state has already been modified.
    """

    def __init__(self, message: str, undeclared: Sequence[str] = (), changed: Sequence[str] = ()):
        super().__init__(message)
        self.undeclared = list(undeclared)
        self.changed = list(changed)


# ----------------------------------------------------------------------------------- estimands
def _label(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip() or value != value.strip():
        raise ValueError(f"Estimand: {what} must be a non-empty str without surrounding blanks, got {value!r}")
    return value


@dataclass(frozen=True)
class Estimand:
    """The seed-paired estimand an experiment measures (SEED.md 6.1).

    ``name`` (e.g. "ATE_opt"), ``control`` (label of the arm that keeps the memory, e.g.
    "carry", or "rr" for an order-policy switch) and ``treatment`` (label of the perturbed arm,
    e.g. "reset_momentum", or "wr"). The effect is ``E_s[M(control) - M(treatment)]``: memory
    kept minus memory perturbed, per seed s, averaged over seeds. Labels are display text
    (arm names in tables, CSV headers and plots), not identifiers.
    """

    name: str
    control: str
    treatment: str

    def __post_init__(self):
        _label(self.name, "name")
        _label(self.control, "control")
        _label(self.treatment, "treatment")
        if self.control == self.treatment:
            raise ValueError(f"Estimand {self.name!r}: control and treatment are both labelled {self.control!r}")

    @property
    def text(self) -> str:
        """E.g. ``"ATE_opt = E[M(carry) - M(reset_momentum)]"``."""
        return f"{self.name} = E[M({self.control}) - M({self.treatment})]"

    def to_json(self) -> Dict[str, str]:
        """JSON-able record for protocol cards (``text`` included; ``from_json`` checks it)."""
        return {"name": self.name, "control": self.control, "treatment": self.treatment, "text": self.text}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "Estimand":
        """Inverse of ``to_json``; ValueError naming the bad key for a malformed record."""
        if not isinstance(obj, Mapping):
            raise ValueError(f"an estimand record must be a JSON object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - {"name", "control", "treatment", "text"})
        if unknown:
            raise ValueError(f"estimand record: unknown key(s) {', '.join(map(str, unknown))}")
        missing = [k for k in ("name", "control", "treatment") if k not in obj]
        if missing:
            raise ValueError(f"estimand record: missing key(s) {', '.join(missing)}")
        e = cls(obj["name"], obj["control"], obj["treatment"])
        if "text" in obj and obj["text"] != e.text:
            raise ValueError(f"estimand record: text {obj['text']!r} does not match its fields ({e.text!r})")
        return e


# ----------------------------------------------------------------------------------- half-lives
def halflife(beta: float) -> float:
    """Half-life in steps of an exponential average with decay ``beta``: log(0.5) / log(beta).

    beta = 0.9 gives 6.58 steps, 0.99 gives 68.97, 0.999 gives 692.8. ``beta`` must lie in
    (0, 1) (ValueError otherwise).
    """
    b = float(beta)
    if not (0.0 < b < 1.0):
        raise ValueError(f"halflife needs a decay beta in (0, 1), got {beta!r}")
    return math.log(0.5) / math.log(b)


def beta_for_halflife(h: float) -> float:
    """The decay whose half-life is ``h`` steps: 0.5 ** (1 / h); the inverse of ``halflife``.

    ``h`` must be a finite number > 0 (ValueError otherwise).
    """
    x = float(h)
    if not (x > 0.0 and math.isfinite(x)):
        raise ValueError(f"beta_for_halflife needs a finite half-life > 0 steps, got {h!r}")
    return 0.5 ** (1.0 / x)


def windows_for_halflives(beta: float, n: float = 2.0) -> int:
    """``n`` half-lives of ``beta`` rounded up to whole steps (at least 1): the S1/S4/S5 rule."""
    return max(1, math.ceil(n * halflife(beta) - 1e-9))


# ----------------------------------------------------------------------------------- train state
def _fingerprintable(obj: Any) -> Any:
    """The tensor-bearing part of an ``extra`` value (None if it holds no state tensors)."""
    if isinstance(obj, (torch.Tensor, torch.nn.Module, torch.optim.Optimizer)):
        return obj
    if isinstance(obj, Mapping):
        sub = {str(k): v for k, v in ((k, _fingerprintable(v)) for k, v in obj.items()) if v is not None}
        return sub or None
    return None


def _canonical(obj: Any, path: str) -> Any:
    """JSON-able canonical form of a sampler state tree (tensors by dtype, shape and msfp1)."""
    if isinstance(obj, torch.Tensor):
        return {"__tensor__": [str(obj.dtype).replace("torch.", ""), list(obj.shape), fingerprint(obj).hex()]}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": [obj.dtype.str, list(obj.shape), obj.ravel().tolist()]}
    if isinstance(obj, np.generic):
        return _canonical(obj.item(), path)
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        items = [[str(k), _canonical(v, f"{path}.{k}")] for k, v in obj.items()]
        return {"__dict__": sorted(items, key=lambda kv: kv[0])}
    raise TypeError(f"{path}: cannot fingerprint a {type(obj).__name__} in the sampler state")


def _json_bytes_tensor(obj: Any) -> torch.Tensor:
    data = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
    return torch.tensor(list(data), dtype=torch.uint8)


def _overrides_canonical(sampler) -> list:
    ov = getattr(sampler, "overrides", None) or {}
    return [[int(step), [int(i) for i in ids]] for step, ids in sorted(ov.items(), key=lambda kv: int(kv[0]))]


@dataclass
class TrainState:
    """The live training state a primitive acts on.

    - ``model``: the student ``nn.Module``; ``optimizer``: a torch/memstate optimizer;
    - ``sampler``: a ``memstate.data.OrderSampler`` (or anything with ``batch(step)``,
      ``override_window(start, batches)``, ``overrides``, ``batches_per_epoch``, ``batch_size``,
      ``n``, ``policy`` and ``state_dict()``);
    - ``extra``: auxiliary state by name: ``"ema"`` (shadow module or dict of tensors),
      ``"teacher"`` (module), ``"queue"`` (tensor), ``"queue_ptr"`` (0-d int64 tensor),
      ``"teacher_frozen"`` (0-d bool tensor, see ``freeze_teacher``), decays;
    - ``step``: the next global step, where a perturbation's window starts;
    - ``contract``: the ``memstate.rng.RngContract`` whose ``"perturb"`` stream primitives draw from.
    """

    model: Optional[torch.nn.Module] = None
    optimizer: Optional[torch.optim.Optimizer] = None
    sampler: Any = None
    extra: Dict[str, Any] = field(default_factory=dict)
    step: int = 0
    contract: Any = None

    def fingerprint(self) -> StateFingerprint:
        """State fingerprint: ``model.*``, ``optimizer.state.*``, ``extra.*`` (tensors and
        modules of ``extra``; plain numbers are skipped) and, with a sampler, two pseudo-entries:

        - ``sampler.window``: uint8 bytes of the canonical JSON ``[[step, [ids...]], ...]`` of
          ``sampler.overrides`` sorted by step (what the order primitives write);
        - ``sampler.state``: uint8 bytes of the canonical JSON of ``sampler.state_dict()``
          without its top-level ``"overrides"`` key (covered by ``sampler.window``); tensors
          inside appear as (dtype, shape, msfp1).
        """
        tree: Dict[str, Any] = {}
        if self.model is not None:
            tree["model"] = self.model
        if self.optimizer is not None:
            tree["optimizer"] = self.optimizer
        extra = _fingerprintable(self.extra or {})
        if extra:
            tree["extra"] = extra
        if self.sampler is not None:
            sd = self.sampler.state_dict() if hasattr(self.sampler, "state_dict") else {}
            if isinstance(sd, Mapping):
                sd = {k: v for k, v in sd.items() if k != "overrides"}
            tree["sampler"] = {
                "window": _json_bytes_tensor(_overrides_canonical(self.sampler)),
                "state": _json_bytes_tensor(_canonical(sd, "sampler")),
            }
        return fingerprint_state(tree)


def teacher_frozen(state: TrainState, flag_key: str = "teacher_frozen") -> bool:
    """True while ``freeze_teacher`` holds: the training loop must then skip its teacher update."""
    flag = (state.extra or {}).get(flag_key)
    return bool(flag.item()) if isinstance(flag, torch.Tensor) else bool(flag)


# ----------------------------------------------------------------------------------- primitives
class _Required:
    def __repr__(self):
        return "REQUIRED"


REQUIRED = _Required()
"""Marks a parameter without default in ``Primitive(params=...)``."""


def _jsonable(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return repr(v)


@dataclass
class Applied:
    """Record of one application: what, where, with which parameters, and what changed.

    ``window`` is ``(start_step, length)``: the perturbation's effects cover steps
    ``start <= t < start + length``. ``changed`` (set by ``apply_checked``) lists the entries
    whose fingerprint changed; ``digest_before``/``digest_after`` the state digests;
    ``estimand`` the primitive's declared estimand for these parameters and this state.
    ``finish(state)`` ends window-limited effects (idempotent; a no-op for most primitives).
    """

    name: str
    source: str
    window: Tuple[int, int]
    params: Dict[str, Any]
    touches: Tuple[str, ...]
    changed: Optional[List[str]] = None
    digest_before: Optional[str] = None
    digest_after: Optional[str] = None
    estimand: Optional[Estimand] = None
    finished: bool = False
    _finish: Optional[Callable[[TrainState], None]] = field(default=None, repr=False)

    @property
    def start(self) -> int:
        return self.window[0]

    @property
    def end(self) -> int:
        """First step after the window (where ``finish`` is due)."""
        return self.window[0] + self.window[1]

    @property
    def has_finish(self) -> bool:
        """Whether ``finish`` has something to undo."""
        return self._finish is not None

    def finish(self, state: TrainState) -> None:
        if self.finished:
            return
        if self._finish is not None:
            with torch.no_grad():
                self._finish(state)
        self.finished = True

    def to_json(self) -> Dict[str, Any]:
        """JSON-able record for protocol cards."""
        return {
            "primitive": self.name,
            "source": self.source,
            "source_label": SOURCES.get(self.source, self.source),
            "window": {"start": self.window[0], "length": self.window[1]},
            "params": _jsonable(self.params),
            "touches": list(self.touches),
            "changed": None if self.changed is None else list(self.changed),
            "digest_before": self.digest_before,
            "digest_after": self.digest_after,
            "estimand": None if self.estimand is None else self.estimand.to_json(),
        }


# type aliases for the rule functions: (state, params) -> ..., params fully resolved
CheckFn = Callable[[TrainState, Dict[str, Any]], None]
WindowFn = Callable[[TrainState, Dict[str, Any]], int]
ApplyFn = Callable[[TrainState, Dict[str, Any], int, int], Optional[Callable[[TrainState], None]]]
DeclaredFn = Callable[[TrainState, Dict[str, Any]], Tuple[str, ...]]
EstimandFn = Callable[[Dict[str, Any], Optional[TrainState]], Estimand]

# keys an application adds to its parameters (Applied.params), accepted back by Primitive.estimand
_RECORD_KEYS = frozenset({"rng", "from"})


class Primitive:
    """One perturbation primitive.

    - ``name``; ``source``: "S1".."S5" or "none"; ``source_label``: e.g. "optimizer state";
    - ``touches``: fnmatch patterns (``fnmatchcase``; ``*`` also matches dots) over state
      fingerprint names that the primitive may change, e.g. ``("optimizer.state.*.exp_avg",)``;
      ``declared(state, **params)`` narrows them for given parameters (e.g. ``reset_adam``
      without ``reset_step`` does not declare ``step``); the single-source check uses that;
    - ``params``: name -> default (``REQUIRED`` for none); unknown names are an error listing
      the valid ones;
    - ``default_window(state, **params)``, ``check(state, **params)``, ``apply(state, *,
      window=None, **params) -> Applied``;
    - ``estimand(params, state=None) -> Estimand``: by default ``ESTIMAND_NAMES[source]`` with
      arms ``carry`` (``control`` for ``null``) and the primitive's name; ``estimand_fn(p, state)``
      overrides it (``policy_switch`` labels the arms by policy).

    Build one from rule functions (``check_fn(state, p)``, ``window_fn(state, p) -> int``,
    ``apply_fn(state, p, start, length) -> finish callable or None``, ``declared_fn(state, p)``;
    ``p`` is the dict of resolved parameters) or subclass and override ``_check``,
    ``_default_window``, ``_apply`` and ``_declared``.
    """

    def __init__(self, name: str, source: str, touches: Sequence[str], *,
                 apply_fn: Optional[ApplyFn] = None, check_fn: Optional[CheckFn] = None,
                 window_fn: Optional[WindowFn] = None, declared_fn: Optional[DeclaredFn] = None,
                 estimand_fn: Optional[EstimandFn] = None,
                 params: Optional[Mapping[str, Any]] = None, description: str = "",
                 window_rule: str = ""):
        if not isinstance(name, str) or not name:
            raise ValueError(f"a primitive needs a non-empty str name, got {name!r}")
        if source not in SOURCES:
            raise ValueError(f"primitive {name!r}: source must be one of {sorted(SOURCES)}, got {source!r}")
        self.name = name
        self.source = source
        self.source_label = SOURCES[source]
        self.touches: Tuple[str, ...] = tuple(touches)
        self.params: Dict[str, Any] = dict(params or {})
        self.description = description
        self.window_rule = window_rule
        self._check_fn, self._window_fn, self._apply_fn, self._declared_fn = check_fn, window_fn, apply_fn, declared_fn
        self._estimand_fn = estimand_fn

    def __repr__(self):
        return f"Primitive({self.name!r}, source={self.source!r}, touches={self.touches!r})"

    # -------------------------------------------------------------------- overridable rules
    def _check(self, state: TrainState, p: Dict[str, Any]) -> None:
        if self._check_fn is not None:
            self._check_fn(state, p)

    def _default_window(self, state: TrainState, p: Dict[str, Any]) -> int:
        if self._window_fn is None:
            return 1
        return self._window_fn(state, p)

    def _apply(self, state: TrainState, p: Dict[str, Any], start: int, length: int):
        if self._apply_fn is None:
            return None
        return self._apply_fn(state, p, start, length)

    def _declared(self, state: TrainState, p: Dict[str, Any]) -> Tuple[str, ...]:
        if self._declared_fn is None:
            return self.touches
        return tuple(self._declared_fn(state, p))

    def _estimand(self, p: Dict[str, Any], state: Optional[TrainState]) -> Estimand:
        if self._estimand_fn is not None:
            return self._estimand_fn(p, state)
        return Estimand(ESTIMAND_NAMES[self.source], "control" if self.source == "none" else "carry", self.name)

    # -------------------------------------------------------------------- public API
    def estimand(self, params: Optional[Mapping[str, Any]] = None, state: Optional[TrainState] = None) -> Estimand:
        """The estimand this primitive measures with ``params`` (SEED.md 6.1; sign: control -
        treatment, memory kept minus memory perturbed). ``params`` may be the user's parameters
        or a recorded ``Applied.params``; missing ones take their defaults (a REQUIRED one is not
        needed here), unknown ones raise PerturbationError. ``state`` (optional) lets labels
        depend on it, e.g. ``policy_switch``'s control is ``state.sampler.policy``."""
        params = {} if params is None else params
        if not isinstance(params, Mapping):
            raise PerturbationError(f"{self.name}: estimand params must be a mapping, got {type(params).__name__}")
        unknown = sorted(set(params) - set(self.params) - _RECORD_KEYS)
        if unknown:
            valid = ", ".join(sorted(self.params)) or "none"
            raise PerturbationError(f"{self.name}: unknown parameter(s) {', '.join(map(str, unknown))}; valid: {valid}")
        return self._estimand({**self.params, **params}, state)


    def resolve(self, params: Mapping[str, Any]) -> Dict[str, Any]:
        """Parameters merged with the defaults; unknown or missing ones raise PerturbationError."""
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            valid = ", ".join(sorted(self.params)) or "none"
            raise PerturbationError(f"{self.name}: unknown parameter(s) {', '.join(unknown)}; valid: {valid}")
        p = {**self.params, **params}
        missing = sorted(k for k, v in p.items() if v is REQUIRED)
        if missing:
            raise PerturbationError(f"{self.name}: missing required parameter(s) {', '.join(missing)}")
        return p

    def check(self, state: TrainState, **params) -> None:
        """Raises PerturbationError (naming the problem) if this primitive does not apply."""
        if not isinstance(state, TrainState):
            raise PerturbationError(f"{self.name}: needs a memstate.perturb.TrainState, got {type(state).__name__}")
        self._check(state, self.resolve(params))

    def default_window(self, state: TrainState, **params) -> int:
        """The window length (steps) used when ``apply`` gets ``window=None``."""
        p = self.resolve(params)
        return int(self._default_window(state, p))

    def declared(self, state: TrainState, **params) -> Tuple[str, ...]:
        """The fingerprint-name patterns this application may change (a subset of ``touches``)."""
        return self._declared(state, self.resolve(params))

    def apply(self, state: TrainState, *, window: Optional[int] = None, **params) -> Applied:
        """Checks, then applies the perturbation at ``state.step`` for ``window`` steps."""
        self.check(state, **params)
        p = self.resolve(params)
        if window is None:
            window = int(self._default_window(state, p))
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
            raise PerturbationError(f"{self.name}: window must be a positive int number of steps, got {window!r}")
        window = int(window)
        start = int(state.step)
        if start < 0:
            raise PerturbationError(f"{self.name}: state.step must be >= 0, got {start}")
        self._check_window(state, p, start, window)
        declared = self._declared(state, p)
        with torch.no_grad():
            finish = self._apply(state, p, start, window)
        return Applied(self.name, self.source, (start, window), p, tuple(declared),
                       estimand=self._estimand(p, state), _finish=finish)

    def _check_window(self, state: TrainState, p: Dict[str, Any], start: int, length: int) -> None:
        """Hook for window-dependent preconditions (e.g. commute_pair needs exactly 2)."""

    def to_json(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "source_label": self.source_label,
            "touches": list(self.touches),
            "params": {k: ("REQUIRED" if v is REQUIRED else _jsonable(v)) for k, v in self.params.items()},
            "window_rule": self.window_rule,
            "description": self.description,
            "estimand": self.estimand().to_json(),
        }


# ----------------------------------------------------------------------------------- registry
_REGISTRY: Dict[str, Primitive] = {}


def names() -> Tuple[str, ...]:
    """Names of the registered primitives, in registration order (null, then S1..S5)."""
    return tuple(_REGISTRY)


def get(name: str) -> Primitive:
    """The registered primitive ``name``; UnknownPrimitiveError listing the valid names otherwise."""
    if isinstance(name, Primitive):
        return name
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownPrimitiveError(
            f"unknown perturbation primitive {name!r}; valid: {', '.join(_REGISTRY)}") from None


def register(primitive: Primitive, *, replace: bool = False) -> Primitive:
    """Adds a primitive to the registry (ValueError if the name is taken, unless ``replace``)."""
    if not isinstance(primitive, Primitive):
        raise TypeError(f"register() takes a Primitive, got {type(primitive).__name__}")
    if primitive.name in _REGISTRY and not replace:
        raise ValueError(f"a primitive named {primitive.name!r} is already registered (pass replace=True)")
    _REGISTRY[primitive.name] = primitive
    return primitive


def unregister(name: str) -> None:
    """Removes a registered primitive (UnknownPrimitiveError if there is none of that name)."""
    get(name)
    del _REGISTRY[name]


# ----------------------------------------------------------------------------------- single source
def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in patterns)


def check_single_source(before: StateFingerprint, after: StateFingerprint, touches: Sequence[str], *,
                        name: str = "perturbation") -> List[str]:
    """Names of the entries that differ between ``before`` and ``after`` (fingerprint, dtype,
    shape, or present on one side only). Raises ``SingleSourceViolation`` naming those that match
    none of the ``touches`` patterns; with no patterns, any difference is a violation."""
    changed = before.diff(after)
    undeclared = [n for n in changed if not _matches(n, touches)]
    if undeclared:
        shown = ", ".join(undeclared[:20]) + (f", ... ({len(undeclared)} in all)" if len(undeclared) > 20 else "")
        raise SingleSourceViolation(
            f"{name} changed state it does not declare: {shown} (declared: {list(touches) or 'nothing'}); "
            f"the state has been modified", undeclared, changed)
    return changed


def apply_checked(name, state: TrainState, *, window: Optional[int] = None, **params) -> Applied:
    """Applies primitive ``name`` (or a Primitive) to ``state`` and proves it single-source.

    Fingerprints the state, applies, fingerprints again; every entry that changed must match a
    pattern the primitive declares for these parameters (``SingleSourceViolation`` naming the
    others if not), and ``null`` must leave the digest identical. The returned ``Applied`` lists
    the changed entries and both digests. Preconditions are checked before the first
    fingerprint, so a primitive that does not apply raises PerturbationError with no change.
    """
    prim = get(name)
    prim.check(state, **params)
    before = state.fingerprint()
    applied = prim.apply(state, window=window, **params)
    after = state.fingerprint()
    changed = check_single_source(before, after, applied.touches, name=prim.name)
    if prim.source == "none" and before.digest != after.digest:
        raise SingleSourceViolation(
            f"{prim.name} changed the state digest ({before.digest} -> {after.digest})", changed, changed)
    applied.changed = changed
    applied.digest_before, applied.digest_after = before.digest, after.digest
    return applied


# ----------------------------------------------------------------------------------- helpers
def _need(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise PerturbationError(f"{name}: {message}")


def _optimizer(state: TrainState, name: str) -> torch.optim.Optimizer:
    opt = state.optimizer
    _need(isinstance(opt, torch.optim.Optimizer), name,
          f"needs state.optimizer (a torch.optim.Optimizer), got {type(opt).__name__}")
    return opt


def _opt_param_states(opt: torch.optim.Optimizer):
    """(group, param, state dict) for every parameter, in state_dict index order."""
    for group in opt.param_groups:
        for p in group["params"]:
            yield group, p, opt.state.get(p, {})


def _momenta(opt) -> List[float]:
    return [float(g["momentum"]) for g in opt.param_groups if g.get("momentum") is not None]


def _betas(opt, i: int) -> List[float]:
    return [float(g["betas"][i]) for g in opt.param_groups if g.get("betas") is not None]


def _require_momentum(opt, name: str) -> None:
    moms = _momenta(opt)
    _need(bool(moms), name, f"{type(opt).__name__} has no 'momentum' hyperparameter, so no momentum buffers "
                            f"(for Adam-family optimizers use reset_adam_m)")
    _need(any(m > 0 for m in moms), name,
          f"{type(opt).__name__} runs without momentum (momentum=0 in every param group): there is no "
          f"momentum buffer to perturb")


def _require_adam(opt, name: str) -> None:
    _need(bool(_betas(opt, 0)), name, f"needs an Adam-family optimizer (param groups with 'betas', state "
                                      f"exp_avg / exp_avg_sq), got {type(opt).__name__}")


def _stateful_decay(state: TrainState, p: Dict[str, Any], key: str, name: str, what: str) -> float:
    decay = p.get(key)
    if decay is None:
        decay = (state.extra or {}).get(key)
    if isinstance(decay, torch.Tensor):
        decay = float(decay.item())
    _need(decay is not None, name, f"the default window is two half-lives of the {what} decay: pass {key}=... "
                                   f"(or put it in state.extra[{key!r}]), or give window= explicitly")
    try:
        windows_for_halflives(float(decay))
    except ValueError:
        raise PerturbationError(f"{name}: {key} must be a decay in (0, 1), got {decay!r}") from None
    return float(decay)


def _model_tensors(model: torch.nn.Module) -> List[Tuple[str, torch.Tensor]]:
    return named_state_tensors(model)


def _copy_pairs(state: TrainState, key: str, name: str) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(destination, source) pairs for ``extra[key] := model``; all checks before any copy."""
    model = state.model
    _need(isinstance(model, torch.nn.Module), name, f"needs state.model (the student), got {type(model).__name__}")
    dst = (state.extra or {}).get(key)
    _need(dst is not None, name, f"state.extra has no {key!r} (present: {sorted(state.extra or {}) or 'nothing'})")
    _need(isinstance(dst, (torch.nn.Module, Mapping)), name,
          f"state.extra[{key!r}] must be an nn.Module or a dict of tensors, got {type(dst).__name__}")
    _need(dst is not model, name, f"state.extra[{key!r}] is the model itself")
    dst_map = dict(named_state_tensors(dst))
    pairs, missing, bad = [], [], []
    for n, src in _model_tensors(model):
        d = dst_map.get(n)
        if d is None:
            d = dst_map.get("module." + n)  # torch.optim.swa_utils.AveragedModel
        if d is None:
            missing.append(n)
        elif tuple(d.shape) != tuple(src.shape):
            bad.append(f"{n} {tuple(d.shape)} vs {tuple(src.shape)}")
        else:
            pairs.append((d, src))
    _need(not missing, name, f"state.extra[{key!r}] has no counterpart of the model's {', '.join(missing[:10])}")
    _need(not bad, name, f"state.extra[{key!r}] has shapes that differ from the model's: {', '.join(bad[:10])}")
    return pairs


def _batchnorms(state: TrainState, name: str) -> List[Tuple[str, torch.nn.Module]]:
    model = state.model
    _need(isinstance(model, torch.nn.Module), name, f"needs state.model, got {type(model).__name__}")
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    _need(bool(bns), name, f"the model ({type(model).__name__}) has no BatchNorm layer")
    untracked = [n or "<root>" for n, m in bns if not m.track_running_stats or m.running_mean is None]
    _need(not untracked, name, f"BatchNorm layer(s) {', '.join(untracked)} keep no running statistics "
                               f"(track_running_stats=False)")
    return bns


def _bn_names(state: TrainState, bns) -> Tuple[str, ...]:
    out = []
    for n, m in bns:
        prefix = f"model.{n}." if n else "model."
        for b in ("running_mean", "running_var", "num_batches_tracked"):
            if getattr(m, b, None) is not None:
                out.append(prefix + b)
    return tuple(out)


def _bn_window(state: TrainState, name: str) -> int:
    bns = _batchnorms(state, name)
    moms = [m.momentum for _, m in bns]
    _need(all(mo is not None for mo in moms), name,
          "a BatchNorm layer uses a cumulative average (momentum=None), which has no half-life; give window=")
    smallest = min(float(mo) for mo in moms)
    _need(0.0 < smallest < 1.0, name, f"BatchNorm momentum {smallest} gives no finite half-life; give window=")
    return windows_for_halflives(1.0 - smallest)


def _sampler(state: TrainState, name: str):
    s = state.sampler
    _need(s is not None, name, "needs state.sampler (a memstate.data.OrderSampler)")
    for attr in ("batch", "override_window"):
        _need(callable(getattr(s, attr, None)), name, f"state.sampler ({type(s).__name__}) has no {attr}()")
    return s


def _name_index(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def _check_perturb_stream(state: TrainState, p: Dict[str, Any], name: str) -> None:
    if p.get("seed") is not None:
        _need(isinstance(p["seed"], int) and not isinstance(p["seed"], bool), name,
              f"seed must be an int, got {p['seed']!r}")
        return
    c = state.contract
    if c is not None:
        streams = tuple(getattr(c, "streams", ()))
        _need("perturb" in streams, name, f"state.contract has no 'perturb' stream; its streams are "
                                          f"{', '.join(streams) or 'none'}")


def _generator(state: TrainState, name: str, start: int, p: Dict[str, Any]) -> torch.Generator:
    """The application's generator (see the module docstring); records its origin in ``p``."""
    seed = p.get("seed")
    if seed is not None:
        p["rng"] = f"seed {int(seed)}"
        return torch.Generator().manual_seed(int(seed))
    if state.contract is not None:
        label = getattr(state.contract, "name", "?")
        p["rng"] = f"contract {label!r} perturb(primitive={_name_index(name)}, step={start})"
        return state.contract.generator("perturb", primitive=_name_index(name), step=start)
    import xxhash

    s = xxhash.xxh3_64_intdigest(f"memstate.perturb|{name}|{start}".encode("utf-8")) & ((1 << 63) - 1)
    p["rng"] = f"fallback xxh3_64('memstate.perturb|{name}|{start}')"
    return torch.Generator().manual_seed(s)


def _window_batches(sampler, start: int, length: int) -> List[List[int]]:
    return [[int(i) for i in sampler.batch(t)] for t in range(start, start + length)]


def _recut(ids: Sequence[int], sizes: Sequence[int]) -> List[List[int]]:
    out, pos = [], 0
    for sz in sizes:
        out.append([int(i) for i in ids[pos:pos + sz]])
        pos += sz
    return out


# ----------------------------------------------------------------------------------- S1 rules
_OPT_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _opt_patterns(keys: Sequence[str]) -> Tuple[str, ...]:
    return tuple(f"optimizer.state.*.{k}" for k in keys)


def _zero_keys(opt, keys: Sequence[str]) -> None:
    for _, _, st in _opt_param_states(opt):
        for k in keys:
            v = st.get(k)
            if isinstance(v, torch.Tensor):
                v.zero_()


def _momentum_check(state, p):
    _require_momentum(_optimizer(state, "reset_momentum"), "reset_momentum")


def _momentum_window(state, p):
    opt = _optimizer(state, "reset_momentum")
    _require_momentum(opt, "reset_momentum")
    return windows_for_halflives(max(m for m in _momenta(opt) if m > 0))


def _momentum_apply(state, p, start, length):
    _zero_keys(state.optimizer, ("momentum_buffer",))


def _adam_check_factory(name):
    def check(state, p):
        _require_adam(_optimizer(state, name), name)
    return check


def _adam_window_factory(name, which: Sequence[int]):
    def window(state, p):
        opt = _optimizer(state, name)
        _require_adam(opt, name)
        return windows_for_halflives(max(b for i in which for b in _betas(opt, i)))
    return window


def _adam_v_keys(p) -> Tuple[str, ...]:
    return ("exp_avg_sq", "max_exp_avg_sq") if p.get("include_max", True) else ("exp_avg_sq",)


def _adam_all_keys(p) -> Tuple[str, ...]:
    return ("exp_avg",) + _adam_v_keys(p) + (("step",) if p.get("reset_step") else ())


def _adam_apply(state, p, start, length):
    opt = state.optimizer
    _zero_keys(opt, [k for k in _adam_all_keys(p) if k != "step"])
    if p.get("reset_step"):
        for _, _, st in _opt_param_states(opt):
            s = st.get("step")
            if isinstance(s, torch.Tensor):
                s.zero_()
            elif s is not None:
                st["step"] = type(s)(0)


def _scale_keys(state: TrainState, p: Dict[str, Any]) -> Tuple[str, ...]:
    opt = _optimizer(state, "scale_state")
    has_mom = any(m > 0 for m in _momenta(opt))
    has_adam = bool(_betas(opt, 0))
    has_ams = any(g.get("amsgrad") for g in opt.param_groups)
    keys = p.get("keys")
    if keys is None:
        keys = (("momentum_buffer",) if has_mom else ()) + (("exp_avg", "exp_avg_sq") if has_adam else ()) \
            + (("max_exp_avg_sq",) if has_ams else ())
        _need(bool(keys), "scale_state", f"{type(opt).__name__} has no moment buffers (no momentum, no betas)")
        return keys
    keys = (keys,) if isinstance(keys, str) else tuple(keys)
    unknown = [k for k in keys if k not in _OPT_KEYS]
    _need(not unknown, "scale_state",
          f"unknown state key(s) {', '.join(map(str, unknown))}; valid: {', '.join(_OPT_KEYS)}")
    _need(bool(keys), "scale_state", "keys is empty")
    if "momentum_buffer" in keys:
        _require_momentum(opt, "scale_state")
    if any(k in keys for k in ("exp_avg", "exp_avg_sq")):
        _require_adam(opt, "scale_state")
    _need("max_exp_avg_sq" not in keys or has_ams, "scale_state",
          "max_exp_avg_sq exists only with amsgrad=True")
    return keys


def _scale_check(state, p):
    keys = _scale_keys(state, p)
    try:
        alpha = float(p["alpha"])
    except (TypeError, ValueError):
        raise PerturbationError(f"scale_state: alpha must be a number, got {p['alpha']!r}") from None
    _need(math.isfinite(alpha), "scale_state", f"alpha must be finite, got {alpha}")
    _need(alpha >= 0 or not any(k in keys for k in ("exp_avg_sq", "max_exp_avg_sq")), "scale_state",
          f"alpha={alpha} < 0 would make the second moments negative")


def _scale_window(state, p):
    keys = _scale_keys(state, p)
    opt = state.optimizer
    betas = []
    for k in keys:
        betas += [m for m in _momenta(opt) if m > 0] if k == "momentum_buffer" else \
            _betas(opt, 0) if k == "exp_avg" else _betas(opt, 1)
    return windows_for_halflives(max(betas))


def _scale_apply(state, p, start, length):
    keys = _scale_keys(state, p)
    p["keys"] = list(keys)
    alpha = float(p["alpha"])
    for _, _, st in _opt_param_states(state.optimizer):
        for k in keys:
            v = st.get(k)
            if isinstance(v, torch.Tensor):
                v.mul_(alpha)


def _ema_check(state, p):
    _copy_pairs(state, p["key"], "reset_ema")


def _ema_apply(state, p, start, length):
    for d, s in _copy_pairs(state, p["key"], "reset_ema"):
        d.copy_(s)


def _ema_declared(state, p):
    return (f"extra.{p['key']}.*",)


# ----------------------------------------------------------------------------------- S2/S3 rules
def _epoch_window(name):
    def window(state, p):
        s = _sampler(state, name)
        bpe = getattr(s, "batches_per_epoch", None)
        _need(isinstance(bpe, int) and bpe >= 1, name, f"state.sampler has no usable batches_per_epoch ({bpe!r})")
        return bpe
    return window


def _sampler_check_factory(name):
    def check(state, p):
        _sampler(state, name)
        if "seed" in p:
            _check_perturb_stream(state, p, name)
    return check


def _swap_apply(state, p, start, length):
    s = state.sampler
    batches = _window_batches(s, start, length)
    ids = [i for b in batches for i in b]
    perm = torch.randperm(len(ids), generator=_generator(state, "order_window_swap", start, p)).tolist()
    s.override_window(start, _recut([ids[j] for j in perm], [len(b) for b in batches]))


def _reverse_apply(state, p, start, length):
    s = state.sampler
    s.override_window(start, _window_batches(s, start, length)[::-1])


_POLICIES = ("rr", "wr", "so", "fixed")  # memstate.data.POLICIES; switch targets: rr, wr


def _policy_target(state, p) -> Tuple[str, str]:
    s = _sampler(state, "policy_switch")
    cur = getattr(s, "policy", None)
    _need(cur in _POLICIES, "policy_switch", f"sampler policy {cur!r} is not one of {', '.join(_POLICIES)}")
    to = p.get("to")
    if to is None:
        to = "rr" if cur == "wr" else "wr"
    _need(to in ("rr", "wr"), "policy_switch", f"to={to!r}; valid: rr, wr")
    _need(to != cur, "policy_switch", f"the sampler already uses policy {cur!r}")
    return cur, to


def _policy_estimand(p: Dict[str, Any], state: Optional[TrainState]) -> Estimand:
    """ATE_order = E[M(current policy) - M(target policy)]; the current policy is the recorded
    ``from``, else ``state.sampler.policy``, else "rr" (the usual sampler); the target is ``to``,
    else the default switch (wr -> rr, anything else -> wr)."""
    cur = p.get("from")
    if cur is None and state is not None and state.sampler is not None:
        cur = getattr(state.sampler, "policy", None)
    to = p.get("to")
    _need(to is None or to in ("rr", "wr"), "policy_switch", f"to={to!r}; valid: rr, wr")
    if cur is None:
        cur = "carry" if to == "rr" else "rr"  # a switch to rr comes from a policy we do not know
    if to is None:
        to = "rr" if cur == "wr" else "wr"
    _need(to != cur, "policy_switch", f"the sampler already uses policy {cur!r}")
    return Estimand(ESTIMAND_NAMES["S2"], str(cur), to)


def _policy_check(state, p):
    _policy_target(state, p)
    _check_perturb_stream(state, p, "policy_switch")
    n = getattr(state.sampler, "n", None)
    _need(isinstance(n, int) and n >= 1, "policy_switch", f"state.sampler has no usable dataset size n ({n!r})")


def _policy_apply(state, p, start, length):
    s = state.sampler
    _, to = _policy_target(state, p)
    p["from"], p["to"] = s.policy, to
    sizes = [len(b) for b in _window_batches(s, start, length)]
    g = _generator(state, "policy_switch", start, p)
    total, n = sum(sizes), int(s.n)
    if to == "wr":  # independent uniform draws with replacement
        ids = torch.randint(0, n, (total,), generator=g).tolist()
    else:  # random reshuffling: fresh permutations of the dataset, as many as the window needs
        ids = []
        while len(ids) < total:
            ids += torch.randperm(n, generator=g).tolist()
        ids = ids[:total]
    s.override_window(start, _recut(ids, sizes))


def _commute_apply(state, p, start, length):
    s = state.sampler
    a, b = _window_batches(s, start, 2)
    s.override_window(start, [b, a])


# ----------------------------------------------------------------------------------- S4 rules
def _reset_bn_apply(state, p, start, length):
    for _, m in _batchnorms(state, "reset_bn_stats"):
        m.reset_running_stats()  # in place: running_mean 0, running_var 1, num_batches_tracked 0


def _freeze_bn_apply(state, p, start, length):
    bns = _batchnorms(state, "freeze_bn_stats")
    saved = [(m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for _, m in bns]
    for m, _, _ in saved:
        m.momentum = 0.0
    restore_count = bool(p.get("restore_count", True))

    def finish(state_):
        for m, mom, nbt in saved:
            m.momentum = mom
            if restore_count and nbt is not None:
                m.num_batches_tracked.copy_(nbt)
    return finish


def _queue(state: TrainState, p, name: str) -> torch.Tensor:
    key = p["key"]
    q = (state.extra or {}).get(key)
    _need(q is not None, name, f"state.extra has no {key!r} (present: {sorted(state.extra or {}) or 'nothing'})")
    _need(isinstance(q, torch.Tensor), name, f"state.extra[{key!r}] must be a tensor, got {type(q).__name__}")
    dim = p.get("dim", 0)
    _need(isinstance(dim, int) and -q.dim() <= dim < q.dim() and q.dim() >= 1, name,
          f"dim={dim!r} is not a dimension of the queue (shape {tuple(q.shape)})")
    return q


def _queue_check(name):
    def check(state, p):
        _queue(state, p, name)
        if "seed" in p:
            _check_perturb_stream(state, p, name)
        ptr_key = p.get("ptr_key")
        if ptr_key is not None and ptr_key in (state.extra or {}):
            ptr = state.extra[ptr_key]
            _need(isinstance(ptr, torch.Tensor), name,
                  f"state.extra[{ptr_key!r}] must be a tensor (0-d int64), got {type(ptr).__name__}")
    return check


def _queue_window(name):
    def window(state, p):
        q = _queue(state, p, name)
        k = q.shape[p.get("dim", 0)]
        per_step = p.get("enqueue_size")
        if per_step is None and state.sampler is not None:
            per_step = getattr(state.sampler, "batch_size", None)
        _need(isinstance(per_step, int) and per_step >= 1, name,
              "the default window is one queue turnover, ceil(queue length / enqueue_size) steps: pass "
              "enqueue_size=... (or have state.sampler), or give window=")
        return max(1, math.ceil(k / per_step))
    return window


def _flush_apply(state, p, start, length):
    state.extra[p["key"]].zero_()
    ptr_key = p.get("ptr_key")
    if ptr_key is not None and isinstance(state.extra.get(ptr_key), torch.Tensor):
        state.extra[ptr_key].zero_()


def _flush_declared(state, p):
    return (f"extra.{p['key']}",) + ((f"extra.{p['ptr_key']}",) if p.get("ptr_key") else ())


def _shuffle_apply(state, p, start, length):
    q = state.extra[p["key"]]
    dim = p.get("dim", 0)
    perm = torch.randperm(q.shape[dim], generator=_generator(state, "shuffle_queue", start, p)).to(q.device)
    q.copy_(q.index_select(dim, perm))


# ----------------------------------------------------------------------------------- S5 rules
def _teacher_check(state, p):
    _copy_pairs(state, p["key"], "reset_teacher")


def _teacher_apply(state, p, start, length):
    for d, s in _copy_pairs(state, p["key"], "reset_teacher"):
        d.copy_(s)


def _freeze_teacher_check(state, p):
    key, flag_key = p["key"], p["flag_key"]
    _need((state.extra or {}).get(key) is not None, "freeze_teacher",
          f"state.extra has no {key!r} (present: {sorted(state.extra or {}) or 'nothing'})")
    flag = state.extra.get(flag_key)
    if flag is not None:
        _need(isinstance(flag, torch.Tensor) and flag.numel() == 1, "freeze_teacher",
              f"state.extra[{flag_key!r}] must be a one-element tensor flag, got {type(flag).__name__}")
        _need(not bool(flag.item()), "freeze_teacher", "the teacher is already frozen")


def _freeze_teacher_apply(state, p, start, length):
    flag_key = p["flag_key"]
    flag = state.extra.get(flag_key)
    if flag is None:
        state.extra[flag_key] = torch.tensor(True)
    else:
        flag.fill_(True)

    def finish(state_):
        state.extra[flag_key].fill_(False)
    return finish


# ----------------------------------------------------------------------------------- null
def _null_window(state, p):
    like = p.get("like")
    if like is None:
        return 1
    _need(like != "null", "null", "like='null' is circular")
    return get(like).default_window(state)


# ----------------------------------------------------------------------------------- built-ins
def _builtin() -> List[Primitive]:
    S1_ADAM_WIN = "two half-lives of beta1"
    return [
        Primitive("null", "none", (), window_fn=_null_window, params={"like": None},
                  description="changes nothing: the A/A control; must leave the state digest unchanged",
                  window_rule="1 step, or the default window of like=<primitive>"),
        # S1 ------------------------------------------------------------------------------
        Primitive("reset_momentum", "S1", _opt_patterns(("momentum_buffer",)),
                  check_fn=_momentum_check, window_fn=_momentum_window, apply_fn=_momentum_apply,
                  description="zero every SGD momentum buffer (with dampening 0 the next step then "
                              "equals a first step, buf = grad)",
                  window_rule="two half-lives of the largest momentum"),
        Primitive("reset_adam_m", "S1", _opt_patterns(("exp_avg",)),
                  check_fn=_adam_check_factory("reset_adam_m"), window_fn=_adam_window_factory("reset_adam_m", (0,)),
                  apply_fn=lambda st, p, a, b: _zero_keys(st.optimizer, ("exp_avg",)),
                  description="zero Adam's first moments exp_avg", window_rule=S1_ADAM_WIN),
        Primitive("reset_adam_v", "S1", _opt_patterns(("exp_avg_sq", "max_exp_avg_sq")),
                  check_fn=_adam_check_factory("reset_adam_v"), window_fn=_adam_window_factory("reset_adam_v", (1,)),
                  apply_fn=lambda st, p, a, b: _zero_keys(st.optimizer, _adam_v_keys(p)),
                  declared_fn=lambda st, p: _opt_patterns(_adam_v_keys(p)),
                  params={"include_max": True},
                  description="zero Adam's second moments exp_avg_sq (and amsgrad's max_exp_avg_sq "
                              "unless include_max=False); without a step reset the next updates are large",
                  window_rule="two half-lives of beta2"),
        Primitive("reset_adam", "S1", _opt_patterns(("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step")),
                  check_fn=_adam_check_factory("reset_adam"), window_fn=_adam_window_factory("reset_adam", (0, 1)),
                  apply_fn=_adam_apply, declared_fn=lambda st, p: _opt_patterns(_adam_all_keys(p)),
                  params={"reset_step": False, "include_max": True},
                  description="zero both Adam moments; reset_step=True also sets step to 0 so bias "
                              "correction restarts as for a fresh optimizer",
                  window_rule="two half-lives of max(beta1, beta2)"),
        Primitive("scale_state", "S1", _opt_patterns(_OPT_KEYS),
                  check_fn=_scale_check, window_fn=_scale_window, apply_fn=_scale_apply,
                  declared_fn=lambda st, p: _opt_patterns(_scale_keys(st, p)),
                  params={"alpha": REQUIRED, "keys": None},
                  description="multiply moment buffers by alpha (dose-response); keys=None scales every "
                              "moment buffer the optimizer has (momentum_buffer, exp_avg, exp_avg_sq, "
                              "max_exp_avg_sq); note v scaled by alpha scales Adam's denominator by sqrt(alpha)",
                  window_rule="two half-lives of the largest beta of the scaled buffers "
                              "(momentum, beta1 for exp_avg, beta2 for exp_avg_sq)"),
        Primitive("reset_ema", "S1", ("extra.ema.*",),
                  check_fn=_ema_check, apply_fn=_ema_apply, declared_fn=_ema_declared,
                  window_fn=lambda st, p: windows_for_halflives(
                      _stateful_decay(st, p, "ema_decay", "reset_ema", "EMA")),
                  params={"key": "ema", "ema_decay": None},
                  description="weight-average shadow extra[key] := current model parameters and buffers "
                              "(an AveragedModel's n_averaged is left alone)",
                  window_rule="two half-lives of ema_decay"),
        # S2 ------------------------------------------------------------------------------
        Primitive("order_window_swap", "S2", ("sampler.window",),
                  check_fn=_sampler_check_factory("order_window_swap"), window_fn=_epoch_window("order_window_swap"),
                  apply_fn=_swap_apply, params={"seed": None},
                  description="the same multiset of batch ids in the window under a fresh permutation, "
                              "re-cut into batches of the same sizes",
                  window_rule="one epoch (sampler.batches_per_epoch)"),
        Primitive("reverse_window", "S2", ("sampler.window",),
                  check_fn=_sampler_check_factory("reverse_window"), window_fn=_epoch_window("reverse_window"),
                  apply_fn=_reverse_apply,
                  description="the window's batches in reverse order",
                  window_rule="one epoch (sampler.batches_per_epoch)"),
        Primitive("policy_switch", "S2", ("sampler.window",),
                  check_fn=_policy_check, window_fn=_epoch_window("policy_switch"), apply_fn=_policy_apply,
                  estimand_fn=_policy_estimand,
                  params={"to": None, "seed": None},
                  description="rr (or so/fixed) -> with-replacement uniform draws "
                              "(wr -> fresh permutations of the dataset) for the window, batch sizes kept",
                  window_rule="one epoch (sampler.batches_per_epoch)"),
        # S3 ------------------------------------------------------------------------------
        _CommutePair("commute_pair", "S3", ("sampler.window",),
                     check_fn=_sampler_check_factory("commute_pair"), window_fn=lambda st, p: 2,
                     apply_fn=_commute_apply,
                     description="the batches of steps t and t+1 applied as BA instead of AB",
                     window_rule="2 steps (always)"),
        # S4 ------------------------------------------------------------------------------
        Primitive("reset_bn_stats", "S4", ("model.*running_mean", "model.*running_var", "model.*num_batches_tracked"),
                  check_fn=lambda st, p: _batchnorms(st, "reset_bn_stats"),
                  window_fn=lambda st, p: _bn_window(st, "reset_bn_stats"), apply_fn=_reset_bn_apply,
                  declared_fn=lambda st, p: _bn_names(st, _batchnorms(st, "reset_bn_stats")),
                  description="every BatchNorm: running_mean 0, running_var 1, num_batches_tracked 0",
                  window_rule="two half-lives of the BN decay 1 - momentum (smallest momentum)"),
        Primitive("freeze_bn_stats", "S4", ("model.*running_mean", "model.*running_var", "model.*num_batches_tracked"),
                  check_fn=lambda st, p: _batchnorms(st, "freeze_bn_stats"),
                  window_fn=lambda st, p: _bn_window(st, "freeze_bn_stats"), apply_fn=_freeze_bn_apply,
                  declared_fn=lambda st, p: _bn_names(st, _batchnorms(st, "freeze_bn_stats")),
                  params={"restore_count": True},
                  description="BatchNorm momentum 0.0 for the window (running stats stay bitwise "
                              "unchanged); finish restores momentum and, with restore_count, "
                              "num_batches_tracked",
                  window_rule="two half-lives of the BN decay 1 - momentum (smallest momentum)"),
        Primitive("flush_queue", "S4", ("extra.queue", "extra.queue_ptr"),
                  check_fn=_queue_check("flush_queue"), window_fn=_queue_window("flush_queue"),
                  apply_fn=_flush_apply, declared_fn=_flush_declared,
                  params={"key": "queue", "ptr_key": "queue_ptr", "dim": 0, "enqueue_size": None},
                  description="contrastive queue zeroed and its pointer set to 0",
                  window_rule="one queue turnover: ceil(queue length / enqueue_size) steps"),
        Primitive("shuffle_queue", "S4", ("extra.queue",),
                  check_fn=_queue_check("shuffle_queue"), window_fn=_queue_window("shuffle_queue"),
                  apply_fn=_shuffle_apply, declared_fn=lambda st, p: (f"extra.{p['key']}",),
                  params={"key": "queue", "ptr_key": None, "dim": 0, "enqueue_size": None, "seed": None},
                  description="the queue's entries (along dim) permuted with the perturb stream",
                  window_rule="one queue turnover: ceil(queue length / enqueue_size) steps"),
        # S5 ------------------------------------------------------------------------------
        Primitive("reset_teacher", "S5", ("extra.teacher.*",),
                  check_fn=_teacher_check, apply_fn=_teacher_apply,
                  declared_fn=lambda st, p: (f"extra.{p['key']}.*",),
                  window_fn=lambda st, p: windows_for_halflives(
                      _stateful_decay(st, p, "teacher_decay", "reset_teacher", "teacher EMA")),
                  params={"key": "teacher", "teacher_decay": None},
                  description="teacher parameters and buffers := the student's",
                  window_rule="two half-lives of teacher_decay"),
        Primitive("freeze_teacher", "S5", ("extra.teacher_frozen",),
                  check_fn=_freeze_teacher_check, apply_fn=_freeze_teacher_apply,
                  declared_fn=lambda st, p: (f"extra.{p['flag_key']}",),
                  window_fn=lambda st, p: windows_for_halflives(
                      _stateful_decay(st, p, "teacher_decay", "freeze_teacher", "teacher EMA")),
                  params={"key": "teacher", "flag_key": "teacher_frozen", "teacher_decay": None},
                  description="extra[flag_key] := True for the window (the loop skips teacher updates "
                              "while teacher_frozen(state)); finish sets it to False",
                  window_rule="two half-lives of teacher_decay"),
    ]


class _CommutePair(Primitive):
    def _check_window(self, state, p, start, length):
        _need(length == 2, self.name, f"swaps exactly two consecutive batches: window must be 2, got {length}")


for _p in _builtin():
    register(_p)
del _p
