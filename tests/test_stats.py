"""Paired statistics (grft_lightning.experiments.stats) and ``report --compare`` on synthetic results with known answers.

Reference values were computed independently (Student's t tables / a statistics package):
t_{0.975, 4} = 2.7764451052, t_{0.975, 1} = 12.7062047362, t_{0.975, 19} = 2.0930240544,
P(|T_4| >= 1.3) = 0.2634515965, P(|T_9| >= 1.3) = 0.2259063727.
"""

import json
import math
from pathlib import Path

import pytest

from grft_lightning.experiments import report, stats, tables


@pytest.mark.parametrize("df, expected", [(1, 12.7062047362), (4, 2.7764451052), (19, 2.0930240544)])
def test_t_quantile(df, expected):
    assert stats.t_quantile(0.975, df) == pytest.approx(expected, abs=1e-8)


@pytest.mark.parametrize("df, expected", [(4, 0.2634515965), (9, 0.2259063727)])
def test_t_two_sided_tail(df, expected):
    assert stats.t_sf_two_sided(1.3, df) == pytest.approx(expected, abs=1e-9)
    assert stats.t_sf_two_sided(0.0, df) == pytest.approx(1.0)


def test_paired_known_answer():
    # differences 1.0, 0.8, -0.4, 1.9, 1.5: mean 0.96, sd 0.8735, t = 2.4575, p = 0.069879
    a = {0: 90.0, 1: 91.0, 2: 89.5, 3: 92.0, 4: 90.5, 7: 50.0}  # seed 7 has no partner: ignored
    b = {0: 89.0, 1: 90.2, 2: 89.9, 3: 90.1, 4: 89.0}
    r = stats.paired(a, b, "grft", "random", "digit")
    sd = math.sqrt(sum((d - 0.96) ** 2 for d in (1.0, 0.8, -0.4, 1.9, 1.5)) / 4)
    assert (r.n, r.wins) == (5, 4)
    assert r.mean == pytest.approx(0.96)
    assert r.ci_low == pytest.approx(0.96 - 2.7764451052 * sd / math.sqrt(5))
    assert r.ci_high == pytest.approx(0.96 + 2.7764451052 * sd / math.sqrt(5))
    assert r.p == pytest.approx(0.0698788458, abs=1e-8)
    assert not r.significant


def test_paired_agrees_with_scipy_paired_t_test():
    """The interval and p of :func:`stats.paired` are those of ``scipy.stats.ttest_rel`` on the
    same seeds (an independent route: scipy's own paired test from the two score lists)."""
    from scipy.stats import ttest_rel

    a = {0: 71.25, 1: 69.5, 2: 73.0, 3: 70.75, 4: 72.5, 5: 70.0}
    b = {0: 70.0, 1: 69.75, 2: 71.5, 3: 70.5, 4: 70.25, 5: 69.0}
    r = stats.paired(a, b)
    reference = ttest_rel([a[s] for s in range(6)], [b[s] for s in range(6)])
    interval = reference.confidence_interval(0.95)
    assert r.p == pytest.approx(float(reference.pvalue), rel=1e-12)
    assert (r.ci_low, r.ci_high) == (pytest.approx(float(interval.low), rel=1e-12),
                                     pytest.approx(float(interval.high), rel=1e-12))
    # differences 1.25, -0.25, 1.5, 0.25, 2.25, 1.0: mean 1, sd sqrt(0.8), t = 2.7386128, 5 degrees of freedom
    assert (r.mean, r.p) == (pytest.approx(1.0), pytest.approx(0.0408594039, abs=1e-9))


def test_two_sided_t_tail_known_value():
    # the two-sided t tail is I_{df / (df + t^2)}(df / 2, 1 / 2): 0.2634515965 at t = 1.3, df = 4
    assert stats.t_sf_two_sided(1.3, 4.0) == pytest.approx(0.2634515965, abs=1e-9)
    assert stats.t_sf_two_sided(-1.3, 4.0) == stats.t_sf_two_sided(1.3, 4.0)
    assert stats.t_sf_two_sided(0.0, 4.0) == 1.0


def test_paired_degenerate_cases():
    assert stats.paired({0: 1.0}, {1: 2.0}).n == 0
    one = stats.paired({0: 3.0}, {0: 1.0})
    assert (one.n, one.mean, one.p, one.ci_low) == (1, 2.0, None, None)
    constant = stats.paired({0: 3.0, 1: 4.0}, {0: 1.0, 1: 2.0})  # the same +2 on both seeds
    assert constant.p == 0.0 and constant.significant
    tie = stats.paired({0: 3.0, 1: 4.0}, {0: 3.0, 1: 4.0})
    assert tie.p == 1.0 and not tie.significant


def test_holm_adjustment():
    comparisons = [stats.Paired("a", "b", t, 5, 1.0, 0, 2, p, 5) for t, p in (("x", 0.01), ("y", 0.04), ("z", 0.03))]
    comparisons.append(stats.Paired("a", "b", "w", 1, 1.0, None, None, None, 1))
    stats.holm(comparisons)
    # sorted p 0.01, 0.03, 0.04 with m = 3: 0.03, max(0.03, 0.06) = 0.06, max(0.06, 0.04) = 0.06
    assert [c.p_holm for c in comparisons] == [pytest.approx(0.03), pytest.approx(0.06), pytest.approx(0.06), None]
    assert [c.significant for c in comparisons] == [True, False, False, False]


def write(root: Path, task: str, method: str, seed: int, acc_pct: float) -> None:
    folder = root / task / method / f"seed{seed}"
    folder.mkdir(parents=True)
    record = {"method": method, "dataset": f"vit/{task}", "seed": seed, "test_acc": acc_pct / 100, "tuned_pct": 1.0}
    (folder / "results.json").write_text(json.dumps(record))


def test_report_compare(tmp_path):
    # task "a": grft = random + 2 on every seed except seed 4 (+1); task "b": grft = random - 1 + seed noise
    runs = tmp_path / "runs"
    for seed in range(5):
        write(runs, "a", "random", seed, 80 + seed)
        write(runs, "a", "grft", seed, 80 + seed + (1 if seed == 4 else 2))
        write(runs, "b", "random", seed, 60.0)
        write(runs, "b", "grft", seed, 59.0 + 0.5 * (seed % 2))
    out = tmp_path / "out"
    assert report.main([str(runs), "--out", str(out), "--compare", "grft:random",
                        "--compare-json", str(tmp_path / "cmp.json")]) == 0
    rows = {r["task"]: r for r in json.loads((tmp_path / "cmp.json").read_text())}
    assert set(rows) == {"a", "b", tables.MEAN}
    assert rows["a"]["mean"] == pytest.approx(1.8) and rows["a"]["wins"] == 5
    direct = stats.paired({s: 0.0 for s in range(5)}, {s: -(1 if s == 4 else 2) for s in range(5)})
    assert rows["a"]["p"] == pytest.approx(direct.p)
    assert rows["b"]["mean"] == pytest.approx(-0.8) and rows["b"]["wins"] == 0
    # the mean column pairs per-seed means over the two tasks: (2 - 1) / 2, ..., (1 - 0.5) / 2
    per_seed = [(d_a + d_b) / 2 for d_a, d_b in zip([2, 2, 2, 2, 1], [-1, -0.5, -1, -0.5, -1])]
    assert rows[tables.MEAN]["mean"] == pytest.approx(sum(per_seed) / 5)
    assert rows[tables.MEAN]["n"] == 5
    assert all(r["p_holm"] >= r["p"] for r in rows.values())
    text = (out / "comparisons.md").read_text()
    assert "| grft - random | a | 5 | +1.80 |" in text
    assert "Paired comparisons" in (out / "report.md").read_text()


def test_report_compare_unknown_method(tmp_path, capsys):
    write(tmp_path, "a", "grft", 0, 50.0)
    with pytest.raises(SystemExit):
        report.main([str(tmp_path), "--out", str(tmp_path / "o"), "--compare", "grft:nope"])
    assert "no runs of nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report.main([str(tmp_path), "--out", str(tmp_path / "o"), "--compare", "grft"])


def test_compare_skips_the_mean_of_a_method_that_missed_a_task(tmp_path):
    runs = tmp_path / "runs"
    for seed in range(3):
        write(runs, "a", "grft", seed, 80 + seed)
        write(runs, "b", "grft", seed, 70 + seed)
        write(runs, "a", "variant", seed, 81 + seed)  # task "a" only
    [table] = tables.summarize(tables.load_results(runs)).values()
    compared = report.compare(table, [("variant", "grft")])
    assert [(c.task, c.n, c.mean) for c in compared] == [("a", 3, pytest.approx(1.0))]


def test_report_reads_several_run_folders(tmp_path):
    for seed in range(2):
        write(tmp_path / "main", "a", "grft", seed, 80.0 + seed)
        write(tmp_path / "extra", "a", "variant", seed, 82.0 + seed)
    assert report.main([str(tmp_path / "main"), str(tmp_path / "extra"), "--out", str(tmp_path / "o"),
                        "--compare", "variant:grft", "--compare-json", str(tmp_path / "c.json")]) == 0
    [row, mean] = json.loads((tmp_path / "c.json").read_text())
    assert (row["task"], row["n"], row["mean"]) == ("a", 2, pytest.approx(2.0)) and mean["task"] == tables.MEAN
