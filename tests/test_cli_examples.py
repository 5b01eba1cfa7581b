"""Every examples/*.toml loads and preflights through the CLI's own configuration path (the
first seed trained to t0 and every primitive and window checked) without running it."""
import glob
import os
import tomllib

import pytest

from memstate import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "examples", "*.toml")))

EXPECTED = {
    "momentum_reset.toml": "ATE_opt = E[M(carry) - M(reset_momentum)]",
    "momentum_reset_beta099.toml": "ATE_opt = E[M(carry) - M(reset_momentum)]",
    "reset_adam_adamw.toml": "ATE_opt = E[M(carry) - M(reset_adam)]",
    "order_rr_vs_wr.toml": "ATE_order = E[M(rr) - M(wr)]",
    "order_window_swap.toml": "ATE_order = E[M(carry) - M(order_window_swap)]",
    "phase_boundary.toml": "ATE_phase = E[M(carry) - M(reset_all)]",
    "factorial_momentum_order.toml": None,
    "commute_pair.toml": "ATE_path = E[M(carry) - M(commute_pair)]",
}


def test_examples_present():
    assert sorted(os.path.basename(c) for c in CONFIGS) == sorted(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_example_config_preflights(path, tmp_path):
    args = cli.build_parser().parse_args(["run", path, "--out", str(tmp_path / "out"), "--no-progress"])
    cfg, exp, out = cli._prepare_run(args)  # loads, validates and preflights; creates nothing
    assert not os.path.exists(out)
    with open(path, "rb") as f:
        toml = tomllib.load(f)
    assert len(exp.seeds) == toml["seeds"] >= 8 and exp.horizon == toml["horizon"]
    text = EXPECTED[os.path.basename(path)]
    if text is None:
        assert exp.factorial and set(exp.arms) == {"control", "A", "B", "AB"}
    else:
        assert [e.text for e in exp.estimands.values()] == [text]
