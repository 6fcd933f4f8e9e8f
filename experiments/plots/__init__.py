"""Figures from committed or fresh runs: accuracy against parameters (Table 2), learning curves, learned
allocations. Each runs as ``python -m experiments.plots.<module> ...`` and writes under runs/plots unless told
otherwise."""
