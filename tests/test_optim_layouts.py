"""memstate.optim on the layouts and dtypes torch.optim supports (issue 11, item 4): complex
parameters, dense non-contiguous parameters (channels_last), other strided parameters, sparse
SGD gradients; their in-pass fingerprints; refused sparse cases leave everything untouched."""
import copy

import pytest
import torch
from torch.nn import Parameter

import memstate
import memstate.optim as mo

MS = {"SGD": mo.SGD, "Adam": mo.Adam, "AdamW": mo.AdamW}
TORCH = {"SGD": torch.optim.SGD, "Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}
HP = {"SGD": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
      "Adam": dict(lr=1e-2, weight_decay=1e-2, amsgrad=True), "AdamW": dict(lr=1e-2, maximize=True)}
RTOL32, ATOL32 = 1e-5, 1e-6  # as tests/test_optim.py


@pytest.fixture(autouse=True)
def _one_thread(threads):
    threads(1)


def _run(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


def _grads(seed, shapes, steps, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=dtype) for s in shapes] for _ in range(steps)]


def _bits(t):
    t = torch.view_as_real(t) if t.is_complex() else t
    return t.detach().contiguous().view(-1).view(torch.uint8)


def _state(opt, p):
    return {k: v for k, v in opt.state[p].items()}


def _assert_same_bits(xs, ys, what):
    for i, (x, y) in enumerate(zip(xs, ys)):
        assert x.numel() * x.element_size() == y.numel() * y.element_size() and torch.equal(_bits(x), _bits(y)), \
            f"{what}: {i}"


# ------------------------------------------------------------------------------------- channels_last
@pytest.mark.parametrize("name", list(MS))
def test_channels_last_parameters_update_in_place_like_their_contiguous_twin(name):
    """A channels_last conv weight is stepped in memory order: values bitwise those of a
    row-major copy, layout kept (state buffers in torch's preserve_format layout), fingerprints
    msfp1 of the logical row-major bytes, close to torch.optim."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(8, 3, 5, 5, generator=gen)
    shapes = [(8, 3, 5, 5), (8,)]
    grads = _grads(2, shapes, 6)
    for gs in grads:  # channels_last gradients, as autograd gives for a channels_last weight
        gs[0] = gs[0].contiguous(memory_format=torch.channels_last)
    b = torch.randn(8, generator=gen)
    pc = [Parameter(w.contiguous(memory_format=torch.channels_last)), Parameter(b.clone())]
    pr = [Parameter(w.clone()), Parameter(b.clone())]
    pt = [Parameter(w.contiguous(memory_format=torch.channels_last)), Parameter(b.clone())]
    data_ptr = pc[0].data_ptr()
    oc, orow = MS[name](pc, fingerprint=True, **HP[name]), MS[name](pr, fingerprint=True, **HP[name])
    ot = TORCH[name](pt, foreach=False, **HP[name])
    for step, gs in enumerate(grads):
        for ps in (pc, pr, pt):
            for p, g in zip(ps, gs):
                p.grad = g.clone() if step % 2 or ps is not pr else g.contiguous()
        for o in (oc, orow, ot):
            o.step()
        assert oc.fingerprints(pc[0]) == orow.fingerprints(pr[0])
        assert oc.fingerprints(pc[0])["param"] == memstate.fingerprint(pc[0].detach())
    assert pc[0].is_contiguous(memory_format=torch.channels_last) and pc[0].data_ptr() == data_ptr
    _assert_same_bits(pc, pr, "params")
    for (k, v), (k2, v2), (k3, v3) in zip(_state(oc, pc[0]).items(), _state(orow, pr[0]).items(),
                                          _state(ot, pt[0]).items()):
        assert k == k2 == k3
        _assert_same_bits([v], [v2], k)
        assert v.stride() == v3.stride(), k  # torch's layout
        if k != "step":
            torch.testing.assert_close(v, v3, rtol=RTOL32, atol=ATOL32)
    for a, b_ in zip(pc, pt):
        torch.testing.assert_close(a.detach(), b_.detach(), rtol=RTOL32, atol=ATOL32)
    # the state fingerprint equals fingerprint_state taken after the step (logical bytes)
    sf = oc.state_fingerprint()
    full = memstate.fingerprint_state(oc)
    shared = [k for k in full if k in set(sf)]
    assert shared and all(sf[k] == full[k] for k in shared)


@pytest.mark.parametrize("name", list(MS))
def test_row_major_gradient_of_channels_last_parameter_and_loaded_state(name):
    """A gradient in another layout is read in logical order; a state dict saved with row-major
    buffers (e.g. by a run with contiguous weights) loads into channels_last parameters."""
    w = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(3))
    grads = _grads(4, [(4, 2, 3, 3)], 5)
    pa = [Parameter(w.contiguous(memory_format=torch.channels_last))]
    pb = [Parameter(w.clone())]
    oa, ob = MS[name](pa, **HP[name]), MS[name](pb, **HP[name])
    _run(oa, pa, grads[:2])  # row-major gradients for a channels_last parameter
    _run(ob, pb, grads[:2])
    _assert_same_bits(pa, pb, "after row-major grads")
    oa.load_state_dict(copy.deepcopy(ob.state_dict()))  # row-major buffers into channels_last params
    for v in oa.state[pa[0]].values():
        if v.dim() == 4:
            assert v.is_contiguous(memory_format=torch.channels_last)
    _run(oa, pa, grads[2:])
    _run(ob, pb, grads[2:])
    _assert_same_bits(pa, pb, "after load")


@pytest.mark.parametrize("name", list(MS))
def test_strided_slice_parameters_step_like_a_contiguous_copy(name):
    """Not dense (every other element of a larger tensor): stepped through a row-major copy that is
    written back; the other elements of the storage are never touched."""
    base = torch.randn(6, 5, 2, generator=torch.Generator().manual_seed(5))
    keep = base[..., 1].clone()
    ps, pc = [Parameter(base[..., 0])], [Parameter(base[..., 0].contiguous())]
    assert ps[0].data_ptr() == base.data_ptr()
    grads = _grads(6, [(6, 5)], 5)
    os_, oc = MS[name](ps, fingerprint=True, **HP[name]), MS[name](pc, fingerprint=True, **HP[name])
    for gs in grads:
        for o, p in ((os_, ps), (oc, pc)):
            p[0].grad = gs[0].clone()
            o.step()
        assert os_.fingerprints(ps[0]) == oc.fingerprints(pc[0])
    _assert_same_bits(ps, pc, "params")
    assert torch.equal(base[..., 0], ps[0].detach()) and torch.equal(base[..., 1], keep)


# ------------------------------------------------------------------------------------- complex
@pytest.mark.parametrize("name", list(MS))
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
def test_complex_parameters_fingerprint_their_complex_bytes(name, dtype):
    gen = torch.Generator().manual_seed(7)
    shapes = [(4, 3), (5,), ()]
    init = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    grads = _grads(8, shapes, 4, dtype)
    pc, pr = [Parameter(t.clone()) for t in init], [Parameter(torch.view_as_real(t).clone()) for t in init]
    pt = [Parameter(t.clone()) for t in init]
    oc, orr = MS[name](pc, fingerprint=True, **HP[name]), MS[name](pr, fingerprint=True, **HP[name])
    ot = TORCH[name](pt, foreach=False, **HP[name])
    for gs in grads:
        for p, q, t, g in zip(pc, pr, pt, gs):
            p.grad, q.grad, t.grad = g.clone(), torch.view_as_real(g).clone(), g.clone()
        oc.step()
        orr.step()
        ot.step()
        for p, q in zip(pc, pr):
            fc, fr = oc.fingerprints(p), orr.fingerprints(q)
            assert fc == fr  # the same bytes
            assert fc["param"] == memstate.fingerprint(p.detach())
            assert fc["grad"] == memstate.fingerprint(p.grad)
    _assert_same_bits(pc, pr, "params")
    for p, t in zip(pc, pt):
        assert all(v.dtype == ot.state[t][k].dtype for k, v in oc.state[p].items())
        torch.testing.assert_close(p.detach(), t.detach(), rtol=RTOL32, atol=ATOL32)


def test_complex_state_dict_round_trip_and_real_state_refused():
    p = Parameter(torch.randn(3, dtype=torch.complex64))
    opt = mo.Adam([p], lr=1e-2)
    p.grad = torch.randn(3, dtype=torch.complex64)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    q = Parameter(p.detach().clone())
    o2 = mo.Adam([q], lr=1e-2)
    o2.load_state_dict(copy.deepcopy(sd))
    for o, x in ((opt, p), (o2, q)):
        x.grad = torch.ones(3, dtype=torch.complex64)
        o.step()
    _assert_same_bits([p], [q], "after load")
    sd["state"][0]["exp_avg"] = torch.zeros(3)  # real state for a complex parameter
    with pytest.raises(ValueError, match="exp_avg.*complex"):
        o2.load_state_dict(sd)


# ------------------------------------------------------------------------------------- sparse SGD
SPARSE_HP = [dict(lr=0.1), dict(lr=0.1, maximize=True), dict(lr=0.1, momentum=0.9),
             dict(lr=0.1, momentum=0.9, dampening=0.3), dict(lr=torch.tensor(0.05), momentum=0.5, nesterov=True)]


def _sparse_grads(seed, steps, coalesced):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        idx = torch.randint(0, 20, (1, 12), generator=gen)
        g = torch.sparse_coo_tensor(idx, torch.randn(12, 4, generator=gen), (20, 4))
        out.append(g.coalesce() if coalesced else g)
    return out


@pytest.mark.parametrize("hp", SPARSE_HP, ids=lambda h: "-".join(f"{k}={float(v)}" for k, v in h.items()))
def test_sparse_sgd_equals_torch_bitwise_for_coalesced_gradients(hp):
    init = torch.randn(20, 4, generator=torch.Generator().manual_seed(9))
    pm, pt = Parameter(init.clone()), Parameter(init.clone())
    om, ot = mo.SGD([pm], fingerprint=True, **hp), torch.optim.SGD([pt], foreach=False, **hp)
    for g in _sparse_grads(10, 6, coalesced=True):
        pm.grad, pt.grad = g.clone(), g.clone()
        om.step()
        ot.step()
        fps = om.fingerprints(pm)
        assert fps["param"] == memstate.fingerprint(pm.detach())
        assert fps["grad"] == memstate.fingerprint(g.to_dense())
        if "momentum" in hp:
            assert fps["momentum_buffer"] == memstate.fingerprint(om.state[pm]["momentum_buffer"].to_dense())
    assert torch.equal(pm, pt)
    if "momentum" in hp:
        assert om.state[pm]["momentum_buffer"].is_sparse  # as torch keeps it
        torch.testing.assert_close(om.state[pm]["momentum_buffer"].to_dense(), ot.state[pt]["momentum_buffer"].to_dense(),
                                   rtol=0, atol=0)


def test_sparse_sgd_is_deterministic_and_close_to_torch_for_uncoalesced_gradients(threads):
    grads = _sparse_grads(11, 8, coalesced=False)
    init = torch.randn(20, 4, generator=torch.Generator().manual_seed(12))
    runs = []
    for n in (1, 2, 1):
        threads(n)
        p = Parameter(init.clone())
        opt = mo.SGD([p], lr=0.1, momentum=0.9)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        runs.append(p.detach().clone())
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    pt = Parameter(init.clone())
    ot = torch.optim.SGD([pt], lr=0.1, momentum=0.9)
    for g in grads:
        pt.grad = g.clone()
        ot.step()
    torch.testing.assert_close(runs[0], pt.detach(), rtol=RTOL32, atol=ATOL32)


def test_sparse_and_dense_gradients_in_one_step():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    lin = torch.nn.Linear(3, 2)
    embt, lint = copy.deepcopy(emb), copy.deepcopy(lin)
    om = mo.SGD([*emb.parameters(), *lin.parameters()], lr=0.1, momentum=0.9)
    ot = torch.optim.SGD([*embt.parameters(), *lint.parameters()], lr=0.1, momentum=0.9, foreach=False)
    for i in range(4):
        idx = torch.tensor([1, 4, 7, 1 + i])
        for e, l_, o in ((emb, lin, om), (embt, lint, ot)):
            o.zero_grad()
            l_(e(idx)).sum().backward()
            o.step()
    torch.testing.assert_close(emb.weight.detach(), embt.weight.detach(), rtol=RTOL32, atol=ATOL32)
    torch.testing.assert_close(lin.weight.detach(), lint.weight.detach(), rtol=RTOL32, atol=ATOL32)


@pytest.mark.parametrize("hp", [dict(lr=0.1, weight_decay=0.1), dict(lr=0.1, momentum=0.9, nesterov=True)])
def test_sparse_gradient_cases_torch_cannot_step_are_refused_first(hp):
    """torch.optim.SGD fails inside its step (add(sparse, dense)); memstate refuses before any
    parameter of the step is modified."""
    emb_w = Parameter(torch.randn(10, 3))
    dense = Parameter(torch.randn(4))
    opt = mo.SGD([dense, emb_w], **hp)
    if hp.get("nesterov"):  # a dense momentum buffer from an earlier dense step
        emb_w.grad, dense.grad = torch.randn(10, 3), torch.randn(4)
        opt.step()
    before = [dense.detach().clone(), emb_w.detach().clone()]
    emb_w.grad = torch.sparse_coo_tensor(torch.tensor([[1, 2]]), torch.randn(2, 3), (10, 3))
    dense.grad = torch.randn(4)
    with pytest.raises(RuntimeError, match=r"sparse gradient.*param_groups\[0\]\['params'\]\[1\]|parameter 1.*sparse"):
        opt.step()
    assert torch.equal(before[0], dense.detach()) and torch.equal(before[1], emb_w.detach())


# ------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("name", list(MS))
def test_cuda_layouts_equal_cpu_bitwise(name):
    """channels_last, complex and strided parameters: CUDA steps and fingerprints equal the CPU's."""
    gen = torch.Generator().manual_seed(13)
    init = [torch.randn(8, 3, 5, 5, generator=gen).contiguous(memory_format=torch.channels_last),
            torch.randn(6, 4, generator=gen, dtype=torch.complex64),
            torch.randn(6, 5, 2, generator=gen)[..., 0]]
    grads = [[torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in init] for _ in range(4)]
    runs = []
    for device in ("cpu", "cuda"):
        ps = [Parameter(t.to(device)) for t in init]  # .to keeps channels_last; the slice becomes contiguous on cuda
        if device == "cuda":
            ps[2] = Parameter(init[2].to(device).new_empty((6, 5, 2))[..., 0].copy_(init[2].to(device)))
        opt = MS[name](ps, fingerprint=True, **HP[name])
        fps = []
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.to(device)
            opt.step()
            fps.append([opt.fingerprints(p) for p in ps])
        runs.append(([p.detach().cpu() for p in ps], fps))
    _assert_same_bits(runs[0][0], runs[1][0], "cpu vs cuda")
    assert runs[0][1] == runs[1][1]
