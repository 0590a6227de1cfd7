"""Full-grid evaluation curves of real mnist-cnn steps trials (goal unreachable: every trial runs its budget).

PYTHONPATH=. python tests/data/steps-curves/make_curves.py PLAN [THREADS] > mnist-cnn.json (README.md here)."""
import json, sys, time, torch
from study.engine.config import TrainConfig
from study.engine.steps import BUDGET, CHANCE, CONFIG, GOAL, config_seed
from study.engine.steps_trial import run_steps_trial
from study.workload import resolve
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
opts = dict(data_dir=str(__import__("pathlib").Path(__file__).resolve().parents[4] / "shared" / "data" / "mnist"), val_size=2000)
wl = resolve("mnist-cnn"); o = wl.option_values(opts); splits = wl.load(o)
out = []
plan = json.loads(sys.argv[1])  # [[batch, lr, budget], ...]
for i, (b, lr, budget) in enumerate(plan):
    cfg = TrainConfig(workload="mnist-cnn", batch_size=b, optimizer="nesterov", lr=lr, momentum=0.9, seed=config_seed(0, i), noise_scale=False, options=o)
    extra = {GOAL: {"metric": "val_error", "value": 0.0, "higher_is_better": False}, BUDGET: budget, CHANCE: None, CONFIG: i}
    rows = []; t = time.time()
    run_steps_trial(cfg, extra, wl, splits, torch.device("cpu"), lambda r, s: rows.append(r), coarse=None)
    out.append({"batch_size": b, "lr": lr, "momentum": 0.9, "budget": budget, "steps": [r["step"] for r in rows],
                "val_error": [round(r["val_error"], 6) for r in rows], "val_loss": [round(r["val_loss"], 6) for r in rows]})
    print(b, lr, budget, "%.0fs" % (time.time() - t), "final err", rows[-1]["val_error"], "evals", len(rows), file=sys.stderr, flush=True)
print(json.dumps(out))
