"""torch.compile (issue 11 item 6): every torch.ops.memstate.* op has a fake implementation and
correct mutation annotations (torch.library.opcheck: schema, autograd registration, fake tensor,
AOT dispatch), and a compiled training step that calls a memstate optimizer's step() gives the
same bits as eager. ``increment_steps`` is the documented exception (memstate/_fake.py): it
returns host floats and only the eager step() calls it."""
import pytest
import torch
from torch.library import opcheck

import memstate
from memstate import _ext

OPS = None


def _ops():
    global OPS
    OPS = OPS or _ext.ops()
    return OPS


def _tensors(device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in [(3,), (2, 5), (1,)]]


def _optim_cases(device):
    ops = _ops()
    for dtype in (torch.float32, torch.bfloat16):
        for fp in (True, False):
            p, g, b = _tensors(device, dtype, 1), _tensors(device, dtype, 2), _tensors(device, dtype, 3)
            yield ops.sgd_step.default, (p, g, b, [1, 0, 1], 0.1, 0.9, 0.0, 0.01, False, False, fp)
            yield ops.sgd_step.default, (p, g, b, [0, 0, 0], 0.1, 0.9, 0.0, 0.0, True, True, fp)
            yield ops.sgd_step.default, (p, g, [], [], 0.1, 0.0, 0.0, 0.0, False, False, fp)
            m, v, mx = _tensors(device, dtype, 4), [t.abs() for t in _tensors(device, dtype, 5)], \
                [t.abs() for t in _tensors(device, dtype, 6)]
            for decoupled in (False, True):
                yield ops.adam_step.default, (p, g, m, v, [], [1.0, 2.0, 3.0], 1e-3, 0.9, 0.999, 1e-8, 0.01,
                                              decoupled, False, False, fp)
                yield ops.adam_step.default, (p, g, m, v, mx, [1.0, 2.0, 3.0], 1e-3, 0.9, 0.999, 1e-8, 0.01,
                                              decoupled, True, False, fp)
            # RMSprop (plain, momentum, centered, both), Adagrad, Lion (issue 11 item 7)
            ga = [torch.zeros_like(t) for t in m]  # sqrt(v - ga * ga) stays real
            for momentum, centered in ((0.0, False), (0.9, False), (0.0, True), (0.9, True)):
                yield ops.rmsprop_step.default, (p, g, v, b, ga, 1e-2, 0.99, 1e-8, 0.01, momentum, centered,
                                                 False, fp)
            yield ops.adagrad_step.default, (p, g, v, [1.0, 2.0, 3.0], 1e-2, 0.1, 1e-10, 0.01, True, fp)
            yield ops.lion_step.default, (p, g, m, 1e-4, 0.9, 0.99, 0.1, False, fp)
    yield ops.sgd_step.default, ([], [], [], [], 0.1, 0.9, 0.0, 0.0, False, False, True)  # empty call
    yield ops.rmsprop_step.default, ([], [], [], [], [], 0.1, 0.99, 1e-8, 0.0, 0.9, True, False, True)
    yield ops.adagrad_step.default, ([], [], [], [], 0.1, 0.0, 1e-10, 0.0, False, True)
    yield ops.lion_step.default, ([], [], [], 1e-4, 0.9, 0.99, 0.0, False, True)


def _other_cases(device):
    ops = _ops()
    ts = _tensors(device) + [torch.arange(7, dtype=torch.int16, device=device)]
    yield ops.fingerprint.default, (ts,)
    yield ops.fingerprint.default, ([],)
    yield ops.fingerprint_sums.default, (ts, [0, 5, 9, 1])
    for fp in (True, False):
        dst = [torch.empty(t.numel() * t.element_size(), dtype=torch.uint8, device=device) for t in ts]
        yield ops.copy_fingerprint.default, (ts, dst, fp)
    yield ops.nonfinite_any.default, (_tensors(device),)
    yield ops.nonfinite_any.default, ([],)
    for p in (2.0, 1.0, float("inf"), 3.0):
        yield ops.norm_sums.default, (_tensors(device), p)
    yield ops.norm_sums.default, ([], 2.0)


def _ids(cases):
    return [f"{op.__name__}-{i}" for i, (op, _) in enumerate(cases)]


CPU_CASES = None


def _cpu_cases():
    return list(_optim_cases("cpu")) + list(_other_cases("cpu"))


@pytest.mark.parametrize("case", range(len(_cpu_cases())))
def test_opcheck_cpu(case):
    op, args = _cpu_cases()[case]
    result = opcheck(op, args)  # raises on any failure
    assert set(result.values()) == {"SUCCESS"}, result


def test_every_op_has_a_fake_or_is_the_documented_exception():
    from torch._library.simple_registry import singleton

    _ops()
    names = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("memstate::"))
    assert {"sgd_step", "adam_step", "fingerprint", "norm_sums", "increment_steps"} <= set(names)
    missing = [n for n in names if singleton.find(f"memstate::{n}").fake_impl.kernel is None]
    assert missing == ["increment_steps"]


def _fake_matches_real(op, args):
    """A planted wrong fake would be caught: opcheck compares the fake's metadata with the real
    result (this is what test_faketensor checks; here we prove it can fail)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = op(*args)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = op(*args)
    return real.shape == fake.shape and real.dtype == fake.dtype and real.device == fake.device


def test_fakes_agree_with_the_kernels_and_the_check_can_fail():
    for op, args in _cpu_cases():
        cloned = [[t.clone() for t in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor) else a
                  for a in args]
        assert _fake_matches_real(op, cloned), op
    # a deliberately wrong expectation is detected
    ops = _ops()
    args = (_tensors("cpu"), 2.0)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = ops.norm_sums(*args)
    assert fake.shape != torch.Size([len(args[0])])


# ------------------------------------------------------------------------- compiled steps


def _model_and_opt(kind, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    if kind == "sgd":
        o = memstate.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True, fingerprint=True)
    else:
        o = memstate.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, fingerprint=True)
    return m, o


X, Y = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 3


def _train_step(m, o):
    o.zero_grad()
    loss = torch.nn.functional.cross_entropy(m(X), Y)
    loss.backward()
    o.step()
    return loss


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_compiled_training_step_equals_eager(kind):
    """aot_eager traces forward, backward and the step around memstate's step() (which runs
    eagerly, one graph break) with torch's own ops, so every bit must match eager."""
    torch._dynamo.reset()
    m1, o1 = _model_and_opt(kind)
    m2, o2 = _model_and_opt(kind)
    compiled = torch.compile(_train_step, backend="aot_eager")
    for _ in range(3):
        a, b = _train_step(m1, o1), compiled(m2, o2)
        assert torch.equal(a, b)
        assert memstate.fingerprint_state(m1) == memstate.fingerprint_state(m2)
        assert o1.state_fingerprint() == o2.state_fingerprint()


def test_inductor_compiled_step_equals_eager():
    """With the default backend (inductor) the optimizer step gives the eager bits too (the
    model code is inductor's business: its kernels may round differently from eager)."""
    torch._dynamo.reset()
    m1, o1 = _model_and_opt("adamw")
    m2, o2 = _model_and_opt("adamw")
    for m in (m1, m2):
        for i, p in enumerate(m.parameters()):
            p.grad = torch.full_like(p, 0.01 * (i + 1))

    @torch.compile
    def step(o):
        o.step()

    for _ in range(3):
        o1.step()
        step(o2)
    assert memstate.fingerprint_state(m1) == memstate.fingerprint_state(m2)
    assert o1.state_fingerprint() == o2.state_fingerprint()


@pytest.mark.cuda
def test_opcheck_cuda():
    for op, args in list(_optim_cases("cuda")) + list(_other_cases("cuda")):
        result = opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, (op, result)
