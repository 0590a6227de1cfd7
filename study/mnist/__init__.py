"""The MNIST regression paper ("Is the batch size affecting the performance of regression CNNs?"): its command
(`python -m study.mnist`, command), trial (trainable), workload (mnist-regression), model, report section and the
stored layout of its trial configs (stored). Importing the package imports nothing."""

WORKLOAD = "mnist-regression"  # the name of its workload (this package's `workload` module) in study.workload
