"""msfp1 fingerprints of sharded tensors that equal those of the unsharded tensors, bit for bit.

msfp1 is a sum over 8-byte pairs of terms keyed by the pair's global index (docs/fingerprint.md),
so each rank hashes the pairs that lie wholly inside its shard at their global pair offset, the
lane sums are all-reduced (int64, SUM: integer addition mod 2^64), and the total is finalised
with the whole tensor's byte length. A shard boundary that does not fall on an 8-byte boundary
of the whole tensor splits one pair between ranks: those pairs are rebuilt from the boundary
bytes every rank sends in the same exchange that checks the layout (each rank's byte range,
its first and last 8 bytes), and every rank adds their terms itself.

Communication per call, for N tensors and W ranks, batched over the whole state: one
all_gather of N x 6 int64 per rank (layout check and boundary bytes) and one all_reduce of
N x 2 int64 (the lane sums). Every rank gets the same result; it is a collective call, so every
rank of the group must call it with the same tensors in the same order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from memstate import _ext
from memstate.fingerprint import (
    Fingerprint,
    StateFingerprint,
    _check_tensor,
    finalize_partial,
    named_state_tensors,
)
from memstate.reference import sums as _reference_sums

__all__ = ["LocalShard", "fingerprint", "fingerprint_state"]

_M64 = (1 << 64) - 1


@dataclass(frozen=True)
class LocalShard:
    """One rank's contiguous piece of a larger tensor, without DTensor.

    ``tensor`` holds elements ``offset .. offset + tensor.numel()`` of the whole tensor's
    row-major flattening (``offset`` in elements); the whole tensor has shape ``global_shape``
    and ``tensor``'s dtype. The shards of all ranks of the group must tile the whole tensor
    exactly (checked); a rank holding nothing passes an empty tensor.
    """

    tensor: torch.Tensor
    offset: int
    global_shape: Tuple[int, ...]


@dataclass
class _Piece:
    """What one rank holds of one named tensor: its bytes and their place in the whole."""

    name: str
    data: torch.Tensor  # flat uint8, this rank's bytes (possibly empty)
    start: int  # byte offset of data[0] in the whole tensor
    total: int  # byte length of the whole tensor
    dtype: torch.dtype
    shape: Tuple[int, ...]  # global shape


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8, device=t.device)


def _empty_piece(name: str, t: torch.Tensor, total: int, shape) -> _Piece:
    return _Piece(name, torch.empty(0, dtype=torch.uint8, device=t.device), 0, total, t.dtype, tuple(shape))


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


def _dtensor_piece(name: str, d) -> _Piece:
    """This rank's piece of a DTensor on placements Shard(0) / Replicate (any mesh rank)."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements, shape = d.device_mesh, d.placements, tuple(d.shape)
    for i, p in enumerate(placements):
        shard0 = type(p) is Shard and len(shape) > 0 and p.dim % len(shape) == 0
        if not (p.is_replicate() or shard0):
            raise ValueError(
                f"{name}: placement {p!r} on mesh dim {i} is not supported; only Shard(0) and Replicate "
                f"keep each rank's piece one contiguous run of the tensor's bytes (redistribute first)"
            )
    local = d.to_local()
    total = math.prod(shape) * local.element_size()
    coord = mesh.get_coordinate()
    # a rank outside the mesh, or a replica other than the first along a Replicate mesh dim,
    # contributes nothing: its bytes are counted once, by the first replica
    if coord is None or any(p.is_replicate() and c != 0 for p, c in zip(placements, coord)):
        return _empty_piece(name, local, total, shape)
    _, global_offset = compute_local_shape_and_global_offset(d.shape, mesh, placements)
    row_bytes = math.prod(shape[1:]) * local.element_size() if shape else local.element_size()
    start = global_offset[0] * row_bytes if shape else 0
    return _Piece(name, _as_bytes(local), start, total, local.dtype, shape)


def _local_shard_piece(name: str, s: LocalShard) -> _Piece:
    t = _check_tensor(s.tensor, name)
    try:
        shape = tuple(int(n) for n in s.global_shape)
    except TypeError:
        raise TypeError(f"{name}: global_shape must be a sequence of ints, got {s.global_shape!r}") from None
    numel = math.prod(shape)
    if not isinstance(s.offset, int) or isinstance(s.offset, bool) or s.offset < 0 \
            or any(n < 0 for n in shape) or s.offset + t.numel() > numel:
        raise ValueError(
            f"{name}: a shard of {t.numel()} elements at element offset {s.offset!r} does not fit in a "
            f"tensor of shape {shape} ({numel} elements)"
        )
    size = t.element_size()
    return _Piece(name, _as_bytes(t), s.offset * size, numel * size, t.dtype, shape)


def _replicated_piece(name: str, t: torch.Tensor, rank: int) -> _Piece:
    """A plain tensor every rank holds whole: counted once, from the group's rank 0."""
    t = _check_tensor(t, name)
    total = t.numel() * t.element_size()
    if rank != 0:
        return _empty_piece(name, t, total, t.shape)
    return _Piece(name, _as_bytes(t), 0, total, t.dtype, tuple(t.shape))


def _to_piece(name: str, value, rank: int, replicated_ok: bool) -> _Piece:
    if isinstance(value, LocalShard):
        return _local_shard_piece(name, value)
    if _is_dtensor(value):
        return _dtensor_piece(name, value)
    if replicated_ok and isinstance(value, torch.Tensor):
        return _replicated_piece(name, value, rank)
    raise TypeError(
        f"{name}: expected a DTensor or a memstate.distributed.LocalShard, got {type(value).__name__} "
        f"(a plain local shard needs its place in the whole tensor: pass offset= and global_shape=)"
    )


def _owned_range(p: _Piece) -> Tuple[int, int]:
    """Byte range [lo, hi) of the pairs that lie wholly inside this rank's bytes."""
    end = p.start + p.data.numel()
    lo = -(-p.start // 8) * 8
    hi = end if end == p.total else end // 8 * 8
    return lo, max(lo, hi)


def _signed(v: int) -> int:
    v &= _M64
    return v - (1 << 64) if v >> 63 else v


def _edge_word(data: torch.Tensor, head: bool) -> torch.Tensor:
    """First (head) or last 8 bytes of ``data`` as one uint8[8], zero-padded at the far end."""
    k = min(8, data.numel())
    edge = data[:k] if head else data[data.numel() - k:]
    pad = torch.zeros(8 - k, dtype=torch.uint8, device=data.device)
    return torch.cat([edge, pad] if head else [pad, edge])


def _name_tag(name: str) -> int:
    import xxhash

    return _signed(xxhash.xxh3_64_intdigest(name.encode("utf-8")))


def _comm_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _partial_sums(pieces: Sequence[_Piece]) -> List[Tuple[int, int]]:
    """Each piece's lane sums over its wholly owned pairs: one native call per device."""
    out = [(0, 0)] * len(pieces)
    by_device: Dict[torch.device, List[int]] = {}
    for i, p in enumerate(pieces):
        by_device.setdefault(p.data.device, []).append(i)
    for idxs in by_device.values():
        shards, words = [], []
        for i in idxs:
            p = pieces[i]
            lo, hi = _owned_range(p)
            shards.append(p.data[lo - p.start:hi - p.start])
            words.append(lo // 8)
        rows = _ext.ops().fingerprint_sums(shards, words).cpu().tolist()
        for i, (a, b) in zip(idxs, rows):
            out[i] = (a & _M64, b & _M64)
    return out


def _straddling_sums(name: str, total: int, layout: List[Tuple[int, int, bytes, bytes]]) -> Tuple[int, int]:
    """Lane sums of the pairs split between ranks, from every rank's (start, end, head, tail).

    Also checks that the ranks' byte ranges tile [0, total) exactly (ValueError naming the
    tensor and the ranks otherwise)."""
    ranges = sorted((s, e, r) for r, (s, e, _, _) in enumerate(layout) if e > s)
    pos = 0
    for s, e, r in ranges:
        if s != pos:
            what = "overlaps the previous shard" if s < pos else f"leaves bytes [{pos}, {s}) uncovered"
            raise ValueError(f"{name}: shards do not tile its {total} bytes: rank {r}'s bytes [{s}, {e}) {what}")
        pos = e
    if pos != total:
        raise ValueError(f"{name}: shards do not tile its {total} bytes: bytes [{pos}, {total}) are on no rank")
    cuts = {x // 8 * 8 for s, e, _ in ranges for x in (s, e) if x % 8 and 0 < x < total}
    s0 = s1 = 0
    for q in sorted(cuts):
        pair = bytearray(min(8, total - q))
        for start, end, head, tail in layout:
            for x in range(max(q, start), min(q + len(pair), end)):
                pair[x - q] = head[x - start] if x - start < 8 else tail[8 - (end - x)]
        a, b = _reference_sums(bytes(pair), q // 8)
        s0, s1 = s0 + a, s1 + b
    return s0 & _M64, s1 & _M64


def _fingerprint_pieces(pieces: Sequence[_Piece], group) -> List[Fingerprint]:
    """The collective: one all_gather (layout, boundary bytes) and one all_reduce (lane sums)."""
    world = dist.get_world_size(group)
    device = _comm_device(group)
    n = len(pieces)
    sums = _partial_sums(pieces)
    if n:
        edges = torch.stack([torch.cat([_edge_word(p.data, True), _edge_word(p.data, False)]) for p in pieces])
        edge_words = edges.cpu().view(torch.int64).tolist()  # [n, 2]: head, tail as int64 bit patterns
    else:
        edge_words = []
    local = torch.tensor(
        [[_name_tag(p.name), p.total, p.start, p.start + p.data.numel(), h, t]
         for p, (h, t) in zip(pieces, edge_words)], dtype=torch.int64).reshape(n, 6).to(device)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    lanes = torch.tensor([[_signed(a), _signed(b)] for a, b in sums], dtype=torch.int64).reshape(n, 2).to(device)
    dist.all_reduce(lanes, op=dist.ReduceOp.SUM, group=group)  # int64 addition wraps: mod 2^64
    rows = [g.cpu().tolist() for g in gathered]
    reduced = lanes.cpu().tolist()
    out = []
    for i, p in enumerate(pieces):
        for r in range(world):
            tag, total = rows[r][i][0], rows[r][i][1]
            if tag != rows[0][i][0] or total != p.total:
                raise ValueError(
                    f"{p.name}: ranks disagree on tensor {i} of the call (rank {r} has "
                    f"{'another name' if tag != rows[0][i][0] else f'{total} bytes, this rank {p.total}'}); "
                    f"every rank must pass the same tensors in the same order"
                )
        layout = []
        for r in range(world):
            _, _, start, end, head, tail = rows[r][i]
            layout.append((start, end, (head & _M64).to_bytes(8, "little"), (tail & _M64).to_bytes(8, "little")))
        e0, e1 = _straddling_sums(p.name, p.total, layout)
        out.append(finalize_partial(reduced[i][0] + e0, reduced[i][1] + e1, p.total))
    return out


def _default_group(values, group):
    """``group`` if given; else the 1-D mesh's group for DTensors on one 1-D mesh; else WORLD."""
    if group is not None:
        return group
    meshes = {id(v.device_mesh): v.device_mesh for v in values if _is_dtensor(v)}
    if len(meshes) == 1:
        (mesh,) = meshes.values()
        if mesh.ndim == 1:
            return mesh.get_group()
    return dist.group.WORLD


def _check_meshes(values, names, group) -> None:
    size = dist.get_world_size(group)
    for name, v in zip(names, values):
        if _is_dtensor(v) and v.device_mesh.size() != size:
            raise ValueError(
                f"{name}: its device mesh has {v.device_mesh.size()} ranks but the group has {size}; "
                f"pass group= the process group spanning the mesh"
            )


def fingerprint(tensor, *, offset: Optional[int] = None, global_shape: Optional[Sequence[int]] = None,
                group=None, name: str = "tensor") -> Fingerprint:
    """msfp1 fingerprint of a sharded tensor, equal to ``memstate.fingerprint`` of the whole.

    ``tensor`` is a DTensor (placements ``Shard(0)`` and/or ``Replicate`` on any mesh; the group
    defaults to a 1-D mesh's group, else the default group, which must span the mesh) or a plain
    local shard with ``offset`` (its first element's index in the whole tensor's row-major
    flattening) and ``global_shape``. Shards may start anywhere, not only on an 8-byte
    boundary. A collective: every rank of ``group`` must call it; all get the same result.
    ``name`` is used in error messages.
    """
    if (offset is None) != (global_shape is None):
        raise ValueError(f"{name}: pass both offset= and global_shape= for a plain local shard, "
                         f"or neither for a DTensor")
    if offset is not None:
        if _is_dtensor(tensor):
            raise ValueError(f"{name}: a DTensor knows its place; do not pass offset= or global_shape=")
        tensor = LocalShard(tensor, offset, tuple(global_shape))
    group = _default_group([tensor], group)
    _check_meshes([tensor], [name], group)
    piece = _to_piece(name, tensor, dist.get_rank(group), replicated_ok=False)
    return _fingerprint_pieces([piece], group)[0]


def _named_values(obj, prefix: str = "") -> List[Tuple[str, object]]:
    """named_state_tensors, also accepting LocalShard values in (nested) mappings."""
    if isinstance(obj, Mapping):
        out = []
        for key, value in obj.items():
            if isinstance(value, LocalShard):
                out.append((prefix + key, value))
            elif isinstance(value, Mapping):
                out += _named_values(value, f"{prefix}{key}.")
            else:
                out += [(prefix + n, t) for n, t in named_state_tensors({key: value})]
        return out
    return [(prefix + n, t) for n, t in named_state_tensors(obj)]


def fingerprint_state(model_or_state, group=None) -> StateFingerprint:
    """``memstate.fingerprint_state`` of a sharded model, optimizer or dict, equal to that of
    the unsharded one (same names, dtypes, global shapes, fingerprints, digest).

    DTensor entries (FSDP2 parameters and optimizer state) are fingerprinted as in
    ``fingerprint``; ``LocalShard`` values in a dict likewise; plain tensors are taken as
    replicated and hashed from the group's rank 0. All tensors go in one all_gather and one
    all_reduce. A collective: every rank of ``group`` (default: the default group) must call
    it with the same names in the same order.
    """
    named = _named_values(model_or_state)
    names, values = [n for n, _ in named], [v for _, v in named]
    group = group if group is not None else dist.group.WORLD
    _check_meshes(values, names, group)
    rank = dist.get_rank(group)
    pieces = [_to_piece(n, v, rank, replicated_ok=True) for n, v in named]
    fps = _fingerprint_pieces(pieces, group)
    return StateFingerprint({p.name: (fp, p.dtype, p.shape) for p, fp in zip(pieces, fps)})
