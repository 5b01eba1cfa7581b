"""Property-based test of cached step plans (issue 12): random sequences of what users do to an
optimizer between steps (new, missing, replaced, aliased or malformed gradients; parameters
and state buffers rebound with ``.data =`` / ``set_`` / replaced / popped / written in place;
hyperparameters and flags changed; param lists edited or reordered; groups added;
``load_state_dict``; ``zero_grad``), applied identically to two copies of the same optimizer:
one that uses its plans, one that never does; each is followed by a step (a "step" operation
is a second one). After every step both copies must hold the same
bits (parameters, every state buffer, every fingerprint and the state fingerprint), or both
must raise the same error and leave everything as it was. A plan that misses a change steps
stale memory and the comparison fails.

CI runs a fixed number of derandomized examples per optimizer (MEMSTATE_FUZZ_EXAMPLES, default
200; each example is up to 24 operations).
"""
import collections
import copy
import os
import random
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memstate.optim as mo
from test_optim_plan import OPTS, Counting, _one_thread  # noqa: F401  (autouse fixture: one thread)

# LAMB has no cached plan (two passes around a global norm): both copies take the full path,
# which must still refuse a step whole or run it whole
OPTS = dict(OPTS, lamb=(mo.LAMB, dict(lr=1e-2, weight_decay=0.01), ("use_nvlamb", True)))

EXAMPLES = int(os.environ.get("MEMSTATE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# shapes and dtypes of the parameters (two dtypes: two buckets per group)
LAYOUT = [((7,), torch.float32), ((3, 5), torch.float32), ((16,), torch.float64), ((2, 2, 3), torch.float32)]
# ... and what an added group may hold (a complex parameter: the optimizers step its real view; no plan)
ADDED = LAYOUT + [((4,), torch.complex64)]

OPS = ["step", "step", "grads", "grad_data", "grad_inplace", "grad_noncontig", "grad_bad_dtype",
       "grad_aliases_state", "param_data", "param_inplace", "state_replace", "state_data", "state_set",
       "state_inplace", "state_pop", "step_counter", "hyper", "flag", "relist", "drop_param", "add_group",
       "load_state_dict", "zero_grad", "state_bad_shape", "state_bad_dtype", "state_noncontig", "param_noncontig",
       "grad_shared", "grad_is_other_param", "grad_nonfinite", "grad_conj", "grad_neg"]


def _fresh(layout, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dt).requires_grad_() for s, dt in layout]


def _tensor_state(opt, p):
    return {k: v for k, v in opt.state.get(p, {}).items() if torch.is_tensor(v)}


class Side:
    """One copy: its parameters (every one ever created, in creation order) and optimizer."""

    def __init__(self, name, planned, variant):
        cls, kw, self.flag = OPTS[name]
        self.params = _fresh(LAYOUT, 0)
        self.opt = cls(self.params, fingerprint=True, **kw, **VARIANTS[variant])
        self.count = Counting(self.opt, enabled=planned)


def apply(op, r, s: Side):
    """Applies operation `op` with random choices from `r` (the same seed on both sides)."""
    ps, opt = s.params, s.opt
    p = ps[r.randrange(len(ps))]
    g = torch.Generator().manual_seed(r.randrange(2**31))
    with torch.no_grad():
        if op == "grads":
            for q in ps:
                q.grad = None if r.random() < 0.2 else torch.randn(q.shape, generator=g, dtype=torch.float64).to(q.dtype)
        elif op == "grad_data" and p.grad is not None:
            p.grad.data = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        elif op == "grad_nonfinite" and p.grad is not None and p.grad.numel():
            p.grad.view(-1)[r.randrange(p.grad.numel())] = r.choice([float("inf"), float("nan")])
        elif op == "grad_conj" and p.grad is not None:
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype).conj()  # (a no-op if real)
        elif op == "grad_neg" and p.grad is not None:
            p.grad = torch._neg_view(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
        elif op == "grad_inplace" and p.grad is not None:
            p.grad.mul_(-0.5)
        elif op == "grad_noncontig" and p.dim() == 2:
            p.grad = torch.randn(tuple(reversed(p.shape)), generator=g, dtype=torch.float64).to(p.dtype).t()
        elif op == "grad_bad_dtype" and p.grad is not None:
            p.grad.data = p.grad.to(torch.float16)  # (assigning .grad itself refuses it)
        elif op == "grad_aliases_state":
            st_ = [v for v in _tensor_state(opt, p).values() if v.shape == p.shape]
            if st_:
                p.grad = st_[r.randrange(len(st_))]  # the step would read what it writes
        elif op == "param_data":
            p.data = p.data.clone() * 1.5
        elif op == "param_inplace":
            p.add_(0.25)
        elif op.startswith("state_"):
            st_ = _tensor_state(opt, p)
            if not st_:
                return
            k = sorted(st_)[r.randrange(len(st_))]
            v = st_[k]
            if op == "state_replace":
                opt.state[p][k] = v.clone()
            elif op == "state_data":
                v.data = v.clone()
            elif op == "state_set":
                v.set_(v.clone())
            elif op == "state_inplace":
                v.mul_(0.5) if k != "step" else v.add_(1)
            elif op == "state_pop":
                opt.state.pop(p, None)
        elif op in ("state_bad_shape", "state_bad_dtype", "state_noncontig"):
            st_ = {k: v for k, v in _tensor_state(opt, p).items() if k != "step"}
            if st_:
                k = sorted(st_)[r.randrange(len(st_))]
                v = st_[k]
                if op == "state_bad_shape":
                    opt.state[p][k] = torch.zeros(v.numel() + 1, dtype=v.dtype)
                elif op == "state_bad_dtype":
                    opt.state[p][k] = v.to(torch.float64 if v.dtype == torch.float32 else torch.float32)
                elif v.dim() == 2:
                    opt.state[p][k] = v.t().contiguous().t()  # the same values, column-major
        elif op == "param_noncontig" and p.dim() == 2:
            p.data = p.data.t().contiguous().t()  # the same values, column-major
        elif op == "grad_shared":
            others = [q for q in ps if q is not p and q.shape == p.shape and q.dtype == p.dtype and q.grad is not None]
            if others:
                p.grad = others[r.randrange(len(others))].grad  # read twice: allowed
        elif op == "grad_is_other_param":
            others = [q for q in ps if q is not p and q.shape == p.shape and q.dtype == p.dtype]
            if others:
                p.grad = others[r.randrange(len(others))].detach()  # read while it is written
        elif op == "step_counter":
            st_ = _tensor_state(opt, p)
            if "step" in st_:
                st_["step"].fill_(r.choice([0.0, 3.0, -1.0, float("nan")]))  # the last two are refused
        elif op == "hyper":
            group = opt.param_groups[r.randrange(len(opt.param_groups))]
            group["lr"] *= r.choice([0.5, 2.0])
            if "weight_decay" in group:
                group["weight_decay"] = r.choice([0.0, 0.01, 0.1])
        elif op == "flag":
            group = opt.param_groups[r.randrange(len(opt.param_groups))]
            key, value = s.flag
            group[key] = value if group[key] != value else OPTS_DEFAULT_FLAGS[key]
        elif op == "relist":
            group = opt.param_groups[r.randrange(len(opt.param_groups))]
            group["params"] = list(reversed(group["params"]))
        elif op == "drop_param":
            group = opt.param_groups[r.randrange(len(opt.param_groups))]
            if len(group["params"]) > 1:
                group["params"].pop(r.randrange(len(group["params"])))
        elif op == "add_group" and len(opt.param_groups) < 3:
            shape, dt = ADDED[r.randrange(len(ADDED))]
            q = torch.randn(shape, generator=g, dtype=torch.float64).to(dt).requires_grad_()
            q.grad = torch.randn(shape, generator=g, dtype=torch.float64).to(dt)
            ps.append(q)
            opt.add_param_group({"params": [q], "lr": 0.005})
        elif op == "load_state_dict":
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        elif op == "zero_grad":
            opt.zero_grad(set_to_none=r.random() < 0.5)


OPTS_DEFAULT_FLAGS = {"momentum": 0.9, "amsgrad": False, "centered": False, "maximize": False, "use_nvlamb": False}


def everything(s: Side):
    """Every bit the step may change, and the fingerprints."""
    out = []
    for i, p in enumerate(s.params):
        out.append((i, p.detach().clone(), {k: v.clone() for k, v in _tensor_state(s.opt, p).items()}))
    return out


def _bits(t):
    """t's bytes (bitwise equality: NaN payloads and signed zeros included)."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def assert_equal(a, b, what):
    assert len(a) == len(b), what
    for (i, p, sa), (_, q, sb) in zip(a, b):
        assert p.shape == q.shape and torch.equal(_bits(p), _bits(q)), f"{what}: parameter {i}"
        assert sorted(sa) == sorted(sb), f"{what}: state keys of parameter {i}"
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape and \
                torch.equal(_bits(sa[k]), _bits(sb[k])), f"{what}: state {k} of parameter {i}"


def on_both(fn, a: Side, b: Side):
    """fn(side) on both sides: the same error (returned) or none; an error modifies nothing."""
    before = everything(a)
    errors = []
    for s in (a, b):
        try:
            fn(s)
            errors.append(None)
        except (ValueError, RuntimeError) as e:
            text = f"{type(e).__name__}: {e}"
            if "may not share memory" in text or "written only once" in text:
                # with several aliasing pairs, which one is named follows memory addresses
                text = text.split(": ")[0] + ": aliasing; " + text.rsplit("; ", 1)[1]
            errors.append(text)
        except KeyError:  # torch's state_dict with the state of a parameter no group lists (its id)
            errors.append("KeyError")
    assert errors[0] == errors[1], errors
    if errors[0] is not None:
        assert_equal(everything(a), before, f"{errors[0]}: but it modified")
    return errors[0]


def step(a: Side, b: Side, counts):
    hits = a.count.hits
    error = on_both(lambda s: s.opt.step(), a, b)
    if error is not None:
        counts["refused steps"] += 1
        counts["refused: " + re.sub(r"parameter \d+ \(.*?\)\)", "P", error)[:90]] += 1
        return
    counts["steps"] += 1
    assert (a.opt.last_step_skipped, a.opt.skipped_steps) == (b.opt.last_step_skipped, b.opt.skipped_steps)
    counts["skipped steps"] += a.opt.last_step_skipped
    counts["skipped by a plan"] += a.opt.last_step_skipped and a.count.hits > hits
    assert_equal(everything(a), everything(b), "planned vs unplanned")
    for i, (p, q) in enumerate(zip(a.params, b.params)):
        assert a.opt.fingerprints(p) == b.opt.fingerprints(q), f"fingerprints of parameter {i}"
    assert a.opt.state_fingerprint() == b.opt.state_fingerprint()


# optimizer options that change the step's path: gradient clipping before the kernels (LAMB: in
# its kernel), skipping steps with non-finite gradients (never planned)
VARIANTS = {"plain": {}, "clip": {"max_grad_norm": 0.5}, "skip": {"skip_if_nonfinite": True}}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("name", sorted(OPTS))
def test_planned_steps_equal_unplanned_steps_under_random_edits(name, variant):
    counts = collections.Counter()

    @FUZZ
    @given(st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 2**31 - 1)), min_size=1, max_size=24))
    def run(ops):
        a, b = Side(name, True, variant), Side(name, False, variant)
        for s in (a, b):
            apply("grads", random.Random(7), s)
        step(a, b, counts)
        for op, seed in ops:
            if on_both(lambda s: apply(op, random.Random(seed), s), a, b) is not None:
                counts[f"{op} refused"] += 1
            counts[op] += 1
            step(a, b, counts)  # right after the edit: the plan built by the last step must see it
        counts["planned steps"] += a.count.hits
        assert b.count.hits == 0

    run()
    print(f"\n{name} {variant}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    # the comparison was live: plans were used, and some edits made steps refuse
    assert counts["planned steps"] >= 50 or name == "lamb", counts
    assert counts["skipped steps"] > 0 if variant == "skip" else counts["skipped steps"] == 0, counts
    assert counts["skipped by a plan"] > 0 or variant != "skip" or name == "lamb", counts
    assert counts["refused steps"] > 0, counts
