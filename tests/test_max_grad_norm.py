"""The fused optimizers' ``max_grad_norm=`` option (issue 11 item 8): ``opt.step()`` equals
``memstate.clip_grad_norm_(params, max_norm); opt.step()`` bit for bit, is close to torch's
clip_grad_norm_ + torch.optim, is identical for any thread count and chunk size, leaves
gradients alone below the threshold, handles NaN/inf as clip_grad_norm_(error_if_nonfinite=False)
does (after the skip_if_nonfinite check), is validated in the constructor and survives copies."""
import copy
import io
import pickle

import pytest
import torch

import memstate
import memstate.optim as mo
from memstate import _ext
from test_optim import (assert_bitwise_same, leaves, make_grads, make_init, set_grads, snapshot, split_groups)

SHAPES = [(), (1,), (7,), (3, 5), (33, 17), (1000,), (2, 3, 13)]

OPTS = {
    "SGD": (mo.SGD, torch.optim.SGD, dict(lr=1e-2, momentum=0.9)),
    "Adam": (mo.Adam, torch.optim.Adam, dict(lr=1e-3)),
    "AdamW": (mo.AdamW, torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.1)),
    "RMSprop": (mo.RMSprop, torch.optim.RMSprop, dict(lr=1e-3)),
    "Adagrad": (mo.Adagrad, torch.optim.Adagrad, dict(lr=1e-2)),
    "Lion": (mo.Lion, None, dict(lr=1e-4, weight_decay=0.1)),
}
NAMES = list(OPTS)


@pytest.fixture(autouse=True)
def _one_thread_by_default(threads):
    threads(1)


def _groups(ps, hp):
    return split_groups(ps, [(3, {}), (len(ps) - 3, {"lr": hp["lr"] / 2})])


def _with_option(name, init, grads, max_norm, **kw):
    ms, _, hp = OPTS[name]
    ps = leaves(init)
    opt = ms(_groups(ps, hp), max_grad_norm=max_norm, **hp, **kw)
    norms, used = [], []
    for g in grads:
        set_grads(ps, g)
        opt.step()
        norms.append(opt.last_grad_norm)
        used.append([None if p.grad is None else p.grad.clone() for p in ps])
    return ps, opt, norms, used


def _with_clip_call(name, init, grads, max_norm):
    ms, _, hp = OPTS[name]
    ps = leaves(init)
    opt = ms(_groups(ps, hp), **hp)
    norms, used = [], []
    for g in grads:
        set_grads(ps, g)
        norms.append(memstate.clip_grad_norm_(ps, max_norm))
        used.append([None if p.grad is None else p.grad.clone() for p in ps])
        opt.step()
    return ps, opt, norms, used


def _grads_equal(a, b):
    return all((x is None and y is None) or (x is not None and y is not None and
               torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8)) if x.numel() else True)
               for xs, ys in zip(a, b) for x, y in zip(xs, ys))


@pytest.mark.parametrize("name", NAMES)
def test_equals_clip_grad_norm_then_step_bitwise(name):
    init = make_init(SHAPES, seed=1)
    grads = make_grads(SHAPES, 6, seed=2)  # total norm ~38
    grads[2][4] = None  # a parameter without a gradient on one step
    for max_norm in (5.0, 1e3):  # clipped every step / never
        ps, opt, norms, used = _with_option(name, init, grads, max_norm)
        qs, ref, ref_norms, ref_used = _with_clip_call(name, init, grads, max_norm)
        assert_bitwise_same(snapshot(ps, opt), snapshot(qs, ref), f"{name} max_norm={max_norm}")
        assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(norms, ref_norms))
        assert _grads_equal(used, ref_used)
    # the comparison can fail: clipping at 5.0 changes the trajectory
    ps, opt, _, _ = _with_option(name, init, grads, 5.0)
    qs, ref, _, _ = _with_option(name, init, grads, None)
    assert not all(torch.equal(a, b) for a, b in zip(ps, qs))


@pytest.mark.parametrize("name", [n for n in NAMES if OPTS[n][1] is not None])
def test_close_to_torch_clip_grad_norm_and_torch_optim(name):
    ms, tc, hp = OPTS[name]
    init = make_init(SHAPES, seed=3)
    grads = make_grads(SHAPES, 10, seed=4)
    ps = leaves(init)
    opt = ms(_groups(ps, hp), max_grad_norm=5.0, **hp)
    ts = leaves(init)
    topt = tc(_groups(ts, hp), foreach=False, **hp)
    for g in grads:
        set_grads(ps, g)
        set_grads(ts, g)
        opt.step()
        tn = torch.nn.utils.clip_grad_norm_(ts, 5.0, foreach=False)
        topt.step()
        torch.testing.assert_close(opt.last_grad_norm, tn, rtol=1e-6, atol=0)
    for a, b in zip(ps, ts):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["Adam", "Lion"])
def test_identical_for_threads_and_chunk_sizes(name, threads):
    C = _ext.load()
    shapes = SHAPES + [(70_001,)]
    init = make_init(shapes, seed=5)
    grads = make_grads(shapes, 3, seed=6)
    before = C.optim_chunk_elems()
    try:
        base = _with_option(name, init, grads, 5.0)
        for n, chunk in ((2, 8), (2, 16384), (1, 1 << 20), (2, 1000)):
            threads(n)
            C.set_optim_chunk_elems(chunk)
            got = _with_option(name, init, grads, 5.0)
            assert_bitwise_same(snapshot(base[0], base[1]), snapshot(got[0], got[1]), f"threads={n} chunk={chunk}")
            assert all(torch.equal(a, b) for a, b in zip(base[2], got[2]))
    finally:
        C.set_optim_chunk_elems(before)


def test_below_the_threshold_nothing_is_scaled():
    init = make_init(SHAPES, seed=7)
    grads = make_grads(SHAPES, 3, seed=8)
    ps, opt, norms, used = _with_option("Adam", init, grads, 1e3)
    qs, ref, _, ref_used = _with_option("Adam", init, grads, None)
    assert_bitwise_same(snapshot(ps, opt), snapshot(qs, ref), "below the threshold")
    assert _grads_equal(used, ref_used) and ref.last_grad_norm is None
    want = memstate.get_total_norm([g for g in grads[-1]])
    assert torch.equal(norms[-1], want) and 30 < float(want) < 1e3


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradients_as_clip_grad_norm_without_error(bad):
    init = make_init(SHAPES, seed=9)
    grads = make_grads(SHAPES, 2, seed=10)
    grads[1][4] = grads[1][4].clone()
    grads[1][4][3, 2] = bad
    for name in ("SGD", "Adam"):
        ps, opt, norms, used = _with_option(name, init, grads, 5.0)
        qs, ref, ref_norms, ref_used = _with_clip_call(name, init, grads, 5.0)
        assert_bitwise_same(snapshot(ps, opt), snapshot(qs, ref), f"{name} {bad}")
        assert _grads_equal(used, ref_used)
        assert not torch.isfinite(norms[1])
        # as torch: an inf norm zeroes the finite gradients (coefficient 0), a NaN norm makes all NaN
        g = used[1][0]
        assert bool(torch.isnan(g).all()) if bad != bad else torch.equal(g, torch.zeros_like(g))


def test_skip_if_nonfinite_is_checked_first():
    init = make_init(SHAPES, seed=11)
    grads = make_grads(SHAPES, 1, seed=12)[0]
    grads[2] = grads[2].clone()
    grads[2][1] = float("inf")
    ps = leaves(init)
    opt = mo.Adam(ps, max_grad_norm=1.0, skip_if_nonfinite=True)
    set_grads(ps, grads)
    opt.step()
    assert opt.last_step_skipped and opt.last_grad_norm is None
    assert all(torch.equal(p.grad, g) for p, g in zip(ps, grads))  # not scaled
    assert all(torch.equal(p.detach(), t) for p, t in zip(ps, init))
    grads[2][1] = 0.0
    set_grads(ps, grads)
    opt.step()
    assert not opt.last_step_skipped and float(opt.last_grad_norm) > 1.0


def test_a_parameter_listed_twice_is_counted_and_scaled_once():
    init = make_init(SHAPES[:4], seed=13)
    grads = make_grads(SHAPES[:4], 1, seed=14)[0]
    ps = leaves(init)
    with pytest.warns(UserWarning):
        opt = mo.SGD([{"params": ps + [ps[1]]}], lr=0.1, max_grad_norm=0.5)
    set_grads(ps, grads)
    opt.step()
    qs = leaves(init)
    set_grads(qs, grads)
    want = memstate.clip_grad_norm_(qs, 0.5)
    assert torch.equal(opt.last_grad_norm, want)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(ps, qs))


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), "1.0", True, torch.tensor(1.0)])
@pytest.mark.parametrize("name", NAMES + ["LAMB"])
def test_constructor_validates_naming_the_option(name, value):
    ms = mo.LAMB if name == "LAMB" else OPTS[name][0]
    with pytest.raises(ValueError, match="max_grad_norm"):
        ms([torch.nn.Parameter(torch.zeros(2))], max_grad_norm=value)


def test_a_step_refused_for_a_group_scales_nothing():
    ps = leaves(make_init(SHAPES[:3], seed=15))
    opt = mo.Adam([{"params": ps[:2]}, {"params": ps[2:]}], max_grad_norm=0.1)
    set_grads(ps, make_grads(SHAPES[:3], 1, seed=16)[0])
    opt.step()
    grads = [p.grad.clone() for p in ps]
    opt.param_groups[1]["eps"] = -1.0
    with pytest.raises(ValueError, match=r"param_groups\[1\]"):
        opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(ps, grads))


def test_sparse_gradient_is_refused_before_anything_changes():
    p = torch.nn.Parameter(torch.ones(4))
    q = torch.nn.Parameter(torch.ones(2))
    opt = mo.SGD([q, p], lr=0.1, max_grad_norm=1.0)
    q.grad = torch.full((2,), 3.0)
    p.grad = torch.sparse_coo_tensor([[1]], [5.0], (4,))
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    assert torch.equal(q.grad, torch.full((2,), 3.0)) and torch.equal(p.detach(), torch.ones(4))


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_kept_through_copies(how):
    ps = leaves(make_init(SHAPES, seed=17))
    opt = mo.RMSprop(ps, max_grad_norm=2.5)
    if how == "deepcopy":
        c = copy.deepcopy(opt)
    elif how == "pickle":
        c = pickle.loads(pickle.dumps(opt))
    else:
        buf = io.BytesIO()
        torch.save(opt, buf)
        buf.seek(0)
        c = torch.load(buf, weights_only=False)
    assert c.max_grad_norm == 2.5 and c.last_grad_norm is None
    # not a param-group key: state dicts stay torch's
    assert "max_grad_norm" not in opt.state_dict()["param_groups"][0]


def test_load_state_dict_keeps_the_option():
    ps = leaves(make_init(SHAPES, seed=18))
    a = mo.Adam(ps, max_grad_norm=2.0)
    b = mo.Adam(ps)
    b.load_state_dict(a.state_dict())
    assert b.max_grad_norm is None
    a.load_state_dict(b.state_dict())
    assert a.max_grad_norm == 2.0


@pytest.mark.cuda
def test_cuda_equals_cpu():
    init = make_init(SHAPES + [(70_001,)], seed=19)
    grads = make_grads(SHAPES + [(70_001,)], 4, seed=20)
    pc, pg = leaves(init), leaves(init, "cuda")
    oc, og = mo.AdamW(pc, max_grad_norm=5.0), mo.AdamW(pg, max_grad_norm=5.0)
    for g in grads:
        set_grads(pc, g)
        set_grads(pg, g)
        oc.step()
        og.step()
        assert torch.equal(oc.last_grad_norm, og.last_grad_norm.cpu())
    assert all(torch.equal(a.detach(), b.detach().cpu()) for a, b in zip(pc, pg))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("where", ["same group", "other group"])
def test_a_gradient_aliasing_state_is_refused_before_it_is_scaled(name, where):
    """Scaling writes the gradients: a gradient that is another tensor's memory (here a state
    buffer of the same or of another group's parameter) would change that tensor before the
    step could refuse it. Found by tests/test_optim_plan_fuzz.py: the state buffer came out
    scaled by a refused step. Now a ValueError before anything is scaled, checked across groups."""
    cls, _, kw = OPTS[name]
    a, b = torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(6))
    groups = [{"params": [a, b]}] if where == "same group" else [{"params": [a]}, {"params": [b]}]
    opt = cls(groups, max_grad_norm=1e-3, **kw)
    for _ in range(2):
        a.grad, b.grad = torch.randn(6), torch.randn(6)
        opt.step()
    key = next(k for k, v in opt.state[a].items() if torch.is_tensor(v) and v.shape == a.shape)
    a.grad, b.grad = torch.randn(6), opt.state[a][key]  # together far above max_grad_norm: both would be scaled

    def everything():
        return [t for t in (a, b, a.grad, *opt.state[a].values(), *opt.state[b].values()) if torch.is_tensor(t)]

    before = [t.detach().clone() for t in everything()]
    with pytest.raises(ValueError, match=rf"the gradient of parameter 1 .* is the same memory as state '{key}' of "
                                         r"parameter 0 .*; max_grad_norm scales the gradients in place"):
        opt.step()
    assert all(torch.equal(t, u) for t, u in zip(everything(), before))
