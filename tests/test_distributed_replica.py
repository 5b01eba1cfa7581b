"""ReplicaCheck on DDP training loops over 2 and 3 gloo ranks: clean runs report nothing; a
planted one-bit flip in one replica's parameter before step k is reported at step k with the
parameter's name and the ranks that disagree (raise and warn modes, memstate's in-pass
fingerprints and the fingerprint_many fallback for torch.optim; defer=True reports it during
step k + 1, still as step k); every=2 reports at the next
checked step; rng=True names a CPU generator that drifted on one rank; a rank whose set of
tensors differs is reported and the check recovers. Each world size is one spawn of ranks
running every scenario (spawning is the slow part)."""
import warnings

import pytest
import torch

from dist_helper import run_ranks

STEPS = 6
FLIPPED = "0.weight"


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                               torch.nn.Linear(32, 10))


def flip_one_bit(p: torch.Tensor) -> None:
    """One bit of one element of a float32 parameter, in place (a low mantissa bit)."""
    with torch.no_grad():
        p.view(torch.int32).view(-1)[5] ^= 1 << 3


def train(rank, world, *, opt_kind="memstate", flip_at=None, flip_rank=None, on_mismatch="raise", every=1,
          rng=False, drift_rng_at=None, defer=False):
    """A DDP loop with ReplicaCheck; returns what was reported: the exception (raise mode) or
    the warnings (warn mode), as JSON."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import memstate.optim as mo
    from memstate.distributed import ReplicaCheck, ReplicaMismatch

    model = DDP(make_model())
    if opt_kind == "memstate":
        opt = mo.AdamW(model.parameters(), lr=1e-2, fingerprint=True)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    check = ReplicaCheck(model, opt, every=every, on_mismatch=on_mismatch, rng=rng, defer=defer)
    torch.manual_seed(1)  # the same dropout stream on every replica
    data = torch.Generator().manual_seed(100 + rank)  # each replica its own batches
    report = {"raised": None, "warned": []}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for step in range(1, STEPS + 1):
                if step == flip_at and rank == flip_rank:
                    flip_one_bit(dict(model.module.named_parameters())[FLIPPED])
                if step == drift_rng_at and rank == flip_rank:
                    torch.rand(1)  # one extra draw on one rank only
                x = torch.randn(16, 64, generator=data)
                y = torch.randint(0, 10, (16,), generator=data)
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        except ReplicaMismatch as e:
            report["raised"] = {"step": e.step, "message": str(e), "during": step,
                                "mismatches": [[m.name, m.groups, m.majority, m.minority] for m in e.mismatches]}
    report["warned"] = [str(w.message) for w in caught if w.category.__name__ == "ReplicaMismatchWarning"]
    report["checks"], report["history_steps"] = check.checks, [s for s, _ in check.history]
    report["bytes_per_check"] = check.bytes_per_check
    check.remove()
    return report


def layout_change(rank, world):
    """One rank drops a gradient (torch.optim: the current gradients are checked): the explicit
    check reports the differing tensor sets, and the next check, with the gradient back,
    renegotiates and passes."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import memstate.optim as mo
    from memstate.distributed import ReplicaCheck

    # memstate's in-pass fingerprints stay checkable after zero_grad(set_to_none=True)
    model = DDP(make_model())
    opt = mo.AdamW(model.parameters(), lr=1e-2, fingerprint=True)
    check = ReplicaCheck(model, opt)
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    after_zero_grad = len(check.check(7))
    check.remove()

    model = DDP(make_model())
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    check = ReplicaCheck(model, opt, on_mismatch=lambda step, ms: None)
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    p = dict(model.module.named_parameters())["3.bias"]
    grad = p.grad
    if rank == world - 1:
        p.grad = None
    bad = check.check(99)
    p.grad = grad
    return {"bad": [[m.name, m.groups] for m in bad], "after": len(check.check(100)),
            "after_zero_grad": after_zero_grad,
            "history": [s for s, _ in check.history]}


def rank_main(rank, world):
    last = world - 1
    return {
        "clean": train(rank, world),
        "clean_torch_rng": train(rank, world, opt_kind="torch", rng=True),
        "flip": train(rank, world, flip_at=4, flip_rank=last),
        "flip_torch": train(rank, world, opt_kind="torch", flip_at=2, flip_rank=0),
        "flip_defer": train(rank, world, flip_at=4, flip_rank=last, defer=True),
        "clean_defer": train(rank, world, defer=True),
        "flip_warn": train(rank, world, flip_at=3, flip_rank=last, on_mismatch="warn"),
        "flip_every2": train(rank, world, flip_at=3, flip_rank=last, on_mismatch="warn", every=2),
        "rng_drift": train(rank, world, opt_kind="torch", rng=True, drift_rng_at=3, flip_rank=last),
        "layout": layout_change(rank, world),
    }


def minority_of(world, odd_rank):
    """The ranks reported outside the majority: the odd one out, or both ranks of two (no majority)."""
    return [0, 1] if world == 2 else [odd_rank]


@pytest.mark.parametrize("world", [2, 3])
def test_replica_check_ddp(world):
    results = run_ranks(rank_main, world, timeout=150)
    last = world - 1
    for rank, res in enumerate(results):
        # clean runs: nothing reported, every step checked
        for key in ("clean", "clean_torch_rng"):
            assert res[key]["raised"] is None and res[key]["warned"] == [], (rank, key, res[key])
            assert res[key]["checks"] == STEPS and res[key]["history_steps"] == []
        # AdamW: 4 tensors x (param, grad, exp_avg, exp_avg_sq, step) + header, 16 bytes each
        assert res["clean"]["bytes_per_check"] == 16 * (4 * 5 + 1)

        # the flip before step 4 on the last rank is reported at step 4, naming the parameter only
        raised = res["flip"]["raised"]
        assert raised is not None and raised["step"] == 4, (rank, raised)
        assert [m[0] for m in raised["mismatches"]] == [FLIPPED], raised
        name, groups, majority, minority = raised["mismatches"][0]
        assert minority == minority_of(world, last)
        if world == 2:
            assert majority is None and sorted(groups) == [[0], [1]]
            assert f"{FLIPPED} (no majority: rank 0 | rank 1)" in raised["message"]
        else:
            assert majority == [0, 1] and groups == [[0, 1], [2]]
            assert f"{FLIPPED} (rank 2 differs from the majority, ranks 0, 1)" in raised["message"]
        assert raised["message"].startswith(f"ReplicaCheck: step 4: 1 tensor(s) differ across the {world} replicas")

        assert raised["during"] == 4
        # defer=True: step 4's comparison completes in step 5's hook, still reported as step 4
        deferred = res["flip_defer"]["raised"]
        assert deferred["step"] == 4 and deferred["during"] == 5, deferred
        assert [m[0] for m in deferred["mismatches"]] == [FLIPPED]
        assert deferred["message"] == raised["message"]
        assert res["clean_defer"]["raised"] is None and res["clean_defer"]["history_steps"] == []
        assert res["clean_defer"]["checks"] == STEPS

        # torch.optim (fallback fingerprints): flip on rank 0 before step 2
        raised = res["flip_torch"]["raised"]
        assert raised["step"] == 2 and [m[0] for m in raised["mismatches"]] == [FLIPPED], raised
        assert raised["mismatches"][0][3] == minority_of(world, 0)

        # warn mode: reported at the flip's step and at every later step (the replicas stay apart)
        warned = res["flip_warn"]
        assert warned["raised"] is None and warned["checks"] == STEPS
        assert warned["history_steps"] == [3, 4, 5, 6]
        assert len(warned["warned"]) == 4 and warned["warned"][0].startswith("ReplicaCheck: step 3:")
        assert FLIPPED in warned["warned"][0]

        # every=2: checked at steps 2, 4, 6; the flip before step 3 is seen at step 4
        assert res["flip_every2"]["checks"] == STEPS // 2
        assert res["flip_every2"]["history_steps"] == [4, 6]

        # rng=True: an extra draw on the last rank before step 3 is named at step 3, nothing else
        raised = res["rng_drift"]["raised"]
        assert raised["step"] == 3 and [m[0] for m in raised["mismatches"]] == ["rng.torch.cpu"], raised
        assert raised["mismatches"][0][3] == minority_of(world, last)

        layout = res["layout"]
        assert len(layout["bad"]) == 1 and layout["bad"][0][0].startswith("<the set of tensors checked")
        # SGD without momentum: param and grad of 4 parameters, one grad missing on the last rank
        assert f"rank {last}: 7" in layout["bad"][0][0] and "rank 0: 8" in layout["bad"][0][0]
        assert layout["after"] == 0 and layout["history"] == [99] and layout["after_zero_grad"] == 0
        assert res == results[0]  # every rank gathered the same data, so reports the same


def test_replica_check_needs_a_process_group():
    import memstate.optim as mo
    from memstate.distributed import ReplicaCheck

    model = make_model()
    opt = mo.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="initialised process group"):
        ReplicaCheck(model, opt)
    with pytest.raises(ValueError, match="every must be an int >= 1"):
        ReplicaCheck(model, opt, every=0)
    with pytest.raises(ValueError, match="on_mismatch must be"):
        ReplicaCheck(model, opt, on_mismatch="log")


def _cuda_rank_main(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    import memstate.optim as mo
    from dist_helper import cuda_group
    from memstate.distributed import ReplicaCheck

    group, device = cuda_group(rank)
    model = DDP(make_model().to(device), process_group=group,
                device_ids=[device.index] if group is not None else None)
    opt = mo.AdamW(model.parameters(), lr=1e-2, fingerprint=True)
    check = ReplicaCheck(model, opt, group=group, on_mismatch="warn", rng=True)
    torch.manual_seed(1)
    torch.cuda.manual_seed(1)
    data = torch.Generator().manual_seed(100 + rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, STEPS + 1):
            if step == 3 and rank == 1:
                flip_one_bit(dict(model.module.named_parameters())[FLIPPED])
            x = torch.randn(16, 64, generator=data).to(device)
            y = torch.randint(0, 10, (16,), generator=data).to(device)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return {"history": [[s, [m.name for m in ms]] for s, ms in check.history],
            "warned": sum(w.category.__name__ == "ReplicaMismatchWarning" for w in caught)}


@pytest.mark.cuda
def test_replica_check_cuda():
    """CUDA DDP (NCCL with 2 GPUs, else gloo on one GPU), in-pass fingerprints from the CUDA
    AdamW kernel, the CUDA generator compared too: the flip before step 3 is seen at steps 3-6."""
    for res in run_ranks(_cuda_rank_main, 2, timeout=150):
        assert res["history"] == [[s, [FLIPPED]] for s in range(3, STEPS + 1)], res
        assert res["warned"] == STEPS - 2
