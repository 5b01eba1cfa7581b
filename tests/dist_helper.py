"""Runs a function on N gloo ranks in fresh processes (torch.multiprocessing, CPU), for the
distributed tests. Each rank's return value comes back through a JSON file, so results must be
JSON-serialisable; an exception on any rank fails the call with that rank's traceback."""
import gc
import json
import os
import socket
import tempfile
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import torch

    torch.set_num_threads(1)
    path = os.path.join(out_dir, f"rank{rank}.json")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        try:
            result = {"ok": fn(rank, world, *args)}
        finally:
            dist.destroy_process_group()
            # Objects in reference cycles (a DDP model, a snapshot, an exception's traceback) can
            # still hold the group; collected here, its destructor joins gloo's worker threads
            # while the interpreter is alive. Left to interpreter exit, a worker thread that drops
            # the last reference to a finished collective's tensor must take the GIL during
            # finalisation and the rank dies of SIGABRT ("terminate called without an active
            # exception") after its work is done and reported.
            gc.collect()
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        result = {"error": traceback.format_exc()}
    with open(path, "w") as f:
        json.dump(result, f)


def run_ranks(fn, world: int, *args, timeout: float = 120.0):
    """``fn(rank, world, *args)`` on ``world`` gloo ranks; the list of their return values.
    ``fn`` must be a module-level function (it is pickled into spawned processes)."""
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_worker, args=(world, free_port(), out_dir, fn, args), nprocs=world,
                                 join=False, start_method="spawn")
        import time

        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"{world} ranks of {fn.__name__} did not finish in {timeout} s")
        results = []
        for r in range(world):
            with open(os.path.join(out_dir, f"rank{r}.json")) as f:
                res = json.load(f)
            if "error" in res:
                raise RuntimeError(f"rank {r} of {fn.__name__} failed:\n{res['error']}")
            results.append(res["ok"])
        return results


def cuda_group(rank: int):
    """(group, device) for a CUDA variant of a test running under run_ranks: an NCCL group over
    all ranks with one GPU each when there are enough GPUs, else the gloo default group (None)
    with every rank on cuda:0 (the CUDA kernels are exercised, the transport is gloo)."""
    import torch

    world = dist.get_world_size()
    if torch.cuda.device_count() >= world:
        torch.cuda.set_device(rank)
        return dist.new_group(backend="nccl"), torch.device("cuda", rank)
    return None, torch.device("cuda", 0)
