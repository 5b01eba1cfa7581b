"""memstate.stats: paired ATE, exact sign-flip p-values, Holm, Hedges' d_z.

References: scipy.stats.ttest_rel (t interval and p), itertools enumeration (sign flips), the
Holm step-down procedure run literally (Holm), scipy.stats.bootstrap (BCa/percentile, loosely),
and coverage simulations at n = 5 (DESIGN.md, "Statistics defaults").
"""
import dataclasses
import itertools
import json
import math
import warnings

import numpy as np
import pytest
import scipy.stats

from memstate import stats
from memstate.stats import (
    MethodFallbackWarning,
    PairedATE,
    SmallSampleWarning,
    hedges_correction,
    hedges_dz,
    holm,
    paired_ate,
    sign_flip_floor,
    sign_flip_pvalue,
)


def _datasets():
    rng = np.random.default_rng(2024)
    out = []
    for n in (2, 3, 5, 7, 10, 37):
        c = rng.normal(2.0, 0.5, n)
        t = c + rng.normal(0.1, 0.2, n)
        out.append((t, c))
    # skewed, and integer-valued with ties
    c = rng.normal(size=8)
    out.append((c + rng.exponential(1.0, 8), c))
    out.append((np.array([3.0, 1, 4, 1, 5, 9, 2, 6]), np.array([2.0, 7, 1, 8, 2, 8, 1, 8])))
    return out


# ----------------------------------------------------------------------------------------------
# t interval and p against scipy


@pytest.mark.parametrize("level", [0.8, 0.95, 0.99])
def test_t_interval_and_p_equal_ttest_rel(level):
    for t, c in _datasets():
        r = paired_ate(t, c, level=level)
        ref = scipy.stats.ttest_rel(t, c)
        ci = ref.confidence_interval(confidence_level=level)
        assert r.method == r.requested_method == "t"
        assert r.warning is None
        assert r.ate == pytest.approx(np.mean(t - c), rel=1e-12, abs=1e-15)
        assert r.ci[0] == pytest.approx(ci.low, rel=1e-12)
        assert r.ci[1] == pytest.approx(ci.high, rel=1e-12)
        assert r.p_t == pytest.approx(ref.pvalue, rel=1e-10)
        assert r.sd == pytest.approx(np.std(t - c, ddof=1), rel=1e-12)
        assert r.level == level and r.n == len(t)


def test_reported_descriptives():
    t = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    c = np.array([1.5, 1.0, 2.0, 4.0, 3.0])
    r = paired_ate(t, c)
    assert r.differences == (-0.5, 1.0, 1.0, 0.0, 2.0)
    assert all(type(v) is float for v in r.differences)
    assert r.n_positive == r.n_pos == 3  # 0.0 is not > 0
    assert (r.n_neg, r.n_zero) == (1, 1)  # the tie is counted, not hidden
    assert not r.degenerate
    assert r.median == 1.0
    assert r.ate == pytest.approx(0.7)
    assert isinstance(r.ci, tuple) and len(r.ci) == 2
    assert r.dz == pytest.approx(hedges_correction(4) * 0.7 / np.std(t - c, ddof=1))


def test_accepts_lists_and_tensors():
    torch = pytest.importorskip("torch")
    t = [0.3, 0.1, 0.4, 0.15, 0.9]
    c = [0.2, 0.0, 0.5, 0.1, 0.6]
    a = paired_ate(t, c)
    b = paired_ate(torch.tensor(t, dtype=torch.float64), torch.tensor(c, dtype=torch.float64))
    assert a == b


# ----------------------------------------------------------------------------------------------
# sign flip


def _brute_signflip(d):
    d = [float(x) for x in d]
    obs = abs(sum(d))
    tol = 1e-9 * sum(abs(x) for x in d)
    hits = sum(abs(sum(s * x for s, x in zip(signs, d))) >= obs - tol
               for signs in itertools.product((1, -1), repeat=len(d)))
    return hits / 2 ** len(d)


def test_signflip_equals_bruteforce_enumeration():
    rng = np.random.default_rng(7)
    cases = [rng.normal(0.3, 1.0, n) for n in range(1, 13)]
    cases += [
        np.array([1.0, 1.0, 1.0, -1.0, 2.0, -2.0]),   # many exact ties among signed sums
        np.array([0.0, 0.0, 1.0, 2.0]),                # zeros flip to themselves
        np.array([0.1, 0.2, 0.3, -0.6, 0.05]),         # decimal ties that are inexact in binary
        np.zeros(4),
        np.array([5.0, 5.0, 5.0, 5.0, 5.0]),
    ]
    for d in cases:
        assert sign_flip_pvalue(d) == pytest.approx(_brute_signflip(d), abs=0), d


def test_signflip_floor():
    d = np.array([0.1, 0.2, 0.3, 0.4, 0.5])  # all one sign: only the pattern and its mirror
    assert sign_flip_pvalue(d) == 0.0625 == 2 / 2 ** 5
    assert sign_flip_floor(5) == 0.0625
    r = paired_ate(d, np.zeros(5))
    assert r.p_signflip == r.p_signflip_floor == 0.0625
    # n <= 5 can never reach 0.05 two-sided; n = 6 can
    assert all(sign_flip_floor(n) > 0.05 for n in range(1, 6))
    assert sign_flip_floor(6) == 2 / 64 < 0.05
    assert sign_flip_pvalue(np.zeros(5)) == 1.0


def test_signflip_exact_at_n20_and_monte_carlo_above():
    rng = np.random.default_rng(3)
    d20 = np.abs(rng.normal(size=20)) + 0.1
    assert sign_flip_pvalue(d20) == 2 / 2 ** 20
    assert sign_flip_floor(20) == 2 / 2 ** 20

    d = rng.normal(0.35, 1.0, 22)
    # exact reference by doubling all 2^22 signed sums (32 MiB)
    sums = np.zeros(1)
    for x in d:
        sums = np.concatenate((sums + x, sums - x))
    exact = np.mean(np.abs(sums) >= abs(sums[0]) - 1e-9)
    p = sign_flip_pvalue(d, n_mc=20_000)
    assert p == sign_flip_pvalue(d, n_mc=20_000)  # fixed seed: deterministic
    assert abs(p - exact) < 4 * math.sqrt(exact * (1 - exact) / 20_000) + 1e-4
    assert sign_flip_floor(22, n_mc=20_000) == 1 / 20_001
    assert sign_flip_pvalue(np.full(25, 1.0), n_mc=999) == 1 / 1000


# ----------------------------------------------------------------------------------------------
# Holm


def test_holm_hand_computed():
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> running max 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # capped
    assert holm([0.2]) == [0.2]
    assert holm([]) == []
    assert holm((p for p in [0.01, 0.01])) == [0.02, 0.02]


def _holm_rejects(p, alpha):
    """Holm's step-down procedure, literally: the set of indices rejected at level alpha."""
    m = len(p)
    rejected = set()
    for k, i in enumerate(sorted(range(m), key=lambda i: p[i])):
        if p[i] * (m - k) <= alpha:  # p <= alpha / (m - k), without the division's rounding
            rejected.add(i)
        else:
            break
    return rejected


def test_holm_matches_step_down_procedure():
    rng = np.random.default_rng(11)
    for trial in range(200):
        m = int(rng.integers(1, 9))
        p = rng.uniform(0, 0.2, m) ** rng.uniform(0.5, 3)
        if trial % 4 == 0:
            p[rng.integers(0, m, m // 2)] = p[0]  # ties
        p = [float(v) for v in p]
        adj = holm(p)
        assert all(0 <= a <= 1 for a in adj)
        assert all(a >= v for a, v in zip(adj, p))
        order = np.argsort(p, kind="stable")
        assert np.all(np.diff(np.array(adj)[order]) >= 0)  # monotone in the sorted order
        # adj_i <= alpha  <=>  the procedure rejects i at alpha, at every critical alpha and
        # just either side of it
        alphas = {(m - k) * v for k, v in enumerate(sorted(p))} | {0.05, 0.5, 0.999}
        for a0 in alphas:
            for a in (a0 * (1 - 1e-9), a0, a0 * (1 + 1e-9)):
                if a >= 1:  # adj is capped at 1: the equivalence is for levels alpha < 1
                    continue
                got = {i for i, v in enumerate(adj) if v <= a}
                assert got == _holm_rejects(p, a), (p, a)


def test_holm_rejects_bad_pvalues():
    with pytest.raises(ValueError, match=r"pvalues\[1\]"):
        holm([0.1, 1.5])
    with pytest.raises(ValueError, match=r"pvalues\[0\]"):
        holm([float("nan")])


# ----------------------------------------------------------------------------------------------
# Hedges' d_z and degenerate data


def test_hedges_dz():
    # J(4) = Gamma(2) / (sqrt(2) Gamma(1.5)) = 1 / (sqrt(2) * sqrt(pi) / 2)
    assert hedges_correction(4) == pytest.approx(2 / math.sqrt(2 * math.pi), rel=1e-14)
    for df in (5, 10, 30, 100):
        assert hedges_correction(df) == pytest.approx(1 - 3 / (4 * df - 1), rel=2e-3)
    assert hedges_correction(1) == 0.0
    d = np.array([0.2, 0.5, -0.1, 0.4, 0.3])
    assert hedges_dz(d) == pytest.approx(hedges_correction(4) * d.mean() / d.std(ddof=1))
    assert math.isnan(hedges_dz([1.0, 2.0]))  # J(1) = 0: undefined
    assert math.isnan(hedges_dz(np.zeros(4)))  # no spread: undefined, never +-inf
    assert math.isnan(hedges_dz(np.full(4, -0.5)))
    with pytest.raises(ValueError):
        hedges_dz([1.0])


def test_constant_differences_are_flagged_degenerate():
    zero = paired_ate([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert zero.degenerate and zero.ci == (0.0, 0.0)
    assert math.isnan(zero.p_t) and math.isnan(zero.dz)  # no p-value as if it were evidence
    assert zero.p_signflip == 1.0 and zero.sd == 0.0
    assert (zero.n_pos, zero.n_neg, zero.n_zero) == (0, 0, 3)
    const = paired_ate([1.5, 2.5, 3.5, 4.5], [1.0, 2.0, 3.0, 4.0])
    assert const.degenerate and const.ci == (0.5, 0.5)
    assert math.isnan(const.p_t) and math.isnan(const.dz)
    assert const.p_signflip == const.p_signflip_floor == 2 / 16  # the exact sign-flip p is kept
    d = const.to_dict()
    assert d["dz"] is None and d["p_t"] is None and d["degenerate"] is True
    assert "n/a, all seeds equal" in str(const)
    # a tiny spread is not degenerate
    assert not paired_ate([1.5, 2.5, 3.5, 4.5 + 1e-9], [1.0, 2.0, 3.0, 4.0]).degenerate


# ----------------------------------------------------------------------------------------------
# bootstrap methods, warnings and fallbacks


def test_small_sample_warning_for_percentile_and_bca():
    rng = np.random.default_rng(5)
    for method in ("percentile", "bca"):
        t, c = rng.normal(size=9), rng.normal(size=9)
        with pytest.warns(SmallSampleWarning, match=method):
            r = paired_ate(t, c, method=method, n_boot=500)
        assert r.method == method and "under-cover" in r.warning
        t, c = rng.normal(size=10), rng.normal(size=10)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            r = paired_ate(t, c, method=method, n_boot=500)
        assert r.warning is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for method in ("t", "bootstrap-t"):
            paired_ate(rng.normal(size=5), rng.normal(size=5), method=method, n_boot=500)


def test_bca_falls_back_to_t_on_ties():
    t = np.arange(12.0) + 0.25
    c = np.arange(12.0)  # every difference 0.25
    with pytest.warns(MethodFallbackWarning, match="fell back to t"):
        r = paired_ate(t, c, method="bca", n_boot=1000)
    assert (r.method, r.requested_method) == ("t", "bca")
    assert r.ci == (0.25, 0.25)
    assert "fell back to t" in r.warning
    assert "fallback from bca" in str(r)
    # small n: both the small-sample note and the fallback are recorded
    with pytest.warns(SmallSampleWarning), pytest.warns(MethodFallbackWarning):
        r = paired_ate([1.0, 2.0, 3.0], [0.0, 1.0, 2.0], method="bca", n_boot=200)
    assert "under-cover" in r.warning and "fell back" in r.warning and r.method == "t"


def test_bootstrap_t_falls_back_to_t_when_unbounded():
    # n = 2, 3: 1/2 and 1/9 of all resamples have zero spread (t* = +-inf), beyond the 2.5% tails
    for t, c in (([1.0, 2.0], [0.5, 0.9]), ([1.0, 2.0, 4.0], [0.5, 0.9, 1.0])):
        with pytest.warns(MethodFallbackWarning, match="bootstrap-t"):
            r = paired_ate(t, c, method="bootstrap-t", n_boot=1000)
        assert (r.method, r.requested_method) == ("t", "bootstrap-t")
        assert r.ci == paired_ate(t, c).ci
    # n = 4: 4/256 = 1.6% < 2.5%, so the interval is finite
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = paired_ate([1.0, 2.0, 4.0, 3.0], [0.5, 0.9, 1.0, 0.1], method="bootstrap-t")
    assert r.method == "bootstrap-t" and all(map(math.isfinite, r.ci))


def test_bootstrap_is_deterministic_and_seeded():
    rng = np.random.default_rng(9)
    t, c = rng.normal(size=12), rng.normal(size=12)
    for method in ("bootstrap-t", "bca", "percentile"):
        a = paired_ate(t, c, method=method, n_boot=2000, seed=3)
        assert a == paired_ate(t, c, method=method, n_boot=2000, seed=3)
        assert a.ci != paired_ate(t, c, method=method, n_boot=2000, seed=4).ci
        assert a.ci[0] < a.ate < a.ci[1] and a.method == method
        # the public path is the vectorised core used by the coverage simulation
        lo, hi = stats._boot_intervals((t - c)[None], 0.95, method, 2000,
                                       np.random.default_rng(3))
        assert a.ci == (lo[0], hi[0])


def test_bca_and_percentile_agree_with_scipy_bootstrap():
    rng = np.random.default_rng(21)
    d = rng.gamma(2.0, 1.0, 30)  # skewed, so BCa differs from percentile
    for method, ref_method in (("bca", "BCa"), ("percentile", "percentile")):
        r = paired_ate(d, np.zeros_like(d), method=method, n_boot=20_000, seed=1)
        ref = scipy.stats.bootstrap((d,), np.mean, method=ref_method, n_resamples=20_000,
                                    confidence_level=0.95, rng=np.random.default_rng(2))
        width = ref.confidence_interval.high - ref.confidence_interval.low
        assert abs(r.ci[0] - ref.confidence_interval.low) < 0.05 * width
        assert abs(r.ci[1] - ref.confidence_interval.high) < 0.05 * width


def test_row_quantiles_match_numpy():
    rng = np.random.default_rng(0)
    S = np.sort(rng.normal(size=(6, 101)), axis=1)
    q = np.array([0.0, 0.025, 0.3333, 0.5, 0.975, 1.0])
    got = stats._row_quantiles(S, q)
    assert got == pytest.approx([np.quantile(S[i], q[i]) for i in range(6)], rel=1e-12)
    assert np.isnan(stats._row_quantiles(S[:1], np.array([np.nan])))[0]


# ----------------------------------------------------------------------------------------------
# coverage at n = 5 (DESIGN.md): t 0.95, bootstrap-t 0.95, percentile 0.84, BCa 0.83

MU = 0.3


def _coverage_data():
    return np.random.default_rng(20240607).normal(MU, 1.0, size=(4000, 5))


def test_t_coverage_n5():
    D = _coverage_data()
    hits = 0
    for row in D:  # the public function, 4000 datasets
        lo, hi = paired_ate(row, np.zeros(5)).ci
        hits += lo <= MU <= hi
    cov = hits / len(D)
    print(f"t coverage at n=5: {cov:.4f}")
    assert abs(cov - 0.95) <= 0.012


@pytest.mark.slow
def test_bootstrap_coverage_n5():
    D = _coverage_data()
    rng = np.random.default_rng(1)
    cov = {}
    for method in ("bootstrap-t", "percentile", "bca"):
        n_boot = 2000 if method == "bootstrap-t" else 1000  # t* tails need more resamples
        lo, hi = zip(*(stats._boot_intervals(D[i:i + 500], 0.95, method, n_boot, rng)
                       for i in range(0, len(D), 500)))
        lo, hi = np.concatenate(lo), np.concatenate(hi)
        cov[method] = float(np.mean((lo <= MU) & (MU <= hi)))
    print("bootstrap coverage at n=5:", cov)
    assert abs(cov["bootstrap-t"] - 0.95) <= 0.012
    assert cov["percentile"] < 0.88 and cov["bca"] < 0.88  # why they warn below n = 10


# ----------------------------------------------------------------------------------------------
# input validation


def test_bad_inputs():
    with pytest.raises(ValueError, match="5 values and control has 4"):
        paired_ate(np.ones(5), np.ones(4))
    with pytest.raises(ValueError, match="at least 2"):
        paired_ate([1.0], [0.0])
    with pytest.raises(ValueError, match=r"treatment\[3\].*seed index 3"):
        paired_ate([1.0, 2.0, 3.0, float("nan"), 5.0], np.zeros(5))
    with pytest.raises(ValueError, match=r"control\[1\].*seed index 1"):
        paired_ate(np.zeros(3), [0.0, float("inf"), 1.0])
    with pytest.raises(ValueError, match="seed index 0"):
        paired_ate([1e308, 0.0], [-1e308, 0.0])
    with pytest.raises(ValueError, match="1-D"):
        paired_ate(np.ones((2, 3)), np.ones((2, 3)))
    with pytest.raises(ValueError, match="t, bootstrap-t, bca, percentile"):
        paired_ate(np.ones(3), np.zeros(3), method="bootstrap")
    for level in (0, 1, 1.5, -0.1, 95):
        with pytest.raises(ValueError, match="level"):
            paired_ate(np.ones(3), np.zeros(3), level=level)
    with pytest.raises(ValueError, match="n_boot"):
        paired_ate(np.arange(3.0), np.zeros(3), method="percentile", n_boot=0)
    with pytest.raises(ValueError, match="seed"):
        paired_ate(np.arange(3.0), np.zeros(3), method="bca", seed=None)
    with pytest.raises(ValueError, match="finite"):
        sign_flip_pvalue([1.0, float("nan")])


# ----------------------------------------------------------------------------------------------
# the result object


def test_result_is_frozen_with_the_specified_fields():
    r = paired_ate([1.0, 2.0, 3.5], [0.5, 2.5, 3.0])
    assert [f.name for f in dataclasses.fields(PairedATE)] == [
        "ate", "ci", "method", "requested_method", "level", "n", "differences", "sd", "dz",
        "n_pos", "n_neg", "n_zero", "median", "p_t", "p_signflip", "p_signflip_floor",
        "degenerate", "warning"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.ate = 0.0


def test_to_dict_json_round_trip():
    rng = np.random.default_rng(4)
    results = [
        paired_ate(rng.normal(size=6), rng.normal(size=6)),
        paired_ate([1.0, 2.0], [0.0, 0.5]),  # dz NaN -> None
        paired_ate([1.0, 2.0, 3.0], [0.0, 1.0, 2.0]),  # degenerate: dz, p_t NaN -> None
    ]
    with pytest.warns(MethodFallbackWarning):
        results.append(paired_ate(np.full(10, 2.0), np.ones(10), method="bca", n_boot=100))
    for r in results:
        d = r.to_dict()
        s = json.dumps(d, allow_nan=False)
        assert json.loads(s) == d
        assert isinstance(d["ci"], list) and isinstance(d["differences"], list)
    r = results[0]
    assert PairedATE.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    for bad, match in [({**r.to_dict(), "n": "5"}, "'n' must be an integer"),
                       ({**r.to_dict(), "ci": [0.0]}, "'ci' must be a list of 2"),
                       ({k: v for k, v in r.to_dict().items() if k != "p_t"}, "missing.*p_t"),
                       ({**r.to_dict(), "degenerate": 1}, "degenerate")]:
        with pytest.raises(ValueError, match=match):
            PairedATE.from_dict(bad)
    assert results[1].to_dict()["dz"] is None and math.isnan(
        PairedATE.from_dict(results[1].to_dict()).dz)


def test_str_is_one_line_summary():
    r = paired_ate([0.61, 0.52, 0.70, 0.58, 0.66], [0.60, 0.50, 0.71, 0.55, 0.64])
    s = str(r)
    assert "\n" not in s
    est, lo, hi = stats.format_estimate(r.ate, *r.ci)
    assert s.startswith(f"ATE {est} [{lo}, {hi}] (t, 95%), n=5, p_t={r.p_t:.2g}, ")
    assert f"p_signflip={r.p_signflip:.4g} (floor 0.0625)" in s
    assert s.endswith(f"d_z={r.dz:.2f}, +/-/0 4/1/0")
    tiny = paired_ate([1e-6, 3e-6, 2e-6], [0.0, 0.0, 0.0], level=0.9)
    assert "(t, 90%)" in str(tiny)


def test_format_estimate_follows_the_interval_width():
    f = stats.format_estimate
    assert f(0.01234, 0.0041, 0.0206) == ("+0.0123", "+0.0041", "+0.0206")  # half-width 0.0083
    # an effect of 1e-4 is never shown as +0.0000 [-0.0000, +0.0000]
    assert f(1e-4, -2e-5, 2.2e-4) == ("+0.00010", "-0.00002", "+0.00022")
    assert f(12.345, 2.0, 22.7) == ("+12", "+2", "+23")
    assert f(0.5, 0.5, 0.5) == ("+0.5000", "+0.5000", "+0.5000")  # zero width: 4 significant
    assert f(1e-12, 0.5e-12, 1.5e-12) == ("+1.00e-12", "+5.00e-13", "+1.50e-12")
    assert f(math.nan, 0.0, 1.0)[0] == "n/a"


# ----------------------------------------------------------------------------------------------
# Holm over a run's tests, and what n = 5 can reject


def test_holm_family_adjusts_the_t_p_values_and_can_reject_at_n5():
    # a 5/5-seed effect with p_t < 0.01 stays significant after Holm over 3 metrics
    rng = np.random.default_rng(3)
    c = rng.normal(0.5, 0.1, 5)
    strong = paired_ate(c - np.array([0.050, 0.061, 0.048, 0.055, 0.058]), c)
    assert strong.p_t < 0.01 and strong.n_neg == 5
    assert strong.p_signflip == 0.0625  # the sign-flip floor could never get there
    weak = paired_ate(c + rng.normal(0, 0.1, 5), c)
    const = paired_ate(np.array([1.0, 1.25, 0.75, 1.5, 1.0]), np.array([0.5, 0.75, 0.25, 1.0, 0.5]))
    assert const.degenerate
    adj = stats.holm_family([strong, weak, const])
    assert adj[0] == pytest.approx(holm([strong.p_t, weak.p_t, 1.0])[0]) and adj[0] < 0.05
    assert adj[1] == pytest.approx(holm([strong.p_t, weak.p_t, 1.0])[1])
    assert adj[2] is None  # degenerate: no p-value, but it still counts in the family
    # and the t CI is consistent with p_t
    for r in (strong, weak):
        assert (r.ci[0] > 0 or r.ci[1] < 0) == (r.p_t < 0.05)


def test_signflip_seeds_needed():
    assert stats.signflip_seeds_needed(1) == 6      # 2/64 = 0.031 <= 0.05 < 2/32
    assert stats.signflip_seeds_needed(3) == 7      # 3 * 2/128 = 0.047
    assert stats.signflip_seeds_needed(9) == 9      # 9 * 2/512 = 0.035; 9 * 2/256 = 0.07
    for m in (1, 3, 9, 12):
        n = stats.signflip_seeds_needed(m)
        assert m * sign_flip_floor(n) <= 0.05 < m * sign_flip_floor(n - 1)


# ----------------------------------------------------------------------------------------------
# seeds needed (paired t power, noncentral t)


def test_seeds_needed_matches_published_gpower_values():
    # G*Power 3.1, "t tests - Means: difference between two dependent means (matched pairs)",
    # a priori, two tails, alpha 0.05, power 0.80: d_z 0.2 -> 199, 0.5 -> 34, 0.8 -> 15, 1.0 -> 10
    for dz, n in ((0.2, 199), (0.5, 34), (0.8, 15), (1.0, 10)):
        assert stats.seeds_needed(1.0, dz, 0.95, 0.8) == n
        assert stats.seeds_needed(0.01, dz * 0.01, 0.95, 0.8) == n  # only the ratio matters
    assert stats.t_power(10, 1.0, 1.0) == pytest.approx(0.8031, abs=1e-4)   # G*Power's actual power
    assert stats.t_power(34, 1.0, 0.5) == pytest.approx(0.8078, abs=1e-4)
    assert stats.seeds_needed(1.0, 0.0) is None
    assert stats.seeds_needed(0.0, 0.3) == 2
    with pytest.raises(ValueError, match="power"):
        stats.seeds_needed(1.0, 0.5, power=1.0)
    with pytest.raises(ValueError, match="sd"):
        stats.seeds_needed(-1.0, 0.5)


def test_t_power_agrees_with_simulation():
    rng = np.random.default_rng(11)
    for n, dz in ((5, 1.5), (8, 1.0)):
        D = rng.normal(dz, 1.0, size=(20000, n))
        m, sd = D.mean(axis=1), D.std(axis=1, ddof=1)
        p = 2 * scipy.stats.t.sf(np.abs(m / (sd / math.sqrt(n))), n - 1)
        sim = float(np.mean(p < 0.05))
        assert sim == pytest.approx(stats.t_power(n, 1.0, dz), abs=0.01), (n, dz, sim)
    n = stats.seeds_needed(1.0, 1.5)
    assert stats.t_power(n, 1.0, 1.5) >= 0.8 > stats.t_power(n - 1, 1.0, 1.5)
