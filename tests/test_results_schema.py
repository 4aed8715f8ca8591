"""``results.json`` has one schema, ``grft_lightning.training.results.Results``: what ``build_results`` and the
DataModules write is in it, the table in docs/INTERFACES.md is generated from it, and the keys the
README names are its keys.

    python tests/test_results_schema.py   # rewrites the table in docs/INTERFACES.md
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grft_lightning.training import results as results_module  # noqa: E402
from grft_lightning.training.results import Budget, Counts, Results, SelectionRecord, build_results  # noqa: E402

INTERFACES = ROOT / "docs/INTERFACES.md"
BEGIN = "<!-- results.json keys: generated from grft_lightning/training/results.py by `python tests/test_results_schema.py` -->"
END = "<!-- end of the results.json keys -->"
NESTED = {"counts": Counts, "budget": Budget, "selection": SelectionRecord}


def fields(cls: type) -> dict[str, tuple[str, str]]:
    """Each key of ``cls`` -> (its type as written in results.py, its ``#:`` comment)."""
    source = Path(results_module.__file__).read_text().splitlines()
    start = next(i for i, line in enumerate(source) if line.startswith(f"class {cls.__name__}("))
    out, pending = {}, []
    for line in source[start + 1:]:
        if line and not line.startswith(" "):
            break
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
        elif re.match(r"\w+: ", stripped):
            key, kind = stripped.split(": ", 1)
            match = re.fullmatch(r"NotRequired\[(.*)\]", kind)
            out[key] = (match.group(1) if match else kind, " ".join(pending))
            pending = []
    return out


def all_keys() -> set[str]:
    keys = set(Results.__annotations__)
    for parent, cls in NESTED.items():
        keys |= {f"{parent}.{key}" for key in cls.__annotations__}
    return keys


def table() -> str:
    lines = [BEGIN, "| key | type | always | meaning |", "|---|---|---|---|"]
    for cls, prefix in [(Results, ""), *[(cls, f"{parent}.") for parent, cls in NESTED.items()]]:
        for key, (kind, note) in fields(cls).items():
            always = "yes" if key in cls.__required_keys__ else ""
            note = note.replace('``', '`')
            lines.append(f"| `{prefix}{key}` | {kind.replace('|', 'or')} | {always} | {note} |")
    return "\n".join([*lines, END])


def test_every_key_has_a_comment():
    for cls in (Results, *NESTED.values()):
        found = fields(cls)
        assert list(found) == list(cls.__annotations__), cls.__name__
        assert all(note for _, note in found.values()), cls.__name__


def test_interfaces_table_is_generated_from_the_schema():
    text = INTERFACES.read_text()
    assert BEGIN in text and END in text, "docs/INTERFACES.md lost its results.json table"
    current = text[text.index(BEGIN):text.index(END) + len(END)]
    assert current == table(), "run `python tests/test_results_schema.py` to regenerate the table"


def test_the_readme_names_only_schema_keys():
    readme = (ROOT / "README.md").read_text()
    [paragraph] = [p for p in readme.split("\n\n") if "`results.json` keys:" in p]
    named = set(re.findall(r"`([a-z_]+(?:\.[a-z_]+)?)`", paragraph)) - {"results.json"}
    assert named and named <= all_keys(), sorted(named - all_keys())


def test_build_results_writes_schema_keys(tmp_path):
    from grft_lightning.data import FGVC, VTAB1k, MNISTDigits
    from grft_lightning.methods import GRFT

    counts = {"selected": 10, "bias": 2, "head": 3, "tuned": 15, "backbone": 100, "tuned_pct": 15.0}
    extra = {**VTAB1k("dtd", root=str(tmp_path)).describe(), **FGVC("cub", root=str(tmp_path)).describe(),
             **MNISTDigits().describe(), "config_files": ["a.yaml"], "method_name": "grft_row",
             "selection": {"loss": "ce", "mode": "eval", "temperature": 0.07, "max_batches": None, "from_file": None}}
    budget = results_module.budget_record(GRFT(fraction=0.01), None, {"fraction": 0.01, "k": None})
    written = build_results(method="grft_row", dataset="vtab/dtd", backbone="test_vit", seed=0, counts=counts,
                            selection_seconds=1.0, train_seconds=2.0, val_acc=0.5, test_acc=0.25,
                            peak_memory_bytes=7, budget=budget, extra=extra)
    written = json.loads(json.dumps(written))
    assert list(written)[:len(Results.__required_keys__)] == [k for k in Results.__annotations__
                                                              if k in Results.__required_keys__]
    assert set(written) <= set(Results.__annotations__)
    assert Results.__required_keys__ <= set(written)
    for parent, cls in NESTED.items():
        assert cls.__required_keys__ <= set(written[parent]) <= set(cls.__annotations__), parent


if __name__ == "__main__":
    text = INTERFACES.read_text()
    if BEGIN in text:
        text = text[:text.index(BEGIN)] + table() + text[text.index(END) + len(END):]
    else:
        raise SystemExit(f"docs/INTERFACES.md: add the two marker lines where the table goes:\n{BEGIN}\n{END}")
    INTERFACES.write_text(text)
    print(f"wrote the results.json table of {INTERFACES.relative_to(ROOT)}")
