"""memstate.optim: drop-in behaviour, numerics vs torch.optim, determinism, in-pass
fingerprints, bad input, the native precision helpers, and CUDA (CPU == CUDA bitwise)."""
import copy
import inspect
import io
import math

import numpy as np
import pytest
import torch

import memstate
import memstate.optim as mo
from memstate import _ext
from memstate.fingerprint import named_state_tensors

MS = {"SGD": mo.SGD, "Adam": mo.Adam, "AdamW": mo.AdamW}
TORCH = {"SGD": torch.optim.SGD, "Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}

# Shapes: 0-d, one element, sizes that are not multiples of 8, a few hundred/thousand elements.
SHAPES = [(), (1,), (7,), (3, 5), (33, 17), (1000,), (2, 3, 13)]
# float32 tolerance against torch.optim; other dtypes: see test_other_dtypes_close_to_torch_same_dtype.
RTOL32, ATOL32 = 1e-5, 1e-6


# ----------------------------------------------------------------------------------------- helpers

@pytest.fixture(autouse=True)
def _one_thread_by_default(threads):
    """One intra-op thread unless a test asks for more (tests of threading use ``threads``):
    results do not depend on it (test_bitwise_deterministic...), and on a small, busy machine
    torch's OpenMP threads otherwise make tiny ops 10-100x slower."""
    threads(1)


def rand(shape, gen, dtype=torch.float32, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def make_init(shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [rand(s, gen, dtype) for s in shapes]


def make_grads(shapes, steps, dtype=torch.float32, seed=1, scale=1.0):
    """steps x len(shapes) gradients; a shape's dtype may be given per tensor as a list."""
    gen = torch.Generator().manual_seed(seed)
    dtypes = dtype if isinstance(dtype, (list, tuple)) else [dtype] * len(shapes)
    return [[rand(s, gen, dt, scale) for s, dt in zip(shapes, dtypes)] for _ in range(steps)]


def leaves(init, device=None):
    return [torch.nn.Parameter(t.detach().to(device or t.device, copy=True)) for t in init]


def split_groups(params, specs):
    """specs: [(n_params, hyperparameters)] taking params in order."""
    out, i = [], 0
    for n, hp in specs:
        out.append({"params": params[i:i + n], **hp})
        i += n
    assert i == len(params)
    return out


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.to(p.device).clone()


def run(opt, params, grads):
    for step_grads in grads:
        set_grads(params, step_grads)
        opt.step()
    return opt


def torch_opt(name, groups, **kw):
    kw.setdefault("foreach", False)
    return TORCH[name](groups, **kw)


def state_tensors(opt):
    """name -> tensor of every tensor in the optimizer's state (as memstate.fingerprint_state names them)."""
    return dict(named_state_tensors(opt))


def snapshot(params, opt):
    """Deep copy of parameters, all tensor state and the hyperparameters of every group."""
    return {
        "params": [p.detach().clone() for p in params],
        "state": {k: v.detach().clone() for k, v in state_tensors(opt).items()},
        "state_keys": [sorted(opt.state[p].keys()) if p in opt.state else None for p in params],
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
        "fp": memstate.fingerprint_state(opt),
        "param_fps": memstate.fingerprint_many([p.detach() for p in params]),
    }


def _same(x, y):
    """torch.equal and equal bytes (so -0.0 != 0.0, and NaN == NaN when the bits agree)."""
    return _nan_equal(x, y) and (torch.equal(x, y) or bool(torch.isnan(x).any()))


def assert_bitwise_same(a, b, what=""):
    assert len(a["params"]) == len(b["params"])
    for i, (x, y) in enumerate(zip(a["params"], b["params"])):
        assert _same(x, y), f"{what}: param {i} differs"
    assert a["state"].keys() == b["state"].keys(), what
    for k in a["state"]:
        assert _same(a["state"][k], b["state"][k]), f"{what}: {k} differs"
    assert a["state_keys"] == b["state_keys"], what
    assert a["groups"] == b["groups"], what
    assert a["fp"] == b["fp"], f"{what}: state fingerprints differ: {a['fp'].diff(b['fp'])}"
    assert a["param_fps"] == b["param_fps"], f"{what}: parameter fingerprints differ"


def _nan_equal(x, y):
    """Bitwise equality (NaN-safe): compare the raw bytes."""
    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    return torch.equal(x.contiguous().view(-1).view(torch.uint8), y.contiguous().view(-1).view(torch.uint8)) \
        if x.numel() else True


def assert_close_to_torch(ms_params, ms_opt, t_params, t_opt, rtol, atol, what=""):
    for i, (a, b) in enumerate(zip(ms_params, t_params)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.detach().cpu(), b.detach().cpu(), rtol=rtol, atol=atol,
                                   msg=lambda m: f"{what}: param {i}: {m}")
    ms_state, t_state = state_tensors(ms_opt), state_tensors(t_opt)
    assert ms_state.keys() == t_state.keys(), what
    for k in ms_state:
        a, b = ms_state[k], t_state[k]
        if k.endswith(".step"):
            assert float(a) == float(b), f"{what}: {k}"
            continue
        assert a.dtype == b.dtype, f"{what}: {k}"
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {k}: {m}")


def sgd_second_group(hp):
    """Different hyperparameters, same boolean options (momentum stays zero/non-zero, etc.)."""
    return dict(hp, lr=hp["lr"] / 2.5, momentum=0.5 if hp["momentum"] else 0.0,
                dampening=0.25 if hp["dampening"] else 0.0,
                weight_decay=0.1 if hp["weight_decay"] else 0.0)


def adam_second_group(hp):
    return dict(hp, lr=hp["lr"] * 3, betas=(0.8, 0.99), eps=1e-6,
                weight_decay=hp["weight_decay"] * 2)


SGD_COMBOS = [
    dict(lr=0.05, momentum=m, nesterov=n, dampening=d, weight_decay=w, maximize=x)
    for m in (0.0, 0.9) for n in (False, True) for d in (0.0, 0.5) for w in (0.0, 1e-2) for x in (False, True)
    if not (n and (m == 0 or d != 0))
]
ADAM_COMBOS = [
    (name, dict(lr=1e-2, amsgrad=a, weight_decay=w, maximize=x))
    for name in ("Adam", "AdamW") for a in (False, True) for w in (0.0, 5e-2) for x in (False, True)
]


def combo_id(hp):
    return "-".join(f"{k}={v}" for k, v in hp.items() if k != "lr")


def make_pair(name, hp, second, init):
    """memstate and torch (foreach=False) optimizers over copies of ``init``, in two param groups
    (the first three tensors with ``hp``, the others with ``second``)."""
    pm, pt = leaves(init), leaves(init)
    specs = lambda ps: split_groups(ps, [(3, hp), (len(ps) - 3, second)])  # noqa: E731
    return pm, MS[name](specs(pm)), pt, torch_opt(name, specs(pt))


# ----------------------------------------------------------------------------------------- API

@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_drop_in_signature_and_defaults(name):
    ms_sig, t_sig = inspect.signature(MS[name].__init__), inspect.signature(TORCH[name].__init__)
    shared = [n for n in t_sig.parameters if n in ms_sig.parameters]
    hparams = (["lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"] if name == "SGD"
               else ["lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"])
    assert {"self", "params", *hparams} <= set(shared)
    assert ms_sig.parameters["fingerprint"].default is False
    assert ms_sig.parameters["skip_if_nonfinite"].default is False
    for n in shared:
        a, b = ms_sig.parameters[n], t_sig.parameters[n]
        assert a.default == b.default, (n, a.default, b.default)
        assert a.kind == b.kind, (n, a.kind, b.kind)  # positional order / keyword-only as torch
    # positional order as torch (only the leading positional ones)
    pos = lambda s: [n for n, p in s.parameters.items() if p.kind == p.POSITIONAL_OR_KEYWORD]  # noqa: E731
    assert pos(ms_sig) == pos(t_sig)
    # constructed defaults (hyperparameter keys of torch that memstate supports)
    p = torch.nn.Parameter(torch.zeros(3))
    om, ot = MS[name]([p]), TORCH[name]([p])
    assert isinstance(om, torch.optim.Optimizer)
    for k in hparams:
        assert om.defaults[k] == ot.defaults[k], k
    assert om.fingerprint is False and om.skip_if_nonfinite is False
    assert om.last_step_skipped is False and om.skipped_steps == 0


BAD_HPARAMS = [
    ("SGD", dict(lr=-0.1)),
    ("SGD", dict(lr=0.1, momentum=-0.5)),
    ("SGD", dict(lr=0.1, weight_decay=-1e-4)),
    ("SGD", dict(lr=0.1, nesterov=True)),  # nesterov without momentum
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)),
] + [
    (name, kw) for name in ("Adam", "AdamW") for kw in (
        dict(lr=-1e-3), dict(eps=-1e-8), dict(betas=(1.0, 0.999)), dict(betas=(-0.1, 0.999)),
        dict(betas=(0.9, 1.0)), dict(betas=(0.9, -0.5)), dict(weight_decay=-0.01),
    )
]


@pytest.mark.parametrize("name, kw", BAD_HPARAMS, ids=[f"{n}-{combo_id(k)}" for n, k in BAD_HPARAMS])
def test_invalid_hyperparameters_raise_value_error_like_torch(name, kw):
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError):
        TORCH[name]([p], **kw)  # the reference really rejects it
    with pytest.raises(ValueError):
        MS[name]([p], **kw)


@pytest.mark.parametrize("name, kw", [
    ("SGD", dict(lr=0.0)), ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
    ("Adam", dict(lr=0.0, betas=(0.0, 0.0), eps=0.0)), ("AdamW", dict(weight_decay=0.0)),
])
def test_boundary_hyperparameters_accepted_like_torch(name, kw):
    p = torch.nn.Parameter(torch.zeros(2))
    TORCH[name]([p], **kw)
    MS[name]([p], **kw)


def test_param_groups_defaults_and_add_param_group_match_torch():
    init = make_init(SHAPES, seed=10)
    grads = make_grads(SHAPES, 30, seed=11)
    for name, base, extra in [
        ("SGD", dict(lr=0.05, momentum=0.9), dict(lr=0.01, nesterov=True, momentum=0.7)),
        ("Adam", dict(lr=1e-2), dict(lr=3e-3, amsgrad=True, weight_decay=0.1)),
        ("AdamW", dict(lr=1e-2, weight_decay=0.05), dict(betas=(0.5, 0.9), maximize=True)),
    ]:
        pm, pt = leaves(init), leaves(init)
        # group 0 takes the constructor defaults, group 1 overrides some
        om = MS[name]([{"params": pm[:2]}, {"params": pm[2:4], "lr": base["lr"] * 2}], **base)
        ot = torch_opt(name, [{"params": pt[:2]}, {"params": pt[2:4], "lr": base["lr"] * 2}], **base)
        for gm, gt in zip(om.param_groups, ot.param_groups):
            for k, v in gm.items():
                if k not in ("params", "foreach"):  # the torch reference is built with foreach=False
                    assert v == gt[k], (name, k)
        for step, g in enumerate(grads):
            if step == 10:
                om.add_param_group({"params": pm[4:], **extra})
                ot.add_param_group({"params": pt[4:], **extra})
                gm, gt = om.param_groups[2], ot.param_groups[2]
                for k in gm.keys() & gt.keys() - {"params", "foreach"}:
                    assert gm[k] == gt[k], (name, k)  # defaults filled in as torch does
            set_grads(pm, g)  # parameters outside every group are not touched
            set_grads(pt, g)
            om.step()
            ot.step()
            if step == 9:
                assert torch.equal(pm[4].detach(), init[4])
        assert_close_to_torch(pm, om, pt, ot, RTOL32, ATOL32, name)
        # the late group really was trained
        assert not torch.equal(pm[-1].detach(), init[-1])
    with pytest.raises(ValueError):  # a parameter in two groups, as torch
        om.add_param_group({"params": [pm[0]]})


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_zero_grad_as_torch(name):
    for set_to_none in (True, False):
        pm, pt = leaves(make_init([(4,), (3,)])), leaves(make_init([(4,), (3,)]))
        om, ot = MS[name](pm, lr=0.1), TORCH[name](pt, lr=0.1)
        set_grads(pm, [torch.ones(4), torch.ones(3)])
        set_grads(pt, [torch.ones(4), torch.ones(3)])
        om.zero_grad(set_to_none=set_to_none)
        ot.zero_grad(set_to_none=set_to_none)
        for a, b in zip(pm, pt):
            assert (a.grad is None) == (b.grad is None) == set_to_none
            if not set_to_none:
                assert torch.equal(a.grad, b.grad) and not a.grad.any()
    om.zero_grad()  # default: set to None, as torch
    assert all(p.grad is None for p in pm)


@pytest.mark.parametrize("name, kw", [("SGD", dict(lr=0.05, momentum=0.9)), ("Adam", dict(lr=1e-2)),
                                      ("AdamW", dict(lr=1e-2, amsgrad=True))])
def test_step_with_closure_as_torch(name, kw):
    gen = torch.Generator().manual_seed(3)
    X, Y = torch.randn(64, 5, generator=gen), torch.randn(64, 2, generator=gen)
    init = make_init([(2, 5), (2,)], seed=4)

    def train(opt_cls, **extra):
        w, b = leaves(init)
        opt = opt_cls([w, b], **kw, **extra)
        losses = []
        for i in range(25):
            def closure():
                opt.zero_grad()
                loss = ((X @ w.t() + b - Y) ** 2).mean()
                loss.backward()
                return loss
            loss = opt.step(closure)
            losses.append(float(loss.detach()))
        return w, b, losses

    wm, bm, lm = train(MS[name])
    wt, bt, lt = train(TORCH[name], foreach=False)
    assert lm[0] == lt[0]
    assert lm[-1] < lm[0] * 0.9  # the closure really drove training
    torch.testing.assert_close(torch.tensor(lm), torch.tensor(lt), rtol=RTOL32, atol=ATOL32)
    torch.testing.assert_close(wm.detach(), wt.detach(), rtol=RTOL32, atol=ATOL32)
    torch.testing.assert_close(bm.detach(), bt.detach(), rtol=RTOL32, atol=ATOL32)
    # no closure: returns None, as torch
    wm.grad = torch.ones_like(wm)
    assert MS[name]([wm], **kw).step() is None


@pytest.mark.parametrize("name, kw", [("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
                                      ("Adam", dict(lr=1e-2, amsgrad=True)), ("AdamW", dict(lr=1e-2))])
def test_lr_scheduler_drives_lr_and_momentum_as_torch(name, kw):
    # OneCycleLR changes lr every step and also cycles momentum (SGD) / betas[0] (Adam): the fused
    # step must read the group's current values.
    init = make_init(SHAPES, seed=20)
    grads = make_grads(SHAPES, 40, seed=21)
    pm, pt = leaves(init), leaves(init)
    om, ot = MS[name](pm, **kw), torch_opt(name, pt, **kw)
    sm = torch.optim.lr_scheduler.OneCycleLR(om, max_lr=kw["lr"], total_steps=len(grads))
    st = torch.optim.lr_scheduler.OneCycleLR(ot, max_lr=kw["lr"], total_steps=len(grads))
    seen = set()
    for g in grads:
        set_grads(pm, g)
        set_grads(pt, g)
        om.step()
        ot.step()
        sm.step()
        st.step()
        assert om.param_groups[0]["lr"] == ot.param_groups[0]["lr"]
        seen.add(om.param_groups[0]["lr"])
    assert len(seen) > 30
    assert_close_to_torch(pm, om, pt, ot, RTOL32, ATOL32, name)
    # and a constant-lr run ends elsewhere: the schedule had an effect
    pc = leaves(init)
    run(MS[name](pc, **kw), pc, grads)
    assert not torch.allclose(pc[-1].detach(), pm[-1].detach(), rtol=1e-3, atol=1e-4)


def test_step_hooks_as_torch():
    init = make_init([(5,), (3, 3)], seed=5)
    grads = make_grads([(5,), (3, 3)], 3, seed=6)
    for name in ("SGD", "Adam", "AdamW"):
        pm = leaves(init)
        om = MS[name](pm, lr=0.1)
        calls = []
        pre = om.register_step_pre_hook(
            lambda opt, args, kwargs: calls.append(("pre", opt, pm[0].detach().clone())))
        post = om.register_step_post_hook(
            lambda opt, args, kwargs: calls.append(("post", opt, pm[0].detach().clone())))
        run(om, pm, grads[:2])
        assert [c[0] for c in calls] == ["pre", "post", "pre", "post"]
        assert all(c[1] is om for c in calls)
        assert torch.equal(calls[0][2], init[0])            # pre-hook sees the old parameter
        assert not torch.equal(calls[1][2], init[0])        # post-hook sees the updated one
        assert torch.equal(calls[1][2], calls[2][2])
        pre.remove()
        post.remove()
        run(om, pm, grads[2:])
        assert len(calls) == 4
        # a pre-hook may replace the args (as torch): a closure injected by the hook is used
        seen = []
        om.register_step_pre_hook(lambda opt, args, kwargs: (args, {"closure": lambda: seen.append(1) or 7.0}))
        assert om.step() == 7.0 and seen == [1]


# ----------------------------------------------------------------------------------------- state dict

def _torch_state_keys(opt, params):
    return [sorted(k for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)) if p in opt.state else []
            for p in params]


STATE_CASES = [
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.3)),
    ("SGD", dict(lr=0.05)),
    ("Adam", dict(lr=1e-2, weight_decay=1e-2)),
    ("Adam", dict(lr=1e-2, amsgrad=True, maximize=True)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
]


def assert_state_dict_interoperates(ms_cls, torch_cls, kw, direction, steps, resume_at):
    """A checkpoint of one library's optimizer (torch.save, loaded with weights_only=True) loads
    into the other's, built with other hyperparameters: the saved ones and the state (torch's
    keys, same tensors) arrive unchanged, both continue alike, and the run matches an
    uninterrupted torch run."""
    init = make_init(SHAPES, seed=30)
    grads = make_grads(SHAPES, steps, seed=31)
    src_is_torch = direction == "torch_to_memstate"
    groups = lambda ps, lr: split_groups(ps, [(3, {}), (4, {"lr": lr / 2})])  # noqa: E731
    torch_new = lambda g, **k: torch_cls(g, **(k if k.get("fused") else {"foreach": False, **k}))  # noqa: E731
    ps = leaves(init)
    src = (torch_new if src_is_torch else ms_cls)(groups(ps, kw["lr"]), **kw)
    run(src, ps, grads[:resume_at])
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)  # through serialisation, as a checkpoint would
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    # destination: a fresh optimizer with other hyperparameters (load restores the saved ones)
    pd = leaves([p.detach() for p in ps])
    wrong = dict(kw, lr=kw["lr"] * 7)
    dst = (ms_cls if src_is_torch else torch_new)(groups(pd, wrong["lr"]), **wrong)
    dst.load_state_dict(loaded)
    if not src_is_torch:
        for g in dst.param_groups:
            g["foreach"] = False  # the memstate dict has no 'foreach'; keep torch's reference path
    assert [g["lr"] for g in dst.param_groups] == [kw["lr"], kw["lr"] / 2]
    assert _torch_state_keys(dst, pd) == _torch_state_keys(src, ps)
    ss, ds = state_tensors(src), state_tensors(dst)
    assert ss.keys() == ds.keys()
    for k in ss:
        assert ss[k].dtype == ds[k].dtype and torch.equal(ss[k], ds[k]), k
    # both continue: the destination keeps training where the source left off
    run(src, ps, grads[resume_at:])
    run(dst, pd, grads[resume_at:])
    if src_is_torch:
        assert_close_to_torch(pd, dst, ps, src, RTOL32, ATOL32, direction)
    else:
        assert_close_to_torch(ps, src, pd, dst, RTOL32, ATOL32, direction)
    pr = leaves(init)
    ref = run(torch_new(groups(pr, kw["lr"]), **kw), pr, grads)
    assert_close_to_torch(pd, dst, pr, ref, RTOL32, ATOL32, "vs uninterrupted")


@pytest.mark.parametrize("name, kw", STATE_CASES, ids=[f"{n}-{combo_id(k)}" for n, k in STATE_CASES])
@pytest.mark.parametrize("direction", ["torch_to_memstate", "memstate_to_torch"])
def test_state_dict_interoperates_with_torch(name, kw, direction):
    assert_state_dict_interoperates(MS[name], TORCH[name], kw, direction, steps=30, resume_at=10)


@pytest.mark.parametrize("name, kw", STATE_CASES, ids=[f"{n}-{combo_id(k)}" for n, k in STATE_CASES])
def test_state_keys_are_torchs(name, kw):
    init = make_init(SHAPES[:4], seed=32)
    grads = make_grads(SHAPES[:4], 3, seed=33)
    pm, pt = leaves(init), leaves(init)
    om, ot = run(MS[name](pm, **kw), pm, grads), run(torch_opt(name, pt, **kw), pt, grads)
    assert _torch_state_keys(om, pm) == _torch_state_keys(ot, pt)
    for p in pm:
        if "step" in om.state[p]:
            s = om.state[p]["step"]
            assert isinstance(s, torch.Tensor) and s.dtype == torch.float32 and s.dim() == 0 and float(s) == 3.0


@pytest.mark.parametrize("name, kw", STATE_CASES[:2] + STATE_CASES[3:],
                         ids=[f"{n}-{combo_id(k)}" for n, k in STATE_CASES[:2] + STATE_CASES[3:]])
def test_resume_from_state_dict_is_bitwise(name, kw):
    assert_resume_is_bitwise(MS[name], kw, 20, name)


def assert_resume_is_bitwise(opt_cls, kw, nsteps, label):
    """A run stopped half way, saved (model + optimizer state_dict, loaded with weights_only) and
    resumed in fresh objects must end bit for bit where the uninterrupted run ends."""
    init = make_init(SHAPES, seed=34)
    grads = make_grads(SHAPES, nsteps, seed=35)
    half = nsteps // 2
    pa = leaves(init)
    a = run(opt_cls(pa, **kw), pa, grads)
    pb = leaves(init)
    b = run(opt_cls(pb, **kw), pb, grads[:half])
    buf = io.BytesIO()
    torch.save({"model": [p.detach() for p in pb], "opt": b.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    pc = leaves(ck["model"])
    c = opt_cls(pc, **kw)
    c.load_state_dict(ck["opt"])
    run(c, pc, grads[half:])
    assert_bitwise_same(snapshot(pa, a), snapshot(pc, c), label)


def _bad_state_cases():
    def shape(key, idx, new_shape):
        def f(sd):
            sd["state"][idx][key] = torch.zeros(new_shape)
        return f

    def drop(key, idx):
        def f(sd):
            del sd["state"][idx][key]
        return f

    return [
        ("Adam", dict(), shape("exp_avg", 1, (5, 3)), 1, "exp_avg"),
        ("Adam", dict(), shape("exp_avg_sq", 5, (1000, 1)), 5, "exp_avg_sq"),
        ("AdamW", dict(amsgrad=True), shape("max_exp_avg_sq", 6, (2, 3, 12)), 6, "max_exp_avg_sq"),
        ("Adam", dict(), drop("exp_avg_sq", 2), 2, "exp_avg_sq"),
        ("AdamW", dict(amsgrad=True), drop("max_exp_avg_sq", 4), 4, "max_exp_avg_sq"),
        ("Adam", dict(), drop("step", 6), 6, "step"),
        ("AdamW", dict(), drop("exp_avg", 0), 0, "exp_avg"),
        ("SGD", dict(momentum=0.9), shape("momentum_buffer", 4, (34, 17)), 4, "momentum_buffer"),
        ("SGD", dict(momentum=0.9), shape("momentum_buffer", 0, (1,)), 0, "momentum_buffer"),
    ]


BAD_STATE = _bad_state_cases()


@pytest.mark.parametrize("name, kw, corrupt, bad_index, key", BAD_STATE,
                         ids=[f"{c[0]}-{c[4]}-{i}" for i, c in enumerate(BAD_STATE)])
def test_load_state_dict_rejects_mismatch_and_modifies_nothing(name, kw, corrupt, bad_index, key):
    init = make_init(SHAPES, seed=40)
    lr = 0.05 if name == "SGD" else 1e-2
    groups = lambda ps, lr: split_groups(ps, [(3, dict(lr=lr)), (4, dict(lr=lr / 2))])  # noqa: E731
    # a source with different state (other data) and other hyperparameters
    ps = leaves(make_init(SHAPES, seed=41))
    src = run(MS[name](groups(ps, lr * 3), **kw), ps, make_grads(SHAPES, 4, seed=42))
    sd = copy.deepcopy(src.state_dict())
    corrupt(sd)
    # the target already has state of its own
    pt = leaves(init)
    grads = make_grads(SHAPES, 8, seed=43)
    tgt = run(MS[name](groups(pt, lr), **kw), pt, grads[:4])
    before = snapshot(pt, tgt)
    with pytest.raises(ValueError) as ei:
        tgt.load_state_dict(sd)
    msg = str(ei.value)
    gi, pi = (0, bad_index) if bad_index < 3 else (1, bad_index - 3)
    assert f"param_groups[{gi}]['params'][{pi}]" in msg or f"parameter {bad_index}" in msg, msg
    assert key in msg, msg
    assert_bitwise_same(before, snapshot(pt, tgt), "after a rejected load_state_dict")
    # training continues exactly as if the load had never been tried
    run(tgt, pt, grads[4:])
    pr = leaves(init)
    ref = run(MS[name](groups(pr, lr), **kw), pr, grads)
    assert_bitwise_same(snapshot(pr, ref), snapshot(pt, tgt), "continued")


def test_load_state_dict_wrong_structure_raises_value_error_like_torch():
    init = make_init(SHAPES, seed=44)
    for name in ("SGD", "Adam"):
        ps = leaves(init)
        extra = {"momentum": 0.9} if name == "SGD" else {}
        src = run(MS[name](split_groups(ps, [(3, {}), (4, {})]), lr=0.01, **extra), ps, make_grads(SHAPES, 2, seed=45))
        sd = src.state_dict()
        for make in (lambda ps: [{"params": ps}],                      # one group instead of two
                     lambda ps: split_groups(ps, [(2, {}), (5, {})])):  # other group sizes
            for cls in (TORCH[name], MS[name]):
                pt = leaves(init)
                opt = cls(make(pt), lr=0.3)
                with pytest.raises(ValueError):
                    opt.load_state_dict(sd)
                assert opt.param_groups[0]["lr"] == 0.3 and len(opt.state) == 0


# ----------------------------------------------------------------------------------------- numerics

@pytest.mark.parametrize("hp", SGD_COMBOS, ids=combo_id)
def test_sgd_matches_torch_fp32_every_option(hp):
    init = make_init(SHAPES, seed=50)
    grads = make_grads(SHAPES, 40, seed=51)
    pm, om, pt, ot = make_pair("SGD", hp, sgd_second_group(hp), init)
    for i, g in enumerate(grads):
        set_grads(pm, g)
        set_grads(pt, g)
        om.step()
        ot.step()
        if i % 10 == 9:
            assert_close_to_torch(pm, om, pt, ot, RTOL32, ATOL32, f"step {i + 1}")
    assert not torch.equal(pm[4].detach(), init[4])


@pytest.mark.parametrize("name, hp", ADAM_COMBOS, ids=[f"{n}-{combo_id(h)}" for n, h in ADAM_COMBOS])
def test_adam_matches_torch_fp32_every_option(name, hp):
    init = make_init(SHAPES, seed=52)
    grads = make_grads(SHAPES, 40, seed=53)
    pm, om, pt, ot = make_pair(name, hp, adam_second_group(hp), init)
    for i, g in enumerate(grads):
        set_grads(pm, g)
        set_grads(pt, g)
        om.step()
        ot.step()
        if i % 10 == 9:
            assert_close_to_torch(pm, om, pt, ot, RTOL32, ATOL32, f"step {i + 1}")


MISSING_GRAD_CASES = [
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.5)),
    ("Adam", dict(lr=1e-2, amsgrad=True)),
    ("AdamW", dict(lr=1e-2)),
]


@pytest.mark.parametrize("name, hp", MISSING_GRAD_CASES, ids=[f"{n}-{combo_id(h)}" for n, h in MISSING_GRAD_CASES])
def test_params_missing_gradients_on_some_steps_as_torch(name, hp):
    # Parameters of one bucket then have different step counts (Adam's per-tensor bias
    # corrections) and momentum buffers created at different steps (SGD's "first step").
    init = make_init(SHAPES, seed=54)
    grads = make_grads(SHAPES, 40, seed=55)
    for step, g in enumerate(grads):
        for i in range(len(g)):
            if (i > 0 and (step + i) % (i + 2) == 0) or (i == len(g) - 1 and step < 12):
                g[i] = None
    pm, pt = leaves(init), leaves(init)
    om, ot = run(MS[name](pm, **hp), pm, grads), run(torch_opt(name, pt, **hp), pt, grads)
    assert_close_to_torch(pm, om, pt, ot, RTOL32, ATOL32, name)
    if name != "SGD":
        counts = [float(om.state[p]["step"]) for p in pm]
        assert len(set(counts)) > 3, counts
        assert counts == [float(ot.state[p]["step"]) for p in pt]


# ------------------------------------------------------------- documented element math, every dtype

class RefOptimizer:
    """The per-element math documented in csrc/include/memstate/optim_math.h, evaluated with
    numpy (one IEEE rounding per operation, no FMA) in the math type (float32; float64 for
    float64 parameters), host scalars computed in float64 and rounded once, state stored in the
    parameter dtype (one rounding per store). It should equal memstate bit for bit on every dtype.

    numpy rather than torch: torch's CPU float32 ``sqrt`` is not correctly rounded and torch
    divides by a scalar through its reciprocal, so torch ops cannot serve as a bitwise reference.
    """

    def __init__(self, name, params, **hp):
        self.name, self.params, self.hp = name, params, hp
        self.state = [dict() for _ in params]

    def step(self, grads):
        for p, g, st in zip(self.params, grads, self.state):
            M = np.float64 if p.dtype == torch.float64 else np.float32
            s = M  # a Python float (float64) rounded once to the math type

            def load(t):
                return t.detach().to(torch.float64 if M is np.float64 else torch.float32).numpy().astype(M)

            def store(x):
                return torch.from_numpy(np.array(x, dtype=M)).reshape(p.shape).to(p.dtype)

            h = self.hp
            pm, gm = load(p), load(g)
            gm = -gm if h.get("maximize") else gm
            wd = h.get("weight_decay", 0.0)
            if self.name == "SGD":
                mom = h.get("momentum", 0.0)
                if wd != 0:
                    gm = gm + s(wd) * pm
                if mom != 0:
                    if "momentum_buffer" not in st:
                        buf = gm
                    else:
                        buf = load(st["momentum_buffer"]) * s(mom) + s(1.0 - h.get("dampening", 0.0)) * gm
                    st["momentum_buffer"] = store(buf)
                    gm = gm + s(mom) * buf if h.get("nesterov") else buf
                pm = pm - s(h["lr"]) * gm
            else:
                lr = h["lr"]
                b1, b2 = h.get("betas", (0.9, 0.999))
                if not st:
                    st.update(step=0.0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                    if h.get("amsgrad"):
                        st["max_exp_avg_sq"] = torch.zeros_like(p)
                st["step"] += 1.0
                if wd != 0:
                    if self.name == "AdamW":
                        pm = pm * s(1.0 - lr * wd)
                    else:
                        gm = gm + s(wd) * pm
                m, v = load(st["exp_avg"]), load(st["exp_avg_sq"])
                m = m + s(1.0 - b1) * (gm - m)
                v = v * s(b2) + s(1.0 - b2) * (gm * gm)
                vh = v
                if h.get("amsgrad"):
                    vh = np.maximum(load(st["max_exp_avg_sq"]), v)
                    st["max_exp_avg_sq"] = store(vh)
                st["exp_avg"], st["exp_avg_sq"] = store(m), store(v)
                step = st["step"]
                denom = np.sqrt(vh) / s(math.sqrt(1.0 - b2 ** step)) + s(h.get("eps", 1e-8))
                pm = pm - s(lr / (1.0 - b1 ** step)) * (m / denom)
            with torch.no_grad():
                p.copy_(store(pm))


REF_CASES = [
    ("SGD", dict(lr=0.05)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=1e-2, maximize=True)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    ("Adam", dict(lr=1e-2, weight_decay=1e-2, maximize=True)),
    ("Adam", dict(lr=1e-2, amsgrad=True, betas=(0.8, 0.99), eps=1e-6)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
]
ALL_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("name, hp", REF_CASES, ids=[f"{n}-{combo_id(h)}" for n, h in REF_CASES])
def test_bitwise_equal_to_documented_element_math(name, hp, dtype):
    shapes = [(), (7,), (33, 17), (1001,)]
    init = make_init(shapes, dtype, seed=60)
    grads = make_grads(shapes, 12, dtype, seed=61)
    assert_steps_equal_reference(MS[name], RefOptimizer, name, hp, init, grads, dtype)


def assert_steps_equal_reference(opt_cls, ref_cls, name, hp, init, grads, dtype):
    """Steps ``opt_cls`` and the element-math reference ``ref_cls`` from ``init`` through ``grads``
    and requires parameters and every state entry to be bitwise equal after each step."""
    pm, pr = leaves(init), leaves(init)
    om, ref = opt_cls(pm, **hp), ref_cls(name, pr, **hp)
    for i, g in enumerate(grads):
        set_grads(pm, g)
        om.step()
        ref.step(g)
        for j, (a, b) in enumerate(zip(pm, pr)):
            assert _nan_equal(a.detach(), b.detach()), f"step {i + 1}, param {j}: max diff {(a - b).abs().max()}"
        for j, p in enumerate(pm):
            for k, v in ref.state[j].items():
                got = om.state[p][k]
                if k == "step":
                    assert float(got) == v
                else:
                    assert got.dtype == dtype and _nan_equal(got, v), f"step {i + 1}, param {j}, {k}"
    return pm


# ------------------------------------------------------------- other dtypes against torch

# memstate keeps state in the parameter dtype but does the math of a step in float32 and rounds
# once per stored tensor; torch (foreach=False) rounds after every op (grad + wd*p, buf*m,
# p*(1-lr*wd), v*beta2, ...) to the parameter dtype. The two can land on neighbouring
# representable values at any step and then follow slightly different paths, so we bound the
# distance in ulps of max(|p|, 1) after 40 steps:
# - bfloat16: 24 ulps (measured up to ~15; the per-step drift is at most about one ulp of p).
# - float16: 64 ulps (8 bfloat16 ulps in absolute terms). torch's float16 Adam is itself off by
#   up to ~50 ulps from float64 (memstate: ~6), because it rounds v*beta2 to float16 before adding
#   (1-beta2)*g*g: the decay (0.1% of v) is about one float16 half-ulp (0.05%), so each step's
#   rounding is as large as the decay and v is biased.
# To make sure the loose bound does not hide a worse implementation we also require memstate to be
# at least as accurate as torch against a float64 run from the same start (10% noise margin).
# float64: both do the math in float64 and differ only in op order/FMA: ~1e-15 per step.
LOWP_ULPS = {torch.bfloat16: 24, torch.float16: 64}


def _ulps(a, b):
    """max |a - b| in units of eps(dtype) * max(|b|, 1)."""
    eps = torch.finfo(a.dtype).eps
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs() / (b.abs().clamp(min=1.0) * eps)).max().item() if a.numel() else 0.0


def _low_precision_case(name, hp, dtype):
    hp = dict(hp)
    if dtype == torch.float16 and name != "SGD":
        # torch's float16 Adam adds eps in float16 (1e-8 and 1e-6 flush to 0 or a subnormal) and
        # divides by sqrt(v) rounded to float16, which underflows to 0: it produces inf/NaN. Use
        # an eps that float16 represents so torch is a usable reference.
        hp["eps"] = 1e-3
    return hp


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("name, hp", REF_CASES, ids=[f"{n}-{combo_id(h)}" for n, h in REF_CASES])
def test_other_dtypes_close_to_torch_same_dtype(name, hp, dtype):
    hp = _low_precision_case(name, hp, dtype)
    init = make_init(SHAPES, dtype, seed=70)
    grads = make_grads(SHAPES, 40, dtype, seed=71)
    pm, pt = leaves(init), leaves(init)
    om, ot = MS[name](pm, **hp), torch_opt(name, pt, **hp)
    run(om, pm, grads)
    run(ot, pt, grads)
    for p in pm:
        assert p.dtype == dtype and all(v.dtype == dtype for k, v in om.state[p].items()
                                        if isinstance(v, torch.Tensor) and k != "step")
    if dtype == torch.float64:
        assert_close_to_torch(pm, om, pt, ot, rtol=1e-12, atol=1e-12, what=str(dtype))
        return
    for i, (a, b) in enumerate(zip(pm, pt)):
        assert torch.isfinite(b).all(), "torch reference is not finite"
        assert _ulps(a, b) <= LOWP_ULPS[dtype], f"param {i}: {_ulps(a, b):.1f} ulps from torch {dtype}"
    for k, v in state_tensors(om).items():  # the state too (a looser check: v, m are not normalised)
        if not k.endswith(".step"):
            w = state_tensors(ot)[k]
            torch.testing.assert_close(v.double(), w.double(), rtol=LOWP_ULPS[dtype] * torch.finfo(dtype).eps,
                                       atol=0.05 * w.double().abs().max().item(), msg=k)
    # accuracy against float64 (same rounded start and gradients)
    p64 = leaves([x.double() for x in init])
    run(torch_opt(name, p64, **hp), p64, [[g.double() for g in gs] for gs in grads])
    err_ms = sum((a.detach().double() - c.detach()).abs().sum().item() for a, c in zip(pm, p64))
    err_t = sum((b.detach().double() - c.detach()).abs().sum().item() for b, c in zip(pt, p64))
    assert err_ms <= 1.1 * err_t + 1e-6, (err_ms, err_t)


def test_several_dtypes_in_one_group_are_fused_per_dtype():
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float32, torch.float16, torch.float64, torch.bfloat16]
    shapes = [(7,), (3, 5), (33, 17), (1,), (100,), (), (9,)]
    init = [make_init([s], dt, seed=80 + i)[0] for i, (s, dt) in enumerate(zip(shapes, dtypes))]
    grads = make_grads(shapes, 20, dtypes, seed=81)
    for name, hp in REF_CASES:
        hp = _low_precision_case(name, hp, torch.float16)
        pm, pt, ps = leaves(init), leaves(init), leaves(init)
        om = MS[name](pm, fingerprint=True, **hp)
        ot = torch_opt(name, pt, **hp)
        run(om, pm, grads)
        run(ot, pt, grads)
        # each dtype in its own optimizer: grouping must not change a bit
        by_dtype = {}
        for i, p in enumerate(ps):
            by_dtype.setdefault(p.dtype, []).append(i)
        for idx in by_dtype.values():
            sub = [ps[i] for i in idx]
            run(MS[name](sub, **hp), sub, [[gs[i] for i in idx] for gs in grads])
        for i, (a, b, c) in enumerate(zip(pm, pt, ps)):
            assert a.dtype == dtypes[i] and torch.equal(a.detach(), c.detach()), (name, i)
            if a.dtype in (torch.float32, torch.float64):
                tol = RTOL32 if a.dtype == torch.float32 else 1e-12
                torch.testing.assert_close(a.detach(), b.detach(), rtol=tol, atol=tol / 10)
            else:
                assert _ulps(a, b) <= LOWP_ULPS[a.dtype], (name, i)
            fps = om.fingerprints(a)
            assert fps["param"] == memstate.fingerprint(a) and fps["grad"] == memstate.fingerprint(a.grad)
            for k, v in om.state[a].items():
                if isinstance(v, torch.Tensor):
                    assert v.dtype == (torch.float32 if k == "step" else a.dtype)
                    assert fps[k] == memstate.fingerprint(v), (name, i, k)


# ----------------------------------------------------------------------------------------- training

def _digits():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    X, y = sklearn_datasets.load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    X, y = X[perm], y[perm]
    return X[:1400], y[:1400], X[1400:], y[1400:]


@pytest.mark.parametrize("name, hp", [("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)),
                                      ("AdamW", dict(lr=3e-3, weight_decay=1e-2))])
def test_mlp_on_digits_trains_to_torchs_accuracy(name, hp):
    Xtr, ytr, Xte, yte = _digits()

    def train(make_opt):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
        opt = make_opt(model.parameters())
        order = torch.Generator().manual_seed(2)
        for _ in range(6):
            for idx in torch.randperm(len(ytr), generator=order).split(32):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
                opt.step()
        with torch.no_grad():
            return 100.0 * (model(Xte).argmax(1) == yte).float().mean().item()

    acc_ms = train(lambda ps: MS[name](ps, **hp))
    acc_t = train(lambda ps: torch_opt(name, ps, **hp))
    assert acc_t > 90.0, acc_t  # the setup really learns
    assert abs(acc_ms - acc_t) <= 0.5, (acc_ms, acc_t)


# ----------------------------------------------------------------------------------------- determinism

DET_SHAPES = [(20_003,), (67, 61), (17,), (1,), (), (8,)]  # 20_003 > 16384: several chunks
DET_CASES = [
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.2, maximize=True)),
    ("Adam", dict(lr=1e-2, amsgrad=True, weight_decay=1e-2)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.1, maximize=True)),
]


def _det_run(name, hp, init, grads):
    params = leaves(init)
    groups = split_groups(params, [(2, {}), (len(params) - 2, {"lr": hp["lr"] / 3})])
    opt = getattr(mo, name)(groups, fingerprint=True, **hp)
    run(opt, params, grads)
    snap = snapshot(params, opt)
    snap["in_pass"] = [opt.fingerprints(p) for p in params]
    snap["state_fp"] = opt.state_fingerprint()
    # the in-pass fingerprints are right in every configuration, not only equal to each other
    for p, fps in zip(params, snap["in_pass"]):
        assert fps["param"] == memstate.fingerprint(p) and fps["grad"] == memstate.fingerprint(p.grad)
        for k, v in opt.state[p].items():
            assert fps[k] == memstate.fingerprint(v), k
        assert set(fps) == {"param", "grad", *opt.state[p].keys()}
    return snap


def assert_deterministic_everywhere(name, hp, dtype, shapes, threads):
    """Every thread count, chunk size and CPU ISA gives the bits of a one-thread scalar run:
    parameters, state, in-pass fingerprints (checked against memstate.fingerprint by _det_run)
    and the state fingerprint. ``threads``: the conftest fixture that sets torch's threads."""
    C = _ext.load()
    isas = C.build_info()["cpu_isas"].split(",")
    init = make_init(shapes, dtype, seed=90)
    grads = make_grads(shapes, 3, dtype, seed=91)
    chunk_before = C.optim_chunk_elems()
    try:
        threads(1)
        C.set_cpu_isa("scalar")
        C.set_optim_chunk_elems(chunk_before)
        base = _det_run(name, hp, init, grads)
        assert_bitwise_same(base, _det_run(name, hp, init, grads), "rerun")
        # every chunk size and ISA on one thread; on two threads the chunk sizes that give many
        # chunks per tensor (8) and the default (two threads are slow on a busy 2-core machine)
        for n_threads, chunks in ((1, (8, 64, 16384, 1 << 20)), (2, (8, 16384))):
            threads(n_threads)
            for chunk in chunks:
                C.set_optim_chunk_elems(chunk)
                assert C.optim_chunk_elems() == chunk
                for isa in isas:
                    C.set_cpu_isa(isa)
                    got = _det_run(name, hp, init, grads)
                    what = f"threads={n_threads} chunk={chunk} isa={isa}"
                    assert_bitwise_same(base, got, what)
                    assert got["in_pass"] == base["in_pass"], what
                    assert got["state_fp"] == base["state_fp"], what
                    assert got["state_fp"].digest == base["state_fp"].digest, what
    finally:
        C.set_optim_chunk_elems(chunk_before)
        C.set_cpu_isa("auto")
    # the runs did move the parameters (so "equal" is not "untouched"): the largest one at least
    big = max(range(len(init)), key=lambda k: init[k].numel())
    assert not torch.equal(base["params"][big], init[big])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("name, hp", DET_CASES, ids=[f"{n}-{combo_id(h)}" for n, h in DET_CASES])
def test_bitwise_deterministic_across_runs_threads_chunks_and_isas(name, hp, dtype, threads):
    assert_deterministic_everywhere(name, hp, dtype, DET_SHAPES, threads)


def test_optim_chunk_knob_checks_its_argument():
    C = _ext.load()
    before = C.optim_chunk_elems()
    assert before % 8 == 0 and before >= 8
    for bad in (0, 4, 12, -8):
        with pytest.raises(RuntimeError, match="multiple of 8"):
            C.set_optim_chunk_elems(bad)
    assert C.optim_chunk_elems() == before


# ----------------------------------------------------------------------------------------- fingerprints

FP_CASES = [
    ("SGD", dict(lr=0.05)),
    ("SGD", dict(lr=0.05, momentum=0.9, weight_decay=1e-2)),
    ("Adam", dict(lr=1e-2, amsgrad=True)),
    ("AdamW", dict(lr=1e-2, maximize=True)),
]
FP_SHAPES = [(), (1,), (7,), (3, 5), (33, 17), (4099,)]


@pytest.mark.parametrize("chunk", [64, None], ids=["chunk64", "chunk_default"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("name, hp", FP_CASES, ids=[f"{n}-{combo_id(h)}" for n, h in FP_CASES])
def test_in_pass_fingerprints_equal_fingerprints_after_the_step(name, hp, dtype, chunk):
    C = _ext.load()
    before = C.optim_chunk_elems()
    init = make_init(FP_SHAPES, dtype, seed=100)
    grads = make_grads(FP_SHAPES, 4, dtype, seed=101)
    try:
        if chunk:
            C.set_optim_chunk_elems(chunk)
        pf, pn = leaves(init), leaves(init)
        groups = lambda ps: split_groups(ps, [(2, {}), (4, {"lr": hp["lr"] * 2})])  # noqa: E731
        of, on = MS[name](groups(pf), fingerprint=True, **hp), MS[name](groups(pn), **hp)
        for step, g in enumerate(grads):
            if step == 3:
                g = [None] + g[1:]  # parameter 0 has no gradient in the last step
            set_grads(pf, g)
            set_grads(pn, g)
            of.step()
            on.step()
            sf = of.state_fingerprint()
            want_state = memstate.fingerprint_state(of)
            for i, p in enumerate(pf):
                fps = of.fingerprints(p)
                if p.grad is None:
                    assert fps == {} and f"param.{i}" not in sf
                    continue
                tensor_keys = {k for k, v in of.state.get(p, {}).items() if isinstance(v, torch.Tensor)}
                assert set(fps) == {"param", "grad"} | tensor_keys
                if name != "SGD":
                    assert "step" in fps
                assert fps["param"] == memstate.fingerprint(p), (step, i)
                assert fps["grad"] == memstate.fingerprint(p.grad), (step, i)
                for k in tensor_keys:
                    assert fps[k] == memstate.fingerprint(of.state[p][k]), (step, i, k)
                assert sf[f"param.{i}"] == fps["param"] and sf[f"grad.{i}"] == fps["grad"]
                assert sf.dtype(f"param.{i}") == dtype and sf.shape(f"param.{i}") == tuple(p.shape)
            state_names = {n for n in sf if n.startswith("state.")}
            with_grad = {f"state.{i}." for i, p in enumerate(pf) if p.grad is not None}
            assert state_names == {n for n in want_state if any(n.startswith(w) for w in with_grad)}
            for n in state_names:
                assert sf[n] == want_state[n] and sf.dtype(n) == want_state.dtype(n) \
                    and sf.shape(n) == want_state.shape(n), n
            # fingerprinting changes no result
            assert_bitwise_same(snapshot(pf, of), snapshot(pn, on), f"fingerprint=True vs False, step {step}")
    finally:
        C.set_optim_chunk_elems(before)


def test_fingerprint_methods_require_fingerprint_true():
    p = torch.nn.Parameter(torch.ones(3))
    for name in ("SGD", "Adam", "AdamW"):
        opt = MS[name]([p], lr=0.1)
        p.grad = torch.ones(3)
        opt.step()
        with pytest.raises(RuntimeError, match="fingerprint=True"):
            opt.fingerprints(p)
        with pytest.raises(RuntimeError, match="fingerprint=True"):
            opt.state_fingerprint()


def test_state_fingerprint_digest_matches_fingerprint_state_for_state_entries():
    init = make_init(SHAPES, seed=102)
    pm = leaves(init)
    opt = run(MS["Adam"](pm, fingerprint=True, amsgrad=True), pm, make_grads(SHAPES, 2, seed=103))
    sf = opt.state_fingerprint()
    only_state = memstate.StateFingerprint(
        {n: (sf[n], sf.dtype(n), sf.shape(n)) for n in sf if n.startswith("state.")})
    assert only_state.digest == memstate.fingerprint_state(opt).digest
    assert len(sf) == len(only_state) + 2 * len(pm)


# ----------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("name", ["Adam", "AdamW"])  # SGD steps sparse gradients: test_optim_layouts.py
def test_sparse_gradient_raises_naming_the_parameter(name):
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 4)
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = MS[name]([{"params": list(lin.parameters())}, {"params": [emb.weight]}], lr=0.1)
    lin(emb(torch.tensor([1, 2, 7]))).sum().backward()
    assert emb.weight.grad.is_sparse
    before = [p.detach().clone() for p in (*lin.parameters(), emb.weight)]
    with pytest.raises(RuntimeError, match="sparse") as ei:
        opt.step()
    msg = str(ei.value)
    assert "param_groups[1]['params'][0]" in msg or "parameter 2" in msg, msg
    # raised before anything was written (the dense group was not stepped either)
    for a, b in zip(before, (*lin.parameters(), emb.weight)):
        assert torch.equal(a, b.detach())
    assert all(len(opt.state[p]) == 0 for p in lin.parameters())


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_noncontiguous_gradients_are_read_in_logical_order(name):
    init = make_init([(33, 17), (5, 4)], seed=113)
    grads = make_grads([(33, 17), (5, 4)], 3, seed=114)
    hp = dict(lr=0.05, momentum=0.9) if name == "SGD" else dict(lr=1e-2)
    pa, pb = leaves(init), leaves(init)
    oa, ob = MS[name](pa, fingerprint=True, **hp), MS[name](pb, fingerprint=True, **hp)
    for step, g in enumerate(grads):
        set_grads(pa, g)
        # same values, other strides: column-major, and a broadcast (stride 0) one
        pb[0].grad = g[0].t().contiguous().t()
        pb[1].grad = torch.full((1, 1), 0.25).expand(5, 4) if step == 1 else g[1].t().contiguous().t()
        if step == 1:
            pa[1].grad = torch.full((5, 4), 0.25)
        assert not pb[0].grad.is_contiguous() and not pb[1].grad.is_contiguous()
        oa.step()
        ob.step()
        assert_bitwise_same(snapshot(pa, oa), snapshot(pb, ob), f"step {step}")
        for a, b in zip(pa, pb):
            assert ob.fingerprints(b)["grad"] == memstate.fingerprint(b.grad) == oa.fingerprints(a)["grad"]


# Non-contiguous parameters (channels_last, slices) are stepped since issue 11: tests/test_optim_layouts.py.


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_nonfinite_check_finds_every_position_and_nothing_else(dtype, threads):
    """The native NaN/Inf pass: any position (chunk starts/ends, tails), any thread count and
    chunk size; the most extreme finite values, subnormals and -0.0 are not flagged."""
    C = _ext.load()
    before = C.optim_chunk_elems()
    fi = torch.finfo(dtype)
    shapes = [(5,), (10_007,), ()]
    base = make_grads(shapes, 1, dtype, seed=115)[0]
    extremes = torch.tensor([fi.max, -fi.max, fi.tiny, fi.tiny * fi.eps, -0.0], dtype=torch.float64).to(dtype)
    base[1][:5] = extremes
    try:
        for n_threads, chunk in ((1, 8), (2, 8), (2, 16384), (1, 1 << 20)):
            threads(n_threads)
            C.set_optim_chunk_elems(chunk)
            params = leaves(make_init(shapes, dtype, seed=116))
            opt = mo.SGD(params, lr=0.1, skip_if_nonfinite=True)
            set_grads(params, base)
            loss = opt.step(lambda: 3.5)
            assert loss == 3.5 and opt.last_step_skipped is False, (n_threads, chunk)
            for which, where in [(0, 0), (0, 4), (1, 0), (1, 7), (1, 8), (1, 4095), (1, 10_006), (2, 0)]:
                for bad in (float("nan"), float("inf"), float("-inf")):
                    g = [x.clone() for x in base]
                    g[which].view(-1)[where] = bad
                    set_grads(params, g)
                    snap = [p.detach().clone() for p in params]
                    assert opt.step(lambda: 4.5) == 4.5  # the closure's loss, even when skipped
                    assert opt.last_step_skipped is True, (n_threads, chunk, which, where, bad)
                    assert all(torch.equal(a, b.detach()) for a, b in zip(snap, params))
    finally:
        C.set_optim_chunk_elems(before)


SKIP_CASES = [
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    ("Adam", dict(lr=1e-2, amsgrad=True, weight_decay=1e-2)),
    ("AdamW", dict(lr=1e-2)),
]
SKIP_SHAPES = SHAPES + [(20_001,)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name, hp", SKIP_CASES, ids=[n for n, _ in SKIP_CASES])
def test_skip_if_nonfinite_modifies_nothing(name, hp, bad):
    groups = lambda ps: split_groups(ps, [(3, {}), (len(ps) - 3, {"lr": hp["lr"] / 2})])  # noqa: E731
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        init = make_init(SKIP_SHAPES, dtype, seed=110)
        grads = make_grads(SKIP_SHAPES, 6, dtype, seed=111)
        pm, pr = leaves(init), leaves(init)
        opt = MS[name](groups(pm), skip_if_nonfinite=True, **hp)
        ref = MS[name](groups(pr), **hp)  # sees only the finite steps

        def poisoned(step_grads, which, where):
            out = [g.clone() for g in step_grads]
            out[which].view(-1)[where] = bad
            return out

        # a bad first step: not even the state is created
        set_grads(pm, poisoned(grads[0], 0, 0))  # the 0-d parameter
        opt.step()
        assert opt.last_step_skipped is True and opt.skipped_steps == 1
        assert all(torch.equal(a.detach(), b) for a, b in zip(pm, init))
        assert all(len(opt.state[p]) == 0 for p in pm)
        # finite steps, then bad ones at other places (second group; the last element of a
        # tensor that spans several chunks; the middle of a matrix)
        for step in range(1, 4):
            set_grads(pm, grads[step])
            set_grads(pr, grads[step])
            opt.step()
            ref.step()
            assert opt.last_step_skipped is False
        for k, (which, where) in enumerate([(len(pm) - 1, -1), (4, 280), (len(pm) - 1, 12345)]):
            before = snapshot(pm, opt)
            set_grads(pm, poisoned(grads[4], which, where))
            opt.step()
            assert opt.last_step_skipped is True and opt.skipped_steps == 2 + k, (dtype, k)
            assert_bitwise_same(before, snapshot(pm, opt), f"{dtype}: skipped step {k}")
        # a finite step proceeds, exactly as if the bad ones had never happened
        set_grads(pm, grads[5])
        set_grads(pr, grads[5])
        opt.step()
        ref.step()
        assert opt.last_step_skipped is False and opt.skipped_steps == 4
        assert_bitwise_same(snapshot(pm, opt), snapshot(pr, ref), f"{dtype}: after the skipped steps")


def test_nonfinite_gradient_without_skip_flag_is_applied_like_torch():
    for name in ("SGD", "Adam"):
        pm, pt = leaves(make_init([(9,)], seed=112)), leaves(make_init([(9,)], seed=112))
        om, ot = MS[name](pm, lr=0.1), torch_opt(name, pt, lr=0.1)
        g = torch.ones(9)
        g[3] = float("nan")
        set_grads(pm, [g])
        set_grads(pt, [g])
        om.step()
        ot.step()
        assert om.last_step_skipped is False and om.skipped_steps == 0
        assert torch.equal(torch.isnan(pm[0]), torch.isnan(pt[0])) and torch.isnan(pm[0][3])
        torch.testing.assert_close(pm[0].detach(), pt[0].detach(), equal_nan=True)


# ----------------------------------------------------------------------------------------- precision

def _random_bits(n, dtype, gen):
    return torch.randint(-2**15, 2**15, (n,), generator=gen, dtype=torch.int32).to(torch.int16).view(dtype)


def _special_values(dtype):
    fi = torch.finfo(dtype)
    vals = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), fi.max, -fi.max, fi.tiny, -fi.tiny,
            fi.smallest_normal / 2, fi.tiny * fi.eps, -fi.tiny * fi.eps, 1.0, -1.0, 1.0 + fi.eps, fi.eps / 2,
            fi.max / 2, fi.max * (1 - fi.eps / 2)]
    return torch.tensor(vals, dtype=torch.float64).to(dtype)


def _assert_same_bits_or_both_nan(got, want, what):
    gn, wn = torch.isnan(got), torch.isnan(want)
    assert torch.equal(gn, wn), f"{what}: NaN positions differ at {(gn != wn).nonzero()[:5].flatten().tolist()}"
    g16, w16 = got[~gn].view(torch.int16), want[~wn].view(torch.int16)
    bad = (g16 != w16).nonzero().flatten()
    assert bad.numel() == 0, (
        f"{what}: {bad.numel()} values differ, e.g. got {got[~gn][bad[:4]].tolist()} "
        f"want {want[~wn][bad[:4]].tolist()}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_kernel_rounding_to_16_bit_equals_torch(dtype):
    """SGD with lr=1 and grad=-delta computes p - 1*(-delta) = p + delta in float32 and rounds it
    once to the parameter dtype: that must be torch's (p.float() + delta.float()).to(dtype)."""
    gen = torch.Generator().manual_seed(120)
    n = 1 << 18
    p = _random_bits(n, dtype, gen)  # every class: subnormal, normal, huge, inf, NaN
    # deltas a few binades below p put the float32 sum's bits right at the rounding position
    # (ties included); some fully random ones too
    shift = torch.randint(0, 26, (n,), generator=gen).to(torch.float32)
    frac = torch.randint(-2**8, 2**8, (n,), generator=gen).to(torch.float32) / 2**8
    near = torch.ldexp(p.float().nan_to_num(0.0, 0.0, 0.0) * frac, -shift).to(dtype)
    delta = torch.where(torch.rand(n, generator=gen) < 0.75, near, _random_bits(n, dtype, gen))
    sp = _special_values(dtype)
    p = torch.cat([p, sp.repeat_interleave(len(sp))])
    delta = torch.cat([delta, sp.repeat(len(sp))])
    # exact ties: p + half an ulp of p (when representable)
    for e in (-20, -3, 0, 5, 15):
        base = torch.tensor([2.0 ** e * (1 + k / 8) for k in range(8)], dtype=torch.float64)
        ulp = base * torch.finfo(dtype).eps
        p = torch.cat([p, base.to(dtype), base.to(dtype), -base.to(dtype)])
        delta = torch.cat([delta, (ulp / 2).to(dtype), (ulp * 1.5).to(dtype), -(ulp / 2).to(dtype)])
    want = (p.float() + delta.float()).to(dtype)
    param = torch.nn.Parameter(p.clone())
    opt = mo.SGD([param], lr=1.0)
    param.grad = -delta
    opt.step()
    _assert_same_bits_or_both_nan(param.detach(), want, f"{dtype}: p + delta")
    # NaN stays NaN, overflow goes to inf, the sum of opposite infinities is NaN
    assert torch.isnan(param[torch.isnan(p)]).all()
    assert torch.isinf(want).any() and torch.isnan(want[~torch.isnan(p) & ~torch.isnan(delta)]).any()
    sub = (want != 0) & (want.abs() < torch.finfo(dtype).smallest_normal)
    assert sub.sum() > 100  # plenty of subnormal results were checked


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("lr", [1 / 3, 0.7071067811865476, 1e-3, 3e5, 1e-30])
def test_kernel_rounding_of_arbitrary_float32_values_equals_torch(dtype, lr):
    """p - lr*g with an arbitrary float32 lr gives float32 values with all 24 bits in use (and
    float32 subnormals / overflow for the extreme lrs): rounded once, as torch's .to(dtype)."""
    gen = torch.Generator().manual_seed(121)
    n = 1 << 16
    p = torch.where(torch.rand(n, generator=gen) < 0.3, torch.zeros((), dtype=dtype), _random_bits(n, dtype, gen))
    g = _random_bits(n, dtype, gen)
    lr32 = torch.tensor(lr, dtype=torch.float64).to(torch.float32)
    with torch.no_grad():
        want = (p.float() - lr32 * g.float()).to(dtype)
    param = torch.nn.Parameter(p.clone())
    param.grad = g.clone()
    mo.SGD([param], lr=lr).step()
    _assert_same_bits_or_both_nan(param.detach(), want, f"{dtype}, lr={lr}")


# ----------------------------------------------------------------------------------------- CUDA

CUDA_CASES = [
    ("SGD", dict(lr=0.05)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.3, maximize=True)),
    ("Adam", dict(lr=1e-2, amsgrad=True, weight_decay=1e-2)),
    ("Adam", dict(lr=1e-2, maximize=True)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
]
CUDA_SHAPES = SHAPES + [(70_001,), (200_003,)]  # many chunks / blocks per tensor
FUSED_CASES = CUDA_CASES + [("AdamW", dict(lr=1e-2, maximize=True))]


def _cuda_pair(name, hp, dtype, shapes, steps, seed):
    init = make_init(shapes, dtype, seed=seed)
    grads = make_grads(shapes, steps, dtype, seed=seed + 1)
    groups = lambda ps: split_groups(ps, [(3, {}), (len(ps) - 3, {"lr": hp["lr"] / 2})])  # noqa: E731
    pc, pg = leaves(init), leaves(init, "cuda")
    oc = MS[name](groups(pc), fingerprint=True, **hp)
    og = MS[name](groups(pg), fingerprint=True, **hp)
    return init, grads, pc, oc, pg, og


def _assert_cpu_equals_cuda(pc, oc, pg, og, what):
    for i, (a, b) in enumerate(zip(pc, pg)):
        assert b.is_cuda and _nan_equal(a.detach(), b.detach().cpu()), f"{what}: param {i}"
    sc, sg = state_tensors(oc), state_tensors(og)
    assert sc.keys() == sg.keys(), what
    for k in sc:
        assert _nan_equal(sc[k], sg[k].cpu()), f"{what}: {k}"
    for i, (a, b) in enumerate(zip(pc, pg)):
        assert oc.fingerprints(a) == og.fingerprints(b), f"{what}: in-pass fingerprints of param {i}"
        assert og.fingerprints(b)["param"] == memstate.fingerprint(a), f"{what}: param {i}"
    assert oc.state_fingerprint() == og.state_fingerprint(), what
    assert memstate.fingerprint_state(oc).digest == memstate.fingerprint_state(og).digest, what


def assert_cuda_equals_cpu_for_every_chunk_size(cls, hp, shapes):
    """CPU and CUDA steps of ``cls`` give the same bits (parameters, state, in-pass and state
    fingerprints) for work items from 8 elements (many per tensor) to 1M, over two groups."""
    C = _ext.load()
    before = C.optim_chunk_elems()
    groups = lambda ps: split_groups(ps, [(3, {}), (len(ps) - 3, {"lr": hp["lr"] / 2})])  # noqa: E731
    try:
        for chunk in (8, 64, 1000, 16384, 1 << 20):
            C.set_optim_chunk_elems(chunk)
            init = make_init(shapes, seed=210)
            grads = make_grads(shapes, 3, seed=211)
            pc, pg = leaves(init), leaves(init, "cuda")
            oc, og = cls(groups(pc), fingerprint=True, **hp), cls(groups(pg), fingerprint=True, **hp)
            run(oc, pc, grads)
            run(og, pg, grads)
            _assert_cpu_equals_cuda(pc, oc, pg, og, f"chunk {chunk}")
    finally:
        C.set_optim_chunk_elems(before)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name, hp", CUDA_CASES, ids=[f"{n}-{combo_id(h)}" for n, h in CUDA_CASES])
def test_cuda_equals_cpu_bitwise_for_100_steps(name, hp, dtype):
    init, grads, pc, oc, pg, og = _cuda_pair(name, hp, dtype, CUDA_SHAPES, 100, seed=200)
    for step, g in enumerate(grads):
        set_grads(pc, g)
        set_grads(pg, g)
        oc.step()
        og.step()
        if step % 25 == 24 or step == 0:
            _assert_cpu_equals_cuda(pc, oc, pg, og, f"{name} {dtype} step {step + 1}")
    assert not torch.equal(pc[-1].detach(), init[-1])


@pytest.mark.cuda
@pytest.mark.parametrize("name, hp", [CUDA_CASES[1], CUDA_CASES[3], CUDA_CASES[5]],
                         ids=[f"{n}-{combo_id(h)}" for n, h in (CUDA_CASES[1], CUDA_CASES[3], CUDA_CASES[5])])
def test_cuda_equals_cpu_for_every_chunk_size(name, hp):
    assert_cuda_equals_cpu_for_every_chunk_size(MS[name], hp, CUDA_SHAPES)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name, hp", FUSED_CASES, ids=[f"{n}-{combo_id(h)}" for n, h in FUSED_CASES])
def test_cuda_close_to_torch_fused(name, hp, dtype):
    init = make_init(SHAPES + [(70_001,)], dtype, seed=220)
    grads = make_grads(SHAPES + [(70_001,)], 40, dtype, seed=221)
    pm, pt = leaves(init, "cuda"), leaves(init, "cuda")
    om = MS[name](pm, **hp)
    ot = TORCH[name](pt, fused=True, **hp)
    run(om, pm, grads)
    run(ot, pt, grads)
    if dtype == torch.float32:
        # torch's fused kernels use FMA and their own op order (the foreach=False path does not),
        # so where momentum makes an element cancel towards zero the absolute difference can pass
        # 1e-6 (seen with torch's fused CPU kernels: 1.5e-6 on a value of 0.018 after 40 steps).
        assert_close_to_torch(pm, om, pt, ot, RTOL32, 1e-5, "vs torch fused")
    else:
        # torch's fused kernels also do the math in float32 and round once per stored tensor,
        # so the only differences are op order/FMA: far inside the bound used for foreach=False.
        for i, (a, b) in enumerate(zip(pm, pt)):
            assert _ulps(a, b) <= LOWP_ULPS[dtype], f"param {i}: {_ulps(a, b):.1f} ulps"


@pytest.mark.cuda
def test_cuda_and_cpu_params_in_one_group():
    shapes = [(7,), (33, 17), (1,), (1001,), (3, 5)]
    devices = ["cpu", "cuda", "cuda", "cpu", "cuda"]
    dtypes = [torch.float32, torch.float32, torch.bfloat16, torch.bfloat16, torch.float32]
    init = [make_init([s], dt, seed=230 + i)[0] for i, (s, dt) in enumerate(zip(shapes, dtypes))]
    grads = make_grads(shapes, 20, dtypes, seed=231)
    for name, hp in CUDA_CASES:
        pm = [torch.nn.Parameter(t.clone().to(d)) for t, d in zip(init, devices)]
        pc, pt = leaves(init), [torch.nn.Parameter(t.clone().to(d)) for t, d in zip(init, devices)]
        om = MS[name](pm, fingerprint=True, skip_if_nonfinite=True, **hp)
        oc = MS[name](pc, fingerprint=True, **hp)
        ot = torch_opt(name, pt, **hp)
        for step, g in enumerate(grads):
            if step == 7:  # a NaN in one CUDA gradient skips the whole step, on every device
                bad = [x.clone() for x in g]
                bad[1][3, 4] = float("nan")
                before = snapshot(pm, om)
                set_grads(pm, bad)
                om.step()
                assert om.last_step_skipped
                assert_bitwise_same(before, snapshot(pm, om), "skipped")
            set_grads(pm, g)
            set_grads(pc, g)
            set_grads(pt, g)
            om.step()
            oc.step()
            ot.step()
        for i, (a, b, c) in enumerate(zip(pm, pc, pt)):
            assert a.device.type == devices[i]
            assert _nan_equal(a.detach().cpu(), b.detach()), (name, i)  # CPU == CUDA, whatever the grouping
            assert om.fingerprints(a) == oc.fingerprints(b), (name, i)
            if a.dtype == torch.float32:
                torch.testing.assert_close(a.detach().cpu(), c.detach().cpu(), rtol=RTOL32, atol=ATOL32)
            else:
                assert _ulps(a, c) <= LOWP_ULPS[a.dtype], (name, i)
