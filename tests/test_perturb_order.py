"""Order perturbations change order, not coverage (issue 9, item 4): every epoch keeps its
multiset of ids under order_window_swap, reverse_window, commute_pair and policy_switch between
permutation policies; windows that could not keep it are refused, naming t0, the window and the
epoch boundaries; policy_switch to or from wr declares that it changes coverage."""
from collections import Counter

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from memstate import perturb as P
from memstate import tasks
from memstate.data import OrderSampler
from memstate.perturb import PerturbationError, TrainState
from memstate.rng import RngContract


@pytest.fixture(autouse=True)
def _one_thread(threads):
    threads(1)


def _state(n, bs, t0, policy="rr", drop_last=False, seed=5):
    c = RngContract(seed, name=f"test-order-{n}-{bs}-{policy}-{drop_last}", register=False)
    return TrainState(sampler=OrderSampler(n, bs, policy=policy, contract=c, drop_last=drop_last), step=t0,
                      contract=c)


def _epoch_ids(sampler, epoch):
    bpe = sampler.batches_per_epoch
    return Counter(i for t in range(epoch * bpe, (epoch + 1) * bpe) for i in sampler.batch(t))


def _epochs_of(sampler, start, length):
    bpe = sampler.batches_per_epoch
    return range(start // bpe, (start + length - 1) // bpe + 1)


def _assert_epochs_keep_ids(control, treatment, start, length):
    for e in _epochs_of(control, start, length):
        assert _epoch_ids(treatment, e) == _epoch_ids(control, e), f"epoch {e} changed its ids"


def _window_ids(sampler, start, length):
    return [list(sampler.batch(t)) for t in range(start, start + length)]


# ----------------------------------------------------------------------------------- the case
def test_digits_t0_30_default_window_ends_at_the_epoch_boundary_and_keeps_epoch_ids():
    task = tasks.get("digits")  # 1400 training ids, batches of 64: 22 batches per epoch, the last of 56
    control, treat = task.build(0), task.build(0)
    control.step = treat.step = 30
    assert treat.sampler.batches_per_epoch == 22
    for name in ("order_window_swap", "reverse_window", "policy_switch"):
        assert P.get(name).default_window(treat) == 14  # steps 30..43: the rest of epoch 1
    a = P.apply_checked("order_window_swap", treat)
    assert a.window == (30, 14) and not a.changes_epoch_ids
    assert _window_ids(treat.sampler, 30, 14) != _window_ids(control.sampler, 30, 14)
    _assert_epochs_keep_ids(control.sampler, treat.sampler, 22, 44)
    # the old 22-step default left 1139 distinct ids of 1400 in each of epochs 1 and 2
    assert [len(_epoch_ids(treat.sampler, e)) for e in (1, 2)] == [1400, 1400]
    # the old default, one epoch of 22 steps from t0 = 30, straddles the boundary at step 44: refused
    for name in ("order_window_swap", "reverse_window"):
        with pytest.raises(PerturbationError) as e:
            P.apply_checked(name, control, window=22)
        msg = str(e.value)
        for part in (f"{name}:", "t0=30", "22 steps", "steps 30..51", "boundary at step 44", "batches_per_epoch=22",
                     "epoch 1 is steps 22..43", "epoch 2 is steps 44..65", "at most 14 step(s)"):
            assert part in msg, (part, msg)
    assert control.sampler.overrides == {}  # refused before anything changed


def test_check_window_refuses_before_training_to_t0():
    state = tasks.get("digits").build(0)  # step 0: nothing trained yet
    prim = P.get("order_window_swap")
    assert prim.check_window(state, start=30) == 14
    assert prim.check_window(state, 14, start=30) == 14
    assert prim.check_window(state) == 22  # at step 0: the whole first epoch
    with pytest.raises(PerturbationError, match=r"t0=30 of 22 steps .* boundary at step 44"):
        prim.check_window(state, 22, start=30)
    with pytest.raises(PerturbationError, match=r"order_window_swap: start must be an int step, got '30'"):
        prim.check_window(state, start="30")
    with pytest.raises(PerturbationError, match=r"state.step must be >= 0, got -1"):
        prim.check_window(state, start=-1)
    with pytest.raises(PerturbationError, match=r"window must be a positive int number of steps, got 0"):
        prim.check_window(state, 0, start=30)
    assert state.step == 0 and state.sampler.overrides == {}  # nothing changed


# ----------------------------------------------------------------------------------- fixed cases
@pytest.mark.parametrize("name", ["order_window_swap", "reverse_window"])
@pytest.mark.parametrize("n, bs, drop_last, t0, window", [
    (40, 8, False, 10, None),   # t0 starts epoch 2: a whole epoch
    (40, 8, False, 12, None),   # mid-epoch: the rest of it, 3 steps
    (43, 8, False, 7, 5),       # a short last batch inside the window
    (43, 8, True, 6, 4),        # drop_last: 5 batches per epoch, 3 ids never used
    (43, 8, True, 10, 5),       # exactly one epoch
    (100, 7, False, 27, 2),
])
def test_swap_and_reverse_keep_every_epochs_ids(name, n, bs, drop_last, t0, window):
    control, treat = _state(n, bs, t0, drop_last=drop_last), _state(n, bs, t0, drop_last=drop_last)
    a = P.apply_checked(name, treat, window=window)
    start, length = a.window
    bpe = treat.sampler.batches_per_epoch
    assert start // bpe == (start + length - 1) // bpe
    if window is None:
        assert start + length == (start // bpe + 1) * bpe  # ends at the epoch boundary after t0
    assert _window_ids(treat.sampler, start, length) != _window_ids(control.sampler, start, length)
    _assert_epochs_keep_ids(control.sampler, treat.sampler, start, length)


@pytest.mark.parametrize("name, t0, window, boundaries", [
    ("order_window_swap", 12, 4, "boundary at step 15"),
    ("reverse_window", 14, 2, "boundary at step 15"),
    ("order_window_swap", 3, 15, "boundaries at step 5, 10, 15"),
    ("reverse_window", 0, 6, "boundary at step 5"),
])
def test_windows_crossing_an_epoch_boundary_are_refused(name, t0, window, boundaries):
    s = _state(40, 8, t0)
    with pytest.raises(PerturbationError, match=boundaries) as e:
        P.apply_checked(name, s, window=window)
    assert f"t0={t0}" in str(e.value) and f"{window} steps" in str(e.value)
    assert s.sampler.overrides == {}


def test_reverse_window_refuses_a_one_step_window():
    s = _state(40, 8, 14)  # the last step of epoch 2: the default window would be 1 step
    with pytest.raises(PerturbationError, match=r"reverse_window: a 1-step window at t0=14 reverses nothing"):
        P.apply_checked("reverse_window", s)
    assert s.sampler.overrides == {}
    assert P.apply_checked("order_window_swap", s).window == (14, 1)  # reorders the ids inside the batch


def test_commute_pair_stays_inside_one_epoch():
    s = _state(40, 8, 9)  # steps 9 and 10 are in epochs 1 and 2
    with pytest.raises(PerturbationError, match=r"commute_pair: .*t0=9.*boundary at step 10"):
        P.apply_checked("commute_pair", s)
    control, treat = _state(40, 8, 8), _state(40, 8, 8)
    P.apply_checked("commute_pair", treat)
    _assert_epochs_keep_ids(control.sampler, treat.sampler, 8, 2)


@pytest.mark.parametrize("policy", ["so", "fixed"])
@pytest.mark.parametrize("n, bs, drop_last, t0, window", [
    (40, 8, False, 12, 9),   # mid-epoch start, crosses two boundaries
    (43, 8, True, 2, 12),    # drop_last
    (40, 8, False, 5, 10),   # two whole epochs
])
def test_policy_switch_to_rr_reshuffles_each_epoch_among_itself(policy, n, bs, drop_last, t0, window):
    control = _state(n, bs, t0, policy=policy, drop_last=drop_last)
    treat = _state(n, bs, t0, policy=policy, drop_last=drop_last)
    prim = P.get("policy_switch")
    assert not prim.changes_epoch_ids({"to": "rr"}, treat)
    a = P.apply_checked("policy_switch", treat, window=window, to="rr")
    assert a.params["from"] == policy and a.params["to"] == "rr" and not a.changes_epoch_ids
    assert a.estimand.text == f"ATE_order = E[M({policy}) - M(rr)]"
    assert _window_ids(treat.sampler, t0, window) != _window_ids(control.sampler, t0, window)
    assert [len(b) for b in _window_ids(treat.sampler, t0, window)] == \
        [len(b) for b in _window_ids(control.sampler, t0, window)]
    _assert_epochs_keep_ids(control.sampler, treat.sampler, t0, window)


def test_policy_switch_from_wr_to_rr_draws_each_epoch_without_replacement():
    s = _state(40, 8, 7, policy="wr")
    assert P.get("policy_switch").changes_epoch_ids({}, s)  # wr -> rr changes coverage by definition
    a = P.apply_checked("policy_switch", s, window=8)  # steps 7..14: 3 steps of epoch 1, all of epoch 2
    assert a.changes_epoch_ids and a.params["to"] == "rr"
    part, whole = _window_ids(s.sampler, 7, 3), _window_ids(s.sampler, 10, 5)
    flat = [i for b in part for i in b]
    assert len(set(flat)) == len(flat) == 24
    assert sorted(i for b in whole for i in b) == list(range(40))  # epoch 2 is a permutation


def test_policy_switch_to_wr_declares_that_it_changes_coverage():
    control, treat = _state(40, 8, 3), _state(40, 8, 3)
    prim = P.get("policy_switch")
    assert prim.changes_epoch_ids({}) and prim.changes_epoch_ids({"to": "wr"}, treat)
    a = P.apply_checked("policy_switch", treat, window=12)  # any window: steps 3..14 cross two boundaries
    assert a.changes_epoch_ids and a.to_json()["changes_epoch_ids"] is True
    assert any(_epoch_ids(treat.sampler, e) != _epoch_ids(control.sampler, e) for e in range(3))


def test_only_policy_switch_may_declare_a_coverage_change():
    for name in P.names():
        if name != "policy_switch":
            assert P.get(name).changes_epoch_ids({}) is False, name


# ----------------------------------------------------------------------------------- property
ORDER = ["order_window_swap", "reverse_window", "commute_pair", "policy_switch"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 50), bs=st.integers(1, 12), drop_last=st.booleans(),
       policy=st.sampled_from(["rr", "wr", "so", "fixed"]), name=st.sampled_from(ORDER),
       to=st.sampled_from([None, "rr", "wr"]), t0_epochs=st.floats(0, 3),
       window=st.one_of(st.none(), st.integers(1, 30)), seed=st.integers(0, 3))
def test_property_refused_or_every_epoch_keeps_its_ids(n, bs, drop_last, policy, name, to, t0_epochs, window, seed):
    assume(not (drop_last and n < bs))
    control = _state(n, bs, 0, policy=policy, drop_last=drop_last, seed=seed)
    treat = _state(n, bs, 0, policy=policy, drop_last=drop_last, seed=seed)
    bpe = treat.sampler.batches_per_epoch
    t0 = int(t0_epochs * bpe)
    control.step = treat.step = t0
    params = {"to": to} if name == "policy_switch" else {}
    if name == "commute_pair" and window is not None and window > 3:
        window = None  # its window is always 2: try mostly that, sometimes 1..3
    prim = P.get(name)
    try:  # check_window gives apply's verdict without applying
        checked = prim.check_window(control, window, **params)
    except PerturbationError as e:
        checked = str(e)
    assert control.sampler.overrides == {}
    try:
        a = P.apply_checked(name, treat, window=window, **params)
    except PerturbationError as e:
        assert treat.sampler.overrides == {}  # nothing changed
        msg = str(e)
        assert checked == msg
        event(f"{name}: refused")
        start, length = t0, window if window is not None else prim.default_window(control, **params)
        if "reverses nothing" in msg:
            assert name == "reverse_window" and length == 1
        elif "crosses the epoch boundar" in msg:  # refused only when the window really crosses one
            assert f"t0={t0}" in msg and start // bpe != (start + length - 1) // bpe
        else:  # a policy switch to the sampler's own policy, or a commute_pair window other than 2
            assert (name == "policy_switch" and "already uses policy" in msg) or \
                (name == "commute_pair" and "window must be 2" in msg), msg
        return
    event(f"{name}: applied, {'declares a coverage change' if a.changes_epoch_ids else 'keeps epoch ids'}")
    start, length = a.window
    assert checked == length
    if window is None and name != "commute_pair":
        assert start + length == (start // bpe + 1) * bpe
    assert a.changes_epoch_ids == prim.changes_epoch_ids(params, control)
    if not a.changes_epoch_ids:
        _assert_epochs_keep_ids(control.sampler, treat.sampler, start, length)
    else:
        assert name == "policy_switch" and "wr" in (a.params["from"], a.params["to"])
