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


# ---------------------------------------------------------------- the native CopyPlan


@pytest.fixture(params=["pybind", "torchbind"])
def native_plan(request):
    """The CopyPlan constructor of one binding: memstate._C.CopyPlan (what Snapshot uses) or
    torch.classes.memstate.CopyPlan (the same C++ class, for TorchScript)."""
    memstate._ext.ops()
    cls = memstate._ext.load().CopyPlan if request.param == "pybind" else torch.classes.memstate.CopyPlan
    return lambda sources, slots, bump=(): cls(list(sources), list(slots), list(bump))


def test_recapture_and_restore_use_one_native_plan_per_device():
    net, opt = make()
    train(net, opt)
    snap = Snapshot.capture(net, opt)
    assert snap._plans is not None and len(snap._plans) == 1
    plan = snap._plans[0][3]
    n_static = len(snap._bound.tensors)
    assert plan.num_sources() == n_static and plan.num_slots() == len(snap.names)  # + the RNG state tensor
    train(net, opt)
    snap.recapture()
    want = state_of(net, opt)
    train(net, opt)
    snap.restore()
    assert snap._plans[0][3] is plan
    assert_state(net, opt, want)
    train(net, opt)
    snap.restore()
    assert_state(net, opt, want)


def test_native_plan_copies_fingerprints_and_bumps_versions(native_plan):
    g = torch.Generator().manual_seed(3)
    srcs = [torch.randn(5, 7, generator=g), torch.randint(0, 100, (13,), generator=g, dtype=torch.int16),
            torch.empty(0), torch.randn(3, dtype=torch.float64, generator=g)]
    dyn = torch.randn(4, 2, generator=g).t()  # a dynamic tensor may be any layout
    arena = torch.zeros(4096, dtype=torch.uint8)
    sizes = [t.numel() * t.element_size() for t in srcs] + [dyn.numel() * dyn.element_size()]
    slots, off = [], 0
    for nb in sizes:
        slots.append(arena[off:off + nb])
        off += (nb + 63) // 64 * 64
    plan = native_plan(srcs, slots, [0])
    rows = plan.capture([dyn], True)
    assert torch.equal(rows, memstate._ext.ops().fingerprint(srcs + [dyn]))
    for t, s in zip(srcs + [dyn.contiguous()], slots):
        assert torch.equal(s, t.reshape(-1).view(torch.uint8) if t.numel() else s)
    want = [t.clone() for t in srcs]
    v0, v1 = srcs[0]._version, srcs[1]._version
    for t in srcs:
        t.zero_() if t.numel() else None
    v0, v1 = srcs[0]._version, srcs[1]._version
    back = plan.restore()
    assert torch.equal(back, rows[:len(srcs)])
    assert all(torch.equal(a, b) for a, b in zip(srcs, want))
    assert srcs[0]._version > v0 and srcs[1]._version == v1  # only the listed sources are bumped
    assert plan.capture([dyn], False).numel() == 0


@pytest.mark.parametrize("change", ["resize_larger", "resize_smaller", "set_", "data", "view", "free_storage",
                                    "dtype"])
def test_stale_native_plan_never_copies(change, native_plan):
    """A tensor changed after the plan was built: capture() and restore() copy nothing (no write
    through an old pointer, no read or write of a wrong byte count) and return None."""
    t = torch.arange(16, dtype=torch.float32)
    other = torch.arange(16, dtype=torch.float32)
    arena = torch.full((128,), 7, dtype=torch.uint8)
    slot = arena[:64]
    plan = native_plan([t, other], [slot, arena[64:]])
    assert plan.stale() == -1
    if change == "resize_larger":
        t.resize_(4096)
    elif change == "resize_smaller":
        t.resize_(4)
    elif change == "set_":
        t.set_(torch.zeros(16))
    elif change == "data":
        t.data = torch.zeros(16)
    elif change == "view":
        t.data = t.data.view(4, 4)  # same memory, another shape
    elif change == "free_storage":
        t.untyped_storage().resize_(0)
    else:
        t.data = torch.zeros(16, dtype=torch.int32)  # same byte count, another dtype
    before_arena = arena.clone()
    before_t = t.reshape(-1).view(torch.uint8).clone() if t.untyped_storage().nbytes() else None
    assert plan.stale() == 0
    assert plan.capture([], True) is None
    assert plan.restore() is None
    assert torch.equal(arena, before_arena)
    if before_t is not None:
        assert torch.equal(t.reshape(-1).view(torch.uint8), before_t)


def test_native_plan_refuses_bad_arguments_naming_the_index(native_plan):
    a, b = torch.zeros(8), torch.zeros(8)
    arena = torch.zeros(128, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=r"sources\[1\] has 32 bytes but slots\[1\] holds 16"):
        native_plan([a, b], [arena[:32], arena[64:80]])
    with pytest.raises(RuntimeError, match=r"slots\[1\].*slots\[0\]|slots\[0\].*slots\[1\]"):
        native_plan([a, b], [arena[:32], arena[16:48]])  # overlapping slots
    with pytest.raises(RuntimeError, match=r"sources\[0\] is not contiguous"):
        native_plan([torch.zeros(4, 2).t()], [arena[:32]])
    with pytest.raises(RuntimeError, match="bump index 5"):
        native_plan([a], [arena[:32]], [5])
    plan = native_plan([a], [arena[:32], arena[64:96]])
    with pytest.raises(RuntimeError, match=r"dynamic\[0\] has 4 bytes but its slot holds 32"):
        plan.capture([torch.zeros(1)], True)
    shared = torch.zeros(16)
    plan = native_plan([shared[:8], shared[4:12]], [arena[:32], arena[64:96]])  # capture may read overlaps
    assert plan.capture([], True) is not None
    with pytest.raises(RuntimeError, match="overlaps"):
        plan.restore()  # but restore would write the same bytes twice


class _Counting:
    """A native plan whose stale()/capture()/restore() calls are recorded."""

    def __init__(self, plan):
        self.plan, self.calls = plan, []

    def stale(self):
        self.calls.append("stale")
        return self.plan.stale()

    def capture(self, dynamic, fingerprint):
        self.calls.append("capture")
        return self.plan.capture(dynamic, fingerprint)

    def restore(self):
        self.calls.append("restore")
        return self.plan.restore()


def count_plan_calls(snap):
    assert snap._plans is not None and len(snap._plans) == 1
    snap._plans = [(a, b, c, _Counting(p)) for a, b, c, p in snap._plans]
    return snap._plans[0][3]


class Counter:
    """A stateful extra: restored through load_state_dict."""

    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, sd):
        self.n = sd["n"]


def test_restore_and_recapture_are_one_native_call():
    """The native restore() compares every held tensor itself: no separate stale() call first."""
    net, opt = make()
    train(net, opt)
    snap = Snapshot.capture(net, opt)
    want = state_of(net, opt)
    calls = count_plan_calls(snap).calls
    train(net, opt)
    snap.restore()
    assert calls == ["restore"]
    assert_state(net, opt, want)
    snap.recapture()
    assert calls == ["restore", "capture"]


@pytest.mark.parametrize("stateful", [False, True])
def test_tensor_swapped_after_capture_restore_writes_the_new_storage(stateful):
    """``p.data = ...`` between capture and restore (same shape): the plan's tensor is stale.
    Without objects restored through load_state_dict, the native restore call finds it and
    writes nothing, and restore() takes the full walk; with one, stale() is asked first. Either
    way the captured values land in the new storage, and the old storage is left alone."""
    net, opt = make("sgd")
    train(net, opt)
    extra = {"counter": Counter()} if stateful else None
    if stateful:
        extra["counter"].n = 7
    snap = Snapshot.capture(net, opt, extra=extra)
    want = state_of(net, opt)
    calls = count_plan_calls(snap).calls
    train(net, opt)
    w = net.fc2.weight
    old = w.data
    old_bytes = old.clone()
    w.data = torch.zeros_like(old)
    if stateful:
        extra["counter"].n = 9
    snap.restore()
    assert_state(net, opt, want)
    assert torch.equal(old, old_bytes)  # nothing written through the stale plan
    assert calls == (["stale"] if stateful else ["restore", "stale"])
    if stateful:
        assert extra["counter"].n == 7


def test_same_objects_compares_identity():
    same = memstate._ext.load().same_objects
    a, b = torch.zeros(1), torch.zeros(1)
    assert same([a, "x", a], [a, "x", a]) and same([], [])
    assert not same([a], [b])  # equal values, another object
    assert not same([a], [a, a]) and not same([a, a], [a])


def test_same_items_compares_dict_entries_and_list_items():
    same = memstate._ext.load().same_items
    a, b = torch.zeros(1), torch.zeros(1)
    d, lst = {"w": a, "b": b}, [a, b]
    keys, values = ["w", "b"], [a, b, a, b]
    assert same([d, lst], keys, values)
    assert same([d, lst], ["".join(["w"]), "b"], values)  # an equal str key, another object
    assert not same([d, lst], keys, [a, b, b, a])  # list order
    assert not same([{"w": a, "b": torch.zeros(1)}, lst], keys, values)  # a value replaced by an equal one
    assert not same([{"b": b, "w": a}, lst], keys, [b, a, a, b])  # keys in another order
    assert not same([{"w": a, "c": b}, lst], keys, values)  # a key renamed
    assert not same([{a: 1}], [torch.zeros(1)], [1])  # non-str keys by identity only
    assert not same([d], keys, values) and not same([d, lst, []], keys, values[:3])  # counts
    assert not same([d, lst + [a]], keys, values)  # a list grew
    assert not same([(a, b)], [], [a, b])  # only dicts and lists


def test_buffer_resized_in_place_after_capture():
    """The snapshot's slot holds 8 floats; the live buffer now holds 100: restore refuses
    (nothing written) and recapture rebuilds the plan for the new size."""
    net, opt = make()
    train(net, opt)
    snap = Snapshot.capture(net, opt)
    want = state_of(net, opt)
    net.bn.running_mean.resize_(100)
    net.bn.running_mean.fill_(5.0)
    live = state_of(net, opt)
    arena = {k: v.clone() for k, v in snap._arenas.items()}
    with pytest.raises(SnapshotError, match="model.bn.running_mean"):
        snap.restore()
    assert_state(net, opt, live)  # nothing live touched
    assert all(torch.equal(arena[k], snap._arenas[k]) for k in arena)
    snap.recapture()
    assert snap.tensor("model.bn.running_mean").shape == (100,)
    assert fingerprint_matches(snap, net, opt)
    want = state_of(net, opt)
    with torch.no_grad():
        for t in list(net.parameters()) + [net.bn.running_mean]:
            t.add_(1)
    snap.restore()
    assert_state(net, opt, want)


def test_optimizer_state_tensor_replaced_between_captures():
    net, opt = make()
    train(net, opt)
    snap = Snapshot.capture(net, opt)
    p = net.fc1.weight
    opt.state[p]["exp_avg"] = torch.full_like(p, 0.5)  # a new tensor under the same key
    snap.recapture()
    assert torch.equal(snap.tensor("optimizer.state.0.exp_avg"), torch.full_like(p, 0.5))
    want = state_of(net, opt)
    train(net, opt)
    snap.restore()
    assert_state(net, opt, want)
    assert opt.state[p]["exp_avg"].eq(0.5).all()


def test_parameter_data_replaced_restore_writes_the_new_storage():
    net, opt = make("sgd")
    train(net, opt)
    snap = Snapshot.capture(net, opt)
    w = net.fc2.weight
    old = w.data
    w.data = w.data.clone() * 2  # same object, new storage
    snap.recapture()
    want = state_of(net, opt)
    with torch.no_grad():
        w.add_(1)
    snap.restore()
    assert_state(net, opt, want)
    assert not torch.equal(old, w.data)


def test_rng_state_is_converted_lazily():
    net, opt = make()
    np.random.seed(5)
    random.seed(5)
    snap = Snapshot.capture(net, opt)
    assert snap._meta["rng"].raw() is not None  # numpy/Python states kept as the generators returned them
    snap.restore()
    assert snap._meta["rng"].raw() is not None  # restore used them directly
    np_keys = np.random.get_state()[1].tolist()
    py_state = list(random.getstate()[1])
    assert snap._meta["rng"]["numpy"]["keys"] == np_keys and snap._meta["rng"]["python"]["state"] == py_state
    assert snap._meta["rng"].raw() is None  # read once: the JSON tree is the state now
    np.random.rand(3)
    random.random()
    snap.restore()
    assert np.random.get_state()[1].tolist() == np_keys and list(random.getstate()[1]) == py_state


@pytest.mark.parametrize("total", [200, 9 << 20])  # 9 MiB: the non-temporal (streaming) stores
def test_fused_copy_matches_the_reference_on_every_isa_and_alignment(total, native_plan):
    """The copy + fingerprint hashes the registers it stores (AVX2, streaming stores for large
    copies, unaligned stores for a misaligned destination) or the copied bytes (scalar): every
    path gives the reference fingerprint and an exact copy."""
    from memstate import reference as ref

    C = memstate._ext.load()
    ops = memstate._ext.ops()
    g = torch.Generator().manual_seed(total)
    srcs = [torch.randint(0, 256, (total // 2 + 5,), dtype=torch.uint8, generator=g),
            torch.randint(0, 256, (total // 2 - 5,), dtype=torch.uint8, generator=g)[3:]]  # misaligned source
    want = [ref.fingerprint_lanes(t) for t in srcs]
    arena = torch.empty(total + 256, dtype=torch.uint8)
    before = C.fingerprint_chunk_bytes()
    try:
        for isa in C.build_info()["cpu_isas"].split(","):
            C.set_cpu_isa(isa)
            for shift in (0, 64, 1):  # 32-byte aligned and misaligned destinations
                dsts = [arena[shift:shift + srcs[0].numel()],
                        arena[shift + srcs[0].numel() + 64:shift + srcs[0].numel() + 64 + srcs[1].numel()]]
                for chunk in (4096, 1 << 19):
                    C.set_fingerprint_chunk_bytes(chunk)
                    arena.fill_(0)
                    rows = ops.copy_fingerprint(srcs, dsts, True)
                    got = [((a & (2**64 - 1)), (b & (2**64 - 1))) for a, b in rows.tolist()]
                    assert got == want, (isa, shift, chunk)
                    assert all(torch.equal(s, d) for s, d in zip(srcs, dsts)), (isa, shift, chunk)
                    plan = native_plan(srcs, dsts)
                    arena.fill_(0)
                    assert torch.equal(plan.capture([], True), rows), (isa, shift, chunk)
                    assert all(torch.equal(s, d) for s, d in zip(srcs, dsts)), (isa, shift, chunk)
    finally:
        C.set_cpu_isa("auto")
        C.set_fingerprint_chunk_bytes(before)


@pytest.mark.cuda
def test_native_plan_on_cuda_matches_the_op_and_refuses_when_stale(native_plan):
    """The CUDA plan (tables uploaded once) copies and fingerprints like copy_fingerprint, over
    several calls and both directions, and copies nothing once a tensor changed."""
    ops = memstate._ext.ops()
    g = torch.Generator().manual_seed(11)
    srcs = [torch.randn(n, generator=g).cuda() for n in (1, 17, 70_001, 300_000)]
    srcs.append(torch.randint(0, 9, (33,), dtype=torch.int16, generator=g).cuda())
    dyn = torch.randn(5, 3, generator=g).cuda().t()
    nbytes = [t.numel() * t.element_size() for t in srcs] + [dyn.numel() * dyn.element_size()]
    arena = torch.zeros(sum((nb + 63) // 64 * 64 for nb in nbytes), dtype=torch.uint8, device="cuda")
    slots, off = [], 0
    for nb in nbytes:
        slots.append(arena[off:off + nb])
        off += (nb + 63) // 64 * 64
    plan = native_plan(srcs, slots, [0])
    want = ops.fingerprint(srcs + [dyn])
    for _ in range(3):
        assert torch.equal(plan.capture([dyn], True).cpu(), want.cpu())
    want_vals = [t.clone() for t in srcs]
    for t in srcs:
        t.zero_()
    assert torch.equal(plan.restore().cpu(), want[:len(srcs)].cpu())
    assert all(torch.equal(a, b) for a, b in zip(srcs, want_vals))
    srcs[2].data = torch.zeros(70_001, device="cuda")
    before = arena.clone()
    assert plan.stale() == 2 and plan.capture([dyn], True) is None and plan.restore() is None
    torch.cuda.synchronize()
    assert torch.equal(arena, before)


@pytest.mark.cuda
def test_snapshot_plans_on_cuda_restore_exactly():
    torch.manual_seed(0)
    net = Net().cuda()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    x = X.cuda()
    for _ in range(2):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
    snap = Snapshot.capture(net, opt)
    assert snap._plans is not None and len(snap._plans) == 2  # the CUDA tensors, the CPU RNG state
    want = state_of(net, opt)
    for _ in range(2):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
    snap.restore()
    assert_state(net, opt, want)
    assert fingerprint_matches(snap, net, opt)
