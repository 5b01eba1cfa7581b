"""Seeds across ranks: ``memstate run`` and ``memstate replay`` under torchrun.

    torchrun --nproc-per-node N -m memstate run CONFIG.toml     # or: memstate run CONFIG.toml --nproc N
    torchrun --nproc-per-node N -m memstate replay card.json    # or: memstate replay card.json --nproc N

``--nproc N`` starts torch's elastic launcher (``torch.distributed.run``, i.e. torchrun
``--standalone --nproc-per-node N``) in the calling process and returns rank 0's exit code.
Multi-node runs use torchrun itself (``--nnodes``, ``--rdzv-endpoint``). Each rank writes its
seed files where it runs and rank 0 also writes every gathered record into its own ``seeds/``,
so the card is complete without a shared file system; ``--resume`` needs the run directory on
every node (a shared file system).

Seed assignment: the seeds still to run, in the configuration's order, are dealt round-robin,
the j-th to rank ``j % WORLD_SIZE`` (``assign``). In a fresh run that is seed index i -> rank
i % world; on ``--resume`` rank 0 first reads the finished seed files and only the rest are
dealt, over whatever world size the resumed launch has.

What is communicated, over a gloo group (also on GPU nodes: the messages are small CPU JSON
objects, so no NCCL communicator is created for them; training itself communicates nothing,
the seeds are independent): rank 0 broadcasts the list of seeds still to run; each rank sends
rank 0 its finished records as JSON text (the bytes its seed files hold) or its error; rank 0
broadcasts the outcome. Rank 0 then writes the one card, results.csv and report exactly as a
single process would: its records are the JSON of the seed files in configuration order,
which is what a single-process run writes and resumes from. Replay splits the card's seeds
the same way; each rank compares its seeds with the card and sends rank 0 its first mismatch
(or its records, for the statistics check), and rank 0 reports the mismatch of the earliest
seed, the one a single-process replay reports.

Exit status: rank 0 prints the outcome and exits 0, 1 or 2 as a single process does; the other
ranks exit 0 once the outcome is settled, so ``--nproc`` returns rank 0's code and torchrun
(which exits 1 when any rank exits non-zero) succeeds exactly when rank 0 does. A rank that dies
makes torchrun's agent stop the others; the seeds finished by then stay on disk.

On GPUs each rank trains on ``cuda:LOCAL_RANK`` (``rank_device``), whatever CUDA device the
configuration names; the card records the configured device.
"""
from __future__ import annotations

import datetime
import gc
import json
import os
import traceback
from typing import Any, List, Optional, Sequence

__all__ = ["launched", "rank_device", "assign", "Session", "RankFailed", "run_experiment", "replay",
           "launch", "check_nproc", "TIMEOUT"]

#: Timeout of memstate's gloo group. Rank 0 waits in the gather for the slowest rank's seeds,
#: which can take hours; a rank that dies is noticed by torchrun's agent, which stops the rest.
TIMEOUT = datetime.timedelta(days=7)


def launched() -> bool:
    """True in a process started by torchrun (or another launcher that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank_device(device: str) -> str:
    """The device this process trains on for a configured ``device``: under torchrun a CUDA
    device is ``cuda:LOCAL_RANK`` (each rank its own GPU); otherwise ``device`` itself."""
    if launched() and device.startswith("cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def assign(seeds: Sequence[int], rank: int, world: int) -> List[int]:
    """The seeds of ``rank`` among ``world`` ranks: the j-th of ``seeds`` goes to rank j % world."""
    return list(seeds)[rank::world]


def check_nproc(nproc: int) -> Optional[str]:
    """None if ``--nproc nproc`` may be given here; else why not. Under torchrun it must agree
    with the launch (LOCAL_WORLD_SIZE processes on this node), so the workers that
    ``--nproc`` started, which see the same flag, run instead of launching again."""
    if not launched():
        return None
    here = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    if here != nproc:
        return (f"--nproc {nproc} starts torchrun, but this process already runs under a launcher with "
                f"{here} process(es) per node; give one of them")
    return None


class RankFailed(RuntimeError):
    """A rank raised while running or replaying its seeds (the message holds its traceback)."""


class Session:
    """This process's place in a torchrun launch and the gloo group memstate coordinates over
    (a context manager; the group is created from torchrun's environment, env://, and
    destroyed on exit unless it existed before). On a CUDA machine the current device is set
    to ``cuda:LOCAL_RANK``."""

    def __init__(self):
        import torch
        import torch.distributed as dist

        self.rank = int(os.environ["RANK"])
        self.world = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available() and self.local_rank < torch.cuda.device_count():
            torch.cuda.set_device(self.local_rank)
        self._owned = not dist.is_initialized()
        if self._owned:
            dist.init_process_group("gloo", timeout=TIMEOUT)
            self.group = None
        else:  # a group made by someone else (perhaps NCCL): memstate's messages go over a gloo one
            self.group = dist.new_group(backend="gloo", timeout=TIMEOUT)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        import torch.distributed as dist

        if self._owned and dist.is_initialized():
            dist.destroy_process_group()
            # Objects in reference cycles may still hold the group; collecting them now runs its
            # destructor, which joins gloo's worker threads while the interpreter is alive. A
            # worker left running into interpreter exit can abort the process (SIGABRT) when it
            # drops the last reference to a finished collective's tensor and needs the GIL.
            gc.collect()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def gather(self, obj) -> Optional[list]:
        """Every rank's ``obj``, by rank, on rank 0; None on the others."""
        import torch.distributed as dist

        out = [None] * self.world if self.main else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def all_gather(self, obj) -> list:
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj``, on every rank."""
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.group)

    def first_error(self, error: Optional[str]) -> Optional[str]:
        """The first (by rank) of every rank's ``error``, on every rank: a check that may fail on
        some ranks only ends with the same answer everywhere instead of a rank left waiting."""
        return next((e for e in self.all_gather(error) if e), None)

    def say(self, text: str) -> None:
        """One line on stdout, prefixed with the rank, written in one call: ranks share the pipe, and
        print() under torchrun's unbuffered ``python -u`` writes the text and the newline apart."""
        import sys

        sys.stdout.write(f"[rank {self.rank}/{self.world}] {text}\n")
        sys.stdout.flush()


def _failure(session: Session, what: str) -> str:
    return f"rank {session.rank} of {session.world} failed {what}:\n{traceback.format_exc().rstrip()}"


def environment_mismatch(session: Session, here: dict) -> Optional[str]:
    """None when every rank's ``here`` (memstate.experiment.replay_environment) is rank 0's;
    otherwise "rank R runs in another environment than rank 0 (what differs)" for the first
    rank that does not, the same on every rank."""
    from memstate.card import RESUME_ENVIRONMENT, environment_differences

    envs = session.all_gather(json.dumps(here, sort_keys=True))
    for r, text in enumerate(envs):
        diff = environment_differences(json.loads(text), here=json.loads(envs[0]), source=f"rank {r}",
                                       here_name="rank 0", keys=RESUME_ENVIRONMENT)
        if diff:
            return f"rank {r} runs in another environment than rank 0 ({'; '.join(diff)})"
    return None


def run_experiment(exp, out_dir: str, resume: bool, session: Session):
    """``exp.run(out_dir, resume)`` with the seeds split across the ranks (module docstring).

    Every rank writes its own seeds' files as they finish. Returns the ExperimentResult on rank
    0 (records in configuration order, as a single-process run has them) and None on the
    others. Raises, on every rank: ConfigError when a finished seed file belongs to another
    configuration (resume), RankFailed when a rank raised while running its seeds."""
    from memstate.experiment import SEED_ENVIRONMENT, ConfigError, ExperimentResult, _atomic_json, replay_environment

    # one card, one environment: every rank must compute its seeds where rank 0 does (nodes of
    # another CPU kind or torch build would mix results no single machine can replay)
    here = replay_environment()
    mixed = environment_mismatch(session, here)
    if mixed:
        raise ConfigError(f"{mixed}; one card cannot mix them: launch every rank on the same machine kind")
    done, plan = {}, None
    if session.main:
        try:
            for seed in exp.seeds if resume else ():
                rec = exp.finished_seed(out_dir, seed)
                if rec is not None:
                    done[seed] = rec
            plan = {"pending": [s for s in exp.seeds if s not in done]}
        except ConfigError as e:
            plan = {"error": str(e)}
    plan = session.broadcast(plan)
    if "error" in plan:
        raise ConfigError(plan["error"])
    mine = assign(plan["pending"], session.rank, session.world)
    session.say(f"seeds {mine} on {exp.build_device}" + (f" ({len(done)} finished seed(s) reused)" if done else ""))
    try:
        status = {"records": [json.dumps(r, allow_nan=False) for r in exp.run_seeds(mine, out_dir)]}
    except Exception:  # noqa: BLE001 - reported by rank 0 and raised on every rank below
        status = {"error": _failure(session, f"on its seeds {mine}")}
    statuses = session.gather(status)
    verdict = None
    if session.main:
        verdict = "\n".join(s["error"] for s in statuses if "error" in s) or None
    verdict = session.broadcast(verdict)
    if verdict:
        raise RankFailed(verdict)
    if not session.main:
        return None
    for s in statuses:
        for text in s["records"]:
            rec = json.loads(text)
            done[rec["seed"]] = rec
            if not os.path.isfile(exp.seed_file(out_dir, rec["seed"])):  # another node's file system
                _atomic_json(exp.seed_file(out_dir, rec["seed"]), dict(rec, **{SEED_ENVIRONMENT: here}))
    return ExperimentResult(exp.config(), [done[s] for s in exp.seeds])


def replay(card: dict, session: Session, seeds: Optional[Sequence[int]] = None,
           allow_changed_task: bool = False) -> Optional[str]:
    """``memstate.card.replay`` with the seeds split across the ranks: the first mismatch (that of
    the earliest seed in the replayed order, as a single process reports it), or None, on every
    rank. ``seeds``: replay only these (of the card's seeds; the statistics check is then
    skipped). A rank that raises is reported as the mismatch, with its traceback."""
    from memstate.card import compare_seed, replay_experiment, statistics_mismatch
    from memstate.experiment import replay_environment

    mixed = environment_mismatch(session, replay_environment())
    if mixed:  # a mismatch found on another machine kind would say nothing about the card
        return f"{mixed}: replay every seed on one machine kind"
    exp = replay_experiment(card, allow_changed_task=allow_changed_task)
    recorded = {r["seed"]: r for r in card["seeds"]}
    chosen = list(exp.seeds) if seeds is None else list(seeds)
    mine = assign(chosen, session.rank, session.world)
    session.say(f"replays seeds {mine}")
    status: dict = {"problem": None, "records": []}
    seed = None
    try:
        for seed in mine:
            rec = exp.run_seed(seed)
            problem = compare_seed(recorded[seed], rec, exp.t0)
            if problem:
                status["problem"] = (chosen.index(seed), problem)
                break
            status["records"].append(json.dumps(rec, allow_nan=False))
    except Exception:  # noqa: BLE001 - a rank that crashes fails the replay, with its traceback
        status["problem"] = (chosen.index(seed) if seed is not None else -1, _failure(session, f"on seed {seed}"))
    statuses = session.gather(status)
    verdict = None
    if session.main:
        problems = sorted(tuple(s["problem"]) for s in statuses if s["problem"])
        if problems:
            verdict = problems[0][1]
        elif seeds is None:
            fresh = {}
            for s in statuses:
                for text in s["records"]:
                    rec = json.loads(text)
                    fresh[rec["seed"]] = rec
            verdict = statistics_mismatch(card, exp, [fresh[s] for s in chosen])
    return session.broadcast(verdict)


def launch(argv: Sequence[str], nproc: int) -> Optional[int]:
    """Runs ``python -m memstate ARGV`` as ``nproc`` ranks on this machine under torch's elastic
    launcher (what ``torchrun --standalone --nproc-per-node NPROC -m memstate ARGV`` does) and
    returns rank 0's exit code, or None if rank 0 did not exit by itself (another rank failed
    first and the launcher stopped the rest); 128 + the signal's number when this process is
    interrupted (Ctrl-C: 130), after the launcher has stopped the ranks. The workers see
    ``--nproc`` in ARGV too: ``check_nproc`` accepts it there, since they run under a launch of
    that size."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "memstate"])
    args.training_script_args = list(argv)  # set, not parsed: torchrun's parser would take --nproc as its own
    try:
        run(args)
    except ChildFailedError as e:
        rank0: Any = e.failures.get(0)
        return rank0.exitcode if rank0 is not None and rank0.exitcode > 0 else None
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0
