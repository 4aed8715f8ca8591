"""The training system: one LightningModule for every method (``module``), the selection pass and
the other callbacks (``callbacks``, ``ema``), the command line (``cli``), the task budget
(``budgets``), losses and schedules, a run's folder (``rundir``) and what it records
(``records``, with the ``results.json`` schema in ``results``). It builds on the core library,
the methods and the data.
"""
