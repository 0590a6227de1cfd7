"""The command lines and their drivers: `python -m study run|steps|list` (run_command, steps_study), the one
driver every command shares (driver), the flag table (flags), the console, TensorBoard, resume, the study folder,
the cluster's job submission and lease. Ray is imported here, never by the engine's loop."""
