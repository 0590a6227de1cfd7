"""Statistics behind the analysis reports: ROC AUC with its uncertainty, AUC comparisons, spread across seeds.

numpy, with scipy.stats for the t and normal distributions. Library code with no entry point: the report scripts
in analysis/ import it. Every function accepts lists or numpy arrays and raises ValueError naming the bad input.

AUC uncertainty on one test set comes in two flavours that should agree on large sets:
- DeLong, DeLong & Clarke-Pearson (1988), "Comparing the areas under two or more correlated receiver operating
  characteristic curves: a nonparametric approach", Biometrics 44:837-845. Its structural components are
  computed by binary search over the sorted scores, which is O(N log N) like the midrank algorithm of Sun & Xu
  (2014, IEEE Signal Processing Letters 21:1389) and gives the same numbers.
- A percentile bootstrap that resamples images with replacement within each class, so every resample holds
  both classes and the class balance of the test set.

Spread across seeds uses Student's t (scipy.stats.t). scipy has no DeLong test, hence the one here.
"""

import math

import numpy as np
from scipy import stats as scipy_stats
from sklearn.metrics import roc_auc_score

# Largest number of float64 cells (resamples x images) one bootstrap chunk holds: ~16 MB per array, so the
# 32768-image test set runs 2000 resamples in chunks of 64 without touching much memory.
_CHUNK_CELLS = 1 << 21


def _labels(labels) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or len(y) == 0:
        raise ValueError(f"labels must be a non-empty one-dimensional sequence, got shape {y.shape}")
    values = np.unique(y).tolist()
    if not all(isinstance(v, (bool, int, float)) and v in (0, 1) for v in values):
        raise ValueError(f"labels must be binary 0/1 (or False/True), got values {values[:10]}")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise ValueError(
            f"labels hold only class {int(y[0])} ({len(y)} images); an AUC needs at least "
            "one positive and one negative image"
        )
    return y


def _scores(scores, n: int, name: str) -> np.ndarray:
    try:
        s = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be numbers: {err}") from None
    if s.ndim != 1 or len(s) != n:
        raise ValueError(f"{name} has shape {s.shape} but labels hold {n} images; pass one score per image")
    bad = ~np.isfinite(s)
    if bad.any():
        raise ValueError(f"{name} holds {int(bad.sum())} NaN/inf values (first at index {int(np.argmax(bad))})")
    return s


def _split(labels, *score_vectors):
    """Validated (positive scores, negative scores) for each score vector."""
    y = _labels(labels)
    names = ["scores"] if len(score_vectors) == 1 else ["scores_a", "scores_b"]
    return [(s[y], s[~y]) for s in (_scores(v, len(y), nm) for v, nm in zip(score_vectors, names))]


def _level(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"level must lie strictly between 0 and 1 (e.g. 0.95), got {level}")
    return float(level)


def _components(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components V10 (one per positive) and V01 (one per negative).

    V10[i] is the fraction of negatives scored below positive i, V01[j] the fraction of positives scored above
    negative j; ties count one half (the Mann-Whitney kernel). Both average to the AUC.
    """
    neg_sorted, pos_sorted = np.sort(neg), np.sort(pos)
    below = np.searchsorted(neg_sorted, pos, "left") + np.searchsorted(neg_sorted, pos, "right")
    above = 2 * len(pos) - np.searchsorted(pos_sorted, neg, "left") - np.searchsorted(pos_sorted, neg, "right")
    return below / (2.0 * len(neg)), above / (2.0 * len(pos))


def _require_two_per_class(pos: np.ndarray, neg: np.ndarray) -> None:
    if len(pos) < 2 or len(neg) < 2:
        raise ValueError(
            f"DeLong's variance needs at least 2 positive and 2 negative images, got {len(pos)} and {len(neg)}"
        )


def _two_sided_p(z: float) -> float:
    return float(2 * scipy_stats.norm.sf(abs(z)))  # the upper tail directly: precise far out, where 1 - cdf is 0


def auc(labels, scores) -> float:
    """ROC AUC (scikit-learn's, as the trials report it): the probability that a random positive outscores a random
    negative, ties counted half; with the input checks every statistic here makes."""
    ((pos, neg),) = _split(labels, scores)
    return float(roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]))


def delong_auc_variance(labels, scores) -> float:
    """DeLong's estimate of the variance of `auc(labels, scores)` over test sets drawn like this one."""
    ((pos, neg),) = _split(labels, scores)
    _require_two_per_class(pos, neg)
    v10, v01 = _components(pos, neg)
    return float(v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg))


def delong_test(labels, scores_a, scores_b) -> tuple[float, float, float, float]:
    """DeLong's test that two models scoring the same images have equal AUC.

    Returns (auc_a, auc_b, z, p_value), z = (auc_a - auc_b) / its standard error, p two-sided. When the
    estimated variance of the difference is exactly zero (identical scores, or two models that rank every
    image the same way) a zero difference gives z = 0, p = 1, and a non-zero one gives z = +-inf, p = 0.
    """
    (pos_a, neg_a), (pos_b, neg_b) = _split(labels, scores_a, scores_b)
    _require_two_per_class(pos_a, neg_a)
    v10_a, v01_a = _components(pos_a, neg_a)
    v10_b, v01_b = _components(pos_b, neg_b)
    auc_a, auc_b = float(v10_a.mean()), float(v10_b.mean())
    # Var(A - B) = Var(A) + Var(B) - 2 Cov(A, B), taken as the variance of the paired component differences:
    # the same number, but never negative from rounding, and exactly 0 for identical inputs.
    variance = (v10_a - v10_b).var(ddof=1) / len(pos_a) + (v01_a - v01_b).var(ddof=1) / len(neg_a)
    diff = auc_a - auc_b
    if variance == 0:
        if diff == 0:
            return auc_a, auc_b, 0.0, 1.0
        return auc_a, auc_b, math.copysign(math.inf, diff), 0.0
    z = diff / math.sqrt(variance)
    return auc_a, auc_b, float(z), _two_sided_p(z)


def _resampled_aucs(pos, neg, pos_counts, neg_counts) -> np.ndarray:
    """Exact AUC of each resample, given how often each image was drawn.

    pos_counts is (k, len(pos)) and neg_counts (k, len(neg)): row r says how many copies of each positive and
    negative resample r holds. A positive's win count in a resample is the number of drawn negatives below it
    plus half those tied with it, read off a cumulative sum of the counts over the sorted negatives, so a
    resample costs O(N) instead of a sort.
    """
    order = np.argsort(neg, kind="stable")
    neg_sorted = neg[order]
    lo = np.searchsorted(neg_sorted, pos, "left")
    hi = np.searchsorted(neg_sorted, pos, "right")
    cum = np.zeros((neg_counts.shape[0], len(neg) + 1))
    np.cumsum(neg_counts[:, order], axis=1, out=cum[:, 1:])
    wins = 0.5 * (cum[:, lo] + cum[:, hi])
    return (pos_counts * wins).sum(axis=1) / (pos_counts.sum(axis=1) * neg_counts.sum(axis=1))


def _draw_counts(rng: np.random.Generator, k: int, size: int) -> np.ndarray:
    """(k, size) copy counts of `size` draws with replacement from `size` items, for k resamples."""
    rows = np.repeat(np.arange(k) * size, size)
    draws = rng.integers(0, size, size=k * size)
    return np.bincount(rows + draws, minlength=k * size).reshape(k, size).astype(np.float64)


def _bootstrap_aucs(split, n_boot: int, seed) -> np.ndarray:
    """(len(split), n_boot) AUCs over stratified resamples; every score vector sees the same resamples."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    m, n = len(split[0][0]), len(split[0][1])
    chunk = max(1, _CHUNK_CELLS // (m + n))
    rng = np.random.default_rng(seed)
    out = np.empty((len(split), n_boot))
    for start in range(0, n_boot, chunk):
        k = min(chunk, n_boot - start)
        pos_counts, neg_counts = _draw_counts(rng, k, m), _draw_counts(rng, k, n)
        for row, (pos, neg) in enumerate(split):
            out[row, start : start + k] = _resampled_aucs(pos, neg, pos_counts, neg_counts)
    return out


def bootstrap_auc_ci(labels, scores, n_boot: int = 2000, seed=0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval for the AUC; images resampled within each class; fixed seed, fixed result."""
    alpha = 1 - _level(level)
    reps = _bootstrap_aucs(_split(labels, scores), n_boot, seed)[0]
    low, high = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def paired_bootstrap_test(labels, scores_a, scores_b, n_boot: int = 2000, seed=0):
    """Bootstrap comparison of two models on the same images: (diff, low, high, p_value).

    diff = auc_a - auc_b on the full set; (low, high) its 95 % percentile interval, both models scored on the
    same resamples so their correlation is kept. p is two-sided, twice the smaller share of resampled
    differences on either side of zero, with the (count + 1) / (n_boot + 1) correction so it is never 0.
    """
    split = _split(labels, scores_a, scores_b)
    reps = _bootstrap_aucs(split, n_boot, seed)
    diffs = reps[0] - reps[1]
    diff = float(_components(*split[0])[0].mean() - _components(*split[1])[0].mean())
    low, high = np.quantile(diffs, [0.025, 0.975])
    tail = min(np.count_nonzero(diffs <= 0), np.count_nonzero(diffs >= 0))
    p_value = min(1.0, 2 * (tail + 1) / (n_boot + 1))
    return diff, float(low), float(high), float(p_value)


def t_quantile(prob: float, df: int) -> float:
    """The `prob` quantile of Student's t with `df` (integer) degrees of freedom."""
    if isinstance(df, bool) or not isinstance(df, (int, np.integer)) or df < 1:
        raise ValueError(f"df must be a positive integer, got {df!r}")
    if not 0 < prob < 1:
        raise ValueError(f"prob must lie strictly between 0 and 1, got {prob}")
    return float(scipy_stats.t.ppf(prob, df))


def _finite_values(values, name: str = "values") -> np.ndarray:
    try:
        v = np.asarray(values, dtype=np.float64).ravel()
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be numbers: {err}") from None
    if not np.isfinite(v).all():
        raise ValueError(
            f"{name} hold NaN/inf {v[~np.isfinite(v)].tolist()[:5]} (a diverged seed?); drop them first, "
            "or use spread(), which counts them separately"
        )
    return v


def mean_ci(values, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval for the mean across seeds; one value gives (value, nan, nan)."""
    alpha = 1 - _level(level)
    v = _finite_values(values)
    if len(v) == 0:
        raise ValueError("mean_ci needs at least one value, got none")
    mean = float(v.mean())
    if len(v) == 1:
        return mean, math.nan, math.nan
    half = t_quantile(1 - alpha / 2, len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return mean, mean - half, mean + half


def coefficient_of_variation(values) -> float:
    """Sample std (ddof=1) over mean, for positive quantities; nan for fewer than 2 values or a zero mean."""
    v = _finite_values(values)
    if len(v) < 2 or v.mean() == 0:
        return math.nan
    return float(v.std(ddof=1) / v.mean())


def spread(values) -> dict:
    """min, mean, max, std (ddof=1), cv and n of the finite values; NaN/inf ones only counted, in n_nonfinite."""
    try:
        v = np.asarray(values, dtype=np.float64).ravel()
    except (TypeError, ValueError) as err:
        raise ValueError(f"values must be numbers: {err}") from None
    finite = v[np.isfinite(v)]
    n = len(finite)
    return {
        "min": float(finite.min()) if n else math.nan,
        "mean": float(finite.mean()) if n else math.nan,
        "max": float(finite.max()) if n else math.nan,
        "std": float(finite.std(ddof=1)) if n >= 2 else math.nan,
        "cv": coefficient_of_variation(finite),
        "n": n,
        "n_nonfinite": len(v) - n,
    }


def holm(p_values) -> np.ndarray:
    """Holm's (1979) step-down adjusted p-values for a family of tests: compare each with the level to control the
    chance of any false mark at that level. NaN (no test) stays NaN and is not counted in the family."""
    p = np.asarray(p_values, dtype=np.float64).ravel()
    adjusted = np.full(p.shape, math.nan)
    tested = np.flatnonzero(np.isfinite(p))
    if len(tested) == 0:
        return adjusted
    if ((p[tested] < 0) | (p[tested] > 1)).any():
        raise ValueError(f"p-values must lie in [0, 1], got {p[tested].tolist()[:5]}")
    order = tested[np.argsort(p[tested], kind="stable")]
    steps = p[order] * (len(order) - np.arange(len(order)))
    adjusted[order] = np.minimum(np.maximum.accumulate(steps), 1.0)
    return adjusted


def paired_t_test(a, b) -> tuple[float, float]:
    """(mean of a - b, two-sided p) of Student's paired t-test, e.g. per-seed test AUCs of two configurations
    trained with the same seeds. NaN p when the differences do not vary (no spread to test against)."""
    a, b = _finite_values(a, "a"), _finite_values(b, "b")
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired_t_test needs two equal-length samples of at least 2, got {len(a)} and {len(b)}")
    diff = a - b
    if np.ptp(diff) == 0:
        return float(diff.mean()), math.nan
    return float(diff.mean()), float(scipy_stats.ttest_rel(a, b).pvalue)
