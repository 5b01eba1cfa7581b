"""report.html, results.csv and the text tables: labels, precision, and images that are not blank."""
import html
import importlib.util
import math
import os

import pytest

from memstate import card as cardmod
from memstate.experiment import Experiment
from memstate.report import text_table, write_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def card():
    exp = Experiment("digits", "reset_momentum", t0=4, horizon=10, seeds=3, window=3, baseline="butterfly",
                     probe_every=2)
    return cardmod.make_card(exp.run())


def test_report_shows_what_a_scientist_needs(card, tmp_path):
    path = write_report(card, str(tmp_path))
    text = open(path).read()
    for needle in ("ATE_opt = E[M(carry) - M(reset_momentum)]", "memory kept minus memory perturbed",
                   "early probe, after step 7", "final probe, after step 10", "Holm over all 3 tests",
                   "floor 0.25 at n = 3", "window 3 steps (given)", "Chaos baseline", "by 1 &minus; 2",
                   "higher", "lower", "A/A check: the A/A arm", "detects accidents, not forgery",
                   f"CPU {html.escape(card['environment']['cpu'])} (torch CPU kernels "):
        assert needle in text, needle
    assert "aa_timeline" not in text  # one sentence instead of a one-bit image
    for f in ("paired_accuracy.png", "paired_loss.png", "ate_early.png", "ate_final.png", "divergence.png",
              "loss.png", "effect_over_time.png"):
        assert os.path.isfile(tmp_path / f), f
    spec = importlib.util.spec_from_file_location("render_report", os.path.join(ROOT, "benchmarks", "render_report.py"))
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    assert render.check_pngs(path) == []


def test_precision_follows_the_interval(card):
    rows = card["results"]["tables"]["final"]["rows"]
    table = text_table(card["config"], card["results"], "final")
    from memstate.stats import format_estimate

    for key, r in rows.items():
        a = r["ate"]
        est, lo, hi = format_estimate(a["ate"], *a["ci"])
        assert f" {est} " in table and f"[{lo}, {hi}]" in table
        # two significant digits of the half-width fix the decimal place
        half = (a["ci"][1] - a["ci"][0]) / 2
        want = max(0, 1 - math.floor(math.log10(half)))
        assert (len(est.split(".")[1]) if "." in est else 0) == want, (key, est, half)


def test_the_report_names_the_variables_that_capped_torch_cpu_kernels():
    from memstate.report import _cpu_words

    env = {"cpu": "AMD EPYC <x>", "torch_cpu_capability": "AVX2"}
    assert _cpu_words(env) == ", CPU AMD EPYC &lt;x&gt; (torch CPU kernels AVX2)"
    env["cpu_kernel_env"] = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert _cpu_words(env) == ", CPU AMD EPYC &lt;x&gt; (torch CPU kernels AVX2, ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2)"
