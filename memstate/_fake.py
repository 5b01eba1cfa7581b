"""Fake (meta) implementations of the ``torch.ops.memstate.*`` ops, for torch.compile and
FakeTensor tracing: each gives the shape, dtype and device of the op's result without touching
data, exactly as the native kernels allocate it (checked by ``torch.library.opcheck`` in
tests/test_compile.py). Mutations are declared in the schemas (csrc/ops.cpp: ``Tensor(a!)[]``).

``increment_steps`` has none: it returns Python floats (the new step counts, read on the host
to compute bias corrections), which a trace cannot know; it is called only by the optimizers'
eager ``step()``, which torch.compile runs outside the graph (see memstate/optim/_base.py).
"""
from __future__ import annotations

import torch

_REGISTERED = False


def _device(*lists) -> torch.device:
    """Where an op puts its result: the device of its first tensor (CPU for no tensors)."""
    for ts in lists:
        for t in ts:
            return t.device
    return torch.device("cpu")


def _refuse_real_meta(op: str, **lists) -> None:
    """Registering a fake also registers a Meta kernel, so a call with real meta tensors (not
    FakeTensors of a trace) would reach it and "succeed"; refuse it as the native kernels do."""
    from torch._subclasses.fake_tensor import FakeTensor

    for name, ts in lists.items():
        for i, t in enumerate(ts):
            if t.is_meta and not isinstance(t, FakeTensor):
                raise RuntimeError(f"memstate.{op}: {name}[{i}] is a meta tensor; it has no data to read or write")


def _long(shape, device):
    return torch.empty(shape, dtype=torch.int64, device=device)


def register() -> None:
    """Registers every fake implementation once (called by memstate._ext.load())."""
    global _REGISTERED
    if _REGISTERED:
        return
    lib = "memstate::"

    @torch.library.register_fake(lib + "fingerprint")
    def _fingerprint(tensors):
        _refuse_real_meta("fingerprint", tensors=tensors)
        return _long((len(tensors), 2), _device(tensors) if tensors else "cpu")

    @torch.library.register_fake(lib + "fingerprint_sums")
    def _fingerprint_sums(tensors, first_pairs):
        _refuse_real_meta("fingerprint_sums", tensors=tensors)
        return _long((len(tensors), 2), _device(tensors) if tensors else "cpu")

    @torch.library.register_fake(lib + "copy_fingerprint")
    def _copy_fingerprint(src, dst, fingerprint):
        _refuse_real_meta("copy_fingerprint", src=src, dst=dst)
        dev = _device(src, dst)
        return _long((len(src), 2), dev) if fingerprint else _long((0,), dev)

    def _optim_result(lists, roles, fingerprint):
        params = lists[0]
        if not any(len(ts) for ts in lists):
            return _long((0,), "cpu")  # an empty call returns before fingerprinting
        dev = _device(*lists)
        return _long((len(params), roles, 2), dev) if fingerprint else _long((0,), dev)

    @torch.library.register_fake(lib + "sgd_step")
    def _sgd_step(params, grads, momentum_buffers, first, lr, momentum, dampening, weight_decay, nesterov,
                  maximize, fingerprint):
        _refuse_real_meta("sgd_step", params=params, grads=grads, momentum_buffers=momentum_buffers)
        roles = 3 if momentum != 0.0 else 2
        lists = (params, grads, momentum_buffers) if momentum != 0.0 else (params, grads)
        return _optim_result(lists, roles, fingerprint)

    @torch.library.register_fake(lib + "adam_step")
    def _adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2, eps,
                   weight_decay, decoupled, amsgrad, maximize, fingerprint):
        _refuse_real_meta("adam_step", params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                          max_exp_avg_sqs=max_exp_avg_sqs)
        lists = (params, grads, exp_avgs, exp_avg_sqs) + ((max_exp_avg_sqs,) if amsgrad else ())
        return _optim_result(lists, 5 if amsgrad else 4, fingerprint)

    @torch.library.register_fake(lib + "rmsprop_step")
    def _rmsprop_step(params, grads, square_avgs, momentum_buffers, grad_avgs, lr, alpha, eps, weight_decay,
                      momentum, centered, maximize, fingerprint):
        _refuse_real_meta("rmsprop_step", params=params, grads=grads, square_avgs=square_avgs,
                          momentum_buffers=momentum_buffers, grad_avgs=grad_avgs)
        lists = ((params, grads, square_avgs) + ((momentum_buffers,) if momentum > 0.0 else ())
                 + ((grad_avgs,) if centered else ()))
        return _optim_result(lists, len(lists), fingerprint)

    @torch.library.register_fake(lib + "adagrad_step")
    def _adagrad_step(params, grads, state_sums, steps, lr, lr_decay, eps, weight_decay, maximize, fingerprint):
        _refuse_real_meta("adagrad_step", params=params, grads=grads, state_sums=state_sums)
        return _optim_result((params, grads, state_sums), 3, fingerprint)

    @torch.library.register_fake(lib + "lion_step")
    def _lion_step(params, grads, exp_avgs, lr, beta1, beta2, weight_decay, maximize, fingerprint):
        _refuse_real_meta("lion_step", params=params, grads=grads, exp_avgs=exp_avgs)
        return _optim_result((params, grads, exp_avgs), 3, fingerprint)

    @torch.library.register_fake(lib + "nonfinite_any")
    def _nonfinite_any(tensors):
        _refuse_real_meta("nonfinite_any", tensors=tensors)
        return torch.empty((), dtype=torch.bool, device=_device(tensors) if tensors else "cpu")

    @torch.library.register_fake(lib + "norm_sums")
    def _norm_sums(tensors, p):
        _refuse_real_meta("norm_sums", tensors=tensors)
        return torch.empty((len(tensors) + 1,), dtype=torch.float64, device=_device(tensors) if tensors else "cpu")

    @torch.library.register_fake(lib + "lamb_step")
    def _lamb_step(params, grads, exp_avgs, exp_avg_sqs, updates, steps, lr, beta1, beta2, eps, weight_decay,
                   bias_correction, grad_averaging, adam_w_mode, use_nvlamb, global_grad_norm, max_grad_norm,
                   fingerprint):
        _refuse_real_meta("lamb_step", params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                          updates=updates)
        # fingerprint roles: params, grads, exp_avgs, exp_avg_sqs (not the scratch updates)
        return _optim_result((params, grads, exp_avgs, exp_avg_sqs, updates), 4, fingerprint)

    _REGISTERED = True
