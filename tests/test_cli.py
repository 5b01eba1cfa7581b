"""The memstate command line: every user mistake is one line on stderr with exit code 2 and
creates nothing; runs are never overwritten or mixed; help and README agree."""
import os
import re

import pytest

from memstate.cli import RUN_DEFAULTS, build_parser, main
from cli_helper import run_cli as _cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL = ["--t0", "4", "--horizon", "10", "--seeds", "2", "--window", "3", "--no-progress"]


def test_cli_run_resume_report_replay(tmp_path, capsys):
    out = str(tmp_path / "run")
    cfg = tmp_path / "exp.toml"
    cfg.write_text('task = "digits"\nperturbation = "reset_adam"\nt0 = 4\nhorizon = 10\nseeds = 2\nwindow = 3\n'
                   'task_options = { optimizer = "adamw" }\n')
    assert main(["run", str(cfg), "--out", out, "--no-progress"]) == 0
    for f in ("run.json", "card.json", "results.csv", "report.html", "ate_final.png", "ate_early.png", "loss.png",
              "divergence.png", "paired_accuracy.png"):
        assert os.path.isfile(os.path.join(out, f)), f
    text = capsys.readouterr().out
    assert "ATE_opt = E[M(carry) - M(reset_adam)]" in text and "A/A check: bitwise identical" in text
    # resume reuses the finished seeds on disk; flags equal to the saved config are fine
    mtimes = {f: os.path.getmtime(os.path.join(out, "seeds", f)) for f in os.listdir(os.path.join(out, "seeds"))}
    assert main(["run", "--resume", out, "--t0", "4", "--no-progress"]) == 0
    assert {f: os.path.getmtime(os.path.join(out, "seeds", f)) for f in mtimes} == mtimes
    os.remove(os.path.join(out, "report.html"))
    assert main(["report", os.path.join(out, "card.json")]) == 0
    assert os.path.isfile(os.path.join(out, "report.html"))
    # report --out takes a file name or a directory, as its name says
    assert main(["report", os.path.join(out, "card.json"), "--out", str(tmp_path / "r.html")]) == 0
    assert os.path.isfile(tmp_path / "r.html") and os.path.isfile(tmp_path / "results.csv")
    assert main(["report", os.path.join(out, "card.json"), "--out", str(tmp_path / "rep")]) == 0
    assert os.path.isfile(tmp_path / "rep" / "report.html")
    capsys.readouterr()
    assert main(["replay", os.path.join(out, "card.json"), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "PASS" in text and "statistics recomputed from the replayed seeds equal" in text
    assert main(["replay", os.path.join(out, "card.json"), "--seeds", "1", "--no-progress"]) == 0
    assert "statistics check SKIPPED (only seeds 1 were replayed" in capsys.readouterr().out


MISTAKES = [
    ('seeds = "three"\n', "seeds must be a count"),
    ("seeds = [\n", "is not valid TOML"),
    ('task_options = { nope = 1 }\n', "unknown option(s) nope"),
    ('perturbation = "reset_teacher"\nt0 = 2\nhorizon = 6\n', "reset_teacher cannot be applied to task digits"),
    ('perturbation = "order_window_swap"\nwindow = 30\n', "crosses the epoch boundary at step 44"),
    ('colour = "red"\n', "unknown key(s) colour"),
    ('t0 = 50\nhorizon = 10\n', "t0 < horizon"),
]


@pytest.mark.parametrize("toml, message", MISTAKES)
def test_user_mistakes_give_one_line_exit_2_and_create_nothing(tmp_path, toml, message):
    (tmp_path / "c.toml").write_text(toml)
    before = sorted(os.listdir(tmp_path))
    rc, out, err = _cli(["run", "c.toml", "--no-progress"], tmp_path)
    assert rc == 2, (out, err)
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path)) == before  # no runs/, no seeds/


def test_cuda_on_a_cpu_only_torch_is_a_clean_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    rc, _, err = _cli(["run", "--device", "cuda", "--no-progress"], tmp_path)
    assert rc == 2 and "sees no CUDA device" in err and len(err.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []


def test_quick_has_its_own_directory_and_runs_are_never_overwritten(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # restored afterwards: later subprocess tests import from the cwd
    # the main job's directory holds a run: --quick must not touch it
    main_dir = tmp_path / "runs" / "digits-reset_momentum"
    assert main(["run", "--out", str(main_dir)] + SMALL) == 0
    card = (main_dir / "card.json").read_bytes()
    assert main(["run", "--quick", "--seeds", "2", "--no-progress"]) == 0
    assert (tmp_path / "runs" / "digits-reset_momentum-quick" / "card.json").is_file()
    assert (main_dir / "card.json").read_bytes() == card
    capsys.readouterr()
    # a different run into the same directory is refused, naming the directory and the ways out
    assert main(["run", "--out", str(main_dir), "--perturbation", "reset_bn_stats"] + SMALL) == 2
    err = capsys.readouterr().err
    assert str(main_dir) in err and "--out" in err and "--force" in err
    assert (main_dir / "card.json").read_bytes() == card
    # a directory with someone else's files is refused too
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    assert main(["run", "--out", str(tmp_path / "mine")] + SMALL) == 2
    # --force replaces the run and leaves no stale seed files
    (main_dir / "seeds" / "seed_7.json").write_text("{}")
    assert main(["run", "--out", str(main_dir), "--perturbation", "reset_bn_stats", "--force"] + SMALL) == 0
    assert sorted(os.listdir(main_dir / "seeds")) == ["seed_0.json", "seed_1.json"]
    assert b"reset_bn_stats" in (main_dir / "card.json").read_bytes()


def test_resume_takes_the_directory_config_and_refuses_conflicting_flags(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert main(["run", "--out", out] + SMALL) == 0
    capsys.readouterr()
    assert main(["run", "--resume", out, "--window", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "window=3" in err and "window=2" in err
    assert main(["run", "--resume", out, "--force", "--no-progress"]) == 2
    assert main(["run", "--resume", str(tmp_path / "none"), "--no-progress"]) == 2
    assert "no run there" in capsys.readouterr().err


def test_every_option_has_help_and_the_readme_lists_every_config_key():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.dest != "help":
                assert action.help, f"memstate {name}: option {action.option_strings or action.dest} has no help"
    readme = open(os.path.join(ROOT, "README.md")).read()
    m = re.search(r"A TOML config takes the keys `([^`]*)`", readme)
    assert m, "README: the TOML key list is missing"
    keys = [k.strip() for k in m.group(1).split(",")]
    assert sorted(keys) == sorted(RUN_DEFAULTS)
    help_text = sub.choices["run"].format_help()
    for k in keys:
        assert k in help_text, k
    flags = {o for a in sub.choices["run"]._actions for o in a.option_strings}
    for k in ("task", "perturbation", "seeds", "t0", "window", "horizon", "device", "estimand", "threads",
              "baseline"):
        assert f"--{k}" in flags


def test_verify_reports_pass_and_skipped(capsys):
    import torch

    assert main(["verify"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^PASS  seed 0: null and A/A arms bitwise identical", out, re.M)
    if not torch.cuda.is_available():
        assert "SKIPPED  CPU == CUDA optimizer steps (no CUDA device visible" in out
    assert out.strip().endswith("verify: PASS")


def test_info_names_the_cpu_a_card_would_record(capsys):
    from memstate import card as cardmod

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    env = cardmod.environment()
    assert f"CPU             {env['cpu']} (torch CPU kernels {env['torch_cpu_capability']};" in out, out
    assert "native build    memstate._C" in out
    assert "Fingerprint     C type (memstate._fingerprint)" in out
    assert "CPU kernel env" not in out or env["cpu_kernel_env"]


def test_info_and_cards_name_the_variables_that_pick_torch_cpu_kernels(capsys, monkeypatch):
    """ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, ... when set are recorded and shown (a stand-in
    variable here: setting the real ones in this process could change its kernels)."""
    from memstate import card as cardmod

    monkeypatch.setattr(cardmod, "CPU_KERNEL_ENV_VARS", ("MEMSTATE_TEST_KERNEL_VAR", "MEMSTATE_TEST_UNSET_VAR"))
    monkeypatch.setenv("MEMSTATE_TEST_KERNEL_VAR", "avx2")
    monkeypatch.delenv("MEMSTATE_TEST_UNSET_VAR", raising=False)
    assert cardmod.environment()["cpu_kernel_env"] == {"MEMSTATE_TEST_KERNEL_VAR": "avx2"}
    assert main(["info"]) == 0
    assert "CPU kernel env  MEMSTATE_TEST_KERNEL_VAR=avx2\n" in capsys.readouterr().out
