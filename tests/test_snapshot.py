"""Snapshot capture/restore/save/load: exact replay, verification, bad files, atomic saves."""
import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import memstate
from memstate import Snapshot
from memstate.snapshot import SnapshotError

HERE = os.path.dirname(os.path.abspath(__file__))


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(12, 32)
        self.bn = torch.nn.BatchNorm1d(32)
        self.drop = torch.nn.Dropout(0.3)
        self.fc2 = torch.nn.Linear(32, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


class CountingSampler:
    """A stateful sampler stand-in: position and an epoch permutation from numpy."""

    def __init__(self, n):
        self.n, self.pos, self.perm = n, 0, np.random.permutation(n)

    def next_batch(self, b):
        if self.pos + b > self.n:
            self.perm, self.pos = np.random.permutation(self.n), 0
        out = self.perm[self.pos:self.pos + b]
        self.pos += b
        return out

    def state_dict(self):
        return {"pos": self.pos, "perm": torch.from_numpy(self.perm.copy())}

    def load_state_dict(self, sd):
        self.pos, self.perm = sd["pos"], sd["perm"].numpy().copy()


DATA_X = torch.randn(200, 12, generator=torch.Generator().manual_seed(0))
DATA_Y = torch.randint(0, 3, (200,), generator=torch.Generator().manual_seed(1))


def make_state(seed=0, opt="adam"):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    net = Net()
    ema = Net()
    ema.load_state_dict(net.state_dict())
    if opt == "adam":
        o = memstate.optim.AdamW(net.parameters(), lr=1e-2)
    elif opt == "sgd":
        o = memstate.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    else:
        o = torch.optim.Adam(net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.7)
    sampler = CountingSampler(200)
    queue = torch.zeros(16, 3)
    ptr = torch.zeros((), dtype=torch.int64)
    return net, ema, o, sched, sampler, queue, ptr


def train_step(state):
    net, ema, opt, sched, sampler, queue, ptr = state
    idx = torch.from_numpy(sampler.next_batch(16))
    noise = torch.randn(16, 12) * 0.01 + random.random() * 1e-3  # global torch and python RNGs
    x, y = DATA_X[idx] + noise, DATA_Y[idx]
    net.train()
    opt.zero_grad()
    out = net(x)
    loss = torch.nn.functional.cross_entropy(out, y)
    loss.backward()
    opt.step()
    sched.step()
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), net.parameters()):
            pe.mul_(0.9).add_(p, alpha=0.1)
        queue[int(ptr) % 16] = out[0].detach()
        ptr += 1
    return loss.item()


def record(state, steps):
    net, ema, opt, *_ , queue, ptr = state
    out = []
    for _ in range(steps):
        loss = train_step(state)
        d = memstate.fingerprint_state({"model": net, "optimizer": opt, "extra": {"ema": ema, "queue": queue, "ptr": ptr}}).digest
        out.append((loss, d))
    return out


def capture(state, **kw):
    net, ema, opt, sched, sampler, queue, ptr = state
    return Snapshot.capture(net, opt, sampler=sampler, scheduler=sched,
                            extra={"ema": ema, "queue": queue, "ptr": ptr}, **kw)


@pytest.mark.parametrize("opt", ["adam", "sgd", "torch"])
def test_restore_replays_bit_for_bit(opt):
    state = make_state(opt=opt)
    record(state, 5)
    snap = capture(state)
    first = record(state, 6)
    snap.restore()
    second = record(state, 6)
    assert first == second
    # and again: a snapshot can be restored many times
    snap.restore()
    assert record(state, 6) == first


def test_capture_before_optimizer_state_exists():
    state = make_state(opt="adam")
    snap = capture(state)  # no optimizer state yet
    first = record(state, 4)
    assert len(state[2].state) > 0
    snap.restore()
    assert len(state[2].state) == 0  # state created after the capture is gone again
    assert record(state, 4) == first


def test_fingerprint_matches_live_state_at_capture():
    state = make_state()
    record(state, 3)
    net, ema, opt, sched, sampler, queue, ptr = state
    live = memstate.fingerprint_state({"model": net, "optimizer": opt, "extra": {"ema": ema, "queue": queue, "ptr": ptr}})
    snap = capture(state)
    assert snap.fingerprint().digest == live.digest
    assert sorted(snap.fingerprint()) == sorted(live)
    assert "model.bn.running_mean" in live and "model.bn.num_batches_tracked" in live
    record(state, 2)
    assert snap.fingerprint().digest == live.digest  # unchanged by later training
    assert memstate.fingerprint_state({"model": net, "optimizer": opt, "extra": {"ema": ema, "queue": queue, "ptr": ptr}}).digest != live.digest


def test_recapture_reuses_the_arena_and_nbytes_is_tight():
    state = make_state()
    record(state, 2)
    snap = capture(state)
    ptrs = {k: a.data_ptr() for k, a in snap._arenas.items()}
    n = snap.nbytes
    tensors_bytes = sum(e.nbytes for e in snap._entries)
    assert tensors_bytes <= n < tensors_bytes + 64 * len(snap._entries)
    record(state, 2)
    snap.recapture()
    assert {k: a.data_ptr() for k, a in snap._arenas.items()} == ptrs and snap.nbytes == n
    after = record(state, 3)
    snap.restore()
    assert record(state, 3) == after


def test_restore_is_in_place_and_keeps_references():
    state = make_state()
    net, ema, opt, *_ = state
    record(state, 2)
    w = net.fc1.weight
    exp_avg = opt.state[w]["exp_avg"]
    snap = capture(state)
    record(state, 2)
    snap.restore()
    assert net.fc1.weight is w and opt.state[w]["exp_avg"] is exp_avg
    assert opt.param_groups[0]["params"][0] is w


def test_rng_states_are_restored():
    state = make_state()
    snap = capture(state)
    a = (torch.rand(3), np.random.rand(3), random.random())
    snap.restore()
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    snap2 = capture(state, rng=False)
    torch.rand(1)
    before = torch.get_rng_state()
    snap2.restore()
    assert torch.equal(torch.get_rng_state(), before)


def test_to_cpu_on_cpu_tensors():
    state = make_state()
    record(state, 2)
    snap = capture(state, to="cpu")
    first = record(state, 3)
    snap.restore()
    assert record(state, 3) == first


def test_restore_refuses_a_changed_model_before_touching_anything():
    state = make_state()
    record(state, 2)
    snap = capture(state)
    net = state[0]
    net.extra_head = torch.nn.Linear(3, 3)  # a new parameter that the snapshot lacks
    before = memstate.fingerprint_state(net).digest
    with pytest.raises(SnapshotError, match="extra_head"):
        snap.restore()
    assert memstate.fingerprint_state(net).digest == before


# ------------------------------------------------------------------------------- persistence

def test_save_load_roundtrip_in_process(tmp_path):
    state = make_state()
    record(state, 4)
    snap = capture(state)
    snap.save(str(tmp_path / "snap"))
    first = record(state, 5)
    manifest = json.loads((tmp_path / "snap" / "manifest.json").read_text())
    assert manifest["format"] == "memstate-snapshot"
    loaded = Snapshot.load(str(tmp_path / "snap"), state[0], state[2], sampler=state[4], scheduler=state[3],
                           extra={"ema": state[1], "queue": state[5], "ptr": state[6]},
                           hyperparameters="snapshot")  # the scheduled lr is part of the resumed state
    assert loaded.fingerprint().digest == snap.fingerprint().digest
    loaded.restore()
    assert record(state, 5) == first


SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads({threads})  # torch's own kernels are only reproducible per thread count
    sys.path.insert(0, {here!r})
    import test_snapshot as T
    from memstate import Snapshot
    state = T.make_state(seed=123)  # different seed: everything must come from the file
    net, ema, opt, sched, sampler, queue, ptr = state
    T.record(state, 1)  # create optimizer state so shapes exist; it will be overwritten
    snap = Snapshot.load({path!r}, net, opt, sampler=sampler, scheduler=sched,
                         extra={{"ema": ema, "queue": queue, "ptr": ptr}}, hyperparameters="snapshot")
    snap.restore()
    print(json.dumps(T.record(state, 5)))
""")


def test_save_then_fresh_process_replays_bit_for_bit(tmp_path):
    state = make_state()
    record(state, 4)
    path = str(tmp_path / "snap")
    capture(state).save(path)
    first = record(state, 5)
    script = SCRIPT.format(here=HERE, path=path, threads=torch.get_num_threads())
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert [tuple(x) for x in json.loads(out.stdout.strip().splitlines()[-1])] == first


def _saved(tmp_path):
    state = make_state()
    record(state, 3)
    path = str(tmp_path / "snap")
    capture(state).save(path)
    record(state, 2)
    return state, path


def _load(state, path):
    net, ema, opt, sched, sampler, queue, ptr = state
    return Snapshot.load(path, net, opt, sampler=sampler, scheduler=sched, extra={"ema": ema, "queue": queue, "ptr": ptr},
                         hyperparameters="snapshot")


def _live_digest(state):
    net, ema, opt, sched, sampler, queue, ptr = state
    return memstate.fingerprint_state({"model": net, "optimizer": opt, "extra": {"ema": ema, "queue": queue, "ptr": ptr}}).digest


def _data_file(path):
    return os.path.join(path, json.load(open(os.path.join(path, "manifest.json")))["data_file"])


def test_corrupted_data_is_refused(tmp_path):
    state, path = _saved(tmp_path)
    before = _live_digest(state)
    f = _data_file(path)
    raw = bytearray(open(f, "rb").read())
    raw[len(raw) // 2] ^= 0x01
    open(f, "wb").write(raw)
    with pytest.raises(SnapshotError, match="checksum"):
        _load(state, path)
    assert _live_digest(state) == before


def test_truncated_data_is_refused(tmp_path):
    state, path = _saved(tmp_path)
    f = _data_file(path)
    raw = open(f, "rb").read()
    open(f, "wb").write(raw[:-100])
    with pytest.raises(SnapshotError, match="truncated"):
        _load(state, path)


def test_tampered_manifest_is_refused(tmp_path):
    state, path = _saved(tmp_path)
    m = os.path.join(path, "manifest.json")
    manifest = json.load(open(m))
    manifest["tensors"][0]["shape"] = [1] + manifest["tensors"][0]["shape"]
    json.dump(manifest, open(m, "w"))
    with pytest.raises(SnapshotError, match="manifest checksum"):
        _load(state, path)
    open(m, "w").write("{not json")
    with pytest.raises(SnapshotError, match="corrupt manifest"):
        _load(state, path)


def test_tampered_tensor_bytes_with_recomputed_file_checksum_are_refused(tmp_path):
    import xxhash

    from memstate.snapshot._format import _canonical

    state, path = _saved(tmp_path)
    m = os.path.join(path, "manifest.json")
    manifest = json.load(open(m))
    f = os.path.join(path, manifest["data_file"])
    raw = bytearray(open(f, "rb").read())
    e = next(t for t in manifest["tensors"] if t["name"] == "model.fc1.weight")
    raw[e["offset"] + 5] ^= 0x40
    open(f, "wb").write(raw)
    manifest.pop("manifest_xxh3_128")
    manifest["data_xxh3_128"] = xxhash.xxh3_128_hexdigest(bytes(raw))
    manifest["manifest_xxh3_128"] = xxhash.xxh3_128_hexdigest(_canonical(manifest))
    json.dump(manifest, open(m, "w"))
    with pytest.raises(SnapshotError, match="fingerprint mismatch for model.fc1.weight"):
        _load(state, path)


def test_mismatched_model_is_refused_with_names(tmp_path):
    state, path = _saved(tmp_path)
    net, ema, opt, sched, sampler, queue, ptr = state
    other = torch.nn.Sequential(torch.nn.Linear(12, 32))
    with pytest.raises(SnapshotError, match="missing from the live objects: model.bn"):
        Snapshot.load(path, other, memstate.optim.AdamW(other.parameters()), sampler=sampler, scheduler=sched,
                      extra={"ema": ema, "queue": queue, "ptr": ptr})
    wrong = Net()
    wrong.fc2 = torch.nn.Linear(32, 4)
    with pytest.raises(SnapshotError, match="model.fc2.weight"):
        Snapshot.load(path, wrong, memstate.optim.AdamW(wrong.parameters()), sampler=sampler, scheduler=sched,
                      extra={"ema": ema, "queue": queue, "ptr": ptr})
    with pytest.raises(SnapshotError, match="pass sampler="):
        Snapshot.load(path, net, opt, scheduler=sched, extra={"ema": ema, "queue": queue, "ptr": ptr})


def test_save_is_atomic(tmp_path, monkeypatch):
    state, path = _saved(tmp_path)
    good = _load(state, path).fingerprint().digest
    record(state, 2)
    snap2 = capture(state)
    real_replace = os.replace

    def crash(src, dst):
        if dst.endswith("manifest.json"):
            raise OSError("simulated crash before the manifest rename")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        snap2.save(path)
    monkeypatch.setattr(os, "replace", real_replace)
    assert _load(state, path).fingerprint().digest == good  # the earlier snapshot is intact
    snap2.save(path)  # the failed save left nothing behind; the next one succeeds
    assert _load(state, path).fingerprint().digest == snap2.fingerprint().digest
    assert len([n for n in os.listdir(path) if n.startswith("data-")]) == 1


def test_loading_never_unpickles(tmp_path, monkeypatch):
    state, path = _saved(tmp_path)
    import pickle

    def boom(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(torch, "load", boom)
    _load(state, path).restore()


# ----------------------------------------------------------------------------------- CUDA

@pytest.mark.cuda
def test_cuda_replay_and_files(tmp_path):
    torch.manual_seed(0)
    net = Net().cuda()
    opt = memstate.optim.AdamW(net.parameters(), lr=1e-2)

    def steps(n):
        out = []
        for _ in range(n):
            x = torch.randn(16, 12, device="cuda")
            y = torch.randint(0, 3, (16,), device="cuda")
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            out.append((loss.item(), memstate.fingerprint_state({"model": net, "optimizer": opt}).digest))
        return out

    steps(3)
    snap = Snapshot.capture(net, opt)
    assert all(a.device.type == "cuda" for k, a in snap._arenas.items() if k != "cpu")
    first = steps(4)
    snap.restore()
    assert steps(4) == first
    snap.restore()
    snap.save(str(tmp_path / "s"))
    steps(2)
    Snapshot.load(str(tmp_path / "s"), net, opt).restore()
    assert steps(4) == first
    spill = Snapshot.capture(net, opt, to="cpu")
    again = steps(3)
    spill.restore()
    assert steps(3) == again


def test_grad_scaler_and_stateful_extra_roundtrip(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(1))  # the scale tensor is created lazily
    net = torch.nn.Linear(2, 2)
    sampler = CountingSampler(10)
    snap = Snapshot.capture(net, scaler=scaler, extra={"sampler2": sampler}, rng=False)
    scaler.update(new_scale=4.0)
    sampler.next_batch(3)
    assert scaler.get_scale() == 4.0 and sampler.pos == 3
    snap.restore()
    assert scaler.get_scale() == 1024.0 and sampler.pos == 0
    snap.save(str(tmp_path / "s"))
    scaler.update(new_scale=8.0)
    Snapshot.load(str(tmp_path / "s"), net, scaler=scaler, extra={"sampler2": sampler}, rng=False).restore()
    assert scaler.get_scale() == 1024.0


def test_bad_sources_are_named():
    net = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match=r"extra\['ptr'\] is a int"):
        Snapshot.capture(net, extra={"ptr": 3})
    with pytest.raises(TypeError, match="scheduler must have state_dict"):
        Snapshot.capture(net, scheduler=object())
    with pytest.raises(ValueError, match="to must be None or 'cpu'"):
        Snapshot.capture(net, to="disk")


def test_rng_contract_logs_are_part_of_the_snapshot():
    from memstate import RngContract

    contract = RngContract(7, name="snapshot-test")
    net = torch.nn.Linear(2, 2)
    contract.generator("augment", step=0)
    snap = Snapshot.capture(net)
    h = contract.log_hash()
    contract.generator("augment", step=1)
    assert contract.log_hash() != h
    snap.restore()
    assert contract.log_hash() == h
    del contract  # a snapshot holding a contract's state needs that contract to exist
    import gc

    gc.collect()
    before = memstate.fingerprint_state(net).digest
    with torch.no_grad():
        net.weight.add_(1.0)
    changed = memstate.fingerprint_state(net).digest
    with pytest.raises(SnapshotError, match="snapshot-test"):
        snap.restore()
    assert memstate.fingerprint_state(net).digest == changed != before
