"""msfp1: native (CPU, CUDA) == numpy reference, sensitivity, sharding, state fingerprints."""
import gc
import os
import subprocess
import sys
import threading
import weakref

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import given, settings, strategies as st

import memstate
from memstate import _ext
from memstate import reference as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DTYPES = [
    torch.float16, torch.float32, torch.float64, torch.bfloat16, torch.complex64,
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool,
]
SIZES = [0, 1, 7, 8, 9, 65537, 1_000_003]


def random_tensor(n, dtype, gen, device="cpu"):
    if dtype == torch.bool:
        t = torch.randint(0, 2, (n,), generator=gen).bool()
    elif dtype.is_floating_point or dtype.is_complex:
        t = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype) if not dtype.is_complex \
            else torch.randn(n, generator=gen, dtype=dtype)
    else:
        info = torch.iinfo(dtype)
        t = torch.randint(max(info.min, -2**31), min(info.max, 2**31 - 1), (n,), generator=gen, dtype=torch.int64).to(dtype)
    return t.to(device)


def ref_fp(t):
    return memstate.Fingerprint(*ref.fingerprint_lanes(t))


def test_spec_vectors_by_hand():
    # Independent of numpy: the spec evaluated with Python ints for a tiny input.
    data = bytes(range(1, 12))  # 11 bytes -> 2 pairs, second zero-padded
    words = [int.from_bytes((data + b"\0" * 5)[4 * j:4 * j + 4], "little") for j in range(4)]
    keys = [(0x9E3779B1, 0x7F4A7C15, 0x85EBCA77, 0x165667B1), (0xC2B2AE3D, 0x27D4EB2F, 0x27D4EB2D, 0x61C88647)]
    M32, M64 = 2**32 - 1, 2**64 - 1
    lanes = []
    for k, (um, ua, vm, va) in enumerate(keys):
        s = 0
        for p in range(2):
            u = (words[2 * p] + p * um + ua) & M32
            v = (words[2 * p + 1] + p * vm + va) & M32
            s = (s + u * v) & M64
        lanes.append(ref.mix64(s ^ ref.mix64(11 + (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F)[k])))
    t = torch.tensor(list(data), dtype=torch.uint8)
    assert memstate.fingerprint(t).lanes == tuple(lanes)
    assert ref.fingerprint_lanes(t) == tuple(lanes)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_native_equals_reference(dtype, n):
    gen = torch.Generator().manual_seed(n * 31 + DTYPES.index(dtype))
    t = random_tensor(n, dtype, gen)
    assert memstate.fingerprint(t) == ref_fp(t)


def test_odd_byte_lengths_and_offsets():
    # every tail length 0..7 and unaligned start addresses (views with a byte offset)
    gen = torch.Generator().manual_seed(1)
    base = torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=gen)
    for start in range(9):
        for n in (0, 1, 2, 3, 4, 5, 6, 7, 63, 64, 65, 1000):
            v = base[start:start + n]
            assert memstate.fingerprint(v) == ref_fp(v), (start, n)


def test_fingerprint_object():
    t = torch.arange(10, dtype=torch.float32)
    a, b = memstate.fingerprint(t), memstate.fingerprint(t.clone())
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    h = a.hex()
    assert len(h) == 32 and h == h.lower() and int(h, 16) >= 0
    assert h == f"{a.lanes[0]:016x}{a.lanes[1]:016x}"
    assert memstate.Fingerprint.fromhex(h) == a
    with pytest.raises(AttributeError):
        a._raw = bytes(16)
    with pytest.raises(ValueError):
        memstate.Fingerprint.fromhex("xyz")


def test_the_c_fingerprint_type_behaves_as_the_reference_class():
    """memstate.Fingerprint is a static C type (memstate._fingerprint); the pure-Python
    _PyFingerprint is its reference (and the fallback where the module is not built): every
    operation gives the same results and the same errors."""
    import copy
    import pickle

    from memstate.fingerprint import _NATIVE_FINGERPRINT, _PyFingerprint

    C, P = memstate.Fingerprint, _PyFingerprint
    assert _NATIVE_FINGERPRINT and C is not P and C.__module__ == "memstate.fingerprint" and C.__name__ == "Fingerprint"
    rng = np.random.default_rng(5)
    cases = [(0, 0), (1, 2), (2**64 - 1, 0), (2**63, 2**63 - 1)] + \
        [tuple(int(x) for x in rng.integers(0, 2**64, size=2, dtype=np.uint64)) for _ in range(50)]
    for l0, l1 in cases:
        c, p = C(l0, l1), P(l0, l1)
        assert c.lanes == p.lanes == (l0, l1) and C(lane0=l0, lane1=l1) == c
        assert c.hex() == p.hex() and str(c) == str(p) and repr(c) == repr(p)
        assert c.to_bytes() == p.to_bytes() and C.from_bytes(p.to_bytes()) == c and P.from_bytes(c.to_bytes()) == p
        assert C.from_bytes(bytearray(c.to_bytes())) == c and C.from_bytes(memoryview(c.to_bytes())) == c
        assert C.fromhex(p.hex()) == c and P.fromhex(c.hex()) == p
        for f in (c, p):
            assert pickle.loads(pickle.dumps(f)) == f and copy.deepcopy(f) == f and copy.copy(f) == f
            assert type(pickle.loads(pickle.dumps(f))) is type(f)
        assert c == C(l0, l1) and not (c != C(l0, l1)) and hash(c) == hash(C(l0, l1))
        assert c != C(l0 ^ 1, l1) and c != C(l0, l1 ^ 1)
        assert (c == p) is False and (c == c.to_bytes()) is False and (c != 3) is True  # other types: not equal
    assert len({C(*x) for x in cases}) == len(set(cases))
    def value_errors(call):  # the ValueError message of call(C) and of call(P)
        errors = []
        for cls in (C, P):
            with pytest.raises(ValueError) as e:
                call(cls)
            errors.append(str(e.value))
        return errors

    for args in [(-1, 0), (0, 2**64), (1.0, 0), ("1", 0), (None, 0), (0, 2.5)]:
        errors = value_errors(lambda cls: cls(*args))
        assert errors[0] == errors[1], errors
    for data in (b"x" * 15, b"x" * 17, "x" * 16, 16, None, memoryview(np.zeros(4, dtype=np.int32))[::2]):
        errors = value_errors(lambda cls: cls.from_bytes(data))
        assert errors[0] == errors[1] == f"a msfp1 fingerprint is 16 bytes, got {data!r}", errors
    for text in ("xyz", "g" * 32, "0" * 31, "0" * 33, b"0" * 32, None, "-" + "1" * 31):
        errors = value_errors(lambda cls: cls.fromhex(text))
        assert errors[0] == errors[1] == f"a msfp1 fingerprint is 32 hex digits, got {text!r}", errors
    for f in (C(1, 2), P(1, 2)):
        for name in ("_raw", "lanes", "x"):
            with pytest.raises(AttributeError, match="Fingerprint is immutable"):
                setattr(f, name, 0)
    assert not gc.is_tracked(C(1, 2)) and sys.getsizeof(C(1, 2)) < sys.getsizeof(P(1, 2)) + sys.getsizeof(b"x" * 16)
    with pytest.raises(TypeError):
        C(1)
    with pytest.raises(TypeError):  # fingerprints have no order
        C(1, 2) < C(1, 3)


def test_reference_bytes_of_a_one_element_view_with_any_stride():
    """Found by the fuzz test below: the imaginary part of a one-element complex view (stride 2)
    is contiguous to torch, and the reference's byte view refused it."""
    base = torch.tensor([1.5 + 2.5j, 3.0 - 4.0j], dtype=torch.complex64)
    t = base[1:].conj().imag  # a lazily negated float view, stride 2
    assert t.stride() == (2,) and t.is_contiguous()
    assert ref.tensor_bytes(t) == np.array([4.0], dtype=np.float32).tobytes()
    assert memstate.fingerprint(t) == ref_fp(torch.tensor([4.0]))


def test_without_the_c_type_the_reference_class_serves(tmp_path):
    """Where memstate._fingerprint is not built, ``import memstate`` still works and Fingerprint
    is the reference class: every fingerprint is the same."""
    t = torch.arange(100, dtype=torch.float32)
    want = [memstate.fingerprint(t).hex(), memstate.fingerprint_many([t, t[::3]])[1].hex()]
    code = ("import sys; sys.modules['memstate._fingerprint'] = None\n"
            "import torch, memstate\n"
            "from memstate.fingerprint import _NATIVE_FINGERPRINT, _PyFingerprint\n"
            "assert not _NATIVE_FINGERPRINT and memstate.Fingerprint is _PyFingerprint\n"
            "assert memstate.Fingerprint.__name__ == 'Fingerprint'\n"
            "t = torch.arange(100, dtype=torch.float32)\n"
            "fps = [memstate.fingerprint(t), memstate.fingerprint_many([t, t[::3]])[1]]\n"
            "assert all(type(f) is memstate.Fingerprint for f in fps)\n"
            "print(' '.join(f.hex() for f in fps))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == want


def test_fingerprint_objects_built_natively_from_rows():
    """memstate._C.fingerprints_from_rows (fingerprint_many's result builder) gives the same
    objects as the checked constructor, lanes read as uint64 (top bit set included)."""
    from memstate.fingerprint import _from_rows

    rng = np.random.default_rng(3)
    lanes = rng.integers(0, 2**64, size=(257, 2), dtype=np.uint64)
    lanes[0] = (0, 2**64 - 1)
    lanes[1] = (2**63, 2**63 - 1)
    rows = torch.from_numpy(lanes.view(np.int64))
    got = _from_rows(rows)
    want = [memstate.Fingerprint(int(a), int(b)) for a, b in lanes]
    assert got == want and [type(f) for f in got] == [memstate.Fingerprint] * len(want)
    assert [f.lanes for f in got] == [tuple(map(int, r)) for r in lanes]
    assert len({*got, *want}) == len(want)  # hash alike
    with pytest.raises(AttributeError):
        got[0]._raw = bytes(16)  # still immutable
    assert _from_rows(rows[:255].reshape(85, 3, 2)) == want[:255]  # [N, roles, 2]
    assert _from_rows(torch.zeros(0, 2, dtype=torch.int64)) == []
    C = _ext.load()
    with pytest.raises(TypeError, match="8-byte integers.*'d'"):
        C.fingerprints_from_rows(np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"shape \[N, 2\]"):
        C.fingerprints_from_rows(np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="C-contiguous"):
        C.fingerprints_from_rows(np.zeros((2, 4), dtype=np.int64)[:, ::2])


def test_zero_dim_and_empty_shapes():
    assert memstate.fingerprint(torch.tensor(3.5)) == ref_fp(torch.tensor(3.5))
    e1, e2 = torch.empty(0, 3), torch.empty(5, 0, dtype=torch.int8)
    assert memstate.fingerprint(e1) == memstate.fingerprint(e2) == ref_fp(b"")
    # dtype and shape are not part of msfp1: same bytes, same fingerprint
    t = torch.arange(12, dtype=torch.int32)
    assert memstate.fingerprint(t) == memstate.fingerprint(t.view(3, 4)) == memstate.fingerprint(t.view(torch.float32))


def test_views_use_logical_row_major_order():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(37, 53, generator=gen)
    for v in (x.t(), x[::2, 1::3], x[5:9], x.unsqueeze(0).expand(3, 37, 53), x.flip(0), x[:, 7]):
        assert memstate.fingerprint(v) == memstate.fingerprint(v.contiguous()) == ref_fp(v)
    # transposing changes the bytes, so the fingerprint
    sq = torch.randn(8, 8, generator=gen)
    assert memstate.fingerprint(sq.t()) != memstate.fingerprint(sq)


def test_conjugate_and_negative_views_are_materialised():
    z = torch.randn(100, dtype=torch.complex64)
    assert memstate.fingerprint(z.conj()) == ref_fp(z.conj().resolve_conj())
    assert memstate.fingerprint(z.conj()) != memstate.fingerprint(z)


@pytest.mark.parametrize("n", [1, 8, 9, 1000, 65537])
def test_any_single_change_is_detected(n):
    gen = torch.Generator().manual_seed(n)
    t = torch.randn(n, generator=gen)
    f = memstate.fingerprint(t)
    positions = sorted({0, n // 2, n - 1} | set(torch.randint(0, n, (20,), generator=gen).tolist()))
    for i in positions:
        u = t.clone()
        u[i] = torch.nextafter(u[i], torch.tensor(float("inf")))  # one ulp: a one-bit-ish change
        assert memstate.fingerprint(u) != f, i
    # a single byte of an int8 tensor
    b = torch.zeros(n, dtype=torch.int8)
    fb = memstate.fingerprint(b)
    for i in positions:
        c = b.clone()
        c[i] = 1
        assert memstate.fingerprint(c) != fb


def test_swaps_are_detected():
    gen = torch.Generator().manual_seed(3)
    t = torch.randn(4096, generator=gen)
    f = memstate.fingerprint(t)
    for i, j in [(0, 1), (0, 2), (10, 4095), (100, 101), (2047, 2048)]:
        u = t.clone()
        u[i], u[j] = t[j], t[i]
        assert memstate.fingerprint(u) != f, (i, j)
    # a permutation of equal-sum data (an XOR- or sum-based hash would miss it)
    p = torch.arange(1000, dtype=torch.int64)
    assert memstate.fingerprint(p) != memstate.fingerprint(p.flip(0))


def test_length_is_part_of_the_hash():
    z = torch.zeros(16, dtype=torch.uint8)
    fps = {memstate.fingerprint(z[:n]) for n in range(17)}
    assert len(fps) == 17  # zero padding never makes two lengths collide


def test_thread_count_and_chunk_size_do_not_matter(threads):
    C = _ext.load()
    gen = torch.Generator().manual_seed(4)
    ts = [torch.randn(n, generator=gen) for n in (3_000_001, 17, 0, 262_145)]
    want = [ref_fp(t) for t in ts]
    before = C.fingerprint_chunk_bytes()
    try:
        for n_threads in (1, 2):
            threads(n_threads)
            for chunk in (64, 4096, 1 << 19, 1 << 24):
                C.set_fingerprint_chunk_bytes(chunk)
                assert memstate.fingerprint_many(ts) == want, (n_threads, chunk)
    finally:
        C.set_fingerprint_chunk_bytes(before)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        C.set_fingerprint_chunk_bytes(100)


def test_every_cpu_isa_gives_the_same_bits():
    C = _ext.load()
    gen = torch.Generator().manual_seed(5)
    t = torch.randn(1_000_003, generator=gen)
    want = ref_fp(t)
    try:
        for isa in C.build_info()["cpu_isas"].split(","):
            C.set_cpu_isa(isa)
            assert C.cpu_isa() == isa
            assert memstate.fingerprint(t) == want, isa
    finally:
        C.set_cpu_isa("auto")
    with pytest.raises(ValueError, match="unknown CPU ISA"):
        C.set_cpu_isa("sse9")


@pytest.mark.parametrize("n_bytes", [0, 5, 8, 4000, 4096 * 8 + 3, 1_000_001])
def test_partial_sums_over_shards_add_up(n_bytes):
    gen = torch.Generator().manual_seed(n_bytes)
    t = torch.randint(0, 256, (n_bytes,), dtype=torch.uint8, generator=gen)
    whole = memstate.fingerprint(t)
    for shard_words in (1, 3, 1000, 1 << 20):
        s0 = s1 = 0
        step = shard_words * 8
        for start in range(0, max(n_bytes, 1), step):
            a, b = memstate.fingerprint_partial(t[start:start + step], start // 8)
            assert (a, b) == ref.sums(ref.tensor_bytes(t[start:start + step]), start // 8)
            s0, s1 = s0 + a, s1 + b
        assert memstate.finalize_partial(s0, s1, n_bytes) == whole


def test_partial_with_huge_word_offset_wraps_keys():
    t = torch.arange(64, dtype=torch.int64)
    off = (1 << 32) - 3  # keys wrap mod 2^32 inside the shard
    assert memstate.fingerprint_partial(t, off) == ref.sums(ref.tensor_bytes(t), off)
    # keys repeat every 2^32 pairs
    assert memstate.fingerprint_partial(t, 5) == memstate.fingerprint_partial(t, 5 + (1 << 32))


@pytest.mark.parametrize(
    "bad, kind",
    [
        (lambda: torch.eye(3).to_sparse(), "sparse"),
        (lambda: torch.empty(3, device="meta"), "meta"),
        (lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]), "nested"),
    ],
)
def test_unsupported_tensors_raise_type_error_naming_them(bad, kind):
    with pytest.raises(TypeError, match=kind):
        memstate.fingerprint(bad())
    with pytest.raises(TypeError, match="'w_bad'|w_bad"):
        memstate.fingerprint_state({"ok": torch.ones(2), "w_bad": bad()})


def test_native_op_checks_its_arguments():
    ops = _ext.ops()
    with pytest.raises(RuntimeError, match="first_pairs"):
        ops.fingerprint_sums([torch.ones(2)], [0, 1])
    with pytest.raises(RuntimeError, match=r"first_pairs\[1\] = -4"):
        ops.fingerprint_sums([torch.ones(2), torch.ones(2)], [0, -4])


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)
        self.bn = torch.nn.BatchNorm1d(3)


def test_state_fingerprint_of_module():
    torch.manual_seed(0)
    net = _Net()
    sf = memstate.fingerprint_state(net)
    names = sorted(dict(net.state_dict()).keys())
    assert sorted(sf) == names  # params and buffers, num_batches_tracked included
    for n, t in net.state_dict().items():
        assert sf[n] == ref_fp(t)
        assert sf.dtype(n) == t.dtype and sf.shape(n) == tuple(t.shape)
    # digest follows the documented canonical serialisation
    blob = [b"memstate.state.msfp1.v1\0"]
    for n in sorted(names, key=str.encode):
        t = net.state_dict()[n]
        dt = str(t.dtype).replace("torch.", "").encode()
        blob.append(len(n).to_bytes(4, "little") + n.encode() + len(dt).to_bytes(4, "little") + dt)
        blob.append(t.dim().to_bytes(4, "little") + b"".join(s.to_bytes(8, "little") for s in t.shape))
        f0, f1 = ref.fingerprint_lanes(t)
        blob.append(f0.to_bytes(8, "little") + f1.to_bytes(8, "little"))
    assert sf.digest == xxhash.xxh3_128_hexdigest(b"".join(blob))
    # a training step changes exactly what it touches
    before = sf
    net.train()
    net.bn(torch.randn(8, 3))
    after = memstate.fingerprint_state(net)
    assert after.diff(before) == ["bn.num_batches_tracked", "bn.running_mean", "bn.running_var"]
    assert after.digest != before.digest
    assert memstate.fingerprint_state(net) == after


def test_state_fingerprint_of_optimizer_and_dict():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    sf = memstate.fingerprint_state(opt)
    assert sorted(sf) == sorted(
        f"state.{i}.{k}" for i in range(2) for k in ("exp_avg", "exp_avg_sq", "step")
    )
    assert sf["state.0.exp_avg"] == ref_fp(opt.state[net.weight]["exp_avg"])
    d = {"b": torch.ones(3), "a": torch.zeros(2, dtype=torch.int64)}
    sd = memstate.fingerprint_state(d)
    assert list(sd) == ["a", "b"]
    # dtype and shape enter the digest even where bytes are equal
    d2 = {"b": torch.ones(3), "a": torch.zeros(4, dtype=torch.int32)}
    assert memstate.fingerprint_state(d2)["a"] == sd["a"]
    assert memstate.fingerprint_state(d2).digest != sd.digest
    assert memstate.fingerprint_state(d2).diff(sd) == ["a"]
    assert memstate.fingerprint_state({"c": torch.ones(1)}).diff(sd) == ["a", "b", "c"]
    with pytest.raises(TypeError, match="'x'"):
        memstate.fingerprint_state({"x": 3.0})
    with pytest.raises(TypeError, match="nn.Module"):
        memstate.fingerprint_state([torch.ones(1)])


def test_reference_agrees_with_numpy_arrays():
    a = np.arange(33, dtype=np.float32).reshape(3, 11)
    assert ref.fingerprint_lanes(a) == memstate.fingerprint(torch.from_numpy(a)).lanes
    assert ref.fingerprint_lanes(a.T) == memstate.fingerprint(torch.from_numpy(a).t()).lanes


# ----------------------------------------------------------------------------------------- CUDA

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES + [8 * 1024 * 1024 + 5])
def test_cuda_equals_cpu_and_reference(dtype, n):
    gen = torch.Generator().manual_seed(n + 7 * DTYPES.index(dtype))
    t = random_tensor(n, dtype, gen)
    want = ref_fp(t) if n < 2_000_000 else memstate.fingerprint(t)
    assert memstate.fingerprint(t.cuda()) == want


@pytest.mark.cuda
def test_cuda_views_offsets_shards_and_many():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(301, 257, generator=gen)
    xc = x.cuda()
    for v, vc in ((x.t(), xc.t()), (x[3:7], xc[3:7]), (x[:, 1], xc[:, 1])):
        assert memstate.fingerprint(vc) == memstate.fingerprint(v)
    b = torch.randint(0, 256, (100_000,), dtype=torch.uint8, generator=gen)
    bc = b.cuda()
    for start in range(9):  # unaligned device pointers
        assert memstate.fingerprint(bc[start:start + 77_777]) == ref_fp(b[start:start + 77_777])
    assert memstate.fingerprint_partial(bc[80:800], 10) == memstate.fingerprint_partial(b[80:800], 10)
    ts = [torch.randn(n, generator=gen) for n in (0, 1, 5, 70_000, 1_000_000)] * 50
    assert memstate.fingerprint_many([t.cuda() for t in ts]) == memstate.fingerprint_many(ts)
    sd = {f"t{i}": t for i, t in enumerate(ts)}
    assert memstate.fingerprint_state({k: v.cuda() for k, v in sd.items()}).digest == memstate.fingerprint_state(sd).digest


# ------------------------------------------------------------------------- fused copy + hash

@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 4097, 1_000_003])
def test_copy_fingerprint_copies_and_hashes_in_one_pass(n, threads):
    ops = _ext.ops()
    C = _ext.load()
    gen = torch.Generator().manual_seed(n)
    src = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen),
           torch.randn(n // 3 + 1, generator=gen, dtype=torch.float64),
           torch.randn(n // 5 + 2, 3, generator=gen)[:, 1]]  # a non-contiguous view
    before = C.fingerprint_chunk_bytes()
    try:
        for n_threads, chunk in ((1, 64), (2, 1 << 19), (2, 4096)):
            threads(n_threads)
            C.set_fingerprint_chunk_bytes(chunk)
            arena = torch.full((sum(s.numel() * s.element_size() for s in src) + 200,), 7, dtype=torch.uint8)
            dst, off = [], 3  # odd offsets: destinations need no alignment on the CPU
            for s in src:
                nb = s.numel() * s.element_size()
                dst.append(arena[off:off + nb])
                off += nb + 5
            rows = ops.copy_fingerprint(src, dst, True)
            for s, d, (a, b) in zip(src, dst, rows.tolist()):
                assert bytes(d.numpy()) == ref.tensor_bytes(s)
                assert memstate.Fingerprint(a & (2**64 - 1), b & (2**64 - 1)) == ref_fp(s)
            # into typed destinations as well (any dtype with the same byte count)
            typed = [torch.empty_like(s, memory_format=torch.contiguous_format) for s in src]
            assert ops.copy_fingerprint(src, typed, False).numel() == 0
            assert all(torch.equal(t, s) for t, s in zip(typed, src))
    finally:
        C.set_fingerprint_chunk_bytes(before)


def test_copy_fingerprint_checks_destinations():
    ops = _ext.ops()
    with pytest.raises(RuntimeError, match=r"dst\[0\] holds 12 bytes but src\[0\] has 16"):
        ops.copy_fingerprint([torch.ones(4)], [torch.ones(3)], True)
    with pytest.raises(RuntimeError, match=r"dst\[0\] must be a dense contiguous"):
        ops.copy_fingerprint([torch.ones(4)], [torch.ones(4, 2)[:, 0]], True)
    with pytest.raises(RuntimeError, match="2 destinations"):
        ops.copy_fingerprint([torch.ones(4)], [torch.ones(4), torch.ones(4)], True)


@pytest.mark.cuda
def test_cuda_copy_fingerprint_aligned_and_unaligned():
    ops = _ext.ops()
    gen = torch.Generator().manual_seed(11)
    src = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen).cuda() for n in (0, 1, 15, 16, 17, 70_001, 3_000_000)]
    for off in (0, 1, 8, 16):
        arena = torch.zeros(sum(s.numel() for s in src) + 64 * len(src) + off, dtype=torch.uint8, device="cuda")
        dst, o = [], off
        for s in src:
            dst.append(arena[o:o + s.numel()])
            o += (s.numel() + 63) // 64 * 64 + off
        rows = ops.copy_fingerprint(src, dst, True).cpu().tolist()
        for s, d, (a, b) in zip(src, dst, rows):
            assert torch.equal(d, s)
            assert memstate.Fingerprint(a & (2**64 - 1), b & (2**64 - 1)) == ref_fp(s.cpu())


def test_one_call_mixing_dense_tensors_and_lazy_views():
    # the op skips materialising when every tensor already is dense bytes: a conjugate, negative
    # or strided view anywhere in the list must still be read as its logical bytes
    gen = torch.Generator().manual_seed(12)
    z = torch.randn(50, dtype=torch.complex64, generator=gen)
    x = torch.randn(40, 30, generator=gen)
    lazy = [z.conj(), z.conj().imag, x.t()]
    assert lazy[0].is_conj() and lazy[1].is_neg() and not lazy[2].is_contiguous()
    for ts in ([x, z, x[3:7]] + lazy, lazy + [x, z], [x, lazy[1]]):
        assert memstate.fingerprint_many(ts) == [ref_fp(t.resolve_conj().resolve_neg().contiguous()) for t in ts]


def test_fingerprint_ops_release_every_reference_to_their_inputs():
    # the ops' Autograd kernel holds the tensor list until the op has run and drops it under one
    # GIL acquisition: no reference may stay behind (a leak) or be dropped twice (a freed tensor)
    ops = _ext.ops()
    ts = [torch.randn(3) for _ in range(40)] + [torch.randn(4, requires_grad=True), torch.nn.Parameter(torch.ones(2))]
    ts += list(torch.randn(64).split(8))  # views
    before = [sys.getrefcount(t) for t in ts]
    expected = [ref_fp(t.detach()) for t in ts]
    for _ in range(3):
        rows = ops.fingerprint(ts)
        assert not rows.requires_grad and rows.grad_fn is None
        ops.fingerprint_sums(ts, [])
        assert memstate.fingerprint_many(ts) == expected
    assert [sys.getrefcount(t) for t in ts] == before
    refs = [weakref.ref(t) for t in ts]
    del ts, rows
    gc.collect()
    assert all(r() is None for r in refs)


def test_fingerprint_many_from_several_threads():
    # every call releases its list's Python references under the GIL from a thread that had
    # dropped it: concurrent callers must neither deadlock nor mix up results
    gen = torch.Generator().manual_seed(5)
    lists = [[torch.randn(int(n), generator=gen) for n in torch.randint(1, 300, (200,), generator=gen)]
             for _ in range(4)]
    expected = [[ref_fp(t) for t in ts] for ts in lists]
    results, errors = {}, []

    def run(k):
        try:
            results[k] = all(memstate.fingerprint_many(lists[k]) == expected[k] for _ in range(20))
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads), "fingerprint_many deadlocked across threads"
    assert errors == [] and results == {k: True for k in range(4)}


def test_fingerprint_many_names_the_offender_in_a_long_list():
    # one native call serves a valid list; a refused one falls back to the per-tensor checks
    ts = [torch.ones(3)] * 700 + ["not a tensor"] + [torch.ones(3)] * 10
    with pytest.raises(TypeError, match=r"tensors\[700\]: expected a torch.Tensor, got str"):
        memstate.fingerprint_many(ts)
    ts[700] = torch.empty(2, device="meta")
    with pytest.raises(TypeError, match=r"tensors\[700\]: meta tensors"):
        memstate.fingerprint_many(ts)
    assert memstate.fingerprint_many([]) == []
    assert memstate.fingerprint_many(iter([torch.ones(3), torch.zeros(2)]), iter(["a", "b"])) == \
        [ref_fp(torch.ones(3)), ref_fp(torch.zeros(2))]


def _direct(ts):
    return _ext.load().fingerprint_many_cpu(ts)


def test_fingerprint_many_direct_path_equals_the_op_and_the_reference():
    # fingerprint_many's one native call for plain CPU tensors (memstate._C.fingerprint_many_cpu)
    # reads the tensors through their Python objects and skips the dispatcher: every plain kind
    # of tensor must give the op's and the numpy reference's fingerprints
    from memstate.fingerprint import _from_rows

    gen = torch.Generator().manual_seed(21)
    base = torch.randn(50, generator=gen)
    ts = [torch.randn(5, generator=gen), torch.nn.Parameter(torch.randn(3, 4, generator=gen)), torch.zeros(0),
          torch.tensor(3.5), torch.arange(7, dtype=torch.uint8), torch.randn(4, 4, generator=gen).t(), base[3:17],
          base[::3], torch.randn(3, generator=gen).to(torch.bfloat16), torch.tensor([True, False]),
          torch.randn(2, 3, dtype=torch.complex64, generator=gen), torch.randn(4, requires_grad=True)]
    with torch.inference_mode():
        ts.append(torch.randn(6, generator=gen))
    want = [ref_fp(t.detach().contiguous()) for t in ts]
    got = _direct(ts)
    assert got is not None and got == want
    assert [type(f) for f in got] == [memstate.Fingerprint] * len(ts)
    assert not any(gc.is_tracked(f) for f in got)  # hold no references: no cycles possible
    assert memstate.fingerprint_many(ts) == want == _from_rows(_ext.ops().fingerprint(ts))
    assert _direct([]) == []


class _Sub(torch.Tensor):
    pass


def test_fingerprint_many_direct_path_declines_what_the_dispatcher_must_see():
    # a subclass, a lazy conjugate or negative view, a meta tensor, a non-tensor or an active
    # Python mode: the direct path answers None and fingerprint_many calls the op (or names the
    # offender) as before
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    plain = torch.randn(5)
    z = torch.randn(4, dtype=torch.complex64)
    for bad in (torch.randn(3).as_subclass(_Sub), z.conj(), z.conj().imag, torch.empty(2, device="meta"), "x", None):
        assert _direct([plain, bad]) is None, bad
    sub = torch.arange(6.0).as_subclass(_Sub)
    assert memstate.fingerprint_many([plain, sub, z.conj()]) == [
        ref_fp(plain), ref_fp(torch.arange(6.0)), ref_fp(z.conj().resolve_conj())]

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record():
        assert _direct([plain]) is None
        assert memstate.fingerprint_many([plain]) == [ref_fp(plain)]
    assert any("memstate.fingerprint" in f for f in seen), seen  # the mode saw the op

    with TorchFunctionMode():
        assert _direct([plain]) is None
    assert _direct([plain]) == [ref_fp(plain)]


_KINDS = ["plain", "param", "slice", "strided", "transposed", "conj", "neg", "subclass", "inference", "scalar",
          "empty", "requires_grad"]
_FUZZ_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.int8, torch.int64, torch.uint8, torch.bool,
                torch.complex64]


def _fuzz_tensor(kind, dtype, n, offset, seed):
    gen = torch.Generator().manual_seed(seed)
    base = random_tensor(n + offset + 8, dtype if kind not in ("conj", "neg") else torch.complex64, gen)
    if kind == "param":
        return torch.nn.Parameter(base[:n].clone(), requires_grad=dtype.is_floating_point or dtype.is_complex)
    if kind == "slice":
        return base[offset:offset + n]
    if kind == "strided":
        return base[offset::2]
    if kind == "transposed":
        return base[: (n // 2) * 2].reshape(2, -1).t() if n >= 2 else base[:n]
    if kind == "conj":
        return base[offset:offset + n].conj()
    if kind == "neg":
        return base[offset:offset + n].conj().imag
    if kind == "subclass":
        return base[:n].as_subclass(_Sub)
    if kind == "inference":
        with torch.inference_mode():
            return base[:n].clone()
    if kind == "scalar":
        return base[offset].clone()
    if kind == "empty":
        return base[:0]
    if kind == "requires_grad" and (dtype.is_floating_point or dtype.is_complex):
        return base[:n].clone().requires_grad_()
    return base[:n]


@settings(max_examples=80, deadline=None)
@given(items=st.lists(st.tuples(st.sampled_from(_KINDS), st.sampled_from(_FUZZ_DTYPES), st.integers(0, 3000),
                                st.integers(0, 9), st.integers(0, 2**31 - 1)), min_size=1, max_size=12))
def test_fingerprint_many_of_any_mix_equals_the_reference(items):
    # whichever path a list takes (the direct one, the op, the checked per-device split), every
    # tensor's fingerprint is the reference's of its logical row-major bytes
    ts = [_fuzz_tensor(*item) for item in items]
    plain = [t.detach().resolve_conj().resolve_neg().contiguous().as_subclass(torch.Tensor) for t in ts]
    want = [ref_fp(t) for t in plain]
    assert memstate.fingerprint_many(ts) == want
    direct = _direct(ts)
    assert direct is None or direct == want
    if all(k in ("plain", "param", "slice", "strided", "transposed", "inference", "scalar", "empty", "requires_grad")
           for k, *_ in items):
        assert direct == want  # plain CPU tensors only: the direct path serves them


def test_fingerprint_bytes_form_round_trips():
    gen = np.random.default_rng(8)
    for a, b in [(0, 0), (2**64 - 1, 1), *gen.integers(0, 2**64, size=(20, 2), dtype=np.uint64).tolist()]:
        fp = memstate.Fingerprint(int(a), int(b))
        raw = fp.to_bytes()
        assert raw == int(a).to_bytes(8, "little") + int(b).to_bytes(8, "little")
        assert memstate.Fingerprint.from_bytes(raw) == fp == memstate.Fingerprint.from_bytes(bytearray(raw))
        assert fp.hex() == f"{int(a):016x}{int(b):016x}" and fp.lanes == (int(a), int(b))
        assert memstate.Fingerprint.fromhex(fp.hex()) == fp and hash(memstate.Fingerprint.fromhex(fp.hex())) == hash(fp)
    for bad in (b"x" * 15, b"x" * 17, "0" * 16, 5):
        with pytest.raises(ValueError, match="16 bytes"):
            memstate.Fingerprint.from_bytes(bad)
    import copy
    import pickle

    fp = memstate.fingerprint(torch.arange(9))
    assert pickle.loads(pickle.dumps(fp)) == fp and copy.deepcopy(fp) == fp and fp != fp.to_bytes()


_FREED_STORAGE = """
import sys, torch, memstate
from memstate import _ext
ops = _ext.ops()
dev = sys.argv[1]
def freed(shape, view=None):
    t = torch.randn(*shape, device=dev)
    v = t if view is None else view(t)
    t.untyped_storage().resize_(0)
    return v
calls = {
    "fingerprint": lambda: memstate.fingerprint(freed([1_000_000])),
    "fingerprint_many": lambda: memstate.fingerprint_many([torch.ones(3, device=dev),
                                                           freed([100, 100], lambda t: t[:, 1:])]),
    "op": lambda: ops.fingerprint([freed([10])]),
    "copy_fingerprint": lambda: ops.copy_fingerprint([freed([10])], [torch.empty(40, dtype=torch.uint8, device=dev)],
                                                     True),
}
def step():
    p = torch.nn.Parameter(torch.randn(100, device=dev))
    p.grad = freed([100])
    memstate.optim.AdamW([p]).step()
calls["adamw"] = step
for name, call in calls.items():
    try:
        call()
        print(name, "NO ERROR")
    except (RuntimeError, ValueError) as e:
        print(name, str(e).splitlines()[0])
"""


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_tensors_whose_storage_was_freed_are_refused_not_read(device):
    # a storage resized to 0 (as FSDP does to free parameters) left a tensor whose elements point
    # at no memory: the ops read through the null pointer and crashed the process
    import subprocess

    out = subprocess.run([sys.executable, "-c", _FREED_STORAGE, device], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())
    assert set(lines) == {"fingerprint", "fingerprint_many", "op", "copy_fingerprint", "adamw"}
    assert lines["fingerprint"].endswith("tensors[0] needs 4000000 bytes of storage but its storage holds 0 "
                                         "(was it freed or resized?)")
    assert "tensors[1] needs 40000 bytes" in lines["fingerprint_many"]
    assert "memstate.copy_fingerprint: src[0] needs 40 bytes" in lines["copy_fingerprint"]
    # (the optimizer checks every bucket's memory before any runs, naming the parameter)
    assert lines["adamw"] == ("memstate.optim.AdamW: the gradient of parameter 0 (param_groups[0]['params'][0], "
                              "shape (100,)) needs 400 bytes of storage but its storage holds 0 (was it freed or "
                              "resized?)")


def test_opcheck_fingerprint_ops_with_inputs_requiring_grad():
    from torch.library import opcheck

    ops = _ext.ops()
    ts = [torch.randn(3, requires_grad=True), torch.randn(2, 5), torch.arange(7, dtype=torch.int16)]
    for op, args in ((ops.fingerprint.default, (ts,)), (ops.fingerprint_sums.default, (ts, [0, 5, 9]))):
        result = opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, result
