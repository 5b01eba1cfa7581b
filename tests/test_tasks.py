"""Built-in training tasks: they build, learn, are bitwise deterministic and pure in (state, step),
replay after a snapshot restore, honour sampler overrides and teacher freezes, evaluate without
side effects on a fixed probe set, and give the perturbation primitives their state to act on."""
import gc
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import memstate.tasks as tasks
from memstate import Snapshot, fingerprint_state
from memstate import perturb as P
from memstate.perturb import TrainState

CONFIGS = [("digits", {}), ("digits", {"optimizer": "adamw", "arch": "mlp"}), ("teacher", {}), ("ema_queue", {})]
IDS = ["digits-sgd-cnn", "digits-adamw-mlp", "teacher", "ema_queue"]


@pytest.fixture(autouse=True)
def _one_thread(threads):
    threads(1)  # bitwise comparisons need one thread count; 1 is also fastest on a shared 2-core box


def _digest(state: TrainState) -> str:
    """Digest of every tensor of the state (model, optimizer, extras), without the sampler
    (whose state_dict carries the contract's per-build unique name)."""
    tree = {"model": state.model, "optimizer": state.optimizer}
    extra = {k: v for k, v in state.extra.items() if isinstance(v, (torch.Tensor, torch.nn.Module))}
    if extra:
        tree["extra"] = extra
    return fingerprint_state(tree).digest


def _run(task, state, start, stop):
    return [task.train_step(state, t) for t in range(start, stop)]


# ----------------------------------------------------------------------------------- registry
def test_names_and_errors_list_valid_choices():
    assert tasks.names() == ("digits", "teacher", "ema_queue")
    with pytest.raises(ValueError) as e:
        tasks.get("cifar")
    for n in tasks.names():
        assert n in str(e.value)
    with pytest.raises(ValueError) as e:
        tasks.get("digits", optimiser="sgd")
    msg = str(e.value)
    assert "optimiser" in msg and "optimizer" in msg and "batch_size" in msg and "policy" in msg
    with pytest.raises(ValueError, match="queue_size"):
        tasks.get("digits", queue_size=4)  # an ema_queue option is not a digits option
    for bad in ({"optimizer": "rmsprop"}, {"policy": "zigzag"}, {"batch_size": 0}, {"lr": -1.0},
                {"noise": float("nan")}, {"horizon": 1.5}, {"arch": "resnet"}, {"ema_decay": 1.0}):
        with pytest.raises(ValueError):
            tasks.get("digits", **bad)
    with pytest.raises(ValueError):
        tasks.get("ema_queue", teacher_decay=0.0)


def test_declared_metrics_options_and_defaults():
    d = tasks.get("digits")
    assert d.metrics == ("accuracy", "loss", "ece")
    assert d.higher_is_better == {"accuracy": True, "loss": False, "ece": False}
    assert d.options["lr"] == 0.05 and d.options["momentum"] == 0.9 and d.options["batch_size"] == 64
    assert d.options["policy"] == "rr" and 60 <= d.horizon <= 100
    a = tasks.get("digits", optimizer="adamw")
    assert 1e-3 <= a.options["lr"] <= 3e-3
    st = tasks.get("digits", optimizer="adamw", betas=(0.9, 0.99)).build(0)
    assert st.optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    assert P.get("reset_adam").default_window(st) == P.windows_for_halflives(0.99)
    with pytest.raises(ValueError, match="betas"):
        tasks.get("digits", betas=(0.9, 1.0))
    t = tasks.get("teacher")
    assert t.metrics == ("loss", "r2") and t.higher_is_better == {"loss": False, "r2": True}
    q = tasks.get("ema_queue")
    assert q.metrics[:3] == ("accuracy", "loss", "ece")
    assert all(q.higher_is_better[m] == m.endswith("accuracy") for m in q.metrics)
    assert tasks.get("digits", ema_decay=0.9).metrics[3:] == ("ema_accuracy", "ema_loss", "ema_ece")
    card = q.to_json()
    assert card["task"] == "ema_queue" and card["options"]["queue_size"] == 256


# ----------------------------------------------------------------------------------- build
@pytest.mark.parametrize("name,opts", CONFIGS, ids=IDS)
def test_build_is_a_complete_state_at_step_zero(name, opts):
    task = tasks.get(name, **opts)
    rng_before = torch.get_rng_state()
    s = task.build(3)
    assert torch.equal(torch.get_rng_state(), rng_before), "build must not move the global RNG"
    assert isinstance(s, TrainState) and s.step == 0 and s.model.training
    assert s.contract.root_seed == 3 and s.sampler.contract is s.contract
    assert s.sampler.policy == task.options["policy"] and s.sampler.batch_size == task.options["batch_size"]
    assert ("init", ()) in s.contract.log
    src = task.snapshot_sources(s)
    assert set(src) == {"model", "optimizer", "sampler", "extra"}
    assert all(isinstance(v, (torch.Tensor, torch.nn.Module)) for v in src["extra"].values())


def test_ema_queue_extras():
    task = tasks.get("ema_queue")
    s = task.build(0)
    e = s.extra
    assert e["queue"].shape == (256, task.options["embed_dim"]) and e["queue"].dtype == torch.float32
    assert e["queue_ptr"].dim() == 0 and e["queue_ptr"].dtype == torch.int64 and int(e["queue_ptr"]) == 0
    assert e["teacher_decay"].dim() == 0 and e["teacher_decay"].is_floating_point()
    assert float(e["teacher_decay"]) == task.options["teacher_decay"]
    assert not P.teacher_frozen(s)
    # the teacher starts as an exact copy of the student and has the same named tensors
    assert fingerprint_state(e["teacher"]) == fingerprint_state(s.model)
    assert not any(p.requires_grad for p in e["teacher"].parameters())


def test_contract_names_are_unique_and_can_be_given():
    task = tasks.get("teacher")
    a, b = task.build(0), task.build(0)
    assert a.contract.name != b.contract.name and a.contract.name.startswith("teacher/seed0/")
    c = task.build(0, name="teacher/custom")
    assert c.contract.name == "teacher/custom"


# ----------------------------------------------------------------------------------- learning
@pytest.mark.parametrize("name,opts", CONFIGS, ids=IDS)
def test_trains_and_learns(name, opts):
    task = tasks.get(name, **opts)
    s = task.build(0)
    before = task.evaluate(s)
    losses = _run(task, s, 0, 20)
    assert s.step == 20 and all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])
    after = task.evaluate(s)
    assert set(after) == set(task.metrics) and all(math.isfinite(v) for v in after.values())
    if "accuracy" in task.metrics:
        assert after["accuracy"] > 0.5 > before["accuracy"]  # chance is 0.1
        assert 0.0 <= after["ece"] <= 1.0
    else:
        assert after["r2"] > 0.3 and after["loss"] < before["loss"]


# ----------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("name,opts", CONFIGS, ids=IDS)
def test_same_seed_bitwise_identical_different_seed_differs(name, opts):
    task = tasks.get(name, **opts)
    a, b, c = task.build(5), task.build(5), task.build(6)
    assert _digest(a) == _digest(b) != _digest(c)
    la, lb, lc = _run(task, a, 0, 8), _run(task, b, 0, 8), _run(task, c, 0, 8)
    assert la == lb and la != lc
    assert _digest(a) == _digest(b) != _digest(c)
    assert a.sampler.window_hash(0, 8) == b.sampler.window_hash(0, 8) != c.sampler.window_hash(0, 8)
    assert a.contract.log == b.contract.log
    assert a.contract.log_hash() == b.contract.log_hash() != c.contract.log_hash()
    # a second Task object with the same options is the same task
    d = tasks.get(name, **opts).build(5)
    assert _run(task, d, 0, 8) == la and _digest(d) == _digest(a)


@pytest.mark.parametrize("name,opts", CONFIGS, ids=IDS)
def test_train_step_is_pure_and_leaves_global_rng_alone(name, opts):
    task = tasks.get(name, **opts)
    s = task.build(1)
    _run(task, s, 0, 3)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    task.train_step(s, 3)
    assert torch.equal(torch.get_rng_state(), before), "train_step drew from the global RNG"
    # the global RNG state does not influence a step either
    x, y = task.build(1), task.build(1)
    _run(task, x, 0, 3)
    _run(task, y, 0, 3)
    torch.manual_seed(1)
    lx = task.train_step(x, 3)
    torch.manual_seed(2)
    ly = task.train_step(y, 3)
    assert lx == ly and _digest(x) == _digest(y)
    # the step of the state is irrelevant: only the `step` argument addresses the batch
    assert x.step == 4
    with pytest.raises(ValueError):
        task.train_step(x, -1)
    with pytest.raises(TypeError):
        task.train_step(x, 2.0)


@pytest.mark.parametrize("name,opts", CONFIGS, ids=IDS)
def test_snapshot_restore_replays_bitwise(name, opts):
    task = tasks.get(name, **opts)
    s = task.build(2)
    _run(task, s, 0, 6)
    gc.collect()  # snapshots hold every live contract; let dead ones go before capturing
    snap = Snapshot.capture(**task.snapshot_sources(s))
    d0, log0 = _digest(s), s.contract.log_hash()
    first = _run(task, s, 6, 11)
    d1, ev1 = _digest(s), task.evaluate(s)
    assert d1 != d0
    snap.restore()
    s.step = 6
    assert _digest(s) == d0 and s.contract.log_hash() == log0
    assert _run(task, s, 6, 11) == first
    assert _digest(s) == d1 and task.evaluate(s) == ev1


# ----------------------------------------------------------------------------------- sampler
@pytest.mark.parametrize("name,opts", CONFIGS[:1] + CONFIGS[2:], ids=IDS[:1] + IDS[2:])
def test_train_step_uses_sampler_batch_with_overrides(name, opts):
    task = tasks.get(name, **opts)
    a, b, c = task.build(4), task.build(4), task.build(4)
    for s in (a, b, c):
        _run(task, s, 0, 3)
    ids = a.sampler.batch(3)
    other = a.sampler.batch(3 + a.sampler.batches_per_epoch)  # a different batch of the same size
    assert ids != other
    b.sampler.override_window(3, [ids])  # the same ids: no change
    c.sampler.override_window(3, [other])
    la, lb, lc = (task.train_step(s, 3) for s in (a, b, c))
    assert la == lb and _digest(a) == _digest(b)
    assert la != lc and _digest(a) != _digest(c)


def test_order_primitive_changes_training_only_in_its_window():
    task = tasks.get("digits")
    a, b = task.build(8), task.build(8)
    _run(task, a, 0, 4)
    _run(task, b, 0, 4)
    applied = P.apply_checked("commute_pair", b)
    assert applied.changed == ["sampler.window"]
    assert b.sampler.batch(4) == a.sampler.batch(5) and b.sampler.batch(5) == a.sampler.batch(4)
    _run(task, a, 4, 6)
    _run(task, b, 4, 6)
    assert _digest(a) != _digest(b)  # non-commutative updates (SEED.md S3)


# ----------------------------------------------------------------------------------- teacher/queue
def test_teacher_frozen_is_honoured_and_queue_still_advances():
    task = tasks.get("ema_queue")
    s = task.build(0)
    _run(task, s, 0, 3)
    teacher, queue, ptr = s.extra["teacher"], s.extra["queue"], s.extra["queue_ptr"]
    ids = [id(queue), id(ptr), id(s.extra["teacher_frozen"])] + [id(t) for t in teacher.parameters()]
    applied = P.apply_checked("freeze_teacher", s)
    assert applied.changed == ["extra.teacher_frozen"] and P.teacher_frozen(s)
    t_before, q_before = fingerprint_state(teacher), queue.clone()
    m_before, p_before = fingerprint_state(s.model), int(ptr)
    bs = len(s.sampler.batch(3))
    task.train_step(s, 3)
    assert fingerprint_state(teacher) == t_before, "teacher updated while frozen"
    assert fingerprint_state(s.model) != m_before
    assert not torch.equal(queue, q_before) and int(ptr) == (p_before + bs) % queue.shape[0]
    applied.finish(s)
    assert not P.teacher_frozen(s)
    task.train_step(s, 4)
    assert fingerprint_state(teacher) != t_before
    assert ids == [id(queue), id(ptr), id(s.extra["teacher_frozen"])] + [id(t) for t in teacher.parameters()]


def test_queue_is_a_fifo_of_teacher_keys():
    task = tasks.get("ema_queue", queue_size=100)  # not a multiple of the batch size: wraps mid-batch
    s = task.build(0)
    total = 0
    for t in range(5):
        total += len(s.sampler.batch(t))
        task.train_step(s, t)
        assert int(s.extra["queue_ptr"]) == total % 100
    q = s.extra["queue"]
    assert torch.allclose(q.norm(dim=1), torch.ones(100), atol=1e-5)  # rows are normalised keys
    # the last batch's keys are the teacher embeddings of its noisy view, written at ptr - b ...
    b = len(s.sampler.batch(4))
    rows = (torch.arange(b) + (total - b)) % 100
    assert rows.numel() == b and not torch.equal(q[rows], torch.zeros_like(q[rows]))


def test_teacher_ema_update_matches_formula():
    task = tasks.get("ema_queue", teacher_decay=0.9)
    s = task.build(0)
    _run(task, s, 0, 2)
    t0 = {n: v.clone() for n, v in s.extra["teacher"].state_dict().items()}
    task.train_step(s, 2)
    m = s.model.state_dict()
    for n, v in s.extra["teacher"].state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, t0[n].lerp(m[n], 0.1), atol=1e-6), n
        else:
            assert torch.equal(v, m[n]), n


def test_primitives_apply_to_task_states():
    q = tasks.get("ema_queue").build(0)
    tasks.get("ema_queue").train_step(q, 0)
    for name in ("null", "reset_momentum", "order_window_swap", "reverse_window", "policy_switch", "commute_pair",
                 "reset_bn_stats", "freeze_bn_stats", "flush_queue", "shuffle_queue", "reset_teacher",
                 "freeze_teacher"):
        applied = P.apply_checked(name, q)
        applied.finish(q)
    # default windows from the task's decays: teacher 0.95 -> 28 steps, queue 256/64 -> 4 steps
    assert P.get("reset_teacher").default_window(q) == 28
    assert P.get("flush_queue").default_window(q) == 4
    d = tasks.get("digits", ema_decay=0.9)
    s = d.build(0)
    d.train_step(s, 0)
    applied = P.apply_checked("reset_ema", s)
    assert applied.changed and all(n.startswith("extra.ema.") for n in applied.changed)
    assert applied.window[1] == P.windows_for_halflives(0.9)
    a = tasks.get("digits", optimizer="adamw").build(0)
    tasks.get("digits", optimizer="adamw").train_step(a, 0)
    assert P.apply_checked("reset_adam", a).changed


def test_ema_shadow_metrics():
    task = tasks.get("digits", ema_decay=0.8)
    s = task.build(0)
    _run(task, s, 0, 15)
    ev = task.evaluate(s)
    assert set(ev) == set(task.metrics) and ev["ema_accuracy"] > 0.3
    assert ev["ema_loss"] != ev["loss"]


# ----------------------------------------------------------------------------------- evaluate
@pytest.mark.parametrize("name,opts", CONFIGS, ids=IDS)
def test_evaluate_and_predictions_change_nothing(name, opts):
    task = tasks.get(name, **opts)
    s = task.build(0)
    _run(task, s, 0, 3)
    torch.manual_seed(7)
    rng, log, full = torch.get_rng_state(), s.contract.log, s.fingerprint().digest
    flags = [m.training for m in s.model.modules()]
    ev = task.evaluate(s)
    pred = task.predictions(s)
    assert s.fingerprint().digest == full and s.contract.log == log
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in s.model.modules()] == flags and s.step == 3
    assert tuple(ev) == task.metrics and all(isinstance(v, float) for v in ev.values())
    assert task.evaluate(s) == ev and torch.equal(task.predictions(s), pred)
    n_probe = task.probe_set()[0].shape[0]
    assert pred.shape[0] == n_probe and pred.device.type == "cpu"
    if "accuracy" in task.metrics:
        assert pred.dtype == torch.int64
        y = task.probe_set()[1]
        assert ev["accuracy"] == pytest.approx((pred == y).double().mean().item())
    else:
        assert pred.dtype == torch.float32 and pred.dim() == 1
    # evaluate in eval mode: the same model in train mode gives different probe outputs
    if "accuracy" not in task.metrics:
        x, y = task.probe_set()
        with torch.no_grad():
            train_out = s.model(x).squeeze(1)
        assert not torch.equal(train_out, pred)


def test_probe_set_is_fixed_and_disjoint_from_train():
    d1 = tasks.get("digits")
    torch.manual_seed(0)
    np.random.seed(0)
    x1, y1 = d1.probe_set()
    assert x1.shape == (397, 1, 8, 8) and y1.shape == (397,)
    tasks._DIGITS_CACHE.clear()  # rebuild the split from scratch under another global RNG state
    torch.manual_seed(99)
    np.random.seed(99)
    x2, y2 = tasks.get("ema_queue", optimizer="adamw").probe_set()
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    data = tasks._digits_cpu()
    tr, pr = set(data["train_index"].tolist()), set(data["probe_index"].tolist())
    assert len(tr) == 1400 and len(pr) == 397 and not tr & pr
    assert set(y1.tolist()) == set(range(10))
    t1 = tasks.get("teacher").probe_set()
    tasks._TEACHER_CACHE.clear()
    t2 = tasks.get("teacher", optimizer="adamw").probe_set()
    assert torch.equal(t1[0], t2[0]) and torch.equal(t1[1], t2[1]) and t1[0].shape == (512, 16)
    # the probe set of a seed's state is the same for every seed: same metrics for the same weights
    task = tasks.get("digits")
    a, b = task.build(0), task.build(1)
    with torch.no_grad():
        for pa, pb in zip(a.model.state_dict().values(), b.model.state_dict().values()):
            pb.copy_(pa)
    assert task.evaluate(a) == task.evaluate(b)


def test_expected_calibration_error_reference():
    logits = torch.log(torch.tensor([[0.95, 0.05], [0.55, 0.45], [0.3, 0.7], [0.15, 0.85], [0.5, 0.5]], dtype=torch.float64))
    labels = torch.tensor([0, 1, 1, 0, 0])
    # confidences 0.95 (bin 9, right), 0.55 (bin 5, wrong), 0.7 (bin 6, right), 0.85 (bin 8, wrong),
    # 0.5 (bin 4: (0.4, 0.5], predicted class 0, right)
    want = (abs(1 - 0.95) + abs(0 - 0.55) + abs(1 - 0.7) + abs(0 - 0.85) + abs(1 - 0.5)) / 5
    assert tasks.expected_calibration_error(logits, labels) == pytest.approx(want, abs=1e-12)
    # two examples in one bin: |mean acc - mean conf|, weighted by the bin's share
    logits = torch.log(torch.tensor([[0.91, 0.09], [0.99, 0.01]], dtype=torch.float64))
    assert tasks.expected_calibration_error(logits, torch.tensor([0, 1])) == pytest.approx(abs(0.5 - 0.95))


def test_a_dropped_state_releases_its_contract_without_the_cycle_collector():
    """Snapshots record every live contract and restore() needs them all alive: a dropped state
    must free its contract at once, also the first state of a fresh process (torch's lazy import
    on the first optimizer construction must not trap the caller's frames in a cycle)."""
    code = textwrap.dedent("""
        import gc
        gc.disable()
        import torch
        torch.set_num_threads(1)
        import memstate.tasks as tasks
        from memstate import rng
        task = tasks.get("teacher")
        def run():
            s = task.build(0)
            for t in range(2):
                task.train_step(s, t)
            task.evaluate(s)
            task.predictions(s)
            return s.contract.name
        for _ in range(2):
            name = run()
            assert name not in rng.active_names(), rng.active_names()
        print("ok")
    """)
    env = dict(os.environ, MEMSTATE_SKIP_STALE_CHECK="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
