"""Every relative link in the repository's Markdown resolves: the file or folder exists and, for a
link into a Markdown page, the #anchor names one of its headings (GitHub's heading ids)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIPPED_DIRS = {".git", "build", "bench_out", "runs", "node_modules"}
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def markdown_files(root: Path):
    return sorted(p for p in root.rglob("*.md")
                  if not SKIPPED_DIRS.intersection(p.relative_to(root).parts[:-1])
                  and not any(part.startswith(".") for part in p.relative_to(root).parts[:-1]))


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks, inline code spans removed."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, re.sub(r"`[^`]*`", "", line)


def heading_ids(text: str) -> set:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to '-',
    repeats numbered -1, -2, ..."""
    ids, seen = set(), {}
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            ids.add(slug if count == 0 else f"{slug}-{count}")
    return ids


def broken_links(root: Path) -> list:
    problems = []
    for page in markdown_files(root):
        for number, line in prose_lines(page.read_text(encoding="utf-8")):
            for target in LINK.findall(line):
                if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, mailto:, ...
                    continue
                path_part, _, anchor = target.partition("#")
                resolved = (page.parent / path_part).resolve() if path_part else page
                where = f"{page.relative_to(root)}:{number}: {target}"
                if not resolved.exists():
                    problems.append(f"{where} (no such file)")
                elif anchor and resolved.suffix == ".md" and anchor not in heading_ids(resolved.read_text(encoding="utf-8")):
                    problems.append(f"{where} (no heading #{anchor} in {resolved.name})")
    return problems


def test_every_relative_link_in_the_docs_resolves():
    assert markdown_files(ROOT), "no Markdown found"
    problems = broken_links(ROOT)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_check_finds_a_missing_file_a_missing_anchor_and_ignores_code(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## Static cost (sm_90, read without a GPU)\n\n"
                                               "## Why `model.sigma_data`: it\n\n## Twice\n\n## Twice\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/page.md) [ok](docs/page.md#static-cost-sm_90-read-without-a-gpu) "
        "[ok](docs/page.md#why-modelsigma_data-it) [ok](docs/page.md#twice-1) [ok](docs/) "
        "[web](https://example.org/x.md) ![img](docs/page.md) [self](#a-missing-self-anchor)\n"
        "[gone](docs/gone.md) [bad anchor](docs/page.md#static-cost)\n"
        "`[in code](nowhere.md)`\n```\n[fenced](nowhere.md)\n```\n")
    problems = broken_links(tmp_path)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "#a-missing-self-anchor (no heading #a-missing-self-anchor in README.md)",
        "docs/gone.md (no such file)",
        "docs/page.md#static-cost (no heading #static-cost in page.md)",
    ]


@pytest.mark.parametrize("heading, anchor", [
    ("GPU: one H100, 2026-11-26", "gpu-one-h100-2026-11-26"),
    ("The C++ CPU backend (`backend='cpp'`)", "the-c-cpu-backend-backendcpp"),
    ("Largest training crop on the CPU (6 GiB budget)", "largest-training-crop-on-the-cpu-6-gib-budget"),
])
def test_heading_ids_follow_github(heading, anchor):
    assert anchor in heading_ids(f"## {heading}\n")
