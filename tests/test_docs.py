"""Every ```python block in README.md and docs/*.md compiles, and no example passes an alias positionally. No server.

A block that is deliberately not complete Python (a fragment, alternatives side by side) is marked
with ``<!-- docs-test: no-compile -->`` on the line before its opening fence: invisible on the page.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NO_COMPILE = "<!-- docs-test: no-compile -->"
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)[ \t]*(?P<info>[^`\n]*)$")


def python_blocks(path: Path) -> list[tuple[int, str, bool]]:
    """(first line number, dedented source, marked no-compile) for each ```python block of a Markdown file."""
    lines = path.read_text().splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        info = opening["info"].split()
        end = i + 1
        while end < len(lines) and not re.match(rf"^[ \t]*{re.escape(fence)}[ \t]*$", lines[end]):
            end += 1
        assert end < len(lines), f"{path.name}:{i + 1}: code fence never closed"
        if info and info[0] in ("python", "py", "python3"):
            body = [line.removeprefix(indent) for line in lines[i + 1 : end]]
            skip = i > 0 and lines[i - 1].strip() == NO_COMPILE
            blocks.append((i + 2, "\n".join(body) + "\n", skip))
        i = end + 1
    return blocks


BLOCKS = [(path, line, src, skip) for path in DOCS for line, src, skip in python_blocks(path)]


def test_the_docs_have_python_blocks() -> None:
    assert len(BLOCKS) >= 30, "the extraction found fewer blocks than the docs have"
    assert all(path.exists() for path in DOCS)


@pytest.mark.parametrize(
    ("path", "line", "src", "skip"), BLOCKS, ids=[f"{p.relative_to(ROOT)}:{n}" for p, n, _, _ in BLOCKS]
)
def test_python_block_compiles(path: Path, line: int, src: str, skip: bool) -> None:
    if skip:
        pytest.skip(f"marked {NO_COMPILE}")
    # Line numbers in a SyntaxError point into the Markdown file.
    compile("\n" * (line - 1) + src, str(path.relative_to(ROOT)), "exec", dont_inherit=True)


#: ``unit_of_work("default")`` or ``unit_of_work(self.using)`` raises TypeError: the alias is ``using=``.
POSITIONAL_ALIAS = re.compile(r"\ba?unit_of_work\(\s*(?:[\"']|(?:self\.)?using\b(?!\s*=))")


@pytest.mark.parametrize("path", [*DOCS, *sorted((ROOT / "src" / "freshconn").rglob("*.py"))], ids=lambda p: p.name)
def test_no_positional_alias_in_examples(path: Path) -> None:
    text = path.read_text()
    hits = [
        f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
        for m in POSITIONAL_ALIAS.finditer(text)
    ]
    assert hits == []


def test_the_checks_catch_what_they_are_for() -> None:
    assert POSITIONAL_ALIAS.search("runs inside `freshconn.unit_of_work(self.using)`")
    assert POSITIONAL_ALIAS.search('with freshconn.aunit_of_work("default"):')
    assert not POSITIONAL_ALIAS.search("freshconn.unit_of_work(using=self.using)")
    assert not POSITIONAL_ALIAS.search("freshconn.unit_of_work(handle)")
    with pytest.raises(SyntaxError):
        compile("for msg in a:\nfor msg in b:\n    pass\n", "x.md", "exec")


def test_the_benchmark_report_says_1_round_not_1_rounds() -> None:
    from benchmarks import report

    assert report.plural(1, "round") == "1 round"
    assert report.plural(3, "interleaved round") == "3 interleaved rounds"
    machine = {"cpu_count": 2, "loadavg_start": [0.5], "loadavg_end": [0.7]}
    run = {"loadavg_before": [0.5], "loadavg_after": [0.6]}
    results = {"machine": machine, "config": {"rounds": 1, "seconds": 0.5}, "drivers": {"psycopg": {"loop": run}}}
    footer = report._footer(results)
    assert footer.startswith("medians of 1 interleaved round of 0.5 s per policy;")
