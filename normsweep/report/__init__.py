"""The report of one or more sweeps: the runs read into one DataFrame (``runs``), the pairwise comparisons
(``comparisons``) and their statistics (``statistics``: Welch's test, Hedges' g, the multiple-comparison
correction, seed counts), the tables written and ``python -m normsweep.report`` (``tables``), the figures
(``plots``), and the swept settings the tables and plots compare runs by (``columns``)."""
