"""Paired comparisons of two methods over seeds: mean difference, 95 % interval, paired t-test.

A seed fixes a run's data order and head initialisation, so two methods run with the same seed
form a pair, and the seed-to-seed noise they share cancels in the difference. For methods ``A``
and ``B`` on a task, with ``d_s = acc_A(s) - acc_B(s)`` over the ``n`` seeds both have:

- ``mean`` = mean of ``d_s`` (percentage points), ``sd`` = their sample std (ddof = 1);
- 95 % interval = ``mean +- t_{0.975, n-1} * sd / sqrt(n)`` (Student's t);
- ``p`` = two-sided paired t-test, ``t = mean / (sd / sqrt(n))`` with ``n - 1`` degrees of freedom;
  the difference is called significant when ``p < 0.05``. With several comparisons in one table,
  ``p_holm`` is Holm's step-down adjustment over that table's comparisons;
- ``wins``: seeds where ``A`` beat ``B``, out of ``n``.

Over several tasks (the "Mean" column) the pair is formed per seed from the mean over the tasks,
as the report's aggregate std is, so ``n`` stays the number of seeds and task-to-task differences
do not count as replication. Fewer than two pairs, or a zero spread, give no interval and no p
(a zero spread with a non-zero mean gives p = 0).

The t distribution comes from ``scipy.stats`` (``t.ppf`` for the interval, ``t.sf`` for the p-value).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

from scipy.stats import t as student_t


def t_sf_two_sided(t: float, df: float) -> float:
    """``P(|T| >= |t|)`` for Student's t with ``df`` degrees of freedom."""
    return float(2.0 * student_t.sf(abs(t), df))


def t_quantile(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t."""
    return float(student_t.ppf(q, df))


@dataclass
class Paired:
    """One comparison ``a - b`` (percentage points); definitions in the module docstring."""

    a: str
    b: str
    task: str
    n: int
    mean: float | None
    ci_low: float | None
    ci_high: float | None
    p: float | None
    wins: int
    p_holm: float | None = None

    @property
    def significant(self) -> bool:
        p = self.p_holm if self.p_holm is not None else self.p
        return p is not None and p < 0.05

    def to_dict(self) -> dict:
        return {**asdict(self), "significant": self.significant}


def paired(a_scores: dict[int, float], b_scores: dict[int, float], a: str = "A", b: str = "B",
           task: str = "") -> Paired:
    """Compare two methods' per-seed scores (percent); only seeds both have are paired."""
    seeds = sorted(set(a_scores) & set(b_scores))
    diffs = [a_scores[s] - b_scores[s] for s in seeds]
    n = len(diffs)
    wins = sum(d > 0 for d in diffs)
    if n == 0:
        return Paired(a, b, task, 0, None, None, None, None, 0)
    mean = statistics.fmean(diffs)
    if n < 2:
        return Paired(a, b, task, n, mean, None, None, None, wins)
    sd = statistics.stdev(diffs)
    if sd == 0.0:
        return Paired(a, b, task, n, mean, None, None, 1.0 if mean == 0 else 0.0, wins)
    half = t_quantile(0.975, n - 1) * sd / math.sqrt(n)
    p = t_sf_two_sided(mean / (sd / math.sqrt(n)), n - 1)
    return Paired(a, b, task, n, mean, mean - half, mean + half, p, wins)


def holm(comparisons: list[Paired]) -> None:
    """Set ``p_holm`` (Holm's step-down adjustment) over the comparisons that have a p-value."""
    tested = sorted((c for c in comparisons if c.p is not None), key=lambda c: c.p)
    m, running = len(tested), 0.0
    for rank, comparison in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * comparison.p))
        comparison.p_holm = running


def _num(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:+.{digits}f}"


def comparisons_markdown(comparisons: list[Paired], title: str = "Paired comparisons") -> str:
    """A markdown table of comparisons, with the significance rule stated under it."""
    lines = [f"### {title}", "", "| A - B | task | seeds | mean diff | 95 % CI | p | p (Holm) | A wins | significant |",
             "|---|---|---:|---:|---|---:|---:|---:|---|"]
    for c in comparisons:
        interval = "" if c.ci_low is None else f"[{c.ci_low:+.2f}, {c.ci_high:+.2f}]"
        p = "" if c.p is None else f"{c.p:.3g}"
        p_holm = "" if c.p_holm is None else f"{c.p_holm:.3g}"
        lines.append(f"| {c.a} - {c.b} | {c.task} | {c.n} | {_num(c.mean)} | {interval} | {p} | {p_holm} | "
                     f"{c.wins}/{c.n} | {'yes' if c.significant else 'no'} |")
    lines += ["", "- Differences in accuracy points, paired by seed (same data order and head initialisation); "
              "95 % Student-t interval; two-sided paired t-test. Significant: Holm-adjusted p < 0.05 over the "
              "comparisons of this table. \"Mean\" pairs the per-seed means over the tasks (n = seeds)."]
    return "\n".join(lines) + "\n"
