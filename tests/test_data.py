"""OrderSampler: policies, purity, exact mid-epoch resume, hashes, overrides."""
import json

import numpy as np
import pytest
import torch
import xxhash
from torch.utils.data import DataLoader, TensorDataset

from memstate.data import POLICIES, OrderSampler, ids_hash
from memstate.rng import RngContract


def _contract(seed=0):
    return RngContract(seed, register=False)


def _take(it, k):
    return [next(it) for _ in range(k)]


# ----------------------------------------------------------------------------------- policies
def test_rr_is_a_fresh_permutation_each_epoch():
    s = OrderSampler(100, 10, policy="rr", contract=_contract(1))
    orders = [s.epoch_order(e) for e in range(4)]
    for o in orders:
        assert sorted(o) == list(range(100))
    assert len({tuple(o) for o in orders}) == 4
    assert orders[0] != list(range(100))
    # drawn from the contract's data stream at epoch=e
    g = _contract(1).generator("data", epoch=2)
    assert orders[2] == torch.randperm(100, generator=g).tolist()


def test_wr_so_fixed():
    wr = OrderSampler(100, 10, policy="wr", contract=_contract(1))
    o = wr.epoch_order(0)
    assert len(o) == 100 and all(0 <= i < 100 for i in o)
    assert len(set(o)) < 100  # repeats: not a permutation
    assert wr.epoch_order(1) != o
    so = OrderSampler(100, 10, policy="so", contract=_contract(1))
    assert sorted(so.epoch_order(0)) == list(range(100))
    assert so.epoch_order(0) != list(range(100))
    assert all(so.epoch_order(e) == so.epoch_order(0) for e in range(1, 4))
    assert so.epoch_order(0) == OrderSampler(100, 10, policy="rr", contract=_contract(1)).epoch_order(0)
    fixed = OrderSampler(100, 10, policy="fixed")
    assert all(fixed.epoch_order(e) == list(range(100)) for e in range(3))
    assert list(fixed) == [list(range(i, i + 10)) for i in range(0, 100, 10)]


def test_order_is_pure_function_of_contract_and_epoch():
    c = RngContract(5, register=False)
    a = OrderSampler(50, 7, contract=c)
    late = [a.epoch_order(e) for e in (3, 0, 2)]
    for t in range(20):  # the contract hands out other generators in between
        c.generator("data", epoch=t)
        c.generator("augment", step=t)
    b = OrderSampler(50, 7, contract=RngContract(5, register=False))
    assert [b.epoch_order(e) for e in (3, 0, 2)] == late
    assert [a.epoch_order(e) for e in (3, 0, 2)] == late
    assert OrderSampler(50, 7, contract=_contract(6)).epoch_order(0) != late[1]
    # internal draws are not logged in the contract's consumption log
    c.clear_log()
    list(a)
    a.order_hash(9)
    assert c.log == []


def test_batches_and_drop_last():
    s = OrderSampler(23, 5, contract=_contract(2))
    assert len(s) == s.batches_per_epoch == 5
    batches = list(s)
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    assert sum(batches, []) == s.epoch_order(0)
    assert s.epoch == 1 and s.position == 0 and s.step == 5
    d = OrderSampler(23, 5, contract=_contract(2), drop_last=True)
    assert len(d) == 4
    batches = list(d)
    assert [len(b) for b in batches] == [5] * 4
    assert sum(batches, []) == d.epoch_order(0)[:20]
    assert d.batch(4) == d.epoch_order(1)[:5]  # step 4 is the first batch of epoch 1
    with pytest.raises(ValueError, match="no batches"):
        OrderSampler(3, 5, drop_last=True)


def test_bad_arguments():
    with pytest.raises(ValueError, match="rr, wr, so, fixed"):
        OrderSampler(10, 2, policy="random")
    with pytest.raises(ValueError, match="batch_size"):
        OrderSampler(10, 0)
    with pytest.raises(ValueError, match="n "):
        OrderSampler(0, 2)
    with pytest.raises(TypeError, match="contract"):
        OrderSampler(10, 2, contract=0)
    with pytest.raises(KeyError, match="model"):  # the contract must serve a 'data' stream
        OrderSampler(10, 2, contract=RngContract(0, streams=("model",), register=False))
    OrderSampler(10, 2, policy="fixed", contract=RngContract(0, streams=("model",), register=False))
    assert POLICIES == ("rr", "wr", "so", "fixed")


# ----------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("policy", POLICIES)
def test_exact_mid_epoch_resume_at_every_step(policy):
    n, bs = 17, 4  # 5 batches per epoch, last one short
    ref = OrderSampler(n, bs, policy=policy, contract=_contract(3))
    full = []
    for _ in range(3):
        full += list(ref)
    for k in range(len(full) + 1):
        s = OrderSampler(n, bs, policy=policy, contract=_contract(3))
        seen = []
        while len(seen) < k:  # iterate across epoch boundaries, as a training loop does
            it = iter(s)
            for b in it:
                seen.append(b)
                if len(seen) == k:
                    break
        sd = json.loads(json.dumps(s.state_dict()))
        assert s.step == k
        r = OrderSampler(n, bs, policy=policy, contract=_contract(3))
        r.load_state_dict(sd)
        rest = []
        while len(seen) + len(rest) < len(full):
            rest += list(r)
        assert seen + rest == full, k


def test_resume_through_dataloader():
    n, bs = 30, 4
    data = TensorDataset(torch.arange(n) * 10)
    ref = OrderSampler(n, bs, contract=_contract(4))
    want = [b[0].tolist() for e in range(2) for b in DataLoader(data, batch_sampler=ref)]
    s = OrderSampler(n, bs, contract=_contract(4))
    got = []
    for b in DataLoader(data, batch_sampler=s):
        got.append(b[0].tolist())
        if len(got) == 3:
            break
    sd = s.state_dict()
    r = OrderSampler(n, bs, contract=_contract(4))
    r.load_state_dict(sd)
    loader = DataLoader(data, batch_sampler=r)
    rest = [b[0].tolist() for b in loader]  # the remaining batches of epoch 0
    assert len(rest) == len(r) - 3
    rest += [b[0].tolist() for b in loader]  # epoch 1
    assert got + rest == want
    assert want[0] == [10 * i for i in ref.batch(0)]


def test_set_epoch_and_load_state_dict_validation():
    s = OrderSampler(20, 3, contract=_contract(0))
    it = iter(s)
    _take(it, 2)
    s.set_epoch(0)  # same epoch: keeps the position (resume-friendly)
    assert s.position == 2
    s.set_epoch(3)
    assert (s.epoch, s.position, s.step) == (3, 0, 21)
    assert next(iter(s)) == s.epoch_order(3)[:3]
    before = s.state_dict()
    for field, value in (("n", 21), ("batch_size", 4), ("policy", "wr"), ("drop_last", True),
                         ("root_seed", 1)):
        sd = dict(before, **{field: value})
        with pytest.raises(ValueError, match=repr(field)):
            s.load_state_dict(sd)
    with pytest.raises(ValueError, match="position"):
        s.load_state_dict(dict(before, position=7))
    with pytest.raises(ValueError, match="step 5"):
        s.load_state_dict(dict(before, epoch=0, overrides=[[5, [1, 99]]]))
    assert s.state_dict() == before  # nothing half-applied


# ----------------------------------------------------------------------------------- hashes
def test_order_and_window_hashes():
    a = OrderSampler(40, 8, contract=_contract(7))
    b = OrderSampler(40, 8, contract=_contract(7))
    c = OrderSampler(40, 8, contract=_contract(8))
    o = a.epoch_order(1)
    manual = xxhash.xxh3_64_hexdigest(b"".join(int(i).to_bytes(8, "little", signed=True) for i in o))
    assert a.order_hash(1) == manual == ids_hash(o) and len(manual) == 16
    assert a.order_hash(1) == b.order_hash(1)
    assert a.order_hash(1) != a.order_hash(2)
    assert a.order_hash(1) != c.order_hash(1)
    w = a.window_hash(3, 4)  # steps 3..6 span epochs 0 and 1
    ids = sum((a.batch(s) for s in range(3, 7)), [])
    assert w == ids_hash(ids) == b.window_hash(3, 4)
    assert w != a.window_hash(4, 4) and w != c.window_hash(3, 4)
    assert a.window_hash(5, 5) == ids_hash(o)  # epoch 1 is steps 5..9
    assert a.window_hash(0, 0) == xxhash.xxh3_64_hexdigest(b"")


# ----------------------------------------------------------------------------------- overrides
def test_override_window():
    s = OrderSampler(20, 4, contract=_contract(9))
    plain = [s.batch(t) for t in range(10)]
    h_order, h_window = s.order_hash(0), s.window_hash(2, 2)
    s.override_window(2, [[0, 0, 1, 1], np.array([19, 18, 17, 16])])
    assert s.batch(2) == [0, 0, 1, 1] and s.batch(3) == [19, 18, 17, 16]
    assert [s.batch(t) for t in (0, 1, 4, 5)] == [plain[t] for t in (0, 1, 4, 5)]
    assert s.overrides == {2: [0, 0, 1, 1], 3: [19, 18, 17, 16]}
    assert s.order_hash(0) == h_order  # the epoch order is untouched
    assert s.window_hash(2, 2) != h_window
    assert s.window_hash(2, 2) == ids_hash([0, 0, 1, 1, 19, 18, 17, 16])
    assert list(s) == plain[:2] + [[0, 0, 1, 1], [19, 18, 17, 16], plain[4]]
    # an override of a later epoch's step, carried through state_dict
    s.override_window(7, [torch.tensor([5, 5, 5])])
    r = OrderSampler(20, 4, contract=_contract(9))
    r.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert r.overrides == s.overrides
    assert list(r) == [plain[5], plain[6], [5, 5, 5], plain[8], plain[9]]
    # bad ids name the step; nothing is applied
    with pytest.raises(ValueError, match="step 11.*20"):
        s.override_window(10, [[1, 2, 3, 4], [1, 20, 3, 4]])
    with pytest.raises(ValueError, match="step 10.*empty"):
        s.override_window(10, [[]])
    with pytest.raises(TypeError, match="step 10"):
        s.override_window(10, [[1.5]])
    assert 10 not in s.overrides and 11 not in s.overrides
    s.clear_overrides()
    assert s.overrides == {} and s.batch(2) == plain[2]
