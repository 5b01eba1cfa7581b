"""Property-based test of bound snapshot plans (issue 12): a random sequence of training steps,
captures, restores and the edits users make between them (parameters and buffers rebound,
replaced, resized or written in place; optimizer state replaced, cleared, reloaded; groups
added; hyperparameters; the global RNGs; extra tensors and modules, keys added and removed)
runs twice from the same seed: once reusing one Snapshot (``recapture()``, whose bound plan
must notice every change), once taking a fresh ``Snapshot.capture`` each time (no plan to
reuse). Every restore must give back exactly the captured state (every tensor's bits, the
optimizer's non-tensor state and groups, the RNG states), or raise SnapshotError with the live
state untouched; and the two runs must agree after every operation, errors included.

CI runs a fixed number of derandomized examples per optimizer (MEMSTATE_FUZZ_EXAMPLES, default
200; each example is up to 24 operations).
"""
import collections
import copy
import os
import random

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memstate
from memstate import Snapshot
from memstate.fingerprint import named_state_tensors
from memstate.snapshot import SnapshotError

EXAMPLES = int(os.environ.get("MEMSTATE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

OPS = ["train", "train", "capture", "capture", "restore", "restore", "param_data", "param_data_shape",
       "param_replace", "param_inplace", "buffer_inplace", "buffer_data", "counter_inplace", "opt_state_replace",
       "opt_state_data", "opt_state_inplace", "opt_state_clear", "load_state_dict", "add_group", "hyper", "rng",
       "extra_inplace", "extra_data", "extra_key", "extra_del_key", "ema_inplace", "ema_data"]

OPTIMIZERS = {
    "torch AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    "torch SGD": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
    "memstate AdamW": lambda ps: memstate.optim.AdamW(ps, lr=1e-2, fingerprint=True),
}

X = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))


def make(kind):
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = OPTIMIZERS[kind](net.parameters())
    # (the extra mapping itself is copied at capture; a nested dict of tensors is followed)
    extra = {"queue": torch.randn(5), "ema": copy.deepcopy(net), "bank": {"a": torch.randn(2)}}
    return net, opt, extra


def digest(net, opt, extra):
    """Everything a restore must give back: every tensor's name, dtype, shape and bits, the
    optimizer's non-tensor state and hyperparameters, and the three global RNG states."""
    h = xxhash.xxh3_128()
    for name, t in named_state_tensors({"model": net, "optimizer": opt, "extra": extra}):
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\0".encode())
        h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    other = [{k: v for k, v in opt.state.get(p, {}).items() if not isinstance(v, torch.Tensor)}
             for g in opt.param_groups for p in g["params"]]
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    h.update(repr((other, groups, sorted(extra), sorted(extra["bank"]))).encode())
    h.update(torch.get_rng_state().numpy().tobytes())
    kind, keys, pos, gauss, cached = np.random.get_state()
    h.update(keys.tobytes() + repr((kind, pos, gauss, cached)).encode())
    h.update(repr(random.getstate()).encode())
    return h.hexdigest()


def edit(op, r, net, opt, extra):
    fc1, bn, fc2 = net[0], net[1], net[3]
    params = [p for g in opt.param_groups for p in g["params"]]
    p = params[r.randrange(len(params))]
    if op == "train":
        opt.zero_grad()
        net(X).pow(2).mean().backward()
        opt.step()
        return
    with torch.no_grad():
        if op == "param_data":
            p.data = p.data.clone() * 1.5  # new storage, same shape: a stale plan writes the old one
        elif op == "param_data_shape":
            fc2.bias.data = torch.zeros(fc2.bias.numel() + 1)
        elif op == "param_replace":
            fc1.weight = torch.nn.Parameter(fc1.weight.detach().clone() + 1)  # the optimizer keeps the old one
        elif op == "param_inplace":
            p.add_(0.5)
        elif op == "buffer_inplace":
            bn.running_mean.add_(1.0)
        elif op == "buffer_data":
            bn.running_var.data = bn.running_var.clone() * 2
        elif op == "counter_inplace":
            bn.num_batches_tracked.add_(5)
        elif op.startswith("opt_state_"):
            state = opt.state.get(p)
            if op == "opt_state_clear":
                opt.state.clear()
            elif state:
                k = sorted(state)[r.randrange(len(state))]
                v = state[k]
                if isinstance(v, torch.Tensor):
                    if op == "opt_state_replace":
                        state[k] = v.clone() + 1
                    elif op == "opt_state_data":
                        v.data = v.clone() + 2
                    else:
                        v.add_(3)
        elif op == "load_state_dict":
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        elif op == "add_group" and len(opt.param_groups) < 3:
            q = torch.nn.Parameter(torch.randn(3, generator=torch.Generator().manual_seed(r.randrange(99))))
            opt.add_param_group({"params": [q], "lr": 0.5})
        elif op == "hyper":
            opt.param_groups[r.randrange(len(opt.param_groups))]["lr"] *= 0.5
        elif op == "rng":
            torch.randn(3)
            np.random.rand()
            random.random()
        elif op == "extra_inplace":
            extra["queue"].mul_(-1)
        elif op == "extra_data":
            extra["queue"].data = torch.arange(5.0) + r.randrange(9)
        elif op == "extra_key":
            extra["bank"][f"k{r.randrange(3)}"] = torch.tensor([r.randrange(9)])
        elif op == "extra_del_key":
            extra["bank"].pop(f"k{r.randrange(3)}", None)
        elif op == "ema_inplace":
            for q in extra["ema"].parameters():
                q.mul_(0.9)
        elif op == "ema_data":
            extra["ema"][0].bias.data = extra["ema"][0].bias.clone() - 1


def run(kind, ops, reuse):
    """The sequence on fresh live objects; per operation (its outcome, the state digest)."""
    net, opt, extra = make(kind)
    snap, want, trace = None, None, []
    for op, seed in ops:
        outcome = "ok"
        try:
            if op == "capture":
                if reuse and snap is not None:
                    snap.recapture()
                else:
                    snap = Snapshot.capture(net, opt, extra=extra)
                want = digest(net, opt, extra)
            elif op == "restore" and snap is not None:
                before = digest(net, opt, extra)
                try:
                    snap.restore()
                except SnapshotError:
                    assert digest(net, opt, extra) == before, "a refused restore modified the live state"
                    raise
                assert digest(net, opt, extra) == want, "the restored state is not the captured one"
            else:
                edit(op, random.Random(seed), net, opt, extra)
        except (SnapshotError, RuntimeError, ValueError) as e:
            outcome = f"{type(e).__name__}: {e}"
        trace.append((op, outcome, digest(net, opt, extra)))
    return trace


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_reused_snapshot_plans_equal_fresh_captures_under_random_edits(kind):
    counts = collections.Counter()

    @FUZZ
    @given(st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 2**31 - 1)), min_size=1, max_size=24))
    def check(ops):
        ops = [("train", 0), ("capture", 0)] + ops + [("restore", 0)]
        reused, fresh = run(kind, ops, True), run(kind, ops, False)
        for i, (a, b) in enumerate(zip(reused, fresh)):
            assert a == b, f"operation {i} {ops[i][0]}: reused plan {a[1:]} vs fresh capture {b[1:]}"
        for op, outcome, _ in reused:
            counts[op if outcome == "ok" else f"{op} refused: {outcome[:70]}"] += 1

    check()
    print(f"\n{kind}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    assert counts["restore"] > EXAMPLES // 2, counts  # the property was exercised
