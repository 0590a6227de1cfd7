"""analysis/stats.py against known answers: hand computations, a published data set, sklearn, and Monte Carlo.

Run: python -m pytest tests/test_stats.py -q
"""

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from analysis import stats

# Hand example, 5 positives (P1..P5) and 5 negatives (N1..N5), interleaved P1 N1 P2 N2 ... in the arrays below.
#                 P1   P2   P3   P4   P5     N1    N2   N3    N4    N5
# model A         .9   .8   .7   .6   .4     .7    .5   .3    .2    .1     (P3 ties N1)
# model B         .8   .4   .6   .3   .7     .5    .2   .45   .65   .1
# V10 = share of negatives below each positive (tie = 1/2), V01 = share of positives above each negative:
#   A: V10 = 5/5, 5/5, 4.5/5, 4/5, 3/5 = 1, 1, .9, .8, .6          mean .86 = AUC_A
#      V01 = 2.5/5, 4/5, 5/5, 5/5, 5/5 = .5, .8, 1, 1, 1          mean .86
#   B: V10 = 1, .4, .8, .4, 1                                       mean .72 = AUC_B
#      V01 = .6, 1, .6, .4, 1                                       mean .72
# Sample variances (ddof=1), from the deviations about the means:
#   S10_A = (.14^2 + .14^2 + .04^2 + .06^2 + .26^2) / 4 = .112 / 4 = .028
#   S01_A = (.36^2 + .06^2 + 3 * .14^2) / 4                = .192 / 4 = .048
#   S10_B = (2 * .28^2 + .08^2 + 2 * .32^2) / 4            = .368 / 4 = .092
#   S01_B = (2 * .12^2 + 2 * .28^2 + .32^2) / 4            = .288 / 4 = .072
#   C10 = (.14*.28 - .14*.32 + .04*.08 + .06*.32 - .26*.28) / 4 = -.056 / 4 = -.014
#   C01 = (.36*.12 - .06*.28 - .14*.12 - .14*.32 + .14*.28) / 4 =  .004 / 4 =  .001
# Var(AUC_A) = (.028 + .048) / 5 = .0152;  Var(AUC_B) = (.092 + .072) / 5 = .0328
# Var(A - B) = (.028 + .092 + 2 * .014) / 5 + (.048 + .072 - 2 * .001) / 5 = .0296 + .0236 = .0532
# z = .14 / sqrt(.0532) = .60698;  p = 2 (1 - Phi(.60698)) = .5439
HAND_LABELS = [1, 0] * 5
HAND_A = [0.9, 0.7, 0.8, 0.5, 0.7, 0.3, 0.6, 0.2, 0.4, 0.1]
HAND_B = [0.8, 0.5, 0.4, 0.2, 0.6, 0.45, 0.3, 0.65, 0.7, 0.1]


def hanley_mcneil_ct():
    """Hanley & McNeil (1982, Radiology 143:29, Table 1): CT ratings 1-5 of 58 normal and 51 abnormal patients."""
    normal = np.repeat([1, 2, 3, 4, 5], [33, 6, 6, 11, 2])
    abnormal = np.repeat([1, 2, 3, 4, 5], [3, 2, 2, 11, 33])
    return np.r_[np.zeros(58, int), np.ones(51, int)], np.r_[normal, abnormal].astype(float)


def binormal(rng, n_pos, n_neg, shift=1.0):
    labels = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    return labels, rng.normal(size=n_pos + n_neg) + shift * labels


# --- AUC ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_delong_components_average_to_the_reported_auc_with_ties(seed):
    """DeLong's test works on the Mann-Whitney components: they must average to the AUC the report states."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 400)
    scores = np.round(rng.normal(size=400) + labels, 1)  # rounding makes many ties
    area, _, _, _ = stats.delong_test(labels, scores, scores[::-1].copy())
    assert area == pytest.approx(stats.auc(labels, scores), abs=1e-12)
    assert stats.auc(labels.tolist(), scores.tolist()) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_tiny_hand_case():
    # positives .9, .4; negatives .4, .1: pairs (.9,.4)=1 (.9,.1)=1 (.4,.4)=1/2 (.4,.1)=1 -> 3.5 / 4
    assert stats.auc([1, 0, 1, 0], [0.9, 0.4, 0.4, 0.1]) == 0.875
    assert stats.auc([True, False], [0.0, 1.0]) == 0.0


def test_auc_published_hanley_mcneil():
    # Wins per abnormal rating (normals below + half tied): 3 * 16.5 + 2 * 36 + 2 * 42 + 11 * 50.5 + 33 * 57
    # = 2642 of 58 * 51 = 2958 pairs; the paper reports 0.893.
    labels, scores = hanley_mcneil_ct()
    assert stats.auc(labels, scores) == pytest.approx(2642 / 2958, abs=1e-12)
    assert round(stats.auc(labels, scores), 3) == 0.893


# --- DeLong ------------------------------------------------------------------------------------------------------


def test_delong_hand_example():
    assert stats.auc(HAND_LABELS, HAND_A) == pytest.approx(0.86)
    assert stats.auc(HAND_LABELS, HAND_B) == pytest.approx(0.72)
    assert stats.delong_auc_variance(HAND_LABELS, HAND_A) == pytest.approx(0.0152)
    assert stats.delong_auc_variance(HAND_LABELS, HAND_B) == pytest.approx(0.0328)
    auc_a, auc_b, z, p = stats.delong_test(HAND_LABELS, HAND_A, HAND_B)
    assert (auc_a, auc_b) == pytest.approx((0.86, 0.72))
    assert z == pytest.approx(0.14 / math.sqrt(0.0532))
    assert p == pytest.approx(0.5439, abs=1e-4)


def test_delong_published_standard_error():
    # Stata's roctab (DeLong standard error) on the Hanley & McNeil CT data reports area 0.8932,
    # std. err. 0.0307 and asymptotic 95 % interval 0.83295 to 0.95339.
    labels, scores = hanley_mcneil_ct()
    area = stats.auc(labels, scores)
    se = math.sqrt(stats.delong_auc_variance(labels, scores))
    assert round(se, 4) == 0.0307
    assert round(area - 1.959964 * se, 5) == 0.83295
    assert round(area + 1.959964 * se, 5) == 0.95339


def test_delong_symmetry_and_identical_inputs():
    rng = np.random.default_rng(3)
    labels, a = binormal(rng, 60, 80)
    b = a + rng.normal(size=len(a))
    auc_a, auc_b, z, p = stats.delong_test(labels, a, b)
    auc_b2, auc_a2, z2, p2 = stats.delong_test(labels, b, a)
    assert (auc_a2, auc_b2, p2) == pytest.approx((auc_a, auc_b, p))
    assert z2 == pytest.approx(-z)
    assert 0 < p < 1
    assert stats.delong_test(labels, a, a) == (auc_a, auc_a, 0.0, 1.0)
    # A monotone transform ranks every image the same way: zero difference, zero variance, no NaN.
    assert stats.delong_test(labels, a, np.exp(a))[2:] == (0.0, 1.0)


def test_delong_zero_variance_with_a_real_difference():
    labels = [1, 1, 1, 0, 0, 0]
    perfect, constant = [3, 3, 3, 1, 1, 1], [0] * 6  # every V component is 1 and 1/2 respectively
    auc_a, auc_b, z, p = stats.delong_test(labels, perfect, constant)
    assert (auc_a, auc_b, z, p) == (1.0, 0.5, math.inf, 0.0)


def test_delong_variance_matches_sampling_variance():
    # Across 1000 fresh binormal test sets the AUC's actual variance is what DeLong estimates from one set.
    rng = np.random.default_rng(0)
    aucs, estimates = [], []
    for _ in range(1000):
        labels, scores = binormal(rng, 100, 120)
        aucs.append(stats.auc(labels, scores))
        estimates.append(stats.delong_auc_variance(labels, scores))
    assert np.mean(estimates) == pytest.approx(np.var(aucs, ddof=1), rel=0.15)
    # Binormal AUC with unit shift is Phi(1 / sqrt 2).
    assert np.mean(aucs) == pytest.approx(0.5 * math.erfc(-0.5), abs=0.005)


def test_delong_variance_matches_bootstrap_variance():
    rng = np.random.default_rng(1)
    labels, scores = binormal(rng, 300, 400)
    reps = stats._bootstrap_aucs(stats._split(labels, scores), 2000, seed=0)[0]
    assert stats.delong_auc_variance(labels, scores) == pytest.approx(np.var(reps), rel=0.15)


def test_delong_test_holds_its_size_under_the_null():
    # Two noisy views of one latent score have the same true AUC: p < 0.05 about 5 % of the time.
    rng = np.random.default_rng(2)
    rejections = 0
    for _ in range(500):
        labels, latent = binormal(rng, 80, 80)
        a = latent + rng.normal(size=len(latent))
        b = latent + rng.normal(size=len(latent))
        rejections += stats.delong_test(labels, a, b)[3] < 0.05
    assert 0.02 <= rejections / 500 <= 0.085


def test_delong_needs_two_per_class():
    with pytest.raises(ValueError, match="at least 2 positive"):
        stats.delong_auc_variance([1, 0, 0], [0.5, 0.1, 0.2])


# --- bootstrap ---------------------------------------------------------------------------------------------------


def test_resampled_aucs_equal_sklearn_on_the_explicit_resamples():
    rng = np.random.default_rng(4)
    pos, neg = np.round(rng.normal(1, 1, 30), 1), np.round(rng.normal(0, 1, 45), 1)
    pos_idx, neg_idx = rng.integers(0, 30, (7, 30)), rng.integers(0, 45, (7, 45))
    pos_counts = np.stack([np.bincount(row, minlength=30) for row in pos_idx]).astype(float)
    neg_counts = np.stack([np.bincount(row, minlength=45) for row in neg_idx]).astype(float)
    got = stats._resampled_aucs(pos, neg, pos_counts, neg_counts)
    for r in range(7):
        scores = np.r_[pos[pos_idx[r]], neg[neg_idx[r]]]
        labels = np.r_[np.ones(30), np.zeros(45)]
        assert got[r] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_bootstrap_ci_contains_estimate_narrows_with_n_and_is_deterministic():
    rng = np.random.default_rng(5)
    widths = []
    for n in (100, 2000):
        labels, scores = binormal(rng, n, n)
        low, high = stats.bootstrap_auc_ci(labels, scores, n_boot=500, seed=1)
        assert low < stats.auc(labels, scores) < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # the width shrinks like 1/sqrt(n): ~1/4.5 here
    labels, scores = binormal(rng, 50, 50)
    first = stats.bootstrap_auc_ci(labels, scores, n_boot=300, seed=7)
    assert stats.bootstrap_auc_ci(list(labels), list(scores), n_boot=300, seed=7) == first
    assert stats.bootstrap_auc_ci(labels, scores, n_boot=300, seed=8) != first


def test_bootstrap_keeps_both_classes():
    # One positive among 40: a plain resample would often lose it; the stratified one never does.
    labels = np.r_[1, np.zeros(40, int)]
    scores = np.linspace(0, 1, 41)
    low, high = stats.bootstrap_auc_ci(labels, scores, n_boot=200)
    assert np.isfinite([low, high]).all() and 0 <= low <= high <= 1


def test_paired_bootstrap_identical_swapped_and_agreeing_with_delong():
    rng = np.random.default_rng(6)
    labels, latent = binormal(rng, 300, 300)
    strong, weak = latent, latent + 1.5 * rng.normal(size=len(latent))
    assert stats.paired_bootstrap_test(labels, strong, strong, n_boot=200) == (0.0, 0.0, 0.0, 1.0)
    diff, low, high, p = stats.paired_bootstrap_test(labels, strong, weak, n_boot=1000, seed=3)
    assert diff == pytest.approx(stats.auc(labels, strong) - stats.auc(labels, weak))
    assert 0 < low < diff < high
    assert p < 0.01 and stats.delong_test(labels, strong, weak)[3] < 0.01
    swapped = stats.paired_bootstrap_test(labels, weak, strong, n_boot=1000, seed=3)
    assert swapped == pytest.approx((-diff, -high, -low, p))
    # Under the null the two methods agree that nothing is going on.
    a, b = latent + rng.normal(size=len(latent)), latent + rng.normal(size=len(latent))
    p_boot = stats.paired_bootstrap_test(labels, a, b, n_boot=1000)[3]
    p_delong = stats.delong_test(labels, a, b)[3]
    assert abs(p_boot - p_delong) < 0.1


# --- across seeds ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prob", "df", "expected", "tol"),
    [
        (0.975, 1, math.tan(math.pi * 0.475), 1e-9),  # df 1 is Cauchy: tan(pi (p - 1/2))
        (0.975, 2, 0.95 / math.sqrt(2 * 0.975 * 0.025), 1e-9),  # df 2: (2p - 1) / sqrt(2 p (1 - p))
        (0.995, 2, 0.99 / math.sqrt(2 * 0.995 * 0.005), 1e-9),
        (0.975, 3, 3.182, 5e-4),  # printed t tables, 3 decimals
        (0.975, 4, 2.776, 5e-4),
        (0.975, 9, 2.262, 5e-4),
        (0.975, 10, 2.228, 5e-4),
        (0.975, 20, 2.086, 5e-4),
        (0.975, 30, 2.042, 5e-4),
        (0.995, 4, 4.604, 5e-4),
        (0.95, 10, 1.812, 5e-4),
        (0.025, 4, -2.776, 5e-4),
    ],
)
def test_t_quantile_known_values(prob, df, expected, tol):
    assert stats.t_quantile(prob, df) == pytest.approx(expected, abs=tol)


def test_t_quantile_large_df_approaches_normal():
    # Cornish-Fisher: t = z + (z^3 + z) / (4 df) + O(df^-2), z the normal quantile.
    z = 1.959963984540054
    assert stats.t_quantile(0.975, 100_000) == pytest.approx(z + (z**3 + z) / 400_000, abs=1e-8)


def test_mean_ci_hand_computed():
    # 1..5: mean 3, s = sqrt(2.5), se = s / sqrt 5 = 0.70711, t(0.975, 4) = 2.776445 -> half width 1.96324
    mean, low, high = stats.mean_ci([1, 2, 3, 4, 5])
    assert mean == 3.0
    assert (low, high) == pytest.approx((3 - 1.963243, 3 + 1.963243), abs=1e-6)
    mean, low, high = stats.mean_ci(np.array([0.8, 0.9]), level=0.99)  # t(0.995, 1) = 63.657, se = 0.05
    assert (low, high) == pytest.approx((0.85 - 3.18283, 0.85 + 3.18283), abs=1e-4)
    one = stats.mean_ci([0.7])
    assert one[0] == 0.7 and math.isnan(one[1]) and math.isnan(one[2])


def test_mean_ci_covers_the_true_mean_95_percent_with_three_seeds():
    # With n = 3 a normal-quantile interval would cover only ~0.86; the t interval covers 0.95.
    rng = np.random.default_rng(9)
    samples = rng.normal(10.0, 2.0, size=(4000, 3))
    covered = sum(low <= 10.0 <= high for _, low, high in map(stats.mean_ci, samples))
    assert covered / 4000 == pytest.approx(0.95, abs=0.01)


def test_coefficient_of_variation_and_spread():
    assert stats.coefficient_of_variation([1, 2, 3, 4, 5]) == pytest.approx(math.sqrt(2.5) / 3)
    assert math.isnan(stats.coefficient_of_variation([4.0]))
    s = stats.spread([1.0, float("nan"), 2.0, float("inf"), 3.0])
    assert s == pytest.approx({"min": 1.0, "mean": 2.0, "max": 3.0, "std": 1.0, "cv": 0.5, "n": 3, "n_nonfinite": 2})
    empty = stats.spread([float("nan")])
    assert empty["n"] == 0 and empty["n_nonfinite"] == 1 and math.isnan(empty["mean"]) and math.isnan(empty["cv"])


# --- input validation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "scores", "message"),
    [
        ([0, 1, 1], [0.1, 0.2], "labels hold 3 images"),
        ([0, 1, 2], [0.1, 0.2, 0.3], "binary"),
        (["a", "b"], [0.1, 0.2], "binary"),
        ([1, 1, 1], [0.1, 0.2, 0.3], "only class 1"),
        ([], [], "non-empty"),
        ([[0, 1]], [[0.1, 0.2]], "one-dimensional"),
        ([0, 1], [0.1, float("nan")], "NaN"),
        ([0, 1], ["x", "y"], "must be numbers"),
    ],
)
def test_bad_inputs_raise_clear_errors(labels, scores, message):
    with pytest.raises(ValueError, match=message):
        stats.auc(labels, scores)


def test_bad_options_raise_clear_errors():
    with pytest.raises(ValueError, match="scores_b has shape"):
        stats.delong_test([0, 0, 1, 1], [1, 2, 3, 4], [1, 2, 3])
    with pytest.raises(ValueError, match="n_boot"):
        stats.bootstrap_auc_ci([0, 1], [0.1, 0.2], n_boot=0)
    with pytest.raises(ValueError, match="level"):
        stats.mean_ci([1, 2], level=95)
    with pytest.raises(ValueError, match="diverged"):
        stats.mean_ci([1, float("nan")])
    with pytest.raises(ValueError, match="at least one"):
        stats.mean_ci([])


def test_holm_adjusts_step_down_and_leaves_untested_out():
    # Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.02, 0.03, 0.06, 0.06.
    adjusted = stats.holm([0.01, 0.04, math.nan, 0.03, 0.005])
    assert adjusted[[0, 1, 3, 4]] == pytest.approx([0.03, 0.06, 0.06, 0.02]) and math.isnan(adjusted[2])
    assert stats.holm([0.6, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert stats.holm([0.04]) == pytest.approx([0.04])  # one test: nothing to correct
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        stats.holm([1.5])


def test_paired_t_test_matches_scipy_and_refuses_what_it_cannot_test():
    from scipy import stats as scipy_stats

    a, b = [0.91, 0.88, 0.93, 0.90], [0.89, 0.88, 0.90, 0.91]
    diff, p = stats.paired_t_test(a, b)
    assert diff == pytest.approx(0.01) and p == pytest.approx(scipy_stats.ttest_rel(a, b).pvalue)
    assert math.isnan(stats.paired_t_test([0.9, 0.8], [0.85, 0.75])[1])  # the same difference twice: no spread
    with pytest.raises(ValueError, match="at least 2"):
        stats.paired_t_test([0.9], [0.8])
    with pytest.raises(ValueError, match="NaN"):
        stats.paired_t_test([0.9, math.nan], [0.8, 0.7])
