"""What-if sweeps: a grid over attack, trigger setting, poison rate, paradigm, defense, clean-data
budget, learning rate and seed, where every cell is an ordinary stored run.

- :mod:`.grid`: the grid file (JSON or TOML), its axes and the cells it expands to;
- :mod:`.runner`: running and resuming a sweep through Ray (a local instance by default, a cluster
  given its address) or a local process pool, the sweep's records, estimates, result rows;
- :mod:`.figures`: heat maps, line plots with seed spread, CSV and HTML exports."""
from .grid import NONE, Cell, SweepSpec, axis_kind, grid_from_choices, parse_values
from .runner import (EXECUTORS, SweepRecords, SweepResult, estimate, list_sweeps, load_spec, ray_available,
                     run_sweep, sweep_rows)

__all__ = ["Cell", "EXECUTORS", "NONE", "SweepRecords", "SweepResult", "SweepSpec", "axis_kind", "estimate", "grid_from_choices",
           "list_sweeps", "load_spec", "parse_values", "ray_available", "run_sweep", "sweep_rows"]
