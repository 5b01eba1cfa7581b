"""RngContract: history-free named streams, the consumption log, contract checks, state."""
import gc
import json
import struct

import numpy as np
import pytest
import torch
import xxhash

from memstate import rng as msrng
from memstate.rng import ContractViolation, RngContract, UnknownStreamError


def _reference_seed(root, stream, positional=(), named=None):
    """The documented memstate.rng.v1 byte layout, written out independently."""
    b = b"memstate.rng.v1\0" + struct.pack("<Q", root % 2**64)
    s = stream.encode()
    b += struct.pack("<I", len(s)) + s
    for v in positional:
        b += struct.pack("<I", 0) + struct.pack("<Q", v % 2**64)
    for k, v in sorted((named or {}).items()):
        kb = k.encode()
        b += struct.pack("<I", len(kb)) + kb + struct.pack("<Q", v % 2**64)
    return xxhash.xxh3_64_intdigest(b)


# ----------------------------------------------------------------------------------- seeds
def test_seed_matches_documented_layout():
    c = RngContract(1234, register=False)
    assert c.seed("augment", step=7) == _reference_seed(1234, "augment", named={"step": 7})
    assert c.seed("data", 3, 4) == _reference_seed(1234, "data", (3, 4))
    assert c.seed("data", 3, epoch=1, b=-2) == _reference_seed(1234, "data", (3,), {"epoch": 1, "b": -2})
    assert c.seed("init") == _reference_seed(1234, "init")
    neg = RngContract(-5, register=False)
    assert neg.seed("model", step=2**63) == _reference_seed(-5, "model", named={"step": 2**63})
    # two's complement: -1 and 2^64-1 are the same root seed
    assert RngContract(-1, register=False).seed("init") == RngContract(2**64 - 1, register=False).seed("init")


def test_seed_index_semantics():
    c = RngContract(0, register=False)
    assert c.seed("data", 3) != c.seed("data", epoch=3)  # positional and keyword never collide
    assert c.seed("data", a=1, b=2) == c.seed("data", b=2, a=1)  # keyword order is irrelevant
    assert c.seed("data", 1, 2) != c.seed("data", 2, 1)
    assert c.seed("data", step=1) != c.seed("augment", step=1)
    assert RngContract(1, register=False).seed("data", step=1) != c.seed("data", step=1)
    seeds = {c.seed("augment", step=t) for t in range(1000)}
    assert len(seeds) == 1000
    assert c.log == []  # seed() is not a draw


def test_generators_are_pure_and_history_free():
    a = RngContract(42, register=False)
    b = RngContract(42, register=False)
    for t in range(10):  # b hands out many other generators first
        b.generator("augment", step=t).seed()
        b.numpy("data", epoch=t).random()
    x = torch.rand(8, generator=a.generator("augment", step=3))
    y = torch.rand(8, generator=b.generator("augment", step=3))
    assert torch.equal(x, y)
    assert torch.equal(torch.rand(8, generator=a.generator("augment", step=3)), x)  # again, same draws
    assert not torch.equal(torch.rand(8, generator=a.generator("augment", step=4)), x)
    assert not torch.equal(torch.rand(8, generator=a.generator("model", step=3)), x)
    na = a.numpy("augment", step=3).random(8)
    nb = b.numpy("augment", step=3).random(8)
    np.testing.assert_array_equal(na, nb)
    assert not np.array_equal(a.numpy("augment", step=5).random(8), na)
    g = a.generator("augment", step=3)
    assert g.initial_seed() == a.seed("augment", step=3)
    assert isinstance(a.numpy("init").bit_generator, np.random.PCG64)


def test_unknown_stream_lists_valid_names():
    c = RngContract(0, streams=("data", "noise"), register=False)
    for call in (lambda: c.seed("augment"), lambda: c.generator("augment", step=1), lambda: c.numpy("x")):
        with pytest.raises(UnknownStreamError) as e:
            call()
        assert "data, noise" in str(e.value)
    with pytest.raises(KeyError):
        c.seed("nope")
    with pytest.raises(ValueError, match="'model'.*data, noise"):
        with c.step(0):
            pass
    assert c.log == []


@pytest.mark.parametrize("bad, exc", [(1.0, TypeError), (True, TypeError), ("3", TypeError),
                                      (2**64, ValueError), (-(2**63) - 1, ValueError)])
def test_bad_index_and_seed_named(bad, exc):
    c = RngContract(0, register=False)
    with pytest.raises(exc, match="step"):
        c.generator("data", step=bad)
    with pytest.raises(exc, match=r"index\[0\]"):
        c.numpy("data", bad)
    with pytest.raises(exc, match="root_seed"):
        RngContract(bad, register=False)
    assert c.log == []


def test_bad_streams():
    with pytest.raises(ValueError, match="twice"):
        RngContract(0, ("a", "a"), register=False)
    with pytest.raises(ValueError, match="at least one"):
        RngContract(0, (), register=False)
    with pytest.raises(TypeError, match="string"):
        RngContract(0, "data", register=False)
    with pytest.raises(ValueError, match=r"streams\[1\]"):
        RngContract(0, ("a", ""), register=False)


# ----------------------------------------------------------------------------------- log
def test_log_records_every_generator_and_hashes():
    c = RngContract(7, register=False)
    c.generator("augment", step=3)
    c.numpy("data", 5)
    c.generator("init", 1, layer=2)
    with c.step(4):
        pass
    assert c.log == [("augment", (("step", 3),)), ("data", (5,)), ("init", (1, ("layer", 2))),
                     ("model", (("step", 4),))]
    d = RngContract(7, register=False)
    d.generator("augment", step=3)
    d.numpy("data", 5)
    d.generator("init", 1, layer=2)
    with d.step(4):
        pass
    h = c.log_hash()
    assert len(h) == 32 and h == d.log_hash()
    d.generator("augment", step=3)
    assert d.log_hash() != h
    assert RngContract(8, register=False).log_hash() != RngContract(7, register=False).log_hash()  # root seed
    d.clear_log()
    assert d.log == [] and d.log_hash() == RngContract(7, register=False).log_hash()
    log = c.log
    log.append(("x", ()))  # .log is a copy
    assert len(c.log) == 4


def test_compare_logs_names_first_difference():
    a = RngContract(0, register=False)
    b = RngContract(0, register=False)
    for t in range(5):
        a.generator("augment", step=t)
        b.generator("augment", step=t)
        a.generator("data", epoch=0)
        b.generator("data", epoch=0 if t < 3 else 1)
    b.generator("perturb", step=2)
    assert RngContract.compare_logs(a, a.log) == {}
    diff = RngContract.compare_logs(a, b)
    assert set(diff) == {"data", "perturb"}
    assert diff["data"] == {"position": 3, "a": (("epoch", 0),), "b": (("epoch", 1),), "count_a": 5, "count_b": 5}
    assert diff["perturb"] == {"position": 0, "a": None, "b": (("step", 2),), "count_a": 0, "count_b": 1}
    # the JSON form of the log compares the same
    assert RngContract.compare_logs(json.loads(json.dumps(a.state_dict()["log"])), b.log) == diff


def test_compare_ignores_interleaving_across_streams():
    a = RngContract(0, register=False)
    b = RngContract(0, register=False)
    a.generator("data", epoch=0)
    a.generator("augment", step=0)
    b.generator("augment", step=0)
    b.generator("data", epoch=0)
    assert RngContract.compare_logs(a, b) == {}
    RngContract.check(a, b)


def test_check_reports_stream_and_step():
    control = RngContract(3, register=False)
    treat = RngContract(3, register=False)
    for t in range(6):
        for c in (control, treat):
            with c.step(t):
                pass
            c.generator("augment", step=t)
    treat.generator("perturb", step=2)
    assert RngContract.check(control.log, treat.log, may_change=("perturb",)) is None
    assert RngContract.check(control, treat, may_change="perturb") is None  # one name as a string
    with pytest.raises(ContractViolation, match=r"'perturb'.*step=2") as e:
        RngContract.check(control.log, treat.log)
    assert isinstance(e.value, AssertionError)
    assert e.value.violations == [{"stream": "perturb", "position": 0, "control": None,
                                   "treatment": (("step", 2),), "control_count": 0, "treatment_count": 1}]
    # the treatment also shifts an augmentation draw and skips a model step: two violations
    treat.clear_log()
    for t in range(6):
        with treat.step(t if t != 4 else 5):
            pass
        treat.generator("augment", step=t + (t >= 2))
    with pytest.raises(ContractViolation) as e:
        RngContract.check(control, treat, may_change=("perturb",))
    msg = str(e.value)
    assert "'augment'" in msg and "control drew step=2, treatment drew step=3" in msg
    assert "'model'" in msg and "control drew step=4, treatment drew step=5" in msg
    assert [v["stream"] for v in e.value.violations] == ["augment", "model"]
    assert RngContract.check(control, treat, may_change=("augment", "model")) is None


# ----------------------------------------------------------------------------------- step()
def test_step_seeds_dropout_and_restores_global_state():
    c = RngContract(11, register=False)
    drop = torch.nn.Dropout(0.5)
    x = torch.ones(64)
    torch.manual_seed(99)
    before = torch.get_rng_state()
    with c.step(5) as s:
        assert s == c.seed("model", step=5)
        m5 = drop(x)
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(3)  # move the global state: step() must not depend on it
    with c.step(5):
        assert torch.equal(drop(x), m5)
    with c.step(6):
        assert not torch.equal(drop(x), m5)
    torch.manual_seed(1)
    expected = torch.rand(4)
    torch.manual_seed(1)
    with pytest.raises(RuntimeError, match="boom"):
        with c.step(7):
            torch.rand(100)
            raise RuntimeError("boom")
    assert torch.equal(torch.rand(4), expected)  # restored on the error path too
    assert c.log[-1] == ("model", (("step", 7),))
    # the global seed equals the model stream's generator
    with c.step(8):
        a = torch.rand(5)
    assert torch.equal(a, torch.rand(5, generator=c.generator("model", step=8)))


# ----------------------------------------------------------------------------------- state
def test_state_dict_roundtrip_json():
    c = RngContract(2**64 - 3, streams=("data", "model", "aug"), name="state-rt", register=False)
    c.generator("aug", 1, step=2)
    with c.step(3):
        pass
    sd = json.loads(json.dumps(c.state_dict()))
    d = RngContract(0, register=False)
    d.load_state_dict(sd)
    assert (d.root_seed, d.streams, d.name, d.log) == (c.root_seed, c.streams, c.name, c.log)
    assert d.log_hash() == c.log_hash()
    assert d.seed("aug", step=1) == c.seed("aug", step=1)


@pytest.mark.parametrize("field, value, match", [
    ("root_seed", 1.5, "root_seed"), ("streams", ["a", "a"], "streams"), ("name", "", "name"),
    ("log", [["nope", []]], "nope"), ("log", [["data", [["step", "x"]]]], "step"), ("version", 99, "version")])
def test_load_state_dict_bad_input_changes_nothing(field, value, match):
    c = RngContract(5, register=False)
    c.generator("data", epoch=1)
    before = c.state_dict()
    sd = RngContract(6, register=False).state_dict()
    sd[field] = value
    with pytest.raises((ValueError, TypeError), match=match):
        c.load_state_dict(sd)
    assert c.state_dict() == before


def test_registry_active_state_and_load():
    c = RngContract(21, name="test-reg-a")
    p = RngContract(22, name="test-reg-private", register=False)
    c.generator("augment", step=1)
    assert "test-reg-a" in msrng.active_names()
    assert "test-reg-private" not in msrng.active_names()
    state = json.loads(json.dumps(msrng.active_state()))
    assert state["test-reg-a"] == c.state_dict()
    c.generator("augment", step=2)
    c.clear_log()
    msrng.load_active_state({"test-reg-a": state["test-reg-a"]})
    assert c.log == [("augment", (("step", 1),))]
    # unknown names are named, nothing is loaded
    c.generator("data", epoch=0)
    with pytest.raises(ValueError, match="'test-reg-missing'"):
        msrng.load_active_state({"test-reg-a": state["test-reg-a"], "test-reg-missing": state["test-reg-a"]})
    assert len(c.log) == 2
    # two live contracts of one name: capture refuses to guess
    twin = RngContract(0, name="test-reg-a")
    with pytest.raises(ValueError, match="test-reg-a"):
        msrng.active_state()
    del twin
    gc.collect()
    assert msrng.active_state()["test-reg-a"]["root_seed"] == 21
    # weak references: a dropped contract leaves the registry
    del c
    gc.collect()
    assert "test-reg-a" not in msrng.active_names()
    del p


def test_snapshot_captures_contract_state():
    from memstate.snapshot import Snapshot

    c = RngContract(31, name="test-snap")
    c.generator("augment", step=9)
    snap = Snapshot.capture(torch.nn.Linear(2, 2))
    assert snap._meta["rng"]["memstate"]["test-snap"] == c.state_dict()
    del c
    gc.collect()
