"""HTML report of a protocol card, with PNG plots (matplotlib, Agg backend).

Plots: the ATE of every metric with its CI (forest plot), the per-step loss of every arm,
the parameter L2 divergence between treatment and control per step, and the A/A
fingerprint-match timeline (one row per seed: green where the A/A arm's state digest equals
the control's at that step).
"""
from __future__ import annotations

import csv
import html
import os
from typing import List


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
    lines = [f"{name}: {e['text']}" for name, e in results["effects"].items()]
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


def write_results_csv(card: dict, path: str) -> None:
    """One row per seed: every arm's probe metrics, divergence and the A/A result."""
    metrics = card["config"]["metrics"]
    arms = [a for a in card["seeds"][0]["arms"] if a != "aa"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seed", "window"] + [f"{arm}_{m}" for arm in arms for m in metrics]
                   + ["prediction_disagreement", "aa_identical"])
        for r in card["seeds"]:
            w.writerow([r["seed"], r["window"]] + [r["arms"][arm]["metrics"][m] for arm in arms for m in metrics]
                       + [r["divergence"]["prediction_disagreement"], r.get("aa", {}).get("identical")])


def _plots(card: dict, out_dir: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = card["config"]
    files = []
    t0 = cfg["t0"]
    # 1. ATE forest plot
    res = card["results"]
    fig, axes = plt.subplots(len(res), 1, figsize=(6, 1.2 + 0.9 * len(res)), squeeze=False)
    for ax, (m, r) in zip(axes[:, 0], res.items()):
        a = r["ate"]
        ax.errorbar([a["ate"]], [0], xerr=[[a["ate"] - a["ci"][0]], [a["ci"][1] - a["ate"]]], fmt="o", capsize=6)
        ax.scatter(a["differences"], [0.25] * len(a["differences"]), s=12, alpha=0.6, color="gray")
        ax.axvline(0, color="k", lw=0.8)
        ax.set_ylim(-0.5, 0.5)
        ax.set_yticks([])
        ax.set_title(f"{m}: ATE {_f(a['ate'], '+.4g')}, {a['method']} {a['level']:.0%} CI, "
                     f"p_signflip {_f(a['p_signflip'], '.3g')}", fontsize=9)
    fig.tight_layout()
    files.append("ate_forest.png")
    fig.savefig(os.path.join(out_dir, files[-1]), dpi=110)
    plt.close(fig)
    # 2. per-step loss of every arm
    fig, ax = plt.subplots(figsize=(7, 3.5))
    colors = {"control": "tab:blue", "treatment": "tab:red", "aa": "tab:green", "A": "tab:orange", "B": "tab:purple",
              "AB": "tab:red"}
    for r in card["seeds"]:
        for arm, rec in r["arms"].items():
            steps = range(t0, t0 + len(rec["losses"]))
            ax.plot(steps, rec["losses"], color=colors.get(arm, "k"), alpha=0.5, lw=1,
                    ls="--" if arm == "aa" else "-", label=arm if r is card["seeds"][0] else None)
        ax.axvspan(t0, t0 + r["window"], color="orange", alpha=0.05)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("per-step loss (shaded: hold window)")
    ax.legend()
    fig.tight_layout()
    files.append("loss.png")
    fig.savefig(os.path.join(out_dir, files[-1]), dpi=110)
    plt.close(fig)
    # 3. divergence
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for r in card["seeds"]:
        l2 = r["divergence"]["param_l2"]
        ax.plot(range(t0, t0 + len(l2)), l2, alpha=0.7, label=f"seed {r['seed']}")
    ax.set_xlabel("step")
    ax.set_ylabel("||theta_treat - theta_ctrl||_2")
    ax.set_title(f"parameter divergence, {card['seeds'][0]['divergence'].get('arm', 'treatment')} vs control")
    ax.legend(fontsize=7)
    fig.tight_layout()
    files.append("divergence.png")
    fig.savefig(os.path.join(out_dir, files[-1]), dpi=110)
    plt.close(fig)
    # 4. A/A fingerprint-match timeline
    if cfg["aa_check"]:
        import numpy as np

        rows = []
        for r in card["seeds"]:
            c, a = r["arms"]["control"]["digests"], r["arms"]["aa"]["digests"]
            rows.append([1.0 if x == y else 0.0 for x, y in zip(c, a)])
        fig, ax = plt.subplots(figsize=(7, 0.6 + 0.35 * len(rows)))
        ax.imshow(np.array(rows), aspect="auto", cmap="RdYlGn", vmin=0, vmax=1,
                  extent=(t0 - 0.5, t0 + len(rows[0]) - 0.5, len(rows) - 0.5, -0.5))
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([f"seed {r['seed']}" for r in card["seeds"]], fontsize=7)
        ax.set_xlabel("step")
        ax.set_title("A/A arm vs control: state fingerprint match per step (green = bitwise identical)", fontsize=9)
        fig.tight_layout()
        files.append("aa_timeline.png")
        fig.savefig(os.path.join(out_dir, files[-1]), dpi=110)
        plt.close(fig)
    return files


def _f(v, spec: str) -> str:
    """Formats a number; None (NaN or infinite in the card) as n/a."""
    return "n/a" if v is None else format(v, spec)


def write_report(card: dict, out_dir: str) -> str:
    """Writes report.html (and its PNGs and results.csv) into out_dir; returns the HTML path."""
    os.makedirs(out_dir, exist_ok=True)
    files = _plots(card, out_dir)
    write_results_csv(card, os.path.join(out_dir, "results.csv"))
    cfg, env = card["config"], card["environment"]
    rows = "".join(
        f"<tr><td>{html.escape(m)}</td><td>{_f(r['ate']['ate'], '+.5g')}</td><td>[{_f(r['ate']['ci'][0], '+.5g')}, "
        f"{_f(r['ate']['ci'][1], '+.5g')}]</td><td>{_f(r['ate']['p_signflip'], '.4g')}</td><td>{_f(r['p_holm'], '.4g')}</td>"
        f"<td>{_f(r['ate']['p_t'], '.4g')}</td><td>{_f(r['ate']['dz'], '.3g')}</td><td>{r['ate']['n_positive']}/{r['ate']['n']}</td></tr>"
        for m, r in card["results"].items())
    aa = [s.get("aa") for s in card["seeds"]]
    aa_line = ("A/A arm bitwise identical to control at every step for every seed" if all(a and a["identical"] for a in aa)
               else f"A/A MISMATCH: {html.escape(str([a for a in aa if a and not a['identical']][:3]))}")
    viol = [v for s in card["seeds"] for v in s["contract_violations"]]
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>memstate report</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}</style></head><body>
<h1>{html.escape(cfg['task'])}: {html.escape(cfg['perturbation'])}</h1>
<p>t0 = {cfg['t0']}, window = {html.escape(str([s['window'] for s in card['seeds']][0]))}, horizon = {cfg['horizon']},
seeds = {html.escape(str(cfg['seeds']))}; memstate {env['memstate']}, torch {env['torch']},
devices {html.escape(', '.join(env['devices']))}. Card checksum {card.get('card_xxh3_128', '')}.</p>
<h2>Average treatment effects ({'rr &minus; wr' if cfg.get('estimand') == 'order' else 'treatment &minus; control'})</h2>
<table><tr><th>effect</th><th>ATE</th><th>CI</th><th>p sign-flip</th><th>p Holm</th><th>p t</th><th>d_z</th><th>d&gt;0</th></tr>{rows}</table>
<p>{html.escape(aa_line)}. Contract violations: {html.escape('; '.join(viol)) if viol else 'none'}.</p>
{''.join(f'<p><img src="{f}" alt="{f}"></p>' for f in files)}
<p>Per-seed numbers: <a href="results.csv">results.csv</a>; full audit trail: card.json
(replay with <code>memstate replay card.json</code>).</p></body></html>"""
    path = os.path.join(out_dir, "report.html")
    with open(path, "w") as f:
        f.write(body)
    return path
