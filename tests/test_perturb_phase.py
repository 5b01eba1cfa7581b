"""Phase boundaries (issue 13 item 2): digits phases='split', t0='boundary', reset_all, and the
digits CARRY vs RESET experiment from the CLI with early, every-K and final effects (ECE too)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from memstate import perturb as P
from memstate import tasks
from memstate.experiment import ConfigError, Experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _trained(task, steps, seed=0):
    s = task.build(seed)
    for t in range(steps):
        task.train_step(s, t)
    return s


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_reset_all_zeroes_optimizer_state_and_bn_stats_only(optimizer):
    task = tasks.get("digits", optimizer=optimizer)
    s = _trained(task, 3)
    params = [p.detach().clone() for p in s.model.parameters()]
    before = s.fingerprint()
    applied = P.apply_checked("reset_all", s)  # single-source check: only what it declares changed
    for st in s.optimizer.state.values():
        for k, v in st.items():
            assert (float(v.abs().sum()) if isinstance(v, torch.Tensor) else v) == 0, k
    bns = [m for m in s.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert all(float(m.running_mean.abs().sum()) == 0 and bool((m.running_var == 1).all())
               and int(m.num_batches_tracked) == 0 for m in bns)
    assert all(torch.equal(a, b) for a, b in zip(params, s.model.parameters()))
    changed = set(applied.changed)
    assert any(n.startswith("optimizer.state.") for n in changed)
    assert any(n.endswith("running_mean") for n in changed)
    assert not any(n.startswith(("model.", "optimizer.")) and not (n.startswith("optimizer.state.") or
                   n.endswith(("running_mean", "running_var", "num_batches_tracked"))) for n in changed)
    assert before.digest != s.fingerprint().digest
    assert P.get("reset_all").estimand().text == "ATE_phase = E[M(carry) - M(reset_all)]"
    if optimizer == "adamw":
        assert all(float(st["step"]) == 0 for st in s.optimizer.state.values())


def test_digits_split_phases_batches_head_and_metrics():
    task = tasks.get("digits", phases="split", boundary=5, horizon=12, head="fresh")
    assert task.phases == [("pretrain", 0, 5), ("finetune", 5, 12)] and task.boundaries() == [5]
    assert task.metrics == ("accuracy", "loss", "ece", "pretrain_accuracy")
    s = _trained(task, 5)
    for step, classes in ((0, {0, 1, 2, 3, 4}), (4, {0, 1, 2, 3, 4}), (5, {5, 6, 7, 8, 9}), (11, {5, 6, 7, 8, 9})):
        _, y = task._batch(s, step)
        assert 0 < y.numel() < 64 and set(y.tolist()) <= classes
    _, y_probe = task.probe_set()
    assert set(y_probe.tolist()) == {5, 6, 7, 8, 9}
    w = s.model.classifier.weight.detach().clone()
    s2 = _trained(task, 5, seed=0)
    task.train_step(s, 5)
    task.train_step(s2, 5)
    assert torch.equal(s.model.classifier.weight, s2.model.classifier.weight)  # the fresh head is seeded
    same = tasks.get("digits", phases="split", boundary=5, horizon=12, head="same")
    s3 = _trained(same, 5)
    assert torch.equal(s3.model.classifier.weight, w)  # fresh and same agree before the boundary
    same.train_step(s3, 5)
    assert not torch.equal(s3.model.classifier.weight, s.model.classifier.weight)
    m = task.evaluate(s)
    assert set(m) == set(task.metrics) and 0.0 <= m["ece"] <= 1.0
    with pytest.raises(ValueError, match="boundary"):
        tasks.get("digits", phases="split", boundary=100, horizon=100)


def test_t0_boundary():
    exp = Experiment("digits", "reset_all", t0="boundary", horizon=40, seeds=2,
                     task_options={"phases": "split", "boundary": 12, "horizon": 40})
    assert exp.t0 == 12 and exp.config()["t0"] == 12
    with pytest.raises(ConfigError, match="declares no phases"):
        Experiment("digits", "reset_all", t0="boundary", horizon=40, seeds=2)


def test_cli_digits_phase_split_carry_vs_reset(tmp_path):
    (tmp_path / "phase.toml").write_text(
        'perturbation = "reset_all"\nt0 = "boundary"\nhorizon = 30\nseeds = 2\nprobe_every = 5\n'
        'baseline = "none"\ntask_options = { phases = "split", boundary = 10, horizon = 30, head = "fresh" }\n')
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-m", "memstate", "run", "phase.toml", "--out", "run", "--no-progress"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "ATE_phase = E[M(carry) - M(reset_all)]" in p.stdout
    assert "early probe" in p.stdout and "final probe" in p.stdout
    card = json.loads((tmp_path / "run" / "card.json").read_text())
    assert card["config"]["t0"] == 10
    r = card["seeds"][0]
    assert r["probe_points"] == {"early": 24, "final": 30}  # window: 2 half-lives of momentum 0.9 = 14
    assert sorted(map(int, r["arms"]["treatment"]["probes"])) == [15, 20, 24, 25, 30]
    for point in ("early", "final"):
        rows = card["results"]["tables"][point]["rows"]
        assert set(rows) == {"accuracy", "loss", "ece", "pretrain_accuracy"}
    assert r["arms"]["control"]["label"] == "carry" and r["arms"]["treatment"]["label"] == "reset_all"
    assert r["aa"]["identical"] and not r["contract_violations"]
