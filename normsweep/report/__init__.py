"""The report of one or more sweeps: the runs table, the grouped table and the pairwise comparisons
(``tables``, ``python -m normsweep.report``), the figures (``plots``), and the swept settings both
compare runs by (``columns``)."""
