"""Report of a protocol card: report.html with PNG plots (matplotlib, Agg), results.csv, and
the text tables the CLI prints.

Everything is read from the card, so ``memstate report card.json`` regenerates it. Numbers are
printed with the precision their interval supports (``memstate.stats.format_estimate``).
Plots: per metric, the paired per-seed values of every arm (a line per seed); the ATE of every
effect with its CI and the per-seed differences (forest plot), early and final; the mean
parameter divergence from the control with a 95% band across seeds (t interval per step), the
hold window's end marked, for the treatment and the chaos baseline; the probe prediction
disagreement per probe step; the mean per-step loss of every arm; with ``probe_every``, the
memory effect of every metric over time. The A/A check is a sentence, not an image.
"""
from __future__ import annotations

import csv
import html
import math
import os
from typing import Dict, List

def _pfmt(p) -> str:
    return "n/a" if p is None else (f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}")


def table_rows(config: dict, results: dict, point: str) -> List[dict]:
    """Display rows of one results table (strings), shared by the text and HTML tables."""
    from memstate.stats import format_estimate

    better = config.get("higher_is_better", {})
    rows = []
    for key, r in results["tables"][point]["rows"].items():
        a = r["ate"]
        nan = float("nan")
        est, lo, hi = format_estimate(*(nan if v is None else v for v in (a["ate"], a["ci"][0], a["ci"][1])))
        degenerate = a["degenerate"]
        rows.append({
            "key": key, "effect": r["effect"], "metric": r["metric"],
            "better": "higher" if better.get(r["metric"]) else "lower",
            "ate": est, "ci": f"[{lo}, {hi}]",
            "p_t": "n/a, all seeds equal" if degenerate else _pfmt(a["p_t"]),
            "p_holm": "n/a" if degenerate else _pfmt(r["p_holm"]),
            "p_signflip": _pfmt(a["p_signflip"]),
            "dz": "n/a" if a["dz"] is None else f"{a['dz']:.2f}",
            "counts": f"{a['n_pos']}/{a['n_neg']}/{a['n_zero']}",
            "significant": (not degenerate) and r["p_holm"] is not None and r["p_holm"] < 1 - a["level"],
        })
    return rows


def table_footer(config: dict, results: dict, point: str) -> List[str]:
    """The lines under a table: estimand(s) and sign, CI method and level, Holm family size,
    sign-flip floor, then the table's notes."""
    t = results["tables"][point]
    first = next(iter(t["rows"].values()))["ate"]
    lines = [e["text"] if e["text"].startswith(name + " = ") else f"{name}: {e['text']}"
             for name, e in results["effects"].items()]
    lines.append(f"sign: {results['sign']}; {t['method']} CI at {t['level']:.0%}; headline p = paired t, "
                 f"p_holm = Holm over all {t['tests']} tests of this table; p_signflip = exact sign-flip "
                 f"(robustness, floor {first['p_signflip_floor']:.4g} at n = {first['n']}); +/-/0 = seeds with "
                 f"difference > 0, < 0, = 0")
    return lines + list(t["notes"])


def point_title(config: dict, results: dict, point: str) -> str:
    steps = sorted(set(results["tables"][point]["steps"]))
    at = ", ".join(str(s) for s in steps)
    return (f"{point} probe, after step {at}" + (" (end of the hold window)" if point == "early" else " (horizon)"))


def text_table(config: dict, results: dict, point: str = "final") -> str:
    """Plain-text ATE table of one probe point, as the CLI prints it."""
    rows = table_rows(config, results, point)
    w = max(10, max(len(r["key"]) for r in rows))
    cw = max(12, max(len(r["ci"]) for r in rows))
    pw = max(8, max(len(r["p_t"]) for r in rows))
    head = (f"{'effect':{w}} {'better':>6} {'ATE':>10} {'CI':>{cw}} {'p_t':>{pw}} {'p_holm':>7} {'p_signflip':>10} "
            f"{'d_z':>6} {'+/-/0':>7}")
    lines = [point_title(config, results, point), head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['key']:{w}} {r['better']:>6} {r['ate']:>10} {r['ci']:>{cw}} {r['p_t']:>{pw}} "
                     f"{r['p_holm'] + ('*' if r['significant'] else ' '):>7} {r['p_signflip']:>10} {r['dz']:>6} "
                     f"{r['counts']:>7}")
    lines += ["  " + x for x in table_footer(config, results, point)]
    return "\n".join(lines)


ARM_COLORS = {"control": "tab:blue", "treatment": "tab:red", "aa": "tab:green", "butterfly": "tab:gray",
              "A": "tab:orange", "B": "tab:purple", "C": "tab:brown", "AB": "tab:red", "AC": "tab:pink",
              "BC": "tab:olive", "ABC": "tab:cyan"}


def _label(card: dict, arm: str) -> str:
    return card["config"]["arm_labels"].get(arm, arm)


def _arms(card: dict) -> List[str]:
    """Arms of the design (control first), without the A/A and baseline arms."""
    return list(card["config"]["arms"])


def write_results_csv(card: dict, path: str) -> None:
    """One row per seed: every arm's probe metrics (final, and early when it differs) under the
    estimand's arm labels, each arm's divergence and disagreement at the horizon, the A/A
    result. Raw per-arm values, so any contrast and either sign can be recomputed."""
    cfg = card["config"]
    metrics = cfg["metrics"]
    arms = [a for a in card["seeds"][0]["arms"] if a != "aa"]
    early = any(r["probe_points"]["early"] != r["probe_points"]["final"] for r in card["seeds"])
    div_arms = [a for a in card["seeds"][0]["divergence"]]
    header = ["seed", "window"] + [f"{_label(card, a)}_{m}" for a in arms for m in metrics]
    if early:
        header += [f"{_label(card, a)}_{m}_early" for a in arms for m in metrics]
    header += [f"{_label(card, a)}_param_l2_final" for a in div_arms]
    header += [f"{_label(card, a)}_disagreement_final" for a in div_arms] + ["aa_identical"]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in card["seeds"]:
            row = [r["seed"], r["window"]] + [r["arms"][a]["metrics"][m] for a in arms for m in metrics]
            if early:
                e = str(r["probe_points"]["early"])
                row += [r["arms"][a]["probes"][e][m] for a in arms for m in metrics]
            fin = str(r["probe_points"]["final"])
            row += [(r["divergence"][a]["param_l2"] or [None])[-1] for a in div_arms]
            row += [r["divergence"][a]["prediction_disagreement"].get(fin) for a in div_arms]
            row.append(r.get("aa", {}).get("identical"))
            w.writerow(row)
    os.replace(tmp, path)


def _t_band(rows: List[List[float]], level: float = 0.95):
    """Mean and t-interval band across rows (seeds), per column (step)."""
    import numpy as np
    import scipy.stats

    a = np.asarray(rows, dtype=np.float64)
    n = a.shape[0]
    mean = a.mean(axis=0)
    if n < 2:
        return mean, mean, mean
    half = scipy.stats.t.ppf(0.5 + level / 2, n - 1) * a.std(axis=0, ddof=1) / math.sqrt(n)
    return mean, mean - half, mean + half


def _save(fig, out_dir: str, name: str, files: List[str]) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=100)
    plt.close(fig)
    files.append(name)


def _plots(card: dict, out_dir: str) -> Dict[str, List[str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cfg, res, seeds = card["config"], card["results"], card["seeds"]
    t0, horizon = cfg["t0"], cfg["horizon"]
    files: Dict[str, List[str]] = {"paired": [], "forest": [], "divergence": [], "loss": [], "time": []}
    arms = _arms(card)
    metrics = cfg["metrics"]
    better = cfg.get("higher_is_better", {})
    points = list(res["tables"])
    # 1. paired per-seed values, per metric (final and early side by side)
    for m in metrics:
        fig, axes = plt.subplots(1, len(points), figsize=(3.4 * len(points) + 0.6, 3.2), squeeze=False)
        for ax, point in zip(axes[0], points[::-1]):  # early first, then final
            for r in seeds:
                step = str(r["probe_points"][point])
                ax.plot(range(len(arms)), [r["arms"][a]["probes"][step][m] for a in arms], "-o", ms=4, lw=1,
                        alpha=0.8, label=f"seed {r['seed']}")
            ax.set_xticks(range(len(arms)))
            ax.set_xticklabels([_label(card, a) for a in arms], fontsize=8, rotation=15 if len(arms) > 2 else 0)
            ax.set_xlim(-0.4, len(arms) - 0.6)
            ax.set_title(f"{m} ({'higher' if better.get(m) else 'lower'} is better), {point}", fontsize=9)
        axes[0][-1].legend(fontsize=6, loc="best")
        _save(fig, out_dir, f"paired_{m}.png", files["paired"])
    # 2. forest plot per probe point
    for point in points[::-1]:
        rows = res["tables"][point]["rows"]
        fig, ax = plt.subplots(figsize=(7, 0.9 + 0.45 * len(rows)))
        for i, (key, r) in enumerate(rows.items()):
            a = r["ate"]
            y = len(rows) - 1 - i
            if None not in (a["ate"], a["ci"][0], a["ci"][1]):
                ax.errorbar([a["ate"]], [y], xerr=[[a["ate"] - a["ci"][0]], [a["ci"][1] - a["ate"]]], fmt="o",
                            capsize=4, color="tab:blue")
            ax.scatter([d for d in a["differences"] if d is not None], [y + 0.2] * len(a["differences"]), s=10,
                       color="gray", alpha=0.7)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(list(rows)[::-1], fontsize=8)
        t = res["tables"][point]
        ax.set_title(f"{point}: memory effect, {t['method']} {t['level']:.0%} CI (gray: per-seed differences)",
                     fontsize=9)
        ax.set_xlabel("M(memory kept) - M(memory perturbed)")
        _save(fig, out_dir, f"ate_{point}.png", files["forest"])
    # 3. divergence from the control, mean and 95% band across seeds
    div_arms = [a for a in seeds[0]["divergence"] if a != "aa"]
    window_end = seeds[0]["probe_points"]["early"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    ax = axes[0]
    steps = np.arange(t0 + 1, horizon + 1)
    # divergences span orders of magnitude (the butterfly's grows from 1e-6): when every value
    # is positive, the mean and its t band are taken over log10 (geometric mean), so the band
    # stays positive and readable on a log axis
    positive = all(x > 0 for r in seeds for a in div_arms for x in r["divergence"][a]["param_l2"])
    for a in div_arms:
        rows = [r["divergence"][a]["param_l2"] for r in seeds]
        c = ARM_COLORS.get(a, "k")
        if positive:
            mean, lo, hi = (10 ** x for x in _t_band(np.log10(np.asarray(rows))))
        else:
            mean, lo, hi = _t_band(rows)
        ax.plot(steps, mean, color=c, label=_label(card, a))
        ax.fill_between(steps, lo, hi, color=c, alpha=0.2)
    ax.axvline(window_end, color="k", ls="--", lw=0.8, label="window end")
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("||theta_arm - theta_control||_2")
    ax.set_title("parameter divergence from control (" + ("geometric " if positive else "")
                 + "mean over seeds, 95% band)", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    for a in div_arms:
        keys = sorted(seeds[0]["divergence"][a]["prediction_disagreement"], key=int)
        mean, lo, hi = _t_band([[r["divergence"][a]["prediction_disagreement"][k] for k in keys] for r in seeds])
        xs = [int(k) for k in keys]
        c = ARM_COLORS.get(a, "k")
        ax.plot(xs, mean, "-o", color=c, ms=4, label=_label(card, a))
        ax.fill_between(xs, lo, hi, color=c, alpha=0.2)
    ax.axvline(window_end, color="k", ls="--", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("probe prediction disagreement")
    ax.set_title("disagreement with control at each probe (mean, 95% band)", fontsize=9)
    _save(fig, out_dir, "divergence.png", files["divergence"])
    # 4. mean per-step loss of every arm
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for a in arms + [x for x in div_arms if x not in arms]:
        mean, lo, hi = _t_band([r["arms"][a]["losses"] for r in seeds])
        ax.plot(steps, mean, color=ARM_COLORS.get(a, "k"), lw=1, label=_label(card, a))
    ax.axvspan(t0, window_end, color="orange", alpha=0.08)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over seeds)")
    ax.set_title("per-step training loss (shaded: hold window)", fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, out_dir, "loss.png", files["loss"])
    # 5. the memory effect over time (with probe_every)
    probe_keys = sorted(seeds[0]["arms"]["control"]["probes"], key=int)
    if len(probe_keys) > 2 and len(res["effects"]) >= 1:
        eff_name, eff = next(iter(res["effects"].items()))
        fig, axes = plt.subplots(1, len(metrics), figsize=(3.3 * len(metrics), 3), squeeze=False)
        for ax, m in zip(axes[0], metrics):
            rows = []
            for r in seeds:
                def val(arms_, k):
                    return eff["scale"] * sum(r["arms"][a]["probes"][k][m] for a in arms_)
                rows.append([val(eff["plus"], k) - val(eff["minus"], k) for k in probe_keys])
            mean, lo, hi = _t_band(rows)
            xs = [int(k) for k in probe_keys]
            ax.plot(xs, mean, "-o", ms=3)
            ax.fill_between(xs, lo, hi, alpha=0.2)
            ax.axhline(0, color="k", lw=0.8)
            ax.axvline(window_end, color="k", ls="--", lw=0.8)
            ax.set_title(f"{eff_name}, {m}", fontsize=9)
            ax.set_xlabel("step")
        _save(fig, out_dir, "effect_over_time.png", files["time"])
    return files


def _window_text(card: dict) -> str:
    from memstate import perturb

    cfg = card["config"]
    parts = []
    w = card["seeds"][0]["windows"]
    for n in cfg["perturbation"].split("+"):
        try:
            prim = perturb.get(n)
            rule = prim.window_rule
        except Exception:  # a card from another version: say so rather than fail
            rule = "(rule unknown to this memstate)"
        given = cfg["window"].get(n) if isinstance(cfg["window"], dict) else cfg["window"]
        params = cfg["perturbation_params"].get(n, {}) if "+" in cfg["perturbation"] else cfg["perturbation_params"]
        parts.append(f"<b>{html.escape(n)}</b>: window {w[n]} steps "
                     + ("(given)" if given is not None else f"(default rule: {html.escape(str(rule))})")
                     + f", parameters {html.escape(str(params or 'defaults'))}")
    return "; ".join(parts)


def _html_table(card: dict, point: str) -> str:
    res = card["results"]
    rows = table_rows(card["config"], res, point)
    body = "".join(
        f"<tr{' class=sig' if r['significant'] else ''}><td class=l>{html.escape(r['key'])}</td>"
        f"<td>{r['better']}</td><td>{r['ate']}</td><td>{html.escape(r['ci'])}</td><td>{html.escape(r['p_t'])}</td>"
        f"<td>{r['p_holm']}</td><td>{r['p_signflip']}</td><td>{r['dz']}</td><td>{r['counts']}</td></tr>"
        for r in rows)
    foot = "".join(f"<li>{html.escape(x)}</li>" for x in table_footer(card["config"], res, point))
    return (f"<h3>{html.escape(point_title(card['config'], res, point))}</h3><table><tr><th>effect</th>"
            f"<th>better</th><th>ATE</th><th>CI</th><th>p (t)</th><th>p Holm</th><th>p sign-flip</th><th>d_z</th>"
            f"<th>+/&minus;/0</th></tr>{body}</table><ul class=foot>{foot}</ul>")


def _per_seed_table(card: dict) -> str:
    cfg = card["config"]
    arms = _arms(card)
    head = "".join(f"<th>{html.escape(_label(card, a))}: {html.escape(m)}</th>" for m in cfg["metrics"] for a in arms)
    body = "".join(
        "<tr><td>" + str(r["seed"]) + "</td>" + "".join(
            f"<td>{r['arms'][a]['metrics'][m]:.4g}</td>" for m in cfg["metrics"] for a in arms) + "</tr>"
        for r in card["seeds"])
    return f"<table><tr><th>seed</th>{head}</tr>{body}</table>"


def _aa_sentence(card: dict) -> str:
    seeds = card["seeds"]
    if not card["config"]["aa_check"]:
        return "No A/A arm was run."
    bad = [s for s in seeds if not s["aa"]["identical"]]
    steps = len(seeds[0]["arms"]["control"]["digests"])
    if not bad:
        return (f"A/A check: the A/A arm (restore, apply null) was bitwise identical to the control at every one "
                f"of the {steps} steps, in every checkpoint and every probe, for all {len(seeds)} seeds.")
    return (f"A/A check FAILED for seed(s) {', '.join(str(s['seed']) for s in bad)}: "
            f"{html.escape(str([s['aa'] for s in bad][:3]))}")


def _baseline_sentence(card: dict) -> str:
    cfg, seeds = card["config"], card["seeds"]
    if not cfg.get("baseline"):
        return ("No chaos baseline was run (add <code>--baseline butterfly</code> to read the divergence against "
                "a negligible perturbation).")
    p = seeds[0]["arms"]["butterfly"]["perturbation"][0]
    fin = str(seeds[0]["probe_points"]["final"])
    treat = [a for a in seeds[0]["divergence"] if a not in ("aa", "butterfly")][-1]

    def mean(arm, what):
        if what == "l2":
            vals = [s["divergence"][arm]["param_l2"][-1] for s in seeds]
        else:
            vals = [s["divergence"][arm]["prediction_disagreement"][fin] for s in seeds]
        return sum(vals) / len(vals)

    return (f"Chaos baseline: the butterfly arm scales <code>{html.escape(p['tensor'])}</code> by 1 &minus; 2<sup>&minus;20</sup> "
            f"at t0 and changes nothing else. At the horizon its parameter distance from the control is "
            f"{mean('butterfly', 'l2'):.3g} (mean over seeds) and its probe disagreement {mean('butterfly', 'dis'):.3g}; "
            f"the {html.escape(_label(card, treat))} arm's are {mean(treat, 'l2'):.3g} and {mean(treat, 'dis'):.3g}.")


def _cpu_words(env: dict) -> str:
    """", CPU <model> (torch kernels <capability>)" for cards that record them, else ""."""
    if not env.get("cpu"):
        return ""
    cap = f" (torch CPU kernels {env['torch_cpu_capability']})" if env.get("torch_cpu_capability") else ""
    if cap and isinstance(env.get("cpu_kernel_env"), dict) and env["cpu_kernel_env"]:
        cap = cap[:-1] + ", " + " ".join(f"{k}={v}" for k, v in env["cpu_kernel_env"].items()) + ")"
    return html.escape(f", CPU {env['cpu']}{cap}")


def write_report(card: dict, out: str) -> str:
    """Writes report.html (with its PNGs and results.csv beside it) and returns its path.
    ``out`` is a directory, or a file name ending in .html / .htm."""
    if out.lower().endswith((".html", ".htm")):
        out_dir, name = os.path.dirname(os.path.abspath(out)), os.path.basename(out)
    else:
        out_dir, name = out, "report.html"
    os.makedirs(out_dir, exist_ok=True)
    files = _plots(card, out_dir)
    write_results_csv(card, os.path.join(out_dir, "results.csv"))
    cfg, env, res = card["config"], card["environment"], card["results"]
    viol = [v for s in card["seeds"] for v in s["contract_violations"]]
    est = "".join(f"<li>{html.escape(e['text'])}</li>" if e["text"].startswith(n + " = ")
                  else f"<li><b>{html.escape(n)}</b>: {html.escape(e['text'])}</li>" for n, e in res["effects"].items())

    def imgs(kind):
        return "".join(f'<img src="{f}" alt="{f}">' for f in files[kind])

    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>memstate report: {html.escape(cfg['task'])} /
{html.escape(cfg['perturbation'])}</title>
<style>body{{font-family:sans-serif;max-width:68em;margin:1.5em auto;color:#222}}table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border:1px solid #ccc;padding:2px 7px;text-align:right;font-size:90%}}td.l{{text-align:left}}
tr.sig td{{background:#eef7ee}}ul.foot{{font-size:85%;color:#444}}img{{max-width:100%;margin:.3em 0}}
code{{background:#f4f4f4}}</style></head><body>
<h1>{html.escape(cfg['task'])}: {html.escape(cfg['perturbation'])}</h1>
<p>Branch at t0 = {cfg['t0']}, horizon {cfg['horizon']}, seeds {html.escape(str(cfg['seeds']))}, device {html.escape(cfg['device'])},
{cfg['threads']} thread(s). {_window_text(card)}. Early probe after step {card['seeds'][0]['probe_points']['early']}
(end of the hold window), final probe after step {cfg['horizon']}{f", and every {cfg['probe_every']} steps" if cfg.get('probe_every') else ''}.</p>
<p><b>Estimand</b> (sign: memory kept minus memory perturbed; a positive effect on a higher-is-better metric means
the memory helped):</p><ul>{est}</ul>
{''.join(_html_table(card, p) for p in list(res['tables'])[::-1])}
<p>Rows shaded green are significant after Holm at the table's level. The headline p is the paired t-test's (its CI
excludes 0 exactly when p &lt; 1 &minus; level); the exact sign-flip p is a distribution-free check whose floor at this n
is printed in the footer.</p>
<h2>Per-seed values</h2>{imgs('paired')}
<details><summary>final probe values per seed</summary>{_per_seed_table(card)}</details>
<h2>Effects</h2>{imgs('forest')}{imgs('time')}
<h2>Divergence from the control</h2><p>{_baseline_sentence(card)}</p>{imgs('divergence')}{imgs('loss')}
<h2>Checks</h2><p>{_aa_sentence(card)} Contract violations: {html.escape('; '.join(viol)) if viol else 'none'}.</p>
<p>memstate {html.escape(str(env.get('memstate')))}, torch {html.escape(str(env.get('torch')))}, devices
{html.escape(', '.join(map(str, env.get('devices', []))))}{_cpu_words(env)}. Per-seed numbers: <a href="results.csv">results.csv</a>; audit
trail: card.json (checksum {html.escape(card['card_xxh3_128'])}, which detects accidents, not forgery); verify it with
<code>memstate replay card.json</code>, which re-runs every seed and compares every recorded value (bitwise
on the same CPU/GPU kind and torch build).</p></body></html>"""
    path = os.path.join(out_dir, name)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(body)
    os.replace(tmp, path)
    return path
