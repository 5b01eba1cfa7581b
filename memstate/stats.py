"""Seed-paired effect estimates: the ATE of a treatment over a control, run on the same seeds.

A branch-and-hold experiment gives, for each seed ``i``, one metric under the treatment and one
under the control. The per-seed difference ``d_i = treatment_i - control_i`` is the unit of
analysis; the average treatment effect (ATE) is their mean. (``memstate.Experiment`` passes the
memory-kept arm first, so its effects are memory kept minus memory perturbed, the seed's sign:
docs/experiments.md.) Seed counts are small (3-10), so the
defaults follow the measured coverage of nominal 95% intervals at n = 5 with normal differences
(DESIGN.md, "Statistics defaults"; re-measured by ``tests/test_stats.py``)::

    method        coverage at n = 5     use
    t             0.95                  default
    bootstrap-t   0.95                  opt-in, for skewed differences
    percentile    0.84                  opt-in; SmallSampleWarning below n = 10
    bca           0.83                  opt-in; SmallSampleWarning below n = 10

The headline p-value ``p_t`` is the paired t-test's, consistent with the default interval:
the t CI at ``level`` excludes 0 exactly when ``p_t < 1 - level``. ``holm_family`` adjusts the
headline p-values of every test a run reports. The exact two-sided sign-flip randomisation
test is reported beside it as a distribution-free robustness column: under the sharp null of
no effect on any seed every sign pattern of the differences is equally likely, so
``p = #{patterns s : |sum s_i d_i| >= |sum d_i|} / 2^n``. The observed pattern and its mirror
image always count, so ``p >= 2 / 2^n`` (the *floor*): with n <= 5 seeds it can never reach
0.05, and after Holm over m tests its smallest value is ``m * floor``; it must therefore never
be the test that Holm adjusts (``signflip_seeds_needed`` says how many seeds it would need).

Usage::

    r = memstate.stats.paired_ate(loss_with_reset, loss_without, level=0.95)
    print(r)          # ATE +0.012 [-0.004, +0.029] (t, 95%), n=5, p_t=0.11, p_signflip=...
    r.to_dict()       # JSON-able, no NaN/inf (None instead)
    memstate.stats.holm_family([r1, r2, r3])          # Holm over the headline p_t
    memstate.stats.seeds_needed(r.sd, 0.01)           # seeds for 80% power at 0.01

Conventions (each one tested):

- ``sd`` is the sample standard deviation (ddof = 1) of the differences.
- Zero-variance differences (every seed gives the same difference ``c``, including the A/A
  case c = 0) are flagged ``degenerate``: there is no variance to test against, so ``p_t`` and
  ``dz`` are None (NaN in the object, None in ``to_dict``; shown "n/a, all seeds equal") rather
  than p = 0 and d_z = inf as if that were evidence. The t interval is the sd -> 0 limit
  ``(c, c)``; ``p_signflip`` stays honest (the floor for ``c != 0``, 1.0 for ``c == 0``).
  ``holm_family`` counts a degenerate test in the family as p = 1 (conservative) and reports
  None for it.
- ``n_pos``, ``n_neg``, ``n_zero`` count seeds with d > 0, d < 0 and d == 0 (ties are shown).
- ``dz`` is Cohen's d_z (mean / sd) times Hedges' exact small-sample factor
  ``J(df) = Gamma(df/2) / (sqrt(df/2) Gamma((df-1)/2))``, df = n - 1. At n = 2 J is 0 (the mean
  of a t with one degree of freedom does not exist), so ``dz`` is NaN there.
- ``bca`` falls back to ``t`` (not to ``bootstrap-t``) when its interval is NaN: the usual cause
  is tied differences, where the jackknife acceleration is 0/0 and the bootstrap distribution
  is degenerate - and bootstrap-t, whose resampled standard errors are then 0, fails the same
  way. ``bootstrap-t`` likewise falls back to ``t`` when its interval is not finite: at n = 2
  and 3, 1/2 and 1/9 of all resamples have zero spread (t* = +-inf), more than the 2.5% tail
  of a 95% interval, so bootstrap-t needs n >= 4. Each fallback emits a
  ``MethodFallbackWarning`` and is recorded in ``PairedATE.warning``; ``method`` is the method
  actually used and ``requested_method`` the one asked for.
- Bootstraps draw ``n_boot`` resamples from ``numpy.random.default_rng(seed)`` (default seed 0),
  so a result is a pure function of its inputs.
- ``sign_flip_pvalue`` enumerates all 2^n patterns for n <= 20 (exact). Above that it uses a
  Monte Carlo randomisation test with a fixed seed: ``p = (1 + hits) / (1 + n_mc)`` over
  ``n_mc`` random sign patterns (valid, slightly conservative); its floor is ``1 / (1 + n_mc)``.

scipy is needed for the Student-t and normal distributions (imported on first use).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "PairedATE",
    "paired_ate",
    "sign_flip_pvalue",
    "sign_flip_floor",
    "holm",
    "holm_family",
    "seeds_needed",
    "t_power",
    "signflip_seeds_needed",
    "format_estimate",
    "hedges_dz",
    "hedges_correction",
    "SmallSampleWarning",
    "MethodFallbackWarning",
    "METHODS",
    "MAX_EXACT_SIGNFLIP",
]

#: Interval methods accepted by ``paired_ate``; the first is the default.
METHODS: Tuple[str, ...] = ("t", "bootstrap-t", "bca", "percentile")
#: Largest n for which ``sign_flip_pvalue`` enumerates all 2^n sign patterns.
MAX_EXACT_SIGNFLIP = 20
#: Random sign patterns drawn by the Monte Carlo sign-flip test when n > MAX_EXACT_SIGNFLIP.
DEFAULT_N_MC = 100_000
#: Below this many seeds percentile and BCa intervals under-cover (0.84 / 0.83 at n = 5).
SMALL_N = 10


class SmallSampleWarning(UserWarning):
    """A percentile or BCa bootstrap interval was asked for with fewer than 10 seeds."""


class MethodFallbackWarning(UserWarning):
    """The requested interval method was undefined for this data; another one was used."""


def _scipy():
    try:
        import scipy.special
    except ImportError as e:  # pragma: no cover - scipy is installed wherever tests run
        raise ImportError(
            "memstate.stats needs scipy for the Student-t and normal distributions: "
            "pip install scipy") from e
    return scipy


# ----------------------------------------------------------------------------------------------
# result


@dataclass(frozen=True)
class PairedATE:
    """A seed-paired average treatment effect.

    Units are those of the metric compared (e.g. nats of loss); ``differences`` are
    ``treatment - control`` per seed (the first argument of ``paired_ate`` minus the second),
    in seed order.

    Attributes:
        ate: mean of the differences.
        ci: (low, high) confidence interval for the ATE, from ``method`` at ``level``.
        method: interval method actually used (differs from ``requested_method`` after a
            fallback).
        requested_method: interval method asked for.
        level: confidence level in (0, 1).
        n: number of seeds (pairs).
        differences: per-seed differences.
        sd: sample standard deviation (ddof = 1) of the differences.
        dz: Cohen's d_z = ate / sd with Hedges' small-sample correction (NaN at n = 2 and
            when ``degenerate``).
        n_pos, n_neg, n_zero: seeds with a difference > 0, < 0 and == 0.
        median: median of the differences.
        p_t: two-sided paired t-test p-value, the headline p-value (NaN when ``degenerate``).
        p_signflip: two-sided sign-flip randomisation p-value (exact for n <= 20), the
            distribution-free robustness check.
        p_signflip_floor: smallest value ``p_signflip`` can take at this n (2 / 2^n if exact).
        degenerate: every seed gave the same difference (sd == 0): no p_t, no d_z.
        warning: why the result deserves a second look (small-n or fallback), else None.
    """

    ate: float
    ci: Tuple[float, float]
    method: str
    requested_method: str
    level: float
    n: int
    differences: Tuple[float, ...]
    sd: float
    dz: float
    n_pos: int
    n_neg: int
    n_zero: int
    median: float
    p_t: float
    p_signflip: float
    p_signflip_floor: float
    degenerate: bool
    warning: Optional[str] = None

    @property
    def n_positive(self) -> int:
        """Seeds with a difference > 0 (alias of ``n_pos``)."""
        return self.n_pos

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-able dict (``json.dumps(..., allow_nan=False)`` works): tuples become
        lists and non-finite floats (NaN, +-inf) become None."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, float):
                out[key] = _finite_or_none(value)
            elif isinstance(value, (tuple, list)):
                out[key] = [_finite_or_none(v) if isinstance(v, float) else v for v in value]
        return out

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "PairedATE":
        """Inverse of ``to_dict`` (None floats come back as NaN). Raises ValueError naming the
        field for unknown, missing or mistyped fields."""
        if not isinstance(d, dict):
            raise ValueError(f"a PairedATE dict is expected, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown PairedATE fields: {sorted(unknown)}")
        missing = names - set(d) - {"warning"}
        if missing:
            raise ValueError(f"missing PairedATE fields: {sorted(missing)}")

        def flt(key, v):
            if v is None:
                return math.nan
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"PairedATE field {key!r} must be a number or null, got {v!r}")
            return float(v)

        def integer(key):
            v = d[key]
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"PairedATE field {key!r} must be an integer, got {v!r}")
            return v

        def pair(key, length=None):
            v = d[key]
            if not isinstance(v, list) or (length is not None and len(v) != length):
                raise ValueError(f"PairedATE field {key!r} must be a list"
                                 + (f" of {length}" if length else "") + f", got {v!r}")
            return tuple(flt(key, x) for x in v)

        kw = dict(d)
        for key in ("ate", "level", "sd", "dz", "median", "p_signflip", "p_signflip_floor", "p_t"):
            kw[key] = flt(key, kw[key])
        kw["ci"] = pair("ci", 2)
        kw["differences"] = pair("differences")
        for key in ("n", "n_pos", "n_neg", "n_zero"):
            kw[key] = integer(key)
        for key in ("method", "requested_method"):
            if not isinstance(kw[key], str):
                raise ValueError(f"PairedATE field {key!r} must be a string, got {kw[key]!r}")
        if not isinstance(kw["degenerate"], bool):
            raise ValueError(f"PairedATE field 'degenerate' must be true or false, got {kw['degenerate']!r}")
        if kw.get("warning") is not None and not isinstance(kw["warning"], str):
            raise ValueError(f"PairedATE field 'warning' must be a string or null, got {kw['warning']!r}")
        return cls(**kw)

    def __str__(self) -> str:
        lo, hi = self.ci
        est, flo, fhi = format_estimate(self.ate, lo, hi)
        method = self.method
        if self.method != self.requested_method:
            method = f"{self.method}, fallback from {self.requested_method}"
        p_t = "n/a, all seeds equal" if self.degenerate else f"{self.p_t:.2g}"
        dz = "n/a" if not math.isfinite(self.dz) else f"{self.dz:.2f}"
        return (f"ATE {est} [{flo}, {fhi}] ({method}, {self.level * 100:g}%), n={self.n}, "
                f"p_t={p_t}, p_signflip={self.p_signflip:.4g} (floor {self.p_signflip_floor:.4g}), "
                f"d_z={dz}, +/-/0 {self.n_pos}/{self.n_neg}/{self.n_zero}")


def format_estimate(ate: float, lo: float, hi: float) -> Tuple[str, str, str]:
    """Signed strings for an estimate and its interval, with as many decimals as the interval
    supports: two significant digits of the half-width ``(hi - lo) / 2``, and the estimate and
    bounds to the same decimal place (e.g. 0.01234 [0.0041, 0.0206]: half-width 0.0083, so
    "+0.0123", "+0.0041", "+0.0206"; 1e-4 [-2e-5, 2.2e-4]: "+0.00010", "-0.00002", "+0.00022"). A zero-width interval (degenerate data) keeps 4 significant digits of the
    estimate; very small or large numbers switch to exponent notation at that precision."""
    vals = (ate, lo, hi)
    if not all(math.isfinite(v) for v in vals):
        return tuple("n/a" if not math.isfinite(v) else f"{v:+.4g}" for v in vals)  # type: ignore
    half = (hi - lo) / 2
    if half > 0:
        decimals = 1 - math.floor(math.log10(half))  # two significant digits of the half-width
    elif ate != 0:
        decimals = 3 - math.floor(math.log10(abs(ate)))
    else:
        decimals = 0
    if -6 <= decimals <= 8:
        d = max(decimals, 0)
        return tuple(f"{v:+.{d}f}" for v in vals)  # type: ignore
    # exponent notation, same absolute precision relative to the largest magnitude
    top = max(abs(v) for v in vals) or 1.0
    sig = max(1, math.floor(math.log10(top)) + decimals)
    return tuple(f"{v:+.{sig}e}" for v in vals)  # type: ignore


def _finite_or_none(v: float) -> Optional[float]:
    return float(v) if math.isfinite(v) else None


# ----------------------------------------------------------------------------------------------
# input checking


def _as_1d(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        x = x.detach().cpu().double().numpy()
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a 1-D sequence of numbers: {e}") from e
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per seed), got shape {a.shape}")
    bad = np.flatnonzero(~np.isfinite(a))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{name}[{i}] is {a[i]!r}: every value must be finite "
                         f"(seed index {i}; {bad.size} non-finite in all)")
    return a


def _differences(treatment: Any, control: Any) -> np.ndarray:
    t = _as_1d(treatment, "treatment")
    c = _as_1d(control, "control")
    if t.shape != c.shape:
        raise ValueError(f"treatment has {t.size} values and control has {c.size}: "
                         "they must be paired seed by seed")
    with np.errstate(over="ignore"):
        d = t - c
    bad = np.flatnonzero(~np.isfinite(d))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"treatment[{i}] - control[{i}] overflows to {d[i]!r} (seed index {i})")
    return d


def _check_differences(differences: Any, min_n: int = 1) -> np.ndarray:
    d = _as_1d(differences, "differences")
    if d.size < min_n:
        raise ValueError(f"need at least {min_n} differences, got {d.size}")
    return d


def _check_level(level: float) -> float:
    try:
        level = float(level)
    except (TypeError, ValueError):
        raise ValueError(f"level must be a number in (0, 1), got {level!r}") from None
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1) (e.g. 0.95), got {level!r}")
    return level


# ----------------------------------------------------------------------------------------------
# effect size and p-values


def hedges_correction(df: int) -> float:
    """Hedges' exact small-sample factor J(df) = Gamma(df/2) / (sqrt(df/2) Gamma((df-1)/2)).

    ``E[J * d] = delta`` for a standardised mean difference with df degrees of freedom.
    J(1) = 0 (the expectation does not exist); J -> 1 - 3 / (4 df - 1) -> 1 as df grows.
    """
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df == 1:
        return 0.0
    return math.exp(math.lgamma(df / 2) - math.lgamma((df - 1) / 2)) / math.sqrt(df / 2)


def hedges_dz(differences: Any) -> float:
    """Standardised paired effect d_z = mean / sd (ddof = 1), times Hedges' J(n - 1).

    Needs n >= 2. NaN at n = 2 (J(1) = 0: the unbiased estimate is undefined) and for
    zero-variance differences (no spread to standardise by: reported as "all seeds equal",
    never as an infinite effect).
    """
    d = _check_differences(differences, min_n=2)
    n = d.size
    mean = float(d.mean())
    sd = float(d.std(ddof=1))
    if n == 2:
        return math.nan
    if sd == 0.0:
        return math.nan
    return hedges_correction(n - 1) * mean / sd


def sign_flip_floor(n: int, *, n_mc: int = DEFAULT_N_MC) -> float:
    """Smallest p-value ``sign_flip_pvalue`` can return for n differences: 2 / 2^n when exact
    (n <= 20), ``1 / (1 + n_mc)`` for the Monte Carlo test above that."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n <= MAX_EXACT_SIGNFLIP:
        return 2.0 / 2.0 ** n
    return 1.0 / (1.0 + n_mc)


def _tie_tol(d: np.ndarray) -> float:
    # sums of the same values in a different order/sign agree to ~n * eps * sum|d|; anything
    # within this is a tie (counted as ">=", the conservative side).
    return 1e-12 * max(d.size, 1) * float(np.abs(d).sum())


def sign_flip_pvalue(differences: Any, *, n_mc: int = DEFAULT_N_MC, seed: int = 0) -> float:
    """Two-sided sign-flip randomisation p-value for a zero mean of paired differences.

    ``p = #{s in {-1,+1}^n : |sum s_i d_i| >= |sum d_i|} / 2^n``, enumerating all 2^n patterns
    for n <= 20 (exact; never below 2 / 2^n). Sums within a relative 1e-12 * n of the observed
    one count as ties. For n > 20: ``(1 + hits) / (1 + n_mc)`` over ``n_mc`` random patterns
    from ``numpy.random.default_rng(seed)`` (deterministic). All-zero differences give 1.0.
    """
    d = _check_differences(differences, min_n=1)
    n = d.size
    obs = abs(float(d.sum()))
    tol = _tie_tol(d)
    if n <= MAX_EXACT_SIGNFLIP:
        # All 2^n signed sums by doubling: pattern 0 is all '+', 2^n - 1 its mirror. 8 MiB at n=20.
        sums = np.zeros(1)
        for x in d:
            sums = np.concatenate((sums + x, sums - x))
        obs = abs(float(sums[0]))
        return float(np.count_nonzero(np.abs(sums) >= obs - tol)) / sums.size
    if n_mc < 1:
        raise ValueError(f"n_mc must be >= 1, got {n_mc}")
    rng = np.random.default_rng(seed)
    hits = 0
    chunk = max(1, 2_000_000 // n)
    done = 0
    while done < n_mc:
        k = min(chunk, n_mc - done)
        signs = rng.integers(0, 2, size=(k, n), dtype=np.int8) * 2 - 1
        hits += int(np.count_nonzero(np.abs(signs @ d) >= obs - tol))
        done += k
    return (1.0 + hits) / (1.0 + n_mc)


def holm(pvalues: Iterable[float]) -> List[float]:
    """Holm-Bonferroni adjusted p-values, in the input order.

    With the p-values sorted ascending, ``adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``:
    monotone in the sorted order, capped at 1, and for any level alpha < 1 ``adj_i <= alpha``
    exactly when Holm's step-down procedure at family-wise level alpha rejects hypothesis i.
    Empty in, empty out.
    """
    p = np.asarray(list(pvalues), dtype=np.float64)
    if p.ndim != 1:
        raise ValueError("holm takes a flat sequence of p-values")
    for i, v in enumerate(p):
        if not 0.0 <= v <= 1.0:  # also catches NaN
            raise ValueError(f"pvalues[{i}] = {v!r} is not a probability in [0, 1]")
    m = p.size
    if m == 0:
        return []
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adj_sorted = np.maximum.accumulate(scaled)
    adj = np.empty(m)
    adj[order] = adj_sorted
    return [float(v) for v in adj]


# ----------------------------------------------------------------------------------------------
# intervals, vectorised over rows of a (k, n) array of datasets


def _t_stats(D: np.ndarray, level: float):
    """Paired-t interval and two-sided p for each row of D; zero-variance rows per the module
    docstring (interval (c, c), p NaN). Returns (mean, sd, lo, hi, p)."""
    sp = _scipy()
    n = D.shape[1]
    mean = D.mean(axis=1)
    sd = D.std(axis=1, ddof=1)
    se = sd / math.sqrt(n)
    # scipy.special's ufuncs are what scipy.stats.t uses underneath, without its ~100 us per call
    q = sp.special.stdtrit(n - 1, 0.5 + level / 2)
    lo, hi = mean - q * se, mean + q * se
    with np.errstate(divide="ignore", invalid="ignore"):
        t = mean / se
    p = 2.0 * sp.special.stdtr(n - 1, -np.abs(t))
    p = np.where(se == 0, np.nan, np.minimum(p, 1.0))
    return mean, sd, lo, hi, p


def _row_quantiles(S: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Linear-interpolation quantile (numpy's default) of each sorted row of S at its own q;
    NaN where q is NaN."""
    k, B = S.shape
    q = np.asarray(q, dtype=np.float64)
    out = np.full(k, np.nan)
    ok = np.isfinite(q)
    if not ok.any():
        return out
    pos = np.clip(q[ok], 0.0, 1.0) * (B - 1)
    i0 = np.floor(pos).astype(np.int64)
    i1 = np.minimum(i0 + 1, B - 1)
    frac = pos - i0
    rows = np.flatnonzero(ok)
    a, b = S[rows, i0], S[rows, i1]
    with np.errstate(invalid="ignore"):
        out[ok] = np.where((frac == 0) | (a == b), a, a + frac * (b - a))
    return out


def _resample(D: np.ndarray, n_boot: int, rng: np.random.Generator, need_sd: bool):
    """Bootstrap means (and sds, ddof = 1) of each row: (k, n_boot) arrays."""
    k, n = D.shape
    idx = rng.integers(0, n, size=(k, n_boot, n))
    S = D[np.arange(k)[:, None, None], idx]
    means = S.mean(axis=2)
    sds = S.std(axis=2, ddof=1) if need_sd else None
    return means, sds


def _boot_intervals(D: np.ndarray, level: float, method: str, n_boot: int,
                    rng: np.random.Generator):
    """(lo, hi) of the bootstrap ``method`` for each row of D; NaN/inf where undefined."""
    sp = _scipy()
    k, n = D.shape
    alpha = 1.0 - level
    theta = D.mean(axis=1)
    means, sds = _resample(D, n_boot, rng, need_sd=(method == "bootstrap-t"))
    if method == "percentile":
        ms = np.sort(means, axis=1)
        q = np.full(k, alpha / 2)
        return _row_quantiles(ms, q), _row_quantiles(ms, 1 - q)
    if method == "bootstrap-t":
        se = D.std(axis=1, ddof=1) / math.sqrt(n)
        num = means - theta[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            tstar = num / (sds / math.sqrt(n))
        # zero-spread resamples: t* = 0 when the mean is also unchanged, else +-inf (kept: they
        # are genuine tail values; if they reach the quantile the interval is unbounded).
        tstar = np.where(sds == 0, np.where(num == 0, 0.0, np.copysign(np.inf, num)), tstar)
        ts = np.sort(tstar, axis=1)
        q = np.full(k, alpha / 2)
        tlo, thi = _row_quantiles(ts, q), _row_quantiles(ts, 1 - q)
        with np.errstate(invalid="ignore"):
            return theta - thi * se, theta - tlo * se
    if method == "bca":
        ms = np.sort(means, axis=1)
        # bias correction, ties at theta counted half (tied data put mass exactly on theta)
        prop = ((means < theta[:, None]).sum(axis=1)
                + 0.5 * (means == theta[:, None]).sum(axis=1)) / n_boot
        z0 = sp.special.ndtri(prop)
        # jackknife acceleration
        jack = (D.sum(axis=1, keepdims=True) - D) / (n - 1)
        dev = jack.mean(axis=1, keepdims=True) - jack
        with np.errstate(divide="ignore", invalid="ignore"):
            acc = (dev ** 3).sum(axis=1) / (6.0 * (dev ** 2).sum(axis=1) ** 1.5)
            zl = sp.special.ndtri(alpha / 2)
            zh = sp.special.ndtri(1 - alpha / 2)
            a1 = sp.special.ndtr(z0 + (z0 + zl) / (1 - acc * (z0 + zl)))
            a2 = sp.special.ndtr(z0 + (z0 + zh) / (1 - acc * (z0 + zh)))
        return _row_quantiles(ms, a1), _row_quantiles(ms, a2)
    raise AssertionError(method)  # pragma: no cover


# ----------------------------------------------------------------------------------------------
# the estimate


def paired_ate(treatment: Any, control: Any, *, level: float = 0.95, method: str = "t",
               n_boot: int = 10_000, seed: Any = 0) -> PairedATE:
    """Average treatment effect of seed-paired runs, with its interval and p-values.

    Args:
        treatment, control: one finite metric per seed, same length >= 2, paired by index
            (sequences, numpy arrays or CPU tensors).
        level: confidence level in (0, 1).
        method: ``"t"`` (default; paired Student-t), ``"bootstrap-t"`` (studentised bootstrap,
            for skewed differences), ``"bca"`` or ``"percentile"`` (both under-cover below
            n = 10 and warn with ``SmallSampleWarning`` there).
        n_boot: bootstrap resamples (bootstrap methods only).
        seed: seed of the ``numpy.random.Generator`` for the bootstrap (int or Generator; not
            None, so that results are reproducible).

    Fallbacks (``MethodFallbackWarning``, recorded in ``warning``): ``bca`` -> ``t`` when the
    BCa interval is NaN (tied differences, zero-variance bootstrap); ``bootstrap-t`` -> ``t``
    when its interval is not finite (at n <= 3 for any usual level).

    Raises:
        ValueError: unequal lengths, fewer than 2 pairs, a non-finite value (naming its seed
            index), an unknown method, a level outside (0, 1), or bad n_boot / seed.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    level = _check_level(level)
    d = _differences(treatment, control)
    n = d.size
    if n < 2:
        raise ValueError(f"need at least 2 seed pairs, got {n}")

    if method != "t":
        if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
            raise ValueError(f"n_boot must be a positive int, got {n_boot!r}")
        if seed is None:
            raise ValueError("seed=None would make the bootstrap irreproducible; pass an int")

    notes: List[str] = []
    if method in ("percentile", "bca") and n < SMALL_N:
        msg = (f"{method} intervals under-cover with n={n} < {SMALL_N} seeds (measured coverage "
               f"of a nominal 95% interval at n=5: percentile 0.84, bca 0.83); prefer 't' or "
               f"'bootstrap-t'")
        warnings.warn(msg, SmallSampleWarning, stacklevel=2)
        notes.append(msg)

    D = d[None, :]
    mean, sd, tlo, thi, p_t = _t_stats(D, level)
    used = method
    lo, hi = float(tlo[0]), float(thi[0])
    if method != "t":
        rng = np.random.default_rng(seed)
        blo, bhi = _boot_intervals(D, level, method, int(n_boot), rng)
        blo, bhi = float(blo[0]), float(bhi[0])
        if method == "bca" and (math.isnan(blo) or math.isnan(bhi)):
            used = "t"
            msg = ("bca interval is NaN for these differences (ties or a zero-variance "
                   "bootstrap); fell back to t")
        elif method == "bootstrap-t" and not (math.isfinite(blo) and math.isfinite(bhi)):
            used = "t"
            msg = (f"bootstrap-t interval is unbounded ({blo}, {bhi}) (too many zero-spread "
                   f"resamples at n={n}); fell back to t")
        else:
            lo, hi = blo, bhi
            msg = None
        if msg is not None:
            warnings.warn(msg, MethodFallbackWarning, stacklevel=2)
            notes.append(msg)

    return PairedATE(
        ate=float(mean[0]),
        ci=(lo, hi),
        method=used,
        requested_method=method,
        level=level,
        n=n,
        differences=tuple(float(v) for v in d),
        sd=float(sd[0]),
        dz=hedges_dz(d),
        n_pos=int(np.count_nonzero(d > 0)),
        n_neg=int(np.count_nonzero(d < 0)),
        n_zero=int(np.count_nonzero(d == 0)),
        median=float(np.median(d)),
        p_t=float(p_t[0]),
        p_signflip=sign_flip_pvalue(d),
        p_signflip_floor=sign_flip_floor(n),
        degenerate=bool(sd[0] == 0.0),
        warning="; ".join(notes) if notes else None,
    )


# ----------------------------------------------------------------------------------------------
# families of tests and planning


def holm_family(results: Sequence[PairedATE]) -> List[Optional[float]]:
    """Holm-adjusted headline p-values (``p_t``) of every test a run reports, in input order.

    A degenerate result has no p-value: it is counted in the family as p = 1 (so the others
    are still corrected for all ``len(results)`` tests, the conservative choice) and gets None.
    """
    raw = [1.0 if r.degenerate else r.p_t for r in results]
    adj = holm(raw)
    return [None if r.degenerate else a for r, a in zip(results, adj)]


def signflip_seeds_needed(m: int, alpha: float = 0.05) -> int:
    """Smallest n whose exact sign-flip floor ``2 / 2^n`` can still reach ``alpha`` after Holm
    over ``m`` tests, i.e. ``m * 2 / 2^n <= alpha``."""
    if m < 1 or not 0 < alpha < 1:
        raise ValueError(f"need m >= 1 and 0 < alpha < 1, got m={m}, alpha={alpha}")
    n = 1
    while m * 2.0 / 2.0 ** n > alpha:
        n += 1
    return n


def t_power(n: int, sd: float, effect: float, level: float = 0.95) -> float:
    """Power of the two-sided paired t-test at significance ``1 - level`` with n pairs when the
    true mean difference is ``effect`` and the differences' sd is ``sd``:
    ``P(|T| > t_{1-alpha/2, n-1})`` with T noncentral t, df = n - 1, ncp = effect / sd * sqrt(n).
    """
    import scipy.stats

    level = _check_level(level)
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    df = n - 1
    crit = scipy.stats.t.ppf(0.5 + level / 2, df)
    ncp = abs(effect) / sd * math.sqrt(n)
    return float(scipy.stats.nct.sf(crit, df, ncp) + scipy.stats.nct.cdf(-crit, df, ncp))


def seeds_needed(sd: float, effect: float, level: float = 0.95, power: float = 0.8,
                 max_n: int = 1_000_000) -> Optional[int]:
    """Seeds (pairs) a two-sided paired t-test at significance ``1 - level`` needs to detect a
    true mean difference ``effect`` with probability ``power`` when the per-seed differences
    have standard deviation ``sd`` (same units as ``effect``). Noncentral t (``t_power``),
    exact, not the normal approximation. Returns the smallest n >= 2, or None when no n up to
    ``max_n`` suffices (e.g. ``effect == 0``). ``sd == 0`` with ``effect != 0`` gives 2.
    """
    level = _check_level(level)
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must be in (0, 1), got {power!r}")
    for name, v in (("sd", sd), ("effect", effect)):
        if not isinstance(v, (int, float, np.floating)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if sd < 0:
        raise ValueError(f"sd must be >= 0, got {sd!r}")
    if effect == 0:
        return None
    if sd == 0:
        return 2
    if t_power(max_n, sd, effect, level) < power:
        return None
    lo, hi = 1, 2  # power(lo) < power <= power(hi); power grows with n
    while t_power(hi, sd, effect, level) < power:
        lo, hi = hi, min(hi * 2, max_n)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if t_power(mid, sd, effect, level) >= power:
            hi = mid
        else:
            lo = mid
    return hi
