"""Deterministic gradient norms (issue 11 item 8): memstate.clip_grad_norm_ / get_total_norm.

The native norm is compared bit for bit with the numpy reference written from the spec
(memstate.reference.norm_sums), across dtypes, sizes around the leaf boundaries, thread counts
and CPU ISAs; clip_grad_norm_ against torch.nn.utils.clip_grad_norm_."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import memstate
from memstate import _ext, clip, reference

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
ORDERS = [2.0, 1.0, math.inf, 3.0]


def _bits(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).view(np.uint64)


def _native(ts, p):
    return clip.norm_sums(ts, p).numpy()


def _rand(n, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * scale
    x *= torch.exp(torch.randn(n, generator=g, dtype=torch.float64) * 3)  # a wide dynamic range
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", ORDERS)
def test_norm_sums_equal_the_reference_bit_for_bit(dtype, p):
    sizes = [0, 1, 5, 31, 32, 33, 1023, 1024, 1025, 3000, 70001]
    ts = [_rand(n, dtype, i) for i, n in enumerate(sizes)]
    got, want = _native(ts, p), reference.norm_sums(ts, p)
    assert got.shape == (len(sizes) + 1,)
    np.testing.assert_array_equal(_bits(got), _bits(want))


def test_the_tree_is_not_a_plain_sum():
    """A check that can fail: the spec's order gives a different float64 sum than a sequential
    one on ill-conditioned data, and the native result follows the spec."""
    x = torch.ones(2048, dtype=torch.float64)
    x[0] = 2.0 ** 53  # a sequential sum loses every 1 added to it; the tree adds the 1s first
    got = _native([x], 1.0)[0]
    seq = 0.0
    for v in x.abs().tolist():
        seq += v
    assert got == reference.norm_sums([x], 1.0)[0]
    assert got != seq


@pytest.mark.parametrize("p", [2.0, 1.0, math.inf])
def test_independent_of_threads_and_isa(threads, p):
    ts = [_rand(700_000, torch.float32, 1), _rand(5, torch.float16, 2), _rand(300_000, torch.float64, 3),
          _rand(123_457, torch.bfloat16, 4)]
    want = reference.norm_sums(ts, p)
    C = _ext.load()
    isas = C.build_info()["cpu_isas"].split(",")
    try:
        for isa in isas:
            C.set_cpu_isa(isa)
            for n in (1, 2, 4):
                threads(n)
                np.testing.assert_array_equal(_bits(_native(ts, p)), _bits(want), err_msg=f"{isa}, {n} threads")
    finally:
        C.set_cpu_isa("auto")


def test_non_contiguous_is_read_in_logical_order():
    x = _rand(3000, torch.float32, 5).reshape(60, 50)
    np.testing.assert_array_equal(_bits(_native([x.t()], 2.0)), _bits(reference.norm_sums([x.t().contiguous()], 2.0)))


def test_nonfinite_values():
    x = torch.tensor([1.0, float("inf"), 2.0])
    y = torch.tensor([1.0, float("nan"), 2.0])
    assert _native([x], 2.0)[0] == math.inf and _native([x], math.inf)[0] == math.inf
    for p in (2.0, 1.0, math.inf):
        r = _native([x, y], p)
        assert math.isnan(r[1]) and math.isnan(r[2])
        assert _bits(r[2]) == np.uint64(0x7FF8000000000000)  # the canonical NaN
    np.testing.assert_array_equal(_bits(_native([x, y], math.inf)), _bits(reference.norm_sums([x, y], math.inf)))


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 2100), min_size=1, max_size=5),
       dtype=st.sampled_from(DTYPES), p=st.sampled_from(ORDERS + [0.5, 1.5]), seed=st.integers(0, 2 ** 31 - 1),
       special=st.sampled_from([None, "inf", "nan", "zero"]))
def test_fuzz_against_reference(sizes, dtype, p, seed, special):
    ts = [_rand(n, dtype, seed + i) for i, n in enumerate(sizes)]
    if special and ts[0].numel():
        ts[0][seed % ts[0].numel()] = {"inf": math.inf, "nan": math.nan, "zero": 0.0}[special]
    got, want = _native(ts, p), reference.norm_sums(ts, p)
    np.testing.assert_array_equal(_bits(np.where(np.isnan(got), np.nan, got)), _bits(np.where(np.isnan(want), np.nan, want)))


def test_general_p_uses_the_c_library_pow():
    """The fuzz case that found numpy's AVX-512 np.power one ulp away from glibc's pow on 9 of
    146 terms: the reference must use the C library's pow, as the spec and the kernels do."""
    ts = [_rand(n, torch.float32, 1 + i) for i, n in enumerate([0, 0, 0, 0, 146])]
    np.testing.assert_array_equal(_bits(_native(ts, 1.5)), _bits(reference.norm_sums(ts, 1.5)))
    a = np.abs(ts[4].double().numpy())
    np.testing.assert_array_equal(_bits(reference._libm_pow(a, 1.5)), _bits([math.pow(v, 1.5) for v in a]))


def test_python_tree_equals_the_native_tree():
    """get_total_norm combines per-device values with a Python copy of the tree: it must agree."""
    ts = [_rand(n, torch.float32, n) for n in (10, 2000, 1, 70000, 5, 9)]
    for p in (2.0, 1.0, math.inf):
        r = _native(ts, p)
        assert clip._tree(list(r[:-1]), p) == r[-1]


# ---------------------------------------------------------------------------------- clipping


def _params(seed, dtype=torch.float32, scale=10.0):
    torch.manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(*s, dtype=dtype)) for s in [(7, 5), (3,), (40, 30), (1,)]]
    for p in ps:
        p.grad = torch.randn_like(p) * scale
    ps.append(torch.nn.Parameter(torch.randn(4)))  # no grad: skipped
    return ps


@pytest.mark.parametrize("p", [2.0, 1.0, math.inf, 3.0, "inf"])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_matches_torch(p, max_norm):
    a, b = _params(0), _params(0)
    na = memstate.clip_grad_norm_(a, max_norm, norm_type=p)
    nb = torch.nn.utils.clip_grad_norm_(b, max_norm, norm_type=p)
    assert na.dtype == nb.dtype and na.shape == nb.shape == ()
    torch.testing.assert_close(na, nb, rtol=2e-6, atol=0)
    for x, y in zip(a, b):
        if x.grad is not None:
            torch.testing.assert_close(x.grad, y.grad, rtol=2e-6, atol=0)
    # the scaling is torch's own arithmetic: given memstate's norm, the same bits
    c = _params(0)
    torch.nn.utils.clip_grads_with_norm_(c, max_norm, na)
    for x, y in zip(a, c):
        if x.grad is not None:
            assert torch.equal(x.grad, y.grad)
    if max_norm > 1e5:  # no clipping: gradients untouched
        for x, y in zip(a, _params(0)):
            if x.grad is not None:
                assert torch.equal(x.grad, y.grad)


def test_clip_norm_equals_reference_and_is_returned_in_the_grads_dtype():
    ps = _params(1, dtype=torch.float64)
    grads = [p.grad.clone() for p in ps if p.grad is not None]
    n = memstate.clip_grad_norm_(ps, 1.0)
    want = math.sqrt(reference.norm_sums(grads, 2.0)[-1])
    assert n.dtype == torch.float64 and n.item() == want


def test_clip_accepts_torch_arguments_and_single_tensors():
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 3.0)
    n = memstate.clip_grad_norm_(p, 1.0, foreach=True)
    assert n.item() == 6.0
    assert torch.allclose(p.grad, torch.full((4,), 3.0 / (6.0 + 1e-6)))
    q = torch.nn.Parameter(torch.ones(2))
    assert memstate.clip_grad_norm_([q], 1.0).item() == 0.0  # no gradients at all
    assert memstate.clip_grad_norm_((x for x in [p]), 100.0, foreach=False).item() > 0  # a generator


def test_error_if_nonfinite_as_torch():
    def grads():
        p = torch.nn.Parameter(torch.ones(3))
        p.grad = torch.tensor([1.0, float("nan"), 0.0])
        return [p]

    with pytest.raises(RuntimeError) as ours:
        memstate.clip_grad_norm_(grads(), 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.utils.clip_grad_norm_(grads(), 1.0, error_if_nonfinite=True)
    assert str(ours.value) == str(theirs.value)
    assert math.isnan(memstate.clip_grad_norm_(grads(), 1.0).item())


def test_complex_gradients_for_the_2_norm():
    p = torch.nn.Parameter(torch.randn(50, dtype=torch.complex64))
    p.grad = torch.randn(50, dtype=torch.complex64)
    q = torch.nn.Parameter(p.detach().clone())
    q.grad = p.grad.clone()
    n = memstate.clip_grad_norm_([p], 0.1)
    m = torch.nn.utils.clip_grad_norm_([q], 0.1)
    assert n.dtype == m.dtype == torch.float32
    torch.testing.assert_close(n, m, rtol=2e-6, atol=0)
    torch.testing.assert_close(p.grad, q.grad, rtol=2e-6, atol=1e-7)
    with pytest.raises(ValueError, match="norm_type=2 only"):
        memstate.clip_grad_norm_([p], 0.1, norm_type=1)


def test_bad_input_is_refused_naming_it_and_leaves_grads_untouched():
    ps = _params(2)
    before = [p.grad.clone() if p.grad is not None else None for p in ps]
    for bad in (0, -1.0, float("nan"), "two"):
        with pytest.raises(ValueError, match="norm_type"):
            memstate.clip_grad_norm_(ps, 1.0, norm_type=bad)
    s = torch.nn.Parameter(torch.ones(3))
    s.grad = torch.ones(3).to_sparse()
    with pytest.raises(TypeError, match=r"parameters\[5\].grad has layout torch.sparse_coo"):
        memstate.clip_grad_norm_(ps + [s], 1.0)
    with pytest.raises(RuntimeError, match=r"memstate.norm_sums: tensors\[0\] is a meta tensor"):
        clip.norm_sums([torch.empty(3, device="meta")])
    with pytest.raises(RuntimeError, match=r"tensors\[1\] has dtype Int"):
        clip.norm_sums([torch.ones(3), torch.ones(3, dtype=torch.int32)])
    for p, b in zip(ps, before):
        assert (p.grad is None and b is None) or torch.equal(p.grad, b)


def test_empty_inputs():
    assert clip.norm_sums([], 2.0).tolist() == [0.0]
    assert clip.norm_sums([torch.empty(0)], 2.0).tolist() == [0.0, 0.0]
    assert memstate.get_total_norm([]).item() == 0.0


# ---------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [2.0, 1.0, math.inf])
def test_cuda_equals_cpu_bit_for_bit(dtype, p):
    sizes = [0, 1, 1023, 1024, 1025, 70001, 1_000_003]
    ts = [_rand(n, dtype, i) for i, n in enumerate(sizes)]
    cpu = _native(ts, p)
    gpu = clip.norm_sums([t.cuda() for t in ts], p)
    assert gpu.device.type == "cuda"
    np.testing.assert_array_equal(_bits(gpu.cpu().numpy()), _bits(cpu))


@pytest.mark.cuda
def test_cuda_clip_equals_cpu_clip():
    a = _params(3)
    b = [torch.nn.Parameter(p.detach().cuda()) for p in a]
    for x, y in zip(a, b):
        if x.grad is not None:
            y.grad = x.grad.cuda()
    na, nb = memstate.clip_grad_norm_(a, 1.0), memstate.clip_grad_norm_(b, 1.0)
    assert na.item() == nb.item()
    for x, y in zip(a, b):
        if x.grad is not None:
            assert torch.equal(x.grad, y.grad.cpu())
