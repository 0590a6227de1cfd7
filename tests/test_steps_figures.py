"""The steps report's figures keep their conventions (analysis/steps_plots.py): one colour per batch size in every
figure, no log axis stretched by a zero, censored batch sizes as arrows inside the axes, the floor and every goal
in the legend, the workload's unit on the axes."""

import pytest
from steps_sim import GOAL, LOOSE, curve_rows

from analysis import steps as A
from analysis import steps_plots as P
from analysis.steps_verdict import verdict
from study.engine import steps as S

BATCHES = [8, 16, 32, 64, 128, 256]


def trial(batch, config, steps, budget=400, status=S.REACHED):
    return {"trial_id": f"{batch}_{config}", "batch_size": batch, "config": config, "momentum": None,
            "lr": 0.001 * 2 ** config, "status": status, "budget": budget, "rows": curve_rows(steps, batch, budget)}


def study(kind):
    """Trials of four shapes: a clean curve with the largest batch size censored; every goal met at the first
    evaluations and no gain from larger batches (the tabular user's studies: B_crit not measured, 0 [0, 0] before);
    and one batch size only."""
    if kind == "curve":
        trials = [trial(b, c, (20 + 2000 / b) * (1 + 0.3 * c)) for b in BATCHES[:-1] for c in range(3)]
        return trials + [trial(BATCHES[-1], c, 5000.0, status=S.CENSORED) for c in range(3)]
    if kind == "floor":
        return [trial(b, c, 0.6 + c + 4 * 8 / b) for b in BATCHES for c in range(3)]
    if kind == "flat":  # the same steps at every batch size: E_min fitted at 0, B_crit "0 [0, 0]"
        return [trial(b, c, 60.0 * (1 + 0.3 * c) * (1 + 0.01 * (b % 3))) for b in BATCHES for c in range(3)]
    return [trial(16, c, 50.0 * (1 + c)) for c in range(3)]


def results_of(trials, goals=(GOAL, LOOSE)):
    results = A.analyse(trials, list(goals), n_boot=50)
    for res in results:
        res["verdict"] = verdict(res["fit"])
    return results


def figures(trials, unit="examples"):
    results = results_of(trials)
    floor = P.floor_step(trials)
    return {"steps": P.steps_figure(results, False, floor, 0.95, unit),
            "examples": P.steps_figure(results, True, floor, 0.95, unit),
            "best_of_k": P.best_of_k_figure(results), "noise": P.noise_figure(results, 0.95, unit),
            "lr": P.lr_figure(results, unit), "map": P.map_figure(trials, results[0], unit),
            "seconds": P.seconds_figure(results, unit)}


def visible_axes(fig):
    return [ax for ax in fig.axes if ax.get_visible()]


@pytest.mark.parametrize("kind", ["curve", "floor", "flat", "one"])
def test_no_log_axis_reaches_zero_or_spans_absurd_decades(kind):
    """The tabular user's B_crit figure drew the interval's 0 on a log axis running down to 1e-15."""
    for name, fig in figures(study(kind)).items():
        for ax in visible_axes(fig):
            for scale, (low, high) in ((ax.get_yscale(), ax.get_ylim()), (ax.get_xscale(), ax.get_xlim())):
                if scale == "log":
                    assert 0 < low < high and high / low < 1e6, (name, kind, low, high)


def test_a_batch_size_has_one_colour_in_every_panel():
    from matplotlib.colors import to_rgba

    trials = study("curve")
    colours = P.batch_colours(t["batch_size"] for t in trials)
    assert len(set(colours.values())) == len(BATCHES) and sorted(colours) == BATCHES
    assert P.batch_colours(reversed(BATCHES)) == colours  # by size, not by order of appearance
    fig = P.best_of_k_figure(results_of(trials))
    seen = {}
    for ax in visible_axes(fig):
        for line in ax.get_lines():
            if line.get_label().isdigit():
                seen.setdefault(int(line.get_label()), set()).add(to_rgba(line.get_color()))
    assert set(seen) == set(BATCHES)  # the censored batch size too (its P(reached) line at 0)
    assert all(c == {to_rgba(colours[b])} for b, c in seen.items())


def test_censored_arrows_floor_goals_and_bands_are_drawn_and_listed():
    trials = study("curve")
    results = results_of(trials)
    fig = P.steps_figure(results, False, P.floor_step(trials), 0.95, "examples")
    (ax,) = visible_axes(fig)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    for goal in (GOAL, LOOSE):
        assert any(label.startswith(f"{goal}: best; bar up to 95%") for label in labels)
        assert f"{goal}: not reached, above its budget (arrow)" in labels
        assert any(label.startswith(f"fit, {goal}") for label in labels)
    assert any(label.startswith("floor") for label in labels)
    arrows = [a for a in ax.texts if getattr(a, "arrow_patch", None) is not None]
    assert len(arrows) == 2  # one per goal at the censored batch size, side by side
    assert {round(a.xy[0]) for a in arrows} != {BATCHES[-1]} and len({a.xy[0] for a in arrows}) == 2
    assert ax.get_ylim()[1] >= max(a.xy[1] for a in arrows)  # the arrowheads inside the axes
    assert all(a.xy[1] == pytest.approx(P.ARROW * 400) for a in arrows)  # from the budget up


def test_the_noise_figure_lists_both_estimates_and_each_goals_b_crit():
    fig = P.noise_figure(results_of(study("curve")), 0.95, "examples")
    (ax,) = visible_axes(fig)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    for goal in (GOAL, LOOSE):
        assert f"B_simple before {goal}, bar: 95% interval" in labels
        assert any(label.startswith(f"B_crit for {goal}") for label in labels)


@pytest.mark.parametrize("unit", ["examples", "images"])
def test_axes_speak_the_workloads_unit(unit):
    for name, fig in figures(study("curve"), unit).items():
        if name == "best_of_k":
            continue  # its axes are configurations and steps
        (ax,) = visible_axes(fig)[:1]
        assert ax.get_xlabel() == f"batch size ({unit})", name
        assert "images" not in ax.get_ylabel() or unit == "images"
    assert visible_axes(figures(study("curve"), unit)["examples"])[0].get_ylabel() == f"{unit} to result"


def test_the_report_takes_the_unit_from_workload_json():
    from types import SimpleNamespace

    from analysis.steps_report import unit_of
    from study import metrics as M

    assert unit_of(SimpleNamespace(files={})) is None
    assert unit_of(SimpleNamespace(files={M.WORKLOAD_FILE: {"unit": "images"}})) == "images"
    assert unit_of(SimpleNamespace(files={M.WORKLOAD_FILE: {"unit": " "}})) is None


def test_workload_json_says_what_an_example_is():
    from pathlib import Path

    from study.workload import describe, resolve

    tabular = str(Path(__file__).resolve().parents[1] / "examples" / "tabular_workload.py")
    assert describe(resolve("mnist-cnn"), {"val": None})["unit"] == "images"
    assert describe(resolve(tabular), {"val": None})["unit"] == "examples"  # the default
