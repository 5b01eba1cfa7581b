"""``auto()`` for user scripts and ``verify_script``: run a script twice, diff the trails."""
from __future__ import annotations

import argparse
import atexit
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

from memstate.audit.diff import TrailDiff, diff
from memstate.audit.trail import NullTrail, Trail, TrailError

__all__ = ["ENV_TRAIL", "ENV_STEPS", "auto", "VerifyResult", "verify_script", "main_verify_script"]

ENV_TRAIL = "MEMSTATE_TRAIL"  # path of the trail auto() writes
ENV_STEPS = "MEMSTATE_TRAIL_STEPS"  # record steps 0..N-1 only, then exit the script (status 0)


class _AutoTrail(Trail):
    """A Trail that, with ``stop_after``, closes itself and ends the process once the last
    requested step is recorded (so ``verify --steps N`` need not wait for a long script)."""

    stop_after: Optional[int] = None

    def record(self, step: int, **kw) -> bool:
        done = super().record(step, **kw)
        if self.stop_after is not None and step >= self.stop_after - 1:
            self.close()
            sys.stdout.flush()
            sys.stderr.flush()
            raise SystemExit(0)
        return done


def auto(model: Any = None, optimizer: Any = None, **kwargs) -> Any:
    """The trail requested by the environment: a ``Trail`` at ``$MEMSTATE_TRAIL`` (replacing
    any file there), or a no-op recorder with the same methods when the variable is unset.

    With ``$MEMSTATE_TRAIL_STEPS=N`` only steps below N are recorded and the process exits
    (status 0) right after step N-1 is recorded. Keyword arguments go to ``Trail``. The trail
    is closed at interpreter exit if the script does not close it."""
    path = os.environ.get(ENV_TRAIL)
    if not path:
        return NullTrail()
    steps = os.environ.get(ENV_STEPS)
    max_steps = None
    if steps:
        try:
            max_steps = int(steps)
        except ValueError:
            raise ValueError(f"${ENV_STEPS} must be a positive int, got {steps!r}") from None
        if max_steps < 1:
            raise ValueError(f"${ENV_STEPS} must be a positive int, got {steps!r}")
    trail = _AutoTrail(path, model, optimizer, overwrite=True, max_steps=max_steps, **kwargs)
    trail.stop_after = max_steps
    atexit.register(trail.close)
    return trail


@dataclass
class VerifyResult:
    """``passed``: both runs finished and their trails are identical. ``diff`` is None when a
    run failed or a trail was unreadable (``error`` says which). ``hints`` are likely causes
    of a divergence; ``unchecked`` the causes that could not be checked."""

    passed: bool
    trails: List[str]
    returncodes: List[int]
    diff: Optional[TrailDiff] = None
    error: Optional[str] = None
    hints: List[str] = field(default_factory=list)
    unchecked: List[str] = field(default_factory=list)

    def report(self) -> str:
        if self.error:
            return f"ERROR: {self.error}"
        if self.passed:
            return "\n".join([f"PASS: two runs agree bit for bit on {self.diff.steps_compared} recorded steps "
                              f"({self.trails[0]}, {self.trails[1]})"] + [f"  note: {n}" for n in self.diff.notes])
        lines = ["FAIL: the two runs diverge", self.diff.summary()]
        lines += [f"  hint: {h}" for h in self.hints]
        lines += [f"  not checked: {u}" for u in self.unchecked]
        lines.append(f"  trails kept: {self.trails[0]} {self.trails[1]} (memstate diff them, --plot for a picture)")
        return "\n".join(lines)


def _hints(d: TrailDiff) -> (List[str], List[str]):
    hints, unchecked = [], []
    h = d.header_a
    det = h.get("determinism") or {}
    last = h.get("determinism_last_commit") or det
    if not (det.get("deterministic_algorithms") or last.get("deterministic_algorithms")):
        hints.append("torch.use_deterministic_algorithms(True) was off: nondeterministic kernels were allowed")
    cuda = "cuda" in str(h.get("device"))
    if cuda and not det.get("CUBLAS_WORKSPACE_CONFIG"):
        hints.append("CUBLAS_WORKSPACE_CONFIG was unset on CUDA: set it to :4096:8 for deterministic cuBLAS")
    if cuda and det.get("cudnn_benchmark"):
        hints.append("torch.backends.cudnn.benchmark was on: cuDNN may pick different algorithms per run")
    loader = h.get("dataloader")
    if loader is None:
        unchecked.append("DataLoader workers and generator (pass dataloader= to the trail to check them)")
    else:
        if loader.get("num_workers", 0) > 0 and not loader.get("generator") and not loader.get("worker_init_fn"):
            hints.append(f"the DataLoader has {loader['num_workers']} workers but no seeded generator= "
                         f"or worker_init_fn: worker RNG seeds differ per run")
        if loader.get("sampler") == "RandomSampler" and not (loader.get("generator") or loader.get("sampler_generator")):
            hints.append("the DataLoader shuffles without a seeded generator=: data order depends on the global RNG")
    if "batch_ids" in d.input_differences:
        hints.append("the batch ids differed: data order is not fixed (seed the sampler / DataLoader generator)")
    start = d.fractions[0][0] if d.fractions else None
    unseeded = [x for x in d.input_differences if x.startswith("rng.") and d.input_first_steps.get(x) == start]
    drifted = [x for x in d.input_differences if x.startswith("rng.") and x not in unseeded]
    if unseeded:
        hints.append(f"{', '.join(unseeded)} differed from the first recorded step: that global RNG was not seeded "
                     f"(harmless if the script never draws from it)")
    if drifted:
        hints.append(f"{', '.join(drifted)} began to differ during the run: a different number of draws "
                     f"(timing- or data-dependent randomness) or a reseed")
    significant = [x for x in d.input_differences if x not in unseeded]
    if any(x.startswith("contract ") for x in d.input_differences):
        hints.append("an RngContract consumption log differed: the runs drew different random streams")
    if d.first_step is not None and d.first_tensors:
        kinds = {t.split(" ", 1)[0] for t in d.first_tensors}
        if not significant and "grad" in kinds:
            hints.append(f"the inputs that matter agreed but gradients differed at step {d.first_step}: the forward/backward pass "
                         f"was not deterministic ({d.first_tensors[0]} first): a nondeterministic kernel, "
                         f"uninitialised memory, or a value read from time or OS entropy")
        elif "grad" not in kinds and kinds & {"optim", "param"}:
            hints.append("gradients agreed but optimizer state or parameters differed: the optimizer step is not "
                         "deterministic (memstate.optim's fused optimizers are)")
        steps = [s for s, _ in d.fractions]
        if steps and d.first_step == steps[0] and "param" in kinds and "grad" not in kinds:
            hints.append("parameters differed at the first recorded step: initialisation may be unseeded")
    return hints, unchecked


def verify_script(script: str, steps: Optional[int] = None, args: Sequence[str] = (),
                  python: str = sys.executable, *, out_dir: Optional[str] = None,
                  timeout: Optional[float] = None, env: Optional[dict] = None) -> VerifyResult:
    """Runs ``python script *args`` twice in fresh processes, each recording a trail through
    ``memstate.audit.auto()`` (``$MEMSTATE_TRAIL``; ``steps`` sets ``$MEMSTATE_TRAIL_STEPS``),
    and diffs the two trails. The trails are kept in ``out_dir`` (default: a new temporary
    directory). ``timeout``: seconds per run."""
    if not os.path.isfile(script):
        raise FileNotFoundError(f"script {script!r} does not exist")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be None or an int >= 1, got {steps!r}")
    out_dir = out_dir or tempfile.mkdtemp(prefix="memstate-verify-")
    os.makedirs(out_dir, exist_ok=True)
    trails = [os.path.join(out_dir, f"run{i}.trail") for i in (1, 2)]
    codes, errors = [], []
    for i, trail in enumerate(trails):
        run_env = dict(os.environ if env is None else env)
        run_env[ENV_TRAIL] = trail
        run_env.pop(ENV_STEPS, None)
        if steps is not None:
            run_env[ENV_STEPS] = str(steps)
        try:
            proc = subprocess.run([python, script, *args], env=run_env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            codes.append(-1)
            errors.append(f"run {i + 1} of {script} timed out after {timeout} s")
            continue
        codes.append(proc.returncode)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
            errors.append(f"run {i + 1} of {script} exited with status {proc.returncode}: {tail[0]}")
        elif not os.path.exists(trail):
            errors.append(f"run {i + 1} of {script} wrote no trail: does it call memstate.audit.auto() "
                          f"(or use a memstate integration callback)?")
    if errors:
        return VerifyResult(False, trails, codes, error="; ".join(errors))
    try:
        d = diff(*trails)
    except TrailError as e:
        return VerifyResult(False, trails, codes, error=str(e))
    if d.steps_compared == 0:
        return VerifyResult(False, trails, codes, diff=d, error=f"{script} recorded no steps: call trail.record(step) "
                                                                 f"after each optimizer step")
    hints, unchecked = ([], []) if d.identical else _hints(d)
    return VerifyResult(d.identical, trails, codes, diff=d, hints=hints, unchecked=unchecked)


def main_verify_script(argv: Optional[Sequence[str]] = None) -> int:
    """``memstate verify --script train.py [--steps N] [-- args...]``: exit 0 PASS,
    1 divergence, 2 a run failed or a trail was unreadable."""
    argv = list(sys.argv[1:] if argv is None else argv)
    script_args: List[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, script_args = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(prog="memstate verify", description="Run a training script twice and "
                                     "check that it replays bit for bit.")
    parser.add_argument("--script", required=True)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", default=None, help="directory for the two trails (default: a temporary one)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per run")
    args = parser.parse_args(argv)
    try:
        result = verify_script(args.script, args.steps, script_args, out_dir=args.out, timeout=args.timeout)
    except (FileNotFoundError, ValueError) as e:
        print(f"memstate verify: {e}", file=sys.stderr)
        return 2
    print(result.report())
    if result.error:
        return 2
    return 0 if result.passed else 1
