"""S4, auxiliary state: BatchNorm running statistics and a contrastive queue."""
from __future__ import annotations

import math
from typing import List, Tuple

import torch

from memstate.perturb._core import Primitive, TrainState, windows_for_halflives
from memstate.perturb._rules import _check_perturb_stream, _generator, _need


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


PRIMITIVES: Tuple[Primitive, ...] = (
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
)
