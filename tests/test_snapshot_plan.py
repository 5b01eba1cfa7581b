"""Bound snapshot plans: recapture() and restore() reuse the plan built by the first capture
while the live structure is unchanged, and rebuild it (with exact results) when parameters,
buffers, optimizer state, param groups or extra tensors change between captures."""
import random

import numpy as np
import pytest
import torch

import memstate
from memstate.fingerprint import named_state_tensors
from memstate import Snapshot
from memstate.snapshot import SnapshotError


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 8)
        self.bn = torch.nn.BatchNorm1d(8)
        self.fc2 = torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


X = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))


def make(opt="adamw", seed=0):
    torch.manual_seed(seed)
    net = Net()
    if opt == "adamw":
        o = torch.optim.AdamW(net.parameters(), lr=1e-2)
    else:
        o = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.9)
    return net, o


def train(net, opt, steps=2):
    for _ in range(steps):
        opt.zero_grad()
        net(X).pow(2).mean().backward()
        opt.step()


def state_of(net, opt, extra=None):
    """Every tensor of the state (copies), by snapshot name, plus non-tensor optimizer state."""
    named = named_state_tensors({"model": net, "optimizer": opt, "extra": extra or {}})
    tensors = {n: t.detach().clone() for n, t in named}
    other = {i: {k: v for k, v in st.items() if not isinstance(v, torch.Tensor)}
             for i, st in enumerate(opt.state.get(p, {}) for g in opt.param_groups for p in g["params"])}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return tensors, other, groups


def assert_state(net, opt, want, extra=None):
    tensors, other, groups = state_of(net, opt, extra)
    assert sorted(tensors) == sorted(want[0])
    for n, t in want[0].items():
        assert tensors[n].dtype == t.dtype and tensors[n].shape == t.shape, n
        assert torch.equal(tensors[n].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), n
    assert other == want[1]
    assert groups == want[2]


def fingerprint_matches(snap, net, opt, extra=None):
    live = memstate.fingerprint_state({"model": net, "optimizer": opt, **({"extra": extra} if extra else {})})
    return snap.fingerprint().digest == live.digest


def test_recapture_reuses_the_plan_and_restore_is_exact():
    net, opt = make()
    train(net, opt)
    snap = Snapshot.capture(net, opt)
    plan = snap._bound
    want = state_of(net, opt)
    rng_want = torch.get_rng_state()
    for _ in range(3):
        train(net, opt)
        torch.rand(3)
        snap.restore()
        assert_state(net, opt, want)
        assert torch.equal(torch.get_rng_state(), rng_want)
    train(net, opt)
    snap.recapture()
    assert snap._bound is plan  # same structure: no walk, no rebuild
    assert fingerprint_matches(snap, net, opt)
    want = state_of(net, opt)
    train(net, opt)
    snap.restore()
    assert_state(net, opt, want)


def test_parameter_replaced_between_captures_rebuilds_the_plan():
    net, opt = make("sgd")
    train(net, opt)
    snap = Snapshot.capture(net, rng=False)
    plan = snap._bound
    old = net.fc2.weight
    net.fc2.weight = torch.nn.Parameter(torch.randn(2, 8))  # a new object under the same name
    snap.recapture()
    assert snap._bound is not plan
    assert torch.equal(snap.tensor("model.fc2.weight"), net.fc2.weight.detach())
    want = net.fc2.weight.detach().clone()
    with torch.no_grad():
        net.fc2.weight.add_(1.0)
        old.zero_()
    snap.restore()
    assert torch.equal(net.fc2.weight.detach(), want)  # written into the new parameter
    assert not torch.equal(old.detach(), want)


@pytest.mark.parametrize("change", ["same_shape", "dtype", "dtype_same_size", "shape", "transposed"])
def test_data_swapped_between_captures_is_captured_exactly(change):
    """``t.data = ...`` keeps the object (module.to() does this): the plan notices the new
    dtype or shape; the fused copy reads the new storage and strides as they are."""
    net, _ = make()
    snap = Snapshot.capture(net, rng=False)
    name, t = ("model.bn.running_mean", net.bn.running_mean) if change == "dtype_same_size" else \
        ("model.fc1.weight", net.fc1.weight)
    new = {"same_shape": lambda: torch.randn(8, 6),
           "dtype": lambda: torch.randn(8, 6, dtype=torch.float64),
           "dtype_same_size": lambda: torch.randint(0, 9, (8,), dtype=torch.int32),  # 4 bytes, as float32
           "shape": lambda: torch.randn(6, 8),
           "transposed": lambda: torch.randn(6, 8).t()}[change]()
    t.data = new
    snap.recapture()
    got = snap.tensor(name)
    assert got.dtype == new.dtype and got.shape == new.shape and torch.equal(got, new)
    assert snap.fingerprint().digest == memstate.fingerprint_state({"model": net}).digest
    want = new.clone()
    with torch.no_grad():
        t.mul_(3)
    snap.restore()  # a non-contiguous parameter is written through a staging copy
    assert torch.equal(t.detach(), want)


def test_optimizer_state_created_after_the_first_capture():
    net, opt = make()
    snap = Snapshot.capture(net, opt)  # no optimizer state yet
    assert not [n for n in snap.names if n.startswith("optimizer.state")]
    train(net, opt)  # AdamW creates its state
    snap.recapture()
    assert [n for n in snap.names if n.startswith("optimizer.state")]
    assert fingerprint_matches(snap, net, opt)
    want = state_of(net, opt)
    train(net, opt, 3)
    snap.restore()
    assert_state(net, opt, want)


def test_restore_removes_state_created_after_capture():
    net, opt = make()
    snap = Snapshot.capture(net, opt)
    want = state_of(net, opt)
    train(net, opt)
    snap.restore()  # the plan no longer matches the live optimizer: the full path rebuilds its state
    assert not opt.state
    assert_state(net, opt, want)


def test_param_group_added_between_captures():
    net, opt = make()
    train(net, opt)
    snap = Snapshot.capture(net, opt)
    extra_p = torch.nn.Parameter(torch.randn(5))
    net.extra_p = extra_p  # a new parameter of the model, in a new param group
    opt.add_param_group({"params": [extra_p], "lr": 0.5})
    with pytest.raises(SnapshotError):  # the captured snapshot does not hold it
        snap.restore()
    snap.recapture()
    want = state_of(net, opt)
    assert fingerprint_matches(snap, net, opt)
    for _ in range(2):
        opt.zero_grad()
        (net(X).pow(2).mean() + extra_p.pow(2).sum()).backward()
        opt.step()
    opt.param_groups[1]["lr"] = 0.25
    snap.restore()
    assert_state(net, opt, want)


def test_optimizer_load_state_dict_between_captures():
    net, opt = make()
    train(net, opt)
    saved = {k: v for k, v in opt.state_dict().items()}
    saved_copy = {"state": {i: {k: v.clone() for k, v in st.items()} for i, st in saved["state"].items()},
                  "param_groups": [dict(g) for g in saved["param_groups"]]}
    snap = Snapshot.capture(net, opt)
    plan = snap._bound
    train(net, opt)
    opt.load_state_dict(saved_copy)  # new state tensors
    snap.recapture()
    assert snap._bound is not plan
    assert fingerprint_matches(snap, net, opt)
    want = state_of(net, opt)
    train(net, opt)
    snap.restore()
    assert_state(net, opt, want)


def test_non_tensor_optimizer_state_is_restored_on_the_reused_plan():
    class Counting(torch.optim.SGD):
        def step(self, closure=None):
            super().step(closure)
            for g in self.param_groups:
                for p in g["params"]:
                    st = self.state[p]
                    st["n"] = st.get("n", 0) + 1
                    st["note"] = f"step {st['n']}"

    torch.manual_seed(0)
    net = Net()
    opt = Counting(net.parameters(), lr=1e-2, momentum=0.9)
    train(net, opt)
    snap = Snapshot.capture(net, opt)
    want = state_of(net, opt)
    train(net, opt, 3)
    snap.restore()
    assert_state(net, opt, want)
    snap.recapture()  # int and str values change every step; the plan still holds
    train(net, opt)
    snap.restore()
    assert_state(net, opt, want)


def test_buffer_and_submodule_changes():
    net, opt = make()
    train(net, opt)
    snap = Snapshot.capture(net, opt)
    net.register_buffer("ema", torch.zeros(3))
    with pytest.raises(SnapshotError, match="model.ema"):
        snap.restore()  # not captured: refused before anything is written
    snap.recapture()
    assert "model.ema" in snap.names
    net.head = torch.nn.Linear(2, 2)  # a new submodule (not in the optimizer)
    snap.recapture()
    assert "model.head.weight" in snap.names
    want = state_of(net, opt)
    train(net, opt)
    with torch.no_grad():
        net.ema.fill_(7)
        net.head.weight.fill_(3)
    snap.restore()
    assert_state(net, opt, want)


def test_extra_dict_of_tensors_gains_a_key():
    net, opt = make()
    queue = {"q": torch.randn(4)}
    many = {f"t{i}": torch.full((2,), float(i)) for i in range(300)}
    snap = Snapshot.capture(net, opt, extra={"queue": queue, "many": many})
    plan = snap._bound
    snap.recapture()
    assert snap._bound is plan  # a large dict of tensors does not defeat the plan
    queue["ptr"] = torch.zeros((), dtype=torch.long)
    snap.recapture()
    assert "extra.queue.ptr" in snap.names
    want = {k: v.clone() for k, v in queue.items()}
    queue["q"].add_(1)
    queue["ptr"].add_(5)
    snap.restore()
    assert all(torch.equal(queue[k], want[k]) for k in want)


def test_rng_states_restore_exactly_on_the_reused_plan():
    net, opt = make()
    snap = Snapshot.capture(net, opt)
    for _ in range(2):
        torch.manual_seed(1)
        np.random.seed(1)
        random.seed(1)
        snap.recapture()
        a = (torch.rand(3), np.random.rand(3), random.random())
        snap.restore()
        b = (torch.rand(3), np.random.rand(3), random.random())
        assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_device_group_lists_are_built_once():
    net, opt = make()
    train(net, opt)
    snap = Snapshot.capture(net, opt)
    snap.restore()
    groups = snap._groups
    restore_groups = snap._restore_groups
    train(net, opt)
    snap.recapture()
    snap.restore()
    assert snap._groups is groups and snap._restore_groups is restore_groups
