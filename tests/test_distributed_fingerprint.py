"""Sharded fingerprints (memstate.distributed.fingerprint / fingerprint_state) equal the unsharded
ones bit for bit, on 2 and 3 gloo ranks: real DTensors (Shard(0), Replicate, uneven rows) on a
CPU DeviceMesh, FSDP2 models, and plain local shards cut at arbitrary byte offsets (shards that
do not start on an 8-byte boundary, shards of one byte, empty shards). Each world size is one
spawn of ranks running every case (spawning is the slow part); the parent compares each rank's
answers with memstate.fingerprint of the whole tensor and with the numpy reference."""
import pytest
import torch

import memstate
from memstate import reference

from dist_helper import run_ranks

# (name, dtype, global shape): odd lengths, 1- and 2-byte dtypes, rows that do not split evenly
CASES = [
    ("f32_7x3", torch.float32, (7, 3)),
    ("f16_7x3", torch.float16, (7, 3)),
    ("bf16_11", torch.bfloat16, (11,)),
    ("i8_13x5", torch.int8, (13, 5)),
    ("i8_5", torch.int8, (5,)),
    ("u8_2x1", torch.uint8, (2, 1)),
    ("f64_4x2x3", torch.float64, (4, 2, 3)),
    ("bool_9x1", torch.bool, (9, 1)),
    ("f16_1", torch.float16, (1,)),
    ("f32_0x4", torch.float32, (0, 4)),
]


def full_tensor(dtype, shape, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if not dtype.is_floating_point:
        return torch.randint(-128 if dtype == torch.int8 else 0, 128, shape, generator=g).to(dtype)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def byte_cuts(numel, world, rank, style):
    """Element range [lo, hi) of this rank under a cut style (every rank computes every cut)."""
    if style == "even":
        bounds = [numel * r // world for r in range(world + 1)]
    elif style == "first_heavy":  # rank 0 takes all but one element per other rank (tiny shards)
        bounds = [0] + [max(0, numel - (world - r)) for r in range(1, world)] + [numel]
    else:  # "middle_empty": rank 1 holds nothing
        half = numel // 2
        bounds = [0, half, half] + [numel] * (world - 2)
        bounds = bounds[:world + 1]
        bounds[-1] = numel
    return bounds[rank], bounds[rank + 1]


def _dtensor_cases(world, rank, out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import memstate.distributed as md

    mesh = init_device_mesh("cpu", (world,))
    for name, dtype, shape in CASES:
        t = full_tensor(dtype, shape, seed=len(name))
        for placement in (Shard(0), Replicate()):
            d = distribute_tensor(t, mesh, [placement])
            out[f"dtensor/{placement}/{name}"] = md.fingerprint(d).hex()
    # a 2-D mesh (replicas x shards, as HSDP) when the world allows it
    if world % 2 == 0:
        mesh2 = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("rep", "shard"))
        t = full_tensor(torch.float16, (7, 3), seed=7)
        d = distribute_tensor(t, mesh2, [Replicate(), Shard(0)])
        out["dtensor2d/f16_7x3"] = md.fingerprint(d).hex()


def _local_shard_cases(world, rank, out):
    import memstate.distributed as md

    for name, dtype, shape in CASES:
        t = full_tensor(dtype, shape, seed=len(name))
        flat = t.reshape(-1)
        for style in ("even", "first_heavy", "middle_empty"):
            lo, hi = byte_cuts(flat.numel(), world, rank, style)
            out[f"local/{style}/{name}"] = md.fingerprint(flat[lo:hi].clone(), offset=lo, global_shape=shape,
                                                          name=name).hex()


def _state_cases(world, rank, out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    import memstate.distributed as md
    from memstate.fingerprint import named_state_tensors

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 5)).sum().backward()
    opt.step()
    out["unsharded_model"] = memstate.fingerprint_state(model).to_json()
    # FSDP2: parameters become DTensors sharded on dim 0 (7 and 3 rows over 2 or 3 ranks)
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    out["fsdp_model"] = md.fingerprint_state(model).to_json()
    out["fsdp_model_digest"] = md.fingerprint_state(model).digest
    # FSDP2 optimizer state (DTensor exp_avg / exp_avg_sq, plain step counters) against the
    # unsharded tensors gathered with full_tensor()
    fsdp_opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 5)).sum().backward()
    fsdp_opt.step()
    full = {n: t.full_tensor() if isinstance(t, DTensor) else t for n, t in named_state_tensors(fsdp_opt)}
    out["fsdp_optimizer"] = md.fingerprint_state(fsdp_opt).to_json()
    out["fsdp_optimizer_full"] = memstate.fingerprint_state(full).to_json()
    # a dict of local shards (nested) and plain replicated tensors
    w = full_tensor(torch.bfloat16, (9, 5), seed=3)
    lo, hi = byte_cuts(w.numel(), world, rank, "even")
    state = {"enc": {"w": md.LocalShard(w.reshape(-1)[lo:hi], lo, (9, 5))}, "bias": torch.arange(3.0)}
    out["dict_state"] = md.fingerprint_state(state).to_json()


def _error_cases(world, rank, out):
    import memstate.distributed as md
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    errors = {}

    def expect(key, fn):
        try:
            fn()
        except (ValueError, TypeError) as e:
            errors[key] = str(e)
        else:
            errors[key] = None

    t = torch.arange(10, dtype=torch.int8)
    # every rank claims elements [0, 3): overlap and a gap
    expect("overlap", lambda: md.fingerprint(t[:3], offset=0, global_shape=(10,), name="w"))
    # the last element is on no rank
    lo, hi = byte_cuts(9, world, rank, "even")
    expect("gap", lambda: md.fingerprint(t[lo:hi], offset=lo, global_shape=(10,), name="w"))
    expect("no_offset", lambda: md.fingerprint(t, name="w"))
    expect("too_long", lambda: md.fingerprint(t, offset=5, global_shape=(10,), name="w"))
    mesh = init_device_mesh("cpu", (world,))
    d = distribute_tensor(torch.zeros(4, 6), mesh, [Shard(1)])
    expect("shard1", lambda: md.fingerprint(d, name="w"))
    # the call still works afterwards (no rank is left inside a collective)
    out["after_errors"] = md.fingerprint(t[lo:hi], offset=lo, global_shape=(9,)).hex()
    out["errors"] = errors


def rank_main(rank, world):
    out = {}
    _dtensor_cases(world, rank, out)
    _local_shard_cases(world, rank, out)
    _state_cases(world, rank, out)
    _error_cases(world, rank, out)
    return out


def expected():
    """Case -> (memstate.fingerprint hex, numpy reference hex) of the whole tensors."""
    want = {}
    for name, dtype, shape in CASES:
        t = full_tensor(dtype, shape, seed=len(name))
        want[name] = (memstate.fingerprint(t).hex(), reference.fingerprint_hex(t))
    return want


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_fingerprints_equal_unsharded(world):
    results = run_ranks(rank_main, world, timeout=150)
    want = expected()
    for name, (native, ref) in want.items():
        assert native == ref, name
    checked = 0
    for rank, out in enumerate(results):
        assert out == results[0], f"rank {rank}'s answers differ from rank 0's"
        for key, value in out.items():
            case = key.rsplit("/", 1)[-1]
            if key.startswith(("dtensor/", "local/")):
                assert value == want[case][0], f"rank {rank}: {key}"
                checked += 1
    assert checked == world * len(CASES) * 5
    t2d = full_tensor(torch.float16, (7, 3), seed=7)
    for out in results:
        if world % 2 == 0:
            assert out["dtensor2d/f16_7x3"] == memstate.fingerprint(t2d).hex()
        assert out["fsdp_model"] == out["unsharded_model"]
        assert out["fsdp_optimizer"] == out["fsdp_optimizer_full"] and len(out["fsdp_optimizer"]) == 6 * 3
        assert out["dict_state"] == _dict_state_want()
        assert out["after_errors"] == memstate.fingerprint(torch.arange(9, dtype=torch.int8)).hex()
        errors = out["errors"]  # the same message on every rank, naming the tensor
        assert "w: shards do not tile its 10 bytes" in errors["overlap"] and "overlaps" in errors["overlap"]
        assert "bytes [9, 10) are on no rank" in errors["gap"], errors["gap"]
        assert "offset= and global_shape=" in errors["no_offset"]
        assert errors["too_long"].startswith("w: a shard of 10 elements at element offset 5 does not fit")
        assert errors["shard1"].startswith("w: placement Shard(dim=1) on mesh dim 0 is not supported")


def _dict_state_want():
    w = full_tensor(torch.bfloat16, (9, 5), seed=3)
    return memstate.fingerprint_state({"enc": {"w": w}, "bias": torch.arange(3.0)}).to_json()


def _cuda_rank_main(rank, world):
    import memstate.distributed as md
    from dist_helper import cuda_group

    group, device = cuda_group(rank)
    out = {}
    for name, dtype, shape in CASES:
        flat = full_tensor(dtype, shape, seed=len(name)).reshape(-1).to(device)
        lo, hi = byte_cuts(flat.numel(), world, rank, "first_heavy")
        out[name] = md.fingerprint(flat[lo:hi], offset=lo, global_shape=shape, group=group, name=name).hex()
    return out


@pytest.mark.cuda
def test_sharded_fingerprints_cuda():
    """CUDA shards (partial sums from the CUDA kernel), NCCL with 2 GPUs, else gloo on one GPU."""
    want = expected()
    for rank, out in enumerate(run_ranks(_cuda_rank_main, 2, timeout=150)):
        assert out == {name: native for name, (native, _) in want.items()}, rank


def test_any_cut_sums_to_the_whole_without_communication():
    """The arithmetic of the collective, on one process: random tensors of 0-41 bytes cut at
    random byte offsets into 1-6 pieces (empty and one-byte pieces included, listed in random
    rank order); the pieces' owned-pair sums plus the straddling pairs rebuilt from the
    boundary bytes finalise to memstate.fingerprint of the whole and to the numpy reference."""
    import random

    from memstate.distributed.sharded import _edge_word, _partial_sums, _Piece, _straddling_sums

    rnd = random.Random(0)
    for _ in range(300):
        n = rnd.randrange(0, 42)
        data = torch.tensor([rnd.randrange(256) for _ in range(n)], dtype=torch.uint8)
        world = rnd.randrange(1, 7)
        bounds = [0] + sorted(rnd.randrange(0, n + 1) for _ in range(world - 1)) + [n]
        pieces = [_Piece("t", data[b:e], b, n, torch.uint8, (n,)) for b, e in zip(bounds, bounds[1:])]
        rnd.shuffle(pieces)
        layout = [(p.start, p.start + p.data.numel(), bytes(_edge_word(p.data, True).tolist()),
                   bytes(_edge_word(p.data, False).tolist())) for p in pieces]
        sums = _partial_sums(pieces)
        e0, e1 = _straddling_sums("t", n, layout)
        got = memstate.finalize_partial(sum(a for a, _ in sums) + e0, sum(b for _, b in sums) + e1, n)
        assert got == memstate.fingerprint(data), (n, bounds)
        assert got.hex() == reference.fingerprint_hex(bytes(data.tolist())), (n, bounds)
