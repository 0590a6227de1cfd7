"""A batch-size study engine: `python -m study run WORKLOAD`, or `study.run_study(workload, **flags)` from Python;
`python -m study steps WORKLOAD` or `study.run_steps(workload, **flags)`: the steps-to-result study."""


def __getattr__(name):
    # Lazily: Ray imports this package in every worker, and importing it must do nothing (the commands pull in Ray).
    if name == "run_study":
        from study.commands.run_command import run_study

        return run_study
    if name == "run_steps":  # the steps-to-result study (study.commands.steps_study), not one trial of it
        from study.commands.steps_study import run_steps

        return run_steps
    raise AttributeError(f"module 'study' has no attribute {name!r}")
