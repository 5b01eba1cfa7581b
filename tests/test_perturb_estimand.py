"""Estimand declarations of the perturbation primitives (SEED.md 6.1): names by source, arm
labels, the sign convention control - treatment (memory kept minus memory perturbed)."""
import dataclasses
import json

import pytest
import torch

from memstate import perturb as P
from memstate.data import OrderSampler
from memstate.perturb import Estimand, PerturbationError, TrainState

EXPECTED_NAME = {"S1": "ATE_opt", "S2": "ATE_order", "S3": "ATE_path", "S4": "ATE_aux", "S5": "ATE_teacher",
                 "none": "null"}


def test_estimand_text_json_round_trip_and_frozen():
    e = Estimand("ATE_opt", "carry", "reset_momentum")
    assert e.text == "ATE_opt = E[M(carry) - M(reset_momentum)]"
    rec = e.to_json()
    assert rec == {"name": "ATE_opt", "control": "carry", "treatment": "reset_momentum",
                   "text": "ATE_opt = E[M(carry) - M(reset_momentum)]"}
    assert Estimand.from_json(json.loads(json.dumps(rec))) == e
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.name = "x"


@pytest.mark.parametrize("bad, match", [
    ({"name": "ATE_opt", "control": "carry"}, "missing key.*treatment"),
    ({"name": "ATE_opt", "control": "carry", "treatment": "r", "sign": 1}, "unknown key.*sign"),
    ({"name": "ATE_opt", "control": "carry", "treatment": "r", "text": "ATE_opt = E[M(r) - M(carry)]"},
     "does not match"),
    ({"name": "ATE_opt", "control": "", "treatment": "r"}, "control"),
    ({"name": "ATE_opt", "control": "a", "treatment": "a"}, "both labelled 'a'"),
    (["ATE_opt"], "JSON object"),
])
def test_estimand_from_json_rejects_bad_records(bad, match):
    with pytest.raises(ValueError, match=match):
        Estimand.from_json(bad)


def test_every_primitive_declares_its_source_estimand():
    for name in P.names():
        prim = P.get(name)
        e = prim.estimand({})
        assert isinstance(e, Estimand)
        # reset_all resets S1 and S4 together at a phase boundary: its own estimand ATE_phase
        assert e.name == ("ATE_phase" if name == "reset_all" else EXPECTED_NAME[prim.source]), name
        assert prim.to_json()["estimand"] == e.to_json()
        if name == "policy_switch":
            continue
        assert e.treatment == name
        assert e.control == ("control" if name == "null" else "carry")


def test_seed_examples_verbatim():
    # SEED.md 6.1: ATE_opt = E_s[M(CARRY) - M(RESET)], ATE_order = E_s[M(RR) - M(WR)]
    assert P.get("reset_momentum").estimand({}).text == "ATE_opt = E[M(carry) - M(reset_momentum)]"
    assert P.get("policy_switch").estimand({}).text == "ATE_order = E[M(rr) - M(wr)]"
    assert P.get("policy_switch").estimand({"to": "wr"}).text == "ATE_order = E[M(rr) - M(wr)]"


def test_policy_switch_labels_follow_policies():
    ps = P.get("policy_switch")
    wr = TrainState(sampler=OrderSampler(20, 4, policy="wr"))
    so = TrainState(sampler=OrderSampler(20, 4, policy="so"))
    assert (ps.estimand({}, wr).control, ps.estimand({}, wr).treatment) == ("wr", "rr")
    assert (ps.estimand({}, so).control, ps.estimand({}, so).treatment) == ("so", "wr")
    assert (ps.estimand({"to": "rr"}, so).control, ps.estimand({"to": "rr"}, so).treatment) == ("so", "rr")
    # control unknown, switching to rr: not labelled rr (it cannot be), but "carry"
    assert ps.estimand({"to": "rr"}).text == "ATE_order = E[M(carry) - M(rr)]"
    # a recorded "from" wins over a guess
    assert ps.estimand({"to": "rr", "from": "wr"}).text == "ATE_order = E[M(wr) - M(rr)]"
    with pytest.raises(PerturbationError, match="to='sgd'"):
        ps.estimand({"to": "sgd"})
    with pytest.raises(PerturbationError, match="already uses policy 'wr'"):
        ps.estimand({"to": "wr"}, wr)


def test_estimand_rejects_unknown_params_and_accepts_recorded_ones():
    with pytest.raises(PerturbationError, match=r"reset_momentum: unknown parameter\(s\) alpha"):
        P.get("reset_momentum").estimand({"alpha": 0.5})
    with pytest.raises(PerturbationError, match="must be a mapping"):
        P.get("reset_momentum").estimand(["alpha"])
    # scale_state's REQUIRED alpha is not needed to name the estimand
    assert P.get("scale_state").estimand({}).text == "ATE_opt = E[M(carry) - M(scale_state)]"


def test_applied_records_the_estimand():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    st = TrainState(model=model, optimizer=opt, sampler=OrderSampler(20, 4, policy="rr"), step=3)
    a = P.apply_checked("reset_momentum", st)
    assert a.estimand == Estimand("ATE_opt", "carry", "reset_momentum")
    assert a.to_json()["estimand"]["text"] == "ATE_opt = E[M(carry) - M(reset_momentum)]"
    b = P.apply_checked("policy_switch", st, seed=1)
    assert b.estimand.text == "ATE_order = E[M(rr) - M(wr)]"
    # the recorded parameters give the same estimand back
    assert P.get("policy_switch").estimand(b.params) == b.estimand
    json.dumps(b.to_json())
