"""Every NaN the optimizer kernels store is the one canonical quiet NaN of its dtype (issue 16).

IEEE leaves a NaN result's sign and payload to the hardware: x86 makes 0xFFC00000 for 0/0 and
keeps an input NaN's payload, NVIDIA GPUs return 0x7FFFFFFF. memstate's storage conversion
(csrc/include/memstate/precision.h) writes every NaN as float32 0x7FC00000, float64
0x7FF8000000000000, bfloat16 0x7FC0, float16 0x7E00, on every device, for parameters and every
state buffer, so that bytes and fingerprints do not depend on the device.
"""
import pytest
import torch

import memstate
import memstate.optim as mo
from memstate import _ext

CANONICAL = {
    torch.float32: (torch.int32, 0x7FC00000),
    torch.float64: (torch.int64, 0x7FF8000000000000),
    torch.bfloat16: (torch.int16, 0x7FC0),
    torch.float16: (torch.int16, 0x7E00),
}
# a quiet NaN with the sign bit and a payload, per dtype: what x86 would pass through
ODD_NAN = {
    torch.float32: (torch.int32, -0x003FFFF7),  # 0xFFC00009
    torch.float64: (torch.int64, -0x0007FFFFFFFFFFF7),  # 0xFFF8000000000009
    torch.bfloat16: (torch.int16, -0x003B),  # 0xFFC5
    torch.float16: (torch.int16, -0x01F7),  # 0xFE09
}
DTYPES = list(CANONICAL)
SHAPES = [(37,), (5, 9)]


def _signed(value: int, bits: int) -> int:
    return value - (1 << bits) if value >= 1 << (bits - 1) else value


def odd_nan(dtype):
    int_dtype, bits = ODD_NAN[dtype]
    return torch.tensor([bits], dtype=int_dtype).view(dtype)[0]


def assert_canonical(t: torch.Tensor, what: str, expect_nan: bool = True):
    int_dtype, canon = CANONICAL[t.dtype]
    t = t.detach().cpu().contiguous()
    nan = torch.isnan(t)
    if expect_nan:
        assert nan.any(), f"{what}: the case made no NaN (the test would prove nothing)"
    bits = t.view(int_dtype)[nan]
    want = _signed(canon, torch.iinfo(int_dtype).bits)
    bad = bits[bits != want]
    assert bad.numel() == 0, (
        f"{what}: {bad.numel()} of {int(nan.sum())} NaNs are not canonical, e.g. "
        f"{bad[0].item() & ((1 << torch.iinfo(int_dtype).bits) - 1):#x} (want {canon:#x})"
    )


def _grads(dtype, kind, step):
    g = torch.Generator().manual_seed(600 + step)
    out = [torch.randn(s, generator=g).to(dtype) for s in SHAPES]
    if kind == "nan":
        out[0][3] = odd_nan(dtype)
        out[1][2, 4] = odd_nan(dtype)
    elif kind == "inf":  # +inf then -inf: the momentum/moments then compute inf - inf
        sign = 1.0 if step == 0 else -1.0
        out[0][3] = sign * float("inf")
        out[1][2, 4] = -sign * float("inf")
    elif kind == "zero":  # Adam with eps=0: m / (sqrt(v) + 0) = 0 / 0
        out = [torch.zeros_like(x) for x in out]
    return out


CASES = [
    ("SGD", dict(lr=0.1), "nan"),
    ("SGD", dict(lr=0.1, momentum=0.9), "nan"),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01), "inf"),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.5), "inf"),
    ("Adam", dict(lr=1e-2), "nan"),
    ("Adam", dict(lr=1e-2, amsgrad=True), "inf"),
    ("Adam", dict(lr=1e-2, eps=0.0), "zero"),
    ("AdamW", dict(lr=1e-2, eps=0.0, amsgrad=True), "zero"),
    ("AdamW", dict(lr=1e-2, weight_decay=0.1), "nan"),
]
OPT = {"SGD": mo.SGD, "Adam": mo.Adam, "AdamW": mo.AdamW}


def _run(name, hp, kind, dtype, device="cpu", steps=2):
    g = torch.Generator().manual_seed(599)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype).to(device)) for s in SHAPES]
    opt = OPT[name](ps, fingerprint=True, **hp)
    for step in range(steps):
        for p, x in zip(ps, _grads(dtype, kind, step)):
            p.grad = x.to(device)
        opt.step()
    return ps, opt


def _stored(ps, opt):
    """(name, tensor) of every parameter and state buffer the kernels wrote."""
    out = []
    for i, p in enumerate(ps):
        out.append((f"param {i}", p))
        for k, v in opt.state[p].items():
            if k != "step":
                out.append((f"state {i} {k}", v))
    return out


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name, hp, kind", CASES, ids=[f"{n}-{k}-{i}" for i, (n, _, k) in enumerate(CASES)])
def test_every_stored_nan_is_canonical_cpu(name, hp, kind, dtype, isa):
    C = _ext.load()
    if isa not in C.build_info()["cpu_isas"].split(","):
        pytest.skip(f"this CPU lacks {isa}")
    C.set_cpu_isa(isa)
    try:
        ps, opt = _run(name, hp, kind, dtype)
    finally:
        C.set_cpu_isa("auto")
    # every stored tensor's NaNs are canonical; param 0 certainly has some
    for what, t in _stored(ps, opt):
        assert_canonical(t, f"{name} {kind} {dtype} {isa}: {what}", expect_nan=what == "param 0")
    # and the in-pass fingerprints describe those canonical bytes
    for i, p in enumerate(ps):
        assert opt.fingerprints(p)["param"] == memstate.fingerprint(p), f"param {i}"


def test_canonical_nan_does_not_touch_finite_values_or_infinities():
    """Only NaNs are rewritten: +-inf and finite results keep their bits (compared with the
    same step on finite data, where no NaN exists)."""
    for dtype in DTYPES:
        ps, _ = _run("SGD", dict(lr=0.1), "inf", dtype, steps=1)
        assert torch.isinf(ps[0][3]) and ps[0][3] < 0, dtype
        assert torch.isinf(ps[1][2, 4]) and ps[1][2, 4] > 0, dtype
        assert not torch.isnan(ps[0]).any(), dtype


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name, hp, kind", CASES, ids=[f"{n}-{k}-{i}" for i, (n, _, k) in enumerate(CASES)])
def test_every_stored_nan_is_canonical_cuda_and_equals_cpu(name, hp, kind, dtype):
    pc, oc = _run(name, hp, kind, dtype)
    pg, og = _run(name, hp, kind, dtype, device="cuda")
    for (what, c), (_, g) in zip(_stored(pc, oc), _stored(pg, og)):
        assert_canonical(g, f"CUDA {name} {kind} {dtype}: {what}", expect_nan=what == "param 0")
        int_dtype = CANONICAL[dtype][0]
        assert torch.equal(c.detach().view(int_dtype), g.detach().cpu().view(int_dtype)), f"CPU != CUDA: {what}"
    assert oc.state_fingerprint() == og.state_fingerprint()
