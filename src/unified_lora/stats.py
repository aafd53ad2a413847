"""The statistics behind every verdict this project prints (`unified-lora compare`, the demo, the quality benchmark's
tables): Student's t without scipy (it is not a dependency), the exact McNemar test of two scorings of the same rows,
and the difference of two groups of runs over seeds (paired by seed where the seeds pair, else Welch)."""

from __future__ import annotations

import functools
import math
import statistics

LEVEL = 0.95  # two-sided: a verdict is a difference beyond the 97.5 % point of Student's t


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_p_value(t: float, df: float) -> float:
    """Two-sided p-value P(|T| >= |t|) of Student's t with `df` (> 0, not necessarily whole) degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


@functools.lru_cache(maxsize=None)
def t_critical(df: float, level: float = LEVEL) -> float:
    """The two-sided critical value of Student's t: P(|T| > t) = 1 − level (4.303 at 2 df, 2.776 at 4 df), by
    bisection on `t_p_value`; no scipy (it is not a dependency of this project)."""
    alpha = 1.0 - level
    lo, hi = 0.0, 1.0
    while t_p_value(hi, df) > alpha:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_p_value(mid, df) > alpha:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2.0


def mcnemar(x: str, y: str) -> dict:
    """The paired comparison of two scorings of the same rows (strings of "1" right / "0" wrong, one character a row):
    b = rows only x gets right, c = rows only y gets right, and the exact two-sided McNemar p-value (a binomial test
    of b against b + c trials at 1/2). Rows both get right or both get wrong say nothing about which is better."""
    b = sum(1 for u, v in zip(x, y) if u == "1" and v == "0")
    c = sum(1 for u, v in zip(x, y) if u == "0" and v == "1")
    n, k = b + c, min(b, c)
    # 2 * P(X <= k), X ~ Binomial(n, 1/2), summed in logs: exact integers (math.comb / 2**n) took seconds at 10,000
    # discordant rows and minutes at 50,000, and 2**-n underflows a float past n = 1074
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(logs)
    p = min(1.0, 2 * math.exp(top) * sum(math.exp(x - top) for x in logs))
    return {"b": b, "c": c, "p": p}


def without_rounding(diff: float, se: float, values) -> tuple[float, float, bool]:
    """(Δ, SE, no_spread) with a spread at the float rounding of `values` (1e-12 × the largest |value|) taken for none:
    0.9 − 0.8 and 0.8 − 0.7 differ in their last bits, and their SE of 6e-17 gave t = 1.6e15; so is a Δ at that
    rounding beside it (0.1 + 0.2 against 0.3: 6e-17, which read as no spread where the runs scored the same).
    `no_spread`: SE 0 with Δ not 0, where t = Δ/0 is no test (an infinite t, p 0, read as a certain difference from
    two seeds). `seed_difference`'s rule, and benchmarks/quality/report.py's."""
    rounding = 1e-12 * max(abs(v) for v in values)
    if se <= rounding:
        se = 0.0
        if abs(diff) <= rounding:
            diff = 0.0
    return diff, se, se == 0 and diff != 0


def seed_difference(a: dict, b: dict, level: float = LEVEL) -> dict:
    """mean(a) − mean(b) for two groups of runs, each {seed: value}, with its standard error and Student's t test,
    two-sided at `level`. Groups that share two or more seeds pair on those: Δ = the mean of the per-seed differences,
    SE = sd(differences) / √n, df = n − 1 (the same seed gives both runs the same data order and initialisation, so
    their difference is the method's); the runs of a seed the other group lacks are left out of the test
    (`left_out`, their seeds), not out of the means. Otherwise Welch: SE² = s_a²/n_a + s_b²/n_b, with the
    Welch–Satterthwaite df. Returns {"diff", "se", "df", "t", "p", "crit", "test", "n_a", "n_b", "sd_a", "sd_b",
    "mean_a", "mean_b", "left_out", "no_spread"}; "test" is "paired", "Welch", or "none" (a group of one run: no
    standard error, se/p NaN). "no_spread": the differences (paired), or each group's values (Welch), are all the same
    up to float rounding while Δ is not 0: SE 0 and t = Δ/0 undefined, so t and p are NaN, not an infinite t and p 0
    that read as a certain difference from two seeds (a Δ of 0 with SE 0, or one at float rounding, is t 0, p 1,
    `diff` 0). The values must be finite."""
    va, vb = [float(v) for v in a.values()], [float(v) for v in b.values()]
    if not va or not vb:
        raise ValueError("seed_difference: each group needs at least one run")
    if not all(math.isfinite(v) for v in va + vb):  # (before statistics.stdev, which fails on a NaN otherwise)
        raise ValueError(f"seed_difference: the values must be finite, got {va} and {vb}")
    nan = float("nan")
    out = {"mean_a": statistics.fmean(va), "mean_b": statistics.fmean(vb), "n_a": len(va), "n_b": len(vb),
           "sd_a": statistics.stdev(va) if len(va) > 1 else nan, "sd_b": statistics.stdev(vb) if len(vb) > 1 else nan}
    shared = [s for s in a if s in b]
    out["left_out"] = {"a": [s for s in a if s not in b], "b": [s for s in b if s not in a]} if len(shared) > 1 else \
        {"a": [], "b": []}
    if len(shared) > 1:
        d = [float(a[s]) - float(b[s]) for s in shared]
        diff, se, df, test = statistics.fmean(d), statistics.stdev(d) / len(d) ** 0.5, len(d) - 1, "paired"
    elif len(va) > 1 and len(vb) > 1:
        diff, test = out["mean_a"] - out["mean_b"], "Welch"
        qa, qb = out["sd_a"] ** 2 / len(va), out["sd_b"] ** 2 / len(vb)
        se = (qa + qb) ** 0.5
        df = ((qa + qb) ** 2 / (qa ** 2 / (len(va) - 1) + qb ** 2 / (len(vb) - 1)) if qa + qb > 0
              else len(va) + len(vb) - 2)
    else:
        return dict(out, diff=out["mean_a"] - out["mean_b"], se=nan, df=nan, t=nan, p=nan, crit=nan, test="none",
                    no_spread=False)
    diff, se, no_spread = without_rounding(diff, se, va + vb)
    if no_spread:
        return dict(out, diff=diff, se=se, df=df, t=nan, p=nan, crit=t_critical(df, level), test=test, no_spread=True)
    t = diff / se if se > 0 else 0.0
    p = 1.0 if diff == 0 else t_p_value(t, df)
    return dict(out, diff=diff, se=se, df=df, t=t, p=p, crit=t_critical(df, level), test=test, no_spread=False)


__all__ = ["LEVEL", "betainc", "mcnemar", "seed_difference", "t_critical", "t_p_value", "without_rounding"]
