"""Branch-and-hold runner, protocol cards, replay and the CLI, on the quick built-in tasks."""
import json
import os

import pytest

from memstate import card as cardmod
from memstate.cli import main
from memstate.experiment import ConfigError, Experiment

QUICK = dict(t0=4, horizon=12, seeds=2)


@pytest.fixture(scope="module")
def momentum_run(tmp_path_factory):
    exp = Experiment("digits", "reset_momentum", window=4, **QUICK)
    out = str(tmp_path_factory.mktemp("run"))
    result = exp.run(out_dir=out)
    return exp, result, out


def test_aa_arm_is_bitwise_identical_and_hold_window_matches(momentum_run):
    exp, result, _ = momentum_run
    assert result.aa_identical is True
    for r in result.records:
        c, t, aa = r["arms"]["control"], r["arms"]["treatment"], r["arms"]["aa"]
        assert c["digests"] == aa["digests"] and c["losses"] == aa["losses"]
        assert c["window_hash"] == t["window_hash"] == aa["window_hash"]  # same batch ids in the window
        assert c["rng_window_hash"] == aa["rng_window_hash"]
        assert r["contract_violations"] == []
        # the perturbation changed exactly the declared source, and it made a difference
        changed = t["perturbation"][0]["changed"]
        assert changed and all(n.endswith("momentum_buffer") for n in changed)
        assert c["checkpoint_digests"]["t0"] != t["checkpoint_digests"]["t0"]
        assert c["digests"][-1] != t["digests"][-1]
        assert max(r["divergence"]["param_l2"]) > 0


def test_ate_fields(momentum_run):
    _, result, _ = momentum_run
    assert set(result.ate) == {"accuracy", "loss", "ece"}
    a = result.ate["loss"]
    diffs = [r["arms"]["treatment"]["metrics"]["loss"] - r["arms"]["control"]["metrics"]["loss"] for r in result.records]
    assert a.n == 2 and a.differences == pytest.approx(diffs)
    assert "ATE" in result.table()


def test_card_replays_and_tampering_is_detected(momentum_run, tmp_path):
    exp, result, _ = momentum_run
    card = cardmod.make_card(result)
    path = str(tmp_path / "card.json")
    cardmod.write_card(card, path)
    assert cardmod.replay(cardmod.read_card(path)) is None
    # a tampered card: checksum mismatch
    raw = json.load(open(path))
    raw["config"]["t0"] = 3
    json.dump(raw, open(path, "w"))
    with pytest.raises(cardmod.CardError, match="checksum"):
        cardmod.read_card(path)
    # a recorded fingerprint that does not match what the re-run computes
    bad = json.loads(json.dumps(card))
    bad["seeds"][1]["arms"]["treatment"]["digests"][5] = "0" * 32
    problem = cardmod.replay(bad)
    assert problem.startswith("seed 1, arm treatment, step 5")
    bad = json.loads(json.dumps(card))
    name = sorted(bad["seeds"][0]["arms"]["control"]["checkpoints"]["end"])[0]
    bad["seeds"][0]["arms"]["control"]["checkpoints"]["end"][name]["fingerprint"] = "0" * 32
    assert f"seed 0, arm control, checkpoint end: tensor(s) {name}" in cardmod.replay(bad)


@pytest.mark.parametrize("kw, match", [
    (dict(task="nope"), "unknown task 'nope'; valid: digits"),
    (dict(perturbation="nope"), "unknown perturbation 'nope'; valid: null"),
    (dict(t0=12), "t0 < horizon"),
    (dict(window=20), "must be >= 1 and end by the horizon"),
    (dict(seeds=1), "at least 2 seeds"),
    (dict(metrics=["f1"]), "unknown metric"),
])
def test_invalid_configuration_fails_before_training(kw, match):
    args = dict(task="digits", perturbation="reset_momentum", **QUICK)
    args.update(kw)
    task, pert = args.pop("task"), args.pop("perturbation")
    with pytest.raises(ConfigError, match=match):
        Experiment(task, pert, **args)


def test_order_primitive_changes_only_the_window(tmp_path):
    exp = Experiment("digits", "reverse_window", window=4, **QUICK)
    result = exp.run()
    for r in result.records:
        c, t = r["arms"]["control"], r["arms"]["treatment"]
        assert c["window_hash"] != t["window_hash"]  # different batch order by design
        assert c["checkpoint_digests"]["t0"] == t["checkpoint_digests"]["t0"]  # no state changed at t0
        assert t["perturbation"][0]["changed"] == ["sampler.window"]


def test_cli_run_resume_report_replay(tmp_path, capsys):
    out = str(tmp_path / "run")
    cfg = tmp_path / "exp.toml"
    cfg.write_text('task = "digits"\nperturbation = "reset_adam"\nt0 = 4\nhorizon = 10\nseeds = 2\nwindow = 3\n'
                   'task_options = { optimizer = "adamw" }\n')
    assert main(["run", str(cfg), "--out", out, "--no-progress"]) == 0
    for f in ("card.json", "results.csv", "report.html", "ate_forest.png", "loss.png", "divergence.png", "aa_timeline.png"):
        assert os.path.isfile(os.path.join(out, f)), f
    text = capsys.readouterr().out
    assert "ATE" in text and "A/A check: bitwise identical" in text
    # resume reuses the finished seeds on disk
    mtimes = {f: os.path.getmtime(os.path.join(out, "seeds", f)) for f in os.listdir(os.path.join(out, "seeds"))}
    assert main(["run", str(cfg), "--resume", out, "--no-progress"]) == 0
    assert {f: os.path.getmtime(os.path.join(out, "seeds", f)) for f in mtimes} == mtimes
    os.remove(os.path.join(out, "report.html"))
    assert main(["report", os.path.join(out, "card.json")]) == 0
    assert os.path.isfile(os.path.join(out, "report.html"))
    assert main(["replay", os.path.join(out, "card.json"), "--no-progress"]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('task = "digits"\nt0 = 50\nhorizon = 10\n')
    assert main(["run", str(bad), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "t0 < horizon" in capsys.readouterr().err


def test_cli_verify():
    assert main(["verify"]) == 0


def test_factorial_design_reports_main_effects_and_interaction():
    exp = Experiment("digits", "reset_momentum+reverse_window", window=4, **QUICK)
    result = exp.run()
    assert set(result.effects) == {"main reset_momentum", "main reverse_window",
                                   "interaction reset_momentum x reverse_window"}
    m = "loss"
    v = {arm: [r["arms"][arm]["metrics"][m] for r in result.records] for arm in ("control", "A", "B", "AB")}
    inter = [(ab - b) - (a - c) for c, a, b, ab in zip(v["control"], v["A"], v["B"], v["AB"])]
    main_a = [((a - c) + (ab - b)) / 2 for c, a, b, ab in zip(v["control"], v["A"], v["B"], v["AB"])]
    assert result.effects["interaction reset_momentum x reverse_window"][m].differences == pytest.approx(inter)
    assert result.effects["main reset_momentum"][m].differences == pytest.approx(main_a)
    assert result.aa_identical and not result.violations
    for r in result.records:  # AB applied both: momentum changed at t0 and the window reordered
        assert [p["primitive"] for p in r["arms"]["AB"]["perturbation"]] == ["reset_momentum", "reverse_window"]
        assert r["arms"]["AB"]["window_hash"] == r["arms"]["B"]["window_hash"] != r["arms"]["control"]["window_hash"]
    card = cardmod.make_card(result)
    assert cardmod.replay(json.loads(json.dumps(card))) is None


def test_order_estimand_is_rr_minus_wr():
    exp = Experiment("digits", "policy_switch", t0=0, horizon=8, seeds=2, estimand="order", aa_check=False)
    assert exp.window == 8
    result = exp.run()
    (effect,) = result.effects
    assert effect == "order (rr - wr)"
    a = result.effects[effect]["loss"]
    want = [r["arms"]["control"]["metrics"]["loss"] - r["arms"]["treatment"]["metrics"]["loss"] for r in result.records]
    assert a.differences == pytest.approx(want)
    with pytest.raises(ConfigError, match="order estimand"):
        Experiment("digits", "reset_momentum", t0=0, horizon=8, seeds=2, estimand="order")
