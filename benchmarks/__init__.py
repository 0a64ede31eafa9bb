"""The project's benchmarks, run from the repository root as modules: `python -m benchmarks.step_bench --help`."""
