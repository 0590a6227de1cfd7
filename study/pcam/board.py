"""What the PCam study shows in TensorBoard (study.commands.tensorboard): its key metrics and its hyperparameters
in order. Its run names are the default ones (`sgd_lr=0.002_batch=32_seed=0_00001`: the run index is the seed)."""

from study.commands.tensorboard import BEST_VAL_AUC

# (tag, display name), the study's result first.
KEY_METRICS = [("test/auc", "test AUC"), (BEST_VAL_AUC, "best-epoch validation AUC"),
               ("val/best_acc", "best validation accuracy"), ("test/acc", "test accuracy")]
HPARAMS = ["optimizer", "lr", "lr_scaling", "batch_size", "seed", "momentum"]
