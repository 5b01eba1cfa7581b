"""memstate.optim against torch's own optimizer test database (issue 11, item 1).

The cases come from the OptimizerInfo entries that ship inside the installed torch wheel
(``torch.testing._internal.common_optimizers.optim_db``): every keyword combination of
``optim_inputs_func(device="cpu")`` (with torch's global flags ``fused`` / ``differentiable``
added as torch's own suite adds them) and every case of ``optim_error_inputs_func``. Each memstate
optimizer is compared with torch.optim's for-loop implementation over several steps, and the
behaviours torch's TestOptimRenewed checks are checked here for memstate (written for memstate,
not copied): state_dict determinism and round trips with named parameters, ``weights_only``
loading, older state dicts, deepcopy, hooks in every position, no-op steps, schedulers, tensor
lr, param-group lr / weight_decay, complex parameters, sparse SGD gradients, default dtype.

Documented exceptions (docs/optim.md, "torch.optim compatibility"): ``differentiable=True`` and
``capturable=True`` raise NotImplementedError (checked below, with torch accepting the same
arguments).
"""
import copy
import io
import pickle
import re
import warnings

import pytest
import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

common_optimizers = pytest.importorskip(
    "torch.testing._internal.common_optimizers",
    reason="torch's optimizer test database needs the 'expecttest' package (requirements-test.txt)")

import memstate.optim as mo  # noqa: E402

NAMES = ("SGD", "Adam", "AdamW")
MS = {"SGD": mo.SGD, "Adam": mo.Adam, "AdamW": mo.AdamW}
TORCH = {"SGD": torch.optim.SGD, "Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}
INFO = {oi.optim_cls.__name__: oi for oi in common_optimizers.optim_db if oi.optim_cls.__name__ in NAMES}
RTOL32, ATOL32 = 1e-5, 1e-6  # as tests/test_optim.py (memstate vs torch's for-loop, float32)
STEPS = 7


@pytest.fixture(autouse=True)
def _one_thread(threads):
    threads(1)


def test_database_has_the_three_optimizers():
    assert set(INFO) == set(NAMES)


# ------------------------------------------------------------------------------------- the cases
def _inputs(name, skip=()):
    """Every config torch's suite builds for CPU: optim_inputs_func plus each global flag torch
    supports here (fused, differentiable) switched on alone, as
    _get_optim_inputs_including_global_cliquey_kwargs does."""
    return common_optimizers._get_optim_inputs_including_global_cliquey_kwargs(
        "cpu", torch.float32, INFO[name], skip=skip)


def _cases(skip=()):
    out = []
    for name in NAMES:
        for oi in _inputs(name, skip):
            out.append(pytest.param(name, oi.kwargs, id=f"{name}-{oi.desc.replace(' ', '_')}"))
    return out


def _error_cases():
    out = []
    for name in NAMES:
        for i, ei in enumerate(INFO[name].optim_error_inputs_func(device="cpu", dtype=torch.float32)):
            desc = ei.optimizer_error_input.desc.replace(" ", "_")
            out.append(pytest.param(name, i, id=f"{name}-{i}-{desc}"))
    return out


def _unsupported(kwargs):
    """The documented exceptions: flags memstate refuses with NotImplementedError."""
    return bool(kwargs.get("differentiable")) or bool(kwargs.get("capturable"))


def _fresh_kwargs(kwargs):
    """A deep copy (tensor lr / betas are mutated by schedulers)."""
    return copy.deepcopy(kwargs)


def _torch_ref(name, params, kwargs):
    """torch.optim's for-loop implementation with the same hyperparameters (fused=False: on CPU
    torch's fused kernel is a different, FMA-using implementation)."""
    kw = _fresh_kwargs(kwargs)
    kw.update(foreach=False, fused=False, differentiable=False)
    return TORCH[name](params, **kw)


def _assert_state_close(om, pm, ot, pt, what, rtol=RTOL32, atol=ATOL32):
    for i, (a, b) in enumerate(zip(pm, pt)):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: param {i}: {m}")
        sa, sb = om.state.get(a, {}), ot.state.get(b, {})
        assert sorted(sa) == sorted(sb), (what, i, sorted(sa), sorted(sb))
        for k in sa:
            x, y = sa[k], sb[k]
            if k == "step":
                assert float(x) == float(y) and x.dtype == y.dtype, (what, i, x, y)
            else:
                assert x.dtype == y.dtype and x.stride() == y.stride(), (what, i, k)
                torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m: f"{what}: param {i} {k}: {m}")


def _bitwise(xs, ys):
    return all(torch.equal(torch.view_as_real(x) if x.is_complex() else x,
                           torch.view_as_real(y) if y.is_complex() else y) for x, y in zip(xs, ys))


def _params(seed, dtype=torch.float32, contiguous=True):
    g = torch.Generator().manual_seed(seed)
    if contiguous:
        return [torch.randn(10, 5, generator=g, dtype=dtype), torch.randn(10, generator=g, dtype=dtype),
                torch.randn((), generator=g, dtype=dtype)]
    # as torch's suite: every other element of a larger tensor (not dense)
    return [torch.randn(10, 5, 2, generator=g, dtype=dtype)[..., 0], torch.randn(10, 2, generator=g, dtype=dtype)[..., 0]]


def _leaves(tensors):
    return [Parameter(t.clone()) for t in tensors]


def _grads(seed, like, steps):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g, dtype=p.dtype) for p in like] for _ in range(steps)]


# ------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name, index", _error_cases())
def test_error_inputs_raise_as_torch(name, index):
    """Same exception type and message as torch (the database's regex, checked on both)."""
    ei = INFO[name].optim_error_inputs_func(device="cpu", dtype=torch.float32)[index]
    inp = ei.optimizer_error_input
    assert ei.error_on == common_optimizers.OptimizerErrorEnum.CONSTRUCTION_ERROR  # all of them on CPU
    for cls in (TORCH[name], MS[name]):
        params = inp.params if inp.params is not None else [Parameter(torch.randn(2))]
        if issubclass(ei.error_type, Warning):
            with pytest.warns(ei.error_type, match=ei.error_regex):
                cls(params, **inp.kwargs)
        else:
            with pytest.raises(ei.error_type, match=ei.error_regex):
                cls(params, **inp.kwargs)


@pytest.mark.parametrize("name, kwargs, exc, needle", [
    ("SGD", dict(lr=torch.tensor([0.1, 0.1])), ValueError, "Tensor lr must be 1-element"),
    ("Adam", dict(lr=torch.tensor([1e-3, 1e-3])), ValueError, "Tensor lr must be 1-element"),
    ("Adam", dict(betas=(0.9, torch.tensor(0.99))), ValueError, "betas must be either both floats or both Tensors"),
    ("AdamW", dict(betas=(torch.tensor(0.9), 0.99)), ValueError, "betas must be either both floats or both Tensors"),
    ("Adam", dict(fused=True, foreach=True), RuntimeError, "`fused` and `foreach` cannot be `True` together"),
    ("SGD", dict(fused=True, differentiable=True), RuntimeError, "`fused` does not support `differentiable`"),
])
def test_tensor_hyperparameter_errors_as_torch(name, kwargs, exc, needle):
    for cls in (TORCH[name], MS[name]):
        with pytest.raises(exc, match=needle):
            cls([Parameter(torch.randn(2))], **kwargs)


@pytest.mark.parametrize("name, flag", [(n, f) for n in NAMES for f in ("differentiable", "capturable")
                                        if not (n == "SGD" and f == "capturable")])  # torch's SGD has no capturable
def test_unsupported_flags_raise_not_implemented(name, flag):
    p = Parameter(torch.randn(3))
    TORCH[name]([p], **{flag: True})  # torch accepts it ...
    with pytest.raises(NotImplementedError, match=flag) as ei:  # ... memstate says why it does not
        MS[name]([p], **{flag: True})
    if flag == "capturable":
        assert "issue 11 item 5" in str(ei.value)
    MS[name]([p], **{flag: False})  # the default value is accepted


# ------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("name, kwargs", _cases())
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "noncontiguous"])
def test_every_config_matches_torch_for_loop(name, kwargs, contiguous):
    """Every database config over several steps (some gradients None) against torch.optim's
    for-loop: parameters and every state tensor, dtypes, strides and step counts."""
    init = _params(1, contiguous=contiguous)
    grads = _grads(2, init, STEPS)
    for s in (2, 5):
        grads[s][1] = None  # a parameter without gradient is skipped, as torch does
    pm, pt = [Parameter(t) for t in copy.deepcopy(init)], [Parameter(t) for t in copy.deepcopy(init)]
    if _unsupported(kwargs):
        TORCH[name](pt, **_fresh_kwargs(kwargs))
        with pytest.raises(NotImplementedError):
            MS[name](pm, **_fresh_kwargs(kwargs))
        return
    om, ot = MS[name](pm, **_fresh_kwargs(kwargs)), _torch_ref(name, pt, kwargs)
    for k, v in kwargs.items():  # the flags are kept as given, as torch keeps them
        assert om.param_groups[0][k] is v or om.param_groups[0][k] == v, k
    for step, gs in enumerate(grads):
        for p, q, g in zip(pm, pt, gs):
            p.grad = None if g is None else g.clone()
            q.grad = None if g is None else g.clone()
        om.step()
        ot.step()
        _assert_state_close(om, pm, ot, pt, f"{name} {kwargs} step {step + 1}")
    assert all(p.stride() == q.stride() for p, q in zip(pm, pt))  # updated in place, layout kept


@pytest.mark.parametrize("name, kwargs", _cases(skip=("differentiable",)))
def test_flags_and_tensor_lr_change_no_bit(name, kwargs):
    """memstate is always fused: fused=True/False/None and foreach give the same bits, and a
    tensor lr gives the bits of the same float lr (memstate documents bitwise reproducibility).
    (A float32 tensor lr holds float32(lr), so the float runs use that value.)"""
    lr = float(torch.tensor(float(kwargs.get("lr", 1e-3))))
    variants = []
    for extra in (dict(fused=None), dict(fused=False), dict(fused=True), dict(foreach=True, fused=False)):
        kw = dict(_fresh_kwargs(kwargs), **extra)
        kw["lr"] = lr if "foreach" in extra else torch.tensor(lr)
        variants.append(kw)
    variants.append(dict(_fresh_kwargs(kwargs), lr=lr))
    results = []
    init = _params(3)
    grads = _grads(4, init, STEPS)
    for kw in variants:
        ps = _leaves(init)
        opt = MS[name](ps, **kw)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        results.append([p.detach() for p in ps] + [v for p in ps for v in opt.state[p].values()])
    for r in results[1:]:
        assert _bitwise(results[0], r)


# ------------------------------------------------------------------------------- TestOptimRenewed-like
def _linear_problem(name, kwargs, contiguous=True, seed=5):
    w, b = _params(seed, contiguous=contiguous)[:2]
    x = torch.randn(5, generator=torch.Generator().manual_seed(seed + 1))
    return Parameter(w), Parameter(b), x


def _schedulers(name):
    return INFO[name].scheduler_inputs


# (fused=True is left out: test_flags_and_tensor_lr_change_no_bit shows it changes no bit)
@pytest.mark.parametrize("name, kwargs", _cases(skip=("differentiable", "fused")))
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "noncontiguous"])
def test_goes_right_direction_with_every_scheduler_like_torch(name, kwargs, contiguous):
    """20 closure steps of (w x + b)^2 under each of the database's scheduler lists (and none):
    the loss moves the right way, and memstate's run stays close to torch's for-loop run."""
    for sched in [None] + list(_schedulers(name)):
        runs = []
        for make in (lambda ps, kw: MS[name](ps, **kw), lambda ps, kw: _torch_ref(name, ps, kw)):
            w, b, x = _linear_problem(name, kwargs, contiguous)
            opt = make([w, b], _fresh_kwargs(kwargs))
            schedulers = [s(opt) for s in sched or []]

            def closure():
                opt.zero_grad()
                loss = (w.mv(x) + b).pow(2).sum()
                loss.backward()
                return loss

            first = closure().item()
            for _ in range(20):
                loss = opt.step(closure)
                for s in schedulers:
                    s.step(loss) if isinstance(s, ReduceLROnPlateau) else s.step()
            last = closure().item()
            assert (last > first) if kwargs.get("maximize") else (last < first), (first, last)
            runs.append((w.detach().clone(), b.detach().clone(), [g["lr"] for g in opt.param_groups]))
        (wm, bm, lrm), (wt, bt, lrt) = runs
        torch.testing.assert_close(wm, wt, rtol=1e-4, atol=1e-5)  # 20 steps of a curved loss
        torch.testing.assert_close(bm, bt, rtol=1e-4, atol=1e-5)
        assert [float(v) for v in lrm] == [float(v) for v in lrt]


@pytest.mark.parametrize("name, kwargs", _cases(skip=("differentiable",)))
def test_param_groups_weight_decay_and_lr_like_torch(name, kwargs):
    # weight decay only on the weight; the bias group without
    w, b, x = _linear_problem(name, kwargs)
    wt, bt = Parameter(w.detach().clone()), Parameter(b.detach().clone())
    nodecay = dict(_fresh_kwargs(kwargs), weight_decay=0.0)
    om = MS[name]([dict(params=[w], **_fresh_kwargs(kwargs)), dict(params=[b], **nodecay)])
    ot = _torch_ref(name, [dict(params=[wt], **_fresh_kwargs(kwargs)), dict(params=[bt], **nodecay)], {})
    for _ in range(20):
        for opt, p, q in ((om, w, b), (ot, wt, bt)):
            opt.zero_grad()
            (p.mv(x) + q).pow(2).sum().backward()
            opt.step()
    torch.testing.assert_close(w.detach(), wt.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.detach(), bt.detach(), rtol=1e-4, atol=1e-5)
    # a group with a tiny outer lr leaves its parameter unchanged, the other group trains
    kw = _fresh_kwargs(kwargs)
    if "lr" not in kw or float(kw["lr"]) == 0:
        kw["lr"] = 1e-3
    w, b, x = _linear_problem(name, kwargs, seed=9)
    irrelevant = Parameter(torch.randn(2))
    before = irrelevant.detach().clone()
    opt = MS[name]([dict(params=[w, b], **kw), dict(params=[irrelevant])], lr=1e-28)
    first = (w.mv(x) + b).pow(2).sum().item()
    for _ in range(20):
        opt.zero_grad()
        loss = (w.mv(x) + b).pow(2).sum()
        loss.backward()
        irrelevant.grad = torch.rand_like(irrelevant)
        opt.step()
    assert (loss.item() > first) if kw.get("maximize") else (loss.item() < first)
    assert torch.equal(irrelevant.detach(), before)


@pytest.mark.parametrize("name, kwargs", _cases(skip=("differentiable",)))  # differentiable: NotImplementedError
def test_step_without_gradients_and_with_zero_gradients_is_a_no_op(name, kwargs):
    params = [torch.randn(2, 3) for _ in range(2)]  # no requires_grad, no .grad
    before = [p.clone() for p in params]
    opt = MS[name](params, **_fresh_kwargs(kwargs))
    assert opt.step(lambda: torch.tensor([1.0])) is not None
    assert _bitwise(before, params) and len(opt.state) == 0
    kw = _fresh_kwargs(kwargs)
    if kw.get("weight_decay", 0) != 0:
        return  # weight decay moves parameters whatever the gradient (torch's suite skips these too)
    if name == "AdamW":
        kw["lr"] = torch.tensor(1e-5) if isinstance(kw.get("lr"), torch.Tensor) else 1e-5
    p = torch.randn(5, 1, requires_grad=True)
    old = p.detach().clone()
    opt = MS[name]([p], **kw)
    p.grad = torch.zeros_like(p)
    opt.step()
    if name == "AdamW":  # its default weight_decay=1e-2 scales p by 1 - 1e-7 (torch's check is this one)
        torch.testing.assert_close(old, p.detach())
    else:
        assert torch.equal(old, p.detach())
    repr(opt)  # printable, as torch's


def _named(params, named):
    return [(f"name{i}", p) for i, p in enumerate(params)] if named else params


@pytest.mark.parametrize("name, kwargs", _cases(skip=("differentiable",)))
@pytest.mark.parametrize("named0, named1", [(False, False), (True, False), (False, True), (True, True)])
def test_state_dict_round_trip_is_deterministic_and_bitwise(name, kwargs, named0, named1):
    w, b, x = _linear_problem(name, kwargs)
    opt = MS[name](_named([w, b], named0), **_fresh_kwargs(kwargs))

    def fwd_bwd(o, p, q):
        o.zero_grad()
        (p.mv(x) + q).pow(2).sum().backward()

    for _ in range(10):
        fwd_bwd(opt, w, b)
        opt.step()
    with torch.no_grad():
        wc, bc = Parameter(w.clone()), Parameter(b.clone())
    optc = MS[name](_named([wc, bc], named1), **_fresh_kwargs(kwargs))
    sd = copy.deepcopy(opt.state_dict())
    optc.load_state_dict(copy.deepcopy(sd))
    for _ in range(10):
        fwd_bwd(opt, w, b)
        fwd_bwd(optc, wc, bc)
        opt.step()
        optc.step()
        assert torch.equal(w, wc) and torch.equal(b, bc)  # bitwise, not just close

    def strip(d):
        d = copy.deepcopy(d)
        for g in d["param_groups"]:
            g.pop("param_names", None)
        return d

    _assert_sd_equal(strip(opt.state_dict()), strip(optc.state_dict()))
    if named0 or named1:  # names are kept from whichever side had them
        assert optc.state_dict()["param_groups"][0]["param_names"] == ["name0", "name1"]
    # repeated groups have identical representations
    optc.param_groups.extend(optc.param_groups)
    assert strip(opt.state_dict())["param_groups"][-1] == strip(optc.state_dict())["param_groups"][-1]


def _assert_sd_equal(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert a["state"][k].keys() == b["state"][k].keys()
        for key, v in a["state"][k].items():
            u = b["state"][k][key]
            if isinstance(v, torch.Tensor):
                assert v.dtype == u.dtype and v.device == u.device and torch.equal(v, u), (k, key)
            else:
                assert v == u, (k, key)


@pytest.mark.parametrize("name, kwargs", _cases(skip=("differentiable",)))
@pytest.mark.parametrize("named", [False, True])
def test_save_and_weights_only_load_give_the_same_state_dict(name, kwargs, named):
    w, b, x = _linear_problem(name, kwargs)
    opt = MS[name](_named([w, b], named), **_fresh_kwargs(kwargs))

    def closure():
        opt.zero_grad()
        loss = (w.mv(x) + b).pow(2).sum()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    sd = opt.state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    for weights_only in (False, True):
        buf.seek(0)
        _assert_sd_equal(torch.load(buf, weights_only=weights_only), sd)


def _conv_model(seed=1):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2))


@pytest.mark.parametrize("name, kwargs", _cases(skip=("differentiable",)))
def test_older_and_named_state_dicts_load(name, kwargs):
    """State dicts without the flags added after the first release (not_og_supported_flags),
    and state dicts of named_parameters() loaded into parameters() and back."""
    x = torch.rand(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    for named0, named1 in [(False, False), (True, False), (False, True), (True, True)]:
        model = _conv_model()
        opt = MS[name](model.named_parameters() if named0 else model.parameters(), **_fresh_kwargs(kwargs))
        for _ in range(3):
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
        old = copy.deepcopy(opt.state_dict())
        for g in old["param_groups"]:
            for flag in INFO[name].not_og_supported_flags:
                g.pop(flag, None)
        opt.load_state_dict(old)
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
        opt2 = MS[name](model.named_parameters() if named1 else model.parameters(), **_fresh_kwargs(kwargs))
        opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
        opt2.zero_grad()
        model(x).sum().backward()
        opt2.step()
        if named0 or named1:
            assert opt2.state_dict()["param_groups"][0]["param_names"] == ["0.weight", "0.bias", "1.weight", "1.bias"]
        for g in opt2.param_groups:  # defaults filled in for the dropped flags, as torch's __setstate__
            for flag in INFO[name].not_og_supported_flags:
                if flag in opt2.defaults:
                    assert flag in g


@pytest.mark.parametrize("name, kwargs", _cases(skip=("differentiable",)))
def test_load_state_dict_with_number_step(name, kwargs):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)
    opt = MS[name](params, **_fresh_kwargs(kwargs))
    ref = MS[name]([Parameter(p.detach().clone()) for p in params], **_fresh_kwargs(kwargs))
    for q, p in zip(ref.param_groups[0]["params"], params):
        q.grad = p.grad.clone()
    for _ in range(3):
        opt.step()
        ref.step()
    sd = copy.deepcopy(opt.state_dict())
    for st in sd["state"].values():
        if "step" in st:
            st["step"] = st["step"].item()
    opt.load_state_dict(sd)
    for st in opt.state.values():
        if "step" in st:
            assert isinstance(st["step"], torch.Tensor) and st["step"].dtype == torch.float32
    opt.step()
    ref.step()
    assert _bitwise(params, ref.param_groups[0]["params"])


# ------------------------------------------------------------------------------------- hooks
def _one_param_opt(name, kwargs):
    return MS[name]([torch.rand(2, 3, requires_grad=True)], **_fresh_kwargs(kwargs))


@pytest.mark.parametrize("name, kwargs", _cases(skip=("differentiable",)))
def test_state_dict_hooks(name, kwargs):
    def pre(opt):
        opt.state["test"] = 1

    def post(opt, sd):
        sd["ran_pre"] = "test" in sd["state"]
        sd["state"].pop("test", None)
        return sd

    opt = _one_param_opt(name, kwargs)
    opt.register_state_dict_pre_hook(pre)
    assert opt.state_dict()["state"]["test"] == 1
    opt = _one_param_opt(name, kwargs)
    opt.register_state_dict_post_hook(post)
    assert opt.state_dict()["ran_pre"] is False
    opt = _one_param_opt(name, kwargs)
    opt.register_state_dict_pre_hook(pre)
    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert sd["ran_pre"] is True and "test" not in sd["state"]
    opt.load_state_dict(sd)  # extra top-level keys and hook-written state entries load as torch's do


@pytest.mark.parametrize("name, kwargs", _cases(skip=("differentiable",)))
def test_load_state_dict_hooks_in_every_position(name, kwargs):
    def pre1(opt, sd):
        sd["param_groups"][0]["lr"] = 0.002

    def pre2(opt, sd):
        sd = copy.deepcopy(sd)
        sd["param_groups"][0]["lr"] = 0.003
        return sd

    def post(opt):
        opt.state["ran_pre2"] = opt.param_groups[0]["lr"] == 0.003
        opt.state["ran_post"] = True

    opt = _one_param_opt(name, kwargs)
    sd = opt.state_dict()
    opt.register_load_state_dict_pre_hook(pre1)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.002
    opt.register_load_state_dict_pre_hook(pre2, prepend=True)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.002  # pre2 ran first, pre1 overrode it
    opt = _one_param_opt(name, kwargs)
    opt.register_load_state_dict_post_hook(post)
    opt.load_state_dict(opt.state_dict())
    assert not bool(opt.state["ran_pre2"]) and opt.state["ran_post"] is True
    opt = _one_param_opt(name, kwargs)
    opt.register_load_state_dict_pre_hook(pre2)
    opt.register_load_state_dict_post_hook(post)
    opt.load_state_dict(opt.state_dict())
    assert bool(opt.state["ran_pre2"]) and opt.state["ran_post"] is True
    # the post-hook's non-tensor entries survive the next load and step (issue 11: they made
    # load_state_dict raise when post-hooks ran before memstate's normalisation)
    p = opt.param_groups[0]["params"][0]
    p.grad = torch.ones_like(p)
    opt.step()
    opt.load_state_dict(opt.state_dict())
    opt.step()


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_load_post_hook_sees_normalised_state(name):
    """A pre-hook's returned dict is what gets checked and loaded; the post-hook sees step as
    the 0-d CPU tensor the next step uses (a saved number step converted already)."""
    p = Parameter(torch.randn(4))
    opt = MS[name]([p], lr=1e-2)
    p.grad = torch.ones(4)
    opt.step()
    seen = []
    opt.register_load_state_dict_post_hook(lambda o: seen.append(o.state[p]["step"]))
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["step"] = 7
    opt.load_state_dict(sd)
    assert isinstance(seen[0], torch.Tensor) and seen[0].dim() == 0 and float(seen[0]) == 7.0
    # a pre-hook that repairs a bad dict: the checks see the repaired one
    bad = copy.deepcopy(sd)
    bad["state"][0]["exp_avg"] = torch.zeros(5)
    with pytest.raises(ValueError, match="exp_avg"):
        opt.load_state_dict(bad)
    opt.register_load_state_dict_pre_hook(lambda o, d: sd)
    opt.load_state_dict(bad)


@pytest.mark.parametrize("name, kwargs", _cases(skip=("differentiable",)))  # differentiable: NotImplementedError
def test_step_hooks_in_every_position(name, kwargs):
    params = [torch.tensor([1.0, 1.0])]
    data = []
    opt = MS[name](params, **_fresh_kwargs(kwargs))
    other = torch.optim.SGD(params)
    handles = [register_optimizer_step_pre_hook(lambda *a: data.append(0)),
               register_optimizer_step_post_hook(lambda *a: data.append(5)),
               opt.register_step_pre_hook(lambda *a: data.append(1)),
               opt.register_step_post_hook(lambda *a: data.append(2)),
               other.register_step_pre_hook(lambda *a: data.append(1)),
               other.register_step_post_hook(lambda *a: data.append(2))]
    try:
        opt.step()
        assert data == [0, 1, 2, 5]
        other.step()
        opt.step()
        assert data == [0, 1, 2, 5] * 3
    finally:
        for h in handles:
            h.remove()
    opt.step()
    other.step()
    assert data == [0, 1, 2, 5] * 3


# ------------------------------------------------------------------------------------- copies
def _public(obj):
    return {k for k in obj.__dict__ if not k.startswith("_")}


@pytest.mark.parametrize("name, kwargs", _cases(skip=("differentiable",)))
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_keep_every_attribute_and_step_identically(name, kwargs, how):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    opt = MS[name](params, fingerprint=True, skip_if_nonfinite=True, **_fresh_kwargs(kwargs))
    for _ in range(3):
        for p in params:
            p.grad = torch.rand_like(p)
        opt.step()
    params[0].grad = torch.full_like(params[0], float("nan"))
    opt.step()  # a skipped step: skipped_steps == 1
    bundle = {"params": params, "opt": opt}
    if how == "deepcopy":
        copied = copy.deepcopy(bundle)
    elif how == "pickle":
        copied = pickle.loads(pickle.dumps(bundle))
    else:
        buf = io.BytesIO()
        torch.save(bundle, buf)
        buf.seek(0)
        copied = torch.load(buf, weights_only=False)
    cp, co = copied["params"], copied["opt"]
    assert _public(co) == _public(opt)
    for attr in ("fingerprint", "skip_if_nonfinite", "skipped_steps", "defaults"):
        assert getattr(co, attr) == getattr(opt, attr), attr
    assert co.skipped_steps == 1
    for p, q in zip(params, cp):
        g = torch.randn_like(p)
        p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    co.step()
    assert _bitwise(params, cp)
    for p, q in zip(params, cp):
        assert _bitwise(list(opt.state[p].values()), list(co.state[q].values()))
        assert opt.fingerprints(p) == co.fingerprints(q)


@pytest.mark.parametrize("name, kwargs", _cases(skip=("differentiable",)))
def test_non_empty_state_after_a_step_like_torch(name, kwargs):
    runs = []
    for cls in (MS[name], lambda ps, **kw: _torch_ref(name, ps, kw)):
        model = torch.nn.Linear(5, 5)
        opt = cls(model.parameters(), **_fresh_kwargs(kwargs))
        model(torch.rand(2, 5)).sum().backward()
        opt.step()
        runs.append(sorted(len(s) for s in opt.state.values()))
    assert runs[0] == runs[1] and all(n > 0 for n in runs[0])


def _model_pair_compare(name, kwargs, dtype):
    """torch's _compare_between on memstate: a small model plus a 0-d parameter, a layer frozen
    for two steps, a step with every gradient None; fused=False vs fused=True must agree
    bitwise (memstate's flags change nothing)."""
    x = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype).reshape(3, 2)
    runs = []
    for fused in (False, True):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1),
                                    torch.nn.Sigmoid()).to(dtype)
        empty = torch.empty((), dtype=dtype, requires_grad=True)
        empty.grad = torch.rand_like(empty)
        opt = MS[name](list(model.parameters()) + [empty], **dict(_fresh_kwargs(kwargs), fused=fused))
        trace = []
        for i in range(7):
            opt.zero_grad()
            if i == 3:
                model[2].requires_grad_(False)
            if i == 5:
                model[2].requires_grad_(True)
            if i != 2:
                model(x).sum().backward()
            opt.step()
            trace += [p.detach().clone() for p in model.parameters()]
            trace += [v.clone() for p in model.parameters() for v in opt.state.get(p, {}).values()]
        runs.append(trace)
    assert len(runs[0]) == len(runs[1]) and _bitwise(runs[0], runs[1])


@pytest.mark.parametrize("name, kwargs", _cases(skip=("differentiable", "fused")))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fused_flag_matches_unfused_bitwise(name, kwargs, dtype):
    _model_pair_compare(name, kwargs, dtype)


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_step_counter_follows_default_dtype_like_torch(name):
    before = torch.get_default_dtype()
    try:
        for default in (torch.float64, torch.float32):
            torch.set_default_dtype(default)
            for cls in (MS[name], TORCH[name]):
                p = Parameter(torch.randn(3, dtype=torch.float32))
                p.grad = torch.ones_like(p)
                opt = cls([p])
                opt.step()
                assert opt.state[p]["step"].dtype == default, (cls, default)
    finally:
        torch.set_default_dtype(before)


# ------------------------------------------------------------------------------------- complex, sparse
@pytest.mark.parametrize("name, kwargs", _cases(skip=("differentiable", "fused")))
def test_complex_parameters_are_stepped_as_their_real_view(name, kwargs):
    """As torch's test_complex: complex params (mixed with a real one) give exactly the steps of
    their view_as_real copies (bitwise here), and are close to torch.optim on the same complex params."""
    g = torch.Generator().manual_seed(11)
    cparams = [torch.randn(10, 5, dtype=torch.complex64, generator=g).requires_grad_(),
               torch.randn(10, dtype=torch.complex64, generator=g).requires_grad_(),
               torch.randn(10, 5, generator=g).requires_grad_()]
    rparams = [(torch.view_as_real(p) if p.is_complex() else p).detach().clone().requires_grad_() for p in cparams]
    tparams = [p.detach().clone().requires_grad_() for p in cparams]
    oc, orr = MS[name](cparams, **_fresh_kwargs(kwargs)), MS[name](rparams, **_fresh_kwargs(kwargs))
    ot = _torch_ref(name, tparams, kwargs)
    for _ in range(3):
        for c, r, t in zip(cparams, rparams, tparams):
            grad = torch.randn(r.shape, generator=g)
            r.grad = grad.clone()
            c.grad = torch.view_as_complex(grad.clone()) if c.is_complex() else grad.clone()
            t.grad = c.grad.clone()
        oc.step()
        orr.step()
        ot.step()
        assert _bitwise([torch.view_as_real(c) if c.is_complex() else c for c in cparams], rparams)
    _assert_state_close(oc, cparams, ot, tparams, f"{name} complex")


@pytest.mark.parametrize("name, kwargs", _cases(skip=("differentiable", "fused")))
def test_complex_2d_equals_separate_real_and_imaginary_parts(name, kwargs):
    a1 = torch.randn(2, dtype=torch.complex64, generator=torch.Generator().manual_seed(2)).requires_grad_()
    re_, im = a1.real.detach().clone().requires_grad_(), a1.imag.detach().clone().requires_grad_()
    o1, o2 = MS[name]([a1], **_fresh_kwargs(kwargs)), MS[name]([re_, im], **_fresh_kwargs(kwargs))

    def rosenbrock(t):
        x, y = t
        return (1 - x) ** 2 + 100 * (y - x ** 2) ** 2

    for _ in range(3):
        o1.zero_grad()
        o2.zero_grad()
        rosenbrock(a1).abs().backward()
        rosenbrock(torch.complex(re_, im)).abs().backward()
        assert torch.equal(a1.grad.real, re_.grad) and torch.equal(a1.grad.imag, im.grad)
        o1.step()
        o2.step()
        assert torch.equal(a1.real, re_) and torch.equal(a1.imag, im)


@pytest.mark.slow
@pytest.mark.parametrize("with_sched", [False, True])
def test_rosenbrock_with_sparse_gradients_like_torch(with_sched):
    """torch's test_rosenbrock_sparse (SGD's metadata_for_sparse: lr 4.8e-3, no momentum, no
    weight decay) on memstate: uncoalesced sparse gradients vs the dense ones and vs
    torch.optim.SGD on the same sparse gradients (close, as torch's sparse vs dense: memstate
    sums the duplicate entries first, torch adds them one by one), and the distance to the
    optimum shrinks. Bitwise equality with torch for coalesced gradients: test_optim_layouts.py."""
    kwargs_list = {tuple(sorted(oi.kwargs.items())) for oi in _inputs("SGD", skip=("differentiable", "fused"))}
    updates, scheds = INFO["SGD"].metadata_for_sparse
    configs = []
    for kw in kwargs_list:
        kw = {k: v for k, v in kw if k not in updates}
        if kw and kw not in configs:
            configs.append(kw)
    assert configs
    for kw in configs:
        kw = dict(kw, lr=updates["lr"])

        def drosen(t):
            x, y = t
            return torch.stack((-400 * x * (y - x ** 2) - 2 * (1 - x), 200 * (y - x ** 2)))

        ps, pd, pt = Parameter(torch.tensor([1.5, 1.5])), Parameter(torch.tensor([1.5, 1.5])), Parameter(torch.tensor([1.5, 1.5]))
        os_, od, ot = mo.SGD([ps], **kw), mo.SGD([pd], **kw), torch.optim.SGD([pt], foreach=False, **kw)
        sch = [[s(o) for s in (scheds if with_sched else [])] for o in (os_, od, ot)]
        start = ps.detach().dist(torch.tensor([1.0, 1.0]))
        for i in range(1800):
            w = i % 2
            for p, sparse in ((ps, True), (pd, False), (pt, True)):
                g = drosen(p.detach())
                if sparse:
                    idx = torch.tensor([[0, 0]]) if w else torch.tensor([[1, 1]])
                    v = torch.stack([g[0] / 4, g[0] - g[0] / 4]) if w else torch.stack([g[1] - g[1] / 4, g[1] / 4])
                    p.grad = torch.sparse_coo_tensor(idx, v, (2,))
                else:
                    p.grad = torch.stack([g[0], torch.tensor(0.0)]) if w else torch.stack([torch.tensor(0.0), g[1]])
            for o, ss in zip((os_, od, ot), sch):
                o.step()
                for s in ss:
                    s.step()
            torch.testing.assert_close(ps.detach(), pd.detach(), atol=5e-6, rtol=5e-6)
            torch.testing.assert_close(ps.detach(), pt.detach(), atol=5e-6, rtol=5e-6)
        assert ps.detach().dist(torch.tensor([1.0, 1.0])) <= start


# ------------------------------------------------------------------------------------- flags in state dicts
@pytest.mark.parametrize("src_name, src_kw, dst_name", [
    ("Adam", dict(decoupled_weight_decay=True), "Adam"),
    ("AdamW", dict(), "Adam"),
    ("Adam", dict(decoupled_weight_decay=True), "AdamW"),
    ("AdamW", dict(), "AdamW"),
    ("Adam", dict(), "Adam"),
])
def test_decoupled_weight_decay_survives_loading_torch_checkpoints(src_name, src_kw, dst_name):
    """issue 11: torch Adam(decoupled_weight_decay=True) loaded into memstate Adam was stepped as
    coupled L2 Adam. Now the loaded flag decides, and the continued run matches torch's."""
    g = torch.Generator().manual_seed(21)
    init = [torch.randn(6, 4, generator=g), torch.randn(4, generator=g)]
    grads = _grads(22, init, 10)
    kw = dict(lr=1e-2, weight_decay=0.5, **src_kw)
    pt = _leaves(init)
    ot = TORCH[src_name](pt, foreach=False, **kw)
    for gs in grads[:5]:
        for p, x in zip(pt, gs):
            p.grad = x.clone()
        ot.step()
    pm = _leaves([p.detach() for p in pt])
    om = MS[dst_name](pm, lr=1.0, weight_decay=0.0)
    om.load_state_dict(copy.deepcopy(ot.state_dict()))
    assert om.param_groups[0]["decoupled_weight_decay"] is ot.param_groups[0]["decoupled_weight_decay"]
    for gs in grads[5:]:
        for p, q, x in zip(pm, pt, gs):
            p.grad, q.grad = x.clone(), x.clone()
        om.step()
        ot.step()
    _assert_state_close(om, pm, ot, pt, f"{src_name}{src_kw} -> {dst_name}")
    # the other algorithm ends measurably elsewhere: the test can tell coupled from decoupled
    pw = _leaves([p.detach() for p in pt])
    other = not ot.param_groups[0]["decoupled_weight_decay"]
    wrong = mo.Adam(pw, lr=1e-2, weight_decay=0.5, decoupled_weight_decay=other)
    for gs in grads[5:]:
        for p, x in zip(pw, gs):
            p.grad = x.clone()
        wrong.step()
    assert not torch.allclose(pw[0], pm[0], rtol=1e-3, atol=1e-4)


def test_coupled_adam_checkpoint_is_refused_by_adamw_with_nothing_modified():
    pt = [Parameter(torch.randn(5))]
    ot = torch.optim.Adam(pt, lr=1e-2, weight_decay=0.1)
    pt[0].grad = torch.ones(5)
    ot.step()
    pm = [Parameter(torch.randn(5))]
    om = mo.AdamW(pm, lr=3e-3)
    pm[0].grad = torch.ones(5)
    om.step()
    before = copy.deepcopy(om.state_dict())
    with pytest.raises(ValueError, match=r"param_groups\[0\].*decoupled_weight_decay=False.*memstate.optim.Adam"):
        om.load_state_dict(ot.state_dict())
    _assert_sd_equal(before, om.state_dict())


@pytest.mark.parametrize("flag", ["differentiable", "capturable"])
def test_state_dict_with_flags_memstate_cannot_honour_is_refused(flag):
    p = Parameter(torch.randn(3))
    src = torch.optim.Adam([p], **{flag: True}) if flag == "differentiable" else torch.optim.Adam([p])
    sd = copy.deepcopy(src.state_dict())
    sd["param_groups"][0][flag] = True
    om = mo.Adam([Parameter(torch.randn(3))], lr=5e-3)
    before = copy.deepcopy(om.state_dict())
    with pytest.raises(ValueError, match=rf"param_groups\[0\].*{flag}=True"):
        om.load_state_dict(sd)
    _assert_sd_equal(before, om.state_dict())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("flags", [dict(fused=True), dict(foreach=True), dict(fused=False, foreach=False)])
def test_state_dicts_cross_load_both_ways_with_every_flag(name, flags):
    kw = dict(flags, lr=1e-2)
    for src_cls, dst_cls in ((TORCH[name], MS[name]), (MS[name], TORCH[name])):
        p = Parameter(torch.randn(4, 3))
        src = src_cls([p], **kw)
        p.grad = torch.randn(4, 3)
        src.step()
        dst = dst_cls([Parameter(p.detach().clone())], lr=0.5)
        dst.load_state_dict(copy.deepcopy(src.state_dict()))
        a, b = src.state_dict()["param_groups"][0], dst.state_dict()["param_groups"][0]
        assert a.keys() == b.keys() and a == b, (src_cls, a, b)


def test_requirements_name_expecttest():
    """torch's test database imports expecttest; CI installs it from requirements-test.txt."""
    with open(__file__.replace("tests/test_optim_torch_suite.py", "requirements-test.txt")) as f:
        assert re.search(r"^expecttest", f.read(), re.M)


def test_no_database_case_is_skipped_for_an_argument():
    """Every database config constructs (the documented exceptions raise NotImplementedError)."""
    for name in NAMES:
        for oi in _inputs(name):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    MS[name]([Parameter(torch.randn(2))], **_fresh_kwargs(oi.kwargs))
                except NotImplementedError:
                    assert _unsupported(oi.kwargs), (name, oi.kwargs)
