"""Pointers to the project's documents resolve: every mention of ``docs/methods.md``,
``docs/data.md``, ``docs/reproduce.md``, ``docs/cluster.md`` or ``docs/INTERFACES.md`` in a tracked
source, config or markdown file names a file in the repository, a bare ``methods.md`` /
``data.md`` outside ``docs/`` says which folder it means, and relative markdown links in
``docs/`` and the READMEs lead to existing files."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
DOCS = ("methods", "data", "reproduce", "cluster", "INTERFACES")
MENTION = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*(?:%s)\.md)" % "|".join(DOCS))
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def tracked(*suffixes: str) -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
        names = out.splitlines()
    except (OSError, subprocess.CalledProcessError):  # an unpacked archive: every file outside build folders
        skip = {".venv", ".git", "runs", "build", "wandb", "__pycache__", ".gpu_wheels"}
        names = [str(p.relative_to(REPO)) for p in REPO.rglob("*")
                 if not skip.intersection(p.relative_to(REPO).parts)]
    return [REPO / line for line in names if line.endswith(suffixes) and (REPO / line).is_file()]


def test_mentions_of_the_documents_resolve():
    problems = []
    for path in tracked(".py", ".md", ".yaml", ".sh", ".sbatch"):
        if path == Path(__file__).resolve():
            continue
        for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for mention in MENTION.findall(line):
                where = f"{path.relative_to(REPO)}:{lineno}: {mention}"
                if "/" not in mention:  # a bare name only makes sense next to the documents
                    if path.parent != REPO / "docs" and not (REPO / path.parent / mention).is_file():
                        problems.append(f"{where} (say docs/{mention})")
                elif not ((REPO / mention).is_file() or (path.parent / mention).is_file()):
                    problems.append(f"{where} (no such file)")
    assert not problems, "\n".join(problems)


def test_relative_markdown_links_resolve():
    pages = [p for p in tracked(".md") if p.parent == REPO / "docs" or p.name == "README.md"]
    assert REPO / "docs" / "methods.md" in pages and REPO / "docs" / "data.md" in pages
    problems = []
    for page in pages:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            if not (page.parent / target).exists():
                problems.append(f"{page.relative_to(REPO)}: link to {target}")
    assert not problems, "\n".join(problems)
