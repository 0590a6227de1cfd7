"""What the MNIST regression study shows in TensorBoard (study.commands.tensorboard): its key metrics, its
hyperparameters in order, and its run names, which lead with the regression target."""

from study.commands.tensorboard import RunName

# (tag, display name), the study's result first.
KEY_METRICS = [("test/mse", "test MSE"), ("val/mse", "validation MSE")]
# Most telling first; lr_factor (it sets lr) and seed (batch + run) are derived, optimizer a constant: unticked.
HPARAMS = ["stage", "target", "lr_scaling", "batch_size", "lr", "run", "lr_factor", "seed", "optimizer"]


def run_names(lrs: dict | None = None) -> RunName:
    """`mean_lr=0.001_batch=16_run=0_00003`; lrs: target -> the rate a stage's lr_factor multiplies."""
    return RunName(lrs, lead="target", repeat="run", only_where_repeated=True)
