"""The training engine: one loop that calls a task's `run_step`, shared concerns as hooks, device setup."""
