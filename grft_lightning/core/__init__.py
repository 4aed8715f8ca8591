"""The core library, usable without Lightning: a model's eligible layers read as matrices
(``layers``), frozen weights plus deltas of exactly the selected sizes (``deltas``, with their
autograd functions in ``kernels`` and input recomputation in ``recompute``), accumulated gradients
and their scores (``gradients``), the saved Selection (``selection``), the model's head
(``heads``), parameter counts (``accounting``), pre-trained backbones (``backbones``, ``testbed``)
and small shared utilities (``io``, ``paths``, ``seeding``, ``errors``, ``profiling``). Nothing in
it imports the methods, the data, the training system or the experiment tooling.
"""
