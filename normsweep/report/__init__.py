"""The report of one or more sweeps: the runs table, the grouped table and the pairwise comparisons
(``tables``, ``python -m normsweep.report``), their statistics (``statistics``: Welch's test, Hedges' g,
the multiple-comparison correction, seed counts), the figures (``plots``), and the swept settings both
compare runs by (``columns``)."""
