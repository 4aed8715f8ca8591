"""Check a prepared VTAB-1k or FGVC folder before training on it.

    python data/check_dataset.py vtab dtd cifar100 --root $VTAB_ROOT
    python data/check_dataset.py vtab all                  # every task, root from $VTAB_ROOT
    python data/check_dataset.py fgvc cub dogs --root $FGVC_ROOT --per-class

Prints, per task, a table of images per split (and per class with --per-class), then every
problem found: missing folders or list/json files, malformed lines, labels out of range, class
counts that do not match, missing or unreadable images. Exit status 1 if there is any problem.
Parsing is the DataModules' own (VTAB1k.read_list, FGVC.samples), so this checks exactly what
training reads.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

try:
    from grft_lightning.data.fgvc import FGVC, FGVC_DATASETS, JSON_FILES
except ImportError:  # run from a checkout without `pip install .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from grft_lightning.data.fgvc import FGVC, FGVC_DATASETS, JSON_FILES
from grft_lightning.data.folders import DatasetError, Sample, probe_images
from grft_lightning.data.vtab import LIST_FILES, VTAB1k, VTAB_TASKS

EXPECTED_VTAB_SIZES = {"train800": 800, "val200": 200, "train800val200": 1000}
MAX_LISTED = 20  # problems listed per task; the rest are counted


@dataclass
class Report:
    name: str
    location: str = "?"
    num_classes: int = 0
    counts: dict[str, Counter] = field(default_factory=dict)  # split -> label -> images
    bad: dict[str, int] = field(default_factory=dict)  # split -> missing or unreadable images
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    _probed: dict = field(default_factory=dict)

    def problem(self, message: str) -> None:
        if message not in self.problems:
            self.problems.append(message)

    def add_split(self, split: str, samples: list[Sample], verify: bool) -> None:
        todo = [s.path for s in samples if s.path not in self._probed]
        new = probe_images(todo, verify)
        self._probed.update(new)
        self.counts[split] = Counter(s.label for s in samples)
        self.bad[split] = 0
        for sample in samples:
            problem = self._probed[sample.path]
            if problem is not None:
                self.bad[split] += 1
                if sample.path in new:  # report an image once, under the first split naming it
                    self.problem(f"{sample.where}: image {sample.path}: {problem.detail}")


def check_vtab(task: str, root: str, verify: bool) -> Report:
    dm = VTAB1k(task, root=root)
    report = Report(dm.dataset_name, num_classes=dm.num_classes)
    try:
        report.location = dm.data_dir
    except DatasetError as err:
        report.problem(str(err))
        return report
    lists: dict[str, list[Sample]] = {}
    for filename in LIST_FILES:
        split = filename.removesuffix(".txt")
        try:
            lists[split] = dm.read_list(filename)
        except DatasetError as err:
            report.problem(str(err))
            continue
        report.add_split(split, lists[split], verify)
    for split, size in EXPECTED_VTAB_SIZES.items():
        if split in lists and len(lists[split]) != size:
            report.notes.append(f"{split}.txt has {len(lists[split])} images (VTAB-1k: {size})")
    if all(s in lists for s in EXPECTED_VTAB_SIZES):
        union = {s.path for s in lists["train800"] + lists["val200"]}
        if {s.path for s in lists["train800val200"]} != union:
            report.notes.append("train800val200.txt is not train800.txt + val200.txt")
    report.notes.append(f"extraction: {dm.recorded_extraction()}")
    return report


def check_fgvc(dataset: str, root: str, verify: bool) -> Report:
    dm = FGVC(dataset, root=root)
    report = Report(dm.dataset_name, num_classes=dm.num_classes)
    try:
        report.location = dm.data_dir
    except DatasetError as err:
        report.problem(str(err))
        return report
    for name in JSON_FILES:
        try:
            samples = dm.samples(name)
        except DatasetError as err:
            report.problem(str(err))
            continue
        report.add_split(name, samples, verify)
    return report


def format_report(report: Report, per_class: bool) -> str:
    lines = [f"## {report.name} ({report.num_classes} classes): {report.location}", ""]
    if report.counts:
        lines += ["| split | images | classes present | min / class | max / class | bad images |"]
        lines += ["|---|---:|---:|---:|---:|---:|"]
        for split, counts in report.counts.items():
            per = [counts.get(c, 0) for c in range(report.num_classes)]
            present = sum(1 for n in per if n)
            lines.append(
                f"| {split} | {sum(counts.values())} | {present} | {min(per, default=0)} | "
                f"{max(per, default=0)} | {report.bad[split]} |"
            )
    if per_class and report.counts:
        splits = list(report.counts)
        lines += ["", "| class | " + " | ".join(splits) + " |"]
        lines += ["|---" + "|---:" * len(splits) + "|"]
        for c in range(report.num_classes):
            cells = " | ".join(str(report.counts[s].get(c, 0)) for s in splits)
            lines.append(f"| {c} | {cells} |")
    if report.counts:
        lines.append("")
    lines += [f"note: {note}" for note in report.notes]
    for message in report.problems[:MAX_LISTED]:
        lines.append(f"PROBLEM: {message}")
    if len(report.problems) > MAX_LISTED:
        lines.append(f"PROBLEM: ... and {len(report.problems) - MAX_LISTED} more")
    status = f"{len(report.problems)} problem(s)" if report.problems else "OK"
    lines.append(f"{report.name}: {status}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("benchmark", choices=("vtab", "fgvc"))
    parser.add_argument("names", nargs="+", help="task / dataset config names, or 'all'")
    parser.add_argument("--root", default=None, help="data root (default: $VTAB_ROOT / $FGVC_ROOT)")
    parser.add_argument("--no-verify", action="store_true", help="only check that images exist")
    parser.add_argument("--per-class", action="store_true", help="also print images per class")
    args = parser.parse_args(argv)

    known = VTAB_TASKS if args.benchmark == "vtab" else FGVC_DATASETS
    names = list(known) if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(
            f"unknown {args.benchmark} name(s) {', '.join(unknown)}; valid: {', '.join(known)}"
        )
    root = args.root or ("$VTAB_ROOT" if args.benchmark == "vtab" else "$FGVC_ROOT")
    check = check_vtab if args.benchmark == "vtab" else check_fgvc

    failed = 0
    for name in names:
        report = check(name, root, verify=not args.no_verify)
        print(format_report(report, args.per_class))
        failed += bool(report.problems)
    print(f"{len(names) - failed} of {len(names)} OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
