"""The known-answer check of a steps-to-result measurement: a steps study on the least-squares workload, through
Tune as any study runs, against the exact steps-to-result curve (docs/steps-to-result.md, "A check with a known
answer").

    python -m study steps least-squares --goal val_loss=0.2 --configs 16 --batch-sizes 8 16 32 64 128 256 512 \\
        --lr-range 0.3 1.95 --optimizer sgd --momentum 0 --budget-steps 600 --name ls-check
    python -m analysis.report results/ls-check
    python examples/least_squares_check.py results/ls-check [figure.png]

Reads the report's steps_per_batch.csv and steps_fit.csv (measured) and computes the exact curve from the
workload's own formulas (the expected loss of plain SGD, study/workloads/least_squares.py) at the study's options
and goal: the best learning rate's steps at each batch size and the same fit S(B) = S_min + E_min / B on them.
Prints both per batch size and draws the measured points over the exact curve.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere in the checkout

from analysis.steps import fit_curve  # noqa: E402
from study.workload import resolve  # noqa: E402
from study.workloads import least_squares as ls  # noqa: E402


def main(folder: str, figure: str | None = None) -> None:
    study = json.loads((Path(folder) / "study.json").read_text())
    options = resolve("least-squares").option_values(study["args"].get("options") or {})
    goal = next(g for g in study["goals"] if g["metric"] == "val_loss")["value"]
    measured = pd.read_csv(Path(folder) / "report" / "steps_per_batch.csv")
    fit = pd.read_csv(Path(folder) / "report" / "steps_fit.csv").iloc[0]
    h, w_star = ls.problem(options)
    batches = measured["batch_size"].to_numpy()
    exact = np.array([ls.best_steps_to_goal(w_star**2, h, options["noise"] ** 2, int(b), goal, 5000)[0]
                      for b in batches])
    s_min, e_min = fit_curve(batches, exact)
    print(f"goal val_loss <= {goal:g}; options {options}")
    print("batch  measured  exact  measured/exact")
    for b, m, e in zip(batches, measured["steps"], exact):
        print(f"{b:5d}  {m:8.1f}  {e:5.0f}  {m / e:6.2f}")
    print(f"B_crit measured {fit['b_crit']:.1f} [{fit['b_crit_low']:.1f}, {fit['b_crit_high']:.1f}], "
          f"exact {e_min / s_min:.1f} ({fit['b_crit'] / (e_min / s_min) - 1:+.0%})")
    if figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker

        fig, ax = plt.subplots(figsize=(6, 4.2))
        grid = np.geomspace(batches.min(), batches.max(), 200)
        ax.plot(batches, exact, "k-", marker="s", ms=4, label="exact: best learning rate, expected loss")
        ax.plot(grid, s_min + e_min / grid, "k:", lw=1, label=f"exact fit, B_crit {e_min / s_min:.1f}")
        ax.errorbar(batches, measured["steps"], yerr=[np.zeros(len(batches)),
                    (measured["upper"] - measured["steps"]).clip(lower=0)], fmt="o", color="tab:blue", capsize=3,
                    label="measured: best of 16 configurations (one-sided 95 % bound)")
        ax.plot(grid, fit["s_min"] + fit["e_min"] / grid, "--", color="tab:blue", lw=1,
                label=f"measured fit, B_crit {fit['b_crit']:.1f} [{fit['b_crit_low']:.1f}, {fit['b_crit_high']:.1f}]")
        ax.set(xscale="log", yscale="log", xlabel="batch size (examples)", ylabel=f"steps to val_loss <= {goal:g}",
               title="least squares: steps to result, measured over exact")
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(figure, dpi=120)
        print(f"figure: {figure}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
