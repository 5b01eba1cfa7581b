"""Perturbation primitives: every primitive's effect, default windows, the single-source check
and errors raised before anything changes."""
import copy
import json
import math

import pytest
import torch
from torch import nn

import memstate.optim as mo
from memstate import perturb as P
from memstate.data import OrderSampler
from memstate.fingerprint import named_state_tensors
from memstate.rng import RngContract
from memstate.perturb import PerturbationError, SingleSourceViolation, TrainState

REQUIRED_NAMES = {
    "null", "reset_momentum", "reset_adam_m", "reset_adam_v", "reset_adam", "scale_state", "reset_ema",
    "order_window_swap", "reverse_window", "policy_switch", "commute_pair", "reset_bn_stats",
    "freeze_bn_stats", "flush_queue", "shuffle_queue", "reset_teacher", "freeze_teacher",
}


# ----------------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def _one_thread(threads):
    threads(1)  # tiny tensors: intra-op threads only add contention on a loaded machine


def _model(bn=True, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(4, 8)] + ([nn.BatchNorm1d(8)] if bn else []) + [nn.ReLU(), nn.Linear(8, 2)]
    return nn.Sequential(*layers)


def _train(model, opt, steps=3):
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        x = torch.randn(16, 4, generator=g)
        y = torch.randn(16, 2, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _state(kind="sgd", bn=True, momentum=0.9, amsgrad=False, sampler=True, contract=True, seed=0):
    model = _model(bn=bn, seed=seed)
    if kind == "sgd":
        opt = mo.SGD(model.parameters(), lr=0.05, momentum=momentum)
    else:
        opt = mo.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.999), amsgrad=amsgrad)
    _train(model, opt)
    c = RngContract(7, name=f"test-perturb-{kind}-{seed}", register=False) if contract else None
    s = OrderSampler(40, 8, policy="rr", contract=c) if sampler else None
    ema = copy.deepcopy(model)
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        for t in list(ema.parameters()) + list(teacher.parameters()):
            t.add_(1.0)  # make the shadows differ from the student
    extra = {"ema": ema, "teacher": teacher, "queue": torch.randn(12, 3, generator=torch.Generator().manual_seed(3)),
             "queue_ptr": torch.tensor(5, dtype=torch.int64), "teacher_decay": 0.996}
    return TrainState(model=model, optimizer=opt, sampler=s, extra=extra, step=10, contract=c)


def _opt_tensors(opt, key):
    return [st[key] for st in opt.state.values() if isinstance(st.get(key), torch.Tensor)]


def _ids(state):
    """ids of every tensor of the state, to prove identity is kept."""
    out = {n: id(t) for n, t in named_state_tensors({"model": state.model, "optimizer": state.optimizer})}
    out.update({k: id(v) for k, v in state.extra.items() if isinstance(v, torch.Tensor)})
    return out


# ----------------------------------------------------------------------------------- half-lives
def test_halflife_values_and_round_trip():
    assert P.halflife(0.9) == pytest.approx(6.5788, abs=1e-4)
    assert P.halflife(0.5) == pytest.approx(1.0)
    assert P.halflife(0.999) == pytest.approx(692.80, abs=0.01)
    for h in (0.5, 1.0, 6.6, 69.0, 1000.0):
        assert P.halflife(P.beta_for_halflife(h)) == pytest.approx(h, rel=1e-12)
    for b in (0.1, 0.9, 0.99, 0.9999):
        assert P.beta_for_halflife(P.halflife(b)) == pytest.approx(b, rel=1e-12)
    assert P.windows_for_halflives(0.9) == 14
    for bad in (0.0, 1.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError):
            P.halflife(bad)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            P.beta_for_halflife(bad)


# ----------------------------------------------------------------------------------- registry
def test_registry_lists_every_primitive_with_metadata():
    assert REQUIRED_NAMES <= set(P.names())
    for name in P.names():
        prim = P.get(name)
        assert prim.name == name
        assert prim.source in P.SOURCES and prim.source_label == P.SOURCES[prim.source]
        assert isinstance(prim.touches, tuple)
        json.dumps(prim.to_json())
    assert P.get("null").source == "none" and P.get("null").touches == ()
    assert {P.get(n).source for n in ("reset_momentum", "reset_adam", "scale_state", "reset_ema")} == {"S1"}
    assert {P.get(n).source for n in ("order_window_swap", "reverse_window", "policy_switch")} == {"S2"}
    assert P.get("commute_pair").source == "S3"
    assert {P.get(n).source for n in ("reset_bn_stats", "freeze_bn_stats", "flush_queue", "shuffle_queue")} == {"S4"}
    assert {P.get(n).source for n in ("reset_teacher", "freeze_teacher")} == {"S5"}


def test_unknown_primitive_lists_valid_names():
    for call in (lambda: P.get("reset_momentun"), lambda: P.apply_checked("nope", _state())):
        with pytest.raises(P.UnknownPrimitiveError) as ei:
            call()
        msg = str(ei.value)
        assert "reset_momentun" in msg or "nope" in msg
        for n in ("reset_momentum", "order_window_swap", "null"):
            assert n in msg
        assert isinstance(ei.value, KeyError) and isinstance(ei.value, ValueError)


def test_register_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        P.register(P.Primitive("null", "none", ()))


# ----------------------------------------------------------------------------------- default windows
def test_default_windows():
    sgd, adam = _state("sgd"), _state("adam")
    assert P.get("reset_momentum").default_window(sgd) == 14          # beta 0.9: 2 * 6.58 -> 14
    assert P.get("scale_state").default_window(sgd, alpha=0.5) == 14
    assert P.get("reset_adam_m").default_window(adam) == 14           # beta1 = 0.9
    assert P.get("reset_adam_v").default_window(adam) == 1386         # beta2 = 0.999
    assert P.get("reset_adam").default_window(adam) == 1386           # the longer of the two
    assert P.get("scale_state").default_window(adam, alpha=0.5, keys=["exp_avg"]) == 14
    assert P.get("scale_state").default_window(adam, alpha=0.5) == 1386
    for name in ("order_window_swap", "reverse_window", "policy_switch"):
        assert P.get(name).default_window(sgd) == sgd.sampler.batches_per_epoch == 5
    assert P.get("commute_pair").default_window(sgd) == 2
    # torch's BN momentum 0.1 weighs the NEW statistic: decay 0.9 -> 14
    assert P.get("reset_bn_stats").default_window(sgd) == 14
    assert P.get("freeze_bn_stats").default_window(sgd) == 14
    sgd.model[1].momentum = 0.01
    assert P.get("reset_bn_stats").default_window(sgd) == math.ceil(2 * P.halflife(0.99))
    # teacher decay from the parameter, else from extra (float or tensor)
    assert P.get("reset_teacher").default_window(sgd) == math.ceil(2 * P.halflife(0.996))
    assert P.get("freeze_teacher").default_window(sgd, teacher_decay=0.9) == 14
    sgd.extra["teacher_decay"] = torch.tensor(0.99, dtype=torch.float64)
    assert P.get("reset_teacher").default_window(sgd) == 138
    assert P.get("reset_ema").default_window(sgd, ema_decay=0.9) == 14
    with pytest.raises(PerturbationError, match="ema_decay"):
        P.get("reset_ema").default_window(sgd)
    # a queue's lifetime is one turnover: 12 entries, 8 per step -> 2
    assert P.get("flush_queue").default_window(sgd) == 2
    assert P.get("shuffle_queue").default_window(sgd, enqueue_size=3) == 4
    assert P.get("null").default_window(sgd) == 1
    assert P.get("null").default_window(sgd, like="reset_momentum") == 14


# ----------------------------------------------------------------------------------- S1
def test_reset_momentum():
    st = _state("sgd")
    bufs = _opt_tensors(st.optimizer, "momentum_buffer")
    assert len(bufs) == 6 and all(b.abs().sum() > 0 for b in bufs)
    ids = _ids(st)
    weights = [p.clone() for p in st.model.parameters()]
    a = P.apply_checked("reset_momentum", st)
    assert all(torch.count_nonzero(b) == 0 for b in bufs)
    assert _opt_tensors(st.optimizer, "momentum_buffer") == bufs and _ids(st) == ids
    assert all(torch.equal(w, p) for w, p in zip(weights, st.model.parameters()))
    assert a.window == (10, 14) and a.source == "S1"
    assert a.changed == [f"optimizer.state.{i}.momentum_buffer" for i in range(6)]
    assert a.digest_before != a.digest_after
    # zeroed buffers with dampening 0: the next step equals a first step (buf = grad)
    json.dumps(a.to_json())


def test_reset_adam_parts():
    st = _state("adam", amsgrad=True)
    m, v, vmax = (_opt_tensors(st.optimizer, k) for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"))
    v_before = [t.clone() for t in v]
    a = P.apply_checked("reset_adam_m", st, window=3)
    assert all(torch.count_nonzero(t) == 0 for t in m)
    assert all(torch.equal(t, b) for t, b in zip(v, v_before))
    assert set(a.changed) == {f"optimizer.state.{i}.exp_avg" for i in range(6)} and a.window == (10, 3)

    st = _state("adam", amsgrad=True)
    vmax = _opt_tensors(st.optimizer, "max_exp_avg_sq")
    a = P.apply_checked("reset_adam_v", st, include_max=False)
    assert all(torch.count_nonzero(t) == 0 for t in _opt_tensors(st.optimizer, "exp_avg_sq"))
    assert all(t.abs().sum() > 0 for t in vmax)
    assert {n.rsplit(".", 1)[1] for n in a.changed} == {"exp_avg_sq"}
    a = P.apply_checked("reset_adam_v", st)
    assert all(torch.count_nonzero(t) == 0 for t in vmax)

    st = _state("adam")
    steps = _opt_tensors(st.optimizer, "step")
    a = P.apply_checked("reset_adam", st)
    assert all(torch.count_nonzero(t) == 0 for k in ("exp_avg", "exp_avg_sq") for t in _opt_tensors(st.optimizer, k))
    assert all(float(s) == 3.0 for s in steps)
    assert {n.rsplit(".", 1)[1] for n in a.changed} == {"exp_avg", "exp_avg_sq"}
    a = P.apply_checked("reset_adam", st, reset_step=True)
    assert all(float(s) == 0.0 for s in steps) and _opt_tensors(st.optimizer, "step") == steps
    assert {n.rsplit(".", 1)[1] for n in a.changed} == {"step"}
    # undeclared: reset_adam without reset_step may not change step
    assert "optimizer.state.*.step" not in P.get("reset_adam").declared(st)
    # training continues from the reset state
    _train(st.model, st.optimizer, steps=1)
    assert all(float(s) == 1.0 for s in steps)


def test_scale_state():
    st = _state("sgd")
    bufs = _opt_tensors(st.optimizer, "momentum_buffer")
    before = [b.clone() for b in bufs]
    a = P.apply_checked("scale_state", st, alpha=0.25)
    assert all(torch.equal(b, 0.25 * c) for b, c in zip(bufs, before))
    assert a.params["alpha"] == 0.25 and a.params["keys"] == ["momentum_buffer"]

    st = _state("adam")
    m, v = _opt_tensors(st.optimizer, "exp_avg"), _opt_tensors(st.optimizer, "exp_avg_sq")
    mb, vb = [t.clone() for t in m], [t.clone() for t in v]
    a = P.apply_checked("scale_state", st, alpha=0.5, keys="exp_avg")
    assert all(torch.equal(t, 0.5 * c) for t, c in zip(m, mb))
    assert all(torch.equal(t, c) for t, c in zip(v, vb))
    assert {n.rsplit(".", 1)[1] for n in a.changed} == {"exp_avg"}
    P.apply_checked("scale_state", st, alpha=2.0)  # keys=None: every moment buffer
    assert all(torch.equal(t, c) for t, c in zip(m, mb)) and all(torch.equal(t, 2 * c) for t, c in zip(v, vb))
    with pytest.raises(PerturbationError, match="exp_avg, exp_avg_sq"):
        P.get("scale_state").check(st, alpha=0.5, keys=["exp_avgg"])
    with pytest.raises(PerturbationError, match="negative"):
        P.get("scale_state").check(st, alpha=-1.0)
    with pytest.raises(PerturbationError, match="alpha"):
        P.get("scale_state").check(st)
    with pytest.raises(PerturbationError, match="momentum"):
        P.get("scale_state").check(st, alpha=0.5, keys=["momentum_buffer"])


def test_reset_ema():
    st = _state("sgd")
    ema = st.extra["ema"]
    assert not torch.equal(ema[0].weight, st.model[0].weight)
    ids = _ids(st)
    a = P.apply_checked("reset_ema", st, ema_decay=0.99)
    for (n, t), (n2, s) in zip(named_state_tensors(ema), named_state_tensors(st.model)):
        assert n == n2 and torch.equal(t, s) and t.data_ptr() != s.data_ptr()
    assert a.window == (10, 138) and all(n.startswith("extra.ema.") for n in a.changed)
    assert _ids(st) == ids
    # an AveragedModel's tensors live under .module
    st = _state("sgd")
    avg = torch.optim.swa_utils.AveragedModel(st.extra["ema"])
    st.extra["ema"] = avg
    P.apply_checked("reset_ema", st, window=5)
    assert torch.equal(avg.module[0].weight, st.model[0].weight)


# ----------------------------------------------------------------------------------- S2 / S3
def test_order_window_swap_same_multiset_fresh_order():
    st = _state("sgd")
    s, start = st.sampler, st.step
    orig = [s.batch(t) for t in range(start, start + 5)]
    weights = st.fingerprint()
    a = P.apply_checked("order_window_swap", st)
    new = [s.batch(t) for t in range(start, start + 5)]
    assert a.window == (10, 5) and a.changed == ["sampler.window"]
    assert [len(b) for b in new] == [len(b) for b in orig]
    assert sorted(i for b in new for i in b) == sorted(i for b in orig for i in b)
    assert new != orig
    assert s.batch(start - 1) == OrderSampler(40, 8, contract=st.contract).batch(start - 1)  # outside: as before
    assert sorted(s.overrides) == list(range(start, start + 5))
    # only the window pseudo-entry changed: model and optimizer untouched
    assert [n for n in weights.diff(st.fingerprint())] == ["sampler.window"]
    # drawn from the contract's perturb stream, logged; reproducible across arms
    assert any(stream == "perturb" for stream, _ in st.contract.log)
    twin = _state("sgd")
    P.apply_checked("order_window_swap", twin)
    assert twin.sampler.overrides == s.overrides
    assert twin.sampler.window_hash(10, 5) == s.window_hash(10, 5)
    # a different seed gives a different permutation
    other = _state("sgd")
    b = P.apply_checked("order_window_swap", other, seed=123)
    assert other.sampler.overrides != s.overrides and b.params["rng"] == "seed 123"
    assert a.params["rng"].startswith("contract")


def test_order_window_swap_without_contract_is_deterministic():
    a, b = _state("sgd", contract=False), _state("sgd", contract=False)
    ra = P.apply_checked("order_window_swap", a, window=3)
    P.apply_checked("order_window_swap", b, window=3)
    assert a.sampler.overrides == b.sampler.overrides
    assert ra.params["rng"].startswith("fallback")


def test_reverse_window():
    st = _state("sgd")
    orig = [st.sampler.batch(t) for t in range(10, 15)]
    a = P.apply_checked("reverse_window", st)
    assert [st.sampler.batch(t) for t in range(10, 15)] == orig[::-1]
    assert a.changed == ["sampler.window"]


def test_policy_switch_rr_to_wr_and_back():
    st = _state("sgd")
    a = P.apply_checked("policy_switch", st)
    assert a.params["from"] == "rr" and a.params["to"] == "wr"
    new = [st.sampler.batch(t) for t in range(10, 15)]
    assert [len(b) for b in new] == [8] * 5
    flat = [i for b in new for i in b]
    assert all(0 <= i < 40 for i in flat) and len(set(flat)) < 40  # draws with replacement repeat
    assert st.sampler.policy == "rr"  # the sampler's own policy is unchanged: only the window
    assert a.changed == ["sampler.window"]
    # wr -> rr: a window of one epoch is a permutation of the dataset
    c = RngContract(3, name="test-perturb-wr", register=False)
    wr = TrainState(sampler=OrderSampler(40, 8, policy="wr", contract=c), step=0, contract=c)
    a = P.apply_checked("policy_switch", wr)
    assert a.params["to"] == "rr"
    assert sorted(i for t in range(5) for i in wr.sampler.batch(t)) == list(range(40))
    with pytest.raises(PerturbationError, match="already uses"):
        P.get("policy_switch").check(wr, to="wr")


def test_commute_pair():
    st = _state("sgd")
    a0, b0 = st.sampler.batch(10), st.sampler.batch(11)
    a = P.apply_checked("commute_pair", st)
    assert (st.sampler.batch(10), st.sampler.batch(11)) == (b0, a0)
    assert a.window == (10, 2) and a.source == "S3" and a.changed == ["sampler.window"]
    with pytest.raises(PerturbationError, match="window must be 2"):
        P.get("commute_pair").apply(_state("sgd"), window=3)


# ----------------------------------------------------------------------------------- S4
def test_reset_bn_stats():
    st = _state("sgd")
    bn = st.model[1]
    ids = _ids(st)
    assert bn.num_batches_tracked.item() == 3
    a = P.apply_checked("reset_bn_stats", st)
    assert torch.count_nonzero(bn.running_mean) == 0 and torch.equal(bn.running_var, torch.ones(8))
    assert bn.num_batches_tracked.item() == 0
    assert set(a.changed) == {"model.1.running_mean", "model.1.running_var", "model.1.num_batches_tracked"}
    assert _ids(st) == ids


def test_freeze_bn_stats_for_the_window():
    st = _state("sgd")
    bn = st.model[1]
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    a = P.apply_checked("freeze_bn_stats", st, window=4)
    assert a.changed == [] and a.has_finish and bn.momentum == 0.0
    _train(st.model, st.optimizer, steps=4)  # the hold window: stats do not move
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert bn.num_batches_tracked.item() == 7
    a.finish(st)
    assert bn.momentum == 0.1 and bn.num_batches_tracked.item() == 3
    a.finish(st)  # idempotent
    _train(st.model, st.optimizer, steps=1)
    assert not torch.equal(bn.running_mean, mean)
    # a cumulative average (momentum=None) has no half-life; freezing it restores None
    bn.momentum = None
    with pytest.raises(PerturbationError, match="momentum=None"):
        P.get("freeze_bn_stats").default_window(st)
    a = P.apply_checked("freeze_bn_stats", st, window=2)
    _train(st.model, st.optimizer, steps=2)
    a.finish(st)
    assert bn.momentum is None and bn.num_batches_tracked.item() == 4


def test_flush_and_shuffle_queue():
    st = _state("sgd")
    q, ptr = st.extra["queue"], st.extra["queue_ptr"]
    rows = q.clone()
    a = P.apply_checked("shuffle_queue", st)
    assert q is st.extra["queue"] and not torch.equal(q, rows)
    assert sorted(map(tuple, q.tolist())) == sorted(map(tuple, rows.tolist()))
    assert ptr.item() == 5 and a.changed == ["extra.queue"]
    twin = _state("sgd")
    P.apply_checked("shuffle_queue", twin)
    assert torch.equal(twin.extra["queue"], q)
    a = P.apply_checked("flush_queue", st)
    assert torch.count_nonzero(q) == 0 and ptr.item() == 0 and ptr is st.extra["queue_ptr"]
    assert a.changed == ["extra.queue", "extra.queue_ptr"]


# ----------------------------------------------------------------------------------- S5
def test_reset_teacher():
    st = _state("sgd")
    t = st.extra["teacher"]
    a = P.apply_checked("reset_teacher", st)
    for (n, x), (_, y) in zip(named_state_tensors(t), named_state_tensors(st.model)):
        assert torch.equal(x, y)
    assert a.window == (10, math.ceil(2 * P.halflife(0.996)))
    assert all(n.startswith("extra.teacher.") for n in a.changed) and a.changed


def test_freeze_teacher_flag():
    st = _state("sgd")
    assert not P.teacher_frozen(st)
    a = P.apply_checked("freeze_teacher", st, window=6)
    assert P.teacher_frozen(st) and a.changed == ["extra.teacher_frozen"] and a.end == 16
    flag = st.extra["teacher_frozen"]
    with pytest.raises(PerturbationError, match="already frozen"):
        P.get("freeze_teacher").check(st)
    a.finish(st)
    assert not P.teacher_frozen(st) and st.extra["teacher_frozen"] is flag
    P.apply_checked("freeze_teacher", st, window=6)  # the existing flag is reused in place
    assert st.extra["teacher_frozen"] is flag and P.teacher_frozen(st)


# ----------------------------------------------------------------------------------- null + check
def test_null_leaves_digest_unchanged():
    st = _state("adam")
    before = st.fingerprint()
    a = P.apply_checked("null", st, like="reset_adam_m")
    assert a.changed == [] and a.digest_before == a.digest_after == before.digest
    assert a.window == (10, 14)
    assert st.fingerprint() == before


def test_fingerprint_covers_sampler_and_extras():
    st = _state("sgd")
    fp = st.fingerprint()
    for n in ("sampler.window", "sampler.state", "model.1.running_mean", "optimizer.state.0.momentum_buffer",
              "extra.ema.0.weight", "extra.teacher.1.running_var", "extra.queue", "extra.queue_ptr"):
        assert n in fp
    assert not any(n.startswith("extra.teacher_decay") for n in fp)  # plain numbers are skipped
    next(iter(st.sampler))  # moving the sampler's position changes sampler.state only
    assert fp.diff(st.fingerprint()) == ["sampler.state"]


def test_single_source_violation_names_the_entry():
    def sloppy(state, p, start, length):
        for st in state.optimizer.state.values():
            st["momentum_buffer"].zero_()
        state.model[0].bias.add_(1.0)  # not declared

    P.register(P.Primitive("test_sloppy_reset", "S1", ("optimizer.state.*.momentum_buffer",), apply_fn=sloppy))
    try:
        assert "test_sloppy_reset" in P.names()
        with pytest.raises(SingleSourceViolation) as ei:
            P.apply_checked("test_sloppy_reset", _state("sgd"))
        assert "model.0.bias" in str(ei.value) and ei.value.undeclared == ["model.0.bias"]
        assert "optimizer.state.0.momentum_buffer" in ei.value.changed
    finally:
        P.unregister("test_sloppy_reset")
    assert "test_sloppy_reset" not in P.names()


def test_check_single_source_directly():
    st = _state("sgd")
    before = st.fingerprint()
    with torch.no_grad():
        st.model[1].running_mean.add_(1)
    after = st.fingerprint()
    assert P.check_single_source(before, after, ("model.*running_mean",)) == ["model.1.running_mean"]
    with pytest.raises(SingleSourceViolation, match="model.1.running_mean"):
        P.check_single_source(before, after, ())


# ----------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name, make, params, match", [
    ("reset_momentum", lambda: _state("sgd", momentum=0.0), {}, "without momentum"),
    ("reset_momentum", lambda: _state("adam"), {}, "reset_adam_m"),
    ("scale_state", lambda: _state("sgd", momentum=0.0), {"alpha": 0.5}, "no moment buffers"),
    ("reset_adam_m", lambda: _state("sgd"), {}, "Adam-family"),
    ("reset_bn_stats", lambda: _state("sgd", bn=False), {}, "no BatchNorm"),
    ("freeze_bn_stats", lambda: _state("sgd", bn=False), {}, "no BatchNorm"),
    ("order_window_swap", lambda: _state("sgd", sampler=False), {}, "needs state.sampler"),
    ("reset_momentum", lambda: _state("sgd"), {"alpha": 1.0}, "unknown parameter"),
    ("reset_ema", lambda: _state("sgd"), {}, "ema_decay"),
])
def test_errors_before_anything_changes(name, make, params, match):
    st = make()
    before = st.fingerprint()
    with pytest.raises(PerturbationError, match=match):
        P.apply_checked(name, st, **params)
    assert st.fingerprint() == before


def test_more_bad_input():
    st = _state("sgd")
    before = st.fingerprint()
    with pytest.raises(PerturbationError, match="valid: include_max, reset_step"):
        P.apply_checked("reset_adam", _state("adam"), reset_steps=True)
    with pytest.raises(PerturbationError, match="window"):
        P.apply_checked("reset_momentum", st, window=0)
    with pytest.raises(PerturbationError, match="no 'teacher'"):
        P.apply_checked("reset_teacher", TrainState(model=st.model), window=3)
    st.extra["queue"] = [1, 2, 3]
    with pytest.raises(PerturbationError, match="must be a tensor"):
        P.apply_checked("flush_queue", st, window=1)
    # a contract without a perturb stream: the error lists its streams
    c = RngContract(1, streams=("data",), name="test-perturb-nostream", register=False)
    st2 = _state("sgd")
    st2.contract = c
    with pytest.raises(PerturbationError, match="streams are data"):
        P.apply_checked("order_window_swap", st2)
    assert st2.sampler.overrides == {}
    # a student/teacher mismatch is found before copying anything
    st3 = _state("sgd")
    st3.extra["teacher"] = _model(bn=False)
    w = st3.extra["teacher"][0].weight.clone()
    with pytest.raises(PerturbationError, match="no counterpart"):
        P.apply_checked("reset_teacher", st3, window=2)
    assert torch.equal(st3.extra["teacher"][0].weight, w)
    del before
