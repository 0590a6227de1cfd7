"""A Ray worker setup hook (runtime_env worker_process_setup_hook="oom_hook.setup") for tests/test_resume.py: while
the file named by $OOM_FLAG exists, MNIST trials of batch size $OOM_BATCH run out of CUDA memory right after they
report epoch 1, as a trial whose GPU share is too small would."""

import os


def setup() -> None:
    import torch

    from study.mnist import trainable as trainables

    run_mnist = trainables.run_mnist

    def patched(cfg, data, device, report, start=None):
        if os.path.exists(os.environ["OOM_FLAG"]) and cfg.batch_size == int(os.environ["OOM_BATCH"]):
            def report_then_fail(metrics, state):
                report(metrics, state)
                if metrics["epoch"] == 1:
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
            return run_mnist(cfg, data, device, report_then_fail, start)
        return run_mnist(cfg, data, device, report, start)

    trainables.run_mnist = patched
