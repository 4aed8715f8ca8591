"""Experiment tooling on top of the training system: suites of runs (``sweep``), the tables of a
folder of runs (``tables``), their markdown, CSV and comparisons (``report``), their figures
(``figures``) and the paired statistics (``stats``).
"""
