"""torch.ops.memstate.* called directly with bad arguments: a RuntimeError/ValueError naming the
argument, never a crash (issue 10 deliverable 4, issue 10 item 9, issue 16 items 2, 4, 5, 6).

The refusal table runs in ONE subprocess that prints a line per case; a segfault or abort in
any case kills the subprocess, which the test reports (with the cases that ran before it).
"""
import os
import subprocess
import sys

import pytest
import torch

import memstate
from memstate import _ext, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each case: (name, expression, needle). The expression runs with `ops` = torch.ops.memstate,
# `torch`, and helpers below; it must raise RuntimeError or ValueError whose message contains
# the needle (the argument and index it names).
TABLE = r'''
import re, sys, torch
from memstate import _ext
ops = _ext.ops()
f = lambda *s, dt=torch.float32: torch.zeros(*s, dtype=dt)
meta = torch.empty(4, device="meta")
buf = torch.zeros(64)
SGD = lambda p, g, b=(), first=(), **kw: ops.sgd_step(list(p), list(g), list(b), list(first), kw.get("lr", 0.1),
        kw.get("momentum", 0.0), kw.get("dampening", 0.0), 0.0, kw.get("nesterov", False), False, False)
ADAM = lambda p, g, m, v, vmax=(), steps=(1.0,), amsgrad=False: ops.adam_step(list(p), list(g), list(m), list(v),
        list(vmax), list(steps), 1e-3, 0.9, 0.999, 1e-8, 0.0, False, amsgrad, False, False)
CASES = [
  # fingerprint / fingerprint_sums
  ("fp meta", lambda: ops.fingerprint([meta]), "tensors[0] is a meta tensor"),
  ("fp cpu+meta", lambda: ops.fingerprint([f(3), meta]), "tensors[1] is a meta tensor"),
  ("fp sparse", lambda: ops.fingerprint([f(3), torch.eye(3).to_sparse()]), "tensors[1]"),
  ("sums short first_pairs", lambda: ops.fingerprint_sums([f(3), f(4)], [0]), "first_pairs"),
  ("sums negative first_pairs", lambda: ops.fingerprint_sums([f(3)], [-1]), "first_pairs[0]"),
  ("sums first_pairs without tensors", lambda: ops.fingerprint_sums([], [3]), "first_pairs"),
  ("sums meta", lambda: ops.fingerprint_sums([meta], [0]), "tensors[0] is a meta tensor"),
  # a 1 PiB logical view of one element (more than any address space): the allocator refuses
  # to make it contiguous; the error names the argument
  ("fp huge expanded view", lambda: ops.fingerprint([torch.zeros(1).expand(2**48)]), "tensors[0] (shape [281474976710656]"),
  ("copy huge expanded src", lambda: ops.copy_fingerprint([f(2), torch.zeros(1).expand(2**48)], [f(2), f(2)], True), "src[1] (shape"),
  # copy_fingerprint
  ("copy length mismatch", lambda: ops.copy_fingerprint([f(3), f(3)], [f(3)], True), "destinations"),
  ("copy dst too small", lambda: ops.copy_fingerprint([f(3)], [f(2)], True), "dst[0]"),
  ("copy dst non-contiguous", lambda: ops.copy_fingerprint([f(6)], [f(3, 4)[:, :2].t()], True), "dst[0]"),
  ("copy dst meta", lambda: ops.copy_fingerprint([f(4)], [meta], True), "dst[0] is a meta tensor"),
  ("copy same dst twice", lambda: (lambda d: ops.copy_fingerprint([f(8), f(8)], [d, d], True))(f(8)), "dst[1] is the same memory as dst[0]"),
  ("copy overlapping dsts", lambda: ops.copy_fingerprint([f(8), f(8)], [buf[0:8], buf[4:12]], True), "dst[1] overlaps dst[0]"),
  ("copy dst overlaps its src", lambda: ops.copy_fingerprint([buf[0:8]], [buf[4:12]], True), "overlaps"),
  ("copy dst overlaps another src", lambda: ops.copy_fingerprint([buf[0:8], f(8)], [f(8), buf[2:10]], False), "dst[1]"),
  ("copy dst is another src", lambda: ops.copy_fingerprint([buf[0:8], buf[8:16]], [buf[8:16], buf[0:8]], True), "same memory"),
  # sgd_step
  ("sgd grads short", lambda: SGD([f(3), f(3)], [f(3)]), "grads has 1 tensors"),
  ("sgd grad dtype", lambda: SGD([f(3)], [f(3, dt=torch.float64)]), "grads[0] has dtype"),
  ("sgd int params", lambda: SGD([f(3, dt=torch.int32)], [f(3, dt=torch.int32)]), "params[0] has dtype"),
  ("sgd grad shape", lambda: SGD([f(3)], [f(4)]), "grads[0] has shape"),
  ("sgd non-contiguous param", lambda: SGD([f(4, 4).t()], [f(4, 4)]), "params[0] must be contiguous"),
  ("sgd first short", lambda: SGD([f(3)], [f(3)], [f(3)], [], momentum=0.9), "first has 0 entries"),
  ("sgd buffers short", lambda: SGD([f(3)], [f(3)], [], [1], momentum=0.9), "momentum_buffers has 0"),
  ("sgd nesterov dampening", lambda: SGD([f(3)], [f(3)], [f(3)], [1], momentum=0.9, nesterov=True, dampening=0.5), "Nesterov"),
  ("sgd param listed twice", lambda: (lambda p: SGD([p, p], [f(3), f(3)]))(f(3)), "params[1] is the same memory as params[0]"),
  ("sgd buffer aliases param", lambda: (lambda p: SGD([p], [f(3)], [p], [1], momentum=0.9))(f(3)), "params[0]"),
  ("sgd params overlap", lambda: SGD([buf[0:8], buf[4:12]], [f(8), f(8)]), "params[1] overlaps params[0]"),
  ("sgd grad overlaps param", lambda: SGD([buf[0:8]], [buf[4:12]]), "overlaps"),
  ("sgd meta", lambda: SGD([meta], [meta]), "params[0] is a meta tensor"),
  ("sgd cpu+meta grad", lambda: SGD([f(4)], [meta]), "grads[0] is a meta tensor"),
  # adam_step
  ("adam steps short", lambda: ADAM([f(3)], [f(3)], [f(3)], [f(3)], steps=()), "steps has 0 entries"),
  ("adam step zero", lambda: ADAM([f(3)], [f(3)], [f(3)], [f(3)], steps=(0.0,)), "steps[0]"),
  ("adam step nan", lambda: ADAM([f(3)], [f(3)], [f(3)], [f(3)], steps=(float("nan"),)), "steps[0]"),
  ("adam amsgrad no vmax", lambda: ADAM([f(3)], [f(3)], [f(3)], [f(3)], amsgrad=True), "max_exp_avg_sqs has 0"),
  ("adam exp_avg dtype", lambda: ADAM([f(3)], [f(3)], [f(3, dt=torch.float16)], [f(3)]), "exp_avgs[0] has dtype"),
  ("adam exp_avg_sq is exp_avg", lambda: (lambda m: ADAM([f(3)], [f(3)], [m], [m]))(f(3)), "exp_avg_sqs[0] is the same memory as exp_avgs[0]"),
  ("adam meta", lambda: ADAM([meta], [meta], [meta], [meta]), "params[0] is a meta tensor"),
  # nonfinite_any
  ("nonfinite float8", lambda: ops.nonfinite_any([f(3), torch.zeros(3, dtype=torch.float8_e4m3fn)]), "tensors[1] has dtype"),
  ("nonfinite complex32", lambda: ops.nonfinite_any([torch.zeros(3, dtype=torch.complex32)]), "tensors[0] has dtype"),
  ("nonfinite float8 after a NaN", lambda: ops.nonfinite_any([torch.tensor([float("nan")]), torch.zeros(3, dtype=torch.float8_e5m2)]), "tensors[1] has dtype"),
  ("nonfinite sparse", lambda: ops.nonfinite_any([torch.eye(2).to_sparse()]), "tensors[0]"),
  ("nonfinite meta", lambda: ops.nonfinite_any([meta]), "tensors[0] is a meta tensor"),
  ("norm_sums meta", lambda: ops.norm_sums([f(3), meta], 2.0), "tensors[1] is a meta tensor"),
  ("norm_sums p 0", lambda: ops.norm_sums([f(3)], 0.0), "norm order p must be > 0"),
  ("lion meta", lambda: ops.lion_step([meta], [meta], [meta], 0.1, 0.9, 0.99, 0.0, False, True), "params[0] is a meta tensor"),
  ("adagrad meta grad", lambda: ops.adagrad_step([f(4)], [meta], [f(4)], [1.0], 0.1, 0.0, 1e-10, 0.0, False, True),
   "grads[0] is a meta tensor"),
  ("rmsprop meta", lambda: ops.rmsprop_step([meta], [meta], [meta], [], [], 0.1, 0.99, 1e-8, 0.0, 0.0, False, False, True),
   "params[0] is a meta tensor"),
  # increment_steps
  ("steps 2 elements", lambda: ops.increment_steps([torch.zeros(2)]), "steps[0]"),
  ("steps int", lambda: ops.increment_steps([torch.zeros((), dtype=torch.int64)]), "steps[0]"),
  ("steps listed twice", lambda: (lambda s: ops.increment_steps([s, s]))(torch.zeros(())), "steps[1] is the same memory as steps[0]"),
  ("steps meta", lambda: ops.increment_steps([torch.zeros((), device="meta")]), "steps[0] is a meta tensor"),
]
for name, call, needle in CASES:
    try:
        call()
        print(f"CASE {name}: NO ERROR", flush=True)
    except (RuntimeError, ValueError) as e:
        msg = str(e).split("\n")[0]
        ok = needle in msg and "memstate" in msg
        print(f"CASE {name}: {'OK' if ok else 'WRONG MESSAGE'} {type(e).__name__}: {msg[:300]}", flush=True)
    except BaseException as e:
        print(f"CASE {name}: WRONG TYPE {type(e).__name__}: {str(e)[:300]}", flush=True)
print("DONE", len(CASES), flush=True)
'''


def test_bad_arguments_raise_naming_the_argument_never_crash():
    proc = subprocess.run([sys.executable, "-c", TABLE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("CASE ")]
    assert proc.returncode == 0, (
        f"the subprocess died (exit {proc.returncode}) after {len(lines)} cases:\n"
        + "\n".join(lines[-3:]) + "\n" + proc.stderr[-2000:]
    )
    assert proc.stdout.rstrip().endswith(f"DONE {len(lines)}"), proc.stdout[-2000:]
    bad = [ln for ln in lines if ": OK " not in ln]
    print(f"{len(lines)} bad-argument cases, {len(lines) - len(bad)} refused cleanly")
    assert not bad, "\n".join(bad)


def test_refused_calls_modify_nothing():
    ops = _ext.ops()
    p, q = torch.randn(8), torch.randn(8)
    before = p.clone(), q.clone()
    with pytest.raises(RuntimeError, match="params"):
        ops.sgd_step([p, q, p], [torch.ones(8)] * 3, [], [], 0.1, 0.0, 0.0, 0.0, False, False, False)
    assert torch.equal(p, before[0]) and torch.equal(q, before[1])
    buf = torch.arange(16, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="overlaps"):
        ops.copy_fingerprint([torch.ones(8), buf[0:8]], [buf[8:16], buf[4:12]], True)
    assert torch.equal(buf, torch.arange(16, dtype=torch.float32))


def test_empty_lists_return_empty_results():
    """No tensor at all: the dispatcher has no device to pick; memstate's fallback kernels answer
    with the op's empty result (torch alone would raise 'no tensor arguments')."""
    ops = _ext.ops()
    assert ops.fingerprint([]).shape == (0, 2)
    assert ops.fingerprint_sums([], []).shape == (0, 2)
    assert ops.copy_fingerprint([], [], True).shape == (0, 2)
    assert ops.sgd_step([], [], [], [], 0.1, 0.9, 0.0, 0.0, False, False, True).numel() == 0
    assert ops.adam_step([], [], [], [], [], [], 1e-3, 0.9, 0.999, 1e-8, 0.0, True, True, False, True).numel() == 0
    assert ops.nonfinite_any([]).item() is False
    assert ops.increment_steps([]) == []
    assert memstate.fingerprint_many([]) == []


def test_zero_size_tensors_are_fine():
    ops = _ext.ops()
    z = torch.zeros(0)
    rows = ops.fingerprint([z, torch.zeros(3, 0)])
    assert [tuple(r) for r in rows.tolist()] == [reference.fingerprint_lanes(z)] * 2 or \
        all((a & (2**64 - 1), b & (2**64 - 1)) == reference.fingerprint_lanes(z) for a, b in rows.tolist())
    p = torch.nn.Parameter(torch.zeros(0))
    p.grad = torch.zeros(0)
    opt = memstate.optim.Adam([p], fingerprint=True)
    opt.step()
    assert opt.fingerprints(p)["param"] == memstate.fingerprint(z)


def test_copy_in_place_is_allowed_like_torch_copy():
    ops = _ext.ops()
    t = torch.randn(100)
    before = t.clone()
    rows = ops.copy_fingerprint([t], [t], True)
    assert torch.equal(t, before)
    assert tuple(x & (2**64 - 1) for x in rows[0].tolist()) == reference.fingerprint_lanes(before)


@pytest.mark.parametrize("offset", [1, 2, 3, 5])
def test_misaligned_views_hash_and_copy_bit_identically(offset):
    """A float view at a 4-byte (not 16-byte) offset into a flat buffer, and a byte view at an
    odd offset, hash and copy exactly as the reference; the destination may be misaligned too."""
    ops = _ext.ops()
    flat = torch.randn(70_000 + 8)
    for src in (flat[offset:offset + 70_000], flat.view(torch.uint8)[offset:offset + 4 * 70_000 - 3]):
        assert memstate.fingerprint(src).lanes == reference.fingerprint_lanes(src)
        dst = torch.zeros(src.numel() + 8, dtype=src.dtype)[3:3 + src.numel()]
        rows = ops.copy_fingerprint([src], [dst], True)
        assert torch.equal(dst.view(torch.uint8), src.contiguous().view(torch.uint8))
        assert tuple(x & (2**64 - 1) for x in rows[0].tolist()) == reference.fingerprint_lanes(src)


# ------------------------------------------------------------------------------ CUDA
@pytest.mark.cuda
def test_cuda_mixed_device_calls_name_the_argument():
    ops = _ext.ops()
    c, g = torch.zeros(4), torch.zeros(4, device="cuda")
    for call, needle in [
        (lambda: ops.copy_fingerprint([c], [g], True), "dst[0] is on cuda"),
        (lambda: ops.copy_fingerprint([g], [c], True), "dst[0] is on cpu"),
        (lambda: ops.fingerprint([c, g]), "tensors[1] is on cuda"),
        (lambda: ops.nonfinite_any([c, g]), "tensors[1] is on cuda"),
        (lambda: ops.sgd_step([g], [c], [], [], 0.1, 0.0, 0.0, 0.0, False, False, False), "grads[0] is on cpu"),
        (lambda: ops.increment_steps([torch.zeros((), device="cuda")]), "steps[0] is on cuda"),
    ]:
        with pytest.raises(RuntimeError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            call()


@pytest.mark.cuda
def test_cuda_unsupported_dtype_same_error_as_cpu():
    ops = _ext.ops()
    msgs = []
    for dev in ("cpu", "cuda"):
        with pytest.raises(RuntimeError) as ei:
            ops.nonfinite_any([torch.zeros(3, device=dev), torch.zeros(3, dtype=torch.float8_e4m3fn, device=dev)])
        msgs.append(str(ei.value).split("\n")[0])
    assert msgs[0] == msgs[1] and "tensors[1] has dtype" in msgs[0]


@pytest.mark.cuda
def test_cuda_misaligned_source_is_not_cloned():
    """A 256 MiB float view at a 4-byte offset: hashed in place (peak memory grows by far less
    than the view), bit-identical to the CPU result."""
    flat = torch.randn((1 << 26) + 4, device="cuda")
    view = flat[1:1 + (1 << 26)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fp = memstate.fingerprint(view)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < (1 << 20), "the view was cloned"
    assert fp == memstate.fingerprint(view.cpu())
    dst = torch.empty((1 << 26) + 4, device="cuda")[3:3 + (1 << 26)]
    rows = _ext.ops().copy_fingerprint([view], [dst], True)
    assert torch.equal(dst, view)
    assert tuple(x & (2**64 - 1) for x in rows[0].tolist()) == fp.lanes
