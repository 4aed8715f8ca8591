"""Budgets: the task's published budget, and the one list of the method arguments that set one.

A task config states its published budget once, in a top-level ``budget`` section
(:class:`TaskBudget`; per family in ``base.yaml``, per task where it differs). The command line
links that section and the configured method to the module (``model.task_budget``, a
jsonargparse ``link_arguments`` with :func:`task_budget_for`: ``grft_lightning/training/cli.py``): a
method whose :data:`BUDGET_ARGUMENTS` are all null in its config (its budget is *open*) gets the
task's values for the arguments it has (``fraction`` for GRFT and its random ablations, ``k``
for GPS), and :class:`~grft_lightning.training.module.PEFTModule` builds the method with them
(:func:`with_task_budget`). A budget set by a method config or on the command
line is never replaced, and methods without such arguments are not touched.

Where the effective budget shows: the config (``--print_config``, the run's ``config.yaml``)
holds the method as configured (an open budget stays null there) and the task's ``budget``
section, not the link's target ``model.task_budget``; the effective method config is in every
checkpoint
(``hyper_parameters.method_config``), in ``results.json`` (``budget``: the resolved arguments,
per-matrix counts and ``task``) and in ``tuned.safetensors``. :func:`effective_method_config`
gives it from a parsed config without building anything.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

#: Method arguments that set the size of a budget. A method whose arguments among these are all
#: null takes the task's budget; ``results.json`` records those the method has (with its
#: ``mode`` and ``allocation``, which lay the budget out).
BUDGET_ARGUMENTS = ("fraction", "rows_per_matrix", "columns_per_matrix", "k", "r", "bottleneck")


class TaskBudget:
    """The task's published budget, for the method configs that state none (module docstring).

    Args:
        fraction: selected weight entries as a fraction of the backbone's parameters, for methods
            with a ``fraction`` argument (GRFT, the random rows/columns ablations): 0.003 on
            VTAB-1k (4 rows or 3 columns per matrix on ViT-B/16), 0.0122 on FGVC (16 rows or 13
            columns).
        k: input connections per output neuron, for methods with a ``k`` argument (GPS): 1 on
            VTAB-1k except patch_camelyon 2; on FGVC cub 2, nabirds 20, cars 15, else 1.
    """

    def __init__(self, fraction: float | None = None, k: int | None = None):
        self.fraction = fraction
        self.k = k


def budget_to_apply(parameters: set[str] | list[str], arguments: Mapping[str, Any],
                    budget: Mapping[str, Any] | None) -> dict[str, Any]:
    """The values of ``budget`` a method with these ``__init__`` ``parameters`` and these
    configured ``arguments`` takes: empty when its budget is not open or the task gives none it
    has."""
    given = {k: v for k, v in (budget or {}).items() if v is not None}
    if not given or any(arguments.get(name) is not None for name in BUDGET_ARGUMENTS if name in parameters):
        return {}
    return {name: value for name, value in given.items() if name in parameters}


def _parameters(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def task_budget_for(fraction: float | None, k: int | None, method: Any) -> dict[str, Any]:
    """The link's function (``budget.fraction``, ``budget.k``, ``model.method`` ->
    ``model.task_budget``): the task's values the configured method takes, e.g.
    ``{"fraction": 0.003}`` for GRFT with an open budget, ``{}`` for one that states its own or a
    method without budget arguments. Looks the class up among the registered methods only."""
    from grft_lightning.methods import method_class

    if method is None:
        return {}
    if isinstance(method, str):
        class_path, init_args = method, {}
    else:
        class_path, init_args = method.get("class_path"), method.get("init_args") or {}
    try:
        cls = method_class(class_path)
    except ValueError:
        return {}  # an unknown class is reported by the parser's own checks
    init_args = dict(vars(init_args)) if not isinstance(init_args, Mapping) else dict(init_args)
    return budget_to_apply(_parameters(cls), init_args, {"fraction": fraction, "k": k})


def with_task_budget(method, values: Mapping[str, Any] | None):
    """``method`` itself when ``values`` is empty, else a copy of it with its budget arguments
    set to ``values`` (what :func:`task_budget_for` gave for its open budget; the defaults its
    ``__init__`` filled in for the open budget are dropped)."""
    if not values:
        return method
    config = {k: v for k, v in method.config().items() if k not in BUDGET_ARGUMENTS}
    return type(method)(**config, **values)


def effective_method_config(method: Mapping[str, Any], values: Mapping[str, Any] | None) -> dict[str, Any]:
    """``{"class_path", "init_args"}`` of a parsed config's ``model.method`` as the run builds it,
    given the config's ``model.task_budget`` (``values``)."""
    return {"class_path": method["class_path"], "init_args": {**dict(method.get("init_args") or {}), **(values or {})}}
