"""The documentation's promises, read from the files alone (nothing is imported, so this is instant).

- every module of `common`, `preprocess` and `train` is named in docs/architecture.md, the one
  map of the code: in code (between backticks or in a code block), by its path
  (`preprocess/cache/reader.py`) or its dotted name (`preprocess.cache.reader`); a package's
  `__init__.py` by that path, or by the package's folder (`preprocess/cache/`) or dotted name;
- every relative link or image in README.md and docs/*.md (and the READMEs of benchmarks/ and
  data/) points at a file that exists, and a `#anchor` into a markdown file, the file's own
  included, matches one of its headings as GitHub turns headings into anchors.

Each rule is a function of its inputs, and the last tests feed them broken inputs, so every rule
is seen to fail.
"""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "preprocess", "train")
ARCHITECTURE = ROOT / "docs" / "architecture.md"
DOCUMENTS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md",
             ROOT / "data" / "README.md")

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]+`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.+?)\s*#*\s*$", re.MULTILINE)
EXTERNAL = ("http://", "https://", "mailto:")


def project_modules() -> list[str]:
    """Every module file of the three packages, as a path relative to the repository root."""
    return sorted(path.relative_to(ROOT).as_posix() for package in PACKAGES for path in (ROOT / package).rglob("*.py"))


def names_of(module_path: str) -> tuple[str, ...]:
    """The names a module may go by: its path and dotted name; a package's also its folder."""
    parts = module_path.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        package = parts[:-1]
        return module_path, "/".join(package) + "/", ".".join(package)
    return module_path, ".".join(parts)


def code_text(markdown: str) -> str:
    """What a page writes as code: its fenced blocks and its inline code spans, one per line."""
    blocks = [match.group(0) for match in FENCE.finditer(markdown)]
    spans = [match.group(0)[1:-1] for match in CODE_SPAN.finditer(FENCE.sub("", markdown))]
    return "\n".join(blocks + spans)


def is_named(name: str, code: str) -> bool:
    """`name` as a whole name in `code`: not part of a longer path or dotted name (`a.b` is not in `a.b.c`)."""
    return re.search(rf"(?<![\w/.]){re.escape(name)}(?![\w/]|\.\w)", code) is not None


def unnamed_modules(module_paths: list[str], markdown: str) -> list[str]:
    """The modules that `markdown` never names in code, by any of their names."""
    code = code_text(markdown)
    return [path for path in module_paths if not any(is_named(name, code) for name in names_of(path))]


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text lowercased, punctuation dropped (word characters,
    hyphens and spaces stay), spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text, not its target
    text = text.replace("`", "").lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors_of(markdown: str) -> set[str]:
    """Every heading's anchor; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    anchors = set()
    for match in HEADING.finditer(FENCE.sub("", markdown)):
        slug = github_slug(match.group(2))
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def link_targets(markdown: str) -> list[str]:
    """The targets of the links and images of a page, outside code."""
    prose = CODE_SPAN.sub("code", FENCE.sub("", markdown))
    return [match.group(1) for match in LINK.finditer(prose)]


def broken_links(document: Path, markdown: str) -> list[str]:
    """Each relative link of `markdown` (the text of `document`) that points at no file, or at an
    anchor that is not a heading of its markdown file, with the reason."""
    broken = []
    for target in link_targets(markdown):
        if target.startswith(EXTERNAL):
            continue
        path_part, _, anchor = target.partition("#")
        path = (document.parent / unquote(path_part)).resolve() if path_part else document
        if path_part and not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md":
            text = markdown if path == document else path.read_text(encoding="utf-8")
            if unquote(anchor) not in anchors_of(text):
                broken.append(f"{target}: no heading with this anchor in {path.name}")
    return broken


def test_every_module_is_named_in_the_architecture_page():
    modules = project_modules()
    assert len(modules) > 50  # the walk found the packages
    missing = unnamed_modules(modules, ARCHITECTURE.read_text(encoding="utf-8"))
    assert not missing, f"docs/architecture.md does not name: {', '.join(missing)}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(document):
    broken = broken_links(document, document.read_text(encoding="utf-8"))
    assert not broken, f"{document.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_rules_catch_what_they_forbid(tmp_path):
    modules = ["preprocess/cache/__init__.py", "preprocess/cache/reader.py", "train/__init__.py", "train/fit.py"]
    # a submodule's path does not name its package, and prose does not count: only code does
    assert unnamed_modules(modules, "`preprocess/cache/reader.py` and train.fit, train") == [
        "preprocess/cache/__init__.py", "train/__init__.py", "train/fit.py"]
    # `preprocess.cache` is not named by `preprocess.cache.reader`, nor `train.fit` by `train.fitness`
    assert unnamed_modules(modules, "`preprocess.cache.reader` `train.fitness`") == [
        "preprocess/cache/__init__.py", "train/__init__.py", "train/fit.py"]
    assert unnamed_modules(modules, "`preprocess.cache`, `preprocess/cache/reader.py`, package `train`.\n"
                                    "```\ntrain/fit.py\n```") == []

    assert github_slug("Training recipe (`benchmarks/bench_recipe.py`)") == "training-recipe-benchmarksbench_recipepy"
    assert github_slug("The demo's head: `--pooling avgmax`") == "the-demos-head---pooling-avgmax"
    assert anchors_of("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n## A section\n", encoding="utf-8")
    (tmp_path / "picture.png").write_bytes(b"")
    readme = tmp_path / "README.md"
    good = ("[page](docs/page.md) [section](docs/page.md#a-section) ![picture](picture.png) [top](#readme) "
            "[out](https://example.org/missing) `[in code](missing.md)`\n# README\n")
    assert broken_links(readme, good) == []
    bad = "# README\n[gone](docs/gone.md) ![gone](gone.png) [section](docs/page.md#no-such-section) [here](#nowhere)\n"
    assert broken_links(readme, bad) == [
        "docs/gone.md: no such file", "gone.png: no such file",
        "docs/page.md#no-such-section: no heading with this anchor in page.md",
        "#nowhere: no heading with this anchor in README.md"]
