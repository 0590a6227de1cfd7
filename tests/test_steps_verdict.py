"""What the steps-to-result report may claim: the paired bootstrap, B_crit's bracket, leave-one-out and degenerate
fits in words, best of k, censored batch sizes as lower bounds, the first-evaluation floor, the flags."""

import itertools
import math

import numpy as np
import pytest

from analysis import steps as A
from analysis.steps_configs import best_of_k
from analysis.steps_verdict import EXTRAPOLATED, MEASURED, NOT_MEASURED, verdict
from steps_sim import GOAL, curve_rows
from study.engine import steps as S
from study.engine.steps import configs_to_wait_for

BATCHES = [16 * 2**k for k in range(9)]


def trial(batch, config, steps, budget=100_000, lr=None, momentum=None, status=S.REACHED):
    return {"trial_id": f"{batch}_{config}", "batch_size": batch, "config": config, "momentum": momentum,
            "lr": lr if lr is not None else 0.001 * 1.5 ** config, "status": status, "budget": budget,
            "rows": curve_rows(steps, batch, budget)}


def table_of(steps_by_batch: dict, n_boot=200, seed=0):
    """A per_batch-like table from steps per batch size and configuration (no rows): the paired replicates."""
    n = len(next(iter(steps_by_batch.values())))
    draws, m = A.config_draws(n, n_boot, seed), configs_to_wait_for(n)
    return [{"batch_size": b, "steps": float(np.min(s)), "floor": False,
             "replicates": A.bootstrap_minima(np.asarray(s, dtype=float), draws, m)} for b, s in steps_by_batch.items()]


def test_the_bootstrap_resamples_the_same_configurations_at_every_batch_size():
    """Each configuration is equally good at every batch size here (steps = S(B) x quality): with the same draw of
    configurations everywhere, every replicate's S(16) / S(32) is exactly the true ratio; configurations are
    matched by their index, not their position (config 3 is missing at batch 32 and listed first at 16)."""
    quality = {0: 3.0, 1: 1.4, 2: 2.0, 3: 1.1, 5: 1.7, 8: 1.2, 9: 2.5}
    trials = [trial(16, c, 400 * q) for c, q in reversed(quality.items())]
    trials += [trial(32, c, 250 * q) for c, q in quality.items() if c != 3]
    trials.append(dict(trial(32, 3, 250 * quality[3]), status="out_of_memory"))  # a failure: measured nothing
    row16, row32 = A.per_batch(trials, GOAL, n_boot=300, seed=4)
    ratio = row16["replicates"] / row32["replicates"]
    # Where the resample holds config 3 (fastest at 16, missing at 32) the ratio is below 400/250; elsewhere it is
    # exactly 400/250. Independent draws per batch size would scatter it both ways.
    holds_3 = (A.config_draws(len(quality), 300, seed=4) == sorted(quality).index(3)).any(axis=1)
    assert np.allclose(ratio[~holds_3], 1.6) and np.all(ratio[holds_3] < 1.6 - 1e-9) and 0 < holds_3.mean() < 1
    again = A.per_batch(trials, GOAL, n_boot=300, seed=4)
    assert np.array_equal(again[0]["replicates"], row16["replicates"])
    assert np.array_equal(A.config_draws(7, 5, seed=1), A.config_draws(7, 5, seed=1))


def test_the_paired_interval_covers_a_known_b_crit_at_about_the_stated_rate():
    """Simulated studies with S(B) = 500 + 500 x 256 / B, 16 configurations whose quality is shared across batch
    sizes, and 10 % trial noise: the 95 % interval of B_crit held 256 in 0.88 of 200 seeds when this was written
    (a bootstrap of a minimum covers a little less than its level); here 80 seeds."""
    held = []
    for seed in range(80):
        rng = np.random.default_rng(seed)
        quality = 1 + 3 * rng.uniform(0, 1, 16) ** 2
        table = table_of({b: (500 + 500 * 256 / b) * quality * np.exp(rng.normal(0, 0.1, 16)) for b in BATCHES},
                         seed=seed)
        fit = A.fit(table)
        held.append(fit["b_crit_low"] <= 256 <= fit["b_crit_high"])
    assert 0.8 <= np.mean(held) < 1.0


def test_b_crit_outside_the_bracket_is_an_extrapolation_and_leave_one_out_names_the_batch_size():
    exact = {b: [500 + 500 * 256 / b] * 4 for b in BATCHES}
    fit = A.fit(table_of(exact))
    status, cell, sentences = verdict(fit)
    assert status == MEASURED and fit["bracket"] == (32, 2048) and cell.startswith("256 [256, 256]")
    assert fit["loo_low"] == pytest.approx(256) and fit["loo_high"] == pytest.approx(256)
    small = A.fit(table_of({b: [500 + 500 * 8 / b] * 4 for b in BATCHES}))  # B_crit 8, below 2 x 16
    status, _, sentences = verdict(small)
    assert status == EXTRAPOLATED and "outside [32, 2048]" in sentences[0]
    bent = {**exact, 4096: [3 * (500 + 500 * 256 / 4096)] * 4}  # one batch size three times too slow
    fit = A.fit(table_of(bent))
    assert fit["loo_batch"] == 4096 and "furthest without batch size 4096" in " ".join(verdict(fit)[2])


@pytest.mark.parametrize("curve, reason", [(lambda b: 700.0, "E_min was fitted at 0"),
                                           (lambda b: 700.0 * 4096 / b, "S_min was fitted at 0")])
def test_degenerate_fits_are_said_in_words_never_as_zeros(curve, reason):
    fit = A.fit(table_of({b: [curve(b)] * 4 for b in BATCHES}))
    status, cell, sentences = verdict(fit)
    assert status == NOT_MEASURED and cell.startswith("not measured") and reason in sentences[0]
    assert "0 [0, 0]" not in cell + " ".join(sentences)
    worse_than_mean = dict(A.fit(table_of({b: [500 + 500 * 256 / b] * 4 for b in BATCHES})), r2_log=-0.4)
    status, cell, sentences = verdict(worse_than_mean)
    assert status == NOT_MEASURED and "R^2 -0.4 < 0" in cell and "worse than their mean" in sentences[0]


def test_failed_bootstrap_replicates_are_counted_and_said():
    # Batch sizes 64 and 128 reached the goal in one configuration of eight each: a third of the resamples miss
    # it, and where both are missed only batch size 16 is left, too few to fit.
    inf = math.inf
    table = table_of({16: [900.0] * 8, 32: [500.0] + [inf] * 7, 64: [300.0] + [inf] * 7, 128: [250.0] + [inf] * 7})
    fit = A.fit(table)
    assert 0 < fit["replicates_failed"] < fit["replicates"] == 200
    assert f"{fit['replicates_failed']} of 200 bootstrap replicates gave no fit" in " ".join(verdict(fit)[2])


def test_best_of_k_is_the_mean_over_every_k_subset():
    steps = [310.0, math.inf, 120.0, 95.0, math.inf, 400.0]
    curve = best_of_k(steps)
    for k in range(1, 7):
        minima = [min(subset) for subset in itertools.combinations(steps, k)]
        assert curve["expected"][k - 1] == pytest.approx(np.mean(minima))  # inf wherever a subset misses all
        assert curve["p_reached"][k - 1] == pytest.approx(np.mean(np.isfinite(minima)))
    assert curve["expected"][-1] == 95.0 and math.isinf(curve["expected"][1]) and math.isfinite(curve["expected"][2])


def test_a_batch_size_that_never_reached_the_goal_is_a_lower_bound_at_its_budget():
    trials = [trial(16, c, 5000.0 * (1 + c), budget=1000, status=S.CENSORED) for c in range(4)]
    trials += [trial(32, c, 300.0 * (1 + c), budget=1000) for c in range(4)]
    trials += [dict(trial(64, c, 200.0), status=S.DIVERGED, rows=trial(64, c, 200.0)["rows"][:3]) for c in range(4)]
    censored, reached, diverged = A.per_batch(trials, GOAL, n_boot=50)
    assert censored["lower_bound"] == 1000 and math.isinf(censored["steps"])
    assert math.isnan(reached["lower_bound"]) and reached["budget_limited"] is False
    assert math.isnan(diverged["lower_bound"])  # diverged runs bound nothing
    fit = A.fit([censored, reached, diverged])
    assert fit["not_reached"] == [16, 64]
    assert "Not reached within the budget (a lower bound, not fitted): batch size 16, 64." in verdict(fit)[2]


def test_a_goal_reached_at_the_first_evaluations_reports_no_b_crit(tmp_path):
    from analysis.steps_figures import write_section

    # On the grid from step 1: the goal falls within the first 10 evaluations (steps 1 to 10) at every batch size,
    # at the first evaluation at the largest.
    trials = [trial(b, c, 0.6 + c + 8.9 * 16 / b, budget=200) for b in BATCHES for c in range(4)]
    assert S.eval_steps(200)[:10] == list(range(1, 11))
    (result,) = A.analyse(trials, [GOAL], n_boot=100)
    assert all(r["floor"] for r in result["table"]) and result["table"][-1]["evaluation"] == 1
    assert [r["evaluation"] for r in result["table"]][:2] == [10, 6]  # 9.5 steps at 16: evaluation 10, step 10
    assert math.isnan(result["fit"]["b_crit"]) and result["fit"]["floor_left_out"] == BATCHES
    assert {r["regime"] for r in result["regimes"]} == {A.UNDETERMINED}
    text = write_section(trials, [GOAL], tmp_path, n_boot=100)
    assert "B_crit not measured: 0 batch sizes reached the goal after the first 10 evaluations" in text
    assert "<= 1 (first evaluation)" in text and "undetermined (first evaluations)" in text
    assert "(up to step 10, the floor;" in text
    assert (tmp_path / "best_of_k.png").stat().st_size > 10_000


def test_the_floor_ends_at_the_tenth_evaluation_of_either_grid():
    from analysis.steps_plots import floor_step

    # Just past the floor (step 11, the 11th evaluation) a batch size is fitted and calls a regime; at step 10 not.
    past = A.per_batch([trial(16, c, 10.5 + 5 * c, budget=200) for c in range(4)], GOAL, n_boot=50)[0]
    on = A.per_batch([trial(16, c, 9.5 + 5 * c, budget=200) for c in range(4)], GOAL, n_boot=50)[0]
    assert (past["evaluation"], past["floor"]) == (11, False) and (on["evaluation"], on["floor"]) == (10, True)
    assert floor_step([trial(16, 0, 50.0, budget=200)]) == 10
    # A study stored before the grid started at step 1 (first evaluation at step 10): its floor stays its first ten
    # evaluations, steps 10 to 19, so it reports as before.
    old = trial(16, 0, 15.0, budget=200)
    old["rows"] = [old["rows"][0]] + [r for r in old["rows"] if r["step"] >= 10]
    assert floor_step([old]) == 19 and A.per_batch([old], GOAL, n_boot=20)[0]["floor"]


def test_flags_budget_limited_and_the_edge_in_effective_rate_and_next_to_failures():
    slow = A.per_batch([trial(16, c, 600.0 + 100 * c, budget=1000) for c in range(4)], GOAL, n_boot=50)[0]
    assert slow["budget_limited"] and slow["steps"] == pytest.approx(600)
    # Momenta make config 1 the largest lr / (1 - momentum), though neither its lr nor its momentum is extreme.
    group = [trial(16, 0, 900, lr=0.01, momentum=0.5), trial(16, 1, 100, lr=0.05, momentum=0.95),
             trial(16, 2, 800, lr=0.1, momentum=0.5), trial(16, 3, 700, lr=0.002, momentum=0.99)]
    row = A.per_batch(group, GOAL, n_boot=50)[0]
    assert row["best_config"] == 1 and row["edge_why"] == "lr / (1 - momentum)"
    # Config 2 in the middle of everything, but the next larger rate diverged.
    group = [trial(16, c, [900, 800, 100, 700, 600][c], lr=lr) for c, lr in enumerate([0.001, 0.01, 0.05, 0.5, 1])]
    group[3] = dict(group[3], status=S.DIVERGED)
    row = A.per_batch(group, GOAL, {"lr": (1e-4, 10)}, n_boot=50)[0]
    assert row["best_config"] == 2 and row["edge"] and row["edge_why"] == "next to diverged"


def test_the_report_says_how_the_budget_was_set():
    from analysis.steps_report import budget_line

    assert budget_line({"budget_steps": 500}, {"16": 500, "32": 500}) == "500 steps at every batch size"
    # A study stored before the sqrt rule: epochs at every batch size.
    assert budget_line({"budget_epochs": 2.0}, {"1024": 16, "16": 1024}) == ("2.0 epochs per batch size; steps "
                                                                              "16: 1024, 1024: 16")
    line = budget_line({"budget_epochs": 2.0, "budget_scaling": S.SQRT}, {"16": 1024, "1024": 128})
    assert "at the smallest batch size" in line and "1 / sqrt" in line and line.endswith("16: 1024, 1024: 128")


def test_the_floor_counts_the_fine_grids_steps_not_the_rows():
    """A trial on the coarse schedule stores fewer rows than the fine grid has steps: the floor is where the fine
    grid's tenth step is (study.engine.eval_schedule), for old studies on the grid from step 10 too."""
    from analysis.steps import FLOOR_EVALUATIONS, evaluation_number, floor_step

    rows = lambda steps: [{"step": s} for s in steps]  # noqa: E731
    coarse = rows([0, 1, 2, 4, 8, 16, 9, 10])  # evaluated back from 16: reached at 10
    assert evaluation_number(coarse, 7) == FLOOR_EVALUATIONS and floor_step(coarse) == 10
    later = rows([0, 1, 2, 4, 8, 16, 32, 17, 18])  # the fine grid's 18th step
    assert evaluation_number(later, 8) == 18 and evaluation_number(later, 0) == 0
    old = rows([0, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20])
    assert evaluation_number(old, 10) == FLOOR_EVALUATIONS and floor_step(old) == 19
