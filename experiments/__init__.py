"""One module per table or figure of the paper, named after it, plus the Table 2 sweep and the experiments beyond
the paper's tables (``td_maps``, ``fidelity_switches``, ``gumbel_clusters``). Each runs from the repository root
as ``python -m experiments.<module> ...``; the figure makers are in ``experiments.plots``."""
