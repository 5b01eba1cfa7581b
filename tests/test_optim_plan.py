"""Cached step plans of memstate.optim.Adam/AdamW: every change between steps (gradients
appearing or disappearing, hyperparameters, param groups, state replaced or cleared,
load_state_dict, Snapshot.restore) gives exactly the result of an uncached step."""
import copy
import pickle

import pytest
import torch

import memstate
import memstate.optim as mo
from memstate.optim._base import _ParamList

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
        p.grad = None if i in skip else torch.randn(p.shape, generator=g).to(p.dtype)


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


# ---------------------------------------------------------------------------------------------
# Every fused optimizer shares one cached-plan mechanism (FusedOptimizer._build_plan /
# _planned_step, csrc/optim_plan.h). Each test below changes something between steps and
# compares a planned run bit for bit (parameters, state, fingerprints) against the same run that
# never uses a plan: a plan that is not rebuilt (or not refused) when it should be steps stale
# tensors, skips or double-steps a parameter, and the comparison fails.

# name: (class, constructor kwargs, a group flag change that changes the kernel's roles or, for
# optimizers without one, a hyperparameter change)
OPTS = {
    "sgd": (mo.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01), ("momentum", 0.0)),
    "adam": (mo.Adam, dict(lr=1e-2, weight_decay=0.1), ("amsgrad", True)),
    "adamw": (mo.AdamW, dict(lr=1e-2), ("amsgrad", True)),
    "rmsprop": (mo.RMSprop, dict(lr=1e-2, momentum=0.5), ("centered", True)),
    "adagrad": (mo.Adagrad, dict(lr=1e-2, lr_decay=0.01), ("maximize", True)),
    "lion": (mo.Lion, dict(lr=1e-3, weight_decay=0.1), ("maximize", True)),
}
COUNTED = {"adam", "adamw", "rmsprop", "adagrad"}  # keep torch's `step` counters


def opt_pair(name, seed=0, shapes=SHAPES, **extra):
    cls, kw, _ = OPTS[name]
    kw = {**kw, **extra}
    a_params, b_params = make_params(seed, shapes), make_params(seed, shapes)
    a, b = cls(a_params, fingerprint=True, **kw), cls(b_params, fingerprint=True, **kw)
    return a_params, a, Counting(a), b_params, b, Counting(b, enabled=False)


def assert_same_all(a_params, a, b_params, b):
    assert_same(a_params, a, b_params, b)
    assert a.state_fingerprint() == b.state_fingerprint()


def warm(ap, a, ca, bp, b, steps=2):
    for s in range(steps):
        step_both(ap, a, bp, b, s)
    assert ca.hits == steps - 1


def both(fn, ap, a, bp, b):
    fn(ap, a)
    fn(bp, b)


@pytest.mark.parametrize("name", OPTS)
def test_every_optimizer_uses_its_plan_exactly(name):
    ap, a, ca, bp, b, _ = opt_pair(name)
    for s in range(5):
        step_both(ap, a, bp, b, s)
    assert ca.hits == 4
    assert_same_all(ap, a, bp, b)


@pytest.mark.parametrize("name", OPTS)
def test_plan_without_fingerprints(name):
    cls, kw, _ = OPTS[name]
    ap, bp = make_params(0), make_params(0)
    a, b = cls(ap, **kw), cls(bp, **kw)
    ca, _ = Counting(a), Counting(b, enabled=False)
    for s in range(3):
        set_grads(ap, s)
        set_grads(bp, s)
        a.step()
        b.step()
    assert ca.hits == 2
    assert all(torch.equal(p, q) for p, q in zip(ap, bp))


@pytest.mark.parametrize("name", OPTS)
def test_param_replaced_in_group_rebuilds(name):
    ap, a, ca, bp, b, _ = opt_pair(name)
    warm(ap, a, ca, bp, b)
    for ps, o in ((ap, a), (bp, b)):
        ps[2] = o.param_groups[0]["params"][2] = make_params(9, [SHAPES[2]])[0]
    step_both(ap, a, bp, b, 2)
    assert ca.hits == 1
    step_both(ap, a, bp, b, 3)
    assert ca.hits == 2


@pytest.mark.parametrize("name", OPTS)
def test_params_relisted_rebuilds(name):
    """A parameter removed from its group's list, or listed a second time (stepped twice, as
    torch's for-loop does), with the same list object mutated in place."""
    ap, a, ca, bp, b, _ = opt_pair(name)
    warm(ap, a, ca, bp, b)
    for o in (a, b):
        del o.param_groups[0]["params"][1]
    step_both(ap, a, bp, b, 2)
    for o in (a, b):
        o.param_groups[0]["params"].append(o.param_groups[0]["params"][0])
    step_both(ap, a, bp, b, 3)
    step_both(ap, a, bp, b, 4)
    assert ca.hits == 2  # steps 1 and 4


@pytest.mark.parametrize("name", OPTS)
def test_group_params_appended_and_group_added(name):
    ap, a, ca, bp, b, _ = opt_pair(name)
    warm(ap, a, ca, bp, b)
    extra_a, extra_b = make_params(5, [(4,), (9,)]), make_params(5, [(4,), (9,)])
    a.param_groups[0]["params"].append(extra_a[0])
    b.param_groups[0]["params"].append(extra_b[0])
    step_both(ap + extra_a[:1], a, bp + extra_b[:1], b, 2)
    a.add_param_group({"params": extra_a[1:], "lr": 0.05})
    b.add_param_group({"params": extra_b[1:], "lr": 0.05})
    step_both(ap + extra_a, a, bp + extra_b, b, 3)
    step_both(ap + extra_a, a, bp + extra_b, b, 4)
    assert ca.hits == 2
    assert_same_all(ap + extra_a, a, bp + extra_b, b)


@pytest.mark.parametrize("name", OPTS)
def test_load_state_dict_rebuilds(name):
    ap, a, ca, bp, b, _ = opt_pair(name)
    warm(ap, a, ca, bp, b)
    saved = copy.deepcopy(a.state_dict())
    for s in range(2, 4):
        step_both(ap, a, bp, b, s)
    hits = ca.hits
    a.load_state_dict(copy.deepcopy(saved))
    b.load_state_dict(copy.deepcopy(saved))
    step_both(ap, a, bp, b, 4)
    assert ca.hits == hits
    step_both(ap, a, bp, b, 5)
    assert ca.hits == hits + 1


@pytest.mark.parametrize("name", OPTS)
def test_state_dict_holds_plain_dicts_that_load_with_weights_only(name, tmp_path):
    ap, a, ca, bp, b, _ = opt_pair(name)
    warm(ap, a, ca, bp, b)
    sd = a.state_dict()
    assert all(type(v) is dict for v in sd["state"].values())
    torch.save(sd, tmp_path / "opt.pt")
    b.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    step_both(ap, a, bp, b, 2)


@pytest.mark.parametrize("name", OPTS)
@pytest.mark.parametrize("how", ["deepcopy", "setstate"])
def test_copies_step_like_a_fresh_optimizer(name, how):
    ap, a, ca, bp, b, _ = opt_pair(name)
    warm(ap, a, ca, bp, b)
    if how == "deepcopy":
        both_ = copy.deepcopy({"params": ap, "opt": a})
        cp, c = both_["params"], both_["opt"]
        assert "_planned_step" not in c.__dict__  # (the test's counting wrapper is not copied)
    else:
        cp, c = ap, a
        c.__setstate__(c.__getstate__())
    cc = Counting(c)
    for s in range(2, 4):
        set_grads(cp, s)
        c.step()
        set_grads(bp, s)
        b.step()
        assert_same(cp, c, bp, b)
    assert cc.hits == 1


@pytest.mark.parametrize("name", OPTS)
def test_state_entry_replaced_rebuilds(name):
    ap, a, ca, bp, b, _ = opt_pair(name)
    warm(ap, a, ca, bp, b)
    key = a._roles(a.param_groups[0])[2]
    for ps, o in ((ap, a), (bp, b)):
        o.state[ps[1]][key] = torch.full_like(ps[1], 0.25)  # a new tensor, not in place
    step_both(ap, a, bp, b, 2)
    assert ca.hits == 1
    step_both(ap, a, bp, b, 3)
    assert ca.hits == 2


@pytest.mark.parametrize("name", OPTS)
def test_state_dict_replaced_deleted_cleared_rebuilds(name):
    ap, a, ca, bp, b, _ = opt_pair(name)
    warm(ap, a, ca, bp, b)
    for ps, o in ((ap, a), (bp, b)):  # a new dict with new (equal-valued) tensors
        o.state[ps[0]] = {k: v.clone() + 1 if isinstance(v, torch.Tensor) and v.dim() else v
                          for k, v in o.state[ps[0]].items()}
    step_both(ap, a, bp, b, 2)
    for ps, o in ((ap, a), (bp, b)):
        del o.state[ps[2]]
    if name == "adagrad":  # its state is created by the constructor only, as torch's
        for ps, o in ((ap, a), (bp, b)):
            o._init_state(o.param_groups[0], ps[2])
    step_both(ap, a, bp, b, 3)
    if name != "adagrad":
        for o in (a, b):
            o.state.clear()
        step_both(ap, a, bp, b, 4)
    assert ca.hits == 1  # step 1 only


@pytest.mark.parametrize("name", OPTS)
def test_structure_flag_toggled(name):
    ap, a, ca, bp, b, _ = opt_pair(name)
    warm(ap, a, ca, bp, b)
    _, _, (flag, value) = OPTS[name]
    for o in (a, b):
        o.param_groups[0][flag] = value
    step_both(ap, a, bp, b, 2)
    step_both(ap, a, bp, b, 3)
    assert ca.hits >= 2


@pytest.mark.parametrize("name", OPTS)
def test_hyperparameters_and_scheduler_need_no_rebuild(name):
    ap, a, ca, bp, b, _ = opt_pair(name)
    warm(ap, a, ca, bp, b)
    sa = torch.optim.lr_scheduler.StepLR(a, step_size=1, gamma=0.5)
    sb = torch.optim.lr_scheduler.StepLR(b, step_size=1, gamma=0.5)
    for s in range(2, 5):
        step_both(ap, a, bp, b, s)
        sa.step()
        sb.step()
    for o in (a, b):
        o.param_groups[0]["weight_decay"] = 0.3
        o.param_groups[0]["lr"] = torch.tensor(0.02)  # a tensor lr
    step_both(ap, a, bp, b, 5)
    assert ca.hits == 5  # every step after the first


@pytest.mark.parametrize("name", OPTS)
def test_grads_going_none_and_back(name):
    ap, a, ca, bp, b, _ = opt_pair(name)
    warm(ap, a, ca, bp, b)
    step_both(ap, a, bp, b, 2, skip={1, 3})
    step_both(ap, a, bp, b, 3, skip={1, 3})
    step_both(ap, a, bp, b, 4)
    step_both(ap, a, bp, b, 5)
    assert ca.hits == 3  # steps 1, 3, 5


@pytest.mark.parametrize("name", OPTS)
def test_param_data_replaced(name):
    """`p.data = other`: same shape (new storage: a stale plan would update the old one), then
    another shape (the state no longer fits: ValueError, nothing modified; SGD without state
    buffers for it would step it)."""
    ap, a, ca, bp, b, _ = opt_pair(name)
    warm(ap, a, ca, bp, b)
    for ps in (ap, bp):
        ps[0].data = ps[0].data.clone() * 2
    step_both(ap, a, bp, b, 2)
    assert ca.hits == 1
    step_both(ap, a, bp, b, 3)
    assert ca.hits == 2
    before = [p.detach().clone() for p in ap]
    set_grads(ap, 4)
    ap[3].data = torch.zeros(5)
    ap[3].grad = torch.ones(5)
    before[3] = ap[3].detach().clone()
    with pytest.raises(ValueError, match="parameter 3"):
        a.step()
    assert all(torch.equal(p, q) for p, q in zip(ap, before))


@pytest.mark.parametrize("name", OPTS)
def test_bad_gradients_are_refused_by_the_plan(name):
    """Gradients the plan refuses take the full path: a wrong dtype or shape raises there (with
    nothing modified), a non-contiguous one is stepped there exactly."""
    ap, a, ca, bp, b, _ = opt_pair(name)
    warm(ap, a, ca, bp, b)
    set_grads(ap, 2)
    before = [p.detach().clone() for p in ap]
    for bad in (ap[1].grad.double(), ap[1].grad.reshape(-1)):
        ap[1].grad.data = bad  # (assigning .grad itself refuses these)
        with pytest.raises(ValueError, match="gradient of parameter 1"):
            a.step()
        assert all(torch.equal(p, q) for p, q in zip(ap, before))
    for ps in (ap, bp):
        set_grads(ps, 3)
        ps[1].grad = ps[1].grad.t().contiguous().t()  # (3, 5) transposed view: not contiguous
    a.step()
    b.step()
    assert_same(ap, a, bp, b)


@pytest.mark.parametrize("name", OPTS)
@pytest.mark.parametrize("what", ["grad", "state"])
def test_storage_shrunk_under_a_planned_tensor_is_refused(name, what):
    """A gradient or state buffer whose storage was shrunk (resize_, as FSDP frees memory) has
    fewer bytes than its elements: the cached step must not read or write past them. The plan
    refuses it; the full path names it; nothing is modified."""
    ap, a, ca, bp, b, _ = opt_pair(name)
    warm(ap, a, ca, bp, b)
    set_grads(ap, 2)
    before = [p.detach().clone() for p in ap]
    state_before = {k: v.clone() for k, v in a.state[ap[1]].items() if torch.is_tensor(v)}
    if what == "grad":
        victim = ap[1].grad
    else:
        victim = next(v for k, v in a.state[ap[1]].items() if torch.is_tensor(v) and v.numel() > 1)
    victim.untyped_storage().resize_(8)
    victim_name = "the gradient of parameter 1" if what == "grad" else "state '.*' of parameter 1"
    with pytest.raises(ValueError, match=rf"{victim_name} .* needs 60 bytes of storage but its storage holds 8"):
        a.step()
    assert ca.hits == 1  # the plan refused the step
    assert all(torch.equal(p, q) for p, q in zip(ap, before))
    for k, v in a.state[ap[1]].items():
        if torch.is_tensor(v) and v is not victim:
            assert torch.equal(v, state_before[k]), k


@pytest.mark.parametrize("name", OPTS)
def test_gradient_overlapping_a_written_tensor_is_refused(name):
    ap, a, ca, bp, b, _ = opt_pair(name)
    warm(ap, a, ca, bp, b)
    set_grads(ap, 2)
    ap[2].grad = ap[2].detach()  # the parameter's own memory: the pass would read what it writes
    before = [p.detach().clone() for p in ap]
    with pytest.raises(ValueError, match="the gradient of parameter 2 .* is the same memory as parameter 2"):
        a.step()
    assert all(torch.equal(p, q) for p, q in zip(ap, before))


@pytest.mark.parametrize("name", sorted(COUNTED))
def test_bad_step_counter_is_refused_by_the_plan(name):
    ap, a, ca, bp, b, _ = opt_pair(name)
    warm(ap, a, ca, bp, b)
    a.state[ap[0]]["step"].fill_(-3.0)  # in place: the plan still holds the tensor
    set_grads(ap, 2)
    before = [p.detach().clone() for p in ap]
    with pytest.raises(ValueError, match="state 'step'"):
        a.step()
    assert all(torch.equal(p, q) for p, q in zip(ap, before))
    assert float(a.state[ap[1]]["step"]) == 2.0


@pytest.mark.parametrize("name", sorted(COUNTED))
def test_fingerprints_stale_after_in_place_write_on_planned_step(name):
    ap, a, ca, bp, b, _ = opt_pair(name)
    warm(ap, a, ca, bp, b, steps=3)
    key = a._roles(a.param_groups[0])[2]
    for ps, o in ((ap, a), (bp, b)):
        o.state[ps[1]][key].add_(1.0)
    fa, fb = a.fingerprints(ap[1]), b.fingerprints(bp[1])
    assert fa == fb
    assert fa[key] == memstate.fingerprint(a.state[ap[1]][key])


@pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate parameters")
@pytest.mark.parametrize("name", OPTS)
def test_mixed_dtypes_and_duplicate_listing(name):
    cls, kw, _ = OPTS[name]
    runs = []
    for _ in range(2):
        ps = make_params(0, [(5,), (3, 4), (6,)])
        ps[1] = ps[1].detach().double().requires_grad_()
        ps.append(torch.randn(7, generator=torch.Generator().manual_seed(3)).bfloat16().requires_grad_())
        runs.append((ps, cls(ps + [ps[0]], fingerprint=True, **kw)))  # ps[0] listed twice
    (ap, a), (bp, b) = runs
    ca, _ = Counting(a), Counting(b, enabled=False)
    for s in range(4):
        step_both(ap, a, bp, b, s)
    assert ca.hits == 3
    assert_same_all(ap, a, bp, b)


@pytest.mark.parametrize("name", OPTS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_skip_if_nonfinite_is_planned_on_the_cpu(name, bad):
    """On the CPU the plan scans the checked gradients natively: a step with a non-finite
    gradient is skipped by the plan (nothing modified, step counters included, as the full
    path), and the next finite step is planned again."""
    ap, a, ca, bp, b, _ = opt_pair(name, skip_if_nonfinite=True)
    for s in range(3):
        step_both(ap, a, bp, b, s)
    assert ca.hits == 2
    before = [(p.detach().clone(), {k: v.clone() for k, v in a.state[p].items() if torch.is_tensor(v)}) for p in ap]
    for ps in (ap, bp):
        set_grads(ps, 3)
        ps[3].grad.view(-1)[5] = bad
    a.step()
    b.step()
    assert ca.hits == 3 and a.last_step_skipped and b.last_step_skipped and a.skipped_steps == b.skipped_steps == 1
    for p, (q, st) in zip(ap, before):
        assert torch.equal(p.detach(), q) and all(torch.equal(a.state[p][k], v) for k, v in st.items())
    assert_same(ap, a, bp, b)
    step_both(ap, a, bp, b, 4)
    assert ca.hits == 4 and not a.last_step_skipped and not b.last_step_skipped


@pytest.mark.parametrize("skip", [False, True])
def test_a_plan_without_gradients_steps_nothing_and_skips_nothing(skip):
    """Found by the fuzz test under a newer hypothesis: after zero_grad(set_to_none=True) the plan
    has no bucket and returns only the step counters' (empty) rows, once taken for a skipped
    step's marker; a step with no gradient is neither skipped nor counted as one."""
    ap, a, ca, bp, b, _ = opt_pair("adamw", skip_if_nonfinite=skip)
    for s in range(2):
        step_both(ap, a, bp, b, s)
    for o in (a, b):
        o.zero_grad(set_to_none=True)
    for _ in range(2):
        a.step()
        b.step()
        assert not a.last_step_skipped and a.skipped_steps == 0 and not b.last_step_skipped
    assert ca.hits >= 2
    assert_same(ap, a, bp, b)


def test_state_versioning_counts_mutations():
    ap, a, *_ = opt_pair("adamw")
    set_grads(ap, 0)
    a.step()
    cell = a.state._cell
    v = cell[0]
    st = a.state[ap[0]]
    for mutate in (lambda: st.__setitem__("x", 1), lambda: st.update(y=2), lambda: st.pop("x"),
                   lambda: st.setdefault("z", 3), lambda: st.__delitem__("z"), lambda: st.popitem(),
                   lambda: a.state.__setitem__(ap[1], dict(a.state[ap[1]])), lambda: a.state.pop(ap[2]),
                   lambda: a.state[torch.zeros(1)]):
        mutate()
        assert cell[0] > v
        v = cell[0]


def test_param_list_counts_edits_and_copies_as_plain_lists():
    """group["params"] is an edit-counted list (the plan's O(1) per-group check): every in-place
    edit moves the count; copies and pickles are plain lists, re-wrapped on load."""
    ap, a, *_ = opt_pair("adamw")
    plist = a.param_groups[0]["params"]
    assert type(plist) is _ParamList and plist == ap
    extra = torch.zeros(2, requires_grad=True)
    edits = [lambda: plist.append(extra), lambda: plist.pop(), lambda: plist.insert(0, extra),
             lambda: plist.remove(extra), lambda: plist.extend([extra]), lambda: plist.__delitem__(-1),
             lambda: plist.__setitem__(0, plist[0]), lambda: plist.__setitem__(slice(0, 1), plist[:1]),
             lambda: plist.reverse(), lambda: plist.sort(key=lambda t: t.numel(), reverse=True),
             lambda: plist.__iadd__([]), lambda: plist.__imul__(1)]
    for edit in edits:
        before = plist._edits
        edit()
        assert plist._edits == before + 1
    assert type(pickle.loads(pickle.dumps(plist))) is list
    assert type(copy.copy(plist)) is list
    c = copy.deepcopy(a)
    assert type(c.param_groups[0]["params"]) is _ParamList
    a.add_param_group({"params": [extra]})
    assert type(a.param_groups[1]["params"]) is _ParamList
    a.load_state_dict(a.state_dict())
    assert a.param_groups[0]["params"] is plist


@pytest.mark.parametrize("how", ["sort", "reverse", "setitem", "plain list", "same plain list"])
def test_param_list_edits_rebuild_the_plan(how):
    """Reordering the list in place rebuilds the plan; after an edit that leaves the same
    parameters (an element set to itself), or with the params replaced by a plain list, the
    list is compared element by element and the plan is reused; the new edit count is kept
    (the next step checks it in O(1) again)."""
    ap, a, ca, bp, b, _ = opt_pair("adamw")
    warm(ap, a, ca, bp, b)
    for ps, o in ((ap, a), (bp, b)):
        g = o.param_groups[0]
        if how == "sort":
            g["params"].sort(key=lambda t: -t.numel())
        elif how == "reverse":
            g["params"].reverse()
        elif how == "setitem":
            g["params"][1] = g["params"][1]
        else:
            g["params"] = list(g["params"])
    step_both(ap, a, bp, b, 2)
    assert ca.hits == (1 if how in ("sort", "reverse") else 2)
    saved = a._plan.groups[0]
    assert saved[2] is a.param_groups[0]["params"] and saved[3] == getattr(saved[2], "_edits", None)
    if how == "same plain list":  # in-place edits of a plain list are seen element by element
        for o in (a, b):
            o.param_groups[0]["params"].reverse()
        step_both(ap, a, bp, b, 3)
        assert ca.hits == 2
    step_both(ap, a, bp, b, 4)
    step_both(ap, a, bp, b, 5)
    assert_same_all(ap, a, bp, b)


@pytest.mark.parametrize("name", OPTS)
def test_copy_on_write_clone_of_a_planned_tensor(name):
    """torch._lazy_clone shares a parameter's or state buffer's memory copy-on-write (same data
    pointer, another deleter): the plan must not write through it, the clone keeps its values."""
    ap, a, ca, bp, b, _ = opt_pair(name)
    warm(ap, a, ca, bp, b)
    key = a._roles(a.param_groups[0])[2] if len(a._roles(a.param_groups[0])) > 2 else None
    clones = [torch._lazy_clone(ap[0].detach())]
    if key is not None:
        clones.append(torch._lazy_clone(a.state[ap[1]][key]))
    kept = [c.clone() for c in clones]
    step_both(ap, a, bp, b, 2)
    assert all(torch.equal(c, k) for c, k in zip(clones, kept))
    step_both(ap, a, bp, b, 3)
    assert ca.hits == 2  # the step after the clone took the full path (which materialises), then planned
    assert_same_all(ap, a, bp, b)


@pytest.mark.cuda
@pytest.mark.parametrize("name", OPTS)
def test_cuda_plan_equals_full_path(name):
    cls, kw, _ = OPTS[name]
    ap = [p.detach().cuda().requires_grad_() for p in make_params(0)]
    bp = [p.detach().cuda().requires_grad_() for p in make_params(0)]
    a, b = cls(ap, fingerprint=True, **kw), cls(bp, fingerprint=True, **kw)
    ca, _ = Counting(a), Counting(b, enabled=False)
    for s in range(4):
        for ps in (ap, bp):
            set_grads(ps, s)
            for p in ps:
                p.grad = p.grad.cuda()
        a.step()
        b.step()
        assert_same(ap, a, bp, b)
    assert ca.hits == 3
