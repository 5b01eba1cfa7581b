"""Rule helpers shared by several sources: precondition checks, the sampler window, the
perturb-stream generator, copies of the model into a shadow module."""
from __future__ import annotations

import zlib
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch

from memstate.fingerprint import named_state_tensors
from memstate.perturb._core import PerturbationError, TrainState, windows_for_halflives


def _need(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise PerturbationError(f"{name}: {message}")


def _stateful_decay(state: TrainState, p: Dict[str, Any], key: str, name: str, what: str) -> float:
    decay = p.get(key)
    if decay is None:
        decay = (state.extra or {}).get(key)
    if isinstance(decay, torch.Tensor):
        decay = float(decay.item())
    _need(decay is not None, name, f"the default window is two half-lives of the {what} decay: pass {key}=... "
                                   f"(or put it in state.extra[{key!r}]), or give window= explicitly")
    try:
        windows_for_halflives(float(decay))
    except ValueError:
        raise PerturbationError(f"{name}: {key} must be a decay in (0, 1), got {decay!r}") from None
    return float(decay)


def _model_tensors(model: torch.nn.Module) -> List[Tuple[str, torch.Tensor]]:
    return named_state_tensors(model)


def _copy_pairs(state: TrainState, key: str, name: str) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(destination, source) pairs for ``extra[key] := model``; all checks before any copy."""
    model = state.model
    _need(isinstance(model, torch.nn.Module), name, f"needs state.model (the student), got {type(model).__name__}")
    dst = (state.extra or {}).get(key)
    _need(dst is not None, name, f"state.extra has no {key!r} (present: {sorted(state.extra or {}) or 'nothing'})")
    _need(isinstance(dst, (torch.nn.Module, Mapping)), name,
          f"state.extra[{key!r}] must be an nn.Module or a dict of tensors, got {type(dst).__name__}")
    _need(dst is not model, name, f"state.extra[{key!r}] is the model itself")
    dst_map = dict(named_state_tensors(dst))
    pairs, missing, bad = [], [], []
    for n, src in _model_tensors(model):
        d = dst_map.get(n)
        if d is None:
            d = dst_map.get("module." + n)  # torch.optim.swa_utils.AveragedModel
        if d is None:
            missing.append(n)
        elif tuple(d.shape) != tuple(src.shape):
            bad.append(f"{n} {tuple(d.shape)} vs {tuple(src.shape)}")
        else:
            pairs.append((d, src))
    _need(not missing, name, f"state.extra[{key!r}] has no counterpart of the model's {', '.join(missing[:10])}")
    _need(not bad, name, f"state.extra[{key!r}] has shapes that differ from the model's: {', '.join(bad[:10])}")
    return pairs


def _copy_from_model_rule(name: str):
    """(check_fn, apply_fn) of a primitive that sets ``extra[p["key"]] := model`` (reset_ema,
    reset_teacher): the check runs every ``_copy_pairs`` test, the apply copies each pair."""
    def check(state, p):
        _copy_pairs(state, p["key"], name)

    def apply(state, p, start, length):
        for d, s in _copy_pairs(state, p["key"], name):
            d.copy_(s)

    return check, apply


def _sampler(state: TrainState, name: str):
    s = state.sampler
    _need(s is not None, name, "needs state.sampler (a memstate.data.OrderSampler)")
    for attr in ("batch", "override_window"):
        _need(callable(getattr(s, attr, None)), name, f"state.sampler ({type(s).__name__}) has no {attr}()")
    return s


def _sampler_check_factory(name):
    def check(state, p):
        _sampler(state, name)
        if "seed" in p:
            _check_perturb_stream(state, p, name)
    return check


def _name_index(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def _check_perturb_stream(state: TrainState, p: Dict[str, Any], name: str) -> None:
    if p.get("seed") is not None:
        _need(isinstance(p["seed"], int) and not isinstance(p["seed"], bool), name,
              f"seed must be an int, got {p['seed']!r}")
        return
    c = state.contract
    if c is not None:
        streams = tuple(getattr(c, "streams", ()))
        _need("perturb" in streams, name, f"state.contract has no 'perturb' stream; its streams are "
                                          f"{', '.join(streams) or 'none'}")


def _generator(state: TrainState, name: str, start: int, p: Dict[str, Any]) -> torch.Generator:
    """The application's generator (see the module docstring); records its origin in ``p``."""
    seed = p.get("seed")
    if seed is not None:
        p["rng"] = f"seed {int(seed)}"
        return torch.Generator().manual_seed(int(seed))
    if state.contract is not None:
        # the root seed, not the contract's registry name: the name carries a per-process random
        # suffix, and this description is recorded in cards that replay compares exactly
        p["rng"] = (f"contract root_seed {getattr(state.contract, 'root_seed', '?')} "
                    f"perturb(primitive={_name_index(name)}, step={start})")
        return state.contract.generator("perturb", primitive=_name_index(name), step=start)
    import xxhash

    s = xxhash.xxh3_64_intdigest(f"memstate.perturb|{name}|{start}".encode("utf-8")) & ((1 << 63) - 1)
    p["rng"] = f"fallback xxh3_64('memstate.perturb|{name}|{start}')"
    return torch.Generator().manual_seed(s)


def _window_batches(sampler, start: int, length: int) -> List[List[int]]:
    return [[int(i) for i in sampler.batch(t)] for t in range(start, start + length)]


def _recut(ids: Sequence[int], sizes: Sequence[int]) -> List[List[int]]:
    out, pos = [], 0
    for sz in sizes:
        out.append([int(i) for i in ids[pos:pos + sz]])
        pos += sz
    return out


# ----------------------------------------------------------------------------------- epochs
def _batches_per_epoch(state: TrainState, name: str) -> int:
    s = _sampler(state, name)
    bpe = getattr(s, "batches_per_epoch", None)
    _need(isinstance(bpe, int) and not isinstance(bpe, bool) and bpe >= 1, name,
          f"state.sampler has no usable batches_per_epoch ({bpe!r})")
    return bpe


def _epoch_segments(start: int, length: int, bpe: int) -> List[Tuple[int, int]]:
    """The window's steps ``start .. start + length - 1`` cut at epoch boundaries, as
    ``(offset in the window, number of steps)`` pairs, in order."""
    out, t, end = [], start, start + length
    while t < end:
        stop = min(end, (t // bpe + 1) * bpe)
        out.append((t - start, stop - t))
        t = stop
    return out


def _check_within_epoch(state: TrainState, name: str, start: int, length: int) -> None:
    """An order window that moves batches between its steps must lie inside one epoch (global
    step s is batch s % bpe of epoch s // bpe): otherwise batches change epochs and so do the ids
    those epochs contain. PerturbationError naming t0, the window and the boundaries if not."""
    bpe = _batches_per_epoch(state, name)
    first, last = start // bpe, (start + length - 1) // bpe
    if first == last:
        return
    bounds = [e * bpe for e in range(first + 1, last + 1)]
    shown = ", ".join(map(str, bounds[:5])) + (f", ... ({len(bounds)} in all)" if len(bounds) > 5 else "")
    raise PerturbationError(
        f"{name}: the window at t0={start} of {length} steps (steps {start}..{start + length - 1}) crosses the "
        f"epoch boundar{'y' if len(bounds) == 1 else 'ies'} at step {shown} (batches_per_epoch={bpe}: "
        f"epoch {first} is steps {first * bpe}..{(first + 1) * bpe - 1}, "
        f"epoch {last} is steps {last * bpe}..{(last + 1) * bpe - 1}); "
        f"moving batches across it would change which ids those epochs contain. Use a window of at most "
        f"{(first + 1) * bpe - start} step(s) (to the end of epoch {first}: the default), or another t0")
