"""benchmarks/bench_overhead.py compares like with like: every case trains the same arm, the
audited cases bitwise as the unaudited memstate one (auditing changes nothing), the plain
torch.optim anchor within torch.optim's documented tolerance; the arm's trail records every step."""
import importlib.util
import os

import torch

import memstate
from memstate import audit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_overhead_cases_train_the_same_arm(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_overhead", os.path.join(ROOT, "benchmarks", "bench_overhead.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.T0 = 3  # branch early: the test is about what is trained, not how long
    runners = {c: bench._arm_runner("cpu", c, str(tmp_path), 2) for c in bench.CASES}  # alive together
    digests, params = {}, {}
    for case, (run, task, state) in runners.items():
        run()
        digests[case] = memstate.fingerprint_state({"model": state.model}).digest
        params[case] = torch.cat([p.detach().reshape(-1) for p in state.model.parameters()])
        assert state.step == bench.T0 + 2
    assert len({digests[c] for c in bench.CASES if c != "plain"}) == 1
    assert isinstance(runners["plain"][2].optimizer, torch.optim.SGD)
    assert not isinstance(runners["plain"][2].optimizer, memstate.optim.SGD)
    torch.testing.assert_close(params["plain"], params["arm"], rtol=1e-5, atol=1e-6)
    with audit.TrailReader(os.path.join(str(tmp_path), "cpu-arm.trail")) as r:
        assert len(r.steps()) == 2
