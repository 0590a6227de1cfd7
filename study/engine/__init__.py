"""The engine: the one training loop (loop), the trial config (config), the workload trial (run_workload) and
the steps trial (steps_trial), the steps-to-result rule (steps), the noise scale (noise), the evaluation schedule,
learning-rate rules, memory and the trial bridge to Ray Tune (bridge). It names no paper; importing the package
imports nothing (analysis imports engine.steps without PyTorch)."""
