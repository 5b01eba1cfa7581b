"""`memstate diff` and `memstate verify --script` (issue 13 items 4-5): thin CLI calls of
memstate.audit's entry functions, run in fresh processes on the audit package's example script
(a nondeterministic operation planted at step 7 with --plant 7)."""
import os

from cli_helper import run_cli as _cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "scripts", "train_tiny.py")


def test_verify_script_pass_and_planted_divergence_then_diff(tmp_path):
    rc, out, err = _cli(["verify", "--script", SCRIPT, "--steps", "10", "--out", "same"], tmp_path)
    assert rc == 0, err
    assert out.startswith("PASS") and "10 recorded steps" in out
    rc, out, err = _cli(["verify", "--script", SCRIPT, "--out", "planted", "--", "--plant", "7"], tmp_path)
    assert rc == 1, err
    assert "first divergence at step 7" in out and "grad head.weight" in out
    a, b = str(tmp_path / "planted" / "run1.trail"), str(tmp_path / "planted" / "run2.trail")
    rc, out, err = _cli(["diff", a, b, "--plot", "d.png"], tmp_path)
    assert rc == 1, err
    assert "step 7" in out and "grad head.weight" in out
    assert os.path.getsize(tmp_path / "d.png") > 1000
    same = [str(tmp_path / "same" / f"run{i}.trail") for i in (1, 2)]
    rc, out, err = _cli(["diff", *same], tmp_path)
    assert rc == 0 and out.startswith("identical"), err


def test_cli_audit_mistakes_exit_2(tmp_path):
    rc, out, err = _cli(["diff", "nope_a.trail", "nope_b.trail"], tmp_path)
    assert rc == 2 and err.startswith("memstate diff:") and len(err.strip().splitlines()) == 1
    rc, out, err = _cli(["verify", "--script", "missing.py"], tmp_path)
    assert rc == 2 and "missing.py" in err
    rc, out, err = _cli(["verify", "--script", SCRIPT, "--device", "cpu"], tmp_path)
    assert rc == 2 and "--device" in err
    rc, out, err = _cli(["verify", "--steps", "3"], tmp_path)
    assert rc == 2 and "go with --script" in err
    rc, out, err = _cli(["diff", "--help"], tmp_path)
    assert rc == 0 and "TRAIL_A" in out and "--plot" in out
    rc, out, err = _cli(["verify", "--help"], tmp_path)
    assert rc == 0 and "--script" in out and "--steps" in out
