"""benchmarks/bench_replay.py's core checks at tiny size: they pass on honest replays and catch a
planted one-ulp divergence (so the benchmark's 100/100 and 1000/1000 cannot be vacuous)."""
import importlib.util
import os

import pytest

from memstate import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_replay", os.path.join(ROOT, "benchmarks", "bench_replay.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_branches_identical_and_planted_divergence_caught(bench):
    r = bench.branches(n=2, after=1)
    assert r["identical"] == 2 and r["first_difference"] is None and r["window"] == 14
    r = bench.branches(n=3, after=1, plant=(2, 5))
    assert r["identical"] == 2
    assert r["first_difference"] == {"branch": 2, "step": bench.T0 + 6}


def test_long_restore_identical_and_planted_divergence_caught(bench):
    r = bench.long_restore(steps=4)
    assert r["identical_steps"] == 4 and r["first_difference_after_step"] is None
    r = bench.long_restore(steps=4, plant_at=bench.T0 + 1)
    assert r["identical_steps"] == 1 and r["first_difference_after_step"] == bench.T0 + 2


def test_kernel_path_is_put_back_and_traces_agree(bench):
    C = _ext.load()
    before = (C.cpu_isa(), C.fingerprint_chunk_bytes(), C.optim_chunk_elems(), _ext.ops)
    ref = bench.large_state_trace(steps=4, width=64)
    with bench.kernel_path("scalar", op_threads=2, small_chunks=True):
        assert C.cpu_isa() == "scalar" and C.optim_chunk_elems() == 8 and _ext.ops is not before[3]
        assert bench.large_state_trace(steps=4, width=64) == ref
    assert (C.cpu_isa(), C.fingerprint_chunk_bytes(), C.optim_chunk_elems(), _ext.ops) == before
    planted = bench.large_state_trace(steps=4, width=64, plant_at=3)  # after the mid-run restore
    assert planted[:3] == ref[:3] and planted[3] != ref[3]


def test_order_primitive_record_is_reproducible_across_processes():
    """What a card records of an order primitive must not depend on the contract's per-process
    registry name (cards of policy_switch / order_window_swap failed `memstate replay` on it)."""
    from memstate import perturb, tasks

    task = tasks.get("digits")
    records = []
    for _ in range(2):  # two states of seed 0: two contracts with different random names
        state = task.build(0)
        state.step = 30
        records.append(perturb.apply_checked("order_window_swap", state).params)
    assert state.contract.name not in records[1]["rng"]
    assert records[0] == records[1]
