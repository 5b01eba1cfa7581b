"""memstate.optim under misuse: duplicate parameters, refused steps and loads that must leave
state untouched, steps without gradients, host syncs per step, CUDA graph capture.

Regression tests for issue 10 items 5-7 and issue 16 items 2, 7, 8.
"""
import copy
import warnings

import pytest
import torch

import memstate
import memstate.optim as mo

MS = {"SGD": mo.SGD, "Adam": mo.Adam, "AdamW": mo.AdamW}
TORCH = {"SGD": torch.optim.SGD, "Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}
HP = {"SGD": dict(lr=0.05, momentum=0.9, nesterov=True), "Adam": dict(lr=1e-2), "AdamW": dict(lr=1e-2, amsgrad=True)}
SHAPES = [(7,), (33, 17), (1,), (1001,)]


def _init(seed, shapes=SHAPES, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


def _grads(seed, steps, shapes=SHAPES, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g).to(dtype) for s in shapes] for _ in range(steps)]


def _leaves(init):
    return [torch.nn.Parameter(t.clone()) for t in init]


def _state(params, opt):
    """Everything a step may touch: parameter bytes and the optimizer's tensor state, cloned."""
    out = {f"p{i}": p.detach().clone() for i, p in enumerate(params)}
    for i, p in enumerate(params):
        for k, v in opt.state.get(p, {}).items():
            out[f"s{i}.{k}"] = v.detach().clone() if isinstance(v, torch.Tensor) else v
    return out


def _assert_same(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape, f"{what}: {k}"
            assert torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8)), f"{what}: {k}"
        else:
            assert x == y, f"{what}: {k}"


# ------------------------------------------------------------------ issue 10.5: duplicate params
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_parameter_listed_twice_updates_per_listing_like_torch_every_run(name, threads):
    threads(2)  # parallel chunks: a race between the two listings would show
    init, grads = _init(500), _grads(501, 3)
    order = [0, 1, 0, 2, 3, 1]  # params 0 and 1 listed twice
    pt = _leaves(init)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        ot = TORCH[name]([pt[i] for i in order], foreach=False, **HP[name])
    for g in grads:
        for p, x in zip(pt, g):
            p.grad = x.clone()
        ot.step()
    results = set()
    for run in range(25):
        pm = _leaves(init)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            om = MS[name]([pm[i] for i in order], fingerprint=True, **HP[name])
        assert any("duplicate parameters" in str(x.message) for x in w), "torch's warning"
        for g in grads:
            for p, x in zip(pm, g):
                p.grad = x.clone()
            om.step()
        results.add(tuple(memstate.fingerprint(p).hex() for p in pm))
        for i, (a, b) in enumerate(zip(pm, pt)):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"run {run}, param {i}: {m}")
        # the fingerprints of the last step describe the final (second-listing) update
        assert om.fingerprints(pm[0])["param"] == memstate.fingerprint(pm[0])
    assert len(results) == 1, f"{len(results)} distinct results over 25 runs"


# ------------------------------------------------------------------ issue 10.6: refused SGD step
def test_refused_sgd_step_leaves_no_unfilled_momentum_buffer():
    init, grads = _init(510), _grads(511, 2)
    pm, pt = _leaves(init), _leaves(init)
    om = mo.SGD(pm, lr=0.1, momentum=0.9, nesterov=True)
    ot = torch.optim.SGD(pt, lr=0.1, momentum=0.9, nesterov=True, foreach=False)
    for p, x in zip(pm, grads[0]):
        p.grad = x.clone()
    before = _state(pm, om)
    om.param_groups[0]["dampening"] = 0.5  # invalid with Nesterov, set after construction
    with pytest.raises(ValueError, match=r"param_groups\[0\].*Nesterov"):
        om.step()
    _assert_same(before, _state(pm, om), "after a refused step")
    assert all(om.state.get(p, {}).get("momentum_buffer") is None for p in pm)
    om.param_groups[0]["dampening"] = 0.0
    for g in grads:
        for p, q, x in zip(pm, pt, g):
            p.grad, q.grad = x.clone(), x.clone()
        om.step()
        ot.step()
    for i, (a, b) in enumerate(zip(pm, pt)):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7, msg=lambda m: f"param {i}: {m}")


# ------------------------------------------------------------------ issue 10.7: validate first
def _two_group_adam(name="Adam", steps=2):
    init, grads = _init(520), _grads(521, steps)
    ps = _leaves(init)
    opt = MS[name]([{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3}], lr=1e-2)
    for g in grads:
        for p, x in zip(ps, g):
            p.grad = x.clone()
        opt.step()
    return ps, opt


def _bad_step_shape(sd):
    sd["state"][0]["step"] = torch.tensor([3.0, 3.0])


def _bad_step_negative(sd):
    sd["state"][3]["step"] = torch.tensor(-4.0)


def _bad_exp_avg_complex(sd):
    sd["state"][2]["exp_avg"] = sd["state"][2]["exp_avg"].to(torch.complex64)


def _bad_group_hparam(sd):
    sd["param_groups"][1]["betas"] = (0.9, 1.5)


def _bad_group_entry(sd):
    sd["param_groups"][1] = ["not", "a", "dict"]


@pytest.mark.parametrize("corrupt, needle", [
    (_bad_step_shape, "'step'"), (_bad_step_negative, "'step'"), (_bad_exp_avg_complex, "'exp_avg'"),
    (_bad_group_hparam, r"param_groups\[1\].*beta"), (_bad_group_entry, r"param_groups\[1\]"),
])
def test_load_state_dict_checks_everything_before_modifying(corrupt, needle):
    src_p, src = _two_group_adam(steps=3)
    sd = copy.deepcopy(src.state_dict())
    corrupt(sd)
    ps, opt = _two_group_adam(steps=1)
    before = _state(ps, opt), copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    with pytest.raises(ValueError, match=needle):
        opt.load_state_dict(sd)
    _assert_same(before[0], _state(ps, opt), "state after a refused load")
    assert before[1] == [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    opt.step()  # still usable


@pytest.mark.parametrize("break_it, needle", [
    (lambda ps, opt: opt.state[ps[3]].__setitem__("exp_avg", opt.state[ps[3]]["exp_avg"].double()), "exp_avg"),
    (lambda ps, opt: opt.param_groups[1].__setitem__("eps", -1.0), r"param_groups\[1\].*epsilon"),
    (lambda ps, opt: opt.state[ps[2]].__setitem__("step", torch.tensor(float("nan"))), "'step'"),
])
def test_step_checks_all_groups_before_updating_any(break_it, needle):
    ps, opt = _two_group_adam()
    break_it(ps, opt)
    before = _state(ps, opt)
    with pytest.raises(ValueError, match=needle):
        opt.step()
    _assert_same(before, _state(ps, opt), "after a refused step (group 0's counters included)")


# ------------------------------------------------------------------ issue 16.2: no gradients
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_fingerprinted_step_without_any_gradient(name):
    ps = _leaves(_init(530))
    opt = MS[name](ps, fingerprint=True, **HP[name])
    opt.step()  # before the first backward
    assert opt.fingerprints(ps[0]) == {}
    assert len(opt.state_fingerprint()) == 0


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_fingerprinted_step_with_an_all_frozen_group(name):
    init, grads = _init(531), _grads(532, 2)
    ps = _leaves(init)
    opt = MS[name]([{"params": ps[:2]}, {"params": ps[2:]}], fingerprint=True, **HP[name])
    for g in grads:
        for p, x in zip(ps[2:], g[2:]):  # group 0 frozen: no gradients
            p.grad = x.clone()
        opt.step()
    assert opt.fingerprints(ps[0]) == {}
    fp = opt.state_fingerprint()
    assert fp["param.3"] == memstate.fingerprint(ps[3])
    for key, value in opt.state[ps[3]].items():
        assert fp[f"state.3.{key}"] == memstate.fingerprint(value)


# ------------------------------------------------------------------ issue 16.7: one host sync
@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_one_host_fetch_per_step_across_buckets(name, monkeypatch):
    """Every device-to-host transfer of a step goes through one `.cpu()` call: one for the
    non-finite flags of all buckets, one for the fingerprint rows of all buckets (CPU tensors
    here, so the calls are counted rather than the syncs; the CUDA test below counts syncs)."""
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]  # four buckets
    ps = [torch.nn.Parameter(t) for t in (_init(540, SHAPES[:1], dt)[0] for dt in dtypes)]
    ps += [torch.nn.Parameter(_init(541, SHAPES[1:2], dt)[0]) for dt in dtypes]
    opt = MS[name]([{"params": ps[:4]}, {"params": ps[4:]}], skip_if_nonfinite=True, fingerprint=True,
                   **HP[name])
    for p in ps:
        p.grad = torch.ones_like(p)
    calls = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: calls.append(1) or real_cpu(self, *a, **k))
    opt.step()
    assert len(calls) == 1, f"{len(calls)} host fetches for the non-finite check of 8 buckets"
    opt.state_fingerprint()
    assert len(calls) == 2, f"{len(calls) - 1} host fetches to materialise the fingerprints"


@pytest.mark.cuda
def test_cuda_one_sync_per_step_across_buckets():
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    ps = [torch.nn.Parameter(torch.randn(1000, dtype=dt, device="cuda")) for dt in dtypes for _ in range(2)]
    opt = mo.Adam([{"params": ps[:3]}, {"params": ps[3:]}], skip_if_nonfinite=True, fingerprint=True)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    opt.state_fingerprint()  # warm up: allocations, first-use syncs
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            opt.step()
            opt.state_fingerprint()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [x for x in w if "synchroniz" in str(x.message).lower()]
    assert len(syncs) <= 2, [str(x.message) for x in syncs]


# ------------------------------------------------------------------ issue 16.8: graph capture
def test_step_refuses_cuda_graph_capture(monkeypatch):
    ps = _leaves(_init(550))
    opt = mo.Adam(ps)
    for p in ps:
        p.grad = torch.ones_like(p)
    before = _state(ps, opt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA graph capture"):
        opt.step()
    _assert_same(before, _state(ps, opt), "after a refused step")


@pytest.mark.cuda
def test_cuda_step_under_real_graph_capture_raises():
    p = torch.nn.Parameter(torch.randn(100, device="cuda"))
    p.grad = torch.ones_like(p)
    opt = mo.Adam([p])
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="CUDA graph capture"):
        with torch.cuda.graph(g):
            opt.step()


def test_state_fingerprint_after_zero_grad_set_to_none():
    """Found by ReplicaCheck's author: state_fingerprint() raised AttributeError once the
    gradients were dropped after the step (zero_grad(set_to_none=True), the default)."""
    import memstate

    p = torch.nn.Parameter(torch.randn(5, 3))
    opt = memstate.optim.AdamW([p], lr=0.1, fingerprint=True)
    p.grad = torch.randn(5, 3)
    opt.step()
    before = opt.state_fingerprint()
    opt.zero_grad()
    assert p.grad is None
    after = opt.state_fingerprint()
    assert after == before and after.shape("grad.0") == (5, 3) and after.dtype("grad.0") == torch.float32


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop", "Adagrad", "LAMB"])
@pytest.mark.parametrize("checked", [True, False])
def test_step_refused_by_the_kernel_leaves_step_counters(name, checked):
    # A gradient that is the parameter's own memory: the Python layer refuses it before anything
    # runs (ValueError naming both). With that check bypassed, the kernel refuses it after the
    # Python layer advanced the step counters: they must be put back (they stayed advanced once).
    p = torch.nn.Parameter(torch.randn(5))
    opt = getattr(mo, name)([p])
    p.grad = torch.randn(5)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    p_before = p.detach().clone()
    p.grad = p.detach()
    if checked:
        with pytest.raises(ValueError, match=r"the gradient of parameter 0 \(param_groups\[0\]\['params'\]\[0\], "
                                             r"shape \(5,\)\) is the same memory as parameter 0"):
            opt.step()
    else:
        opt._check_bucket_memory = lambda group, buckets: None
        with pytest.raises(RuntimeError, match="same memory"):
            opt.step()
    for k, v in before.items():
        assert torch.equal(opt.state[p][k], v), k
    assert torch.equal(p.detach(), p_before)
    p.grad = torch.randn(5)
    opt.step()
    assert float(opt.state[p]["step"]) == 2.0


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Lion", "LAMB"])
@pytest.mark.parametrize("how", ["grad aliases state", "state freed", "param meta"])
def test_a_step_refused_in_its_second_bucket_modifies_nothing(name, how):
    """Found by tests/test_optim_plan_fuzz.py: parameters of two dtypes (or listed twice, or in
    two groups) step in several native calls; a gradient aliasing a written tensor in a later
    bucket used to be refused by that bucket's kernel after the first bucket had stepped (a
    half step, and the error did not say so); so was a state buffer whose storage was freed,
    or a meta parameter. Every bucket's memory is now checked before any runs."""
    kw = {"momentum": 0.9} if name == "SGD" else {}
    ps = [torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3, dtype=torch.float64))]
    opt = getattr(mo, name)(ps, lr=0.1, **kw)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    victim = next(v for v in opt.state[ps[1]].values() if torch.is_tensor(v) and v.shape == ps[1].shape)
    key = next(k for k, v in opt.state[ps[1]].items() if v is victim)
    before = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)})
              for p in ps]
    if how == "grad aliases state":
        ps[1].grad = victim
        error = (rf"the gradient of parameter 1 .* is the same memory as state '{key}' of parameter 1 .*; a gradient "
                 r"may not share memory with a tensor the step writes")
    elif how == "state freed":
        before[1][1].pop(key)
        victim.untyped_storage().resize_(0)
        error = rf"state '{key}' of parameter 1 .* needs 24 bytes of storage but its storage holds 0"
    else:  # a meta parameter in a group of its own (its gradient passes the Python checks)
        meta = torch.nn.Parameter(torch.empty(2, device="meta"))
        meta.grad = torch.empty(2, device="meta")
        opt.add_param_group({"params": [meta]})
        error = r"parameter 2 .* is a meta tensor; it has no data to read or write"
        if name == "LAMB":  # its global gradient norm (max_grad_norm=1.0) is taken first, and refuses it
            error = r"memstate.norm_sums: tensors\[\d\] is a meta tensor"
    with pytest.raises(RuntimeError if error.startswith("memstate.norm_sums") else ValueError, match=error):
        opt.step()
    for p, (q, st) in zip(ps, before):
        assert torch.equal(p.detach(), q)
        assert all(torch.equal(opt.state[p][k], v) for k, v in st.items())


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Lion", "LAMB"])
@pytest.mark.parametrize("lazy", ["conj", "neg"])
def test_gradients_with_lazy_conjugate_or_negation_bits_step_as_their_values(name, lazy):
    """``p.grad = g.conj()`` (complex) or a negative view: the step takes the values they stand
    for, bit for bit as the resolved gradient. The kernels' real view of a conjugate gradient
    used to fail (view_as_real of an unresolved conjugate) after the other buckets had stepped;
    a negative view was always resolved (torch's Negative fallback, before the kernel)."""
    kw = {"momentum": 0.9} if name == "SGD" else {}
    dtype = torch.complex64 if lazy == "conj" else torch.float64
    runs = []
    for resolved in (False, True):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3, dtype=dtype))]
        opt = getattr(mo, name)(ps, lr=0.1, **kw)
        for step in range(3):
            ps[0].grad = torch.randn(4)
            g = torch.randn(3, dtype=dtype)
            lazy_g = g.conj() if lazy == "conj" else torch._neg_view(g)
            assert lazy_g.is_conj() or lazy_g.is_neg()
            ps[1].grad = lazy_g.resolve_conj().resolve_neg() if resolved else lazy_g
            opt.step()
        runs.append([p.detach().clone() for p in ps] + [v.clone() for p in ps for v in opt.state[p].values()
                                                         if torch.is_tensor(v)])
    assert all(torch.equal(x, y) for x, y in zip(*runs))
