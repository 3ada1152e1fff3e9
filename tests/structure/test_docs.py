"""The README stays short and every relative link in README.md and docs/*.md leads to a file (and heading) that
exists."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+\s+(.+?)\s*$", page.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # links inside code blocks are not links,
    text = re.sub(r"`[^`\n]*`", "", text)  # nor inside inline code
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]  # http:, https:, mailto: left out


def test_readme_is_short():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) < 200, f"README.md has {len(lines)} lines: move detail into docs/ (limit 199)"


def test_every_relative_link_resolves():
    broken = []
    for page in _pages():
        for target in _links(page):
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(REPO)}: ({target}) -> {path} does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(REPO)}: ({target}) -> no heading '#{anchor}' in {path}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_link_check_is_not_blind(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[a](missing.md) [b](page.md#nowhere) [c](https://example.org) `[d](code.md)`\n# Here\n")
    assert _links(page) == ["missing.md", "page.md#nowhere"]
    assert _anchors(page) == {"here"}


def test_every_docs_page_is_in_the_index():
    index = (REPO / "docs" / "README.md").read_text()
    missing = [
        p.name for p in sorted((REPO / "docs").glob("*.md")) if p.name != "README.md" and f"({p.name})" not in index
    ]
    assert not missing, f"docs/README.md does not link {missing}"
