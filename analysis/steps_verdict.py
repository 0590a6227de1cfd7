"""The fit of S(B) = S_min + E_min / B said in words: whether B_crit was measured, and every reason to doubt it.

`verdict(fit, level)` -> (status, cell, sentences) for a fit from analysis.steps.fit. A degenerate fit is never
printed as numbers (a B_crit of "0 [0, 0]" reads as a measurement of zero): status is "not measured" with the
reason; "extrapolated" when B_crit lies outside the bracket [2 x smallest, largest / 2] of the fitted batch sizes
(a sweep can only place the bend of the curve where it has points on both sides); "measured" otherwise, with its
flags (interval outside the bracket, sensitive to one batch size, failed bootstrap replicates) in sentences.
"""

import math

from analysis.figures import fmt
from analysis.steps import FLOOR_EVALUATIONS

MEASURED, EXTRAPOLATED, NOT_MEASURED = "measured", "extrapolated", "not measured"


def _sizes(values) -> str:
    return ", ".join(str(int(v)) for v in values)


def _range(low: float, high: float) -> str:
    if math.isnan(low):
        return "(no interval)"
    return f"[{fmt(low, 3)}, {fmt(high, 3) if math.isfinite(high) else 'open above'}]"


def verdict(fit: dict, level: float = 0.95) -> tuple[str, str, list[str]]:
    """(status, the table cell for B_crit, the sentences that explain it)."""
    pct, notes = f"{level:.0%}", []
    if fit["floor_left_out"]:
        notes.append(f"Left out of the fit: batch size {_sizes(fit['floor_left_out'])}, whose best configuration "
                     f"reached the goal within its first {FLOOR_EVALUATIONS} evaluations (on the grid's floor).")
    if fit["not_reached"]:
        notes.append(f"Not reached within the budget (a lower bound, not fitted): batch size "
                     f"{_sizes(fit['not_reached'])}.")
    used, (lo, hi) = fit["batch_sizes"], fit["bracket"]
    if not math.isfinite(fit["s_min"]):
        return NOT_MEASURED, "not measured: fewer than two batch sizes to fit", [
            f"B_crit not measured: {used} batch size{'s' if used != 1 else ''} reached the goal after the first "
            f"{FLOOR_EVALUATIONS} evaluations, and the fit needs two.", *notes]
    if used < 3:
        return NOT_MEASURED, "not measured: two batch sizes to fit", [
            f"B_crit not measured: only batch sizes {_sizes([lo / 2, 2 * hi])} reached the goal after the first "
            f"{FLOOR_EVALUATIONS} evaluations; two points fix the curve's two parameters, so nothing checks its "
            f"shape.", *notes]
    if fit["s_min"] <= 0:
        return NOT_MEASURED, "not measured: S_min fitted at 0", [
            f"B_crit not measured: S_min was fitted at 0, so the steps fell as 1/B across every fitted batch size "
            f"(perfect scaling throughout); B_crit lies above {fmt(2 * hi, 4)}, the largest fitted, if anywhere.",
            *notes]
    if fit["e_min"] <= 0:
        return NOT_MEASURED, "not measured: E_min fitted at 0", [
            f"B_crit not measured: E_min was fitted at 0, so the steps did not fall with the batch size; B_crit lies "
            f"below {fmt(lo / 2, 4)}, the smallest fitted, if anywhere.", *notes]
    b, low, high = fit["b_crit"], fit["b_crit_low"], fit["b_crit_high"]
    cell = f"{fmt(b, 3)} {_range(low, high)}"
    if fit["r2_log"] < 0:
        return NOT_MEASURED, f"not measured: R^2 {fmt(fit['r2_log'], 2)} < 0", [
            f"B_crit not measured: the curve fits the steps worse than their mean does (R^2 = "
            f"{fmt(fit['r2_log'], 2)} in log space), so its B_crit of {fmt(b, 3)} describes no trend in them.", *notes]
    sentences = []
    status = MEASURED if lo <= b <= hi else EXTRAPOLATED
    if status == EXTRAPOLATED:
        sentences.append(f"B_crit = {fmt(b, 3)} lies outside [{fmt(lo, 4)}, {fmt(hi, 4)}] (twice the smallest and "
                         f"half the largest fitted batch size), where the sweep would bracket it: an extrapolation "
                         f"of the curve, not a measurement.")
    elif not (lo <= low and high <= hi):
        sentences.append(f"B_crit = {fmt(b, 3)}, but its {pct} interval {_range(low, high)} reaches outside "
                         f"[{fmt(lo, 4)}, {fmt(hi, 4)}], the batch sizes that bracket it.")
    if math.isfinite(fit["loo_low"]):
        moved = not (low <= fit["loo_low"] and fit["loo_high"] <= high)
        sentences.append(f"Leave-one-out: refitted without one batch size at a time, B_crit runs from "
                         f"{fmt(fit['loo_low'], 3)} to {fmt(fit['loo_high'], 3)} (furthest without batch size "
                         f"{fit['loo_batch']})" + (f"; one batch size moves it outside its {pct} interval." if moved
                                                  else f", inside its {pct} interval."))
    if fit["replicates_failed"]:
        sentences.append(f"{fit['replicates_failed']} of {fit['replicates']} bootstrap replicates gave no fit (fewer "
                         f"than two fitted batch sizes reached the goal in the resample): the interval is over the "
                         f"others.")
    return status, cell, sentences + notes
