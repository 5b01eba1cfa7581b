"""memstate.optim.LAMB (issue 11 item 7): Apex FusedLAMB's algorithm against a float64 reference
written from Apex's source, hand-checked trust-ratio special cases, bitwise determinism across
threads / chunk sizes / ISAs, in-pass fingerprints, state_dict round trips, bad arguments, the
lamb_step op's fake (opcheck), and CPU == CUDA (marked cuda)."""
import copy
import inspect
import io
import itertools
import math
import pickle

import pytest
import torch
from torch.library import opcheck

import memstate
import memstate.optim as mo
from memstate import _ext
from test_optim import (assert_bitwise_same, _assert_cpu_equals_cuda, assert_cuda_equals_cpu_for_every_chunk_size,
                        combo_id, leaves, make_grads, make_init, run, set_grads, snapshot, split_groups)

SHAPES = [(), (1,), (7,), (3, 5), (33, 17), (1000,), (2, 3, 13)]


@pytest.fixture(autouse=True)
def _one_thread_by_default(threads):
    threads(1)


# ----------------------------------------------------------------------------------------- reference

class RefLAMB:
    """Apex FusedLAMB (apex/optimizers/fused_lamb.py, csrc/multi_tensor_lamb.cu) in plain torch
    float64, one parameter at a time; per-parameter step counters (memstate's state layout)."""

    def __init__(self, params, groups_hp, max_grad_norm=1.0):
        self.groups = [(ps, hp) for ps, hp in zip(params, groups_hp)]
        self.max_grad_norm = max_grad_norm
        self.state = {}

    def step(self, grads):
        """grads: per group, a list of float64 tensors (None: no gradient)."""
        flat = [g for gs in grads for g in gs if g is not None]
        norm = math.sqrt(sum(float((g * g).sum()) for g in flat))
        div = norm / self.max_grad_norm if self.max_grad_norm is not None and norm > self.max_grad_norm else 1.0
        for (ps, hp), gs in zip(self.groups, grads):
            b1, b2 = hp["betas"]
            wd, lr, eps = hp["weight_decay"], hp["lr"], hp["eps"]
            for p, g in zip(ps, gs):
                if g is None:
                    continue
                st = self.state.setdefault(id(p), {"step": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p)})
                st["step"] += 1
                t = st["step"]
                g = g / div
                if not hp["adam_w_mode"] and wd != 0:
                    g = g + wd * p
                beta3 = 1 - b1 if hp["grad_averaging"] else 1.0
                st["m"] = st["m"] * b1 + beta3 * g
                st["v"] = st["v"] * b2 + (1 - b2) * g * g
                bc1 = 1 - b1 ** t if hp["bias_correction"] else 1.0
                bc2 = 1 - b2 ** t if hp["bias_correction"] else 1.0
                u = (st["m"] / bc1) / ((st["v"] / bc2).sqrt() + eps)
                if hp["adam_w_mode"] and wd != 0:
                    u = u + wd * p
                pn, un = float(p.norm()), float(u.norm())
                ratio = lr * pn / un if (hp["use_nvlamb"] or wd != 0) and pn != 0 and un != 0 else lr
                p.sub_(ratio * u)


LAMB_DEFAULTS = dict(lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                     grad_averaging=True, adam_w_mode=True, use_nvlamb=False)

OPTIONS = [dict(LAMB_DEFAULTS, lr=2e-2, adam_w_mode=aw, grad_averaging=ga, bias_correction=bc, use_nvlamb=nv,
                weight_decay=wd)
           for aw, ga, bc, nv, wd in itertools.product((True, False), (True, False), (True, False), (False, True),
                                                       (0.0, 0.05))
           if not (wd == 0.0 and not aw)]  # L2 mode with wd = 0 is adam_w_mode with wd = 0


def _ref_run(init, grads, hp, second, max_grad_norm):
    ps = [t.detach().to(torch.float64).clone() for t in init]
    ref = RefLAMB([ps[:3], ps[3:]], [hp, dict(hp, **second)], max_grad_norm)
    for step_grads in grads:
        g64 = [None if g is None else g.to(torch.float64) for g in step_grads]
        ref.step([g64[:3], g64[3:]])
    return ps, ref


def _ms_run(init, grads, hp, second, max_grad_norm, **kw):
    ps = leaves(init)
    opt = mo.LAMB(split_groups(ps, [(3, {}), (len(ps) - 3, second)]), max_grad_norm=max_grad_norm, **hp, **kw)
    run(opt, ps, grads)
    return ps, opt


# Tolerance for float32 against the float64 reference. Each step computes u with about ten
# float32 operations per element (relative error <= ~10 * 2^-24 = 6e-7 each), and the step
# lr * ||p|| / ||u|| from float64 norms of float32-stored values (relative error ~1e-7). The
# update lr * ratio * u is ~lr * ||p|| / sqrt(n) per element, so its rounding error adds at most
# ~1e-6 * lr * |p| per step to a parameter, and the float32 rounding of p itself 6e-8 * |p|:
# over 12 steps with lr <= 2e-2 that is below 1e-6 relative. The moments m, v carry their own
# float32 rounding (a few ulps after 12 steps): rtol 1e-5 with atol 1e-6 (elements near zero)
# covers all of this with a margin and is the tolerance of memstate's other float32 parity tests.
RTOL32, ATOL32 = 1e-5, 1e-6


def _compare(ps, opt, ref_ps, ref, rtol, atol, what):
    for i, (a, b) in enumerate(zip(ps, ref_ps)):
        torch.testing.assert_close(a.detach().to(torch.float64), b, rtol=rtol, atol=atol,
                                   msg=lambda m: f"{what}: param {i}: {m}")
        st = ref.state[id(b)]
        torch.testing.assert_close(opt.state[a]["exp_avg"].to(torch.float64), st["m"], rtol=rtol, atol=atol,
                                   msg=lambda m: f"{what}: exp_avg {i}: {m}")
        torch.testing.assert_close(opt.state[a]["exp_avg_sq"].to(torch.float64), st["v"], rtol=rtol, atol=atol,
                                   msg=lambda m: f"{what}: exp_avg_sq {i}: {m}")
        assert float(opt.state[a]["step"]) == st["step"]


@pytest.mark.parametrize("hp", OPTIONS, ids=combo_id)
def test_matches_float64_reference_fp32(hp):
    init = make_init(SHAPES, seed=1)
    grads = make_grads(SHAPES, 12, seed=2)
    grads[3][4] = None  # a parameter without a gradient on one step (Apex skips it)
    second = {"lr": hp["lr"] / 2}
    for max_grad_norm in (None, 5.0):  # the gradients' norm is ~38: 5.0 clips every step
        ps, opt = _ms_run(init, grads, hp, second, max_grad_norm)
        ref_ps, ref = _ref_run(init, grads, hp, second, max_grad_norm)
        _compare(ps, opt, ref_ps, ref, RTOL32, ATOL32, f"max_grad_norm={max_grad_norm}")
        # the update moved the parameters (the comparison is not of unchanged tensors)
        assert not torch.allclose(ps[5].detach(), init[5], rtol=1e-3, atol=1e-3)


def test_matches_float64_reference_fp64_to_rounding():
    """float64 parameters run the same math in float64: equal to the reference up to rounding
    of a few operations per step."""
    init = make_init(SHAPES, torch.float64, seed=3)
    grads = make_grads(SHAPES, 10, torch.float64, seed=4)
    for hp in OPTIONS[::3]:
        ps, opt = _ms_run(init, grads, hp, {"weight_decay": 0.0}, 5.0)
        ref_ps, ref = _ref_run(init, grads, hp, {"weight_decay": 0.0}, 5.0)
        _compare(ps, opt, ref_ps, ref, 1e-12, 1e-14, combo_id(hp))


def test_clipping_and_options_change_the_result():
    """The parity tests can fail: clipping, adam_w_mode and use_nvlamb each change the result
    beyond the tolerance (so a kernel that ignored one would be caught)."""
    init = make_init(SHAPES, seed=5)
    grads = make_grads(SHAPES, 6, seed=6)
    hp0 = dict(LAMB_DEFAULTS, lr=2e-2, weight_decay=0.05)
    no_wd = dict(hp0, weight_decay=0.0)
    for (hp_a, hp_b), mgn in (((hp0, hp0), 5.0), ((hp0, dict(hp0, adam_w_mode=False)), None),
                              ((hp0, dict(hp0, grad_averaging=False)), None),
                              ((hp0, dict(hp0, bias_correction=False)), None),
                              ((no_wd, dict(no_wd, use_nvlamb=True)), None)):
        base, _ = _ms_run(init, grads, hp_a, {}, None)
        other, _ = _ms_run(init, grads, hp_b, {}, mgn)
        assert not all(torch.allclose(a, b, rtol=RTOL32, atol=ATOL32) for a, b in zip(base, other)), combo_id(hp_b)


# ----------------------------------------------------------------------------------------- special cases

def _one_step(p0, g, **kw):
    p = torch.nn.Parameter(torch.tensor(p0, dtype=torch.float64))
    opt = mo.LAMB([p], max_grad_norm=None, **kw)
    p.grad = torch.tensor(g, dtype=torch.float64)
    opt.step()
    return p.detach()


def test_trust_ratio_special_cases_by_hand():
    """Step 1 with eps=0: m/bc1 = g and v/bc2 = g^2, so u = sign(g) (+ weight_decay * p)."""
    lr = 0.1
    kw = dict(lr=lr, eps=0.0)
    # weight_decay = 0 and use_nvlamb=False: no trust ratio, p -= lr * u
    got = _one_step([3.0, 4.0], [2.0, -0.5], weight_decay=0.0, **kw)
    torch.testing.assert_close(got, torch.tensor([3.0 - lr, 4.0 + lr], dtype=torch.float64), rtol=0, atol=1e-15)
    # use_nvlamb=True: trust ratio ||p|| / ||u|| = 5 / sqrt(2) even without weight decay
    got = _one_step([3.0, 4.0], [2.0, -0.5], weight_decay=0.0, use_nvlamb=True, **kw)
    r = lr * 5.0 / math.sqrt(2.0)
    torch.testing.assert_close(got, torch.tensor([3.0 - r, 4.0 + r], dtype=torch.float64), rtol=0, atol=1e-15)
    # weight decay 0.1 (adam_w_mode): u = sign(g) + 0.1 p = (1.3, -0.6), ratio 5 / ||u||
    got = _one_step([3.0, 4.0], [2.0, -0.5], weight_decay=0.1, **kw)
    u = torch.tensor([1.3, -0.6], dtype=torch.float64)
    want = torch.tensor([3.0, 4.0], dtype=torch.float64) - lr * 5.0 / math.sqrt(1.3 ** 2 + 0.6 ** 2) * u
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    # zero weights: ||p|| = 0, so the ratio is 1 (p = -lr * u), with and without use_nvlamb
    for nv in (False, True):
        got = _one_step([0.0, 0.0], [2.0, -0.5], weight_decay=0.1, use_nvlamb=nv, **kw)
        torch.testing.assert_close(got, torch.tensor([-lr, lr], dtype=torch.float64), rtol=0, atol=1e-15)
    # zero gradient (eps > 0, else 0 / 0): u = 0 / eps + weight_decay * p, ratio ||p|| / ||0.1 p|| = 10
    got = _one_step([3.0, 4.0], [0.0, 0.0], lr=lr, weight_decay=0.1)
    torch.testing.assert_close(got, torch.tensor([3.0, 4.0], dtype=torch.float64) * (1 - lr * 10 * 0.1),
                               rtol=0, atol=1e-15)
    # zero gradient, zero weight decay: u = 0, ||u|| = 0, ratio 1: nothing moves
    got = _one_step([3.0, 4.0], [0.0, 0.0], lr=lr, weight_decay=0.0, use_nvlamb=True)
    assert torch.equal(got, torch.tensor([3.0, 4.0], dtype=torch.float64))


def test_global_clipping_by_hand():
    """||g|| = 5 > max_grad_norm = 2: the gradient is divided by 2.5 inside the kernel (Apex) and
    p.grad is left as it was; last_grad_norm is the pre-clip norm."""
    p = torch.nn.Parameter(torch.tensor([1.0, 1.0], dtype=torch.float64))
    opt = mo.LAMB([p], lr=0.1, eps=0.0, weight_decay=0.0, max_grad_norm=2.0, grad_averaging=False,
                  bias_correction=False)
    p.grad = torch.tensor([3.0, 4.0], dtype=torch.float64)
    opt.step()
    assert torch.equal(p.grad, torch.tensor([3.0, 4.0], dtype=torch.float64))
    assert float(opt.last_grad_norm) == 5.0
    assert torch.equal(opt.state[p]["exp_avg"], torch.tensor([1.2, 1.6], dtype=torch.float64))
    v = torch.tensor([1.2 ** 2, 1.6 ** 2], dtype=torch.float64) * (1 - 0.999)
    torch.testing.assert_close(opt.state[p]["exp_avg_sq"], v, rtol=1e-15, atol=0)


def test_gradients_are_not_modified():
    init = make_init(SHAPES, seed=7)
    grads = make_grads(SHAPES, 1, seed=8)[0]
    ps = leaves(init)
    opt = mo.LAMB(ps, max_grad_norm=1.0)
    set_grads(ps, grads)
    before = [p.grad.clone() for p in ps]
    opt.step()
    assert all(torch.equal(p.grad, b) for p, b in zip(ps, before))


# ----------------------------------------------------------------------------------------- determinism

DET_SHAPES = SHAPES + [(40_000,), (70_001,)]


def _det_run(hp, init, grads):
    params = leaves(init)
    opt = mo.LAMB(split_groups(params, [(2, {}), (len(params) - 2, {"lr": hp["lr"] / 3})]),
                  fingerprint=True, **hp)
    run(opt, params, grads)
    snap = snapshot(params, opt)
    snap["in_pass"] = [opt.fingerprints(p) for p in params]
    snap["norm"] = opt.last_grad_norm.clone()
    for p, fps in zip(params, snap["in_pass"]):
        assert set(fps) == {"param", "grad", "exp_avg", "exp_avg_sq", "step"}
        assert fps["param"] == memstate.fingerprint(p) and fps["grad"] == memstate.fingerprint(p.grad)
        for k, v in opt.state[p].items():
            assert fps[k] == memstate.fingerprint(v), k
    return snap


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float16], ids=str)
def test_bitwise_deterministic_across_threads_chunks_and_isas(dtype, threads):
    C = _ext.load()
    isas = C.build_info()["cpu_isas"].split(",")
    hp = dict(lr=1e-2, weight_decay=0.01, max_grad_norm=10.0)
    init = make_init(DET_SHAPES, dtype, seed=90)
    grads = make_grads(DET_SHAPES, 3, dtype, seed=91)
    chunk_before = C.optim_chunk_elems()
    try:
        C.set_cpu_isa("scalar")
        base = _det_run(hp, init, grads)
        for n_threads, chunks in ((1, (8, 1000, 1 << 20)), (2, (8, 16384))):
            threads(n_threads)
            for chunk in chunks:
                C.set_optim_chunk_elems(chunk)
                for isa in isas:
                    C.set_cpu_isa(isa)
                    got = _det_run(hp, init, grads)
                    what = f"threads={n_threads} chunk={chunk} isa={isa}"
                    assert_bitwise_same(base, got, what)
                    assert got["in_pass"] == base["in_pass"], what
                    assert torch.equal(got["norm"], base["norm"]), what
    finally:
        C.set_optim_chunk_elems(chunk_before)
        C.set_cpu_isa("auto")
    assert not torch.equal(base["params"][-1], init[-1])


def test_in_pass_fingerprints_detect_a_changed_gradient():
    init = make_init(SHAPES, seed=92)
    grads = make_grads(SHAPES, 2, seed=93)
    hp = dict(lr=1e-2)
    a = _det_run(hp, init, grads)
    grads[1][3] = grads[1][3].clone()
    grads[1][3][1, 2] += 1.0
    b = _det_run(hp, init, grads)
    assert b["in_pass"][3]["grad"] != a["in_pass"][3]["grad"]
    assert b["in_pass"][3]["param"] != a["in_pass"][3]["param"]


def test_complex_parameters_step_as_their_real_view():
    """As torch.optim: a complex parameter is updated as view_as_real of it, and its norms are
    |z|^2 sums, the same as the real view's."""
    gen = torch.Generator().manual_seed(11)
    z0 = torch.randn(4, 5, dtype=torch.complex64, generator=gen)
    gz = [torch.randn(4, 5, dtype=torch.complex64, generator=gen) for _ in range(3)]
    pz = torch.nn.Parameter(z0.clone())
    pr = torch.nn.Parameter(torch.view_as_real(z0).clone())
    oz, orr = mo.LAMB([pz], lr=1e-2), mo.LAMB([pr], lr=1e-2)
    for g in gz:
        pz.grad, pr.grad = g.clone(), torch.view_as_real(g).clone()
        oz.step()
        orr.step()
    assert torch.equal(torch.view_as_real(pz.detach()), pr.detach())
    assert torch.equal(torch.view_as_real(oz.state[pz]["exp_avg_sq"]), orr.state[pr]["exp_avg_sq"])


def test_channels_last_parameters_train_like_contiguous():
    gen = torch.Generator().manual_seed(12)
    x0 = torch.randn(2, 3, 4, 5, generator=gen)
    gs = [torch.randn(2, 3, 4, 5, generator=gen) for _ in range(3)]
    pc = torch.nn.Parameter(x0.clone())
    pl = torch.nn.Parameter(x0.clone().to(memory_format=torch.channels_last))
    oc, ol = mo.LAMB([pc], lr=1e-2, fingerprint=True), mo.LAMB([pl], lr=1e-2, fingerprint=True)
    for g in gs:
        pc.grad, pl.grad = g.clone(), g.clone().to(memory_format=torch.channels_last)
        oc.step()
        ol.step()
    assert pl.is_contiguous(memory_format=torch.channels_last)
    # the per-tensor norms are summed in memory order: equal up to the last bits of the ratio
    torch.testing.assert_close(pl.detach(), pc.detach(), rtol=1e-6, atol=1e-7)
    assert ol.fingerprints(pl)["param"] == memstate.fingerprint(pl)


# ----------------------------------------------------------------------------------------- API, state

def test_signature_and_defaults_are_apexs():
    sig = inspect.signature(mo.LAMB.__init__)
    apex_order = ["self", "params", "lr", "bias_correction", "betas", "eps", "weight_decay", "amsgrad", "adam_w_mode",
                  "grad_averaging", "set_grad_none", "max_grad_norm", "use_nvlamb"]
    assert list(sig.parameters)[:len(apex_order)] == apex_order
    want = dict(lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, amsgrad=False,
                adam_w_mode=True, grad_averaging=True, set_grad_none=True, max_grad_norm=1.0, use_nvlamb=False)
    assert {k: sig.parameters[k].default for k in want} == want
    o = mo.LAMB([torch.nn.Parameter(torch.zeros(2))])
    assert o.max_grad_norm == 1.0 and o.set_grad_none is True and o.last_grad_norm is None
    assert {k: v for k, v in o.defaults.items()} == LAMB_DEFAULTS


@pytest.mark.parametrize("kw, name", [(dict(lr=-1.0), "learning rate"), (dict(eps=-1e-6), "epsilon"),
                                      (dict(betas=(1.0, 0.999)), "beta parameter at index 0"),
                                      (dict(betas=(0.9, -0.1)), "beta parameter at index 1"),
                                      (dict(weight_decay=-0.1), "weight_decay"),
                                      (dict(max_grad_norm=0.0), "max_grad_norm"),
                                      (dict(max_grad_norm=float("nan")), "max_grad_norm"),
                                      (dict(max_grad_norm="1"), "max_grad_norm")],
                         ids=lambda v: combo_id(v) if isinstance(v, dict) else "")
def test_bad_arguments_raise_naming_them(kw, name):
    with pytest.raises(ValueError, match=name):
        mo.LAMB([torch.nn.Parameter(torch.zeros(2))], **kw)


def test_amsgrad_not_implemented():
    with pytest.raises(NotImplementedError, match="amsgrad"):
        mo.LAMB([torch.nn.Parameter(torch.zeros(2))], amsgrad=True)


def test_bad_group_hyperparameter_raises_before_anything_changes():
    ps = leaves(make_init(SHAPES[:3], seed=13))
    opt = mo.LAMB([{"params": ps[:2]}, {"params": ps[2:]}], lr=1e-2)
    set_grads(ps, make_grads(SHAPES[:3], 1, seed=14)[0])
    opt.step()
    before = snapshot(ps, opt)
    grads = [p.grad.clone() for p in ps]
    opt.param_groups[1]["eps"] = -1.0
    with pytest.raises(ValueError, match=r"param_groups\[1\].*epsilon"):
        opt.step()
    opt.param_groups[1]["eps"] = 1e-6
    assert_bitwise_same(before, snapshot(ps, opt), "after the refused step")
    assert all(torch.equal(p.grad, g) for p, g in zip(ps, grads))


def test_set_grad_none_as_apex():
    p = torch.nn.Parameter(torch.zeros(3))
    for flag in (True, False):
        o = mo.LAMB([p], set_grad_none=flag)
        p.grad = torch.ones(3)
        o.zero_grad()
        assert (p.grad is None) if flag else torch.equal(p.grad, torch.zeros(3))
    o = mo.LAMB([p], set_grad_none=False)
    p.grad = torch.ones(3)
    o.zero_grad(set_to_none=True)
    assert p.grad is None


def test_state_dict_round_trip_is_bitwise():
    init = make_init(SHAPES, seed=34)
    grads = make_grads(SHAPES, 8, seed=35)
    kw = dict(lr=1e-2, weight_decay=0.02, max_grad_norm=5.0)
    pa = leaves(init)
    a = run(mo.LAMB(pa, **kw), pa, grads)
    pb = leaves(init)
    b = run(mo.LAMB(pb, **kw), pb, grads[:4])
    sd = b.state_dict()
    assert sorted(sd["state"][0]) == ["exp_avg", "exp_avg_sq", "step"]
    assert sd["state"][0]["step"].dtype == torch.float32 and sd["state"][0]["step"].dim() == 0
    buf = io.BytesIO()
    torch.save({"model": [p.detach() for p in pb], "opt": sd}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    pc = leaves(ck["model"])
    c = mo.LAMB(pc, lr=0.5, weight_decay=0.0, max_grad_norm=5.0)  # hyperparameters come from the state dict
    c.load_state_dict(ck["opt"])
    assert c.param_groups[0]["lr"] == 1e-2 and c.param_groups[0]["weight_decay"] == 0.02
    run(c, pc, grads[4:])
    assert_bitwise_same(snapshot(pa, a), snapshot(pc, c), "resumed")


def test_load_state_dict_missing_step_raises_and_modifies_nothing():
    p = torch.nn.Parameter(torch.ones(3))
    o = mo.LAMB([p])
    p.grad = torch.ones(3)
    o.step()
    sd = o.state_dict()
    sd["state"][0] = {k: v for k, v in sd["state"][0].items() if k != "step"}
    before = o.state[p]["exp_avg"].clone()
    with pytest.raises(ValueError, match="step"):
        o.load_state_dict(sd)
    assert torch.equal(o.state[p]["exp_avg"], before) and float(o.state[p]["step"]) == 1


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_options_and_step_identically(how):
    init = make_init(SHAPES, seed=40)
    grads = make_grads(SHAPES, 4, seed=41)
    ps = leaves(init)
    o = mo.LAMB(ps, lr=1e-2, max_grad_norm=3.0, set_grad_none=False, use_nvlamb=True, fingerprint=True)
    run(o, ps, grads[:2])
    bundle = (ps, o)
    qs, q = copy.deepcopy(bundle) if how == "deepcopy" else pickle.loads(pickle.dumps(bundle))
    assert (q.max_grad_norm, q.set_grad_none, q.fingerprint, q.param_groups[0]["use_nvlamb"]) == (3.0, False, True, True)
    run(o, ps, grads[2:])
    run(q, qs, grads[2:])
    assert_bitwise_same(snapshot(ps, o), snapshot(qs, q), how)


def test_skip_if_nonfinite_skips_the_whole_step():
    ps = leaves(make_init(SHAPES[:4], seed=42))
    o = mo.LAMB(ps, skip_if_nonfinite=True)
    g = make_grads(SHAPES[:4], 1, seed=43)[0]
    g[2] = g[2].clone()
    g[2][3] = float("inf")
    set_grads(ps, g)
    before = [p.detach().clone() for p in ps]
    o.step()
    assert o.last_step_skipped and o.skipped_steps == 1 and o.last_grad_norm is None
    assert all(not st for st in o.state.values())  # no state created, no step counted
    assert all(torch.equal(p.detach(), b) for p, b in zip(ps, before))


# ----------------------------------------------------------------------------------------- the op

def _op_cases(device):
    ops = _ext.ops()
    gen = torch.Generator().manual_seed(0)

    def ts(dtype, pos=False):
        out = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in [(3,), (2, 5), (1,)]]
        return [t.abs() for t in out] if pos else out

    for dtype in (torch.float32, torch.bfloat16):
        for fp in (True, False):
            for aw, nv in ((True, False), (False, True)):
                p, g, m, v, u = ts(dtype), ts(dtype), ts(dtype), ts(dtype, True), ts(dtype)
                yield ops.lamb_step.default, (p, g, m, v, u, [1.0, 2.0, 3.0], 1e-3, 0.9, 0.999, 1e-6, 0.01, True,
                                              True, aw, nv, 2.5, 1.0, fp)
    yield ops.lamb_step.default, ([], [], [], [], [], [], 1e-3, 0.9, 0.999, 1e-6, 0.01, True, True, True, False,
                                  0.0, math.inf, True)


@pytest.mark.parametrize("case", range(9))
def test_opcheck_lamb_step(case):
    op, args = list(_op_cases("cpu"))[case]
    result = opcheck(op, args)
    assert set(result.values()) == {"SUCCESS"}, result


def test_op_checks_its_arguments():
    ops = _ext.ops()
    p = [torch.zeros(3)]
    with pytest.raises(RuntimeError, match=r"updates has 0 tensors"):
        ops.lamb_step(p, [torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3)], [], [1.0], 1e-3, 0.9, 0.999, 1e-6,
                      0.0, True, True, True, False, 0.0, math.inf, False)
    with pytest.raises(RuntimeError, match=r"updates\[0\] overlaps|updates\[0\].*params\[0\]|params\[0\].*updates"):
        ops.lamb_step(p, [torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3)], p, [1.0], 1e-3, 0.9, 0.999, 1e-6,
                      0.0, True, True, True, False, 0.0, math.inf, False)
    with pytest.raises(RuntimeError, match="max_grad_norm"):
        ops.lamb_step(p, [torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3)], [1.0], 1e-3, 0.9,
                      0.999, 1e-6, 0.0, True, True, True, False, 0.0, 0.0, False)
    assert torch.equal(p[0], torch.zeros(3))


# ----------------------------------------------------------------------------------------- CUDA

CUDA_SHAPES = SHAPES + [(70_001,), (200_003,)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("hp", [dict(lr=1e-2), dict(lr=1e-2, adam_w_mode=False, use_nvlamb=True, weight_decay=0.0),
                                dict(lr=1e-2, max_grad_norm=None, grad_averaging=False, bias_correction=False)],
                         ids=combo_id)
def test_cuda_equals_cpu_bitwise(hp, dtype):
    init = make_init(CUDA_SHAPES, dtype, seed=200)
    grads = make_grads(CUDA_SHAPES, 20, dtype, seed=201)
    groups = lambda ps: split_groups(ps, [(3, {}), (len(ps) - 3, {"lr": hp["lr"] / 2})])  # noqa: E731
    pc, pg = leaves(init), leaves(init, "cuda")
    oc, og = mo.LAMB(groups(pc), fingerprint=True, **hp), mo.LAMB(groups(pg), fingerprint=True, **hp)
    for step, g in enumerate(grads):
        set_grads(pc, g)
        set_grads(pg, g)
        oc.step()
        og.step()
        if step in (0, 19):
            _assert_cpu_equals_cuda(pc, oc, pg, og, f"LAMB {dtype} step {step + 1}")
            if oc.last_grad_norm is not None:
                assert torch.equal(oc.last_grad_norm, og.last_grad_norm.cpu())


@pytest.mark.cuda
def test_cuda_equals_cpu_for_every_chunk_size():
    assert_cuda_equals_cpu_for_every_chunk_size(mo.LAMB, dict(lr=1e-2), CUDA_SHAPES)


@pytest.mark.cuda
def test_opcheck_lamb_step_cuda():
    for op, args in _op_cases("cuda"):
        result = opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, result
