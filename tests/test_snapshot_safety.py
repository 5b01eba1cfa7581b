"""Snapshot restores never half-apply and bind optimizer state by parameter name (issue 10,
items 1 and 2): every check of every source runs before the first byte is written."""
import copy
import random

import numpy as np
import pytest
import torch

import memstate
from memstate import OrderSampler, RngContract, Snapshot
from memstate.snapshot import SnapshotError


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)  # same shapes as a: a wrong binding would not be caught by shape

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class Strict:
    """A stateful extra whose state_dict depends on a configuration (like a sampler's size)."""

    def __init__(self, size):
        self.size, self.pos = size, 0

    def state_dict(self):
        return {"size": self.size, "pos": self.pos}

    def validate_state_dict(self, sd):
        if sd["size"] != self.size:
            raise ValueError(f"field 'size' is {sd['size']}, this object's is {self.size}")

    def load_state_dict(self, sd):
        self.validate_state_dict(sd)
        self.pos = sd["pos"]


class Refusing:
    """A stateful object without validate_state_dict whose load_state_dict refuses (generic path)."""

    def __init__(self):
        self.pos = 0
        self.refuse = False

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, sd):
        if self.refuse:
            raise RuntimeError("incompatible state")
        self.pos = sd["pos"]


def train(net, opt, steps=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        net(torch.randn(8, 4, generator=g)).square().mean().backward()
        opt.step()


def everything(net, opt, **objs):
    """Every piece of live state, comparable with ==: tensor fingerprints, state dicts, RNGs."""
    out = {"tensors": memstate.fingerprint_state({"model": net, "optimizer": opt}).digest,
           "groups": repr([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]),
           "torch_rng": torch.get_rng_state().tolist(), "numpy_rng": repr(np.random.get_state()),
           "python_rng": random.getstate(), "contracts": repr(memstate.rng.active_state())}
    for k, o in objs.items():
        out[k] = repr(o.state_dict())
    return out


def make(optim="memstate"):
    torch.manual_seed(0)
    net = Net()
    cls = memstate.optim.AdamW if optim == "memstate" else torch.optim.AdamW
    return net, cls(net.parameters(), lr=1e-2, weight_decay=0.01)


# ----------------------------------------------------------------------- item 1: half-applied restore
def test_issue_example_sampler_batch_size_is_refused_before_anything_is_written(tmp_path):
    net, opt = make()
    train(net, opt)
    Snapshot.capture(net, opt, sampler=OrderSampler(100, 10), rng=False).save(str(tmp_path / "s"))
    train(net, opt)
    sampler = OrderSampler(100, 20)
    before = everything(net, opt, sampler=sampler)
    with pytest.raises(SnapshotError, match="sampler.*batch_size"):
        Snapshot.load(str(tmp_path / "s"), net, opt, sampler=sampler, rng=False).restore()
    assert everything(net, opt, sampler=sampler) == before


def test_restore_refuses_a_changed_stateful_extra_before_writing():
    net, opt = make()
    train(net, opt)
    strict = Strict(10)
    snap = Snapshot.capture(net, opt, extra={"strict": strict})
    train(net, opt)
    strict.size = 20  # its configuration changed: the saved state no longer fits
    before = everything(net, opt, strict=strict)
    with pytest.raises(SnapshotError, match=r"extra\['strict'\].*size"):
        snap.restore()
    assert everything(net, opt, strict=strict) == before


def test_a_refusing_scheduler_rolls_back_the_objects_loaded_before_it():
    net, opt = make()
    train(net, opt)
    sampler, sched = OrderSampler(100, 10), Refusing()
    snap = Snapshot.capture(net, opt, sampler=sampler, scheduler=sched, extra={"strict": Strict(5)})
    sampler.set_epoch(3)
    sched.pos = 7
    train(net, opt)
    sched.refuse = True
    before = everything(net, opt, sampler=sampler, sched=sched)
    with pytest.raises(SnapshotError, match="scheduler: load_state_dict refused.*nothing was restored"):
        snap.restore()
    assert everything(net, opt, sampler=sampler, sched=sched) == before
    sched.refuse = False
    snap.restore()
    assert sampler.epoch == 0 and sched.pos == 0


def test_restore_refuses_a_changed_model_tensor_before_writing():
    net, opt = make()
    train(net, opt)
    snap = Snapshot.capture(net, opt)
    train(net, opt)
    net.b.bias = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    before = everything(net, opt)
    with pytest.raises(SnapshotError, match="model.b.bias"):
        snap.restore()
    assert everything(net, opt) == before


def test_restore_refuses_changed_hyperparameters_when_asked_to_check():
    net, opt = make()
    train(net, opt)
    snap = Snapshot.capture(net, opt)
    train(net, opt)
    opt.param_groups[0]["weight_decay"] = 0.0
    before = everything(net, opt)
    with pytest.raises(SnapshotError, match="param group 0, key 'weight_decay'"):
        snap.restore(hyperparameters="check")
    assert everything(net, opt) == before
    snap.restore(hyperparameters="live")
    assert opt.param_groups[0]["weight_decay"] == 0.0
    snap.restore()  # a captured snapshot rolls its optimizer's hyperparameters back
    assert opt.param_groups[0]["weight_decay"] == 0.01


def test_restore_refuses_an_ambiguous_rng_contract_before_writing():
    net, opt = make()
    c1 = RngContract(1, name="safety-test")
    c1.generator("data", step=0)
    snap = Snapshot.capture(net, opt)
    train(net, opt)
    c2 = RngContract(2, name="safety-test")  # a second live contract of the same name
    before = everything_without_contracts = (memstate.fingerprint_state({"model": net, "optimizer": opt}).digest,
                                             torch.get_rng_state().tolist(), c1.log_hash(), c2.log_hash())
    with pytest.raises(SnapshotError, match="safety-test"):
        snap.restore()
    assert (memstate.fingerprint_state({"model": net, "optimizer": opt}).digest, torch.get_rng_state().tolist(),
            c1.log_hash(), c2.log_hash()) == before == everything_without_contracts
    del c2


def test_restore_refuses_an_invalid_rng_state_before_writing():
    net, opt = make()
    snap = Snapshot.capture(net, opt)
    train(net, opt)
    snap._meta["rng"]["numpy"]["keys"] = [1, 2, 3]  # as a tampered (re-checksummed) manifest could say
    before = everything(net, opt)
    with pytest.raises(SnapshotError, match="rng.numpy"):
        snap.restore()
    assert everything(net, opt) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a process without CUDA devices")
def test_restore_refuses_cuda_rng_states_without_cuda_before_writing():
    net, opt = make()
    snap = Snapshot.capture(net, opt)
    train(net, opt)
    snap._meta["rng"]["cuda_devices"] = 1  # a snapshot taken on a GPU machine
    before = everything(net, opt)
    with pytest.raises(SnapshotError, match="RNG states of 1 CUDA devices, this process has 0"):
        snap.restore()
    assert everything(net, opt) == before


def test_restore_refuses_a_grown_optimizer_before_writing():
    net, opt = make()
    train(net, opt)
    snap = Snapshot.capture(net, opt)
    train(net, opt)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
    before = everything(net, opt)
    with pytest.raises(SnapshotError, match="param group"):
        snap.restore()
    assert everything(net, opt) == before


# ----------------------------------------------------------------------- item 2: binding by identity
@pytest.mark.parametrize("optim", ["memstate", "torch"])
def test_issue_example_regrouped_optimizer_is_refused(tmp_path, optim):
    net, opt = make(optim)
    train(net, opt)
    Snapshot.capture(net, opt, rng=False).save(str(tmp_path / "s"))
    cls = type(opt)
    regrouped = cls([{"params": [net.b.weight, net.b.bias], "weight_decay": 0.0},
                     {"params": [net.a.weight, net.a.bias]}], lr=1e-2, weight_decay=0.01)
    train(net, regrouped)
    before = everything(net, regrouped)
    with pytest.raises(SnapshotError, match="group structure changed"):
        Snapshot.load(str(tmp_path / "s"), net, regrouped, rng=False)
    assert everything(net, regrouped) == before
    # same number of groups, other parameters in each: refused naming the group and the names
    two = cls([{"params": [net.a.weight, net.a.bias]}, {"params": [net.b.weight, net.b.bias]}], lr=1e-2)
    swapped = cls([{"params": [net.b.weight, net.b.bias]}, {"params": [net.a.weight, net.a.bias]}], lr=1e-2)
    Snapshot.capture(net, two, rng=False).save(str(tmp_path / "t"))
    with pytest.raises(SnapshotError, match=r"param group 0: different parameters.*model\.a\.weight.*model\.b\.weight"):
        Snapshot.load(str(tmp_path / "t"), net, swapped, rng=False)


@pytest.mark.parametrize("optim", ["memstate", "torch"])
def test_state_is_bound_by_parameter_name_not_position(tmp_path, optim):
    net, opt = make(optim)
    train(net, opt, steps=3)
    saved_exp_avg = {n: opt.state[p]["exp_avg"].clone() for n, p in net.named_parameters()}
    Snapshot.capture(net, opt, rng=False).save(str(tmp_path / "s"))
    reference = copy.deepcopy(net)
    ref_opt = type(opt)(reference.parameters(), lr=1e-2, weight_decay=0.01)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch shares the tensors otherwise
    # the same single group, listed in another order
    reordered = type(opt)([net.b.weight, net.b.bias, net.a.weight, net.a.bias], lr=1e-2, weight_decay=0.01)
    train(net, opt, steps=2, seed=5)
    Snapshot.load(str(tmp_path / "s"), net, reordered, rng=False).restore()
    for n, p in net.named_parameters():
        assert torch.equal(reordered.state[p]["exp_avg"], saved_exp_avg[n]), n
    train(net, reordered, steps=2, seed=9)
    train(reference, ref_opt, steps=2, seed=9)
    assert memstate.fingerprint_state(net).digest == memstate.fingerprint_state(reference).digest


@pytest.mark.parametrize("optim", ["memstate", "torch"])
def test_loaded_hyperparameters_are_checked_named_and_restored_only_when_asked(tmp_path, optim):
    net, opt = make(optim)
    train(net, opt)
    Snapshot.capture(net, opt, rng=False).save(str(tmp_path / "s"))
    live = type(opt)(net.parameters(), lr=1e-2, weight_decay=0.0)
    before = everything(net, live)
    with pytest.raises(SnapshotError, match="param group 0, key 'weight_decay': the snapshot holds 0.01"):
        Snapshot.load(str(tmp_path / "s"), net, live, rng=False)
    assert everything(net, live) == before
    Snapshot.load(str(tmp_path / "s"), net, live, rng=False, hyperparameters="live").restore()
    assert live.param_groups[0]["weight_decay"] == 0.0
    Snapshot.load(str(tmp_path / "s"), net, live, rng=False, hyperparameters="snapshot").restore()
    assert live.param_groups[0]["weight_decay"] == 0.01
    with pytest.raises(ValueError, match="hyperparameters must be one of"):
        Snapshot.load(str(tmp_path / "s"), net, live, rng=False, hyperparameters="yes")


def test_optimizer_over_parameters_outside_the_model_binds_by_position(tmp_path):
    w = torch.nn.Parameter(torch.ones(3))
    opt = memstate.optim.SGD([w], lr=0.1, momentum=0.9)
    w.grad = torch.ones(3)
    opt.step()
    Snapshot.capture(optimizer=opt, extra={"w": w}, rng=False).save(str(tmp_path / "s"))
    opt.step()
    Snapshot.load(str(tmp_path / "s"), optimizer=opt, extra={"w": w}, rng=False).restore()
    assert torch.equal(w.detach(), torch.full((3,), 0.9))
    v = torch.nn.Parameter(torch.ones(3))  # no name anywhere: bound by position
    opt2 = memstate.optim.SGD([v], lr=0.1, momentum=0.9)
    v.grad = torch.ones(3)
    opt2.step()
    snap = Snapshot.capture(optimizer=opt2, rng=False)
    opt2.step()
    snap.restore()
    assert torch.equal(opt2.state[v]["momentum_buffer"], torch.ones(3))


# ----------------------------------------------------------------------- issue 16 item 3: capture(to="cpu") streams
def test_capture_to_cpu_of_cpu_tensors_still_restores():
    net, opt = make()
    train(net, opt)
    snap = Snapshot.capture(net, opt, to="cpu")
    expect = memstate.fingerprint_state({"model": net, "optimizer": opt}).digest
    assert snap.fingerprint().digest == expect and snap._pending is None  # nothing asynchronous on the CPU
    train(net, opt)
    snap.restore()
    assert memstate.fingerprint_state({"model": net, "optimizer": opt}).digest == expect


@pytest.mark.cuda
def test_capture_to_cpu_is_ordered_before_work_issued_right_after_it():
    """The copies to pinned memory run on a side stream; a long step issued on the current
    stream right after capture() must not overwrite a tensor before it is copied. On every
    visible device (a cuda:1 tensor is copied on a cuda:1 stream)."""
    devices = [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
    torch.manual_seed(0)
    nets = [torch.nn.Linear(4096, 4096).to(d) for d in devices]  # 64 MiB of weights per device
    model = torch.nn.ModuleList(nets)
    opt = memstate.optim.AdamW(model.parameters(), lr=1e-3)
    x = [torch.randn(256, 4096, device=d) for d in devices]
    for _ in range(3):
        opt.zero_grad()
        sum(n(xi).square().mean().cpu() for n, xi in zip(nets, x)).backward()
        opt.step()
        torch.cuda.synchronize()
        expect = memstate.fingerprint_state({"model": model, "optimizer": opt}).digest
        snap = Snapshot.capture(model, opt, rng=False, to="cpu")
        with torch.no_grad():  # a long step, issued at once on the current stream of each device
            opt.step()
            for p in model.parameters():
                for _ in range(20):
                    p.mul_(1.0001)
        snap.restore()  # verifies the arena against the fingerprints taken at capture
        assert memstate.fingerprint_state({"model": model, "optimizer": opt}).digest == expect
        assert snap.fingerprint().digest == expect
