"""safetrade.evaluate.stats against independent references: scipy, published tables, hand computations, simulation."""

import math

import numpy as np
import pytest

from safetrade.evaluate import stats

scipy_stats = pytest.importorskip("scipy.stats", reason="scipy (pinned in constraints.txt) is the reference here")

Z95 = 1.959963984540054  # standard normal 97.5 % quantile


# ---------------------------------------------------------------------------------------------------------------
# Wilson


def test_wilson_matches_a_hand_computation_from_the_formula():
    # k = 12, n = 40: p̂ = 0.3, z² = 3.841459, denom = 1 + z²/n = 1.0960365,
    # centre = (0.3 + z²/80) / denom = 0.3175243, half = z·sqrt(0.21/40 + z²/6400) / denom = 0.1367758.
    lo, hi = stats.wilson_interval(12, 40)
    assert lo == pytest.approx(0.3175243 - 0.1367758, abs=2e-7)
    assert hi == pytest.approx(0.3175243 + 0.1367758, abs=2e-7)
    # k = 0: lower bound exactly 0, upper bound z² / (n + z²).
    assert stats.wilson_interval(0, 40) == (0.0, pytest.approx(Z95**2 / (40 + Z95**2), rel=1e-12))
    assert stats.wilson_interval(40, 40) == (pytest.approx(40 / (40 + Z95**2), rel=1e-12), 1.0)


@pytest.mark.parametrize("k,n,lo,hi", [
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (score interval without correction).
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0000, 0.1611), (1, 29, 0.0061, 0.1718),
])
def test_wilson_matches_the_published_table(k, n, lo, hi):
    got = stats.wilson_interval(k, n)
    assert got == (pytest.approx(lo, abs=5e-5), pytest.approx(hi, abs=5e-5))


@pytest.mark.parametrize("k,n", [(0, 40), (12, 40), (39, 40), (7, 13), (250, 1000)])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_wilson_matches_scipy(k, n, confidence):
    ref = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    assert stats.wilson_interval(k, n, confidence) == (pytest.approx(ref.low, abs=1e-12),
                                                       pytest.approx(ref.high, abs=1e-12))


def test_wilson_95_covers_the_true_rate_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    p, n, draws = 0.3, 40, 2000
    covered = 0
    for k in rng.binomial(n, p, size=draws):
        lo, hi = stats.wilson_interval(int(k), n)
        covered += lo <= p <= hi
    # exact coverage at (0.3, 40) is 0.944 (sum of the binomial pmf over the covered k); 2000 draws: sd 0.5 %.
    assert 0.93 <= covered / draws <= 0.97


def test_wilson_bad_input():
    assert all(math.isnan(v) for v in stats.wilson_interval(0, 0))
    with pytest.raises(ValueError, match="0 <= k <= n"):
        stats.wilson_interval(5, 4)
    with pytest.raises(ValueError, match="confidence"):
        stats.wilson_interval(1, 4, confidence=95)


def test_rate_leaves_none_out():
    r = stats.rate([True, None, False, True, None])
    assert (r["k"], r["n"], r["rate"]) == (2, 3, pytest.approx(2 / 3))
    assert r["ci"] == list(stats.wilson_interval(2, 3))
    empty = stats.rate([None])
    assert empty["n"] == 0 and math.isnan(empty["rate"]) and all(math.isnan(v) for v in empty["ci"])
    with pytest.raises(ValueError, match=r"successes\[1\]"):
        stats.rate([True, "yes"])


# ---------------------------------------------------------------------------------------------------------------
# Newcombe (difference of two independent proportions)


@pytest.mark.parametrize("k1,n1,k2,n2,lo,hi", [
    # Newcombe (1998), Statistics in Medicine 17:873, Table II, method 10 (hybrid score, no continuity correction).
    (56, 70, 48, 80, 0.0524, 0.3339), (9, 10, 3, 10, 0.1705, 0.8090), (6, 7, 2, 7, 0.0582, 0.8062),
    (5, 56, 0, 29, -0.0381, 0.1926), (0, 10, 0, 20, -0.1611, 0.2775), (10, 10, 0, 20, 0.6791, 1.0000),
])
def test_newcombe_matches_the_published_table(k1, n1, k2, n2, lo, hi):
    got = stats.newcombe_difference_interval(k1, n1, k2, n2)
    assert got == (pytest.approx(lo, abs=5e-5), pytest.approx(hi, abs=5e-5))
    # swapping the two samples mirrors the interval
    back = stats.newcombe_difference_interval(k2, n2, k1, n1)
    assert back == (pytest.approx(-got[1], abs=1e-12), pytest.approx(-got[0], abs=1e-12))


def test_newcombe_95_covers_the_true_difference_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    p1, p2, n, draws = 0.3, 0.1, 100, 2000
    k1s, k2s = rng.binomial(n, p1, size=draws), rng.binomial(n, p2, size=draws)
    covered = sum(lo <= p1 - p2 <= hi for lo, hi in
                  (stats.newcombe_difference_interval(int(a), n, int(b), n) for a, b in zip(k1s, k2s)))
    # exact coverage at (0.3, 0.1, n = 100) is 0.951 (the binomial pmf summed over the covered (k1, k2)); 2000
    # draws: sd 0.5 %.
    assert 0.93 <= covered / draws <= 0.975


def test_newcombe_bad_input():
    assert all(math.isnan(v) for v in stats.newcombe_difference_interval(0, 0, 1, 2))
    with pytest.raises(ValueError, match="0 <= k <= n"):
        stats.newcombe_difference_interval(5, 4, 1, 2)


# ---------------------------------------------------------------------------------------------------------------
# Bootstrap


def test_bootstrap_interval_of_a_large_normal_sample_is_mean_pm_1_96_se():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, size=4000)
    se = x.std(ddof=1) / math.sqrt(len(x))
    lo, hi = stats.bootstrap_interval(x)
    # Endpoint Monte-Carlo error with 10 000 resamples is about 0.03 se; bootstrap vs normal theory at n = 4000 is
    # smaller still. 0.1 se would catch a wrong quantile (e.g. 90 % gives 1.645 se, off by 0.3 se).
    assert lo == pytest.approx(x.mean() - Z95 * se, abs=0.1 * se)
    assert hi == pytest.approx(x.mean() + Z95 * se, abs=0.1 * se)


def test_bootstrap_is_deterministic_in_its_seed_and_handles_edge_cases():
    x = np.arange(30.0)
    assert stats.bootstrap_interval(x, seed=4) == stats.bootstrap_interval(x, seed=4)
    assert stats.bootstrap_interval(x, seed=4) != stats.bootstrap_interval(x, seed=5)
    assert stats.bootstrap_interval([2.5]) == (2.5, 2.5)
    assert all(math.isnan(v) for v in stats.bootstrap_interval([]))
    with pytest.raises(ValueError, match=r"values\[1\]"):
        stats.bootstrap_interval([1.0, float("nan")])


def test_bootstrap_blocks_do_not_change_the_statistic():
    # a sample large enough that the resamples are drawn in several blocks: still centred on the mean.
    rng = np.random.default_rng(2)
    x = rng.normal(size=3000)
    lo, hi = stats.bootstrap_interval(x, n_resamples=3000)
    assert lo < x.mean() < hi and (hi - lo) == pytest.approx(2 * Z95 * x.std(ddof=1) / math.sqrt(3000), rel=0.1)


# ---------------------------------------------------------------------------------------------------------------
# McNemar


@pytest.mark.parametrize("b,c", [(0, 0), (1, 0), (5, 5), (3, 12), (12, 3), (0, 9), (40, 61), (7, 8)])
def test_mcnemar_exact_matches_scipy_binomtest_on_the_discordant_pairs(b, c):
    concordant = 17  # pairs where both succeed or both fail: they must not change the p-value
    a = [True] * b + [False] * c + [True] * concordant + [False] * 4
    bb = [False] * b + [True] * c + [True] * concordant + [False] * 4
    got = stats.mcnemar_exact(a, bb)
    assert (got["n_a_only"], got["n_b_only"], got["n"]) == (b, c, b + c + concordant + 4)
    ref = 1.0 if b + c == 0 else scipy_stats.binomtest(min(b, c), b + c, 0.5).pvalue
    assert got["p_value"] == pytest.approx(ref, rel=1e-12)


def test_mcnemar_hand_computed_and_drops_missing_pairs():
    # discordant 1 vs 6: p = 2 · (1 + 7) / 2^7 = 0.125
    a = [True] + [False] * 6 + [None, True]
    b = [False] + [True] * 6 + [True, None]
    got = stats.mcnemar_exact(a, b)
    assert got == {"n_a_only": 1, "n_b_only": 6, "n": 7, "p_value": 0.125}
    with pytest.raises(ValueError, match="length"):
        stats.mcnemar_exact([True], [True, False])


# ---------------------------------------------------------------------------------------------------------------
# Paired bootstrap


def test_paired_bootstrap_difference_sign_and_trivial_cases():
    x = np.linspace(-1, 1, 50)
    shifted = stats.paired_bootstrap(x, x + 1.0)
    assert shifted["difference"] == pytest.approx(1.0) and shifted["ci"] == [pytest.approx(1.0)] * 2
    assert shifted["p_value"] == pytest.approx(2 / 10_001)  # every resample > 0: the smallest p reported
    same = stats.paired_bootstrap(x, x)
    assert same["difference"] == 0.0 and same["p_value"] == 1.0
    with pytest.raises(ValueError, match="length"):
        stats.paired_bootstrap([1.0], [1.0, 2.0])


def test_paired_bootstrap_p_value_agrees_with_the_normal_theory_test():
    rng = np.random.default_rng(3)
    n = 400
    x = rng.normal(size=n)
    y = x + rng.normal(0.06, 1.0, size=n)  # paired: y shares x's per-prompt part
    d = y - x
    z = d.mean() / (d.std(ddof=1) / math.sqrt(n))
    p_normal = 2 * (1 - scipy_stats.norm.cdf(abs(z)))
    got = stats.paired_bootstrap(x, y)
    assert 0.005 < p_normal < 0.2  # the draw lands where the comparison is informative
    # Monte-Carlo sd of the bootstrap p at 10 000 resamples is < 0.005; bootstrap vs t at n = 400 is ~0.005.
    assert got["p_value"] == pytest.approx(p_normal, abs=0.015)
    assert got["difference"] == pytest.approx(d.mean(), abs=1e-12)
    lo, hi = got["ci"]
    se = d.std(ddof=1) / math.sqrt(n)
    assert lo == pytest.approx(d.mean() - Z95 * se, abs=0.1 * se) and hi == pytest.approx(d.mean() + Z95 * se,
                                                                                           abs=0.1 * se)


# ---------------------------------------------------------------------------------------------------------------
# Cohen's kappa


def test_cohen_kappa_on_a_hand_computed_table():
    # 2×2 table: both yes 20, a-only 5, b-only 10, both no 15 (n = 50).
    # p_o = 35/50 = 0.7; a says yes 25/50, b 30/50; p_e = 0.5·0.6 + 0.5·0.4 = 0.5; κ = (0.7 - 0.5)/(1 - 0.5) = 0.4
    a = [True] * 20 + [True] * 5 + [False] * 10 + [False] * 15
    b = [True] * 20 + [False] * 5 + [True] * 10 + [False] * 15
    got = stats.cohen_kappa(a + [None], b + [True])  # the None pair is dropped
    assert got == {"kappa": pytest.approx(0.4, abs=1e-12), "n": 50, "raw_agreement": pytest.approx(0.7)}
    # perfect agreement / systematic disagreement
    assert stats.cohen_kappa(a, a)["kappa"] == 1.0
    assert stats.cohen_kappa(a, [not v for v in a])["kappa"] == pytest.approx(-1.0)


def test_cohen_kappa_is_nan_when_expected_agreement_is_one():
    got = stats.cohen_kappa([True] * 8, [True] * 8)
    assert math.isnan(got["kappa"]) and got["raw_agreement"] == 1.0 and got["n"] == 8
    # constant but opposite raters: p_e = 0, κ = 0 (defined)
    assert stats.cohen_kappa([True] * 8, [False] * 8)["kappa"] == 0.0
    assert math.isnan(stats.cohen_kappa([None], [True])["kappa"])
