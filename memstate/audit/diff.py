"""Comparing two trails: where two runs of the same training first part."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from memstate.audit.trail import ABSENT, KINDS, StepRow, TrailError, TrailReader

__all__ = ["TrailDiff", "diff", "main_diff"]

_KIND_RANK = {k: i for i, k in enumerate(KINDS)}


@dataclass
class TrailDiff:
    """The result of ``diff(a, b)``.

    - ``identical``: same steps, same tensors, every fingerprint, loss and batch-id hash equal
      (RNG digests and contract logs that differ while all of these agree changed nothing the
      trail covers: they are listed in ``notes`` but do not make the runs differ);
    - ``first_step``: the first common step at which a tensor fingerprint or the loss differs
      (None if none does);
    - ``first_tensors``: the tensors differing at ``first_step`` as ``"kind name"``, ordered
      grad -> optim (optimizer state) -> param -> buffer -> extra, then by index, so the cause
      shows before its consequences;
    - ``inputs_differ``: whether an input already differed at ``first_step``;
      ``input_differences`` says which (``batch_ids``, ``rng.torch``, ``rng.numpy``,
      ``rng.python``, ``rng.cuda``, ``contract NAME``); ``input_first_steps`` maps every input
      that ever differs to the first common step at which it does (an RNG differing from the
      first step on was not seeded; harmless if never drawn from);
    - ``first_input_step``: the first common step at which any input differs;
    - ``steps_compared``: the number of common steps; ``fractions``: (step, fraction of the
      tensors present in both at that step whose fingerprints differ), per common step;
    - ``loss_a``/``loss_b``: the losses at ``first_step``;
    - ``notes``: differences in shape of the comparison (tensor sets, steps, settings).
    """

    a: str
    b: str
    identical: bool
    first_step: Optional[int]
    first_tensors: List[str]
    inputs_differ: bool
    input_differences: List[str]
    first_input_step: Optional[int]
    steps_compared: int
    fractions: List[Tuple[int, float]]
    input_first_steps: Dict[str, int] = field(default_factory=dict)
    loss_a: Optional[float] = None
    loss_b: Optional[float] = None
    notes: List[str] = field(default_factory=list)
    header_a: Dict[str, Any] = field(default_factory=dict, repr=False)
    header_b: Dict[str, Any] = field(default_factory=dict, repr=False)

    def machine_differences(self) -> List[str]:
        """The header keys (MACHINE_KEYS) in which the two trails' machines or builds differ; keys
        a trail does not record (trails written before they were) are not compared."""
        return [k for k in MACHINE_KEYS
                if k in self.header_a and k in self.header_b and self.header_a[k] != self.header_b[k]]

    def summary(self) -> str:
        """A few lines for humans."""
        lines = []
        if self.identical:
            lines.append(f"identical: {self.steps_compared} steps compared, every fingerprint, loss and batch equal")
        elif self.first_step is not None:
            lines.append(f"first divergence at step {self.first_step} ({self.steps_compared} common steps compared)")
            shown = self.first_tensors[:10]
            more = len(self.first_tensors) - len(shown)
            lines.append("  tensors that differed first (cause before consequence): " + ", ".join(shown)
                         + (f" and {more} more" if more > 0 else ""))
            if self.loss_a != self.loss_b:
                lines.append(f"  loss: {self.loss_a!r} vs {self.loss_b!r}")
            if self.inputs_differ:
                lines.append("  inputs already differed at that step: " + ", ".join(
                    f"{x} (since step {self.input_first_steps[x]})" for x in self.input_differences))
            else:
                lines.append("  inputs (batch ids, RNG states, contract logs) were identical at that step")
                machine = self.machine_differences()
                if machine:
                    lines.append(f"  the trails come from different machines or builds ({', '.join(machine)} differ, "
                                 "see the notes): torch's kernels give other bits there, so this divergence says "
                                 "nothing about the code")
        elif self.first_input_step is not None:
            lines.append(f"tensors agree on all {self.steps_compared} common steps, but inputs differ from step "
                         f"{self.first_input_step}: " + ", ".join(self.input_differences))
        else:
            lines.append(f"the {self.steps_compared} common steps agree, but the trails are not comparable in full")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _inputs(ra: StepRow, rb: StepRow) -> List[str]:
    out = []
    if ra.batch_hash != rb.batch_hash:
        out.append("batch_ids")
    out += [f"rng.{k}" for k in ("torch", "cuda", "numpy", "python") if ra.rng.get(k) != rb.rng.get(k)]
    for name in sorted(set(ra.contracts) | set(rb.contracts)):
        if ra.contracts.get(name) != rb.contracts.get(name):
            out.append(f"contract {name}")
    return out


#: Header keys naming the machine and build a trail was recorded on: torch's kernels give other
#: bits on another CPU kind or capability, another GPU or torch build (the thread count is a
#: determinism setting, noted with those).
MACHINE_KEYS = ("torch_version", "cpu", "torch_cpu_capability", "cpu_kernel_env", "device", "cuda_device",
                "cuda_version")


def _header_notes(ha: Dict[str, Any], hb: Dict[str, Any]) -> List[str]:
    notes = []
    for key in MACHINE_KEYS + ("memstate_version", "optimizer", "every"):
        if ha.get(key) != hb.get(key):
            notes.append(f"{key} differs: {ha.get(key)!r} vs {hb.get(key)!r}")
    da, db = ha.get("determinism") or {}, hb.get("determinism") or {}
    for key in sorted(set(da) | set(db)):
        if da.get(key) != db.get(key):
            notes.append(f"determinism setting {key} differs: {da.get(key)!r} vs {db.get(key)!r}")
    return notes


def diff(a: str, b: str) -> TrailDiff:
    """Compares trail files ``a`` and ``b`` step by step (see ``TrailDiff``).

    Tensors are matched by (kind, name), steps by number; tensors or steps present in only one
    trail are reported in ``notes`` and make the trails non-identical. Raises TrailError naming
    the file if either is not a readable trail."""
    with TrailReader(a) as ra, TrailReader(b) as rb:
        ta = {(t.kind, t.name): t for t in ra.tensors}
        tb = {(t.kind, t.name): t for t in rb.tensors}
        common = sorted(set(ta) & set(tb), key=lambda k: (_KIND_RANK.get(k[0], len(KINDS)), ta[k].index))
        notes = _header_notes(ra.header, rb.header)
        structural = False  # the trails cover different tensors or steps
        for side, mine, other in (("a", ta, tb), ("b", tb, ta)):
            only = [f"{k} {n}" for (k, n) in mine if (k, n) not in other]
            if only:
                structural = True
                notes.append(f"{len(only)} tensors only in {side}: " + ", ".join(only[:8]) + (" ..." if len(only) > 8 else ""))
        for key in common:
            if (ta[key].dtype, ta[key].shape) != (tb[key].dtype, tb[key].shape):
                structural = True
                notes.append(f"{key[0]} {key[1]} is {ta[key].dtype}{list(ta[key].shape)} in a but "
                             f"{tb[key].dtype}{list(tb[key].shape)} in b")
        rows_b = {r.step: r for r in rb.rows()}
        steps_a = []
        first_step = first_input = None
        first_tensors: List[str] = []
        input_diffs: List[str] = []
        first_input_diffs: List[str] = []
        loss_a = loss_b = None
        fractions: List[Tuple[int, float]] = []
        input_first: Dict[str, int] = {}
        for row_a in ra.rows():
            steps_a.append(row_a.step)
            row_b = rows_b.get(row_a.step)
            if row_b is None:
                continue
            differing, present = [], 0
            for key in common:
                ia, ib = ta[key].index, tb[key].index
                fa = row_a.fingerprints[16 * ia:16 * ia + 16] or ABSENT
                fb = row_b.fingerprints[16 * ib:16 * ib + 16] or ABSENT
                if fa == ABSENT and fb == ABSENT:
                    continue
                present += 1
                if fa != fb:
                    differing.append(f"{key[0]} {key[1]}")
            fractions.append((row_a.step, len(differing) / present if present else 0.0))
            inputs = _inputs(row_a, row_b)
            for name in inputs:
                input_first.setdefault(name, row_a.step)
            if inputs and first_input is None:
                first_input, first_input_diffs = row_a.step, inputs
            if first_step is None and (differing or row_a.loss != row_b.loss):
                first_step, first_tensors, input_diffs = row_a.step, differing, inputs
                loss_a, loss_b = row_a.loss, row_b.loss
        steps_b = sorted(rows_b)
        common_steps = sorted(set(steps_a) & set(steps_b))
        for side, mine, other in (("a", steps_a, steps_b), ("b", steps_b, steps_a)):
            only = sorted(set(mine) - set(other))
            if only:
                structural = True
                notes.append(f"{len(only)} steps only in {side} (first {only[0]}, last {only[-1]})")
        if not common_steps:
            structural = True
            notes.append("the trails have no step in common: nothing was compared")
        # RNG states and contract logs that differ while every tensor, loss and batch agrees
        # did not change the training (an unseeded RNG nobody draws from): noted, not failed.
        batch_differs = "batch_ids" in input_first
        identical = first_step is None and not batch_differs and not structural
        if identical and input_first:
            notes.append("tensors, losses and batches agree, but " + ", ".join(
                f"{k} (from step {v})" for k, v in sorted(input_first.items())) + " differ")
        return TrailDiff(
            a=ra.path, b=rb.path, identical=identical, first_step=first_step, first_tensors=first_tensors,
            inputs_differ=bool(input_diffs) if first_step is not None else first_input is not None,
            input_differences=input_diffs if first_step is not None else first_input_diffs,
            first_input_step=first_input, input_first_steps=input_first, steps_compared=len(common_steps), fractions=fractions,
            loss_a=loss_a, loss_b=loss_b, notes=notes, header_a=ra.header, header_b=rb.header)


def plot(result: TrailDiff, out: str) -> None:
    """Writes a PNG of the fraction of differing tensors per common step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    steps = [s for s, _ in result.fractions]
    ax.step(steps, [f for _, f in result.fractions], where="post")
    if result.first_step is not None:
        ax.axvline(result.first_step, color="tab:red", linestyle="--", label=f"first divergence (step {result.first_step})")
        ax.legend(loc="lower right")
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of tensors differing")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("memstate diff")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main_diff(argv: Optional[Sequence[str]] = None) -> int:
    """``memstate diff TRAIL_A TRAIL_B [--plot out.png]``: exit 0 identical, 1 differing,
    2 unreadable trail."""
    parser = argparse.ArgumentParser(prog="memstate diff", description="Compare two memstate audit trails.")
    parser.add_argument("trail_a")
    parser.add_argument("trail_b")
    parser.add_argument("--plot", metavar="OUT.png", help="draw the fraction of differing tensors per step")
    args = parser.parse_args(argv)
    try:
        result = diff(args.trail_a, args.trail_b)
    except TrailError as e:
        print(f"memstate diff: {e}", file=sys.stderr)
        return 2
    print(result.summary())
    if args.plot:
        plot(result, args.plot)
        print(f"plot written to {args.plot}")
    return 0 if result.identical else 1
