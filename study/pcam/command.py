"""The PCam study: `python -m study.pcam --data-dir DIR` (or `--smoke` on a generated PCam-like set).

VGG16 (ImageNet weights; the first two conv blocks frozen) fine-tuned on PatchCamelyon 96x96 patches over the
grid batch size x (optimizer, learning rate) x seed; the best-on-validation weights are tested at the end. One Tune
experiment, <storage-path>/<name>/grid, run by the one driver (study.commands.driver);
`tensorboard --logdir <storage-path>/<name>`.
--data-dir takes the official HDF5 files (.h5 or .h5.gz, also torchvision's pcam/ layout) or the Kaggle
"Histopathologic Cancer Detection" folder (train/, train_labels.csv, test/), converted once with a stratified
split; a study on Kaggle data writes each trial's submission.csv.
"""

import argparse
import dataclasses
import math
import sys

from ray import tune
from ray.tune.search import BasicVariantGenerator

from study.commands import cli_checks as checks
from study.commands import driver
from study.commands import flags
from study import metrics as M
from study.commands.console import StudyConsole
from study.engine.config import NOISE_EVERY, TrainConfig
from study.pcam import kaggle
from study.pcam import data as pcam_data
from study.pcam import stored
from study.errors import StudyError
from study.engine.lr_scaling import scaling_rules
from study.pcam.model import vgg16_features_state
from study.commands.tensorboard import StudyTensorBoard, write_experiment
from study.pcam import board
from study.pcam.trainable import train_pcam
from study.commands.tuning import add_common_args, check_common_args, grid_axis
from study.pcam import workload as pcam_workload

WORKLOAD = pcam_workload.workload
LRS = pcam_workload.LRS  # the original's (optimizer, lr) tables: --sgd-lrs and --adam-lrs
OPTIMIZERS = tuple(LRS)

SMOKE = dict(batch_sizes=[8, 16], optimizers=["sgd", "adam"], sgd_lrs=[0.01], adam_lrs=[1e-4], epochs=2,
             weights="none", eval_batch_size=32, noise_every=1)


def parse_args(argv=None) -> argparse.Namespace:
    p = flags.Parser(prog="python -m study.pcam", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    flags.add_options(p, WORKLOAD, ("data_dir", "download", "prepared_dir", "val_fraction", "split_seed",
                                    "train_limit"), group=data, download=False, val_fraction=0.2, split_seed=0,
                      train_limit=0)
    flags.add(data, "smoke", help={"smoke": "the whole pipeline on a generated PCam-like set, two small "
                                            "configurations, random init"})
    grid = p.add_argument_group("grid (defaults: the original study)")
    flags.add(grid, "batch_sizes", "optimizers", help={"optimizers": f"of {', '.join(OPTIMIZERS)} (default both)"})
    # The original's own flags: (optimizer, lr) pairs from a table per optimizer, N seeds, amp on by default (its
    # study.json stores no_amp).
    grid.add_argument("--sgd-lrs", type=float, nargs="+", default=None, help=f"default {LRS['sgd']}")
    grid.add_argument("--adam-lrs", type=float, nargs="+", default=None, help=f"default {LRS['adam']}")
    grid.add_argument("--seeds", type=int, default=1, help="runs per configuration, seeds 0..N-1 (default 1)")
    grid.add_argument("--amp", dest="no_amp", action=flags.OnOff, on=False, off=True, default=False,
                      help="on CUDA: bf16 autocast (default) or fp32 (--no-amp)")
    grid.add_argument("--checkpoint-every", type=int, default=1,
                      help="epochs between checkpoints (default 1; epoch 0 and the last always checkpoint)")
    flags.add(grid, "momentum", "epochs", momentum=0.9, help={"momentum": "SGD momentum", "epochs": "default 55"})
    flags.add_options(p, WORKLOAD, ("weights", "freeze_blocks", "no_flip", "no_rot90", "zoom", "brightness"),
                      group=grid, freeze_blocks=2, no_flip=False, no_rot90=False, zoom=0.1, brightness=0.1)
    flags.add(grid, "eval_batch_size", "noise_scale", "tf32", "noise_every", "lr_scaling", "lr_reference_batch",
              "warmup_epochs", lr_scaling=["none"], lr_reference_batch=32, warmup_epochs=0.0,
              help={"noise_every": "probe the noise scale on every Nth training step of an epoch (default 32: "
                                   "< 4 %% time; --smoke: 1, its epochs have 3-6 steps)"})
    add_common_args(p, gpus_per_trial=0.25)
    args = p.parse_args(argv)
    defaults = dict(batch_sizes=list(pcam_workload.BATCH_SIZES), optimizers=list(OPTIMIZERS), sgd_lrs=list(LRS["sgd"]),
                    adam_lrs=list(LRS["adam"]), epochs=55, weights="imagenet", eval_batch_size=512,
                    noise_every=NOISE_EVERY)
    return driver.paper_defaults(p, args, defaults, SMOKE, "pcam")


def options_of(args) -> dict:
    """The pcam workload's options these flags give (every one, checked by the workload)."""
    return WORKLOAD.option_values(dict(
        synthetic=args.smoke, data_dir=args.data_dir or "", download=bool(args.download),
        prepared_dir=args.prepared_dir or "", val_fraction=args.val_fraction, split_seed=args.split_seed,
        train_limit=args.train_limit, weights=args.weights, freeze_blocks=args.freeze_blocks, no_flip=args.no_flip,
        no_rot90=args.no_rot90, zoom=args.zoom, brightness=args.brightness))


def prepare_data(args) -> tuple[str, dict[str, int]]:
    """The folder of the official HDF5 layout the trials read (converted from Kaggle data once), and its sizes."""
    folder = pcam_workload.data_folder(options_of(args))
    return str(folder), pcam_data.verify(pcam_data.locate(folder))


def check_flags(args) -> None:
    """Refuse what needs no data to judge before the data is read or converted: wrong ranges, NaN, repeated grid
    values, a grid too large for the driver (counted, never built)."""
    check_common_args(args)
    checks.check_lr_flags(args)
    flags.check(args)
    pcam_workload.check_options(options_of(args))  # the workload's own flags: its checks
    for flag in ("--seeds", "--checkpoint-every"):
        if getattr(args, flag[2:].replace("-", "_")) < 1:
            raise StudyError(f"{flag} must be >= 1, got {getattr(args, flag[2:].replace('-', '_'))}")
    for flag in ("--sgd-lrs", "--adam-lrs"):
        checks.check_unique(flag, getattr(args, flag[2:].replace("-", "_")))
    pairs = sum(len(lrs_of(args, o)) for o in dict.fromkeys(args.optimizers or ()) if o in OPTIMIZERS)
    trials = pairs * len(args.batch_sizes or ()) * args.seeds * len(scaling_rules(args.lr_scaling))
    checks.check_grid_size(trials, getattr(args, "max_trials", checks.MAX_TRIALS),
                           f"{pairs} (optimizer, lr) x {len(args.batch_sizes or ())} batch sizes x {args.seeds} "
                           f"seeds x {len(scaling_rules(args.lr_scaling))} lr scaling rules")


def check_grid(args, n_train: int) -> None:
    """What needs the data to judge (after check_flags)."""
    if not args.batch_sizes or not args.optimizers:
        raise StudyError("empty grid: --batch-sizes and --optimizers need at least one value")
    for name in args.optimizers:
        if name not in OPTIMIZERS:
            raise StudyError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
        if not lrs_of(args, name):
            raise StudyError(f"empty grid: --{name}-lrs needs at least one value")
        for lr in lrs_of(args, name):
            if not (math.isfinite(lr) and lr > 0):
                raise StudyError(f"learning rates must be positive numbers, got {lr} for {name}")
    for b in args.batch_sizes:
        if not 1 <= b <= n_train:
            raise StudyError(f"batch size {b} is outside 1..{n_train} (the number of training patches)")


def hparam_domains(args) -> dict:
    """Every value each grid hyperparameter can take in this study (TensorBoard's HPARAMS experiment)."""
    return dict(optimizer=args.optimizers, lr=[lr for o in args.optimizers for lr in lrs_of(args, o)],
                momentum=[args.momentum] if "sgd" in args.optimizers else [],
                lr_scaling=scaling_rules(args.lr_scaling), batch_size=args.batch_sizes,
                seed=list(range(args.seeds)))  # the seed is the run index


def lrs_of(args, optimizer: str) -> list[float]:
    return list(args.sgd_lrs if optimizer == "sgd" else args.adam_lrs)


class PcamCommand(driver.Command):
    """The original study's one stage, grid: (optimizer, lr) pairs x batch sizes x seeds."""

    study = "pcam"

    def prepare(self, args) -> None:
        check_flags(args)
        self.data_dir, self.sizes = prepare_data(args)
        check_grid(args, min(self.sizes["train"], args.train_limit or self.sizes["train"]))
        base = config_of(args, self.data_dir, "")  # every flag checked (TrainConfig), before Ray starts
        for o, lr, rule in ((o, lr, r) for o in args.optimizers for lr in lrs_of(args, o)
                            for r in scaling_rules(args.lr_scaling)):
            dataclasses.replace(base, optimizer=o, lr=lr, lr_scaling=rule)
        self.features = vgg16_features_state(args.weights)  # before Ray: missing weights fail here, not in every trial

    def record(self, study) -> dict:
        return dict(super().record(study), data={"dir": self.data_dir, "sizes": self.sizes,
                                                 "kaggle": kaggle.read_ids(self.data_dir, "test") is not None})

    def begin(self, study) -> None:
        if not study.args.resume:
            write_experiment(study.folder, "pcam", hparam_domains(study.args), board.KEY_METRICS, board.HPARAMS)

    def stages(self, study):
        args = study.args
        # (optimizer, lr) pairs are not a product, so each pair is one of Tune's points_to_evaluate (one sample per
        # pair, never a random draw); Tune crosses each point with the grid over batch size and seed.
        pairs = [{"optimizer": o, "lr": lr} for o in args.optimizers for lr in lrs_of(args, o)]
        space = dict(stored.stored_config(config_of(args, self.data_dir, study.version),
                                          getattr(args, "checkpoint_every", 1)),
                     optimizer=tune.choice(args.optimizers),
                     lr=tune.choice(sorted({p["lr"] for p in pairs})))
        space.update(lr_scaling=grid_axis(scaling_rules(args.lr_scaling)),
                     batch_size=tune.grid_search(args.batch_sizes), run=tune.grid_search(list(range(args.seeds))),
                     seed=tune.sample_from(lambda c: c["run"]))
        columns = ["optimizer", "lr"] + (["lr_scaling"] if len(args.lr_scaling) > 1 else []) + ["batch_size", "seed"]
        return study.stage("grid", train_pcam, space, data={"features": self.features},
                           search_alg=BasicVariantGenerator(points_to_evaluate=pairs), num_samples=len(pairs),
                           tensorboard=StudyTensorBoard("pcam", "grid", key_metrics=board.KEY_METRICS),
                           console=StudyConsole("grid", columns, [M.BEST_VAL_ACC, M.TEST_AUC]))

    def end(self, study, results) -> None:
        print_summary(results)


def config_of(args, data_dir: str, version: str) -> TrainConfig:
    """What every trial of the grid shares (its optimizer, lr, batch size and seed are the grid's): stored in the
    study's layout (study.pcam.stored) as the grid's base."""
    options = dict(options_of(args), data_dir=data_dir, synthetic=False, prepared_dir="")
    return TrainConfig(workload=stored.WORKLOAD, stage=stored.STAGE,
                       options={k: options[k] for k in (*stored.OPTIONS, *stored.INVERTED.values())},
                       optimizer=stored.DEFAULTS["optimizer"], lr=stored.DEFAULTS["lr"], momentum=args.momentum,
                       epochs=args.epochs, amp=not args.no_amp,
                       eval_batch_size=args.eval_batch_size, noise_scale=args.noise_scale == "on",
                       lr_scaling=scaling_rules(args.lr_scaling)[0], lr_reference_batch=args.lr_reference_batch,
                       warmup_epochs=args.warmup_epochs, tf32=getattr(args, "tf32", False),
                       noise_every=args.noise_every, code_version=version)


def run(args) -> int:
    return driver.drive(PcamCommand(), args)[0]


def print_summary(results) -> None:
    print(f"{'optimizer':>9} {'lr':>8} {'batch':>6} {'seed':>5} {'status':>9} {'best val acc':>12} {'test AUC':>9}")
    rows = []
    for r in results:
        last, c = r.metrics or {}, r.config
        if not c:  # errored before it reported anything (after a --resume)
            continue
        status = "error" if r.error is not None else last.get(M.STATUS, "?")
        rows.append((c["optimizer"], c["lr"], c["batch_size"], c["run"], status,
                     last.get(M.BEST_VAL_ACC, float("nan")), last.get(M.TEST_AUC, float("nan"))))
    for o, lr, b, s, status, acc, test_auc in sorted(rows):
        print(f"{o:>9} {lr:>8.2g} {b:>6} {s:>5} {status:>9} {acc:>12.4f} {test_auc:>9.4f}")


def main(argv=None) -> int:
    return driver.main_of(PcamCommand(), parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
