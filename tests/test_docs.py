"""The README and docs/ stay honest after merges: a README a newcomer can read (under 250 lines,
exactly two set-up commands, the test command CI runs verbatim) and no relative link or anchor
in README.md or docs/*.md that leads nowhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
TEST_COMMAND = "pip install -e '.[test]' && python -m pytest -q"
FIRST_RUN = 'siglip classify examples/cats.png --labels "2 cats,2 dogs"'
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def section(text: str, heading: str) -> str:
    """The lines under `heading` up to the next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = text.splitlines()
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines))
                if lines[i].startswith("#") and len(lines[i]) - len(lines[i].lstrip("#")) <= level
                and not in_fence(lines, i)), len(lines))
    return "\n".join(lines[start:end])


def in_fence(lines: list[str], index: int) -> bool:
    return sum(1 for line in lines[:index] if line.startswith("```")) % 2 == 1


def fenced_blocks(text: str) -> list[list[str]]:
    blocks, current = [], None
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current = []
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where brackets are not links."""
    kept, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            kept.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(kept)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.lstrip("#").strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("#") and not in_fence(lines, i):
            base = slug(line)
            count = seen.get(base, 0)
            seen[base] = count + 1
            out.add(base if count == 0 else f"{base}-{count}")
    return out


def test_the_readme_is_short():
    assert len(README.read_text().splitlines()) < 250


def test_exactly_two_set_up_commands():
    blocks = fenced_blocks(section(README.read_text(), "## Set up"))
    assert len(blocks) == 2, blocks
    install, tests = ([line for line in block if line.strip()] for block in blocks)
    assert len(install) == 1 and install[0].endswith(FIRST_RUN) and install[0].startswith("pip install ")
    assert tests == [TEST_COMMAND]
    assert (ROOT / "examples" / "cats.png").is_file()


def test_ci_runs_the_readme_test_command_verbatim():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert TEST_COMMAND in lines


def test_slugs_are_githubs():
    assert slug("## Scaling out: `embed --engine ray`") == "scaling-out-embed---engine-ray"
    assert slug("### Agreement with `--exact`") == "agreement-with---exact"
    assert slug("## Fast modes: bf16, int8, fast decoding (issue 14)") == "fast-modes-bf16-int8-fast-decoding-issue-14"


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_leads_somewhere(page):
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path_part, _, anchor = target.partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page
        if not destination.exists():
            broken.append(f"{target}: no such file")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{target}: no heading #{anchor} in {destination.name}")
    assert not broken, broken


def test_the_readme_links_every_docs_page():
    linked = {Path(t.partition("#")[0]).name for t in LINK.findall(prose(README.read_text())) if t.startswith("docs/")}
    for name in ("classify.md", "embed.md", "search.md", "similarity.md", "bench.md", "formats.md", "modes.md",
                 "decisions.md", "architecture.md", "benchmarks.md"):
        assert name in linked, name
