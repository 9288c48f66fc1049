"""The README and the guides under docs/: every relative link reaches a file that exists (and, for
`file.md#anchor`, a heading of that file, slugged as GitHub does), every guide is linked from the
README, and the README stays short enough to read on a screen or two."""
import re
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.core

README_MAX_LINES = 160

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
# [text](target) and ![alt](target), with an optional "title"; the text may hold `code`.
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")


def documents(root: Path) -> List[Path]:
    return [root / "README.md"] + sorted((root / "docs").glob("*.md"))


def prose_lines(text: str) -> Iterator[Tuple[int, str]]:
    """Line number and text of each line outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its rendered text lower-cased, punctuation dropped,
    spaces made hyphens."""
    text = INLINE_CODE.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> Set[str]:
    """Every heading anchor of a markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: Dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else "{}-{}".format(slug, count))
    return found


def links(path: Path) -> Iterator[Tuple[int, str]]:
    """Line number and target of every link in the file's prose (not in code)."""
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        reference = REFERENCE_LINK.match(line)
        if reference:
            yield number, reference.group(1)
            continue
        # Link syntax inside `code` is not a link; blank it out, keeping the brackets around it.
        prose = INLINE_CODE.sub(lambda m: "x" * len(m.group(0)), line)
        for match in INLINE_LINK.finditer(prose):
            yield number, match.group(1)


def broken_links(path: Path, root: Path) -> List[str]:
    """One line for each relative link of `path` that leads nowhere."""
    problems = []
    for number, target in links(path):
        where = "{}:{}: {}".format(path.relative_to(root), number, target)
        if not target:
            problems.append(where + " (empty link)")
            continue
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
            continue  # http:, https:, mailto: ... are not this repository's files
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        if file_part.startswith("/") or root.resolve() not in [destination, *destination.parents]:
            problems.append(where + " (outside the repository)")
        elif not destination.exists():
            problems.append(where + " (no such file)")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            problems.append(where + " (no heading with anchor #{} in {})".format(
                anchor, destination.relative_to(root.resolve())))
    return problems


@pytest.mark.parametrize("doc", documents(ROOT), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    assert doc.is_file()
    assert broken_links(doc, ROOT) == []


def test_readme_is_short_and_links_every_guide():
    readme = ROOT / "README.md"
    lines = readme.read_text(encoding="utf-8").splitlines()
    assert len(lines) < README_MAX_LINES, "README.md has {} lines; move detail into docs/".format(len(lines))
    assert any("./run.sh test" in line for line in lines)
    linked = {(readme.parent / target.partition("#")[0]).resolve() for _, target in links(readme)}
    guides = sorted((ROOT / "docs").glob("*.md"))
    assert len(guides) >= 7
    assert [g.name for g in guides if g.resolve() not in linked] == []


def test_checker_reports_missing_files_anchors_and_escapes(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text("# A guide\n\n## What `./run.sh` does\n\n## Notes\n\n## Notes\n")
    (tmp_path / "README.md").write_text("\n".join([
        "# Title",
        "[ok](docs/guide.md#what-runsh-does) and [second notes](docs/guide.md#notes-1)",
        "[self](#title) [web](https://example.org/x.md#nowhere)",
        "[gone](docs/missing.md)",
        "[bad anchor](docs/guide.md#notes-2)",
        "[up and out](../elsewhere.md)",
        "`[in code](nowhere.md)`",
        "```",
        "[in a fence](nowhere.md)",
        "```",
        "[bad self](#no-such-heading)",
        "[ref]: docs/also-missing.md",
    ]) + "\n")
    problems = broken_links(tmp_path / "README.md", tmp_path)
    assert [p.split(" (")[0] for p in problems] == [
        "README.md:4: docs/missing.md",
        "README.md:5: docs/guide.md#notes-2",
        "README.md:6: ../elsewhere.md",
        "README.md:11: #no-such-heading",
        "README.md:12: docs/also-missing.md",
    ]


@pytest.mark.parametrize("heading, slug", [
    ("What `./run.sh` does", "what-runsh-does"),
    ("Running on Graphcore IPUs (Paperspace IPU-Pod16, IPU-Pod64)",
     "running-on-graphcore-ipus-paperspace-ipu-pod16-ipu-pod64"),
    ("Checkpoints, resuming and export", "checkpoints-resuming-and-export"),
    ("LoRA under the split and on IPUs", "lora-under-the-split-and-on-ipus"),
    ("ipu-t5 against `Seq2SeqTrainer` (`python bench/compare.py`, 785 s)",
     "ipu-t5-against-seq2seqtrainer-python-benchcomparepy-785-s"),
    ("The [notebook](x.ipynb) and its_cells", "the-notebook-and-its_cells"),
])
def test_github_slug(heading, slug):
    assert github_slug(heading) == slug
