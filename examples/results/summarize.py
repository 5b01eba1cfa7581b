"""Tables and plots of docs/experiments.md's results section, read from the cards in this folder.

    python examples/results/summarize.py [NAME ...] [--plots]

Prints, per card, the early and final ATE tables exactly as the card records them (n, estimate,
95% CI and its method, headline p_t, Holm, the exact sign-flip p with its floor, d_z, ties), the
chaos baseline (control minus butterfly, computed from the card's per-seed values with the same
``memstate.stats.paired_ate``), the divergence at the horizon, what ``seeds_needed`` says for
every effect whose CI includes 0, and the hold-window and order hashes of seed 0. ``--plots``
writes the PNG figures of docs/ (matplotlib). Nothing here re-runs training.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from memstate.stats import format_estimate, paired_ate, seeds_needed  # noqa: E402

ORDER = ["momentum_reset_pilot", "momentum_reset", "momentum_reset_44", "momentum_reset_beta099", "reset_adam_adamw", "order_rr_vs_wr",
         "order_window_swap", "phase_boundary", "factorial_momentum_order", "commute_pair"]


def load(name):
    with open(os.path.join(HERE, name, "card.json"), "rb") as f:
        return json.loads(f.read().decode())


def _p(x):
    return "n/a" if x is None else f"{x:.2g}" if x >= 0.001 else f"{x:.1e}"


def ate_table(card, point):
    t = card["results"]["tables"].get(point)
    if t is None:
        return []
    hib = card["config"]["higher_is_better"]
    steps = sorted(set(t["steps"]))
    out = [f"**{point}** (after step {', '.join(map(str, steps))}; {t['tests']} tests in the Holm family)", "",
           "| effect | metric (better) | n | ATE | 95% CI (method) | p_t | p_holm | sign-flip p (floor) | d_z | +/-/0 |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for key, row in t["rows"].items():
        a = row["ate"]
        est, lo, hi = format_estimate(a["ate"], a["ci"][0], a["ci"][1])
        sig = row["p_holm"] is not None and row["p_holm"] < 1 - a["level"]
        dz = "n/a" if a["dz"] is None else f"{a['dz']:+.2f}"
        out.append(f"| {row['effect']} | {row['metric']} ({'higher' if hib[row['metric']] else 'lower'}) | {a['n']} | "
                   f"{'**' + est + '**' if sig else est} | [{lo}, {hi}] ({a['method']}) | {_p(a['p_t'])} | "
                   f"{_p(row['p_holm'])}{' *' if sig else ''} | {_p(a['p_signflip'])} ({_p(a['p_signflip_floor'])}) | "
                   f"{dz} | {a['n_pos']}/{a['n_neg']}/{a['n_zero']} |")
    out.append("")
    out += [f"- {n}" for n in t["notes"]]
    return out


def _values(card, arm, point, metric):
    return [r["arms"][arm]["probes"][str(r["probe_points"][point])][metric] for r in card["seeds"]]


def chaos_table(card):
    """control - butterfly per metric, early and final, and divergence at the horizon."""
    if card["config"].get("baseline") != "butterfly":
        return []
    labels = card["config"]["arm_labels"]
    out = ["Chaos baseline (`" + labels["control"] + " - butterfly`, the first conv weight scaled by 1 - 2^-20 at "
           "t0; paired t, same seeds):", "",
           "| point | metric | ATE | 95% CI | p_t | +/-/0 |", "|---|---|---|---|---|---|"]
    for point in ("early", "final"):
        if point == "early" and card["seeds"][0]["probe_points"]["early"] == card["seeds"][0]["probe_points"]["final"]:
            continue
        for m in card["config"]["metrics"]:
            a = paired_ate(_values(card, "control", point, m), _values(card, "butterfly", point, m))
            est, lo, hi = format_estimate(a.ate, a.ci[0], a.ci[1])
            p = "n/a, all seeds equal" if a.degenerate else _p(a.p_t)
            out.append(f"| {point} | {m} | {est} | [{lo}, {hi}] | {p} | {a.n_pos}/{a.n_neg}/{a.n_zero} |")
    out.append("")
    arms = [a for a in card["seeds"][0]["divergence"] if a != "aa"]
    cells = []
    for arm in arms:
        l2 = [r["divergence"][arm]["param_l2"][-1] for r in card["seeds"]]
        dis = [r["divergence"][arm]["prediction_disagreement"][str(r["probe_points"]["final"])] for r in card["seeds"]]
        cells.append(f"{labels.get(arm, arm)}: parameter L2 from the control {statistics.median(l2):.3g} "
                     f"(median; range {min(l2):.3g}-{max(l2):.3g}), probe predictions differing "
                     f"{100 * statistics.median(dis):.2f}% (median)")
    out.append("At the horizon, per arm: " + "; ".join(cells) + ".")
    aa = all(r["aa"]["identical"] for r in card["seeds"])
    viol = sum(len(r["contract_violations"]) for r in card["seeds"])
    out.append(f"A/A arm bitwise identical to the control at every step in {'every' if aa else 'NOT every'} seed; "
               f"{viol} RNG-contract violations.")
    return out


def over_time(card, metrics=None):
    """The single-factor effect at every probe step (paired t CI, not Holm-adjusted: exploratory)."""
    if card["config"]["perturbation"].count("+") or not card["config"].get("probe_every"):
        return []
    metrics = [m for m in (metrics or card["config"]["metrics"]) if m in card["config"]["metrics"]]
    steps = sorted(int(s) for s in card["seeds"][0]["arms"]["control"]["probes"])
    t0 = card["config"]["t0"]
    out = ["Effect at every probe step (paired t 95% CI per step, not adjusted for the many steps: a "
           "description of the trajectory, not a test):", "",
           "| after step (t0 + k) | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for st in steps:
        cells = []
        for m in metrics:
            a = paired_ate([r["arms"]["control"]["probes"][str(st)][m] for r in card["seeds"]],
                           [r["arms"]["treatment"]["probes"][str(st)][m] for r in card["seeds"]])
            est, lo, hi = format_estimate(a.ate, a.ci[0], a.ci[1])
            excl = not a.degenerate and (a.ci[0] > 0 or a.ci[1] < 0)
            cells.append(f"{est} [{lo}, {hi}]{' †' if excl else ''}")
        out.append(f"| {st} (+{st - t0}) | " + " | ".join(cells) + " |")
    out += ["", "† the per-step CI excludes 0.", ""]
    return out


def power_notes(card):
    """seeds_needed for every effect (observed |ATE| and sd, 80% power), not only the card's notes."""
    out = []
    for point, t in card["results"]["tables"].items():
        for key, row in t["rows"].items():
            a = row["ate"]
            if a["degenerate"]:
                continue
            need = seeds_needed(a["sd"], a["ate"], a["level"], 0.8)
            out.append(f"{point} {key}: {need if need else '>1e6'}")
    return "seeds_needed (observed effect and sd, 80% power): " + "; ".join(out)


def hashes(card):
    r = card["seeds"][0]
    labels = card["config"]["arm_labels"]
    arms = ", ".join(f"{labels.get(a, a)} `{v['window_hash']}`" for a, v in r["arms"].items())
    cells = [f"Seed 0 hold-window batch-id hashes: {arms}."]
    pert = [p for v in r["arms"].values() for p in (v["perturbation"] or []) if p.get("primitive") not in ("null",)]
    seen = set()
    for p in pert:
        if json.dumps(p, sort_keys=True) in seen:
            continue
        seen.add(json.dumps(p, sort_keys=True))
        extra = {k: v for k, v in p.items() if k not in ("estimand", "changed", "touches", "source_label")}
        cells.append(f"Applied: `{json.dumps(extra, sort_keys=True)}`.")
    cells.append("Epoch order hashes (seed 0, the root run's sampler): "
                 + ", ".join(f"{e}: `{h}`" for e, h in r["order_hashes"].items()) + ".")
    return cells


def order_proof(card, seed=0):
    """For a card with an order primitive: rebuilds seed ``seed``'s sampler (no training), applies
    the primitive at t0 as the experiment does, and compares each epoch's batch ids of the
    control and the perturbed arm: same ids (as a multiset) and same order, or not."""
    import hashlib

    import torch

    from memstate import perturb
    from memstate.experiment import Experiment

    c = card["config"]
    names = [n for n in c["perturbation"].split("+") if perturb.get(n).source in ("S2", "S3")]
    if not names:
        return []
    exp = Experiment(c["task"], c["perturbation"], t0=c["t0"], window=c["window"], horizon=c["horizon"], seeds=2,
                     task_options=c["task_options"], perturbation_params=c["perturbation_params"],
                     estimand=c["estimand"])
    task = exp.task
    out = []
    with torch.no_grad():
        state = task.build(seed)
        state.step = c["t0"]
        bpe = state.sampler.batches_per_epoch
        epochs = range(c["horizon"] // bpe + (c["horizon"] % bpe > 0))
        ids = lambda: {e: [i for t in range(e * bpe, min((e + 1) * bpe, c["horizon"])) for i in state.sampler.batch(t)]
                       for e in epochs}
        before = ids()
        for n in names:
            perturb.apply_checked(n, state, window=exp.windows[n], **exp.params_by_name[n])
        after = ids()
        rebuilt = state.sampler.window_hash(c["t0"], card["seeds"][seed]["window"])
    arm = next(a for a, v in card["config"]["arms"].items() if v == names)
    recorded = next(r for r in card["seeds"] if r["seed"] == seed)["arms"][arm]["window_hash"]
    h = lambda v: hashlib.sha256(repr(v).encode()).hexdigest()[:12]
    rows = ["| epoch (steps) | control: order / id-multiset hash | " + "+".join(names)
            + ": order / id-multiset hash | same ids | same order | distinct ids control / perturbed |",
            "|---|---|---|---|---|---|"]
    for e in epochs:
        a, b = before[e], after[e]
        rows.append(f"| {e} ({e * bpe}-{min((e + 1) * bpe, c['horizon']) - 1}) | `{h(a)}` / `{h(sorted(a))}` | "
                    f"`{h(b)}` / `{h(sorted(b))}` | {sorted(a) == sorted(b)} | {a == b} | {len(set(a))} / {len(set(b))} |")
    out.append(f"Batch ids each arm trains on, seed {seed}, rebuilt from the sampler and the primitive (no "
               f"training; sha256 prefixes of the id sequence and of the sorted ids). The rebuilt hold-window hash "
               f"`{rebuilt}` {'equals' if rebuilt == recorded else 'DIFFERS FROM'} the card's `{recorded}` for that arm:")
    out.append("")
    return out + rows + [""]


def summary(name):
    card = load(name)
    c = card["config"]
    head = [f"#### {name}", "",
            f"task {c['task']} {json.dumps(c['task_options'])}, perturbation `{c['perturbation']}` "
            f"{json.dumps(c['perturbation_params']) if c['perturbation_params'] else ''}, t0 {c['t0']}, hold window "
            f"{card['seeds'][0]['window']} steps ({json.dumps(card['seeds'][0]['windows'])}), horizon {c['horizon']}, "
            f"seeds {len(c['seeds'])}, card created {card['created'][:19]}Z.", ""]
    for k, e in card["results"]["effects"].items():
        head.append(f"- {k}: `{e['text']}`")
    head.append("")
    return "\n".join(head + ate_table(card, "early") + [""] + ate_table(card, "final") + [""] + over_time(card, ["accuracy", "loss", "ece"]) + chaos_table(card)
                     + ["", power_notes(card), ""] + hashes(card) + [""] + order_proof(card))


def plots(out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # 1. the early and final effect of every single-factor experiment, accuracy and loss, with CIs
    names = [n for n in ORDER if os.path.exists(os.path.join(HERE, n, "card.json")) and n != "momentum_reset_pilot"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.55 * (len(names) * 2 + 6)), sharey=True)
    for ax, metric in zip(axes, ("accuracy", "loss", "ece")):
        labels, y = [], 0
        for name in names:
            card = load(name)
            for point in ("early", "final"):
                t = card["results"]["tables"].get(point)
                if t is None:
                    continue
                for key, row in t["rows"].items():
                    if row["metric"] != metric:
                        continue
                    a = row["ate"]
                    sig = row["p_holm"] is not None and row["p_holm"] < 1 - a["level"]
                    ax.errorbar(a["ate"], y, xerr=[[a["ate"] - a["ci"][0]], [a["ci"][1] - a["ate"]]], fmt="o",
                                color=("C3" if sig else "C0"), ms=4, capsize=3, mfc="white" if point == "early" else None)
                    if "+" in card["config"]["perturbation"]:  # factorial: short effect names
                        effect = row["effect"].split()[0]
                        effect += {"main reset_momentum": " momentum", "main order_window_swap": " swap"}.get(
                            row["effect"], "")
                        labels.append(f"factorial: {effect} {point}")
                    else:
                        labels.append(f"{name}: {point}")
                    y += 1
        ax.axvline(0, color="k", lw=0.8)
        ax.set_title(f"{metric} ({'higher' if metric == 'accuracy' else 'lower'} is better)")
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("effect: memory kept minus perturbed, 95% t CI")
    fig.suptitle("Every effect of the issue-15 runs (red: significant after Holm; open marker: early probe)")
    fig.tight_layout(rect=(0.02, 0, 1, 1))
    fig.savefig(os.path.join(out_dir, "experiments_effects.png"), dpi=90)
    plt.close(fig)

    # 2. momentum reset, beta 0.9 vs 0.99: the effect over time on loss and accuracy (mean and 95% t CI)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for name, color in (("momentum_reset_44", "C0"), ("momentum_reset_beta099", "C1")):
        if not os.path.exists(os.path.join(HERE, name, "card.json")):
            continue
        card = load(name)
        steps = sorted(int(s) for s in card["seeds"][0]["arms"]["control"]["probes"])
        t0, w = card["config"]["t0"], card["seeds"][0]["window"]
        for ax, m in zip(axes, ("loss", "accuracy")):
            ates, los, his = [], [], []
            for s in steps:
                a = paired_ate([r["arms"]["control"]["probes"][str(s)][m] for r in card["seeds"]],
                               [r["arms"]["treatment"]["probes"][str(s)][m] for r in card["seeds"]])
                ates.append(a.ate), los.append(a.ci[0]), his.append(a.ci[1])
            beta = card["config"]["task_options"].get("momentum")
            x = [s - t0 for s in steps]
            ax.plot(x, ates, "o-", color=color, ms=3, label=f"beta {beta} (window {w} steps, n {len(card['seeds'])})")
            ax.fill_between(x, los, his, color=color, alpha=0.2)
            ax.axvline(w, color=color, ls=":", lw=1)
            ax.set_title(f"ATE_opt on {m} ({'higher' if m == 'accuracy' else 'lower'} is better)")
            ax.set_xlabel("steps after the reset (dotted: end of the hold window)")
            ax.axhline(0, color="k", lw=0.8)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "experiments_momentum_halflife.png"), dpi=90)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*")
    ap.add_argument("--plots", action="store_true")
    args = ap.parse_args()
    for name in args.names or [n for n in ORDER if os.path.exists(os.path.join(HERE, n, "card.json"))]:
        print(summary(name))
    if args.plots:
        plots(os.path.join(ROOT, "docs"))


if __name__ == "__main__":
    main()
