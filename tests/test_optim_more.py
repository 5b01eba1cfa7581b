"""memstate.optim.RMSprop, Adagrad and Lion (issue 11 item 7): parity with torch.optim (RMSprop,
Adagrad, also torch's fused CPU Adagrad) and with the Lion paper's algorithm, the documented
element math bit for bit on every storage dtype, bitwise determinism across threads / chunk
sizes / ISAs, in-pass fingerprints, state_dict round trips and cross-loading with torch, and
CPU == CUDA (marked cuda)."""
import inspect
import itertools

import numpy as np
import pytest
import torch

import memstate.optim as mo
from memstate import _ext
from test_optim import (ATOL32, RTOL32, SHAPES, assert_bitwise_same, assert_close_to_torch, _assert_cpu_equals_cuda,
                        assert_cuda_equals_cpu_for_every_chunk_size, assert_deterministic_everywhere,
                        assert_resume_is_bitwise, assert_state_dict_interoperates, assert_steps_equal_reference,
                        combo_id, _det_run, leaves, make_grads, make_init, run, set_grads, snapshot, split_groups,
                        state_tensors)

MS = {"RMSprop": mo.RMSprop, "Adagrad": mo.Adagrad, "Lion": mo.Lion}
TORCH = {"RMSprop": torch.optim.RMSprop, "Adagrad": torch.optim.Adagrad}
ALL_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _one_thread_by_default(threads):
    """One intra-op thread unless a test asks for more (as tests/test_optim.py)."""
    threads(1)


def torch_opt(name, groups, **kw):
    if not kw.get("fused"):
        kw.setdefault("foreach", False)
    return TORCH[name](groups, **kw)


def _ids(cases):
    return [f"{n}-{combo_id(h)}" for n, h in cases]


# ----------------------------------------------------------------------------------------- API

@pytest.mark.parametrize("name", ["RMSprop", "Adagrad"])
def test_drop_in_signature_and_defaults(name):
    ms_sig, t_sig = inspect.signature(MS[name].__init__), inspect.signature(TORCH[name].__init__)
    assert set(t_sig.parameters) <= set(ms_sig.parameters)  # every torch argument is accepted
    for n, b in t_sig.parameters.items():
        a = ms_sig.parameters[n]
        assert a.default == b.default and a.kind == b.kind, (n, a, b)
    p = torch.nn.Parameter(torch.zeros(3))
    om, ot = MS[name]([p]), TORCH[name]([p])
    assert {k: v for k, v in om.defaults.items()} == ot.defaults
    assert om.fingerprint is False and om.skip_if_nonfinite is False


def test_lion_defaults():
    p = torch.nn.Parameter(torch.zeros(3))
    o = mo.Lion([p])
    assert o.defaults["lr"] == 1e-4 and o.defaults["betas"] == (0.9, 0.99) and o.defaults["weight_decay"] == 0.0


BAD = [("RMSprop", kw) for kw in (dict(lr=-1.0), dict(eps=-1.0), dict(momentum=-0.1), dict(weight_decay=-1.0),
                                  dict(alpha=-0.5), dict(lr=torch.tensor([0.1, 0.2])))] + \
      [("Adagrad", kw) for kw in (dict(lr=-1.0), dict(lr_decay=-1.0), dict(weight_decay=-1.0),
                                  dict(initial_accumulator_value=-1.0), dict(eps=-1.0))]


@pytest.mark.parametrize("name, kw", BAD, ids=_ids(BAD))
def test_invalid_hyperparameters_raise_torchs_error(name, kw):
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError) as want:
        TORCH[name]([p], **kw)
    with pytest.raises(ValueError) as got:
        MS[name]([p], **kw)
    assert str(got.value) == str(want.value)


@pytest.mark.parametrize("kw", [dict(lr=-1.0), dict(betas=(1.0, 0.99)), dict(betas=(0.9, -0.1)),
                                dict(weight_decay=-1.0)], ids=combo_id)
def test_lion_invalid_hyperparameters(kw):
    with pytest.raises(ValueError):
        mo.Lion([torch.nn.Parameter(torch.zeros(2))], **kw)


@pytest.mark.parametrize("name, kw", [("RMSprop", dict(differentiable=True)), ("RMSprop", dict(capturable=True)),
                                      ("Adagrad", dict(differentiable=True)), ("Lion", dict(differentiable=True))])
def test_unsupported_flags_raise_not_implemented(name, kw):
    with pytest.raises(NotImplementedError, match=list(kw)[0]):
        MS[name]([torch.nn.Parameter(torch.zeros(2))], **kw)


@pytest.mark.parametrize("name, kw", [("RMSprop", dict(foreach=True)), ("Adagrad", dict(fused=True)),
                                      ("Adagrad", dict(foreach=False, fused=False)), ("Lion", dict(fused=True))])
def test_implementation_flags_accepted_and_kept(name, kw):
    o = MS[name]([torch.nn.Parameter(torch.zeros(2))], **kw)
    for k, v in kw.items():
        assert o.param_groups[0][k] == v


def test_sparse_gradients_refused_with_a_clear_error():
    p = torch.nn.Parameter(torch.zeros(4))
    o = mo.Adagrad([p])
    p.grad = torch.sparse_coo_tensor([[1]], [1.0], (4,))
    with pytest.raises(RuntimeError, match="sparse"):
        o.step()
    assert torch.equal(p.detach(), torch.zeros(4)) and float(o.state[p]["step"]) == 0


# ----------------------------------------------------------------------------------------- torch parity

RMSPROP_HP = [dict(lr=1e-2, alpha=alpha, eps=eps, weight_decay=wd, momentum=mom, centered=c, maximize=mx)
              for (alpha, eps), wd, mom, c, mx in itertools.product(((0.99, 1e-8), (0.9, 1e-6)), (0.0, 1e-2),
                                                                    (0.0, 0.9), (False, True), (False, True))]
ADAGRAD_HP = [dict(lr=5e-2, lr_decay=lrd, weight_decay=wd, initial_accumulator_value=iav, eps=eps, maximize=mx)
              for lrd, wd, (iav, eps), mx in itertools.product((0.0, 0.05), (0.0, 1e-2), ((0.0, 1e-10), (0.1, 1e-6)),
                                                               (False, True))]


def _assert_close_scaled(pm, om, pt, ot, rtol, atol, scaled, what):
    """assert_close_to_torch, except that state keys in ``scaled`` get an absolute tolerance of
    ``atol`` times the tensor's largest magnitude (a normwise bound).

    RMSprop's momentum buffer sums terms g / avg of size up to about 1 / sqrt(1 - alpha) (10 to
    30 here) that cancel: one float32 rounding of such a term (~2e-6) is already above
    ATOL32 = 1e-6 for an element that ends up small. torch cannot be matched bit for bit (its
    CPU addcmul / sqrt differ from plain IEEE float32 operations), so elementwise 1e-6 would
    test torch's rounding, not the algorithm; ``_assert_as_accurate_as_torch`` checks the
    buffer's accuracy against float64 instead."""
    strict = {k for k in state_tensors(om) if not k.endswith(scaled)} if scaled else None
    if not scaled:
        return assert_close_to_torch(pm, om, pt, ot, rtol, atol, what)
    for i, (a, b) in enumerate(zip(pm, pt)):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: param {i}: {m}")
    ms, ts = state_tensors(om), state_tensors(ot)
    assert ms.keys() == ts.keys(), what
    for k in ms:
        a, b = ms[k], ts[k]
        if k.endswith(".step"):
            assert float(a) == float(b), f"{what}: {k}"
            continue
        tol = atol if k in strict else atol * max(1.0, b.abs().max().item() if b.numel() else 1.0)
        torch.testing.assert_close(a, b, rtol=rtol, atol=tol, msg=lambda m: f"{what}: {k}: {m}")


def _assert_as_accurate_as_torch(om, ot, o64, keys, what):
    """memstate's float32 state under ``keys`` (all tensors together: a one-element tensor's
    error is one rounding, luck) is within 2x torch's float32 error of a float64 torch run, and
    that error is float32 rounding: below 1e-6 of the largest magnitude."""
    ms, ts, rs = state_tensors(om), state_tensors(ot), state_tensors(o64)
    names = [k for k in ms if k.endswith(keys) and ms[k].numel()]
    if not names:
        return
    flat = lambda d: torch.cat([d[k].double().flatten() for k in names])  # noqa: E731
    ref = flat(rs)
    err_ms, err_t = (flat(ms) - ref).abs().max().item(), (flat(ts) - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    assert err_ms <= 2 * err_t + 1e-7 * scale, f"{what}: memstate {err_ms:.3g} vs torch {err_t:.3g}"
    assert err_ms <= 1e-6 * scale, f"{what}: {err_ms:.3g} (largest value {scale:.3g})"


def _torch_parity(name, hp, steps=12, dtype=torch.float32, tol=(RTOL32, ATOL32), scaled=(), **torch_kw):
    init = make_init(SHAPES, dtype, seed=20)
    grads = make_grads(SHAPES, steps, dtype, seed=21)
    groups = lambda ps: split_groups(ps, [(3, {}), (len(ps) - 3, {"lr": hp["lr"] / 2})])  # noqa: E731
    pm, pt, p64 = leaves(init), leaves(init), leaves([t.double() for t in init])
    om, ot = MS[name](groups(pm), **hp), torch_opt(name, groups(pt), **hp, **torch_kw)
    o64 = torch_opt(name, groups(p64), **hp) if scaled else None
    for i, g in enumerate(grads):
        if i == 5:
            g = [None] + g[1:]  # a parameter without a gradient: its step count stays behind
        set_grads(pm, g)
        set_grads(pt, g)
        om.step()
        ot.step()
        if scaled:
            set_grads(p64, [None if t is None else t.double() for t in g])
            o64.step()
            _assert_as_accurate_as_torch(om, ot, o64, scaled, f"step {i + 1}")
        _assert_close_scaled(pm, om, pt, ot, *tol, scaled, f"step {i + 1}")
    assert not torch.allclose(pm[-1].detach(), init[-1])


@pytest.mark.parametrize("hp", RMSPROP_HP, ids=combo_id)
def test_rmsprop_matches_torch_fp32_every_option(hp):
    _torch_parity("RMSprop", hp, scaled=(".momentum_buffer",))


@pytest.mark.parametrize("hp", ADAGRAD_HP, ids=combo_id)
@pytest.mark.parametrize("fused", [False, True], ids=["torch_for_loop", "torch_fused"])
def test_adagrad_matches_torch_fp32_every_option(hp, fused):
    _torch_parity("Adagrad", hp, **({"fused": True} if fused else {}))


@pytest.mark.parametrize("name, hp", [("RMSprop", RMSPROP_HP[-1]), ("RMSprop", RMSPROP_HP[5]),
                                      ("Adagrad", ADAGRAD_HP[-1])], ids=lambda x: str(x))
def test_float64_matches_torch(name, hp):
    _torch_parity(name, hp, steps=20, dtype=torch.float64, tol=(1e-12, 1e-12))


@pytest.mark.parametrize("name, hp", [("RMSprop", dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=1e-2)),
                                      ("Adagrad", dict(lr=5e-2, lr_decay=0.01, initial_accumulator_value=0.1))])
def test_complex_parameters_match_torch(name, hp):
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(s, dtype=torch.complex64, generator=gen) for s in [(3,), (4, 5)]]
    grads = [[torch.randn(s, dtype=torch.complex64, generator=gen) for s in [(3,), (4, 5)]] for _ in range(6)]
    pm, pt = leaves(init), leaves(init)
    om, ot = MS[name](pm, **hp), torch_opt(name, pt, **hp)
    run(om, pm, grads)
    run(ot, pt, grads)
    assert_close_to_torch(pm, om, pt, ot, RTOL32, ATOL32, name)


class LionPaper:
    """Lion as Algorithm 2 of Chen et al. 2023 ("Symbolic Discovery of Optimization Algorithms"),
    written plainly in float64 with torch ops:
        update = sign(beta1 * m + (1 - beta1) * g)
        theta  = theta - lr * (update + wd * theta)     (decoupled weight decay)
        m      = beta2 * m + (1 - beta2) * g
    """

    def __init__(self, params, lr, betas=(0.9, 0.99), weight_decay=0.0, maximize=False):
        self.params, self.lr, self.betas, self.wd, self.maximize = params, lr, betas, weight_decay, maximize
        self.m = [torch.zeros_like(p, dtype=torch.float64) for p in params]

    def step(self, grads):
        b1, b2 = self.betas
        for p, g, m in zip(self.params, grads, self.m):
            g = g.double() * (-1.0 if self.maximize else 1.0)
            theta = p.detach().double()
            update = torch.sign(b1 * m + (1 - b1) * g)
            theta = theta - self.lr * (update + self.wd * theta)
            m.mul_(b2).add_((1 - b2) * g)
            with torch.no_grad():
                p.copy_(theta)


LION_HP = [dict(lr=1e-3), dict(lr=1e-3, weight_decay=0.1), dict(lr=3e-4, betas=(0.95, 0.98), maximize=True),
           dict(lr=1e-3, betas=(0.0, 0.5), weight_decay=1.0)]


@pytest.mark.parametrize("hp", LION_HP, ids=combo_id)
def test_lion_matches_the_papers_algorithm_float64(hp):
    init = make_init(SHAPES, torch.float64, seed=40)
    grads = make_grads(SHAPES, 20, torch.float64, seed=41)
    pm, pr = leaves(init), leaves(init)
    om, ref = mo.Lion(pm, **hp), LionPaper(pr, **hp)
    for i, g in enumerate(grads):
        set_grads(pm, g)
        om.step()
        ref.step(g)
        for j, (a, b) in enumerate(zip(pm, pr)):
            # the paper's p - lr * (u + wd * p) vs memstate's p * (1 - lr * wd) - lr * u: rounding only
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-14,
                                       msg=lambda m: f"step {i + 1}, param {j}: {m}")
        for j, p in enumerate(pm):
            torch.testing.assert_close(om.state[p]["exp_avg"], ref.m[j], rtol=1e-12, atol=1e-14)
    # it moved by about lr per element per step (a sign update), not by a gradient step
    moved = (pm[-1].detach() - init[-1]).abs().max().item()
    assert moved > 5 * hp["lr"]


def test_lion_float32_follows_the_paper_closely():
    """float32 math against the float64 paper run from the same start: sign flips where
    beta1*m + (1-beta1)*g is within rounding of 0 are rare; elsewhere it agrees to float32
    rounding."""
    hp = dict(lr=1e-3, weight_decay=0.1)
    init = make_init(SHAPES, torch.float32, seed=42)
    grads = make_grads(SHAPES, 10, torch.float32, seed=43)
    pm, pr = leaves(init), leaves([t.double() for t in init])
    om, ref = mo.Lion(pm, **hp), LionPaper(pr, **hp)
    for g in grads:
        set_grads(pm, g)
        om.step()
        ref.step(g)
    diff = torch.cat([(a.detach().double() - b.detach()).abs().flatten() for a, b in zip(pm, pr)])
    assert (diff > 1e-5).float().mean().item() < 1e-3, diff.max()


# ------------------------------------------------------------- documented element math, every dtype

class RefMath:
    """The per-element math documented in csrc/include/memstate/optim_math.h for RMSprop,
    Adagrad and Lion, evaluated with numpy in the math type (float32; float64 for float64
    params; one IEEE rounding per operation, no FMA), host scalars computed in float64 and
    rounded once, state stored in the parameter dtype. Must equal memstate bit for bit."""

    def __init__(self, name, params, **hp):
        self.name, self.params, self.hp = name, params, hp
        self.state = [dict() for _ in params]

    def step(self, grads):
        h = self.hp
        for p, g, st in zip(self.params, grads, self.state):
            M = np.float64 if p.dtype == torch.float64 else np.float32
            s = M

            def load(t):
                return t.detach().to(torch.float64 if M is np.float64 else torch.float32).numpy().astype(M)

            def store(x):
                return torch.from_numpy(np.array(x, dtype=M)).reshape(p.shape).to(p.dtype)

            pm, gm = load(p), load(g)
            gm = -gm if h.get("maximize") else gm
            wd = h.get("weight_decay", 0.0)
            lr = h["lr"]
            if self.name == "RMSprop":
                alpha, mom = h.get("alpha", 0.99), h.get("momentum", 0.0)
                if not st:
                    st["square_avg"] = torch.zeros_like(p)
                    if mom > 0:
                        st["momentum_buffer"] = torch.zeros_like(p)
                    if h.get("centered"):
                        st["grad_avg"] = torch.zeros_like(p)
                if wd != 0:
                    gm = gm + s(wd) * pm
                v = load(st["square_avg"]) * s(alpha) + (s(1.0 - alpha) * gm) * gm
                st["square_avg"] = store(v)
                c = v
                if h.get("centered"):
                    ga = load(st["grad_avg"])
                    ga = ga + s(1.0 - alpha) * (gm - ga)
                    st["grad_avg"] = store(ga)
                    c = v - ga * ga
                avg = np.sqrt(c) + s(h.get("eps", 1e-8))
                if mom > 0:
                    buf = load(st["momentum_buffer"]) * s(mom) + gm / avg
                    st["momentum_buffer"] = store(buf)
                    pm = pm - s(lr) * buf
                else:
                    pm = pm - (s(lr) * gm) / avg
            elif self.name == "Adagrad":
                if not st:
                    st.update(step=0.0, sum=torch.full_like(p, h.get("initial_accumulator_value", 0.0)))
                st["step"] += 1.0
                clr = lr / (1.0 + (st["step"] - 1.0) * h.get("lr_decay", 0.0))
                if wd != 0:
                    gm = gm + s(wd) * pm
                acc = load(st["sum"]) + gm * gm
                st["sum"] = store(acc)
                pm = pm - s(clr) * (gm / (np.sqrt(acc) + s(h.get("eps", 1e-10))))
            else:
                b1, b2 = h.get("betas", (0.9, 0.99))
                if not st:
                    st["exp_avg"] = torch.zeros_like(p)
                m = load(st["exp_avg"])
                if wd != 0:
                    pm = pm * s(1.0 - lr * wd)
                c = s(b1) * m + s(1.0 - b1) * gm
                sgn = np.where(c != c, c, (c > 0).astype(M) - (c < 0).astype(M))
                pm = pm - s(lr) * sgn
                st["exp_avg"] = store(s(b2) * m + s(1.0 - b2) * gm)
            with torch.no_grad():
                p.copy_(store(pm))


REF_CASES = [
    ("RMSprop", dict(lr=1e-2)),
    ("RMSprop", dict(lr=1e-2, momentum=0.9, weight_decay=1e-2, maximize=True)),
    ("RMSprop", dict(lr=1e-2, centered=True, alpha=0.9, eps=1e-6)),
    ("RMSprop", dict(lr=1e-2, centered=True, momentum=0.5, weight_decay=1e-2)),
    ("Adagrad", dict(lr=5e-2)),
    ("Adagrad", dict(lr=5e-2, lr_decay=0.1, weight_decay=1e-2, initial_accumulator_value=0.1, maximize=True)),
    ("Lion", dict(lr=1e-3)),
    ("Lion", dict(lr=1e-3, weight_decay=0.5, betas=(0.8, 0.95), maximize=True)),
]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("name, hp", REF_CASES, ids=_ids(REF_CASES))
def test_bitwise_equal_to_documented_element_math(name, hp, dtype):
    shapes = [(), (7,), (33, 17), (1001,)]
    init = make_init(shapes, dtype, seed=60)
    grads = make_grads(shapes, 10, dtype, seed=61)
    pm = assert_steps_equal_reference(MS[name], RefMath, name, hp, init, grads, dtype)
    assert not torch.equal(pm[-1].detach(), init[-1])


# ------------------------------------------------------------- determinism and in-pass fingerprints

DET_SHAPES = [(), (7,), (3, 5), (1000,), (4099,)]
DET_CASES = [
    ("RMSprop", dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=1e-2)),
    ("RMSprop", dict(lr=1e-2, maximize=True)),
    ("Adagrad", dict(lr=5e-2, lr_decay=0.1, weight_decay=1e-2, initial_accumulator_value=0.1)),
    ("Lion", dict(lr=1e-3, weight_decay=0.1)),
]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("name, hp", DET_CASES, ids=_ids(DET_CASES))
def test_bitwise_deterministic_across_runs_threads_chunks_and_isas(name, hp, dtype, threads):
    assert_deterministic_everywhere(name, hp, dtype, DET_SHAPES, threads)


def test_in_pass_fingerprints_detect_a_changed_update():
    """The fingerprint checks above can fail: a different gradient element gives different
    in-pass fingerprints of the momentum and (for one of +-1000, which decides Lion's sign) of
    the parameter, and leaves the other tensors' fingerprints alone."""
    init = make_init(DET_SHAPES, seed=92)
    grads = make_grads(DET_SHAPES, 2, seed=93)
    a = _det_run("Lion", dict(lr=1e-3), init, grads)
    changed = []
    for big in (1000.0, -1000.0):
        grads[1][3] = grads[1][3].clone()
        grads[1][3][17] = big
        changed.append(_det_run("Lion", dict(lr=1e-3), init, grads))
    assert all(b["in_pass"][3]["exp_avg"] != a["in_pass"][3]["exp_avg"] for b in changed)
    assert any(b["in_pass"][3]["param"] != a["in_pass"][3]["param"] for b in changed)
    assert all(b["in_pass"][2] == a["in_pass"][2] for b in changed)


# ----------------------------------------------------------------------------------------- state dicts

STATE_CASES = [
    ("RMSprop", dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=1e-2)),
    ("RMSprop", dict(lr=1e-2, alpha=0.9)),
    ("Adagrad", dict(lr=5e-2, lr_decay=0.01, initial_accumulator_value=0.1)),
]


@pytest.mark.parametrize("name, kw", STATE_CASES, ids=_ids(STATE_CASES))
@pytest.mark.parametrize("direction", ["torch_to_memstate", "memstate_to_torch"])
def test_state_dict_interoperates_with_torch(name, kw, direction):
    assert_state_dict_interoperates(MS[name], TORCH[name], kw, direction, steps=16, resume_at=8)


@pytest.mark.parametrize("name, kw", STATE_CASES + [("Lion", dict(lr=1e-3, weight_decay=0.1))],
                         ids=_ids(STATE_CASES + [("Lion", dict(lr=1e-3, weight_decay=0.1))]))
def test_resume_from_state_dict_is_bitwise(name, kw):
    assert_resume_is_bitwise(MS[name], kw, 12, "resumed")


@pytest.mark.parametrize("name, kw", STATE_CASES, ids=_ids(STATE_CASES))
def test_state_keys_and_step_as_torch(name, kw):
    init = make_init(SHAPES[:4], seed=36)
    grads = make_grads(SHAPES[:4], 3, seed=37)
    pm, pt = leaves(init), leaves(init)
    om, ot = MS[name](pm, **kw), torch_opt(name, pt, **kw)
    if name == "Adagrad":  # state exists from construction, as torch's
        assert [sorted(om.state[p]) for p in pm] == [sorted(ot.state[p]) for p in pt] == [["step", "sum"]] * 4
    run(om, pm, grads)
    run(ot, pt, grads)
    assert [sorted(om.state[p]) for p in pm] == [sorted(ot.state[p]) for p in pt]
    for p in pm:
        s = om.state[p]["step"]
        assert isinstance(s, torch.Tensor) and s.dtype == torch.float32 and s.dim() == 0 and float(s) == 3.0


def test_load_state_dict_missing_key_raises_and_modifies_nothing():
    p = torch.nn.Parameter(torch.ones(3))
    o = mo.RMSprop([p], momentum=0.9)
    p.grad = torch.ones(3)
    o.step()
    sd = o.state_dict()
    sd["state"][0] = {k: v for k, v in sd["state"][0].items() if k != "momentum_buffer"}  # (live dicts)
    before = o.state[p]["momentum_buffer"].clone()
    with pytest.raises(ValueError, match="momentum_buffer"):
        o.load_state_dict(sd)
    assert torch.equal(o.state[p]["momentum_buffer"], before)


# ----------------------------------------------------------------------------------------- CUDA

CUDA_CASES = DET_CASES + [("RMSprop", dict(lr=1e-2, centered=True))]
CUDA_SHAPES = SHAPES + [(70_001,), (200_003,)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("name, hp", CUDA_CASES, ids=_ids(CUDA_CASES))
def test_cuda_equals_cpu_bitwise(name, hp, dtype):
    init = make_init(CUDA_SHAPES, dtype, seed=200)
    grads = make_grads(CUDA_SHAPES, 30, dtype, seed=201)
    groups = lambda ps: split_groups(ps, [(3, {}), (len(ps) - 3, {"lr": hp["lr"] / 2})])  # noqa: E731
    pc, pg = leaves(init), leaves(init, "cuda")
    oc, og = MS[name](groups(pc), fingerprint=True, **hp), MS[name](groups(pg), fingerprint=True, **hp)
    for step, g in enumerate(grads):
        set_grads(pc, g)
        set_grads(pg, g)
        oc.step()
        og.step()
        if step in (0, 9, 29):
            _assert_cpu_equals_cuda(pc, oc, pg, og, f"{name} {dtype} step {step + 1}")


@pytest.mark.cuda
@pytest.mark.parametrize("name, hp", CUDA_CASES[:4], ids=_ids(CUDA_CASES[:4]))
def test_cuda_equals_cpu_for_every_chunk_size(name, hp):
    assert_cuda_equals_cpu_for_every_chunk_size(MS[name], hp, CUDA_SHAPES)


@pytest.mark.cuda
@pytest.mark.parametrize("name, hp", [("RMSprop", RMSPROP_HP[-1]), ("Adagrad", ADAGRAD_HP[-1])],
                         ids=["RMSprop", "Adagrad"])
def test_cuda_close_to_torch(name, hp):
    init = make_init(SHAPES, seed=220)
    grads = make_grads(SHAPES, 12, seed=221)
    pm, pt = leaves(init, "cuda"), leaves(init, "cuda")
    om, ot = MS[name](pm, **hp), torch_opt(name, pt, **hp)
    run(om, pm, grads)
    run(ot, pt, grads)
    assert_close_to_torch(pm, om, pt, ot, RTOL32, ATOL32, name)


# ----------------------------------------------------------------------------------------- bad input

def test_ops_refuse_bad_arguments_naming_them():
    ops = _ext.ops()
    p, g, s = [torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3)]
    with pytest.raises(RuntimeError, match=r"memstate.lion_step: exp_avgs has 0 tensors"):
        ops.lion_step(p, g, [], 1e-4, 0.9, 0.99, 0.0, False, False)
    with pytest.raises(RuntimeError, match=r"memstate.adagrad_step: state_sums\[0\] has dtype"):
        ops.adagrad_step(p, g, [torch.zeros(3, dtype=torch.float64)], [1.0], 0.1, 0.0, 1e-10, 0.0, False, False)
    with pytest.raises(RuntimeError, match=r"memstate.adagrad_step: steps\[0\] = 0 must be >= 1"):
        ops.adagrad_step(p, g, s, [0.0], 0.1, 0.0, 1e-10, 0.0, False, False)
    with pytest.raises(RuntimeError, match=r"memstate.rmsprop_step: grad_avgs\[0\] has shape"):
        ops.rmsprop_step(p, g, s, [], [torch.zeros(4)], 0.1, 0.99, 1e-8, 0.0, 0.0, True, False, False)
    with pytest.raises(RuntimeError, match=r"memstate.rmsprop_step: momentum_buffers has 0 tensors"):
        ops.rmsprop_step(p, g, s, [], [], 0.1, 0.99, 1e-8, 0.0, 0.9, False, False, False)
    with pytest.raises(RuntimeError, match=r"exp_avgs\[0\] is the same memory as params\[0\]"):
        ops.lion_step(p, g, p, 1e-4, 0.9, 0.99, 0.0, False, False)  # the param is its own momentum
    assert torch.equal(p[0], torch.zeros(3)) and torch.equal(s[0], torch.zeros(3))
    # momentum == 0 ignores momentum_buffers, centered=False ignores grad_avgs (as sgd_step)
    ops.rmsprop_step(p, g, s, [torch.zeros(5)], [torch.zeros(5)], 0.1, 0.99, 1e-8, 0.0, 0.0, False, False, False)


def test_bad_state_is_refused_before_anything_changes():
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    o = mo.Adagrad([p, q])
    o.state[q]["sum"] = torch.zeros(5)
    p.grad, q.grad = torch.ones(3), torch.ones(2)
    with pytest.raises(ValueError, match=r"state 'sum' of parameter 1"):
        o.step()
    assert torch.equal(p.detach(), torch.ones(3)) and float(o.state[p]["step"]) == 0


@pytest.mark.parametrize("name, kw", [("RMSprop", dict(lr=1e-2, momentum=0.9, centered=True)),
                                      ("Adagrad", dict(lr=5e-2, lr_decay=0.1)), ("Lion", dict(lr=1e-3))])
def test_deepcopy_steps_identically(name, kw):
    import copy
    init = make_init(SHAPES[:4], seed=38)
    grads = make_grads(SHAPES[:4], 4, seed=39)
    pa = leaves(init)
    a = run(MS[name](pa, fingerprint=True, **kw), pa, grads[:2])
    b = copy.deepcopy(a)
    pb = [q for g in b.param_groups for q in g["params"]]
    run(a, pa, grads[2:])
    run(b, pb, grads[2:])
    assert b.fingerprint is True
    assert_bitwise_same(snapshot(pa, a), snapshot(pb, b), "deepcopy")
