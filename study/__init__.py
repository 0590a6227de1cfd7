"""A batch-size study engine: `python -m study run WORKLOAD`, or `study.run_study(workload, **flags)` from Python."""


def __getattr__(name):
    # Lazily: Ray imports this package in every worker, and importing it must do nothing (study.api pulls in Ray).
    if name == "run_study":
        from study.api import run_study

        return run_study
    raise AttributeError(f"module 'study' has no attribute {name!r}")
