"""Types of the perturbation layer: sources, errors, estimands, half-lives, the train state,
the ``Primitive`` base and the ``Applied`` record (no primitive is defined here)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from memstate.fingerprint import StateFingerprint, fingerprint, fingerprint_state


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
    ``estimand`` the primitive's declared estimand for these parameters and this state;
    ``changes_epoch_ids`` whether it declared that it may change which ids an epoch contains
    (only ``policy_switch`` to or from ``wr`` does).
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
    changes_epoch_ids: bool = False
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
            "changes_epoch_ids": self.changes_epoch_ids,
        }


# type aliases for the rule functions: (state, params) -> ..., params fully resolved
CheckFn = Callable[[TrainState, Dict[str, Any]], None]
WindowFn = Callable[[TrainState, Dict[str, Any]], int]
ApplyFn = Callable[[TrainState, Dict[str, Any], int, int], Optional[Callable[[TrainState], None]]]
DeclaredFn = Callable[[TrainState, Dict[str, Any]], Tuple[str, ...]]
EstimandFn = Callable[[Dict[str, Any], Optional[TrainState]], Estimand]
WindowCheckFn = Callable[[TrainState, Dict[str, Any], int, int], None]
CoverageFn = Callable[[Dict[str, Any], Optional[TrainState]], bool]

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
    - ``default_window(state, **params)``, ``check(state, **params)``, ``check_window(state,
      window=None, *, start=None, **params) -> int`` (every check of ``apply``, nothing changed),
      ``apply(state, *, window=None, **params) -> Applied``;
    - ``estimand(params, state=None) -> Estimand``: by default ``ESTIMAND_NAMES[source]`` with
      arms ``carry`` (``control`` for ``null``) and the primitive's name; ``estimand_fn(p, state)``
      overrides it (``policy_switch`` labels the arms by policy);
    - ``changes_epoch_ids(params, state=None) -> bool``: whether an application may change which
      ids an epoch of the sampler contains (False unless ``changes_epoch_ids_fn`` says so); a
      primitive that declares False must keep every epoch's multiset of ids, and refuses
      (``window_check_fn(state, p, start, length)``) a window where it could not.

    Build one from rule functions (``check_fn(state, p)``, ``window_fn(state, p) -> int``,
    ``apply_fn(state, p, start, length) -> finish callable or None``, ``declared_fn(state, p)``;
    ``p`` is the dict of resolved parameters) or subclass and override ``_check``,
    ``_default_window``, ``_apply`` and ``_declared``.
    """

    def __init__(self, name: str, source: str, touches: Sequence[str], *,
                 apply_fn: Optional[ApplyFn] = None, check_fn: Optional[CheckFn] = None,
                 window_fn: Optional[WindowFn] = None, declared_fn: Optional[DeclaredFn] = None,
                 estimand_fn: Optional[EstimandFn] = None, window_check_fn: Optional[WindowCheckFn] = None,
                 changes_epoch_ids_fn: Optional[CoverageFn] = None,
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
        self._window_check_fn, self._changes_epoch_ids_fn = window_check_fn, changes_epoch_ids_fn

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

    def _changes_epoch_ids(self, p: Dict[str, Any], state: Optional[TrainState]) -> bool:
        return bool(self._changes_epoch_ids_fn(p, state)) if self._changes_epoch_ids_fn is not None else False

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
        return self._estimand(self._declaration_params(params, "estimand"), state)

    def changes_epoch_ids(self, params: Optional[Mapping[str, Any]] = None,
                          state: Optional[TrainState] = None) -> bool:
        """Whether this primitive, with ``params``, declares that it may change which ids an
        epoch of the sampler contains (``policy_switch`` to or from ``wr``: by definition of the
        policies). False means every epoch keeps its multiset of ids. ``params`` and ``state`` as
        for ``estimand``."""
        return self._changes_epoch_ids(self._declaration_params(params, "changes_epoch_ids"), state)

    def _declaration_params(self, params: Optional[Mapping[str, Any]], what: str) -> Dict[str, Any]:
        params = {} if params is None else params
        if not isinstance(params, Mapping):
            raise PerturbationError(f"{self.name}: {what} params must be a mapping, got {type(params).__name__}")
        unknown = sorted(set(params) - set(self.params) - _RECORD_KEYS)
        if unknown:
            valid = ", ".join(sorted(self.params)) or "none"
            raise PerturbationError(f"{self.name}: unknown parameter(s) {', '.join(map(str, unknown))}; valid: {valid}")
        return {**self.params, **params}


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
        p, start, window = self._prepare(state, window, params)
        declared = self._declared(state, p)
        with torch.no_grad():
            finish = self._apply(state, p, start, window)
        return Applied(self.name, self.source, (start, window), p, tuple(declared),
                       estimand=self._estimand(p, state), changes_epoch_ids=self._changes_epoch_ids(p, state),
                       _finish=finish)

    def check_window(self, state: TrainState, window: Optional[int] = None, *, start: Optional[int] = None,
                     **params) -> int:
        """Every check ``apply`` makes, for an application at step ``start`` (default
        ``state.step``) with ``window`` (None: the default window there), without changing
        anything; returns the window length in steps. Lets a runner refuse a configuration
        before training up to t0: the order primitives need only the sampler, which is
        addressable by step (e.g. ``get("order_window_swap").check_window(fresh_state, 22,
        start=30)`` raises, naming the epoch boundary at 44 at the digits defaults)."""
        if start is not None:
            if isinstance(start, bool) or not isinstance(start, (int, np.integer)):
                raise PerturbationError(f"{self.name}: start must be an int step, got {start!r}")
            state = replace(state, step=int(start))  # a shallow view: the same model, sampler, ...
        return self._prepare(state, window, params)[2]

    def _prepare(self, state: TrainState, window: Optional[int], params: Mapping[str, Any]):
        """(resolved params, start, window) after every precondition; nothing is changed."""
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
        return p, start, window

    def _check_window(self, state: TrainState, p: Dict[str, Any], start: int, length: int) -> None:
        """Window-dependent preconditions (``window_check_fn``; e.g. an order window must not
        cross an epoch boundary); raises PerturbationError before anything is changed."""
        if self._window_check_fn is not None:
            self._window_check_fn(state, p, start, length)

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
