"""ReplicaCheck: data-parallel replicas compared by fingerprint after every optimizer step.

After a step every replica of a DDP job must hold the same bits in every parameter, gradient
(after the all-reduce) and optimizer buffer. ReplicaCheck all-gathers the 16-byte msfp1
fingerprint of each of them (computed in the fused step by memstate.optim with
``fingerprint=True``; by one ``fingerprint_many`` pass otherwise) and names every tensor on
which the replicas disagree, the step, and which ranks hold the majority and minority values.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from memstate.fingerprint import Fingerprint, fingerprint_many

__all__ = ["ReplicaCheck", "ReplicaMismatch", "ReplicaMismatchWarning", "Mismatch"]

_M64 = (1 << 64) - 1
_HEADER = 2  # int64 words before the fingerprints: layout tag, tensor count
# torch 2.13 renamed all_gather_into_tensor (still there, deprecated) to all_gather_single
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class ReplicaMismatchWarning(RuntimeWarning):
    """Warned by ReplicaCheck(on_mismatch="warn") when replicas disagree."""


@dataclass(frozen=True)
class Mismatch:
    """One tensor on which the replicas disagree.

    ``groups`` are the sets of ranks (global ranks) that hold the same value, largest first;
    ``majority`` is the largest group if it is strictly larger than every other, else None
    (e.g. 1 vs 1 with two replicas); ``fingerprints[i]`` is the fingerprint the ranks of
    ``groups[i]`` hold (None for the entry that reports differing sets of tensors).
    """

    name: str
    groups: Tuple[Tuple[int, ...], ...]
    fingerprints: Tuple[Optional[Fingerprint], ...]

    @property
    def majority(self) -> Optional[Tuple[int, ...]]:
        g = self.groups
        return g[0] if len(g) == 1 or len(g[0]) > len(g[1]) else None

    @property
    def minority(self) -> Tuple[int, ...]:
        """The ranks outside the majority (all ranks when there is none)."""
        maj = self.majority
        return tuple(sorted(r for g in self.groups if g is not maj for r in g))

    def describe(self) -> str:
        def ranks(g):
            return ("rank " if len(g) == 1 else "ranks ") + ", ".join(map(str, g))

        if self.majority is not None:
            return f"{self.name} ({ranks(self.minority)} differ{'s' if len(self.minority) == 1 else ''} " \
                   f"from the majority, {ranks(self.majority)})"
        return f"{self.name} (no majority: " + " | ".join(ranks(g) for g in self.groups) + ")"


class ReplicaMismatch(RuntimeError):
    """Raised by ReplicaCheck (on every rank alike) when replicas disagree after a step."""

    def __init__(self, step: int, mismatches: Sequence[Mismatch], message: str):
        super().__init__(message)
        self.step = step
        self.mismatches = tuple(mismatches)


def _signed(v: int) -> int:
    v &= _M64
    return v - (1 << 64) if v >> 63 else v


def _layout_tag(names: Sequence[str]) -> int:
    import xxhash

    return _signed(xxhash.xxh3_64_intdigest("\0".join(names).encode("utf-8")))


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP (so names read ``fc.weight``, not ``module.fc.weight``)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


class ReplicaCheck:
    """Compares every data-parallel replica's parameters, gradients and optimizer buffers by
    msfp1 fingerprint after optimizer steps.

    Args:
        model: the (DDP-wrapped or plain) module; names come from ``named_parameters()`` of the
            module inside DDP. Parameters of the optimizer not in the model are named
            ``param_groups[g].params[i]``.
        optimizer: any torch optimizer. With a memstate.optim optimizer created with
            ``fingerprint=True`` the fingerprints computed in the fused step are used (no
            extra pass over memory); otherwise one ``memstate.fingerprint_many`` pass.
        group: the data-parallel process group (default: the default group).
        every: check after every ``every``-th optimizer step (1: every step).
        on_mismatch: ``"raise"`` (ReplicaMismatch on every rank), ``"warn"``
            (ReplicaMismatchWarning on every rank, training goes on) or a callable
            ``f(step, mismatches)``.
        rng: also compare random generator states that must agree across replicas: True for
            torch's CPU generator and, once CUDA is initialised, the current device's CUDA
            generator; or a mapping name -> torch.Generator.
        defer: start the all_gather after the step but compare at the next check (or
            ``flush()`` / ``remove()``), so the communication overlaps the next forward and
            backward; a mismatch of step k is then reported (still as step k) during step
            k + every. Default False: reported within step k's ``optimizer.step()``.

    Checked, per parameter of the optimizer (in param_groups order): the parameter after the
    step (``fc.weight``), its gradient (``fc.weight.grad``) and each tensor state entry
    (``fc.weight.exp_avg``, ``fc.weight.step``, ...). Module buffers are not compared: DDP
    broadcasts them from rank 0 before each forward, and BatchNorm statistics then legitimately
    differ per replica until the next broadcast.

    A hook registered with ``optimizer.register_step_post_hook`` runs the check; ``check(step)``
    runs it explicitly. Each check is a collective (every rank of ``group`` must reach it):
    one all_gather of ``16 * (1 + number of tensors)`` bytes per rank (plus one 16-byte
    all_gather on the first check and after the tensor set changed). ``remove()`` completes a
    deferred comparison and detaches the hook.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, group=None, every: int = 1,
                 on_mismatch: Union[str, Callable] = "raise",
                 rng: Union[bool, Mapping[str, torch.Generator]] = False, defer: bool = False):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"ReplicaCheck: model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"ReplicaCheck: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"ReplicaCheck: every must be an int >= 1, got {every!r}")
        if not (callable(on_mismatch) or on_mismatch in ("raise", "warn")):
            raise ValueError(f"ReplicaCheck: on_mismatch must be 'raise', 'warn' or a callable, got {on_mismatch!r}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ReplicaCheck needs an initialised process group: call "
                               "torch.distributed.init_process_group first")
        if not isinstance(rng, bool):
            if not isinstance(rng, Mapping) or not all(isinstance(g, torch.Generator) for g in rng.values()):
                raise TypeError("ReplicaCheck: rng must be True/False or a mapping name -> torch.Generator")
        self.model, self.optimizer, self.group, self.every = model, optimizer, group, every
        self.on_mismatch, self.rng, self.defer = on_mismatch, rng, bool(defer)
        self._pending = None  # (finish, step, names) of a started all_gather not yet compared
        self.steps = 0  # optimizer steps seen by the hook
        self.checks = 0  # checks run
        self.history: List[Tuple[int, Tuple[Mismatch, ...]]] = []  # (step, mismatches) of failed checks
        self._agreed: Optional[int] = None  # tensor count all ranks agreed on
        self._names = {id(p): n for n, p in _unwrap(model).named_parameters()}
        self._world = dist.get_world_size(group)
        self._global_ranks = [dist.get_global_rank(group, r) if group is not None else r for r in range(self._world)]
        self._device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl"
                        else torch.device("cpu"))
        self._handle = optimizer.register_step_post_hook(self._after_step)

    # ------------------------------------------------------------------------------ public
    def remove(self) -> None:
        """Completes a deferred comparison (``flush()``) and detaches the step hook (explicit
        ``check`` still works)."""
        self._handle.remove()
        self.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    @property
    def bytes_per_check(self) -> int:
        """Bytes this rank sends per check (16 per tensor plus a 16-byte header); every rank
        receives ``world_size`` times as much. Known after the first check (0 before)."""
        return 16 * (self._agreed + 1) if self._agreed is not None else 0

    def check(self, step: Optional[int] = None) -> List[Mismatch]:
        """Compares the replicas now; returns the mismatches (empty if all agree) after acting
        on them as ``on_mismatch`` says. ``step`` labels the report (default: steps seen).

        With ``defer=True`` the all_gather is only started here and compared at the next check
        (or ``flush()``): the return value is then the previous check's mismatches."""
        step = self.steps if step is None else step
        self.checks += 1
        earlier = self.flush()
        names, lanes = self._local()
        tag = _layout_tag(names)
        if self._agreed is None:
            header = self._all_gather(torch.tensor([tag, len(names)], dtype=torch.int64))()
            if (header != header[0]).any():
                return earlier + self._report(step, [self._layout_mismatch(header[:, 0].tolist(),
                                                                           header[:, 1].tolist())])
            self._agreed = len(names)
        n = self._agreed
        local = torch.zeros(_HEADER + 2 * n, dtype=torch.int64)
        local[0], local[1] = tag, len(names)
        k = min(n, len(names))
        local[_HEADER:_HEADER + 2 * k] = torch.tensor(lanes[:2 * k], dtype=torch.int64)
        self._pending = (self._all_gather(local, async_op=self.defer), step, names)
        return earlier if self.defer else self.flush()

    def flush(self) -> List[Mismatch]:
        """Completes a deferred comparison (``defer=True``), acting on its mismatches as
        ``on_mismatch`` says, and returns them; ``[]`` when none is pending. A collective
        when one is pending: call it on every rank (``remove()`` calls it)."""
        if self._pending is None:
            return []
        finish, step, names = self._pending
        self._pending = None
        rows = finish()
        n = self._agreed
        if (rows[:, :_HEADER] != rows[0, :_HEADER]).any():
            self._agreed = None  # every rank saw it: all renegotiate at the next check
            return self._report(step, [self._layout_mismatch(rows[:, 0].tolist(), rows[:, 1].tolist())])
        if torch.equal(rows, rows[:1].expand_as(rows)):
            return []
        fps = rows[:, _HEADER:].reshape(self._world, n, 2)
        bad = (fps != fps[:1]).any(dim=2).any(dim=0).nonzero().flatten().tolist()
        return self._report(step, [self._mismatch(names[j], fps[:, j].tolist()) for j in bad])

    # ------------------------------------------------------------------------------ internals
    def _after_step(self, optimizer, args, kwargs) -> None:
        self.steps += 1
        if self.steps % self.every == 0:
            self.check(self.steps)

    def _all_gather(self, local: torch.Tensor, async_op: bool = False) -> Callable[[], torch.Tensor]:
        """Starts the all_gather of ``local`` over the group; the returned function waits for
        it and gives the [world, len] rows on the CPU."""
        local = local.to(self._device)
        out = torch.empty(self._world * local.numel(), dtype=local.dtype, device=self._device)
        work = _all_gather_single(out, local, group=self.group, async_op=async_op)

        def finish() -> torch.Tensor:
            if work is not None:
                work.wait()
            return out.cpu().view(self._world, local.numel())

        return finish

    def _param_name(self, p: torch.Tensor, gi: int, pi: int) -> str:
        return self._names.get(id(p), f"param_groups[{gi}].params[{pi}]")

    def _local(self) -> Tuple[List[str], List[int]]:
        """This replica's (names, flat signed lanes) in a rank-independent order."""
        from memstate.optim import FusedOptimizer

        opt = self.optimizer
        in_pass = isinstance(opt, FusedOptimizer) and opt.fingerprint and not opt.last_step_skipped
        names: List[str] = []
        fps: List[Optional[Fingerprint]] = []
        todo: List[Tuple[int, torch.Tensor]] = []  # (slot, tensor) to fingerprint here

        def add(name: str, fp: Optional[Fingerprint], t: Optional[torch.Tensor] = None):
            if fp is None:
                todo.append((len(fps), t))
            names.append(name)
            fps.append(fp)

        # The fused step's fingerprints, fetched once for all parameters. Not via the public
        # fingerprints(p) per parameter (each call re-checks every watched tensor's version:
        # quadratic in the parameter count) nor state_fingerprint() (it reads p.grad, which
        # zero_grad(set_to_none=True) may have removed since the step).
        if in_pass:
            opt._materialise()
        fused = opt._fingerprints if in_pass else {}
        for gi, group in enumerate(opt.param_groups):
            for pi, p in enumerate(group["params"]):
                base = self._param_name(p, gi, pi)
                got = fused.get(id(p), {})
                state = opt.state.get(p, {})
                add(base, got.get("param"), p)
                if "grad" in got or p.grad is not None:  # the gradient the step read, else the current one
                    add(base + ".grad", got.get("grad"), p.grad)
                for key in sorted(k for k, v in state.items() if isinstance(v, torch.Tensor)):
                    add(f"{base}.{key}", got.get(key), state[key])
        for name, gen in self._generators().items():
            add(name, None, gen.get_state())
        if todo:
            for (slot, _), fp in zip(todo, fingerprint_many([t for _, t in todo], [names[s] for s, _ in todo])):
                fps[slot] = fp
        lanes = [_signed(x) for fp in fps for x in fp.lanes]
        return names, lanes

    def _generators(self) -> Dict[str, torch.Generator]:
        if self.rng is False:
            return {}
        if self.rng is not True:
            return {f"rng.{k}": g for k, g in self.rng.items()}
        gens = {"rng.torch.cpu": torch.default_generator}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            # named without the index: each rank's current device is its own (cuda:LOCAL_RANK)
            gens["rng.torch.cuda"] = torch.cuda.default_generators[torch.cuda.current_device()]
        return gens

    def _groups(self, values: List) -> Tuple[Tuple[int, ...], ...]:
        by_value: Dict = {}
        for r, v in enumerate(values):
            by_value.setdefault(v if not isinstance(v, list) else tuple(v), []).append(self._global_ranks[r])
        return tuple(tuple(g) for g in sorted(by_value.values(), key=lambda g: (-len(g), g[0])))

    def _mismatch(self, name: str, values: List[List[int]]) -> Mismatch:
        groups = self._groups(values)
        first = {self._global_ranks[r]: v for r, v in enumerate(values)}
        fps = tuple(Fingerprint(*(x & _M64 for x in first[g[0]])) for g in groups)
        return Mismatch(name, groups, fps)

    def _layout_mismatch(self, tags: List[int], counts: List[int]) -> Mismatch:
        counts_by = ", ".join(f"rank {self._global_ranks[r]}: {c}" for r, c in enumerate(counts))
        return Mismatch(f"<the set of tensors checked ({counts_by})>", self._groups(list(zip(tags, counts))),
                        tuple(None for _ in set(zip(tags, counts))))

    def _report(self, step: int, mismatches: List[Mismatch]) -> List[Mismatch]:
        self.history.append((step, tuple(mismatches)))
        shown = "; ".join(m.describe() for m in mismatches[:5])
        more = f"; and {len(mismatches) - 5} more" if len(mismatches) > 5 else ""
        message = (f"ReplicaCheck: step {step}: {len(mismatches)} tensor(s) differ across the "
                   f"{self._world} replicas: {shown}{more}")
        if self.on_mismatch == "raise":
            raise ReplicaMismatch(step, mismatches, message)
        if self.on_mismatch == "warn":
            warnings.warn(message, ReplicaMismatchWarning, stacklevel=3)
        else:
            self.on_mismatch(step, mismatches)
        return mismatches
