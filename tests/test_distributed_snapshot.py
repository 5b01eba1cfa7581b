"""Per-rank snapshots under torch.distributed (gloo, CPU): a DDP training loop with dropout on
the digits MLP (memstate.tasks.DigitsNet on digits-like random data), saved at step K by 2 ranks and restored in fresh processes, continues bit for
bit; damaged, mismatched or incomplete snapshot directories are refused on every rank with one
line naming the rank and file, leaving every rank's live state untouched."""
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch
import xxhash

import memstate
from dist_helper import run_ranks
from memstate import Snapshot, SnapshotError
from memstate.snapshot import _dist

K, N = 3, 7  # snapshot after step K; the reference run trains to step N
BATCH = 32


# ----------------------------------------------------------------------------------- rank side
def _build(rank, world, seed, device="cpu", group=None):
    """A digits MLP with dropout under DDP, memstate's AdamW, this rank's data shard with an
    OrderSampler on this rank's RngContract; global RNGs seeded per rank and per `seed`."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from memstate.tasks import DigitsNet

    g = torch.Generator().manual_seed(0)  # digits-like data (8x8 inputs, 10 classes) without sklearn's import
    data = {"x_train": torch.randn(512, 1, 8, 8, generator=g), "y_train": torch.randint(0, 10, (512,), generator=g)}
    torch.manual_seed(1000 * seed + rank)
    np.random.seed(1000 * seed + rank)
    random.seed(1000 * seed + rank)
    shard = torch.arange(rank, len(data["y_train"]), world)
    model = DigitsNet("mlp", dropout=0.3).to(device)
    ddp = DDP(model, process_group=group) if world > 1 else model  # DDP broadcasts rank 0's parameters
    opt = memstate.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    contract = memstate.RngContract(7000 + rank)  # configuration: a resume builds the same; its log is state
    sampler = memstate.OrderSampler(len(shard), BATCH, contract=contract)
    return dict(model=model, ddp=ddp, opt=opt, contract=contract, sampler=sampler, device=device,
                x=data["x_train"][shard].to(device), y=data["y_train"][shard].to(device))


def _step(st, t):
    """One training step; every RNG is used: the sampler (contract "data"), the contract's
    "augment" stream, numpy's and Python's global RNGs (noise), torch's global RNG (dropout)."""
    ids = torch.as_tensor(next(iter(st["sampler"])))
    x = st["x"][ids.to(st["device"])]
    g = st["contract"].generator("augment", step=t)
    noise = torch.randn(x.shape, generator=g) + torch.from_numpy(np.random.standard_normal(x.shape).astype(np.float32))
    x = x + (0.05 * random.random()) * noise.to(st["device"])
    loss = torch.nn.functional.cross_entropy(st["ddp"](x), st["y"][ids.to(st["device"])])
    st["opt"].zero_grad(set_to_none=True)
    loss.backward()
    st["opt"].step()
    return "/".join([memstate.fingerprint_state({"model": st["model"], "optimizer": st["opt"]}).digest,
                     float(loss.item()).hex(), st["contract"].log_hash(), str(st["sampler"].step)])


def _live(st):
    """Digest of everything a refused load must leave untouched on this rank."""
    h = xxhash.xxh3_128()
    h.update(memstate.fingerprint_state({"model": st["model"], "optimizer": st["opt"]}).digest.encode())
    h.update(torch.get_rng_state().numpy().tobytes())
    if torch.cuda.is_available():
        for s in torch.cuda.get_rng_state_all():
            h.update(s.numpy().tobytes())
    h.update(repr(np.random.get_state()).encode() + repr(random.getstate()).encode())
    h.update(json.dumps([st["contract"].state_dict(), st["sampler"].state_dict()], sort_keys=True,
                        default=str).encode())
    return h.hexdigest()


def _sources(st):
    return dict(model=st["model"], optimizer=st["opt"], sampler=st["sampler"])


def _train_and_save(rank, world, path, single_dir, device="cpu", backend=None):
    """Reference run: steps 1..N, a snapshot saved at step 1 and replaced at step K. Also: a distributed save into a
    single-process snapshot directory is refused; ``group=False`` saves a single-process one."""
    import torch.distributed as dist

    group = dist.new_group(backend=backend)  # an explicit ProcessGroup here; the restore uses the default group
    st = _build(rank, world, seed=0, device=device, group=group)
    snap = Snapshot.capture(**_sources(st), group=group)
    try:
        snap.save(single_dir)
        refused_single = None
    except SnapshotError as e:
        refused_single = str(e)
    digests = [_step(st, 1)]
    snap = Snapshot.capture(**_sources(st), group=group)
    snap.save(path)  # replaced below by the step-K snapshot: an overwrite is tested too
    digests += [_step(st, t) for t in range(2, K + 1)]
    snap.recapture().save(path)
    Snapshot.capture(**_sources(st), group=False).save(os.path.join(os.path.dirname(path), f"alone-{rank}"))
    digests += [_step(st, t) for t in range(K + 1, N + 1)]
    return {"digests": digests, "state_digest": snap.fingerprint().digest, "refused_single": refused_single,
            "repr": repr(snap), "dtensor": _dtensor_roundtrip(rank, world, path + "-dtensor") if device == "cpu" else None}


def _dtensor_roundtrip(rank, world, path):
    """A DTensor parameter sharded unevenly (Shard(0), 7 rows over 2 ranks) with torch.optim SGD
    momentum: captured, restored in memory, saved and loaded into a fresh optimizer (whose
    state is allocated as DTensors like the parameter): each rank's shard comes back exactly."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(distribute_tensor(torch.randn(7, 3, generator=torch.Generator().manual_seed(3)),
                                                   mesh, [Shard(0)]))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step(o):
        o.zero_grad()
        (model.w.sin() ** 2).sum().full_tensor().backward()
        o.step()

    step(opt)
    snap = Snapshot.capture(model, opt, rng=False)
    want = [model.w.to_local().clone(), opt.state[model.w]["momentum_buffer"].to_local().clone()]

    def same(o):
        buf = o.state[model.w]["momentum_buffer"]
        return (type(buf).__name__ == "DTensor" and torch.equal(model.w.to_local(), want[0])
                and torch.equal(buf.to_local(), want[1]))

    step(opt)
    snap.save(path)
    step(opt)
    snap.restore()
    in_memory = same(opt)
    step(opt)
    fresh = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    Snapshot.load(path, model, fresh, rng=False).restore()
    loaded = same(fresh)
    step(fresh)  # the restored optimizer state is usable
    return {"shard_rows": model.w.to_local().shape[0], "in_memory": in_memory, "loaded": loaded,
            "names": snap.names}


def _restore_and_train(rank, world, path, refusals, device="cpu", backend=None):
    """Fresh processes, other seeds: every refusal first (live state checked unchanged), then a
    control (the snapshot restored but torch's RNG re-seeded: dropout differs, so the step
    differs), then the real restore and steps K+1..N."""
    import torch.distributed as dist

    group = dist.new_group(backend=backend) if backend else None
    st = _build(rank, world, seed=1, device=device, group=group)
    out = {"refusals": {}}
    for case, bad in refusals.items():
        before = _live(st)
        try:
            Snapshot.load(bad, **_sources(st), group=group)
            out["refusals"][case] = None
        except SnapshotError as e:
            out["refusals"][case] = str(e)
        assert _live(st) == before, f"{case}: a refused load changed live state on rank {rank}"
    snap = Snapshot.load(path, **_sources(st), group=group)
    snap.restore()
    torch.manual_seed(12345)  # only the dropout masks draw from torch's global RNG
    out["control"] = _step(st, K + 1)
    snap.restore()
    out["digests"] = [_step(st, t) for t in range(K + 1, N + 1)]
    out["state_digest"] = snap.fingerprint().digest
    return out


def _load_other_world(rank, world, path):
    st = _build(rank, world, seed=2)
    before = _live(st)
    try:
        Snapshot.load(path, **_sources(st))
        msg = None
    except SnapshotError as e:
        msg = str(e)
    return {"message": msg, "untouched": _live(st) == before}


# ----------------------------------------------------------------------------------- parent side
def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _flip_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x01]))


def _edit_manifest(path, edit, recompute=True):
    mpath = os.path.join(path, "manifest.json")
    manifest = json.loads(_read(mpath))
    edit(manifest)
    if recompute:
        manifest.pop("manifest_xxh3_128")
        canon = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        manifest["manifest_xxh3_128"] = xxhash.xxh3_128_hexdigest(canon)
    with open(mpath, "w") as f:
        json.dump(manifest, f)


def _damaged(tmp, good):
    """name -> (directory, substrings every rank's error must contain)."""
    cases = {}

    def case(name, damage, *expect):
        d = os.path.join(tmp, name)
        shutil.copytree(good, d)
        damage(d)
        cases[name] = (d, expect)

    case("rank1_deleted", lambda d: shutil.rmtree(os.path.join(d, "rank-1")),
         "rank 1:", "rank-1", "directory is missing")
    case("rank1_byte_flipped", lambda d: _flip_byte(next(
        os.path.join(d, "rank-1", n) for n in os.listdir(os.path.join(d, "rank-1")) if n.startswith("data-"))),
        "rank 1:", "rank-1/data-", "data checksum mismatch")

    def set_digest(m):
        m["ranks"][1]["state_digest"] = "0" * 32

    case("manifest_edited", lambda d: _edit_manifest(d, set_digest, recompute=False),
         "rank 0:", "manifest.json", "manifest checksum mismatch")
    case("manifest_digest_edited_checksum_recomputed", lambda d: _edit_manifest(d, set_digest),
         "rank 0:", "manifest.json", "global_state_digest does not match")

    def set_both(m):  # consistent global manifest, but not what rank 1's files hold
        set_digest(m)
        m["global_state_digest"] = _dist.global_state_digest([r["state_digest"] for r in m["ranks"]])

    case("manifest_rank1_digest_forged", lambda d: _edit_manifest(d, set_both),
         "rank 1:", "rank-1", "state digest", "differs")

    def set_checksum(m):
        m["ranks"][1]["manifest_xxh3_128"] = "f" * 32

    case("manifest_rank1_checksum_edited", lambda d: _edit_manifest(d, set_checksum),
         "rank 1:", "rank-1/manifest.json", "checksum differs")

    def swap(d):
        os.rename(os.path.join(d, "rank-0"), os.path.join(d, "tmp"))
        os.rename(os.path.join(d, "rank-1"), os.path.join(d, "rank-0"))
        os.rename(os.path.join(d, "tmp"), os.path.join(d, "rank-1"))

    case("ranks_swapped", swap, "rank 0:", "rank-0/manifest.json", "not of rank 0 of 2")
    case("global_manifest_missing", lambda d: os.remove(os.path.join(d, "manifest.json")),
         "rank 0:", "manifest.json", "did not finish")
    return cases


def _single_snapshot(path):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    Snapshot.capture(net, rng=False).save(path)
    return _read(os.path.join(path, "manifest.json"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("dsnap"))
    path, single = os.path.join(tmp, "ckpt"), os.path.join(tmp, "single")
    single_manifest = _single_snapshot(single)
    ranks = run_ranks(_train_and_save, 2, path, single)
    return dict(tmp=tmp, path=path, single=single, single_manifest=single_manifest, ranks=ranks)


def test_save_writes_rank_dirs_and_global_manifest(reference):
    path, ranks = reference["path"], reference["ranks"]
    assert sorted(os.listdir(path)) == [".memstate.lock", "manifest.json", "rank-0", "rank-1"]
    g = json.loads(_read(os.path.join(path, "manifest.json")))
    assert g["format"] == "memstate-distributed-snapshot" and g["world_size"] == 2 and g["backend"] == "gloo"
    assert [e["state_digest"] for e in g["ranks"]] == [r["state_digest"] for r in ranks]
    assert g["global_state_digest"] == _dist.global_state_digest([r["state_digest"] for r in ranks])
    for r, e in enumerate(g["ranks"]):
        assert len([n for n in os.listdir(os.path.join(path, f"rank-{r}")) if n.startswith("data-")]) == 1
        m = json.loads(_read(os.path.join(path, f"rank-{r}", "manifest.json")))
        assert m["format"] == "memstate-snapshot" and m["distributed"] == {"rank": r, "world_size": 2}
        assert e["manifest_xxh3_128"] == m["manifest_xxh3_128"] and e["dir"] == f"rank-{r}"
        assert "rng" in m["meta"] and "sampler" in m["meta"] and "memstate" in m["meta"]["rng"]  # contract log
    # each rank has its own state: BatchNorm statistics of its batches, losses, RNG and contract logs
    assert all(a != b for a, b in zip(ranks[0]["digests"], ranks[1]["digests"]))
    assert "rank=0" in ranks[0]["repr"] and "rank=1" in ranks[1]["repr"]


def test_dtensor_shards_restore_exactly(reference):
    d = [r["dtensor"] for r in reference["ranks"]]
    assert [x["shard_rows"] for x in d] == [4, 3]  # uneven shards
    assert all(x["in_memory"] and x["loaded"] for x in d), d
    assert d[0]["names"] == ["model.w", "optimizer.state.0.momentum_buffer"]


def test_group_false_and_single_dirs_keep_the_single_process_format(reference):
    tmp = reference["tmp"]
    for r in range(2):
        d = os.path.join(tmp, f"alone-{r}")
        m = json.loads(_read(os.path.join(d, "manifest.json")))
        assert m["format"] == "memstate-snapshot" and "distributed" not in m
        assert not any(n.startswith("rank-") for n in os.listdir(d))
    # a distributed save into a single-process snapshot directory was refused, that snapshot intact
    for r in reference["ranks"]:
        assert "holds a single-process snapshot" in r["refused_single"] and "\n" not in r["refused_single"]
    assert _read(os.path.join(reference["single"], "manifest.json")) == reference["single_manifest"]
    assert not os.path.exists(os.path.join(reference["single"], "rank-0"))


def test_single_process_refuses_a_distributed_directory(reference, tmp_path):
    path = reference["path"]
    net = torch.nn.Linear(3, 2)
    with pytest.raises(SnapshotError, match=r"ckpt: holds per-rank snapshots of 2 ranks: load it under a process group .*ckpt/rank-<r> alone"):
        Snapshot.load(path, net)
    # and a single-process save never replaces the global manifest
    d = str(tmp_path / "copy")
    shutil.copytree(path, d)
    before = _read(os.path.join(d, "manifest.json"))
    with pytest.raises(SnapshotError, match="holds a distributed snapshot"):
        Snapshot.capture(net).save(d)
    assert _read(os.path.join(d, "manifest.json")) == before


def test_restore_in_fresh_processes_continues_bit_for_bit(reference, tmp_path):
    cases = _damaged(str(tmp_path), reference["path"])
    got = run_ranks(_restore_and_train, 2, reference["path"], {k: v[0] for k, v in cases.items()})
    for r in range(2):
        ref = reference["ranks"][r]["digests"]
        assert got[r]["state_digest"] == reference["ranks"][r]["state_digest"]
        assert got[r]["digests"] == ref[K:], f"rank {r} diverged after the restore"
        assert got[r]["control"] != ref[K], "dropout did not depend on torch's RNG: the test has no power"
        assert got[r]["control"].split("/")[2:] == ref[K].split("/")[2:]  # the control differs by dropout only
    for name, (_, expect) in cases.items():
        msgs = [g["refusals"][name] for g in got]
        assert msgs[0] is not None and msgs[0] == msgs[1], f"{name}: {msgs}"  # every rank refuses alike
        assert "\n" not in msgs[0], msgs[0]
        for s in expect:
            assert s in msgs[0], f"{name}: {s!r} not in {msgs[0]!r}"


def test_other_world_size_is_refused(reference):
    got = run_ranks(_load_other_world, 3, reference["path"])
    for g in got:
        assert g["untouched"]
        assert "manifest.json: a snapshot of 2 ranks; this process group has 3" in g["message"], g["message"]


def test_group_argument_without_process_group():
    net = torch.nn.Linear(3, 2)
    assert Snapshot.capture(net, group=None)._group is None  # no process group: one process
    assert Snapshot.capture(net, group=False)._group is None
    with pytest.raises(ValueError, match="not initialised"):
        Snapshot.capture(net, group=object())


@pytest.mark.cuda
def test_cuda_per_rank_snapshot_restores_bit_for_bit(tmp_path):
    """CUDA: 2 ranks on cuda:LOCAL_RANK (NCCL with >= 2 GPUs; on one GPU both ranks share
    cuda:0 over gloo); CUDA generator states are per rank."""
    n_gpu = torch.cuda.device_count()
    backend = "nccl" if n_gpu >= 2 else None
    path, single = str(tmp_path / "ckpt"), str(tmp_path / "single")
    _single_snapshot(single)
    ref = run_ranks(_train_and_save_cuda, 2, path, single, backend)
    got = run_ranks(_restore_and_train_cuda, 2, path, backend)
    for r in range(2):
        assert got[r]["digests"] == ref[r]["digests"][K:]
        assert got[r]["control"] != ref[r]["digests"][K]


def _cuda_device(rank):
    return f"cuda:{rank % torch.cuda.device_count()}"


def _train_and_save_cuda(rank, world, path, single_dir, backend):
    torch.cuda.set_device(_cuda_device(rank))
    return _train_and_save(rank, world, path, single_dir, _cuda_device(rank), backend)


def _restore_and_train_cuda(rank, world, path, backend):
    torch.cuda.set_device(_cuda_device(rank))
    return _restore_and_train(rank, world, path, {}, _cuda_device(rank), backend)
