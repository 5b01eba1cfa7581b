"""Snapshot directories: saving removes only what the previous manifest named, a failed save
cleans up after itself, free space is checked first, writers are serialised by a lock, the
manifest parser only raises SnapshotError, and loading reads straight into the arena (issue 10,
items 3, 4, 8, 9)."""
import errno
import fcntl
import os
import re
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import memstate
from memstate import Snapshot
from memstate.snapshot import _format as _persist
from memstate.snapshot import SnapshotError

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def state(n=4096, value=0.0):
    net = torch.nn.Linear(n // 64, 64)
    with torch.no_grad():
        net.weight.fill_(value)
    return net


def digest(net):
    return memstate.fingerprint_state({"model": net}).digest


def save(net, path, **kw):
    snap = Snapshot.capture(net, rng=False)
    snap.save(str(path), **kw)
    return snap.fingerprint().digest


def load(net, path):
    return Snapshot.load(str(path), net, rng=False)


def listing(path):
    return sorted(os.listdir(path))


def data_files(path):
    return [n for n in listing(path) if re.fullmatch(r"data-[0-9a-f]{16}\.bin", n)]


# ------------------------------------------------------------------------------ item 8
def test_save_removes_only_the_data_file_the_previous_manifest_named(tmp_path):
    path = tmp_path / "s"
    path.mkdir()
    users = ["data-train-00000.bin", "data-0123.bin.tmp", "notes.txt", "manifest.json.tmp-mine"]
    for name in users:
        (path / name).write_bytes(b"user data")
    net = state()
    save(net, path)
    first = data_files(path)
    with torch.no_grad():
        net.weight.add_(1)
    d = save(net, path)
    second = data_files(path)
    assert len(first) == len(second) == 1 and first != second
    assert all((path / n).read_bytes() == b"user data" for n in users)
    assert load(state(), path).fingerprint().digest == d


# ------------------------------------------------------------------------------ item 3
def _enospc_on(call):
    """A _write_file that writes a little and fails with ENOSPC on its `call`-th use."""
    real, calls = _persist._write_file, []

    def write(path, chunks):
        calls.append(path)
        if len(calls) == call:
            with open(path, "xb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(path, chunks)

    return write


@pytest.mark.parametrize("call", [1, 2], ids=["data", "manifest"])
def test_a_failed_save_removes_what_it_wrote(tmp_path, monkeypatch, call):
    path = tmp_path / "s"
    net = state()
    good = save(net, path)
    before = listing(path)
    with torch.no_grad():
        net.weight.add_(1)
    monkeypatch.setattr(_persist, "_write_file", _enospc_on(call))
    with pytest.raises(OSError, match="No space left"):
        save(net, path)
    monkeypatch.undo()
    assert listing(path) == before  # nothing left behind: no .tmp, no orphan data file
    assert load(state(), path).fingerprint().digest == good
    assert open(path / ".memstate.lock").read() == ""  # the journal is clear
    assert load(state(), path).fingerprint().digest == good
    d = save(net, path)
    assert load(state(), path).fingerprint().digest == d and len(data_files(path)) == 1


def test_free_space_is_checked_before_anything_is_written(tmp_path, monkeypatch):
    path = tmp_path / "s"
    net = state()
    good = save(net, path)
    before = listing(path)
    real = os.statvfs(str(path))

    class Full:
        f_bavail, f_frsize = 1, real.f_frsize

    monkeypatch.setattr(os, "statvfs", lambda p: Full)
    with pytest.raises(SnapshotError, match=rf"saving needs \d+ bytes .* {real.f_frsize} bytes are free"):
        save(net, path)
    monkeypatch.undo()
    assert listing(path) == before and load(state(), path).fingerprint().digest == good


@pytest.fixture
def tmpfs(tmp_path):
    """A 1 MiB tmpfs (root only; skipped where mounting is not permitted)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_filesystem_leaves_the_directory_loadable_and_saveable(tmpfs, monkeypatch):
    path = tmpfs / "s"
    net = state(65536)  # 256 KiB of weights
    good = save(net, path)
    filler = tmpfs / "filler"
    filler.write_bytes(b"\0" * (600 * 1024))  # old + new no longer fit
    before = listing(path)
    with torch.no_grad():
        net.weight.add_(1)
    with pytest.raises(SnapshotError, match="bytes are free"):  # refused up front
        save(net, path)
    assert listing(path) == before
    # the same, when the free space cannot be known in advance: the write itself fails
    monkeypatch.setattr(os, "statvfs", lambda p: type("Big", (), {"f_bavail": 2**40, "f_frsize": 4096}))
    with pytest.raises(OSError) as e:
        save(net, path)
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert listing(path) == before
    assert load(state(65536), path).fingerprint().digest == good
    filler.unlink()  # space freed: the directory is saveable again
    d = save(net, path)
    assert load(state(65536), path).fingerprint().digest == d and len(data_files(path)) == 1


def test_read_only_directory_refuses_cleanly(tmp_path, tmpfs):
    net = state()
    good = save(net, tmpfs / "s")
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    with torch.no_grad():
        net.weight.add_(1)
    with pytest.raises((SnapshotError, OSError), match="Read-only file system"):
        save(net, tmpfs / "s")
    assert load(state(), tmpfs / "s").fingerprint().digest == good  # readers need no write access


# ------------------------------------------------------------------------------ item 4
def test_a_second_writer_fails_fast_or_waits(tmp_path):
    path = tmp_path / "s"
    net = state()
    save(net, path)
    fd = os.open(path / ".memstate.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another writer holds the lock
    try:
        t0 = time.monotonic()
        with pytest.raises(SnapshotError, match="another process is saving"):
            save(net, path)
        with pytest.raises(SnapshotError, match="after waiting 0.2 s"):
            save(net, path, timeout=0.2)
        assert time.monotonic() - t0 < 5
        threading.Timer(0.3, lambda: fcntl.flock(fd, fcntl.LOCK_UN)).start()
        d = save(net, path, timeout=30)  # waits until the other writer is done
    finally:
        os.close(fd)
    assert load(state(), path).fingerprint().digest == d


WRITER = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {root!r})
    from memstate import Snapshot
    net = torch.nn.Linear(64, 64)
    for i in range({n}):
        with torch.no_grad():
            net.weight.fill_({who} * 1000 + i)
        snap = Snapshot.capture(net, rng=False)
        snap.save({path!r}, timeout=120)
        print(snap.fingerprint().digest, flush=True)
""")


def test_concurrent_writers_never_lose_the_snapshot(tmp_path):
    path = str(tmp_path / "s")
    net = torch.nn.Linear(64, 64)
    Snapshot.capture(net, rng=False).save(path)
    n = 25
    procs = [subprocess.Popen([sys.executable, "-c", WRITER.format(root=ROOT, n=n, who=w, path=path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in (1, 2)]
    loads = 0
    while any(p.poll() is None for p in procs):  # readers see a complete snapshot at every moment
        Snapshot.load(path, net, rng=False)
        loads += 1
    outs = [p.communicate() for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    saved = [o.split() for o, _ in outs]
    assert all(len(s) == n for s in saved)
    final = Snapshot.load(path, net, rng=False).fingerprint().digest
    assert final in (saved[0][-1], saved[1][-1])
    assert sorted(os.listdir(path)) == sorted([".memstate.lock", "manifest.json"] + data_files(path))
    assert len(data_files(path)) == 1
    print(f"concurrent writers: {2 * n} saves, {loads} concurrent loads, all valid", file=sys.stderr)


# ------------------------------------------------------------------------------ item 9
def _write_manifest(path, text: bytes):
    with open(os.path.join(path, "manifest.json"), "wb") as f:
        f.write(text)


@pytest.mark.parametrize("text", [
    b"[" * 100000 + b"]" * 100000,
    b'{"a":' * 50000 + b"1" + b"}" * 50000,
    b'{"format": "memstate-snapshot", "format_version": 1, "x": NaN}',
    b'{"format": "memstate-snapshot", "format_version": 1, "x": -Infinity}',
    b'{"format": "memstate-snapshot", "format_version": 1, "data_nbytes": 1e400}',
    b"\xff\xfe not utf-8",
], ids=["deep-list", "deep-dict", "nan", "infinity", "huge-float", "not-utf8"])
def test_manifest_parse_errors_are_snapshot_errors(tmp_path, text):
    path = str(tmp_path / "s")
    net = state()
    save(net, path)
    _write_manifest(path, text)
    with pytest.raises(SnapshotError):
        load(net, path)


def test_data_file_symlink_or_directory_is_refused(tmp_path):
    path = tmp_path / "s"
    net = state()
    save(net, path)
    data = path / data_files(path)[0]
    target = tmp_path / "elsewhere.bin"
    os.replace(data, target)
    os.symlink(target, data)
    with pytest.raises(SnapshotError, match="symlinks are refused"):
        load(net, path)
    os.remove(data)
    os.mkdir(data)
    with pytest.raises(SnapshotError, match="not a regular file|cannot be opened"):
        load(net, path)


PEAK = textwrap.dedent("""
    import resource, sys, torch
    sys.path.insert(0, {root!r})
    from memstate import Snapshot
    net = torch.nn.Linear(2048, 4096, bias=False)  # 32 MiB
    if sys.argv[1] == "save":
        Snapshot.capture(net, rng=False).save({path!r})
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        snap = Snapshot.load({path!r}, net, rng=False)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(after - before, snap.nbytes)
""")


def test_load_reads_straight_into_the_arena(tmp_path):
    path = str(tmp_path / "s")
    script = PEAK.format(root=ROOT, path=path)
    subprocess.run([sys.executable, "-c", script, "save"], check=True, timeout=300)
    out = subprocess.run([sys.executable, "-c", script, "load"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    grew, nbytes = map(int, out.stdout.split())
    print(f"Snapshot.load peak RSS growth: {grew / 2**20:.1f} MiB for {nbytes / 2**20:.1f} MiB of data", file=sys.stderr)
    assert grew < 1.25 * nbytes  # one arena; the old loader peaked at 2-3x
