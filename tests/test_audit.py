"""memstate.audit: Trail recording, concurrent reading, diff ordering, verify_script."""
import os
import sqlite3
import subprocess
import sys

import pytest
import torch
from torch import nn

import memstate
from memstate import audit
from memstate.audit import trail as trail_mod

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "scripts", "train_tiny.py")
# the scripts run in fresh processes: make them import this checkout's memstate
ENV = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _model(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential()
    m.add_module("body", nn.Linear(4, 6))
    m.add_module("bn", nn.BatchNorm1d(6))
    m.add_module("head", nn.Linear(6, 2))
    return m


def _train(path, steps=6, optim="adam_fp", plant=None, record_first=False, **trail_kw):
    """A few deterministic steps recorded to `path`; `plant` = (step, fn(model)) after backward."""
    model = _model()
    if optim == "adam_fp":
        opt = memstate.optim.Adam(model.parameters(), lr=1e-2, fingerprint=True)
    elif optim == "adam":
        opt = memstate.optim.Adam(model.parameters(), lr=1e-2)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(64, 4, generator=g), torch.randint(0, 2, (64,), generator=g)
    with audit.Trail(path, model=model, optimizer=opt, **trail_kw) as trail:
        start = 0
        if record_first:
            trail.record(0)
            start = 1
        for t in range(start, steps):
            ids = torch.arange(t * 8, t * 8 + 8) % 64
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x[ids]), y[ids])
            loss.backward()
            if plant is not None and plant[0] == t:
                plant[1](model)
            opt.step()
            trail.record(t, loss=loss, batch_ids=ids)
    return model, opt


def _bump_head(model):
    with torch.no_grad():
        model.head.weight.grad[0, 0] += 1e-3


# ------------------------------------------------------------------------------ recording
def test_row_holds_msfp1_of_every_tensor(tmp_path):
    path = str(tmp_path / "a.trail")
    model, opt = _train(path, steps=3, optim="sgd")
    with audit.TrailReader(path) as r:
        rows = list(r.rows())
        assert [row.step for row in rows] == [0, 1, 2]
        names = {t.label: t for t in r.tensors}
        last = rows[-1]
        for n, p in model.named_parameters():
            assert last.fingerprint(names[f"param {n}"].index) == memstate.fingerprint(p)
            assert last.fingerprint(names[f"grad {n}"].index) == memstate.fingerprint(p.grad)
            assert last.fingerprint(names[f"optim {n}.momentum_buffer"].index) == \
                memstate.fingerprint(opt.state[p]["momentum_buffer"])
        for n, b in model.named_buffers():
            assert last.fingerprint(names[f"buffer {n}"].index) == memstate.fingerprint(b)
        assert names["param head.weight"].shape == (2, 6) and names["param head.weight"].dtype == "float32"
        assert r.header["format"] == audit.FORMAT
        assert r.header["determinism"]["deterministic_algorithms"] == torch.are_deterministic_algorithms_enabled()
        assert "torch_threads" in r.header["determinism"] and "CUBLAS_WORKSPACE_CONFIG" in r.header["determinism"]
        assert r.header["memstate_build"].get("built") is True
        assert isinstance(last.loss, float) and last.batch_hash is not None and last.rng["torch"]


def test_in_pass_fingerprints_are_used_and_agree(tmp_path, monkeypatch):
    """With fingerprint=True the param, grad and state fingerprints come from the optimizer's
    pass (fingerprint_many sees only the buffers), and the trail equals one computed natively."""
    labels = []
    real = trail_mod._fingerprint_lanes

    def spy(tensors, names):
        labels.extend(names)
        return real(tensors, names)

    monkeypatch.setattr(trail_mod, "_fingerprint_lanes", spy)
    a, b = str(tmp_path / "fp.trail"), str(tmp_path / "plain.trail")
    model, opt = _train(a, optim="adam_fp")
    # the trail read the pending rows without consuming them: the optimizer's own API still works
    assert opt.fingerprints(model.head.weight)["param"] == memstate.fingerprint(model.head.weight)
    assert labels and all(lbl.startswith("buffer ") for lbl in labels), labels
    with audit.TrailReader(a) as r:
        assert r.header["in_pass_fingerprints"] is True
    labels.clear()
    _train(b, optim="adam")
    assert any(lbl.startswith("grad ") for lbl in labels)
    d = audit.diff(a, b)
    assert d.identical and d.first_step is None and d.steps_compared == 6, d.summary()


def test_stale_in_pass_fingerprints_are_not_used(tmp_path):
    """In-pass fingerprints describe the optimizer's last step: a record with no step since
    (here after an in-place edit of a parameter) must fingerprint the live tensors instead."""
    path = str(tmp_path / "s.trail")
    model = _model()
    opt = memstate.optim.Adam(model.parameters(), lr=1e-2, fingerprint=True)
    with audit.Trail(path, model=model, optimizer=opt) as trail:
        model(torch.randn(4, 4)).sum().backward()
        opt.step()
        trail.record(0)
        with torch.no_grad():
            model.head.weight.add_(1.0)
        trail.record(1)
    with audit.TrailReader(path) as r:
        i = next(t.index for t in r.tensors if t.label == "param head.weight")
        rows = list(r.rows())
    assert rows[1].fingerprint(i) == memstate.fingerprint(model.head.weight)
    assert rows[0].fingerprint(i) != rows[1].fingerprint(i)


def test_every_and_step_context(tmp_path):
    path = str(tmp_path / "e.trail")
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with audit.Trail(path, model=model, optimizer=opt, every=2) as trail:
        for t in range(5):
            with trail.step(t) as s:
                opt.zero_grad()
                loss = model(torch.ones(3, 4)).sum()
                loss.backward()
                opt.step()
                s.loss = loss
                s.batch_ids = [0, 1, 2]
    with audit.TrailReader(path) as r:
        rows = list(r.rows())
    assert [row.step for row in rows] == [0, 2, 4]
    assert all(row.loss is not None and row.batch_hash for row in rows)


def test_step_context_records_nothing_on_exception(tmp_path):
    path = str(tmp_path / "x.trail")
    with audit.Trail(path, model=_model()) as trail:
        with pytest.raises(RuntimeError):
            with trail.step(0):
                raise RuntimeError("boom")
    with audit.TrailReader(path) as r:
        assert r.steps() == []


def test_changed_tensor_set_appends_names(tmp_path):
    """Step 0 is recorded before any optimizer step (no gradients, no momentum buffers): the
    names created later are appended, and step 0's row marks them absent."""
    a, b = str(tmp_path / "a.trail"), str(tmp_path / "b.trail")
    _train(a, steps=4, optim="sgd", record_first=True)
    with audit.TrailReader(a) as r:
        rows = list(r.rows())
        kinds0 = {r.tensors[i].kind for i in range(rows[0].fingerprints.__len__() // 16)}
        assert kinds0 == {"param", "buffer"}
        assert len(rows[1].fingerprints) > len(rows[0].fingerprints)
        mom = [t.index for t in r.tensors if t.kind == "optim"]
        assert mom and all(i >= len(rows[0].fingerprints) // 16 for i in mom)
        assert all(rows[1].fingerprint(i) is not None for i in mom)
    _train(b, steps=4, optim="sgd", record_first=True)
    assert audit.diff(a, b).identical


def test_concurrent_reader_sees_committed_steps(tmp_path):
    path = str(tmp_path / "live.trail")
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    count = ("import sys, memstate.audit as a; r = a.TrailReader(sys.argv[1]); "
             "print(len(r.steps()), len(r.tensors))")
    trail = audit.Trail(path, model=model, optimizer=opt, commit_every=2)
    reader = audit.TrailReader(path)  # opened before any step exists
    assert reader.steps() == []
    for t in range(3):
        opt.zero_grad()
        model(torch.ones(3, 4)).sum().backward()
        opt.step()
        trail.record(t)
    assert reader.steps() == [0, 1]  # step 2 is still buffered
    out = subprocess.run([sys.executable, "-c", count, path], env=ENV, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "2"
    trail.flush()
    assert reader.steps() == [0, 1, 2]
    assert [row.step for row in reader.rows()] == [0, 1, 2]
    trail.close()
    reader.close()


def test_contract_log_chain(tmp_path):
    def run(path, extra_draw):
        c = memstate.RngContract(5, name=f"audit-test-{extra_draw}-{path[-7:]}", register=False)
        with audit.Trail(path, contracts=[c]) as trail:
            for t in range(4):
                c.generator("data", step=t)
                if extra_draw and t == 2:
                    c.generator("augment", step=t)
                trail.record(t)
        return c

    a, b, c = (str(tmp_path / f"{n}.trail") for n in "abc")
    ca = run(a, False)
    run(b, False)
    run(c, True)
    with audit.TrailReader(a) as r:
        digests = [list(row.contracts.values())[0] for row in r.rows()]
    assert len(set(digests)) == 4  # one more draw per step: the chained digest moves
    # contract names differ between runs here, so compare digests directly
    with audit.TrailReader(b) as rb, audit.TrailReader(c) as rc:
        db = [list(row.contracts.values())[0] for row in rb.rows()]
        dc = [list(row.contracts.values())[0] for row in rc.rows()]
    assert db == digests and dc[:2] == digests[:2] and dc[2] != digests[2]
    assert ca.log  # the chain never replaced the contract's own log


def test_contract_difference_reported_by_diff(tmp_path):
    def run(path, extra):
        c = memstate.RngContract(5, name="audit-diff-contract", register=False)
        with audit.Trail(path, contracts=[c]) as trail:
            for t in range(3):
                c.generator("data", step=t)
                if extra and t == 1:
                    c.generator("augment", step=t)
                trail.record(t)

    a, b = str(tmp_path / "a.trail"), str(tmp_path / "b.trail")
    run(a, False)
    run(b, True)
    d = audit.diff(a, b)
    assert d.first_step is None and d.input_first_steps == {"contract audit-diff-contract": 1}


# ------------------------------------------------------------------------------ diff
def test_diff_orders_cause_before_consequence(tmp_path):
    a, b = str(tmp_path / "a.trail"), str(tmp_path / "b.trail")
    _train(a, steps=6)
    _train(b, steps=6, plant=(3, _bump_head))
    d = audit.diff(a, b)
    assert not d.identical and d.first_step == 3
    assert d.first_tensors == ["grad head.weight", "optim head.weight.exp_avg", "optim head.weight.exp_avg_sq",
                               "param head.weight"]
    assert not d.inputs_differ
    assert [f for s, f in d.fractions if s < 3] == [0.0, 0.0, 0.0]
    with audit.TrailReader(a) as r:
        n_tensors = len(r.tensors)  # 6 params, 6 grads, 6 x (exp_avg, exp_avg_sq, step), 3 BatchNorm buffers
    assert n_tensors == 33
    assert dict(d.fractions)[3] == pytest.approx(4 / n_tensors)
    assert dict(d.fractions)[5] > dict(d.fractions)[3]
    assert "step 3" in d.summary() and "grad head.weight" in d.summary()


def test_diff_says_when_trails_come_from_different_machines(tmp_path):
    """Trails record the CPU kind and torch's CPU kernel capability and variables; a divergence between trails of different machines says so instead of blaming the
    code (the header is edited here to stand in for another machine)."""
    import json
    import sqlite3

    a, b = str(tmp_path / "a.trail"), str(tmp_path / "b.trail")
    _train(a, steps=4)
    _train(b, steps=4, plant=(2, _bump_head))
    with audit.TrailReader(a) as r:
        header = r.header
    assert header["cpu"] and header["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(header["cpu_kernel_env"], dict)
    d = audit.diff(a, b)
    assert d.first_step == 2 and d.machine_differences() == [] and "different machines" not in d.summary()
    with sqlite3.connect(b) as conn:
        conn.execute("UPDATE header SET value = ? WHERE key = 'cpu'", (json.dumps("Another CPU (TM)"),))
        conn.execute("UPDATE header SET value = ? WHERE key = 'torch_cpu_capability'", (json.dumps("AVX2"),))
    conn.close()
    d = audit.diff(a, b)
    assert d.machine_differences() == ["cpu", "torch_cpu_capability"]
    text = d.summary()
    assert f"note: cpu differs: {header['cpu']!r} vs 'Another CPU (TM)'" in text, text
    assert ("the trails come from different machines or builds (cpu, torch_cpu_capability differ, see the notes): "
            "torch's kernels give other bits there, so this divergence says nothing about the code") in text, text
    with sqlite3.connect(b) as conn:  # a trail written before these were recorded: not compared
        conn.execute("DELETE FROM header WHERE key IN ('cpu', 'torch_cpu_capability')")
    conn.close()
    assert audit.diff(a, b).machine_differences() == []


def test_diff_reports_batch_difference(tmp_path):
    a, b = str(tmp_path / "a.trail"), str(tmp_path / "b.trail")
    for path, ids in ((a, [1, 2]), (b, [1, 3])):
        with audit.Trail(path, model=_model()) as trail:
            trail.record(0, batch_ids=[0, 1])
            trail.record(1, batch_ids=ids)
    d = audit.diff(a, b)
    assert not d.identical and d.first_step is None and d.first_input_step == 1
    assert d.input_differences == ["batch_ids"]


def test_diff_different_tensor_sets_and_steps(tmp_path):
    a, b = str(tmp_path / "a.trail"), str(tmp_path / "b.trail")
    _train(a, steps=4, optim="sgd")
    with audit.Trail(b, model=nn.Linear(4, 2)) as trail:
        for t in range(2, 6):
            trail.record(t)
    d = audit.diff(a, b)
    assert not d.identical
    text = " | ".join(d.notes)
    assert "tensors only in a" in text and "tensors only in b" in text
    assert "steps only in a" in text and "steps only in b" in text
    assert d.steps_compared == 2


def test_main_diff_exit_codes_and_plot(tmp_path, capsys):
    a, b, c = (str(tmp_path / f"{n}.trail") for n in "abc")
    _train(a, steps=4)
    _train(b, steps=4)
    _train(c, steps=4, plant=(2, _bump_head))
    assert audit.main_diff([a, b]) == 0
    png = str(tmp_path / "frac.png")
    assert audit.main_diff([a, c, "--plot", png]) == 1
    out = capsys.readouterr().out
    assert "first divergence at step 2" in out and "grad head.weight" in out
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_unreadable_trails_exit_2(tmp_path, capsys):
    good = str(tmp_path / "good.trail")
    _train(good, steps=2)
    junk = tmp_path / "junk.trail"
    junk.write_bytes(os.urandom(4096))
    foreign = str(tmp_path / "foreign.db")
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    other = str(tmp_path / "other.db")
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE header (key TEXT, value TEXT)")
    con.execute("INSERT INTO header VALUES ('format', '\"someone.else\"')")
    con.commit()
    con.close()
    truncated = tmp_path / "trunc.trail"
    truncated.write_bytes(open(good, "rb").read()[:300])
    for bad in (str(junk), foreign, other, str(truncated), str(tmp_path / "missing.trail")):
        assert audit.main_diff([good, bad]) == 2, bad
        err = capsys.readouterr().err
        assert os.path.basename(bad) in err and "Traceback" not in err
        with pytest.raises(audit.TrailError, match=os.path.basename(bad)):
            audit.diff(bad, good)


# ------------------------------------------------------------------------------ bad input
def test_bad_input_names_the_item(tmp_path):
    p = str(tmp_path / "t.trail")
    with pytest.raises(TypeError, match="model"):
        audit.Trail(p, model="net")
    with pytest.raises(TypeError, match="optimizer"):
        audit.Trail(p, optimizer=object())
    with pytest.raises(ValueError, match="every"):
        audit.Trail(p, every=0)
    with pytest.raises(TypeError, match="'ema'"):
        audit.Trail(p, extra={"ema": 3})
    with pytest.raises(TypeError, match=r"contracts\[0\]"):
        audit.Trail(p, contracts=["seed"])
    assert not os.path.exists(p)  # nothing was created by a refused trail
    trail = audit.Trail(p, model=_model())
    with pytest.raises(FileExistsError, match="t.trail"):
        audit.Trail(p)
    trail.record(3)
    with pytest.raises(ValueError, match="step 3"):
        trail.record(3)
    with pytest.raises(TypeError, match="batch_ids"):
        trail.record(4, batch_ids=[0.5, 1.5])
    with pytest.raises(TypeError, match="loss"):
        trail.record(4, loss="high")
    with pytest.raises(TypeError, match="step"):
        trail.record(4.0)
    trail.record(4)  # the refused calls recorded nothing
    trail.close()
    with audit.TrailReader(p) as r:
        assert r.steps() == [3, 4]
    with pytest.raises(RuntimeError, match="closed"):
        trail.record(5)


def test_unfingerprintable_tensor_is_named(tmp_path):
    sparse = torch.sparse_coo_tensor(torch.tensor([[0]]), torch.tensor([1.0]), (3,))
    with audit.Trail(str(tmp_path / "sp.trail"), model=_model(), extra={"sp": sparse}) as trail:
        with pytest.raises(TypeError, match="extra sp"):
            trail.record(0)
    with audit.TrailReader(str(tmp_path / "sp.trail")) as r:
        assert r.steps() == []


def test_extra_state_is_recorded(tmp_path):
    p = str(tmp_path / "x.trail")
    ema = _model()
    with audit.Trail(p, model=_model(), extra={"ema": ema, "queue": torch.zeros(3)}) as trail:
        trail.record(0)
    with audit.TrailReader(p) as r:
        labels = {t.label for t in r.tensors}
    assert "extra ema.head.weight" in labels and "extra queue" in labels


def test_auto_without_env_is_a_no_op(monkeypatch):
    monkeypatch.delenv(audit.ENV_TRAIL, raising=False)
    t = audit.auto(_model())
    assert not t and t.record(0) is False
    with t.step(1) as s:
        s.loss = 1.0
    t.close()


# ------------------------------------------------------------------------------ verify --script
def test_verify_script_finds_planted_nondeterminism_at_step_7(tmp_path):
    r = audit.verify_script(SCRIPT, args=["--plant", "7"], out_dir=str(tmp_path), timeout=120, env=ENV)
    assert r.error is None and not r.passed
    d = r.diff
    assert d.first_step == 7
    assert d.first_tensors[0] == "grad head.weight"
    assert d.first_tensors == ["grad head.weight", "optim head.weight.exp_avg", "optim head.weight.exp_avg_sq",
                               "param head.weight"]
    assert "batch_ids" not in d.input_differences
    assert any("gradients differed at step 7" in h for h in r.hints)
    assert "step 7" in r.report()


def test_verify_script_passes_without_plant(tmp_path):
    r = audit.verify_script(SCRIPT, steps=10, out_dir=str(tmp_path), timeout=120, env=ENV)
    assert r.error is None and r.passed, r.report()
    assert r.diff.steps_compared == 10
    assert r.report().startswith("PASS")


def test_main_verify_script_exit_codes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", ENV["PYTHONPATH"])
    assert audit.main_verify_script(["--script", SCRIPT, "--steps", "9", "--out", str(tmp_path / "a"),
                                     "--", "--optim", "torch", "--plant", "8"]) == 1
    out = capsys.readouterr().out
    assert "first divergence at step 8" in out and "grad head.weight, optim head.weight.momentum_buffer" in out
    failing = tmp_path / "fails.py"
    failing.write_text("raise SystemExit('no data here')\n")
    assert audit.main_verify_script(["--script", str(failing), "--out", str(tmp_path / "b")]) == 2
    assert "no data here" in capsys.readouterr().out
    silent = tmp_path / "silent.py"
    silent.write_text("print('hello')\n")
    assert audit.main_verify_script(["--script", str(silent), "--out", str(tmp_path / "c")]) == 2
    assert "auto()" in capsys.readouterr().out
    assert audit.main_verify_script(["--script", str(tmp_path / "nope.py")]) == 2
