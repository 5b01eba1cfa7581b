"""Property-based tests of Snapshot.load / restore on damaged and crafted snapshot directories
(issue 10, deliver 2): every outcome is a SnapshotError that leaves the live state
bit-identical, or (for edits that do not change the snapshot's meaning) a valid load.

CI runs a fixed number of derandomized examples per test (MEMSTATE_FUZZ_EXAMPLES, default
200); the counts per test and outcome are printed at the end of the module's run.
"""
import collections
import json
import os
import random
import shutil
import tempfile

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memstate
from memstate import OrderSampler, Snapshot
from memstate.snapshot._format import _canonical
from memstate.snapshot import SnapshotError

EXAMPLES = int(os.environ.get("MEMSTATE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
COUNTS = collections.Counter()


def live():
    """Fresh live objects of the snapshot's structure (different values)."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = memstate.optim.AdamW(net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    return dict(model=net, optimizer=opt, sampler=OrderSampler(20, 5), scheduler=sched,
                extra={"ptr": torch.zeros((), dtype=torch.int64), "empty": torch.zeros(0)})


def train(s):
    net, opt = s["model"], s["optimizer"]
    opt.zero_grad()
    net(torch.randn(6, 4)).square().mean().backward()
    opt.step()
    s["scheduler"].step()
    s["sampler"].batch(0)
    s["extra"]["ptr"] += 1


def everything(s):
    """All live state, comparable with ==."""
    return (memstate.fingerprint_state({"model": s["model"], "optimizer": s["optimizer"], "extra": s["extra"]}).digest,
            repr([{k: v for k, v in g.items() if k != "params"} for g in s["optimizer"].param_groups]),
            repr(s["sampler"].state_dict()), repr(s["scheduler"].state_dict()), torch.get_rng_state().tolist(),
            np.random.get_state()[1].tobytes(), np.random.get_state()[2], random.getstate())


@pytest.fixture(scope="module")
def pristine(request, tmp_path_factory):
    """A saved snapshot (and a second one, for 'a manifest naming another data file')."""
    base = tmp_path_factory.mktemp("fuzz")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread start-up would dominate every example
    s = live()
    for _ in range(3):
        train(s)
    snap = Snapshot.capture(**s)
    snap.save(str(base / "snap"))
    train(s)
    Snapshot.capture(**s).save(str(base / "other"))
    yield str(base / "snap"), str(base / "other"), snap.fingerprint().digest
    torch.set_num_threads(threads)
    report(request, f"snapshot fuzz ({EXAMPLES} examples per test): "
                    + ", ".join(f"{k}: {v}" for k, v in sorted(COUNTS.items())))


def report(request, line):
    """Writes a line to the terminal whatever the capture settings (-s or not)."""
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is None or reporter is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(line)


def copy_of(src):
    d = tempfile.mkdtemp(prefix="memstate-fuzz-")
    path = os.path.join(d, "snap")
    shutil.copytree(src, path)
    return d, path


def data_name(path):
    return json.load(open(os.path.join(path, "manifest.json")))["data_file"]


def attempt(path, test, must_fail, original=None):
    """Load and restore into fresh live objects; checks the outcome and counts it."""
    s = live()
    before = everything(s)
    try:
        snap = Snapshot.load(path, **s, hyperparameters="snapshot")
        if original is not None:
            assert snap.fingerprint().digest == original
        snap.restore()
    except SnapshotError:
        assert everything(s) == before, "a refused load/restore modified live state"
        COUNTS[f"{test}: SnapshotError"] += 1
        return
    assert not must_fail, "a damaged snapshot was accepted"
    COUNTS[f"{test}: accepted (meaning unchanged)"] += 1


def rewrite(path, manifest, checksum=True):
    """Writes the manifest, with a recomputed checksum (so that deeper checks are reached)."""
    manifest = dict(manifest)
    manifest.pop("manifest_xxh3_128", None)
    if checksum:
        try:
            canon = _canonical(manifest)
        except ValueError:  # NaN/inf have no canonical JSON: checksum the permissive text instead,
            canon = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()  # so load parses it
        manifest["manifest_xxh3_128"] = xxhash.xxh3_128_hexdigest(canon)
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)


# ------------------------------------------------------------------------------ raw bytes
@FUZZ
@given(which=st.sampled_from(["manifest", "data"]), flips=st.lists(
    st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=4))
def test_byte_flips(pristine, which, flips):
    d, path = copy_of(pristine[0])
    try:
        f = os.path.join(path, "manifest.json" if which == "manifest" else data_name(path))
        orig = open(f, "rb").read()
        raw = bytearray(orig)
        for where, xor in flips:
            raw[int(where * len(raw))] ^= xor
        open(f, "wb").write(raw)
        # data: always caught (xxh3); manifest: a flip may only turn whitespace into whitespace
        attempt(path, f"flip {which}", must_fail=which == "data" and raw != orig, original=pristine[2])
    finally:
        shutil.rmtree(d)


@FUZZ
@given(which=st.sampled_from(["manifest", "data"]), cut=st.floats(0, 1, exclude_max=True),
       tail=st.binary(max_size=64))
def test_truncations_and_extensions(pristine, which, cut, tail):
    d, path = copy_of(pristine[0])
    try:
        f = os.path.join(path, "manifest.json" if which == "manifest" else data_name(path))
        raw = open(f, "rb").read()
        changed = raw[:int(cut * len(raw))] + tail
        open(f, "wb").write(changed)
        harmless = which == "manifest" and changed.rstrip() == raw.rstrip()
        attempt(path, f"truncate/extend {which}", must_fail=changed != raw and not harmless, original=pristine[2])
    finally:
        shutil.rmtree(d)


@FUZZ
@given(text=st.one_of(
    st.binary(max_size=200),
    st.integers(1, 20000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 20000).map(lambda n: b'{"a":' * n + b"0" + b"}" * n),
    st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b'{"format": NaN}', b"\xff\xfe\x00", b"", b"null", b"1e999"])))
def test_arbitrary_manifest_text(pristine, text):
    d, path = copy_of(pristine[0])
    try:
        open(os.path.join(path, "manifest.json"), "wb").write(text)
        attempt(path, "manifest text", must_fail=True)
    finally:
        shutil.rmtree(d)


# ------------------------------------------------------------------------------ structured edits
BAD_NAMES = ["", "..", "a/b", "model/../x", "model.0.weight/..", "../model.0.weight", "model.0.weight\x00",
             "optimizer.state.0.exp_avg/x", "optimizer.state.99.exp_avg", "optimizer.state.-1.exp_avg",
             "optimizer.state.x.exp_avg", "rng.torch/..", "/etc/passwd"]
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                   st.text(max_size=8), st.lists(st.integers(-5, 2**40), max_size=3),
                   st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


def _edit(manifest, path, data, other):
    """Applies one edit drawn from `data`; returns (name, whether the result must be refused)."""
    tensors = manifest["tensors"]
    op = data.draw(st.sampled_from(["dtype", "shape", "offset", "nbytes", "duplicate", "drop_key", "add_key",
                                    "name", "data_file", "symlink", "directory", "meta", "nest", "value"]))
    i = data.draw(st.integers(0, len(tensors) - 1))
    t = tensors[i]
    if op == "dtype":
        new = data.draw(st.sampled_from(["float64", "int8", "bogus", "__class__", "", "complex128", "bool", "uint16",
                                         3, None]))
        old_size = torch.empty((), dtype=getattr(torch, t["dtype"])).element_size()
        dt = getattr(torch, new, None) if isinstance(new, str) else None
        t["dtype"] = new
        return op, not isinstance(dt, torch.dtype) or torch.empty((), dtype=dt).element_size() != old_size or (
            t["name"].startswith(("model.", "extra.")))
    if op == "shape":
        new = data.draw(st.one_of(st.lists(st.integers(-3, 2**62), max_size=4), VALUES))
        same = new == t["shape"]
        t["shape"] = new
        return op, not same
    if op == "offset":
        new = data.draw(st.one_of(st.integers(-2**63, 2**64), VALUES))
        ok = new == t["offset"] or (t["nbytes"] == 0 and isinstance(new, int) and not isinstance(new, bool)
                                    and 0 <= new <= manifest["data_nbytes"])
        t["offset"] = new
        return op, not ok
    if op == "nbytes":
        new = data.draw(st.one_of(st.integers(-2**63, 2**64), VALUES))
        ok = new == t["nbytes"] and type(new) is int
        t["nbytes"] = new
        return op, not ok
    if op == "duplicate":
        tensors.append(dict(t))
        return op, True
    if op == "drop_key":
        where = data.draw(st.sampled_from(["tensor", "top"]))
        if where == "tensor":
            del t[data.draw(st.sampled_from(sorted(t)))]
            return op, True
        key = data.draw(st.sampled_from(sorted(manifest)))
        del manifest[key]
        return op, key not in ("created", "memstate", "torch", "cuda", "align", "manifest_xxh3_128")  # rewrite() restores the checksum
    if op == "add_key":
        target = data.draw(st.sampled_from([t, manifest]))
        target[data.draw(st.sampled_from(["extra", "zz", "__tensor__", "__dict__"]))] = data.draw(VALUES)
        return op, False
    if op == "name":
        t["name"] = data.draw(st.sampled_from(BAD_NAMES))
        return op, True
    if op == "data_file":
        manifest["data_file"] = data.draw(st.sampled_from(
            ["../" + manifest["data_file"], "/etc/passwd", "data-x/../../etc", "", "manifest.json", "..",
             "data-" + "0" * 16 + ".bin", os.path.relpath(other, path), 7, None]))
        return op, True
    if op in ("symlink", "directory"):
        f = os.path.join(path, manifest["data_file"])
        if op == "symlink":
            shutil.move(f, f + ".real")
            os.symlink(f + ".real", f)
        else:
            os.remove(f)
            os.mkdir(f)
        return op, True
    if op == "meta":  # another data file's manifest, with this file: every hash disagrees
        manifest["data_file"] = other
        return op, True
    if op == "nest":
        key = data.draw(st.sampled_from(sorted(manifest["meta"])))
        depth = data.draw(st.integers(1, 400))
        node = 0
        for _ in range(depth):
            node = [node]
        manifest["meta"][key] = node
        return op, key != "cuda_devices"
    key = data.draw(st.sampled_from(sorted(manifest["meta"])))
    manifest["meta"][key] = data.draw(VALUES)
    return op, False


@FUZZ
@given(data=st.data(), checksum=st.booleans())
def test_structured_manifest_edits(pristine, data, checksum):
    d, path = copy_of(pristine[0])
    try:
        manifest = json.load(open(os.path.join(path, "manifest.json")))
        other_data = os.path.join(pristine[1], data_name(pristine[1]))
        shutil.copy(other_data, os.path.join(path, os.path.basename(other_data)))
        op, must_fail = _edit(manifest, path, data, os.path.basename(other_data))
        rewrite(path, manifest, checksum=checksum)
        # without a recomputed checksum every edit of the manifest's content is refused
        attempt(path, f"edit {op}" + ("" if checksum else " (stale checksum)"),
                must_fail=must_fail or (not checksum and op not in ("symlink", "directory")))
    finally:
        shutil.rmtree(d)


def test_unchanged_snapshot_loads(pristine):
    """The oracle's positive control: the pristine copy loads and restores."""
    d, path = copy_of(pristine[0])
    try:
        s = live()
        snap = Snapshot.load(path, **s, hyperparameters="snapshot")
        assert snap.fingerprint().digest == pristine[2]
        snap.restore()
    finally:
        shutil.rmtree(d)
