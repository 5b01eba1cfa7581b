"""Shared machinery of memstate's fused optimizers (policy only; the arithmetic is native)."""
from __future__ import annotations

import operator
from collections import OrderedDict, defaultdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.optim import Optimizer

from memstate import _ext
from memstate.optim import _clipping
from memstate.fingerprint import Fingerprint, StateFingerprint, _from_rows

_VERSION = operator.attrgetter("_version")  # a tensor's in-place write counter
_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64, torch.complex128)
# follow-up for capturable=True (device-side step counters and lr, CUDA graph capture)
_CAPTURABLE_FOLLOW_UP = "issue 11 item 5"


def _scalar_dtype() -> torch.dtype:
    """dtype of Adam's step counter, as torch.optim: float64 under torch.set_default_dtype(float64),
    float32 otherwise."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _check_lr(lr) -> None:
    """torch.optim's learning-rate checks and messages (ValueError); a tensor lr must have one element."""
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= float(lr):
        raise ValueError(f"Invalid learning rate: {lr}")


def _check_impl_flags(name: str, *, foreach, fused, differentiable, capturable=False) -> None:
    """torch.optim's implementation flags at construction. ``foreach`` and ``fused`` are accepted
    (and kept in the param groups) but change nothing: memstate's step is always one fused native
    pass. ``differentiable=True`` and ``capturable=True`` raise NotImplementedError."""
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if fused and differentiable:
        raise RuntimeError("`fused` does not support `differentiable`")
    _refuse_flags(name, {"differentiable": differentiable, "capturable": capturable}, NotImplementedError)


def _refuse_flags(name: str, group, exc) -> None:
    """Raises ``exc`` for a flag memstate cannot honour (never silently steps another algorithm)."""
    if group.get("differentiable", False):
        raise exc(f"memstate.optim.{name} does not support differentiable=True: the fused native step is "
                  f"not differentiable through autograd; use torch.optim.{name}(differentiable=True)")
    if group.get("capturable", False):
        raise exc(f"memstate.optim.{name}: capturable=True is not implemented yet ({_CAPTURABLE_FOLLOW_UP}: "
                  f"step counters and lr on the device for CUDA graph capture); the update math is the same "
                  f"with capturable=False")


def _is_dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill one gap-free block of memory (contiguous in some dimension
    order, e.g. channels_last): then a flat view of that block visits every element once."""
    if t.numel() == 0:
        return True
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same strides wherever a dimension has more than one element."""
    return a.shape == b.shape and all(n == 1 or x == y for n, x, y in zip(a.shape, a.stride(), b.stride()))


def _state_like(p: torch.Tensor, fill: Optional[float] = None) -> torch.Tensor:
    """A state buffer for ``p`` in torch.optim's layout (``memory_format=torch.preserve_format``:
    p's strides when p is dense, e.g. channels_last; row-major otherwise)."""
    t = torch.empty_like(p, memory_format=torch.preserve_format)
    return t if fill is None else t.fill_(fill)


def _state_layout_ok(p: torch.Tensor, t: torch.Tensor) -> bool:
    """Whether state tensor ``t`` (of p's shape) is laid out as ``_state_like(p)``: p's strides
    when p is dense, row-major otherwise (for a row-major p both are ``t.is_contiguous()``,
    the per-step common case, without _is_dense's sort)."""
    if p.is_contiguous():
        return t.shape == p.shape and t.is_contiguous()
    return _same_layout(t, p) if _is_dense(p) else t.is_contiguous()


def _real(t: torch.Tensor) -> torch.Tensor:
    """``torch.view_as_real(t)`` for complex ``t`` (same bytes), ``t`` otherwise."""
    return torch.view_as_real(t) if t.is_complex() else t


def _plain(p: torch.Tensor) -> bool:
    """A real, contiguous parameter: the kernel takes it and its tensors as they are."""
    return not p.is_complex() and p.is_contiguous()


class _KernelViews:
    """The tensors one native call takes for a bucket: each parameter, gradient and state tensor
    as a contiguous real tensor over the same memory where possible.

    - complex: ``torch.view_as_real`` (as torch.optim; the bytes, hence the fingerprints, are
      the complex tensor's);
    - dense but not row-major (channels_last, permuted): a flat view of its memory block, so the
      update runs in memory order. The kernel's in-pass fingerprints then hash memory order, so
      ``finish`` replaces them by msfp1 of the logical row-major bytes, computed after the pass
      (an extra read of those tensors);
    - other strided parameters (e.g. a column slice): a row-major copy, updated and copied back.
    """

    def __init__(self):
        self.staged: List[Tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        r = _real(t)
        if r.is_contiguous():
            return r
        if _is_dense(r):
            return r.as_strided((r.numel(),), (1,))
        c = r.contiguous()
        self.staged.append((r, c))
        return c

    def finish(self, bucket: List[torch.Tensor], role_tensors: List[List[torch.Tensor]],
               rows: Optional[torch.Tensor]) -> None:
        """Copies staged parameters back; fixes the fingerprints of memory-order views.
        ``role_tensors[r][i]``: the original tensor of role r of bucket[i]."""
        for dst, src in self.staged:
            dst.copy_(src)
        if rows is None or rows.numel() == 0:
            return
        for i, p in enumerate(bucket):
            r = _real(p)
            if not r.is_contiguous() and _is_dense(r):
                rows[i] = _ext.ops().fingerprint([_real(ts[i]).contiguous() for ts in role_tensors])


def _to_host(tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    """CPU copies of small int64/bool tensors (flags, fingerprint rows): THE host sync point of
    a step. The tensors of each device are flattened into one buffer and fetched with one
    ``.cpu()`` call (one sync per device, not one per tensor or bucket); shapes are kept and
    bool tensors come back as int64."""
    out: List[Optional[torch.Tensor]] = [None] * len(tensors)
    by_device: Dict[torch.device, List[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    for idxs in by_device.values():
        flat = torch.cat([tensors[i].reshape(-1).to(torch.int64) for i in idxs]).cpu()
        offset = 0
        for i in idxs:
            n = tensors[i].numel()
            out[i] = flat[offset:offset + n].reshape(tensors[i].shape)
            offset += n
    return out  # type: ignore[return-value]


def _stream_capturing() -> bool:
    """Whether the current CUDA stream is capturing a CUDA graph (False without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _check_not_capturing(name: str) -> None:
    if _stream_capturing():
        raise RuntimeError(
            f"memstate.optim.{name}.step() cannot run under CUDA graph capture: its kernel tables are "
            f"uploaded from host memory and Adam's step counters live on the CPU, so a replayed graph "
            f"would reuse stale values. Step outside the captured region (there is no capturable=True "
            f"mode yet)."
        )


class _ParamState(dict):
    """One parameter's optimizer state (``optimizer.state[p]``): a plain dict that counts every
    mutation in its optimizer's state version (``_StateDict``), so a cached step plan notices an
    entry created, replaced or deleted without looking at any entry. Copies and pickles are
    plain dicts (``state_dict()`` hands out plain dicts too)."""

    __slots__ = ("_cell",)

    def __init__(self, cell: List[int], *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._cell = cell

    def _bump(self):
        self._cell[0] += 1

    def __setitem__(self, key, value):
        self._bump()
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self._bump()
        super().__delitem__(key)

    def __ior__(self, other):
        self._bump()
        return super().__ior__(other)

    def pop(self, *args):
        self._bump()
        return super().pop(*args)

    def popitem(self):
        self._bump()
        return super().popitem()

    def clear(self):
        self._bump()
        super().clear()

    def update(self, *args, **kwargs):
        self._bump()
        super().update(*args, **kwargs)

    def setdefault(self, key, default=None):
        self._bump()
        return super().setdefault(key, default)

    def __reduce__(self):
        return dict, (dict(self),)


class _StateDict(defaultdict):
    """``optimizer.state`` of memstate's fused optimizers: torch's ``defaultdict(dict)`` whose
    per-parameter dicts are ``_ParamState`` and which counts, in ``_cell[0]``, every mutation of
    itself or of any of them (a dict stored here is copied into a ``_ParamState``). Comparing
    that one number is how a cached step plan knows no state entry changed since it was built.
    (Writing through ``dict.__setitem__`` directly bypasses the count; don't.)"""

    def __init__(self, items=None):
        super().__init__(dict)
        self._cell = [0]
        for k, v in (items or {}).items():
            super().__setitem__(k, self._wrap(v))

    def _wrap(self, v):
        if isinstance(v, dict) and not (type(v) is _ParamState and v._cell is self._cell):
            return _ParamState(self._cell, v)
        return v

    def __missing__(self, key):
        value = self[key] = _ParamState(self._cell)
        return value

    def __setitem__(self, key, value):
        self._cell[0] += 1
        super().__setitem__(key, self._wrap(value))

    def __delitem__(self, key):
        self._cell[0] += 1
        super().__delitem__(key)

    def __ior__(self, other):
        self.update(other)
        return self

    def pop(self, *args):
        self._cell[0] += 1
        return super().pop(*args)

    def popitem(self):
        self._cell[0] += 1
        return super().popitem()

    def clear(self):
        self._cell[0] += 1
        super().clear()

    def update(self, *args, **kwargs):
        for k, v in dict(*args, **kwargs).items():
            self[k] = v

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = {} if default is None else default
        return self[key]

    def __reduce__(self):
        return _StateDict, (dict(self),)

    def __copy__(self):
        return _StateDict(self)


class _ParamList(list):
    """``group["params"]`` of memstate's fused optimizers: a plain list that counts its own
    in-place edits (``_edits``), so a cached step plan knows the list still holds the same
    parameters by comparing one number instead of every element. Copies and pickles are plain
    lists. (Editing through ``list.__setitem__`` and the like directly bypasses the count; don't.)"""

    __slots__ = ("_edits",)

    def __init__(self, *args):
        super().__init__(*args)
        self._edits = 0

    def __reduce__(self):
        return list, (list(self),)


def _counted(name):
    method = getattr(list, name)

    def edit(self, *args, **kwargs):
        self._edits += 1
        return method(self, *args, **kwargs)

    edit.__name__ = name
    return edit


for _name in ("__setitem__", "__delitem__", "__iadd__", "__imul__", "append", "extend", "insert", "pop",
              "remove", "clear", "sort", "reverse"):
    setattr(_ParamList, _name, _counted(_name))
del _name


class _StepPlan:
    """A cached step (see ``FusedOptimizer._build_plan``): the native ``StepPlan`` and what the
    per-step Python check compares (the state dict and its version; per group its parameters,
    kernel roles, and its live ``params`` list with that list's edit count), plus the buckets' parameters and roles for the fingerprint rows."""

    __slots__ = ("native", "state", "version", "groups", "buckets", "stepped", "watch", "counted")

    def __init__(self, native, state, groups, buckets, stepped, watch, counted):
        self.native, self.state, self.version = native, state, state._cell[0]
        self.groups, self.buckets, self.stepped, self.watch, self.counted = groups, buckets, stepped, watch, counted


class FusedOptimizer(Optimizer):
    """Base of memstate.optim.SGD / Adam / AdamW: a torch.optim.Optimizer whose step is one
    native multi-tensor pass per (device, dtype) bucket of each param group.

    Subclasses set ``_name`` and ``_state_keys`` (the tensor state keys, in kernel role order)
    and implement ``_init_state``, ``_step_bucket``.

    Extra options (all off by default):

    - ``fingerprint``: the step also returns the msfp1 fingerprint of every parameter (after the
      update), its gradient (as read) and every state buffer (after the update), computed in
      the same pass; see ``fingerprints(p)`` and ``state_fingerprint()``.
    - ``skip_if_nonfinite``: before anything is written, one native pass checks every gradient
      of the step for NaN/Inf (one host sync per step and device, none per tensor or bucket);
      if any is found no tensor is modified, step counters do not advance, and
      ``last_step_skipped`` is True.
    - ``max_grad_norm``: global L2 gradient-norm clipping at the start of the step, bit for bit
      ``memstate.clip_grad_norm_(params, max_grad_norm)`` (LAMB: in its kernel, as Apex); the
      pre-clip norm is ``last_grad_norm``. See memstate/optim/_clipping.py.

    A step either updates every parameter with a gradient or raises before modifying
    anything: hyperparameters of every group, gradients and existing state are all checked
    first (``_check_group``, ``_check_param``). A parameter listed twice in a group (torch.optim
    warns about it at construction) is updated once per listing, in order, as torch.optim's
    for-loop implementation does: each fused pass holds a parameter at most once, so nothing
    races. Steps refuse to run under CUDA graph capture (no ``capturable`` mode yet).

    Complex and non-contiguous parameters are stepped through ``_KernelViews``; sparse
    gradients only where a subclass implements ``_step_sparse`` (SGD).
    """

    _name = "FusedOptimizer"
    _state_keys: Tuple[str, ...] = ()

    def __init__(self, params, defaults: dict, *, fingerprint: bool, skip_if_nonfinite: bool,
                 max_grad_norm: Optional[float] = None):
        _ext.load()  # fail early, with build instructions, if the extension is missing
        self.max_grad_norm = _clipping.check_max_grad_norm(max_grad_norm)
        self.last_grad_norm: Optional[torch.Tensor] = None
        self.fingerprint = bool(fingerprint)
        self.skip_if_nonfinite = bool(skip_if_nonfinite)
        self.last_step_skipped = False
        self.skipped_steps = 0
        self._pending: List[Tuple[List[torch.Tensor], Tuple[str, ...], torch.Tensor]] = []
        self._fingerprints: Dict[int, Dict[str, Fingerprint]] = {}
        self._plan: Optional[_StepPlan] = None  # see _build_plan / _planned_step; None: next step builds it
        self._fp_watch: List[torch.Tensor] = []  # the tensors behind _fingerprints ...
        self._fp_versions = []  # ... and their version counters when fingerprinted (or the native plan that has them)
        super().__init__(params, defaults)
        self.state = _StateDict(self.state)

    def __getstate__(self):
        # torch.optim pickles defaults, state and param_groups only; keep our options too
        state = super().__getstate__()
        state["_memstate_options"] = (self.fingerprint, self.skip_if_nonfinite, self.skipped_steps)
        state["_memstate_max_grad_norm"] = self.max_grad_norm
        return state

    def __setstate__(self, state):
        # also called by torch's load_state_dict with state and param_groups only: options kept
        state = dict(state)
        options = state.pop("_memstate_options", None)
        max_grad_norm = state.pop("_memstate_max_grad_norm", getattr(self, "max_grad_norm", None))
        super().__setstate__(state)
        if options is None:
            options = (getattr(self, "fingerprint", False), getattr(self, "skip_if_nonfinite", False),
                       getattr(self, "skipped_steps", 0))
        self.fingerprint, self.skip_if_nonfinite, self.skipped_steps = options
        self.last_step_skipped = False
        self._pending, self._fingerprints, self._fp_watch, self._plan = [], {}, [], None
        self.max_grad_norm, self.last_grad_norm = max_grad_norm, None
        self._fp_versions = []
        if not isinstance(self.state, _StateDict):  # load_state_dict, unpickling, deepcopy
            self.state = _StateDict(self.state)
        for group in self.param_groups:  # unpickled, deep-copied: plain lists
            if type(group.get("params")) is list:
                group["params"] = _ParamList(group["params"])

    def state_dict(self):
        """torch.optim's state_dict, with every parameter's state as a plain dict (the live
        ``_ParamState`` dicts are memstate's; the tensors are shared, as torch's)."""
        sd = super().state_dict()
        if isinstance(sd.get("state"), dict):
            sd["state"] = {k: dict(v) if isinstance(v, _ParamState) else v for k, v in sd["state"].items()}
        return sd

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["params"] = _ParamList(group["params"])
        self._plan = None

    # ------------------------------------------------------------------------------ helpers
    def _param_label(self, p: torch.Tensor) -> str:
        index = 0
        for gi, group in enumerate(self.param_groups):
            for pi, q in enumerate(group["params"]):
                if q is p:
                    return f"parameter {index} (param_groups[{gi}]['params'][{pi}], shape {tuple(p.shape)})"
                index += 1
        return f"parameter of shape {tuple(p.shape)}"

    _supports_sparse_grad = False

    def _params_with_grad(self, group) -> List[torch.Tensor]:
        out = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse and not self._supports_sparse_grad:
                raise RuntimeError(
                    f"memstate.optim.{self._name} does not support sparse gradients "
                    f"({self._param_label(p)}); use torch.optim.SparseAdam or dense gradients"
                )
            if p.dtype not in _SUPPORTED_DTYPES:
                raise TypeError(
                    f"memstate.optim.{self._name}: {self._param_label(p)} has dtype {p.dtype}; "
                    f"supported: float32, float64, bfloat16, float16, complex64, complex128"
                )
            if p.layout != torch.strided:
                raise ValueError(f"memstate.optim.{self._name}: {self._param_label(p)} is a {p.layout} "
                                 f"tensor; parameters must be dense (strided)")
            out.append(p)
        return out

    @staticmethod
    def _buckets(params: Sequence[torch.Tensor]) -> List[List[torch.Tensor]]:
        """Parameters grouped by (device, dtype, listing), in first-seen order.

        A parameter listed k times goes into k buckets, its j-th listing into the j-th bucket of
        its (device, dtype): one fused pass never holds a tensor twice (that would race), and
        the passes run in order, so the result is torch.optim's (one update per listing).
        """
        buckets: Dict[Tuple[int, torch.dtype, int], List[torch.Tensor]] = {}
        seen: Dict[int, int] = {}
        for p in params:
            k = seen.get(id(p), 0)
            seen[id(p)] = k + 1
            buckets.setdefault((p.get_device(), p.dtype, k), []).append(p)
        return list(buckets.values())

    @staticmethod
    def _grad(p: torch.Tensor) -> torch.Tensor:
        """p's dense gradient in the layout of p's state (``_state_like``), so that one flat
        view pairs the same logical elements of every role; a gradient with a lazy conjugate or
        negation bit (``x.conj()`` of a complex gradient) is resolved first (its view as real
        numbers, which the kernels take, would otherwise fail in the middle of a step)."""
        g = p.grad
        if g.is_conj() or g.is_neg():  # lazy conjugate / negation bits: the values they stand for
            g = g.resolve_conj().resolve_neg()
        if not p.is_contiguous() and _is_dense(p):
            return g if _same_layout(g, p) else _state_like(p).copy_(g)
        return g if g.is_contiguous() else g.contiguous()

    def _any_nonfinite(self, groups_params: List[List[torch.Tensor]]) -> bool:
        ops = _ext.ops()
        by_device: Dict[torch.device, Dict[int, torch.Tensor]] = {}
        for params in groups_params:
            for p in params:
                g = p.grad.coalesce().values() if p.grad.is_sparse else self._grad(p)
                by_device.setdefault(p.device, {})[id(p)] = _KernelViews()(g)
        # one scan per device (no host sync), then one host fetch of all flags
        flags = [ops.nonfinite_any(list(grads.values())) for grads in by_device.values()]
        return any(bool(f) for f in _to_host(flags))

    # ------------------------------------------------------------------------------ step
    def _init_state(self, group, p: torch.Tensor) -> None:
        raise NotImplementedError

    def _step_bucket(self, group, params: List[torch.Tensor], grads: List[torch.Tensor]) -> Optional[torch.Tensor]:
        raise NotImplementedError

    def _step_sparse(self, group, p: torch.Tensor) -> Optional[torch.Tensor]:
        """Steps one parameter whose gradient is sparse (only where ``_supports_sparse_grad``)."""
        raise NotImplementedError

    def _run_kernel(self, op, bucket: List[torch.Tensor], roles: List[List[torch.Tensor]], *args) -> torch.Tensor:
        """``op(*views of roles, *args)`` on the kernel views of ``roles`` (lists of p, grad and
        state tensors of ``bucket``, in the op's order), then ``_KernelViews.finish``."""
        if all(map(_plain, bucket)):  # the common case: every role is contiguous and real already
            return op(*roles, *args)
        views = _KernelViews()
        rows = op(*[[views(t) for t in ts] for ts in roles], *args)
        views.finish(bucket, [ts for ts in roles if len(ts) == len(bucket)] if self.fingerprint else [],
                     rows if self.fingerprint else None)
        return rows

    def _check_bucket_memory(self, group, buckets) -> None:
        """Raises ValueError, naming the tensors, when a bucket's kernel would refuse their
        memory: a written tensor (a parameter or one of its existing state buffers of this
        group's roles) sharing memory with any other tensor of the bucket, a gradient included,
        or a tensor with no memory to touch (meta, a freed storage). Run for every bucket before
        any bucket runs, so that a refused step modifies nothing. State created by this step is
        fresh memory."""
        keys = tuple(self._roles(group)[2:])
        for bucket, grads in buckets:
            self._refuse_memory_problem(bucket, grads, keys)

    def _refuse_memory_problem(self, params, grads, keys, clipping: bool = False) -> None:
        """ValueError naming what the kernels of the step would refuse in the memory of
        ``params`` (written), their ``grads`` (read) and their tensor state under ``keys``
        (written; None: every key): a tensor without memory to touch (meta, freed storage), or
        the first overlapping pair (``clipping``: the message says that max_grad_norm scales
        the gradients in place). One native ``step_memory_problem`` call, which takes the
        tensors as the kernels do (staged ones cannot race) and walks the state dicts itself
        (per-tensor Python here cost ~3 us a parameter)."""
        state = self.state
        hit = _ext.load().step_memory_problem(params, grads, list(map(state.get, params)), keys)
        if hit is None:
            return
        who = []  # the entries in step_memory_problem's order: (parameter, None | "grad" | state key, written)
        for p in params:
            who += ((p, None, True), (p, "grad", False))
            st = state.get(p)
            if st is not None:
                who += ((p, k, True) for k in (st if keys is None else keys) if isinstance(st.get(k), torch.Tensor))

        def name(k):
            p, what, _ = who[k]
            label = self._param_label(p)
            return label if what is None else f"the gradient of {label}" if what == "grad" else \
                f"state '{what}' of {label}"

        if len(hit) == 2:
            raise ValueError(f"memstate.optim.{self._name}: {name(hit[0])} {hit[1]}")
        i, j, same = hit
        reason = ("a tensor the step writes may be written only once per step" if who[i][2] and who[j][2] else
                  "a gradient may not share memory with a tensor the step writes")
        if clipping:
            reason = "max_grad_norm scales the gradients in place: a gradient may not share memory with a " \
                     "parameter or its state"
        raise ValueError(f"memstate.optim.{self._name}: {name(i)} {'is the same memory as' if same else 'overlaps'} "
                         f"{name(j)}; {reason}")

    def _roles(self, group) -> Tuple[str, ...]:
        """Names of the kernel's roles for this group: param, grad, then state keys used."""
        raise NotImplementedError

    def _check_hparams(self, group) -> None:
        """Raises ValueError (torch's constructor message) if a group's hyperparameters are
        invalid. Subclasses implement it; run for every group before any step touches state."""

    def _check_group(self, gi: int, group) -> None:
        """``_check_hparams`` and the flags memstate cannot honour, with the group named in the error."""
        try:
            _refuse_flags(self._name, group, ValueError)
            self._check_hparams(group)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"memstate.optim.{self._name}: param_groups[{gi}]: {e}") from None

    def _check_state_tensor(self, p: torch.Tensor, key: str, t) -> None:
        """State tensor ``key`` of ``p`` must be what the kernel takes: a tensor of p's shape,
        dtype and device in the layout of ``_state_like(p)`` (row-major, or p's strides when p is
        dense). Raises ValueError naming the parameter and key."""
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"memstate.optim.{self._name}: state '{key}' of {self._param_label(p)} is a "
                             f"{type(t).__name__}, not a tensor")
        if tuple(t.shape) != tuple(p.shape) or t.dtype != p.dtype or t.device != p.device \
                or t.layout != torch.strided or not _state_layout_ok(p, t):
            raise ValueError(
                f"memstate.optim.{self._name}: state '{key}' of {self._param_label(p)} is a "
                f"{t.dtype} {t.layout} tensor of shape {tuple(t.shape)}, strides {t.stride() if t.layout == torch.strided else None}, "
                f"on {t.device}; expected a {p.dtype} tensor of shape {tuple(p.shape)} on {p.device} "
                f"laid out as torch.empty_like(param) (strides {_state_like(p).stride()})"
            )

    def _check_param(self, group, p: torch.Tensor) -> None:
        """Checks p's gradient and existing state before any tensor of the step is modified."""
        g = p.grad
        if g.dtype != p.dtype or tuple(g.shape) != tuple(p.shape) or g.device != p.device:
            raise ValueError(
                f"memstate.optim.{self._name}: the gradient of {self._param_label(p)} is a {g.dtype} "
                f"tensor of shape {tuple(g.shape)} on {g.device}; expected {p.dtype}, "
                f"{tuple(p.shape)}, {p.device}"
            )

    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """Performs one optimization step (see torch.optim.Optimizer.step).

        Everything is checked before anything is modified: a step that raises leaves
        parameters, state and step counters as they were.

        Under ``torch.compile`` the step runs eagerly, outside the graph (one graph break):
        it is already one fused native call per (device, dtype), and its host-side checks and
        step counters read values a trace cannot know. The compiled model code around it gives
        the same bits as eager (tests/test_compile.py).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        _check_not_capturing(self._name)
        _clipping.clip_before_step(self)  # max_grad_norm (memstate/optim/_clipping.py)
        if self._planned_step():
            return loss
        groups_params = [self._params_with_grad(g) for g in self.param_groups]
        for gi, (group, params) in enumerate(zip(self.param_groups, groups_params)):
            self._check_group(gi, group)
            for p in params:
                self._check_param(group, p)
        # each group's dense buckets with the gradients their kernels take, checked together:
        # a bucket refused by its kernel after another bucket ran would leave a half step
        work = []
        for group, params in zip(self.param_groups, groups_params):
            buckets = [(b, [self._grad(p) for p in b]) for b in self._buckets([p for p in params
                                                                               if not p.grad.is_sparse])]
            self._check_bucket_memory(group, buckets)
            work.append(buckets)
        self.last_step_skipped = False
        self._pending = []
        self._fingerprints, self._fp_watch = {}, []  # a skipped step has no fingerprints
        self._plan = None
        if self.skip_if_nonfinite and self._any_nonfinite(groups_params):
            self.last_step_skipped = True
            self.skipped_steps += 1
            return loss
        self._begin_step(groups_params)
        for group, params, buckets in zip(self.param_groups, groups_params, work):
            for p in params:
                if not self.state.get(p):
                    self._init_state(group, p)
            for bucket, grads in buckets:
                rows = self._step_bucket(group, bucket, grads)
                if self.fingerprint:
                    self._pending.append((bucket, self._roles(group), rows))
            for p in params:
                if p.grad.is_sparse:
                    rows = self._step_sparse(group, p)
                    if self.fingerprint:
                        self._pending.append(([p], self._roles(group), rows))
        if self.fingerprint:
            self._after_fingerprinted_step()
        self._plan = self._build_plan()
        return loss

    # ------------------------------------------------------------------------------ cached plans
    # One generic mechanism for every fused optimizer (docs/optim.md, "Cached step plans"): a
    # subclass names its native kind (_plan_kind, csrc/optim_plan.h's PlanKind) and the scalars
    # a group passes (_plan_scalars); its kernel roles (_roles) name the state keys.
    _plan_kind: Optional[int] = None  # None: no cached plan, every step takes the full path
    _plan_counted = False  # whether the plan holds torch's `step` counters (StepCounted)

    def _plan_scalars(self, group) -> List[float]:
        """The group's scalars in the order of the native kind (read every step)."""
        raise NotImplementedError

    def _plan_watch(self, stepped: List[torch.Tensor]) -> List[torch.Tensor]:
        """Tensors whose writes make the step's fingerprints stale (StepCounted: ``_watch``)."""
        return []

    def _build_plan(self) -> Optional[_StepPlan]:
        """The plan of the step just run, or None (the next step takes the full path again).
        Only for real, contiguous parameters with dense gradients, with skip_if_nonfinite only
        on the CPU (the plan scans the gradients natively), and while ``self.state`` is
        memstate's versioned ``_StateDict``."""
        state = self.state
        if self._plan_kind is None or type(state) is not _StateDict:
            return None
        if self.skip_if_nonfinite and any(p.device.type != "cpu" for g in self.param_groups for p in g["params"]):
            return None
        groups, buckets, params, states, steps = [], [], [], [], []
        sizes, gidx, nstates, absent = [], [], [], []
        try:
            for gi, group in enumerate(self.param_groups):
                live = group["params"]
                plist = list(live)
                roles = self._roles(group)
                groups.append([plist, roles, live, getattr(live, "_edits", None)])
                with_grad = []
                for p in plist:
                    g = p.grad
                    if g is None:
                        absent.append(p)
                    elif g.is_sparse or not _plain(p):
                        return None  # the full path (_KernelViews, _step_sparse)
                    else:
                        with_grad.append(p)
                keys = roles[2:]
                for bucket in self._buckets(with_grad):
                    sts = [state.get(p) for p in bucket]
                    if (keys or self._plan_counted) and not all(
                            type(st) is _ParamState and st._cell is state._cell for st in sts):
                        return None
                    for k in keys:
                        states += [st[k] for st in sts]
                    if self._plan_counted:
                        steps += [st["step"] for st in sts]
                    params += bucket
                    sizes.append(len(bucket))
                    gidx.append(gi)
                    nstates.append(len(keys))
                    buckets.append((bucket, roles))
            stepped = [p for b, _ in buckets for p in b]
            watch = self._plan_watch(stepped) if self.fingerprint and stepped else []
            native = torch.classes.memstate.StepPlan(self._plan_kind, params, states, steps, sizes, gidx, nstates,
                                                     self._plan_counted, absent, watch)
        except (KeyError, RuntimeError):
            return None
        return _StepPlan(native, state, groups, buckets, stepped, watch, self._plan_counted)

    def _planned_step(self) -> bool:
        """Runs the step from the cached plan and returns True, or returns False with nothing
        modified; the full path then checks (raising the error naming the offender), steps and
        rebuilds the plan. Python checks what only Python sees, in O(groups): the state version
        (any state dict mutation), each group's parameter list (the same ``_ParamList`` with
        the same edit count; a list of another type is compared element by element, by
        identity), its kernel roles and hyperparameters. The native plan checks the rest per
        tensor (gradients, storage of every held tensor)."""
        plan = self._plan
        if plan is None:
            return False
        state = self.state
        if state is not plan.state or state._cell[0] != plan.version or len(self.param_groups) != len(plan.groups):
            return False
        scalars: List[float] = []
        try:
            for gi, (group, saved) in enumerate(zip(self.param_groups, plan.groups)):
                plist = group["params"]
                # the same _ParamList, not edited since: the same parameters (O(1)); otherwise
                # compared element by element (and, if the same, the new edit count is kept)
                if not (plist is saved[2] and type(plist) is _ParamList and plist._edits == saved[3]):
                    if len(plist) != len(saved[0]) or not all(map(operator.is_, plist, saved[0])):
                        return False
                    saved[2], saved[3] = plist, getattr(plist, "_edits", None)
                if self._roles(group) != saved[1]:
                    return False
                self._check_group(gi, group)
                scalars += self._plan_scalars(group)
        except (ValueError, TypeError, KeyError):
            return False  # the full path raises it
        out = plan.native.step(scalars, self.fingerprint, self.skip_if_nonfinite)
        if not out:
            return False
        self._pending, self._fingerprints, self._fp_watch = [], {}, []
        if out[0].dtype == torch.bool:  # a gradient is NaN or +-Inf: skipped, nothing modified (as the full path)
            self.last_step_skipped = True
            self.skipped_steps += 1
            return True
        self.last_step_skipped = False
        if self.fingerprint:
            self._pending = [(bucket, roles, rows) for (bucket, roles), rows in zip(plan.buckets, out)]
            if plan.counted and plan.stepped:
                self._pending.append((plan.stepped, ("step",), out[-1].unsqueeze(1)))
            self._fp_watch, self._fp_versions = plan.watch, plan.native  # versions recorded natively
        return True

    def _begin_step(self, groups_params: List[List[torch.Tensor]]) -> None:
        """Hook: called once the step is checked and will run, before the first update."""

    def _after_fingerprinted_step(self) -> None:
        """Hook for non-kernel tensor state (e.g. Adam's step counters)."""

    # ------------------------------------------------------------------------------ fingerprints
    def _fingerprints_stale(self) -> bool:
        """Whether a tensor behind the last step's fingerprints was written since (e.g. by
        ``Snapshot.restore``, which bumps versions, or by replacing a state entry)."""
        if not isinstance(self._fp_versions, list):  # recorded by a native plan's step
            return self._fp_versions.watch_stale()
        return list(map(_VERSION, self._fp_watch)) != self._fp_versions

    def _materialise(self) -> None:
        if self._fp_watch and self._fingerprints_stale():
            self._refingerprint()
        if not self._pending:
            return
        fetched = _to_host([rows for _, _, rows in self._pending])  # one host sync
        for (bucket, roles, _), host_rows in zip(self._pending, fetched):
            fps = iter(_from_rows(host_rows))  # [N, roles, 2] -> N * roles, parameter-major
            for p in bucket:
                self._fingerprints.setdefault(id(p), {}).update(zip(roles, fps))
        self._pending = []

    def fingerprints(self, p: torch.Tensor) -> Dict[str, Fingerprint]:
        """msfp1 fingerprints of parameter ``p``'s tensors from the last step.

        Keys: "param" (after the update), "grad" (as read), and every tensor state key
        (after the update). Requires ``fingerprint=True``; empty if ``p`` had no gradient or
        the last step was skipped (``skip_if_nonfinite``).
        """
        if not self.fingerprint:
            raise RuntimeError(f"{self._name} was created with fingerprint=False; pass fingerprint=True")
        self._materialise()
        return dict(self._fingerprints.get(id(p), {}))

    def state_fingerprint(self) -> StateFingerprint:
        """StateFingerprint over the last step's in-pass fingerprints of every parameter.

        Names: ``param.{i}``, ``grad.{i}`` and ``state.{i}.{key}``, with ``i`` the parameter's
        index over all param groups (as in ``state_dict()``); the ``state.*`` entries equal
        ``memstate.fingerprint_state(optimizer)`` taken after the step.
        """
        if not self.fingerprint:
            raise RuntimeError(f"{self._name} was created with fingerprint=False; pass fingerprint=True")
        self._materialise()
        entries = {}
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                fps = self._fingerprints.get(id(p), {})
                for key, fp in fps.items():
                    if key in ("param", "grad"):
                        # zero_grad(set_to_none=True) after the step drops the gradient; it had
                        # the parameter's shape and dtype when it was fingerprinted
                        t = p.grad if key == "grad" and p.grad is not None else p
                        entries[f"{key}.{index}"] = (fp, t.dtype, tuple(t.shape))
                    else:
                        t = self.state[p][key]
                        entries[f"state.{index}.{key}"] = (fp, t.dtype, tuple(t.shape))
                index += 1
        return StateFingerprint(entries)

    # ------------------------------------------------------------------------------ state dict
    def _check_loaded_state(self, state_dict: dict) -> None:
        """Raises ValueError naming the group or parameter if the saved state does not fit, before
        anything is modified: structure, every group's hyperparameters (as ``step`` will check
        them), every state entry's type, shape and dtype kind."""
        if not isinstance(state_dict, dict):
            raise ValueError(f"optimizer state_dict must be a dict, got {type(state_dict).__name__}")
        groups = state_dict.get("param_groups")
        state = state_dict.get("state")
        # (entries of `state` not keyed by a parameter id, e.g. written by hooks, load as they are)
        if not isinstance(groups, list) or not isinstance(state, dict):
            raise ValueError("optimizer state_dict must have 'state' (dict) and 'param_groups' (list)")
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(groups)} parameter groups, this optimizer has {len(self.param_groups)}"
            )
        params = [p for g in self.param_groups for p in g["params"]]
        for gi, (saved, ours) in enumerate(zip(groups, self.param_groups)):
            if not isinstance(saved, dict) or not isinstance(saved.get("params"), list):
                raise ValueError(f"loaded param_groups[{gi}] must be a dict with a 'params' list")
            if len(saved["params"]) != len(ours["params"]):
                raise ValueError(
                    f"param_groups[{gi}] has {len(saved['params'])} parameters in the loaded "
                    f"state dict but {len(ours['params'])} here"
                )
            merged = dict(self.defaults)
            merged.update({k: v for k, v in saved.items() if k != "params"})
            self._check_group(gi, merged)
        group_of = {i: gi for gi, g in enumerate(groups) for i in g["params"]}
        saved_ids = [i for g in groups for i in g["params"]]
        id_to_param = dict(zip(saved_ids, params))
        for key, value in state.items():
            if key not in id_to_param:
                if isinstance(key, int):
                    raise ValueError(f"loaded optimizer state has an entry for unknown parameter id {key!r}")
                continue  # torch.optim keeps such entries as they are
            p = id_to_param[key]
            if not isinstance(value, dict):
                raise ValueError(f"loaded state of {self._param_label(p)} is not a dict")
            for sk in self._required_state_keys(groups[group_of[key]]):
                if sk not in value:
                    raise ValueError(f"loaded state of {self._param_label(p)} lacks '{sk}'")
            for sk, v in value.items():
                self._check_loaded_entry(p, sk, v)

    def _check_loaded_entry(self, p: torch.Tensor, key: str, v) -> None:
        """A loaded state value of a tensor state key must be a dense floating tensor of p's
        shape, complex exactly when p is (torch.optim casts it to p's dtype and device); None
        only where the key allows it (SGD's momentum_buffer)."""
        if key not in self._state_keys or (v is None and key in self._optional_state_keys):
            return
        ok = isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(p.shape)
        if not ok:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"loaded state '{key}' of {self._param_label(p)} has shape {got}, expected {tuple(p.shape)}")
        kind_ok = v.is_complex() if p.is_complex() else v.is_floating_point()
        if v.layout != torch.strided or v.is_meta or not kind_ok:
            raise ValueError(f"loaded state '{key}' of {self._param_label(p)} is a {v.dtype} {v.layout} tensor on "
                             f"{v.device}; expected a dense {'complex' if p.is_complex() else 'real floating-point'} "
                             f"tensor like the parameter's")

    _optional_state_keys: Tuple[str, ...] = ()

    def _required_state_keys(self, saved_group: dict) -> Tuple[str, ...]:
        return ()

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim's load_state_dict, in torch's order: load_state_dict pre-hooks (which may
        replace the dict), then the checks that every saved group and tensor fits (ValueError naming
        the group or parameter otherwise, with nothing modified, also for flags memstate cannot
        honour, such as ``differentiable=True``), the load, memstate's normalisation (step counters
        on the CPU, buffers in the parameter's layout) and, last, the post-hooks: they see the
        state as the next step will."""
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._check_loaded_state(state_dict)
        hooks = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = OrderedDict(), OrderedDict()
        try:  # torch's load without its hooks: they run here, around the whole of memstate's load
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = hooks
        self._normalise_loaded_state()
        self._pending, self._fingerprints, self._fp_watch, self._plan = [], {}, [], None
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _refingerprint(self) -> None:
        """Hook: recompute the fingerprints of the last step's tensors from their current
        contents (they were overwritten since the step)."""
        self._pending, self._fingerprints, self._fp_watch = [], {}, []

    def _normalise_loaded_state(self) -> None:
        """Brings loaded state tensors to the layout ``_state_like`` gives (torch keeps a saved
        buffer's strides, e.g. a row-major buffer saved for a channels_last parameter).
        Subclasses extend it (e.g. step counters on the CPU)."""
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                for k in self._state_keys if st else ():
                    v = st.get(k)
                    if isinstance(v, torch.Tensor) and v.layout == torch.strided and not _state_layout_ok(p, v):
                        st[k] = _state_like(p).copy_(v)
