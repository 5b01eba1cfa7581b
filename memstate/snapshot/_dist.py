"""Per-rank snapshots under a ``torch.distributed`` process group, with one global manifest.

Layout of ``<path>/`` (written by ``Snapshot.save`` of a snapshot captured under a group):

- ``rank-{r}/``: rank r's snapshot in the single-process format (``_format``: data file,
  manifest with checksums, lock), with the extra manifest field
  ``"distributed": {"rank": r, "world_size": w}``; r is the rank in the group;
- ``manifest.json``: the global manifest, written by rank 0 after every rank has written and
  fsynced its directory: format ``memstate-distributed-snapshot``, ``world_size``, per rank its
  directory, its manifest's ``manifest_xxh3_128`` and its ``state_digest``
  (``Snapshot.fingerprint().digest``), the ``global_state_digest`` (``global_state_digest``
  below) and ``manifest_xxh3_128`` over the canonical JSON of everything else;
- ``.memstate.lock``: held (exclusively) by rank 0 for the whole save, shared by loaders.

Save and load are collective: every rank of the group calls them. Each rank's local outcome is
all-gathered (JSON bytes in a uint8 tensor, never pickle), so a failure on one rank makes every
rank raise the same one-line SnapshotError naming that rank and its file, instead of leaving the
others waiting in a collective. Capture and restore are local (no communication).
"""
from __future__ import annotations

import datetime
import json
import os
import re
import struct
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import xxhash

from memstate._version import __version__
from memstate.snapshot import _format
from memstate.snapshot._common import DIST_FORMAT, DIST_FORMAT_VERSION, FORMAT, SnapshotError

GLOBAL_DIGEST_MAGIC = b"memstate.distributed.state.v1\0"
_RANK_DIR = re.compile(r"rank-[0-9]+")
_TMP_MANIFEST = re.compile(r"manifest\.json\.tmp-[0-9]+")  # f"{MANIFEST}.tmp-{pid}", written by rank 0


def _dist():
    import torch.distributed as dist

    return dist


def resolve_group(group: Any):
    """The process group a snapshot is captured, saved or loaded under, or None (one process).

    ``None`` (default): the default group when ``torch.distributed`` is initialised, else one
    process; ``False``: one process even under an initialised group (opt out); a
    ``ProcessGroup``: that group (this rank must belong to it)."""
    if group is False:
        return None
    dist = _dist()
    if group is None:
        return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group: torch.distributed is not initialised (call init_process_group first, or pass "
                         "group=False)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be None, False or a torch.distributed ProcessGroup, got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of the group")
    return group


def global_state_digest(state_digests: Sequence[str]) -> str:
    """xxh3-128 (32 hex digits) over ``GLOBAL_DIGEST_MAGIC``, the world size (u32 little-endian)
    and each rank's 16-byte state digest in rank order: the digest of the whole distributed
    state. ``state_digests``: each rank's ``StateFingerprint.digest`` (32 hex digits)."""
    parts = [GLOBAL_DIGEST_MAGIC, struct.pack("<I", len(state_digests))]
    for r, d in enumerate(state_digests):
        if not isinstance(d, str) or len(d) != 32:
            raise SnapshotError(f"rank {r}: state digest {d!r} is not 32 hex digits")
        try:
            parts.append(bytes.fromhex(d))
        except ValueError:
            raise SnapshotError(f"rank {r}: state digest {d!r} is not 32 hex digits") from None
    return xxhash.xxh3_128_hexdigest(b"".join(parts))


def rank_dir(path: str, rank: int) -> str:
    return os.path.join(path, f"rank-{rank}")


# ----------------------------------------------------------------------------------- collectives
def _comm_device(group) -> torch.device:
    """Where this group's collectives take tensors: the current CUDA device for NCCL, else the CPU."""
    return (torch.device("cuda", torch.cuda.current_device()) if str(_dist().get_backend(group)) == "nccl"
            else torch.device("cpu"))


def all_gather_json(obj: Any, group) -> List[Any]:
    """Every rank's JSON-able `obj`, in group rank order (JSON bytes in uint8 tensors: no pickle)."""
    dist = _dist()
    world = dist.get_world_size(group)
    dev = _comm_device(group)
    data = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    size = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    sizes = [int(s.item()) for s in sizes]
    buf = torch.zeros(max(sizes), dtype=torch.uint8)
    buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else buf[:0]
    buf = buf.to(dev)
    bufs = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(bufs, buf, group=group)
    return [json.loads(bytes(b[:n].cpu().numpy()).decode()) for b, n in zip(bufs, sizes)]


def agree(group, fn: Callable[[], Any], share: bool = False) -> Any:
    """Runs ``fn()`` on this rank, then learns every rank's outcome (``all_gather_json``).
    Returns ``fn()``'s result when every rank succeeded (with ``share``: the list of every
    rank's result, which must be JSON-able); otherwise every rank raises SnapshotError naming
    the first rank that failed and its message (a rank whose own failure was not a
    SnapshotError re-raises that exception)."""
    result, exc, err = None, None, None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - reported to every rank, then re-raised
        exc = e
        err = str(e) if isinstance(e, SnapshotError) else f"{type(e).__name__}: {e}"
    outcomes = all_gather_json([err, result if share and exc is None else None], group)
    errors = [e for e, _ in outcomes]
    failed = [r for r, m in enumerate(errors) if m is not None]
    if not failed:
        return [res for _, res in outcomes] if share else result
    if exc is not None and not isinstance(exc, SnapshotError):
        raise exc
    r = failed[0]
    others = failed[1:]
    more = f" (rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))} failed too)" if others else ""
    raise SnapshotError(f"rank {r}: {' '.join(errors[r].split())}{more}") from None


# ----------------------------------------------------------------------------------- save
def save(snap, path: str, timeout: Optional[float]) -> None:
    """Collective save of the per-rank snapshots of `snap`'s group (module docstring)."""
    dist = _dist()
    group = snap._group
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    gpath = os.path.join(path, _format.MANIFEST)
    lock = None

    def begin():  # rank 0: lock the directory and withdraw the old global manifest
        nonlocal lock
        os.makedirs(path, exist_ok=True)
        lock = _format._Lock(path, timeout)
        fmt = _format._manifest_format(path)
        if fmt == FORMAT:
            raise SnapshotError(f"{gpath}: {path} holds a single-process snapshot (format {fmt!r}); save the "
                                f"distributed one to another directory")
        for name in os.listdir(path):  # the temporary global manifest of a save that was killed
            if _TMP_MANIFEST.fullmatch(name):
                _format._remove(os.path.join(path, name))
        if os.path.exists(gpath):  # until the new one is written, no manifest names mixed rank files
            os.remove(gpath)
            _format._fsync_dir(path)

    try:
        agree(group, begin if rank == 0 else (lambda: None))

        def write_rank():
            digest = snap.fingerprint().digest
            checksum = _format.save(snap, rank_dir(path, rank), timeout,
                                    {"distributed": {"rank": rank, "world_size": world}})
            return {"rank": rank, "dir": f"rank-{rank}", "manifest_xxh3_128": checksum, "state_digest": digest}

        entries = agree(group, write_rank, share=True)  # also the barrier: every rank has written and fsynced

        def write_global():
            manifest = {
                "format": DIST_FORMAT,
                "format_version": DIST_FORMAT_VERSION,
                "rank_format": FORMAT,
                "memstate": __version__,
                "torch": torch.__version__,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "world_size": world,
                "backend": str(dist.get_backend(group)),
                "ranks": entries,
                "global_state_digest": global_state_digest([e["state_digest"] for e in entries]),
            }
            manifest["manifest_xxh3_128"] = xxhash.xxh3_128_hexdigest(_format._canonical(manifest))
            tmp = f"{gpath}.tmp-{os.getpid()}"
            try:
                _format._write_file(tmp, [json.dumps(manifest, indent=1, allow_nan=False).encode()])
                os.replace(tmp, gpath)
            finally:
                _format._remove(tmp)
            _format._fsync_dir(path)

        agree(group, write_global if rank == 0 else (lambda: None))  # save() returns once the manifest exists
    finally:
        if lock is not None:
            lock.release()


# ----------------------------------------------------------------------------------- load
def is_distributed(path: str) -> bool:
    """Whether `path` holds per-rank snapshots: ``rank-{r}/`` directories with a global
    manifest, or with no manifest (a save that did not finish)."""
    try:
        ranks = any(_RANK_DIR.fullmatch(n) for n in os.listdir(path))
    except OSError:
        return False
    if not ranks:  # a single-process snapshot: its manifest is not read twice
        return False
    fmt = _format._manifest_format(path)
    return fmt == DIST_FORMAT or not os.path.exists(os.path.join(path, _format.MANIFEST))


def _field(obj: Any, key: str, kind, where: str) -> Any:
    return _format._field(obj, key, kind, where)


def _rank_entry(manifest: dict, gpath: str, rank: int, world: int) -> Dict[str, Any]:
    """This rank's entry of the verified global manifest, every field checked."""
    saved_world = _field(manifest, "world_size", int, gpath)
    if saved_world != world:
        raise SnapshotError(f"{gpath}: a snapshot of {saved_world} ranks; this process group has {world} "
                            f"(load it under a group of {saved_world} ranks)")
    ranks = _field(manifest, "ranks", list, gpath)
    if len(ranks) != saved_world:
        raise SnapshotError(f"{gpath}: lists {len(ranks)} ranks for a world size of {saved_world}")
    digests = []
    for r, e in enumerate(ranks):
        at = f"{gpath}: ranks[{r}]"
        if _field(e, "rank", int, at) != r or _field(e, "dir", str, at) != f"rank-{r}":
            raise SnapshotError(f"{at}: must be rank {r} in directory rank-{r}")
        _field(e, "manifest_xxh3_128", str, at)
        digests.append(_field(e, "state_digest", str, at))
    if global_state_digest(digests) != _field(manifest, "global_state_digest", str, gpath):
        raise SnapshotError(f"{gpath}: global_state_digest does not match the ranks' state digests")
    return ranks[rank]


def _check_rank_manifest(manifest: dict, rpath: str, rank: int, world: int, entry: dict, gpath: str) -> None:
    """A rank directory's manifest is rank `rank` of `world` of the save the global manifest records."""
    where = os.path.join(rpath, _format.MANIFEST)
    if manifest.get("distributed") != {"rank": rank, "world_size": world}:
        raise SnapshotError(f"{where}: is the snapshot of {manifest.get('distributed')!r}, not of rank {rank} of "
                            f"{world}")
    if manifest.get("manifest_xxh3_128") != entry["manifest_xxh3_128"]:
        raise SnapshotError(f"{where}: its checksum differs from the one {gpath} records for rank {rank} (rank "
                            f"files of another save, or an edited manifest)")


def load(cls, path: str, sources: Dict[str, Any], rng: bool, hyperparameters: str, group):
    """Collective load of this rank's snapshot from the per-rank snapshots at `path`; every rank
    verifies its own directory against the global manifest, and all refuse if one does."""
    dist = _dist()
    if group is None:
        world = (_format._current_manifest(path) or {}).get("world_size", "?")
        raise SnapshotError(f"{path}: holds per-rank snapshots of {world} ranks: load it under a process group of "
                            f"that size (group=None with torch.distributed initialised, or a ProcessGroup), or one "
                            f"rank's directory {os.path.join(path, 'rank-<r>')} alone")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    gpath = os.path.join(path, _format.MANIFEST)

    def load_rank():
        lock = _format._shared_lock(path)  # a save in progress (rank 0 holds it) finishes first
        try:
            if not os.path.exists(gpath):
                raise SnapshotError(f"{gpath}: missing: the per-rank snapshots at {path} have no global manifest "
                                    f"(a distributed save that did not finish)")
            manifest = _format._read_manifest(path, DIST_FORMAT, DIST_FORMAT_VERSION)
            entry = _rank_entry(manifest, gpath, rank, world)
            rpath = rank_dir(path, rank)
            if not os.path.isdir(rpath):
                raise SnapshotError(f"{rpath}: rank {rank}'s snapshot directory is missing")
            _check_rank_manifest(_format._read_manifest(rpath), rpath, rank, world, entry, gpath)  # before binding
            snap = _format.load(cls, rpath, sources, rng, hyperparameters)
        finally:
            if lock is not None:
                os.close(lock)
        _check_rank_manifest(snap._file, rpath, rank, world, entry, gpath)  # the manifest that was loaded
        if snap.fingerprint().digest != entry["state_digest"]:
            raise SnapshotError(f"{rpath}: state digest {snap.fingerprint().digest} differs from the one {gpath} "
                                f"records for rank {rank}")
        snap._group = group
        return snap

    return agree(group, load_rank)
