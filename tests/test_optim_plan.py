"""Cached step plans of memstate.optim.Adam/AdamW: every change between steps (gradients
appearing or disappearing, hyperparameters, param groups, state replaced or cleared,
load_state_dict, Snapshot.restore) gives exactly the result of an uncached step."""
import copy

import pytest
import torch

import memstate
import memstate.optim as mo

SHAPES = [(7,), (3, 5), (16,), (2, 2, 3)]


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make_params(seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).requires_grad_() for s in shapes]


def set_grads(params, step, skip=()):
    g = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        p.grad = None if i in skip else torch.randn(p.shape, generator=g)


class Counting:
    """Wraps an optimizer's _planned_step to count cached steps (None: the plan is disabled)."""

    def __init__(self, opt, enabled=True):
        self.hits = 0
        inner = opt._planned_step

        def planned():
            if not enabled:
                return False
            used = inner()
            self.hits += used
            return used

        opt._planned_step = planned


def pair(cls=mo.AdamW, seed=0, **kw):
    """The same optimizer twice: one with cached plans, one that never uses them."""
    a_params, b_params = make_params(seed), make_params(seed)
    a, b = cls(a_params, fingerprint=True, **kw), cls(b_params, fingerprint=True, **kw)
    return a_params, a, Counting(a), b_params, b, Counting(b, enabled=False)


def assert_same(a_params, a, b_params, b):
    for i, (p, q) in enumerate(zip(a_params, b_params)):
        assert torch.equal(p, q), f"param {i}"
        sa, sb = a.state.get(p, {}), b.state.get(q, {})
        assert sorted(sa) == sorted(sb), f"state keys {i}"
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"state {i} {k}"
        assert a.fingerprints(p) == b.fingerprints(q), f"fingerprints {i}"


def step_both(a_params, a, b_params, b, step, skip=()):
    set_grads(a_params, step, skip)
    set_grads(b_params, step, skip)
    a.step()
    b.step()
    assert_same(a_params, a, b_params, b)


def test_plan_is_used_and_exact_over_steps():
    ap, a, ca, bp, b, _ = pair()
    for s in range(5):
        step_both(ap, a, bp, b, s)
    assert ca.hits == 4  # the first step builds the plan, the others use it


def test_grad_disappears_and_reappears():
    ap, a, ca, bp, b, _ = pair()
    step_both(ap, a, bp, b, 0)
    step_both(ap, a, bp, b, 1, skip={1, 3})  # plan rebuilt: two params skipped, as torch does
    assert ca.hits == 0
    step_both(ap, a, bp, b, 2, skip={1, 3})
    assert ca.hits == 1
    step_both(ap, a, bp, b, 3)  # grads back
    step_both(ap, a, bp, b, 4)
    assert ca.hits == 2
    assert float(a.state[ap[1]]["step"]) == 3.0 and float(a.state[ap[0]]["step"]) == 5.0


def test_hyperparameter_changes_take_effect_in_cached_steps():
    ap, a, ca, bp, b, _ = pair(amsgrad=False)
    step_both(ap, a, bp, b, 0)
    for s, (lr, wd, betas) in enumerate([(1e-2, 0.1, (0.8, 0.99)), (3e-3, 0.0, (0.5, 0.9)), (0.0, 0.2, (0.9, 0.999))]):
        for o in (a, b):
            o.param_groups[0].update(lr=lr, weight_decay=wd, betas=betas)
        step_both(ap, a, bp, b, s + 1)
    assert ca.hits == 3
    for o in (a, b):
        o.param_groups[0]["amsgrad"] = True  # new state key: plan rebuilt
    step_both(ap, a, bp, b, 9)
    assert "max_exp_avg_sq" in a.state[ap[0]]


def test_scheduler_changes_lr():
    ap, a, ca, bp, b, _ = pair()
    sa = torch.optim.lr_scheduler.StepLR(a, step_size=1, gamma=0.5)
    sb = torch.optim.lr_scheduler.StepLR(b, step_size=1, gamma=0.5)
    for s in range(4):
        step_both(ap, a, bp, b, s)
        sa.step()
        sb.step()
    assert ca.hits == 3


def test_param_group_added():
    ap, a, ca, bp, b, _ = pair()
    step_both(ap, a, bp, b, 0)
    step_both(ap, a, bp, b, 1)
    extra_a, extra_b = make_params(5, [(4,), (9,)]), make_params(5, [(4,), (9,)])
    a.add_param_group({"params": extra_a, "lr": 0.05})
    b.add_param_group({"params": extra_b, "lr": 0.05})
    hits = ca.hits
    step_both(ap + extra_a, a, bp + extra_b, b, 2)
    assert ca.hits == hits  # rebuilt, not reused
    step_both(ap + extra_a, a, bp + extra_b, b, 3)
    assert ca.hits == hits + 1


def test_param_replaced_in_group():
    ap, a, ca, bp, b, _ = pair()
    step_both(ap, a, bp, b, 0)
    step_both(ap, a, bp, b, 1)
    new_a, new_b = make_params(9, [SHAPES[2]])[0], make_params(9, [SHAPES[2]])[0]
    ap[2] = a.param_groups[0]["params"][2] = new_a
    bp[2] = b.param_groups[0]["params"][2] = new_b
    hits = ca.hits
    step_both(ap, a, bp, b, 2)
    assert ca.hits == hits
    assert float(a.state[new_a]["step"]) == 1.0


def test_state_cleared_and_entry_replaced():
    ap, a, ca, bp, b, _ = pair()
    step_both(ap, a, bp, b, 0)
    step_both(ap, a, bp, b, 1)
    a.state.clear()
    b.state.clear()
    step_both(ap, a, bp, b, 2)
    assert float(a.state[ap[0]]["step"]) == 1.0
    for o, ps in ((a, ap), (b, bp)):
        o.state[ps[1]]["exp_avg"] = torch.full_like(ps[1], 0.25)  # a new tensor, not in place
    hits = ca.hits
    step_both(ap, a, bp, b, 3)
    assert ca.hits == hits


def test_load_state_dict():
    ap, a, ca, bp, b, _ = pair()
    for s in range(2):
        step_both(ap, a, bp, b, s)
    saved = copy.deepcopy(a.state_dict())
    for s in range(2, 4):
        step_both(ap, a, bp, b, s)
    a.load_state_dict(saved)
    b.load_state_dict(copy.deepcopy(saved))
    hits = ca.hits
    step_both(ap, a, bp, b, 4)
    assert ca.hits == hits
    assert float(a.state[ap[0]]["step"]) == 3.0


def test_bad_gradient_after_plan_is_refused_untouched():
    ap, a, ca, bp, b, _ = pair()
    step_both(ap, a, bp, b, 0)
    step_both(ap, a, bp, b, 1)
    before = [p.detach().clone() for p in ap]
    st_before = copy.deepcopy(a.state_dict())
    set_grads(ap, 2)
    ap[3].data = torch.zeros(5)  # same tensor object, new shape: its state no longer fits
    ap[3].grad = torch.ones(5)
    before[3] = ap[3].detach().clone()
    with pytest.raises(ValueError, match="state 'exp_avg' of parameter 3"):
        a.step()
    assert all(torch.equal(p, q) for p, q in zip(ap, before))
    assert float(a.state[ap[0]]["step"]) == float(st_before["state"][0]["step"])


def _model_pair(cached):
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    opt = mo.AdamW(model.parameters(), lr=1e-2, fingerprint=True)
    if not cached:
        opt._planned_step = lambda: False
    return model, opt


def _train_step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    model.zero_grad()
    model(torch.randn(4, 6, generator=g)).square().sum().backward()
    opt.step()


def test_fingerprints_after_snapshot_restore_reflect_restored_state():
    model, opt = _model_pair(cached=True)
    _train_step(model, opt, 0)
    _train_step(model, opt, 1)
    snap = memstate.Snapshot.capture(model, opt)
    want = [opt.fingerprints(p) for p in model.parameters()]
    _train_step(model, opt, 2)
    _train_step(model, opt, 3)
    assert opt.fingerprints(next(model.parameters()))["param"] != want[0]["param"]
    snap.restore()
    for p, w in zip(model.parameters(), want):
        got = opt.fingerprints(p)
        for key in ("param", "exp_avg", "exp_avg_sq", "step"):
            assert got[key] == w[key], key
        assert got["param"] == memstate.fingerprint(p)


def test_steps_after_snapshot_restore_equal_uncached():
    runs = []
    for cached in (True, False):
        model, opt = _model_pair(cached)
        _train_step(model, opt, 0)
        _train_step(model, opt, 1)
        snap = memstate.Snapshot.capture(model, opt)
        _train_step(model, opt, 2)
        snap.restore()
        _train_step(model, opt, 3)
        _train_step(model, opt, 4)
        runs.append((list(model.parameters()), opt))
    assert_same(runs[0][0], runs[0][1], runs[1][0], runs[1][1])


@pytest.mark.parametrize("cls", [mo.AdamW, mo.SGD])
def test_deepcopy_keeps_options_and_steps_like_the_original(cls):
    """copy.deepcopy / pickle go through torch.optim's __getstate__, which dropped memstate's
    options (step then raised AttributeError) and would carry a stale plan."""
    kw = {"momentum": 0.9} if cls is mo.SGD else {}
    params = make_params(0)
    opt = cls(params, fingerprint=True, skip_if_nonfinite=True, **kw)
    set_grads(params, 0)
    opt.step()
    params2 = [p.detach().clone().requires_grad_() for p in params]
    opt2 = cls(params2, fingerprint=True, skip_if_nonfinite=True, **kw)
    opt2.load_state_dict(opt.state_dict())
    both = copy.deepcopy({"params": params, "opt": opt})
    cparams, copt = both["params"], both["opt"]
    assert copt.fingerprint and copt.skip_if_nonfinite
    for ps, o in ((params2, opt2), (cparams, copt)):
        set_grads(ps, 1)
        o.step()
    assert_same(params2, opt2, cparams, copt)
